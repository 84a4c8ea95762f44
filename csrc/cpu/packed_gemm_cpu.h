// Small-M GEMM against a matrix packed once into column panels: the recurrent products of the
// step loop (M = batch rows, a few to a few hundred) reuse the same W_hh for every step, so
// packing it once and running a register-blocked kernel beats a BLAS call per step, which
// re-packs W_hh and wakes its thread pool every time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastlstm::cpu {

template <class T>
class PackedMatrix {
 public:
  PackedMatrix() = default;
  // Packs the (rows x cols) matrix whose element (r, c) is src[r * stride_row + c * stride_col].
  PackedMatrix(const T* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col);

  // C[M, cols] (+)= A[M, rows] * this, A and C row-major with leading dimensions rows and cols.
  void multiply(int64_t M, const T* A, T* C, bool accumulate) const;

  bool empty() const { return !storage_.defined(); }

 private:
  at::Tensor storage_;  // (panels, rows, panel width), zero-padded past the last column
  int64_t rows_ = 0, cols_ = 0, panels_ = 0;
};

}  // namespace fastlstm::cpu
