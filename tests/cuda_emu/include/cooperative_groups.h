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

inline grid_group this_grid() { return {}; }
inline thread_block this_thread_block() { return {}; }

}  // namespace cooperative_groups
