// The persistent LSTM recurrence: one cooperative launch runs every step of a chunk.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../fastlstm/step_args.h"

namespace fastlstm::cuda {

// How the persistent kernels split a layer over the GPU, or why they cannot run it.
struct PersistentPlan {
  bool ok = false;
  std::string reason;
  int blocks = 0;           // one per SM at most, all co-resident (cooperative launch)
  int units_per_block = 0;  // hidden units owned by a block (all four gates of each)
  int batch_tile = 0;       // batch rows staged in shared memory at a time
  int threads = 0;
  size_t smem_bytes = 0;
};

// backward: the backward kernel stages dG rows (4H wide) instead of h rows (H wide).
PersistentPlan persistent_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward);

template <class scalar_t, class acc_t>
void persistent_forward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a);
template <class scalar_t, class acc_t>
void persistent_backward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a);

}  // namespace fastlstm::cuda
