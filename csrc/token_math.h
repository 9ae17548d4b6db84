// Per-token math of I-LoRA shared by the C++ CPU backend and the CUDA kernels (SPEC section 1).
//
// Everything here is a pure function of one token's values, written once and compiled for both the host
// (csrc/cpu/ilora_cpu.cpp, where the tests validate it) and the device (csrc/cuda/ilora_cuda.cu).
//
//   scalar_t  the activation dtype: float, double, c10::Half / c10::BFloat16 on the host,
//             __half / __nv_bfloat16 in CUDA kernels
//   acc_t     the accumulation / router dtype: double for double activations, float otherwise
//
// Conventions that mirror ilora_kernels/ops/reference.py:
//   * the router softmax (dense or top-k) runs in acc_t on logits loaded from the activation dtype;
//   * g is rounded to the activation dtype before it multiplies h (forward) or v (backward, dh);
//   * dg = s <v_k, h> is accumulated in acc_t, and dz = g * (dg - <g, dg>) is computed in acc_t.
// Top-k ties are broken towards the lower head index (a head i beats head j when l_i > l_j, or l_i == l_j and
// i < j); a NaN logit beats every number.  The reference backend ranks the same way (a stable descending sort), and
// so does the tests' float64 reference (tests/ilora_float64.py, topk_keep).
#pragma once

#include <cstdint>
#include <cmath>
#include <math.h>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace ilora {

// ---------------------------------------------------------------------------------------------------------------
// dtype plumbing

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// load: activation dtype -> acc_t; store: acc_t -> activation dtype (round to nearest even).
// The generic version covers float, double and c10::Half / c10::BFloat16 (explicit conversions).  CUDA's own
// half types get explicit intrinsics because torch compiles with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T>
struct Cvt {
  using acc = typename AccOf<T>::type;
  static ILORA_HOST_DEVICE acc load(T v) { return static_cast<acc>(v); }
  static ILORA_HOST_DEVICE T store(acc v) { return static_cast<T>(v); }
};

#if defined(__CUDACC__)
template <>
struct Cvt<__half> {
  using acc = float;
  static ILORA_HOST_DEVICE float load(__half v) { return __half2float(v); }
  static ILORA_HOST_DEVICE __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  using acc = float;
  static ILORA_HOST_DEVICE float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static ILORA_HOST_DEVICE __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
#endif

ILORA_HOST_DEVICE float exp_acc(float v) { return expf(v); }
ILORA_HOST_DEVICE double exp_acc(double v) { return exp(v); }

// The activation-dtype rounding of an acc_t value, seen again as acc_t (g.to(activation dtype) in the reference).
template <typename scalar_t>
ILORA_HOST_DEVICE typename Cvt<scalar_t>::acc round_to(typename Cvt<scalar_t>::acc v) {
  return Cvt<scalar_t>::load(Cvt<scalar_t>::store(v));
}

// ---------------------------------------------------------------------------------------------------------------
// forward: router probabilities and the routed activations u = [g_1 h, ..., g_K h]

// Whether head i is among the top_k largest logits (always true for dense routing: top_k <= 0 or >= K).
template <typename acc_t>
ILORA_HOST_DEVICE bool head_selected(const acc_t* logits, int i, int num_heads, int top_k) {
  if (top_k <= 0 || top_k >= num_heads) return true;
  const acc_t li = logits[i];
  const bool nan_i = li != li;
  int rank = 0;  // number of heads that beat head i
  for (int j = 0; j < num_heads; ++j) {
    const acc_t lj = logits[j];
    const bool nan_j = lj != lj;
    // NaN ranks above every number (as torch.topk orders it); ties (NaN with NaN included) go to the lower index
    const bool beats = nan_j ? (!nan_i || j < i) : (!nan_i && (lj > li || (lj == li && j < i)));
    rank += beats ? 1 : 0;
  }
  return rank < top_k;
}

// g = softmax over the selected heads of logits, zero elsewhere.  logits and g are K-element acc_t arrays
// (distinct memory).  Computed like torch.softmax: subtract the max, exponentiate, normalise.
template <typename acc_t>
ILORA_HOST_DEVICE void route_softmax(const acc_t* logits, acc_t* g, int num_heads, int top_k) {
  acc_t mx = acc_t(0);
  bool any = false;
  for (int i = 0; i < num_heads; ++i) {
    const bool sel = head_selected(logits, i, num_heads, top_k);
    g[i] = sel ? acc_t(1) : acc_t(0);
    if (sel && (!any || logits[i] > mx)) {
      mx = logits[i];
      any = true;
    }
  }
  // unselected heads are marked -1 (a selected head's e is >= 0 or NaN) and stay exactly 0: a non-finite sum
  // (a +inf or NaN logit, or every selected logit -inf) makes the selected heads NaN, as torch.softmax does, and
  // never leaks into the unselected ones
  acc_t sum = acc_t(0);
  for (int i = 0; i < num_heads; ++i) {
    if (g[i] != acc_t(0)) {
      const acc_t e = exp_acc(logits[i] - mx);
      g[i] = e;
      sum += e;
    } else {
      g[i] = acc_t(-1);
    }
  }
  const acc_t inv = acc_t(1) / sum;
  for (int i = 0; i < num_heads; ++i) g[i] = g[i] < acc_t(0) ? acc_t(0) : g[i] * inv;
}

// One element of u: u[k * r + j] = round(round(g_k) * h_j).
template <typename scalar_t>
ILORA_HOST_DEVICE scalar_t routed_value(typename Cvt<scalar_t>::acc g_k, scalar_t h_j) {
  using C = Cvt<scalar_t>;
  return C::store(round_to<scalar_t>(g_k) * C::load(h_j));
}

// ---------------------------------------------------------------------------------------------------------------
// backward: dh, dg and the softmax backward dz, from v = dy B_cat (K*r values of one token), h and g

// dh_j = s * sum_k round(g_k) v_{k,j}
template <typename scalar_t>
ILORA_HOST_DEVICE typename Cvt<scalar_t>::acc dh_value(const scalar_t* v, const typename Cvt<scalar_t>::acc* g,
                                                       int64_t j, int num_heads, int64_t rank,
                                                       typename Cvt<scalar_t>::acc scaling) {
  using C = Cvt<scalar_t>;
  typename C::acc sum = 0;
  for (int k = 0; k < num_heads; ++k) sum += round_to<scalar_t>(g[k]) * C::load(v[k * rank + j]);
  return scaling * sum;
}

// Partial <v_k, h> over j = j0, j0 + step, ...  (the host sums everything with j0 = 0, step = 1; a CUDA warp
// uses j0 = lane, step = 32 and reduces the partials with shuffles).  dg_k = s * <v_k, h>.
template <typename scalar_t>
ILORA_HOST_DEVICE typename Cvt<scalar_t>::acc head_dot_partial(const scalar_t* v, const scalar_t* h, int k,
                                                               int64_t rank, int64_t j0, int64_t step) {
  using C = Cvt<scalar_t>;
  typename C::acc sum = 0;
  const scalar_t* vk = v + k * rank;
  for (int64_t j = j0; j < rank; j += step) sum += C::load(vk[j]) * C::load(h[j]);
  return sum;
}

// dz = g * (dg - <g, dg>)   (softmax backward; exact for top-k routing too, since dropped heads have g = 0)
template <typename acc_t>
ILORA_HOST_DEVICE void softmax_backward(const acc_t* g, const acc_t* dg, acc_t* dz, int num_heads) {
  acc_t dot = acc_t(0);
  for (int k = 0; k < num_heads; ++k) dot += g[k] * dg[k];
  for (int k = 0; k < num_heads; ++k) dz[k] = g[k] * (dg[k] - dot);
}

// The whole per-token backward step, serially (host path).  scratch: 2 * K acc_t values.
//   v (K*r), h (r), g (K) in; dh (r) and dz (K) out in the activation dtype.
template <typename scalar_t>
ILORA_HOST_DEVICE void token_backward(const scalar_t* v, const scalar_t* h, const typename Cvt<scalar_t>::acc* g,
                                      int num_heads, int64_t rank, typename Cvt<scalar_t>::acc scaling,
                                      scalar_t* dh, scalar_t* dz, typename Cvt<scalar_t>::acc* scratch) {
  using C = Cvt<scalar_t>;
  typename C::acc* dg = scratch;
  typename C::acc* dzf = scratch + num_heads;
  for (int k = 0; k < num_heads; ++k) dg[k] = scaling * head_dot_partial(v, h, k, rank, 0, 1);
  softmax_backward(g, dg, dzf, num_heads);
  for (int k = 0; k < num_heads; ++k) dz[k] = C::store(dzf[k]);
  for (int64_t j = 0; j < rank; ++j) dh[j] = C::store(dh_value(v, g, j, num_heads, rank, scaling));
}

// ---------------------------------------------------------------------------------------------------------------
// dropout helpers (mask from common.h; kept elements scaled by 1 / (1 - p), computed in acc_t, rounded once)

template <typename scalar_t>
ILORA_HOST_DEVICE scalar_t dropout_value(scalar_t x, bool keep, typename Cvt<scalar_t>::acc inv_keep) {
  using C = Cvt<scalar_t>;
  return keep ? C::store(C::load(x) * inv_keep) : C::store(typename C::acc(0));
}

}  // namespace ilora
