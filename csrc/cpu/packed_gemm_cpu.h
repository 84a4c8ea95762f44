// Small-M GEMM against a matrix packed once into column panels: the recurrent products of the
// step loop (M = batch rows, a few to a few hundred) reuse the same W_hh for every step, so
// packing it once and running a register-blocked kernel beats a BLAS call per step, which
// re-packs W_hh and wakes its thread pool every time. The kernel has one table per SIMD level
// (kernels/packed_gemm_kernels.cpp); the panel width is the running level's.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "bf16_kernels_cpu.h"
#include "kernel_table.h"

namespace fastlstm::cpu {

template <class T>
struct GemmKernels {
  int64_t (*panel_width)();
  // dst (panels, rows, panel width), zeroed, <- the (rows x cols) matrix whose element (r, c) is
  // src[r * stride_row + c * stride_col].
  void (*pack)(const T* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col, T* dst);
  // C[M, cols] (+)= A[M, rows] * the packed (rows x cols) matrix; A and C row-major.
  void (*multiply)(int64_t M, const T* A, const T* packed, int64_t rows, int64_t cols, T* C, bool accumulate);
  // C[M, N] = A^T B for A (depth, M) and B (depth, N) row-major, both read in place: the weight
  // gradients (dW^T = X^T dG over every row of a chunk), used where mm's MKL is slower (packed_products_only).
  void (*multiply_at)(int64_t depth, int64_t M, int64_t N, const T* A, const T* B, T* C);
};

FASTLSTM_DECLARE_KERNEL_TABLES(GemmKernels, gemm_kernel_table)

template <class T>
const GemmKernels<T>& gemm_kernels() {
  static const GemmKernels<T>& table = FASTLSTM_RUNNING_TABLE(GemmKernels<T>, gemm_kernel_table<T>);
  return table;
}

// The forward's products with a weight (the input projection, the stepwise path's step
// products) run on the packed kernel up to this reduction depth, although MKL on Intel CPUs is
// 5-16% faster on the input projection (benchmarks/NOTES.md): a packed row's result does not
// depend on how many rows a call has, which keeps the forward bit-identical however its steps
// are chunked (checkpointing, inference chunks: tests/test_checkpointing.py); MKL's rows do not
// promise that. Beyond it, MKL on Intel CPUs; elsewhere (packed_products_only) the packed kernel at any depth.
inline int64_t forward_packed_max_depth() {
  static const int64_t depth = packed_products_only() ? std::numeric_limits<int64_t>::max() : 512;
  return depth;
}

// The most rows (M) of a backward product with a weight (dL/dx, the stepwise path's dG W) for
// which the packed kernel is used; the layer sends larger ones to ATen's mm. Measured against
// MKL's sgemm on an Intel Xeon (benchmarks/NOTES.md, gemm_micro): the packed kernel is even or
// ahead on the per-step products (M = batch <= 16: 0.75-2.3x; the weight is packed once per call,
// MKL packs it per call), behind on the products over many steps (dL/dx, M >= 256: 0.71-1.02x);
// at B=64 even on AVX-512 (0.92-1.14x), behind on AVX2 (0.87-1.05x). Off Intel: every M.
inline int64_t packed_max_rows() {
  static const int64_t rows = packed_products_only() ? std::numeric_limits<int64_t>::max()
                              : capability() == Capability::AVX512 ? 64
                                                                   : 16;
  return rows;
}

// The packed kernel of a dtype and the dtype of its results: T itself, float for bfloat16
// (only where bf16_kernels() has a table).
template <class T>
struct PackedKernels {
  using Out = T;
  static const GemmKernels<T>& get() { return gemm_kernels<T>(); }
};

template <>
struct PackedKernels<c10::BFloat16> {
  using Out = float;
  static const Bf16Kernels& get() {
    const Bf16Kernels* k = bf16_kernels();
    TORCH_CHECK(k != nullptr, "fastlstm: internal error: bfloat16 kernels called without AVX512-BF16");
    return *k;
  }
};

template <class T>
class PackedMatrix {
 public:
  using Out = typename PackedKernels<T>::Out;
  PackedMatrix() = default;
  // Packs the (rows x cols) matrix whose element (r, c) is src[r * stride_row + c * stride_col].
  PackedMatrix(const T* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col)
      : rows_(rows), cols_(cols) {
    const auto& k = PackedKernels<T>::get();
    const int64_t width = k.panel_width();
    const int64_t panels = (cols + width - 1) / width;
    // bfloat16 pairs rows (the reduction), zero-padded to a multiple of 32 (an AMX tile's depth).
    const int64_t padded = std::is_same_v<T, Out> ? rows : (rows + 31) / 32 * 32;
    storage_ = at::zeros({std::max<int64_t>(panels, 1), padded, width},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    k.pack(src, rows, cols, stride_row, stride_col, storage_.data_ptr<T>());
  }

  // C[M, cols] (+)= A[M, rows] * this, A and C row-major with leading dimensions rows and cols.
  void multiply(int64_t M, const T* A, Out* C, bool accumulate) const {
    PackedKernels<T>::get().multiply(M, A, storage_.data_ptr<T>(), rows_, cols_, C, accumulate);
  }

  bool empty() const { return !storage_.defined(); }

 private:
  at::Tensor storage_;  // (panels, rows, panel width), zero-padded past the last column
  int64_t rows_ = 0, cols_ = 0;
};

}  // namespace fastlstm::cpu
