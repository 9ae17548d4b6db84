// The schemas of the fused ops, shared by the extension (ilora_ops.cpp) and the test-only host emulation of the
// CUDA backend (tests/cuda_emulation), which registers the same signatures under another namespace.
#pragma once

namespace ilora {

inline constexpr const char* kFusedForwardSchema =
    "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor router_weight, Tensor lora_a, Tensor lora_b, "
    "float scaling, float dropout_p, int seed, int top_k) -> (Tensor, Tensor, Tensor)";

inline constexpr const char* kFusedBackwardSchema =
    "fused_backward(Tensor dy, Tensor x, Tensor weight, Tensor router_weight, Tensor lora_a, Tensor lora_b, "
    "Tensor h, Tensor g, float scaling, float dropout_p, int seed, bool[4] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

}  // namespace ilora
