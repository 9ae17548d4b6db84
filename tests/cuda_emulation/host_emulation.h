// A host emulation of the small part of the CUDA programming model that csrc/cuda/ilora_cuda.cu uses, so that its
// kernels and launchers run (slowly) on CPU tensors in the CPU test suite.
//
// A launch runs one std::thread per CUDA thread of a block; those threads then walk the grid block by block
// (a block barrier between blocks, shared memory refilled with NaN bytes for each block).  Emulated:
//   threadIdx / blockIdx / blockDim / gridDim (x only), dynamic shared memory, __syncwarp (a per-warp barrier),
//   __shfl_xor_sync (through a per-warp exchange buffer), and the launch checks CUDA makes (block size a positive
//   multiple of 32 and at most 1024 threads, 1 <= grid <= 2^31 - 1, dynamic shared memory at most 48 KiB, the
//   default limit without an opt-in).
// Not emulated: the memory model of a GPU (the threads here are ordered by the barriers only), warp-synchronous
// code without __syncwarp, cuBLAS (the launchers' ATen GEMMs run on the CPU), streams and the CUDA half types
// (c10::Half / c10::BFloat16 stand in for __half / __nv_bfloat16, with the same round-to-nearest-even conversions).
#pragma once

#define ILORA_CUDA_EMULATION 1

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct ilora_emu_dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local ilora_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace ilora_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  unsigned char slots[kWarpSize][8];
};

inline thread_local Warp* current_warp = nullptr;
inline thread_local unsigned char* current_shared = nullptr;

// Kernel launches so far (the tests count what a call launches).
inline std::atomic<int64_t> launches{0};

inline unsigned char* dynamic_shared_memory() { return current_shared; }

template <typename Kernel>
class Launch {
 public:
  Launch(int64_t grid, int64_t block, size_t shared_bytes, Kernel kernel)
      : grid_(grid), block_(block), shared_bytes_(shared_bytes), kernel_(kernel) {
    TORCH_CHECK(grid_ >= 1 && grid_ <= 2147483647LL, "emulated CUDA launch: grid size ", grid_, " out of [1, 2^31 - 1]");
    TORCH_CHECK(block_ >= kWarpSize && block_ <= kMaxThreadsPerBlock && block_ % kWarpSize == 0,
                "emulated CUDA launch: block size ", block_, " is not a multiple of 32 in [32, 1024]");
    TORCH_CHECK(shared_bytes_ <= kMaxDynamicSharedBytes, "emulated CUDA launch: ", shared_bytes_,
                " bytes of dynamic shared memory exceed the 48 KiB default limit");
  }

  template <typename... Args>
  void operator()(Args... args) {
    ++launches;
    const int threads = static_cast<int>(block_), warps = threads / kWarpSize;
    std::vector<std::unique_ptr<Warp>> warp_state;
    for (int w = 0; w < warps; ++w) warp_state.push_back(std::make_unique<Warp>(kWarpSize));
    std::vector<unsigned char> shared(shared_bytes_ + 16);
    unsigned char* shared_base = shared.data() + (16 - reinterpret_cast<uintptr_t>(shared.data()) % 16) % 16;
    std::barrier<> block_barrier(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        blockDim = {static_cast<unsigned>(threads), 1, 1};
        gridDim = {static_cast<unsigned>(grid_), 1, 1};
        current_warp = warp_state[t / kWarpSize].get();
        current_shared = shared_base;
        for (int64_t b = 0; b < grid_; ++b) {
          if (t == 0) std::memset(shared_base, 0xFF, shared_bytes_);  // NaN bytes: unwritten scratch shows up
          block_barrier.arrive_and_wait();
          blockIdx = {static_cast<unsigned>(b), 0, 0};
          kernel_(args...);
          block_barrier.arrive_and_wait();
        }
      });
    }
    for (auto& th : pool) th.join();
  }

 private:
  int64_t grid_, block_;
  size_t shared_bytes_;
  Kernel kernel_;
};

template <typename Kernel>
Launch<Kernel> launch(int64_t grid, int64_t block, size_t shared_bytes, Kernel kernel) {
  return Launch<Kernel>(grid, block, shared_bytes, kernel);
}

}  // namespace ilora_emu

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  (void)mask;
  ilora_emu::current_warp->barrier.arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "emulated __shfl_xor_sync: at most 8-byte values");
  if (mask != 0xffffffffu) throw std::logic_error("emulated __shfl_xor_sync: only the full-warp mask is emulated");
  ilora_emu::Warp& warp = *ilora_emu::current_warp;
  const int lane = static_cast<int>(threadIdx.x) % ilora_emu::kWarpSize;
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, warp.slots[(lane ^ lane_mask) % ilora_emu::kWarpSize], sizeof(T));
  warp.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return out;
}

#define ILORA_DYNAMIC_SHARED_MEMORY(name) unsigned char* name = ::ilora_emu::dynamic_shared_memory()
#define ILORA_LAUNCH(kernel, grid, block, smem) ::ilora_emu::launch((grid), (block), (smem), kernel)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace ilora {
using half_t = c10::Half;
using bfloat16_t = c10::BFloat16;
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
}  // namespace ilora
