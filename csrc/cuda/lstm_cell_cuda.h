// Launchers of the per-step pointwise kernels on CUDA (the current stream; errors checked).
#pragma once

#include <cstdint>

#include "../fastlstm/step_args.h"

namespace fastlstm::cuda {

// Column tiles of the backward cell kernel: the norm partial sums are per (row, tile).
int64_t cell_norm_tiles(int64_t H);

template <class scalar_t, class acc_t>
void cell_forward(const ForwardCellArgs<scalar_t, acc_t>& a);
template <class scalar_t, class acc_t>
void cell_backward(const BackwardCellArgs<scalar_t, acc_t>& a);
template <class scalar_t, class acc_t>
void proj_backward(const BackwardProjArgs<scalar_t, acc_t>& a);
template <class scalar_t>
void state_select(const StateSelectArgs<scalar_t>& a);

}  // namespace fastlstm::cuda
