// The CUDA backend (csrc/cuda/ilora_cuda.cu) compiled for the host against host_emulation.h, registered for CPU
// tensors as ilora_cuda_emulation::fused_forward / fused_backward (the schemas of csrc/ilora_ops.cpp), plus
// ilora_cuda_emulation::launch_count().  Built by tests/test_cuda_emulation.py with torch.utils.cpp_extension.
#include "host_emulation.h"

#include <torch/library.h>

#include "cuda/ilora_cuda.cu"

namespace {
int64_t launch_count() { return ilora_emu::launches.load(); }
}  // namespace

TORCH_LIBRARY(ilora_cuda_emulation, m) {
  m.def(
      "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor router_weight, Tensor lora_a, Tensor lora_b, "
      "float scaling, float dropout_p, int seed, int top_k) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor dy, Tensor x, Tensor weight, Tensor router_weight, Tensor lora_a, Tensor lora_b, "
      "Tensor h, Tensor g, float scaling, float dropout_p, int seed, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("launch_count() -> int", &launch_count);
  m.impl("fused_forward", c10::DispatchKey::CPU, &ilora::fused_forward_cuda);
  m.impl("fused_backward", c10::DispatchKey::CPU, &ilora::fused_backward_cuda);
}
