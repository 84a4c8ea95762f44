// The fused CPU recurrence: one parallel region for all the steps of a chunk (no proj_size),
// one table per SIMD level (kernels/recurrence_kernels.cpp); the functions below call the
// running level's. The packed layouts depend on the level's vector width, which is fixed for
// the process, so what pack_fused_* returns is only ever read by the same level's kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../fastlstm/step_args.h"
#include "kernel_table.h"

namespace fastlstm::cpu {

template <class T>
struct RecurrenceKernels {
  // Hidden units are handled in blocks of one vector; the fused backward's norm partial sums are
  // per (batch row, unit block).
  int64_t (*unit_blocks)(int64_t H);
  // W_hh (4H, H) rearranged for the fused kernels, once per layer call.
  at::Tensor (*pack_forward)(const T* w_hh, int64_t H);
  // W_ih (4H, I) the same way, for a forward that computes the input projection itself.
  at::Tensor (*pack_projection)(const T* w_ih, int64_t H, int64_t I);
  at::Tensor (*pack_backward)(const T* w_hh, int64_t H);
  // packed_ih: null when a.gates holds x W_ih^T on entry (a.x null), else W_ih's panels (a.x set).
  void (*forward)(const ChunkRecurrenceArgs<T, T>& a, const T* packed, const T* packed_ih);
  void (*backward)(const ChunkRecurrenceArgs<T, T>& a, const T* packed);
};

FASTLSTM_DECLARE_KERNEL_TABLES(RecurrenceKernels, recurrence_kernel_table)

template <class T>
const RecurrenceKernels<T>& recurrence_kernels() {
  static const RecurrenceKernels<T>& table = FASTLSTM_RUNNING_TABLE(RecurrenceKernels<T>, recurrence_kernel_table<T>);
  return table;
}

template <class T>
int64_t unit_blocks(int64_t H) { return recurrence_kernels<T>().unit_blocks(H); }
template <class T>
at::Tensor pack_fused_forward(const T* w_hh, int64_t H) { return recurrence_kernels<T>().pack_forward(w_hh, H); }
template <class T>
at::Tensor pack_fused_projection(const T* w_ih, int64_t H, int64_t I) {
  return recurrence_kernels<T>().pack_projection(w_ih, H, I);
}
template <class T>
at::Tensor pack_fused_backward(const T* w_hh, int64_t H) { return recurrence_kernels<T>().pack_backward(w_hh, H); }
template <class T>
void fused_forward(const ChunkRecurrenceArgs<T, T>& a, const T* packed, const T* packed_ih) {
  recurrence_kernels<T>().forward(a, packed, packed_ih);
}
template <class T>
void fused_backward(const ChunkRecurrenceArgs<T, T>& a, const T* packed) { recurrence_kernels<T>().backward(a, packed); }

}  // namespace fastlstm::cpu
