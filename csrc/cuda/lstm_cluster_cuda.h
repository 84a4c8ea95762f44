// The cluster-resident LSTM recurrence (persistent kernel v2, issue 10): thread-block clusters hold
// W_hh on chip, tensor cores compute the gates (forward) and dG_t W_hh (backward), h_t (dG_t)
// crosses the cluster's blocks over DSMEM.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../fastlstm/step_args.h"

namespace fastlstm::cuda {

// How the cluster kernel splits a layer, or why it cannot run it.
struct ClusterPlan {
  bool ok = false;
  std::string reason;
  int cluster = 0;           // blocks per cluster (16 with the non-portable attribute, else 8)
  int units_per_block = 0;   // hidden units owned by a block (all four gates of each)
  int rows_per_cluster = 0;  // batch rows a cluster runs (a multiple of 8: the mma's N)
  int clusters = 0;          // independent clusters, one batch slice each
  int threads = 0;
  int register_tiles = 0;    // W tiles each warp holds in registers (the kernel variant: with
  int cells_per_thread = 0;  // the (unit, row) cell elements each thread owns)
  int exchange_buffers = 0;  // h_t (dG_t) buffers: 2 (by step parity), or 1 and a second barrier per step
  size_t smem_bytes = 0;
};

// bfloat16 / float16 only, no projection (the caller checks proj_size). The backward kernel's
// plan differs (it receives all 4H gate gradients of a step, not the H hidden values). Computed
// once per device, its limits, shape, dtype and direction.
ClusterPlan cluster_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward = false);

// Half types only: the forward and the backward of a chunk, same semantics and saved tensors as
// persistent_forward / persistent_backward (the backward's norm partials: one per block of the
// backward plan, clusters x cluster).
template <class scalar_t, class acc_t>
void cluster_forward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a);
template <class scalar_t, class acc_t>
void cluster_backward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a);

}  // namespace fastlstm::cuda
