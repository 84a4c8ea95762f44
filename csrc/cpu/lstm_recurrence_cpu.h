// The fused CPU recurrence: one parallel region for all the steps of a chunk (no projection).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../fastlstm/step_args.h"

namespace fastlstm::cpu {

// Hidden units are handled in blocks of one vector; the fused backward's norm partial sums are
// per (batch row, unit block).
template <class T>
int64_t unit_blocks(int64_t H);

// W_hh (4H, H) rearranged for the fused kernels, once per layer call.
template <class T>
at::Tensor pack_fused_forward(const T* w_hh, int64_t H);
template <class T>
at::Tensor pack_fused_backward(const T* w_hh, int64_t H);

template <class T>
void fused_forward(const ChunkRecurrenceArgs<T, T>& a, const T* packed);
template <class T>
void fused_backward(const ChunkRecurrenceArgs<T, T>& a, const T* packed);

}  // namespace fastlstm::cpu
