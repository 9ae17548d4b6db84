// C++ CPU backend of I-LoRA: ilora_kernels::fused_forward / fused_backward for CPU tensors.
//
// The big GEMMs go through ATen (MKL / oneDNN / OpenBLAS); everything between them is one at::parallel_for pass
// over tokens built on the per-token math of token_math.h (shared with the CUDA kernels):
//
//   forward   p == 0: z = x [W_r; A]^T (ONE shrink GEMM, K + r outputs); p > 0: logits = x W_r^T and
//             h = dropout(x) A^T.  Then one token pass: softmax / top-k -> g, h, u = [g_1 h, ..., g_K h].
//             y = x W^T + b (addmm), y += s u B_cat^T (addmm_ with beta = 1 into y, no temporary).
//   backward  V = dy B_cat (one GEMM); one token pass -> D = [dz | dh] (and u when dB is needed);
//             p == 0: dx = dy W + D [W_r; A] (beta = 1 into dx) and [dW_r; dA] = D^T x (ONE GEMM each);
//             p > 0:  dx = dy W + dz W_r, then ONE mask pass that adds mask / (1 - p) * (dh A) to dx and
//                     writes dropout(x); dW_r = dz^T x, dA = dh^T dropout(x).  dB = s dy^T u (one GEMM; a permute copy
//                     unless lora_b is packed, ../layout.h).
//
// Strides: x and dy are never copied by this file; they go to ATen's GEMMs as given (which handle any 2-D strides,
// copying internally only when neither dimension has unit stride), and the dropout pass reads x through its
// strides.  With dropout, dropout(x) is materialised once (N x d_in) for the A GEMM: a CPU GEMM cannot apply the
// mask on the fly.  The mask is never stored: it is regenerated from (seed, token, column) (common.h).
// Small tensors (router_weight, lora_a, lora_b, h, g) are made contiguous freely.  Exception: float16 GEMMs run
// in float32 on widened copies of their operands (see gemm() below), because ATen's float16 CPU GEMM is very slow.
//
// The input checks live in ../checks.cpp (shared with the CUDA backend).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../layout.h"
#include "../token_math.h"

namespace ilora {
namespace {

constexpr int64_t kGrain = 32768;  // elements of work per parallel_for chunk (at::internal::GRAIN_SIZE)

int64_t token_grain(int64_t work_per_token) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_token)); }

// Few tokens (decode sizes) and adapter tensors that are not in the packed layout (../layout.h): per-head GEMMs
// straight on lora_b and separate router / A GEMMs beat building B_cat and [W_r; A], whose copies (d_out K r and
// (K + r) d_in elements) cost more than the extra passes over the small x / y / dy. Packed, both are free views.
bool few_tokens(int64_t n_tokens, int64_t rank) { return n_tokens <= rank; }

// out (N, d_in, contiguous) = dropout_p(x), x read through its strides.
template <typename scalar_t>
void dropout_rows(const at::Tensor& x, at::Tensor& out, int64_t seed, double p) {
  using acc_t = typename Cvt<scalar_t>::acc;
  const int64_t n = x.size(0), d_in = x.size(1), sx0 = x.stride(0), sx1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const uint32_t seed32 = static_cast<uint32_t>(seed), threshold = dropout_threshold(p);
  const acc_t inv_keep = acc_t(1.0 / (1.0 - p));
  at::parallel_for(0, n, token_grain(d_in), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = dropout_row_key(seed32, i);
      const scalar_t* xi = xp + i * sx0;
      scalar_t* oi = op + i * d_in;
      for (int64_t j = 0; j < d_in; ++j) oi[j] = dropout_value(xi[j * sx1], dropout_keep(key, j, threshold), inv_keep);
    }
  });
}

// dx += mask / (1 - p) * t   (t = dh A, (N, d_in) contiguous; dx contiguous)
template <typename scalar_t>
void add_masked(at::Tensor& dx, const at::Tensor& t, int64_t seed, double p) {
  using C = Cvt<scalar_t>;
  using acc_t = typename C::acc;
  const int64_t n = dx.size(0), d_in = dx.size(1);
  scalar_t* dp = dx.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  const uint32_t seed32 = static_cast<uint32_t>(seed), threshold = dropout_threshold(p);
  const acc_t inv_keep = acc_t(1.0 / (1.0 - p));
  at::parallel_for(0, n, token_grain(d_in), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = dropout_row_key(seed32, i);
      scalar_t* di = dp + i * d_in;
      const scalar_t* ti = tp + i * d_in;
      for (int64_t j = 0; j < d_in; ++j) {
        if (dropout_keep(key, j, threshold)) di[j] = C::store(C::load(di[j]) + C::load(ti[j]) * inv_keep);
      }
    }
  });
}

// One pass that regenerates the mask once for both dropout uses of the backward:
// xd (N, d_in, contiguous) = dropout_p(x) (x read through its strides) and dx += mask / (1 - p) * t.
template <typename scalar_t>
void dropout_rows_and_add_masked(const at::Tensor& x, at::Tensor& xd, at::Tensor& dx, const at::Tensor& t,
                                 int64_t seed, double p) {
  using C = Cvt<scalar_t>;
  using acc_t = typename C::acc;
  const int64_t n = x.size(0), d_in = x.size(1), sx0 = x.stride(0), sx1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  scalar_t* op = xd.data_ptr<scalar_t>();
  scalar_t* dp = dx.data_ptr<scalar_t>();
  const uint32_t seed32 = static_cast<uint32_t>(seed), threshold = dropout_threshold(p);
  const acc_t inv_keep = acc_t(1.0 / (1.0 - p));
  at::parallel_for(0, n, token_grain(2 * d_in), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = dropout_row_key(seed32, i);
      const scalar_t* xi = xp + i * sx0;
      const scalar_t* ti = tp + i * d_in;
      scalar_t* oi = op + i * d_in;
      scalar_t* di = dp + i * d_in;
      for (int64_t j = 0; j < d_in; ++j) {
        const bool keep = dropout_keep(key, j, threshold);
        oi[j] = dropout_value(xi[j * sx1], keep, inv_keep);
        if (keep) di[j] = C::store(C::load(di[j]) + C::load(ti[j]) * inv_keep);
      }
    }
  });
}

// One pass over tokens: g = softmax/top-k(logits), h (copied from hsrc unless it is h itself), u = g (x) h.
template <typename scalar_t>
void route_tokens(const scalar_t* logits, int64_t ld_logits, const scalar_t* hsrc, int64_t ld_hsrc,
                  typename Cvt<scalar_t>::acc* g, scalar_t* h, scalar_t* u, int64_t n, int num_heads, int64_t rank,
                  int top_k) {
  using C = Cvt<scalar_t>;
  using acc_t = typename C::acc;
  at::parallel_for(0, n, token_grain(num_heads * (rank + num_heads)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> lg(num_heads);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* li = logits + i * ld_logits;
      for (int k = 0; k < num_heads; ++k) lg[k] = C::load(li[k]);
      acc_t* gi = g + i * num_heads;
      route_softmax(lg.data(), gi, num_heads, top_k);
      scalar_t* hi = h + i * rank;
      const scalar_t* hs = hsrc + i * ld_hsrc;
      if (hs != hi) std::copy(hs, hs + rank, hi);
      scalar_t* ui = u + i * num_heads * rank;
      for (int k = 0; k < num_heads; ++k) {
        const acc_t gk = gi[k];
        for (int64_t j = 0; j < rank; ++j) ui[k * rank + j] = routed_value(gk, hi[j]);
      }
    }
  });
}

// One pass over tokens: u = g (x) h (if u) and D = [dz | dh] from v = dy B_cat (if v).
template <typename scalar_t>
void backward_tokens(const scalar_t* v, const scalar_t* h, const typename Cvt<scalar_t>::acc* g, scalar_t* d,
                     scalar_t* u, int64_t n, int num_heads, int64_t rank, double scaling) {
  using acc_t = typename Cvt<scalar_t>::acc;
  const int64_t kr = num_heads * rank, ld_d = num_heads + rank;
  at::parallel_for(0, n, token_grain(3 * kr), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * num_heads);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* hi = h + i * rank;
      const acc_t* gi = g + i * num_heads;
      if (u != nullptr) {
        scalar_t* ui = u + i * kr;
        for (int k = 0; k < num_heads; ++k) {
          for (int64_t j = 0; j < rank; ++j) ui[k * rank + j] = routed_value(gi[k], hi[j]);
        }
      }
      if (v != nullptr) {
        scalar_t* di = d + i * ld_d;
        token_backward(v + i * kr, hi, gi, num_heads, rank, acc_t(scaling), di + num_heads, di, scratch.data());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// GEMMs.  ATen's CPU GEMM for float16 has no fast kernel on CPUs without AVX512-FP16 (about 1 GFLOP/s measured on
// the 2-core AMD EPYC of docs/kernel_design.md, 50-100x slower than float32), so float16 operands are multiplied
// in float32 and the product rounded once to float16, which is what a float16 GEMM with float32 accumulation
// computes.  Every other dtype goes straight to ATen.

bool widen(const at::Tensor& a) { return a.scalar_type() == at::kHalf; }

at::Tensor wide(const at::Tensor& t) { return t.to(at::kFloat); }

// a b
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  return widen(a) ? at::mm(wide(a), wide(b)).to(at::kHalf) : at::mm(a, b);
}

// bias + a b
at::Tensor gemm_bias(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  return widen(a) ? at::addmm(wide(bias), wide(a), wide(b)).to(at::kHalf) : at::addmm(bias, a, b);
}

// out = alpha a b  (out may be a view; with beta = 0 its old values, NaN included, are ignored)
void gemm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  if (widen(a)) {
    at::Tensor product = at::mm(wide(a), wide(b));
    if (alpha != 1.0) product.mul_(alpha);
    out.copy_(product);
  } else if (alpha == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0, alpha);
  }
}

// c += alpha a b
void gemm_acc(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  if (widen(a)) {
    c.copy_(at::addmm(wide(c), wide(a), wide(b), /*beta=*/1, alpha));
  } else {
    c.addmm_(a, b, /*beta=*/1, alpha);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router_weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    double dropout_p, int64_t seed, int64_t top_k) {
  check_fused_forward_inputs(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k,
                             c10::DeviceType::CPU);
  const int64_t n = x.size(0), num_heads = router_weight.size(0), rank = lora_a.size(0);
  const auto dtype = x.scalar_type();
  const int top = static_cast<int>(std::min<int64_t>(top_k, num_heads));

  at::Tensor h = at::empty({n, rank}, x.options());
  at::Tensor g = at::empty({n, num_heads}, x.options().dtype(router_dtype(dtype)));
  at::Tensor u = at::empty({n, num_heads * rank}, x.options());

  at::Tensor z;  // source of the logits (row stride ld_z) and of h (row stride ld_h)
  int64_t ld_z = 0, ld_h = 0, h_offset = 0;
  at::Tensor h_src;
  const bool few = few_tokens(n, rank);
  const bool per_head = few && !heads_packed(lora_b), separate_shrink = few && !shrink_packed(router_weight, lora_a);
  if (dropout_p == 0.0 && !separate_shrink) {
    // ONE shrink GEMM against [W_r; A] ((K + r) x d_in: a view when packed)
    z = gemm(x, shrink_concat(router_weight, lora_a).t());
    ld_z = num_heads + rank;
    h_src = z;
    ld_h = ld_z;
    h_offset = num_heads;
  } else {
    z = gemm(x, router_weight.t());  // the router sees the clean x
    ld_z = num_heads;
    if (dropout_p == 0.0) {
      gemm_out(h, x, lora_a.t());
    } else {
      at::Tensor xd = at::empty({n, x.size(1)}, x.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ilora_dropout_cpu",
                                      [&] { dropout_rows<scalar_t>(x, xd, seed, dropout_p); });
      gemm_out(h, xd, lora_a.t());
    }
    h_src = h;
    ld_h = rank;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ilora_route_cpu", [&] {
    using acc_t = typename Cvt<scalar_t>::acc;
    route_tokens<scalar_t>(z.data_ptr<scalar_t>(), ld_z, h_src.data_ptr<scalar_t>() + h_offset, ld_h,
                           g.data_ptr<acc_t>(), h.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), n,
                           static_cast<int>(num_heads), rank, top);
  });

  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    y = gemm_bias(*bias, x, weight.t());
  } else {
    y = gemm(x, weight.t());
  }
  if (per_head) {
    for (int64_t k = 0; k < num_heads; ++k) {
      gemm_acc(y, u.narrow(1, k * rank, rank), lora_b.select(0, k).t(), scaling);
    }
  } else {
    gemm_acc(y, u, concat_heads(lora_b).t(), scaling);
  }
  return {y, h, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router_weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& h_in, const at::Tensor& g_in, double scaling,
    double dropout_p, int64_t seed, std::array<bool, 4> output_mask) {
  check_fused_backward_inputs(dy, x, weight, router_weight, lora_a, lora_b, h_in, g_in, scaling, dropout_p,
                              c10::DeviceType::CPU);
  const bool need_dx = output_mask[0], need_dwr = output_mask[1], need_da = output_mask[2], need_db = output_mask[3];
  const int64_t n = x.size(0), d_in = x.size(1), d_out = weight.size(0), num_heads = router_weight.size(0),
                rank = lora_a.size(0), kr = num_heads * rank;
  const auto dtype = x.scalar_type();
  const at::Tensor h = h_in.contiguous(), g = g_in.contiguous();
  // unrequested outputs are distinct empty tensors (outputs must not alias each other)
  at::Tensor dx = x.new_empty({0}), d_router = x.new_empty({0}), d_lora_a = x.new_empty({0}),
             d_lora_b = x.new_empty({0});
  const bool need_v = need_dx || need_dwr || need_da;
  if (!need_v && !need_db) return {dx, d_router, d_lora_a, d_lora_b};

  const bool few = few_tokens(n, rank);
  const bool per_head = few && !heads_packed(lora_b), separate_shrink = few && !shrink_packed(router_weight, lora_a);
  at::Tensor v, d, u;
  if (need_v) {
    if (per_head) {
      v = at::empty({n, kr}, x.options());
      for (int64_t k = 0; k < num_heads; ++k) gemm_out(v.narrow(1, k * rank, rank), dy, lora_b.select(0, k));
    } else {
      v = gemm(dy, concat_heads(lora_b));                 // (N, K r)
    }
    d = at::empty({n, num_heads + rank}, x.options());    // [dz | dh]
  }
  if (need_db) u = at::empty({n, kr}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ilora_backward_tokens_cpu", [&] {
    using acc_t = typename Cvt<scalar_t>::acc;
    backward_tokens<scalar_t>(need_v ? v.data_ptr<scalar_t>() : nullptr, h.data_ptr<scalar_t>(), g.data_ptr<acc_t>(),
                              need_v ? d.data_ptr<scalar_t>() : nullptr, need_db ? u.data_ptr<scalar_t>() : nullptr,
                              n, static_cast<int>(num_heads), rank, scaling);
  });

  if (need_db && per_head) {
    d_lora_b = at::empty({num_heads, d_out, rank}, x.options());
    for (int64_t k = 0; k < num_heads; ++k) {
      gemm_out(d_lora_b.select(0, k), dy.t(), u.narrow(1, k * rank, rank), scaling);  // contiguous (d_out, r)
    }
  } else if (need_db) {
    at::Tensor db_cat = at::empty({d_out, kr}, x.options());
    gemm_out(db_cat, dy.t(), u, scaling);  // s dy^T u
    d_lora_b = heads_grad(db_cat, lora_b);  // lora_b's layout: a view when packed
  }
  if (!need_v) return {dx, d_router, d_lora_a, d_lora_b};

  const at::Tensor dz = d.narrow(1, 0, num_heads), dh = d.narrow(1, num_heads, rank);
  if (dropout_p == 0.0) {
    if (need_dx) {
      dx = at::empty({n, d_in}, x.options());
      gemm_out(dx, dy, weight);
      if (separate_shrink) {
        gemm_acc(dx, dz, router_weight);
        gemm_acc(dx, dh, lora_a);
      } else {
        gemm_acc(dx, d, shrink_concat(router_weight, lora_a));  // + [dz | dh] [W_r; A]
      }
    }
    if (need_dwr && need_da) {
      const at::Tensor grads = gemm(d.t(), x);  // [dW_r; dA] = [dz | dh]^T x in ONE GEMM
      d_router = grads.narrow(0, 0, num_heads).clone();
      d_lora_a = grads.narrow(0, num_heads, rank).clone();
    } else if (need_dwr) {
      d_router = gemm(dz.t(), x);
    } else if (need_da) {
      d_lora_a = gemm(dh.t(), x);
    }
  } else {
    at::Tensor xd;
    if (need_da) xd = at::empty({n, d_in}, x.options());
    if (need_dx) {
      dx = at::empty({n, d_in}, x.options());
      gemm_out(dx, dy, weight);
      gemm_acc(dx, dz, router_weight);
      const at::Tensor t = gemm(dh, lora_a);  // (N, d_in); masked and scaled while it is added
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ilora_dx_dropout_cpu", [&] {
        if (need_da) {
          dropout_rows_and_add_masked<scalar_t>(x, xd, dx, t, seed, dropout_p);  // one mask pass for both
        } else {
          add_masked<scalar_t>(dx, t, seed, dropout_p);
        }
      });
    } else if (need_da) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ilora_dropout_cpu",
                                      [&] { dropout_rows<scalar_t>(x, xd, seed, dropout_p); });
    }
    if (need_dwr) d_router = gemm(dz.t(), x);
    if (need_da) d_lora_a = gemm(dh.t(), xd);
  }
  return {dx, d_router, d_lora_a, d_lora_b};
}

}  // namespace
}  // namespace ilora

TORCH_LIBRARY_IMPL(ilora_kernels, CPU, m) {
  m.impl("fused_forward", &ilora::fused_forward_cpu);
  m.impl("fused_backward", &ilora::fused_backward_cpu);
}
