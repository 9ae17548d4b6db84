// Input checks of the fused ops (checks.cpp), shared by the C++ CPU and the CUDA backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ilora {

// The router / accumulation dtype of g: float64 for float64 activations, float32 otherwise.
inline at::ScalarType router_dtype(at::ScalarType activation) {
  return activation == at::kDouble ? at::kDouble : at::kFloat;
}

// Raise (TORCH_CHECK) unless the fused_forward inputs are consistent and on a device of type device_type.
void check_fused_forward_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& router_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                double scaling, double dropout_p, int64_t top_k, c10::DeviceType device_type);

// The same for fused_backward (h: (N, r) in the activation dtype, g: (N, K) in router_dtype).
void check_fused_backward_inputs(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& router_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                 const at::Tensor& h, const at::Tensor& g, double scaling, double dropout_p,
                                 c10::DeviceType device_type);

}  // namespace ilora
