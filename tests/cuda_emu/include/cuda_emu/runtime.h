// The CUDA execution harness: runs fastlstm's CUDA C++ on the CPU (see tests/cuda_emu/README.md).
//
// Force-included (`g++ -x c++ -include cuda_emu/runtime.h`) when a .cu file is compiled for the
// harness, so the kernels stay plain CUDA. It supplies the CUDA language pieces the kernels use
// (qualifiers, built-in indices, barriers, warp collectives, atomics, cache-hinted loads, vector
// types) and the part of the runtime API the host code calls. Semantics follow the CUDA C++
// Programming Guide; what cannot be modelled on a CPU (memory model, timing, occupancy limits
// beyond shared memory and threads) is listed in the README.
//
// Every CUDA thread is a fiber; the threads of a block share one OS thread (so `__shared__`
// variables, declared thread_local here, are per block) and yield to their block's scheduler at
// each synchronisation point; blocks of a cooperative launch each have an OS thread, and one
// block runs at a time, handed a turn by the launch's scheduler, so a schedule (CUDA_EMU_SCHEDULE)
// replays exactly.
#pragma once

#define FASTLSTM_CUDA_EMU 1

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- language ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// One instance per OS thread = per block (a block's threads share its OS thread).
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

constexpr int warpSize = 32;

namespace cuda_emu {

struct Coords {
  dim3 thread, block, block_dim, grid_dim;
};
// The running CUDA thread's indices (set by the scheduler before it resumes a fiber).
extern thread_local const Coords* current_coords;

enum class WarpOp : int { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };

void syncthreads(const char* file, int line);
void grid_sync(const char* file, int line);
// The cluster barrier (barrier.cluster.arrive / .wait): a phase completes when every thread of
// the cluster's blocks has arrived; wait returns once the phase the thread arrived at is complete.
void cluster_arrive(const char* file, int line);
void cluster_wait(const char* file, int line);
unsigned cluster_rank(const char* file, int line);
dim3 cluster_dims(const char* file, int line);
// DSMEM: `addr` in the calling block's dynamic shared memory, mapped to the same offset in the
// dynamic shared memory of the cluster's block `rank`.
void* map_shared(void* addr, unsigned rank, const char* file, int line);
// A warp collective over the lanes of `mask`: a rendezvous of those lanes; returns this lane's
// result (the source lane's bits for shuffles, the vote for ballot/any/all).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

template <class T>
T shuffle(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(op, mask, bits, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::current_coords->thread)
#define blockIdx (::cuda_emu::current_coords->block)
// Variables, not macros, so that cudaLaunchConfig_t can have members of these names; the
// scheduler sets them with current_coords.
extern thread_local dim3 blockDim, gridDim;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emu::warp_collective(cuda_emu::WarpOp::SyncWarp, mask, 0, 0, 32, file, line);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::Shfl, mask, v, src, width, file, line);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::ShflUp, mask, v, static_cast<int>(delta), width, file, line);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::ShflDown, mask, v, static_cast<int>(delta), width, file, line);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::ShflXor, mask, v, lane_mask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<unsigned>(cuda_emu::warp_collective(cuda_emu::WarpOp::Ballot, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(cuda_emu::warp_collective(cuda_emu::WarpOp::Any, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(cuda_emu::warp_collective(cuda_emu::WarpOp::All, mask, pred != 0, 0, 32, file, line));
}

// Cache-hinted loads are plain loads (no caches are modelled).
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T>
inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <class T>
inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {}
  return old;
}

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) double2 { double x, y; };

// ---- runtime API ------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorInvalidClusterSize = 912,
};
using cudaError = cudaError_t;
using cudaStream_t = struct CUstream_st*;

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 14,
};

// Launch attributes: only the cluster dimension is modelled.
enum cudaLaunchAttributeID : int { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  char pad[8 - sizeof(cudaLaunchAttributeID)];
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// The fields of cudaDeviceProp that the harness models.
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  int maxThreadsPerBlock, maxThreadsPerMultiProcessor, maxBlocksPerMultiProcessor;
  int warpSize;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor, reservedSharedMemPerBlock;
  int cooperativeLaunch;
  int clusterLaunch;
};

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceSynchronize();
// Managed memory is host memory (every kernel runs on the CPU).
cudaError_t cudaMallocManaged(void** p, size_t bytes);
template <class T>
cudaError_t cudaMallocManaged(T** p, size_t bytes) { return cudaMallocManaged(reinterpret_cast<void**>(p), bytes); }
cudaError_t cudaFree(void* p);

namespace cuda_emu {

// The emulated device (CUDA_EMU_SMS, CUDA_EMU_SMEM_KB; an H100's limits otherwise).
const cudaDeviceProp& device();
// Test hook: change the emulated device (host code that caches per-device answers keeps them).
void set_device_limits(int sms, size_t smem_per_block_optin);
// Test hook: the largest cluster the device schedules with the non-portable attribute (16 on an
// H100; 8 models a device that refuses non-portable sizes).
void set_max_cluster_size(int blocks);

struct LaunchConfig {
  const void* kernel;
  dim3 grid, block;
  size_t smem;
  bool cooperative;
  dim3 cluster = dim3(1, 1, 1);
};
// Runs `body` on every CUDA thread of the launch; returns the error CUDA would.
cudaError_t launch(const LaunchConfig& config, const std::function<void()>& body);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
cudaError_t set_nonportable_cluster(const void* kernel, int allowed);
int max_active_blocks(const void* kernel, int threads, size_t smem);
// Clusters of this shape that can be resident at once (0: none, the size is refused or too big).
int max_active_clusters(const void* kernel, int threads, size_t smem, dim3 cluster);
// The cluster dimension of a launch configuration ((1, 1, 1) without the attribute).
inline dim3 cluster_of(const cudaLaunchConfig_t& c) {
  for (unsigned i = 0; i < c.numAttrs; ++i) {
    if (c.attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& d = c.attrs[i].val.clusterDim;
      return dim3(d.x, d.y, d.z);
    }
  }
  return dim3(1, 1, 1);
}
void set_last_error(cudaError_t e);
unsigned char* dynamic_shared_memory();

template <class... P, class... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  // The arguments are copied at launch, as CUDA does.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const cudaError_t e = launch({reinterpret_cast<const void*>(kernel), grid, block, smem, false},
                               [&] { std::apply(kernel, params); });
  if (e != cudaSuccess) set_last_error(e);
}

}  // namespace cuda_emu

template <class... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t smem = 0,
                                        cudaStream_t = nullptr) {
  auto params = [&]<size_t... I>(std::index_sequence<I...>) {
    return std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(args[I])...);
  }(std::index_sequence_for<P...>{});
  return cuda_emu::launch({reinterpret_cast<const void*>(kernel), grid, block, smem, true},
                          [&] { std::apply(kernel, params); });
}

// The arguments are converted to the kernel's parameter types, as CUDA's template does.
template <class... P, class... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  cuda_emu::LaunchConfig c{reinterpret_cast<const void*>(kernel), config->gridDim, config->blockDim,
                           config->dynamicSmemBytes, false, cuda_emu::cluster_of(*config)};
  return cuda_emu::launch(c, [&] { std::apply(kernel, params); });
}

template <class... P>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, void (*kernel)(P...), const cudaLaunchConfig_t* config) {
  const dim3 b = config->blockDim;
  *n = cuda_emu::max_active_clusters(reinterpret_cast<const void*>(kernel), static_cast<int>(b.x * b.y * b.z),
                                     config->dynamicSmemBytes, cuda_emu::cluster_of(*config));
  return cudaSuccess;
}

template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  const void* k = reinterpret_cast<const void*>(kernel);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) return cuda_emu::set_max_dynamic_smem(k, value);
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) return cuda_emu::set_nonportable_cluster(k, value);
  return cudaErrorInvalidValue;
}

// The fields of cudaFuncAttributes that the harness models: a kernel run on the CPU has no
// register spills, so no local memory.
struct cudaFuncAttributes {
  size_t localSizeBytes;
  int numRegs;
};

template <class... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*)(P...)) {
  *attr = {};
  return cudaSuccess;
}

template <class... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*kernel)(P...), int threads, size_t smem) {
  *n = cuda_emu::max_active_blocks(reinterpret_cast<const void*>(kernel), threads, smem);
  return cudaSuccess;
}

// The two macros of csrc/cuda/launch.cuh.
#define FASTLSTM_DYNAMIC_SMEM(name) unsigned char* const name = ::cuda_emu::dynamic_shared_memory()
#define FASTLSTM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::cuda_emu::launch_kernel(kernel, grid, block, smem, stream __VA_OPT__(, ) __VA_ARGS__)
