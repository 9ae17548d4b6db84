// Input checks of the fused ops, shared by the C++ CPU and the CUDA backends: device, dtype, rank and shape of
// every tensor, with messages that name the offending tensor and its shape.
#include "checks.h"

#include <cmath>

namespace ilora {

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " (shape ", t.sizes(), ") is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " (shape ", t.sizes(), ") has dtype ", t.scalar_type(),
              " but ", dtype, " is required (x has dtype ", x.scalar_type(), ")");
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* layout) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be a ", ndim, "-D ", layout, " tensor, got shape ", t.sizes());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), " but ", layout, " = ", expected,
              " is required");
}

// Checks shared by both ops: x, weight, router_weight, lora_a, lora_b and the scalars.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router_weight,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
                  c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x (shape ", x.sizes(), ") is on ", x.device(),
              " but this is the ", c10::DeviceTypeName(device_type), " implementation; all tensors must be on one ",
              "device");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": x (shape ", x.sizes(), ") has dtype ", x.scalar_type(),
              "; float16, bfloat16, float32 or float64 is required");
  check_rank(op, "x", x, 2, "(N, d_in)");
  check_rank(op, "weight", weight, 2, "(d_out, d_in)");
  check_rank(op, "router_weight", router_weight, 2, "(K, d_in)");
  check_rank(op, "lora_a", lora_a, 2, "(r, d_in)");
  check_rank(op, "lora_b", lora_b, 3, "(K, d_out, r)");
  const auto dtype = x.scalar_type();
  check_same(op, "weight", weight, x, dtype);
  check_same(op, "router_weight", router_weight, x, dtype);
  check_same(op, "lora_a", lora_a, x, dtype);
  check_same(op, "lora_b", lora_b, x, dtype);
  const int64_t d_in = x.size(1), d_out = weight.size(0), num_heads = router_weight.size(0), rank = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == d_in, op, ": weight has shape ", weight.sizes(), " but x has shape ", x.sizes(),
              ": expected (d_out, ", d_in, ")");
  TORCH_CHECK(num_heads >= 1, op, ": router_weight has shape ", router_weight.sizes(), ": K must be >= 1");
  TORCH_CHECK(rank >= 1, op, ": lora_a has shape ", lora_a.sizes(), ": r must be >= 1");
  check_shape(op, "router_weight", router_weight, {num_heads, d_in}, "(K, d_in)");
  check_shape(op, "lora_a", lora_a, {rank, d_in}, "(r, d_in)");
  check_shape(op, "lora_b", lora_b, {num_heads, d_out, rank}, "(K, d_out, r)");
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

}  // namespace

void check_fused_forward_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& router_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                double scaling, double dropout_p, int64_t top_k, c10::DeviceType device_type) {
  const char* op = "ilora_kernels::fused_forward";
  check_common(op, x, weight, router_weight, lora_a, lora_b, scaling, dropout_p, device_type);
  if (bias.has_value() && bias->defined()) {
    check_same(op, "bias", *bias, x, x.scalar_type());
    check_rank(op, "bias", *bias, 1, "(d_out,)");
    check_shape(op, "bias", *bias, {weight.size(0)}, "(d_out,)");
  }
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0 = dense routing), got ", top_k);
}

void check_fused_backward_inputs(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& router_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                 const at::Tensor& h, const at::Tensor& g, double scaling, double dropout_p,
                                 c10::DeviceType device_type) {
  const char* op = "ilora_kernels::fused_backward";
  check_common(op, x, weight, router_weight, lora_a, lora_b, scaling, dropout_p, device_type);
  const int64_t n = x.size(0), d_out = weight.size(0), num_heads = router_weight.size(0), rank = lora_a.size(0);
  check_same(op, "dy", dy, x, x.scalar_type());
  check_rank(op, "dy", dy, 2, "(N, d_out)");
  check_shape(op, "dy", dy, {n, d_out}, "(N, d_out)");
  check_same(op, "h", h, x, x.scalar_type());
  check_rank(op, "h", h, 2, "(N, r)");
  check_shape(op, "h", h, {n, rank}, "(N, r)");
  check_same(op, "g", g, x, router_dtype(x.scalar_type()));
  check_rank(op, "g", g, 2, "(N, K)");
  check_shape(op, "g", g, {n, num_heads}, "(N, K)");
}

}  // namespace ilora
