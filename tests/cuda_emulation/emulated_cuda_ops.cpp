// The CUDA backend (csrc/cuda/ilora_cuda.cu) compiled for the host against host_emulation.h, registered for CPU
// tensors as ilora_cuda_emulation::fused_forward / fused_backward (the schemas of csrc/op_schemas.h), plus
// ilora_cuda_emulation::launch_count().  Built by tests/test_cuda_emulation.py with torch.utils.cpp_extension.
#include "host_emulation.h"

#include <torch/library.h>

#include "cuda/ilora_cuda.cu"
#include "op_schemas.h"

namespace {
int64_t launch_count() { return ilora_emu::launches.load(); }
}  // namespace

TORCH_LIBRARY(ilora_cuda_emulation, m) {
  m.def(ilora::kFusedForwardSchema);
  m.def(ilora::kFusedBackwardSchema);
  m.def("launch_count() -> int", &launch_count);
  m.impl("fused_forward", c10::DispatchKey::CPU, &ilora::fused_forward_cuda);
  m.impl("fused_backward", c10::DispatchKey::CPU, &ilora::fused_backward_cuda);
}
