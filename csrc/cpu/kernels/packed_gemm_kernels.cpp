// Register-blocked kernel of PackedMatrix (packed_gemm_cpu.h), compiled once per SIMD level: a
// tile of kRows rows x kVecs vectors of columns is accumulated in registers over the whole
// reduction, reading each packed weight once per tile.
#include "../packed_gemm_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "packed_gemm_tiles.h"
#include "static_for.h"

namespace fastlstm::cpu::CPU_CAPABILITY {
namespace {

template <class T>
struct Tiling {
  using V = at::vec::Vectorized<T>;
  // AVX-512 has 32 vector registers, AVX2 16: 24 or 12 accumulators plus loads and broadcasts.
  // 8 x 3 on AVX-512: 4 x 3 ran at half the FMA peak at depth 256, where its panel (48 KiB)
  // streams from L2, 8 x 3 at 75%. AVX2: 6 x 2 (12 accumulators for the 8 in flight that two
  // FMA ports of latency 4 need) measured 4-20% faster than 4 x 2 (benchmarks/NOTES.md).
  static constexpr bool kWide = V::size() * sizeof(T) >= 64;
  static constexpr int kRows = kWide ? 8 : 6;
  static constexpr int kVecs = kWide ? 3 : 2;
  static constexpr int kWidth = kVecs * V::size();
};

// R rows (R <= kRows: a short last row block, or a small batch, computes no spare rows) x one
// panel: C[m][c] (+)= sum over k < depth of A(m, k) panel[k][c], A(m, k) = A[m * lda + k], or
// with kTransposedA A[k * lda + m] (the weight gradients' X^T). Only the first cols_valid columns
// are stored. A row's result does not depend on R or on M (the same FMA sequence for every row):
// the forward is bit-identical however its steps are chunked (checkpointing, inference chunks).
template <class T, int R, bool kTransposedA>
void tile(int64_t depth, const T* A, int64_t lda, const T* panel, T* C, int64_t ldc, int64_t cols_valid,
          bool accumulate) {
  using Tl = Tiling<T>;
  using V = typename Tl::V;
  constexpr int NV = Tl::kVecs, L = V::size();
  V acc[R][NV];
  const T* a[R];
  static_for<R>([&](auto m) {
    a[m] = kTransposedA ? A + m : A + m * lda;
    static_for<NV>([&](auto v) { acc[m][v] = V(T(0)); });
  });
  for (int64_t k = 0; k < depth; ++k) {
    const T* p = panel + k * Tl::kWidth;
    V b[NV];
    static_for<NV>([&](auto v) { b[v] = V::loadu(p + v * L); });
    static_for<R>([&](auto m) {
      const V s(kTransposedA ? a[m][k * lda] : a[m][k]);
      static_for<NV>([&](auto v) { acc[m][v] = at::vec::fmadd(s, b[v], acc[m][v]); });
    });
  }
  static_for<R>([&](auto m) {
    static_for<NV>([&](auto v) {
      const int64_t col = static_cast<int64_t>(v) * L;
      if (col >= cols_valid) return;
      const int64_t count = std::min<int64_t>(L, cols_valid - col);
      T* c = C + m * ldc + col;
      V r = acc[m][v];
      if (accumulate) r = r + V::loadu(c, count);
      r.store(c, count);
    });
  });
}

template <class T>
int64_t panel_width() {
  return Tiling<T>::kWidth;
}

template <class T>
void pack(const T* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col, T* dst) {
  constexpr int64_t W = Tiling<T>::kWidth;
  const int64_t panels = (cols + W - 1) / W;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t r = 0; r < rows; ++r) {
        T* out = dst + (p * rows + r) * W;
        for (int64_t c = p * W; c < std::min(cols, (p + 1) * W); ++c) out[c - p * W] = src[r * stride_row + c * stride_col];
      }
    }
  });
}

template <class T>
void multiply(int64_t M, const T* A, const T* packed, int64_t rows, int64_t cols, T* C, bool accumulate) {
  if (M == 0 || cols == 0) return;
  if (rows == 0) {
    if (!accumulate) std::fill(C, C + M * cols, T(0));
    return;
  }
  using Tl = Tiling<T>;
  for_each_tile<Tl::kRows, Tl::kWidth>(M, rows, cols, [&](auto r, int64_t row0, int64_t p, int) {
    const int64_t col0 = p * Tl::kWidth;
    tile<T, decltype(r)::value, false>(rows, A + row0 * rows, rows, packed + p * rows * Tl::kWidth, C + row0 * cols + col0,
                                       cols, std::min<int64_t>(Tl::kWidth, cols - col0), accumulate);
  });
}

// C[M, N] = A^T B for A (depth, M) and B (depth, N) row-major: the weight gradients
// dW^T = X^T dG over many rows. The depth runs in chunks of kChunk rows, each tile's sums carried
// from chunk to chunk in C. A is read in place (its rows of a chunk stay in cache across the
// tiles); a chunk of B's panel is copied into a contiguous slab first: read in place, B's rows
// are 4H floats apart (4 KiB at H = 256), so every row of a panel fell into the same L1 set and
// the panel was refetched from L2 for every row block (the AVX2 kernel ran at 0.8x MKL's speed
// at H = 256, 1.1x at H = 128). The slab has the packed panels' layout, so the packed kernel's
// tile serves, reading A transposed. Tiles are split between the threads, each tile on one thread, so
// the result does not depend on the thread count.
template <class T>
void multiply_at(int64_t depth, int64_t M, int64_t N, const T* A, const T* B, T* C) {
  if (M == 0 || N == 0) return;
  if (depth == 0) {
    std::fill(C, C + M * N, T(0));
    return;
  }
  using Tl = Tiling<T>;
  constexpr int64_t kChunk = 256, W = Tl::kWidth;
  const int64_t panels = (N + W - 1) / W, row_blocks = (M + Tl::kRows - 1) / Tl::kRows;
  const int64_t tiles = panels * row_blocks;
  const int64_t grain = M * N * depth < (1 << 17) ? tiles : 1;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    std::vector<T> slab(kChunk * W, T(0));  // initialised: lanes past a tail panel are computed, not stored
    for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, depth - k0);
      int64_t slab_panel = -1;
      // Panel-major: a panel's slab serves all its row blocks.
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / row_blocks, rb = t % row_blocks;
        const int64_t col0 = p * W, cols = std::min<int64_t>(W, N - col0);
        if (p != slab_panel) {
          for (int64_t k = 0; k < kc; ++k) std::copy_n(B + (k0 + k) * N + col0, cols, slab.data() + k * W);
          slab_panel = p;
        }
        const int64_t row0 = rb * Tl::kRows, rows = std::min<int64_t>(Tl::kRows, M - row0);
        static_for<Tl::kRows>([&](auto r) {
          if (rows == r + 1) {
            tile<T, r + 1, true>(kc, A + k0 * M + row0, M, slab.data(), C + row0 * N + col0, N, cols, k0 > 0);
          }
        });
      }
    }
  });
}

}  // namespace

template <class T>
const GemmKernels<T>& gemm_kernel_table() {
  static constexpr GemmKernels<T> table{&panel_width<T>, &pack<T>, &multiply<T>, &multiply_at<T>};
  return table;
}

template const GemmKernels<float>& gemm_kernel_table<float>();
template const GemmKernels<double>& gemm_kernel_table<double>();

}  // namespace fastlstm::cpu::CPU_CAPABILITY
