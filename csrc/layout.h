// The packed adapter layout (ilora_kernels/ops/layout.py, which explains it): router_weight and lora_a as the two
// halves of one contiguous (K + r, d_in) buffer and lora_b (K, d_out, r) as the permutation of a contiguous
// (d_out, K, r) one. Then [W_r; A] and B_cat are views; otherwise the helpers below copy, with the same numbers.
#pragma once

#include <ATen/ATen.h>

namespace ilora {

// lora_b (K, d_out, r) is a permuted contiguous (d_out, K, r) buffer.
inline bool heads_packed(const at::Tensor& lora_b) { return lora_b.permute({1, 0, 2}).is_contiguous(); }

// B_cat = [B_1 | ... | B_K] (d_out, K r): a view when packed, else a copy.
inline at::Tensor concat_heads(const at::Tensor& lora_b) {
  const int64_t num_heads = lora_b.size(0), d_out = lora_b.size(1), rank = lora_b.size(2);
  return lora_b.permute({1, 0, 2}).reshape({d_out, num_heads * rank});
}

// d lora_b (K, d_out, r) from d B_cat (d_out, K r), in lora_b's layout: a view when packed, else a contiguous copy.
inline at::Tensor heads_grad(const at::Tensor& d_b_cat, const at::Tensor& lora_b) {
  const int64_t num_heads = lora_b.size(0), d_out = lora_b.size(1), rank = lora_b.size(2);
  at::Tensor grad = d_b_cat.view({d_out, num_heads, rank}).permute({1, 0, 2});
  return heads_packed(lora_b) ? grad : grad.contiguous();
}

// router_weight (K, d_in) and lora_a (r, d_in) are adjacent rows of one contiguous buffer, in that order.
inline bool shrink_packed(const at::Tensor& router_weight, const at::Tensor& lora_a) {
  return router_weight.is_contiguous() && lora_a.is_contiguous() && router_weight.numel() > 0 &&
         router_weight.scalar_type() == lora_a.scalar_type() && router_weight.device() == lora_a.device() &&
         router_weight.size(1) == lora_a.size(1) && router_weight.storage().is_alias_of(lora_a.storage()) &&
         static_cast<const char*>(lora_a.const_data_ptr()) ==
             static_cast<const char*>(router_weight.const_data_ptr()) + router_weight.nbytes();
}

// [W_r; A] (K + r, d_in): a view when packed, else a copy.
inline at::Tensor shrink_concat(const at::Tensor& router_weight, const at::Tensor& lora_a) {
  if (shrink_packed(router_weight, lora_a)) {
    const int64_t d_in = router_weight.size(1);
    return router_weight.as_strided({router_weight.size(0) + lora_a.size(0), d_in}, {d_in, 1});
  }
  return at::cat({router_weight, lora_a}, 0);
}

}  // namespace ilora
