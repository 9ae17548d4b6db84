// CUDA backend of I-LoRA: ilora_kernels::fused_forward / fused_backward for CUDA tensors.
//
// The big and small GEMMs go through ATen (cuBLAS / cuBLASLt) on the current stream; the fused glue between them
// is four plain CUDA kernels built on the per-token math of ../token_math.h (the same code the CPU backend runs,
// so the CPU tests validate it):
//
//   route_kernel           one warp per token: softmax / top-k over the K logits (float32, or double for double
//                          activations), writes g, h (copied out of the shrink GEMM result when p == 0) and
//                          u = [g_1 h, ..., g_K h] in one pass.
//   dropout_kernel         dropout(x) for the A GEMM when p > 0 (x read through its strides); the router GEMM
//                          reads the clean x.
//   backward_token_kernel  one warp per token: lanes over r, warp-shuffle reductions for dg_k = s <v_k, h>,
//                          then the softmax backward dz, and dh = s sum_k g_k v_k; writes D = [dz | dh] (N, K + r)
//                          and, when dB is needed, recomputes u = g (x) h.
//   masked_add_kernel      dx += mask / (1 - p) * (dh A), the dropout-mask epilogue of dx (p > 0 only).
//
// The dropout mask is never stored; every kernel regenerates it from (seed, token, column) (../common.h).
// Limits: K <= 256 heads (per-warp shared-memory scratch).  Index arithmetic is int64 throughout.
//
// The tests also compile this file for the host (tests/cuda_emulation): with ILORA_CUDA_EMULATION defined, the
// includer supplies the CUDA names used below (thread indices, __syncwarp, __shfl_xor_sync, ILORA_LAUNCH, ...)
// and the kernels run on CPU tensors with one host thread per CUDA thread.  Build with -DILORA_POISON_OUTPUTS
// to fill every intermediate and output buffer with NaN before the kernels write it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#if !defined(ILORA_CUDA_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define ILORA_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
#define ILORA_LAUNCH(kernel, grid, block, smem) kernel<<<(grid), (block), (smem), ::ilora::current_stream()>>>

namespace ilora {
using half_t = __half;
using bfloat16_t = __nv_bfloat16;
using DeviceGuard = c10::cuda::CUDAGuard;
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;

// The current stream of the current device (the same stream as at::cuda::getCurrentCUDAStream(), which lives in
// ATen/cuda/CUDAContext.h; that header needs the cuSPARSE / cuBLAS headers, which a bare toolkit may not have).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
}  // namespace ilora
#endif

#include "../checks.h"
#include "../common.h"
#include "../layout.h"
#include "../token_math.h"

#ifndef ILORA_CUDA_MAX_BLOCKS
#define ILORA_CUDA_MAX_BLOCKS (1 << 20)
#endif

namespace ilora {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kWarpThreads = 32;
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxHeads = 256;
constexpr int64_t kMaxBlocks = ILORA_CUDA_MAX_BLOCKS;  // grid-stride loops cover the rest

// ---------------------------------------------------------------------------------------------------------------
// kernels

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpThreads / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void route_kernel(const scalar_t* __restrict__ logits, int64_t ld_logits, const scalar_t* hsrc,
                             int64_t ld_hsrc, typename Cvt<scalar_t>::acc* __restrict__ g, scalar_t* h, bool copy_h,
                             scalar_t* __restrict__ u, int64_t n, int num_heads, int64_t rank, int top_k) {
  using C = Cvt<scalar_t>;
  using acc_t = typename C::acc;
  ILORA_DYNAMIC_SHARED_MEMORY(ilora_smem);
  const int warp = threadIdx.x / kWarpThreads, lane = threadIdx.x % kWarpThreads;
  acc_t* s_logits = reinterpret_cast<acc_t*>(ilora_smem) + static_cast<int64_t>(warp) * 2 * num_heads;
  acc_t* s_g = s_logits + num_heads;
  const int64_t kr = static_cast<int64_t>(num_heads) * rank;
  for (int64_t tok = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; tok < n;
       tok += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    for (int k = lane; k < num_heads; k += kWarpThreads) s_logits[k] = C::load(logits[tok * ld_logits + k]);
    __syncwarp();
    if (lane == 0) route_softmax(s_logits, s_g, num_heads, top_k);
    __syncwarp();
    for (int k = lane; k < num_heads; k += kWarpThreads) g[tok * num_heads + k] = s_g[k];
    const scalar_t* hs = hsrc + tok * ld_hsrc;
    if (copy_h) {
      for (int64_t j = lane; j < rank; j += kWarpThreads) h[tok * rank + j] = hs[j];
    }
    scalar_t* ut = u + tok * kr;
    for (int64_t idx = lane; idx < kr; idx += kWarpThreads) {
      const int64_t k = idx / rank, j = idx - k * rank;
      ut[idx] = routed_value(s_g[k], hs[j]);
    }
    __syncwarp();  // the scratch is reused by the next token
  }
}

template <typename scalar_t>
__global__ void dropout_kernel(const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1, scalar_t* __restrict__ out,
                               int64_t n, int64_t d, uint32_t seed, uint32_t threshold,
                               typename Cvt<scalar_t>::acc inv_keep) {
  const int64_t total = n * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / d, j = idx - i * d;
    const bool keep = dropout_keep(dropout_row_key(seed, i), j, threshold);
    out[idx] = dropout_value(x[i * sx0 + j * sx1], keep, inv_keep);
  }
}

template <typename scalar_t>
__global__ void backward_token_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ h,
                                      const typename Cvt<scalar_t>::acc* __restrict__ g, scalar_t* __restrict__ d,
                                      scalar_t* __restrict__ u, int64_t n, int num_heads, int64_t rank,
                                      typename Cvt<scalar_t>::acc scaling) {
  using C = Cvt<scalar_t>;
  using acc_t = typename C::acc;
  ILORA_DYNAMIC_SHARED_MEMORY(ilora_smem);
  const int warp = threadIdx.x / kWarpThreads, lane = threadIdx.x % kWarpThreads;
  acc_t* s_g = reinterpret_cast<acc_t*>(ilora_smem) + static_cast<int64_t>(warp) * 3 * num_heads;
  acc_t* s_dg = s_g + num_heads;
  acc_t* s_dz = s_dg + num_heads;
  const int64_t kr = static_cast<int64_t>(num_heads) * rank, ld_d = num_heads + rank;
  for (int64_t tok = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; tok < n;
       tok += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    for (int k = lane; k < num_heads; k += kWarpThreads) s_g[k] = g[tok * num_heads + k];
    __syncwarp();
    const scalar_t* ht = h + tok * rank;
    if (u != nullptr) {
      scalar_t* ut = u + tok * kr;
      for (int64_t idx = lane; idx < kr; idx += kWarpThreads) {
        const int64_t k = idx / rank, j = idx - k * rank;
        ut[idx] = routed_value(s_g[k], ht[j]);
      }
    }
    if (v != nullptr) {
      const scalar_t* vt = v + tok * kr;
      for (int k = 0; k < num_heads; ++k) {
        const acc_t dot = warp_sum(head_dot_partial(vt, ht, k, rank, lane, kWarpThreads));
        if (lane == 0) s_dg[k] = scaling * dot;
      }
      __syncwarp();
      if (lane == 0) softmax_backward(s_g, s_dg, s_dz, num_heads);
      __syncwarp();
      scalar_t* dt = d + tok * ld_d;
      for (int k = lane; k < num_heads; k += kWarpThreads) dt[k] = C::store(s_dz[k]);
      for (int64_t j = lane; j < rank; j += kWarpThreads) {
        dt[num_heads + j] = C::store(dh_value(vt, s_g, j, num_heads, rank, scaling));
      }
    }
    __syncwarp();
  }
}

template <typename scalar_t>
__global__ void masked_add_kernel(scalar_t* __restrict__ dx, const scalar_t* __restrict__ t, int64_t n, int64_t d,
                                  uint32_t seed, uint32_t threshold, typename Cvt<scalar_t>::acc inv_keep) {
  using C = Cvt<scalar_t>;
  const int64_t total = n * d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / d, j = idx - i * d;
    if (dropout_keep(dropout_row_key(seed, i), j, threshold)) dx[idx] = C::store(C::load(dx[idx]) + C::load(t[idx]) * inv_keep);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// launchers (one per kernel; nothing is launched for empty work)

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>{}) with the CUDA element type of `dtype`.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    case at::kHalf: f(Tag<half_t>{}); break;
    case at::kBFloat16: f(Tag<bfloat16_t>{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", dtype);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

int warp_grid(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

int elementwise_grid(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kElementwiseThreads - 1) / kElementwiseThreads, kMaxBlocks));
}

void launch_route(const at::Tensor& logits_src, int64_t ld_logits, const at::Tensor& h_src, int64_t h_offset,
                  int64_t ld_h, at::Tensor& g, at::Tensor& h, at::Tensor& u, int top_k) {
  const int64_t n = h.size(0), rank = h.size(1), num_heads = g.size(1);
  if (n == 0) return;
  const bool copy_h = !h_src.is_same(h);
  dispatch_dtype(h.scalar_type(), "ilora route_kernel", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = typename Cvt<scalar_t>::acc;
    const size_t smem = sizeof(acc_t) * 2 * num_heads * kWarpsPerBlock;
    ILORA_LAUNCH(route_kernel<scalar_t>, warp_grid(n), kWarpsPerBlock * kWarpThreads, smem)(
        ptr<const scalar_t>(logits_src), ld_logits, ptr<const scalar_t>(h_src) + h_offset, ld_h, ptr<acc_t>(g),
        ptr<scalar_t>(h), copy_h, ptr<scalar_t>(u), n, static_cast<int>(num_heads), rank, top_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_dropout(const at::Tensor& x, at::Tensor& out, int64_t seed, double p) {
  const int64_t n = x.size(0), d = x.size(1);
  if (n * d == 0) return;
  dispatch_dtype(x.scalar_type(), "ilora dropout_kernel", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = typename Cvt<scalar_t>::acc;
    ILORA_LAUNCH(dropout_kernel<scalar_t>, elementwise_grid(n * d), kElementwiseThreads, 0)(
        ptr<const scalar_t>(x), x.stride(0), x.stride(1), ptr<scalar_t>(out), n, d, static_cast<uint32_t>(seed),
        dropout_threshold(p), acc_t(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_backward_tokens(const at::Tensor* v, const at::Tensor& h, const at::Tensor& g, at::Tensor* d,
                            at::Tensor* u, double scaling) {
  const int64_t n = h.size(0), rank = h.size(1), num_heads = g.size(1);
  if (n == 0) return;
  dispatch_dtype(h.scalar_type(), "ilora backward_token_kernel", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = typename Cvt<scalar_t>::acc;
    const size_t smem = sizeof(acc_t) * 3 * num_heads * kWarpsPerBlock;
    ILORA_LAUNCH(backward_token_kernel<scalar_t>, warp_grid(n), kWarpsPerBlock * kWarpThreads, smem)(
            v ? ptr<const scalar_t>(*v) : nullptr, ptr<const scalar_t>(h), ptr<const acc_t>(g),
            d ? ptr<scalar_t>(*d) : nullptr, u ? ptr<scalar_t>(*u) : nullptr, n, static_cast<int>(num_heads), rank,
            acc_t(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_masked_add(at::Tensor& dx, const at::Tensor& t, int64_t seed, double p) {
  const int64_t n = dx.size(0), d = dx.size(1);
  if (n * d == 0) return;
  TORCH_CHECK(dx.is_contiguous() && t.is_contiguous(), "ilora masked_add_kernel: contiguous dx and t expected");
  dispatch_dtype(dx.scalar_type(), "ilora masked_add_kernel", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = typename Cvt<scalar_t>::acc;
    ILORA_LAUNCH(masked_add_kernel<scalar_t>, elementwise_grid(n * d), kElementwiseThreads, 0)(
        ptr<scalar_t>(dx), ptr<const scalar_t>(t), n, d, static_cast<uint32_t>(seed), dropout_threshold(p),
        acc_t(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// the ops

// at::empty, or filled with NaN under ILORA_POISON_OUTPUTS (so that an element no kernel writes shows up).
at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(ILORA_POISON_OUTPUTS)
  t.fill_(NAN);
#endif
  return t;
}

void check_heads(const char* op, const at::Tensor& router_weight) {
  TORCH_CHECK(router_weight.size(0) <= kMaxHeads, op, ": router_weight has shape ", router_weight.sizes(),
              ": the CUDA backend supports at most ", kMaxHeads, " heads (K)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router_weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    double dropout_p, int64_t seed, int64_t top_k) {
  check_fused_forward_inputs(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k,
                             kKernelDevice);
  check_heads("ilora_kernels::fused_forward", router_weight);
  const DeviceGuard guard(x.device());
  const int64_t n = x.size(0), num_heads = router_weight.size(0), rank = lora_a.size(0);
  const int top = static_cast<int>(std::min<int64_t>(top_k, num_heads));

  at::Tensor h = uninitialized({n, rank}, x.options());
  at::Tensor g = uninitialized({n, num_heads}, x.options().dtype(router_dtype(x.scalar_type())));
  at::Tensor u = uninitialized({n, num_heads * rank}, x.options());
  if (dropout_p == 0.0) {
    // ONE shrink GEMM against [W_r; A]; the route kernel reads the logits and h out of it
    const at::Tensor z = at::mm(x, shrink_concat(router_weight, lora_a).t());
    launch_route(z, num_heads + rank, z, num_heads, num_heads + rank, g, h, u, top);
  } else {
    const at::Tensor logits = at::mm(x, router_weight.t());  // the router sees the clean x
    at::Tensor xd = uninitialized({n, x.size(1)}, x.options());
    launch_dropout(x, xd, seed, dropout_p);
    at::mm_out(h, xd, lora_a.t());
    launch_route(logits, num_heads, h, 0, rank, g, h, u, top);
  }
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(u, concat_heads(lora_b).t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, h, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router_weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& h_in, const at::Tensor& g_in, double scaling,
    double dropout_p, int64_t seed, std::array<bool, 4> output_mask) {
  check_fused_backward_inputs(dy, x, weight, router_weight, lora_a, lora_b, h_in, g_in, scaling, dropout_p,
                              kKernelDevice);
  check_heads("ilora_kernels::fused_backward", router_weight);
  const DeviceGuard guard(x.device());
  const bool need_dx = output_mask[0], need_dwr = output_mask[1], need_da = output_mask[2], need_db = output_mask[3];
  const int64_t n = x.size(0), d_in = x.size(1), d_out = weight.size(0), num_heads = router_weight.size(0),
                rank = lora_a.size(0), kr = num_heads * rank;
  const at::Tensor h = h_in.contiguous(), g = g_in.contiguous();
  // unrequested outputs are distinct empty tensors (outputs must not alias each other)
  at::Tensor dx = x.new_empty({0}), d_router = x.new_empty({0}), d_lora_a = x.new_empty({0}),
             d_lora_b = x.new_empty({0});
  const bool need_v = need_dx || need_dwr || need_da;
  if (!need_v && !need_db) return {dx, d_router, d_lora_a, d_lora_b};

  at::Tensor v, d, u;
  if (need_v) {
    v = at::mm(dy, concat_heads(lora_b));               // (N, K r)
    d = uninitialized({n, num_heads + rank}, x.options());  // [dz | dh]
  }
  if (need_db) u = uninitialized({n, kr}, x.options());
  launch_backward_tokens(need_v ? &v : nullptr, h, g, need_v ? &d : nullptr, need_db ? &u : nullptr, scaling);

  if (need_db) {
    at::Tensor db_cat = uninitialized({d_out, kr}, x.options());
    at::addmm_out(db_cat, db_cat, dy.t(), u, /*beta=*/0, /*alpha=*/scaling);  // s dy^T u; beta = 0 never reads it
    d_lora_b = heads_grad(db_cat, lora_b);  // lora_b's layout: a view when packed
  }
  if (!need_v) return {dx, d_router, d_lora_a, d_lora_b};

  const at::Tensor dz = d.narrow(1, 0, num_heads), dh = d.narrow(1, num_heads, rank);
  if (dropout_p == 0.0) {
    if (need_dx) {
      dx = uninitialized({n, d_in}, x.options());
      at::mm_out(dx, dy, weight);
      dx.addmm_(d, shrink_concat(router_weight, lora_a));  // + [dz | dh] [W_r; A]
    }
    if (need_dwr && need_da) {
      const at::Tensor grads = at::mm(d.t(), x);  // [dW_r; dA] = [dz | dh]^T x in ONE GEMM
      d_router = grads.narrow(0, 0, num_heads).clone();
      d_lora_a = grads.narrow(0, num_heads, rank).clone();
    } else if (need_dwr) {
      d_router = at::mm(dz.t(), x);
    } else if (need_da) {
      d_lora_a = at::mm(dh.t(), x);
    }
  } else {
    if (need_dx) {
      dx = uninitialized({n, d_in}, x.options());
      at::mm_out(dx, dy, weight);
      dx.addmm_(dz, router_weight);
      const at::Tensor t = at::mm(dh, lora_a);  // (N, d_in): masked and scaled while it is added
      launch_masked_add(dx, t, seed, dropout_p);
    }
    if (need_dwr) d_router = at::mm(dz.t(), x);
    if (need_da) {
      at::Tensor xd = uninitialized({n, d_in}, x.options());
      launch_dropout(x, xd, seed, dropout_p);
      d_lora_a = at::mm(dh.t(), xd);
    }
  }
  return {dx, d_router, d_lora_a, d_lora_b};
}

}  // namespace
}  // namespace ilora

#if !defined(ILORA_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(ilora_kernels, CUDA, m) {
  m.impl("fused_forward", &ilora::fused_forward_cuda);
  m.impl("fused_backward", &ilora::fused_backward_cuda);
}
#endif
