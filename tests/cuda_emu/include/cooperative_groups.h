// The cooperative_groups pieces fastlstm's kernels use, for the CPU harness (cuda_emu/runtime.h).
#pragma once

namespace cooperative_groups {

class grid_group {
 public:
  // A rendezvous of every thread of a cooperative launch; aborts outside one.
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { cuda_emu::grid_sync(file, line); }
  unsigned long long num_threads() const {
    return 1ull * gridDim.x * gridDim.y * gridDim.z * blockDim.x * blockDim.y * blockDim.z;
  }
};

class thread_block {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { cuda_emu::syncthreads(file, line); }
};

// The blocks of a thread-block cluster (a launch with cudaLaunchAttributeClusterDimension).
class cluster_group {
 public:
  struct arrival_token {};
  // A rendezvous of every thread of the cluster: barrier_arrive() then barrier_wait().
  static void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    cuda_emu::cluster_arrive(file, line);
    cuda_emu::cluster_wait(file, line);
  }
  // The split barrier: work between arrive and wait overlaps the other blocks' arrival.
  static arrival_token barrier_arrive(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    cuda_emu::cluster_arrive(file, line);
    return {};
  }
  static void barrier_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    cuda_emu::cluster_wait(file, line);
  }
  static void barrier_wait(arrival_token&&, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    cuda_emu::cluster_wait(file, line);
  }
  static unsigned block_rank(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return cuda_emu::cluster_rank(file, line);
  }
  static dim3 dim_blocks(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return cuda_emu::cluster_dims(file, line);
  }
  static unsigned num_blocks(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    const dim3 d = cuda_emu::cluster_dims(file, line);
    return d.x * d.y * d.z;
  }
  // DSMEM: addr (in this block's dynamic shared memory) in the shared memory of block `rank`.
  template <class T>
  static T* map_shared_rank(T* addr, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<T*>(cuda_emu::map_shared(const_cast<void*>(static_cast<const void*>(addr)), rank, file, line));
  }
};

inline grid_group this_grid() { return {}; }
inline cluster_group this_cluster() { return {}; }
inline thread_block this_thread_block() { return {}; }

}  // namespace cooperative_groups
