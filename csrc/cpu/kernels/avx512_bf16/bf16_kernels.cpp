// The bfloat16 kernels (bf16_kernels_cpu.h), compiled once with the AVX-512 flags plus
// -mavx512bf16 (setup.py's avx512_bf16 level); called only where bf16_kernels_enabled().
//
// vdpbf16ps (_mm512_dpbf16_ps) takes 32 bfloat16 pairs a[2i], a[2i+1] and b[2i], b[2i+1] and adds
// both exact products to float lane i (round to nearest even, denormals flushed). The products
// therefore run over pairs of reduction indices: one operand is a broadcast pair of
// (h[k], h[k+1]) or (x[k], x[k+1]), the other a weight vector holding, for 16 output columns, the
// pair (W[k], W[k+1]) of each. An odd depth ends with a half pair whose upper element is zero on
// both sides. Gates, cell state and accumulators are float32; h_t is rounded to bfloat16 once,
// when it is stored: what the layer outputs and the next step's product reads.
#include "../../bf16_kernels_cpu.h"

#ifndef CPU_CAPABILITY_AVX512_BF16
#error "bf16_kernels.cpp is compiled only at setup.py's avx512_bf16 level"
#endif

#include <immintrin.h>

#include <cstring>

#include "../fused_forward.h"
#include "../packed_gemm_tiles.h"
#include "../static_for.h"

namespace fastlstm::cpu::CPU_CAPABILITY {

using BF = c10::BFloat16;

inline __mmask16 lanes(int64_t cnt) { return cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1); }

// bfloat16 <-> float32 vectors of 16 lanes, cnt of them live (the others read as 0, not stored).
template <>
struct StateIO<BF, float> {
  using V = at::vec::Vectorized<float>;
  static V load(const BF* p, int64_t cnt) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(cnt), p));
    return V(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  static void store(const V& v, BF* p, int64_t cnt) {
    _mm256_mask_storeu_epi16(p, lanes(cnt), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
};

namespace {

constexpr int L = 16;  // float lanes of a zmm register: output columns (units) per vector

// Both elements of the pair at p, broadcast to every lane.
inline __m512bh broadcast_pair(const BF* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
}

// The pair (p[0], 0): the last, half pair of an odd depth (p[1] may be past the end).
inline __m512bh broadcast_half_pair(const BF* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
}

inline __m512bh load_pairs(const BF* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }

// ---------------------------------------------------------------- packed GEMM (input projection)

// A tile of kRows rows x kVecs vectors of columns, as the float kernel's
// (packed_gemm_kernels.cpp): 12 accumulators.
constexpr int kGemmRows = 4, kGemmVecs = 3, kGemmWidth = kGemmVecs * L;

// R rows: the same instruction sequence for every row whatever R and M, so a row's result does
// not depend on how many rows a call has (the forward stays bit-identical however it is chunked).
template <int R>
void gemm_tile(int64_t depth, const BF* A, const BF* panel, float* C, int64_t ldc, int64_t cols_valid,
               bool accumulate) {
  __m512 acc[R][kGemmVecs];
  const BF* a[R];
  static_for<R>([&](auto m) {
    a[m] = A + m * depth;
    static_for<kGemmVecs>([&](auto v) { acc[m][v] = _mm512_setzero_ps(); });
  });
  const int64_t pairs = depth / 2;
  auto step = [&](const BF* p, auto broadcast, int64_t k) {
    __m512bh b[kGemmVecs];
    static_for<kGemmVecs>([&](auto v) { b[v] = load_pairs(p + v * 2 * L); });
    static_for<R>([&](auto m) {
      const __m512bh s = broadcast(a[m] + k);
      static_for<kGemmVecs>([&](auto v) { acc[m][v] = _mm512_dpbf16_ps(acc[m][v], s, b[v]); });
    });
  };
  for (int64_t kp = 0; kp < pairs; ++kp) step(panel + kp * 2 * kGemmWidth, broadcast_pair, 2 * kp);
  if (depth % 2) step(panel + pairs * 2 * kGemmWidth, broadcast_half_pair, depth - 1);
  static_for<R>([&](auto m) {
    static_for<kGemmVecs>([&](auto v) {
      const int64_t col = static_cast<int64_t>(v) * L;
      if (col >= cols_valid) return;
      const __mmask16 mask = lanes(cols_valid - col);
      float* c = C + m * ldc + col;
      __m512 r = acc[m][v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, c));
      _mm512_mask_storeu_ps(c, mask, r);
    });
  });
}

int64_t panel_width() { return kGemmWidth; }

// dst[p][k / 2][c][k % 2] = element (k, p * width + c), zero past the matrix.
void pack(const BF* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col, BF* dst) {
  constexpr int64_t W = kGemmWidth;
  const int64_t panels = (cols + W - 1) / W, pairs = (rows + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t r = 0; r < rows; ++r) {
        BF* out = dst + (p * pairs + r / 2) * 2 * W + r % 2;
        for (int64_t c = p * W; c < std::min(cols, (p + 1) * W); ++c) {
          out[(c - p * W) * 2] = src[r * stride_row + c * stride_col];
        }
      }
    }
  });
}

void multiply(int64_t M, const BF* A, const BF* packed, int64_t rows, int64_t cols, float* C, bool accumulate) {
  if (M == 0 || cols == 0) return;
  if (rows == 0) {
    if (!accumulate) std::fill(C, C + M * cols, 0.f);
    return;
  }
  const int64_t panel_size = (rows + 1) / 2 * 2 * kGemmWidth;
  for_each_tile<kGemmRows, kGemmWidth>(M, rows, cols, [&](auto r, int64_t row0, int64_t p) {
    const int64_t col0 = p * kGemmWidth;
    gemm_tile<decltype(r)::value>(rows, A + row0 * rows, packed + p * panel_size, C + row0 * cols + col0, cols,
                                  std::min<int64_t>(kGemmWidth, cols - col0), accumulate);
  });
}

// ---------------------------------------------------------------- fused forward

// Forward tile: kRows rows x the 4 gate vectors of one unit block, 16 accumulators.
constexpr int kRows = 4;

// Forward panels: packed[ub][k / 2][gate][l][k % 2] = W_hh[gate * H + ub * L + l, k], zero past H
// (units) and past K (the upper half of an odd depth's last pair).
at::Tensor pack_forward(const BF* w, int64_t H) {
  const int64_t K = H, pairs = (K + 1) / 2, blocks = (H + L - 1) / L;
  at::Tensor packed = at::zeros({blocks, pairs, 4, L, 2}, at::TensorOptions().dtype(at::kBFloat16));
  BF* p = packed.data_ptr<BF>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ub = b0; ub < b1; ++ub)
      for (int64_t k = 0; k < K; ++k)
        for (int g = 0; g < 4; ++g)
          for (int64_t l = 0; l < L && ub * L + l < H; ++l)
            p[((((ub * pairs + k / 2) * 4 + g) * L + l) * 2) + k % 2] = w[(g * H + ub * L + l) * K + k];
  });
  return packed;
}

// R rows from row0 x unit block ub: the gates' x W_ih^T (already in a.gates) plus h_{t-1} W_hh^T
// accumulated in registers, then the cell update.
template <int R>
void forward_tile(const ChunkRecurrenceArgs<BF, float>& a, const BF* panel, int64_t ub, int64_t row0, int64_t t,
                  int64_t slot, const BF* r_prev, const float* c_prev) {
  using V = at::vec::Vectorized<float>;
  const int64_t H = a.H, B = a.B, K = a.H, j0 = ub * L, cnt = std::min<int64_t>(L, H - j0);
  const __mmask16 mask = lanes(cnt);
  const float* g0 = a.gates + (slot * B + row0) * 4 * H + j0;
  __m512 acc[R][4];
  const BF* h[R];
  static_for<R>([&](auto m) {
    h[m] = r_prev + (row0 + m) * K;
    static_for<4>([&](auto q) { acc[m][q] = _mm512_maskz_loadu_ps(mask, g0 + m * 4 * H + q * H); });
  });
  const int64_t pairs = K / 2;
  auto step = [&](const BF* w, auto broadcast, int64_t k) {
    const __m512bh w0 = load_pairs(w), w1 = load_pairs(w + 2 * L), w2 = load_pairs(w + 4 * L),
                   w3 = load_pairs(w + 6 * L);
    static_for<R>([&](auto m) {
      const __m512bh s = broadcast(h[m] + k);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], s, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], s, w1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], s, w2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], s, w3);
    });
  };
  for (int64_t kp = 0; kp < pairs; ++kp) step(panel + kp * 8 * L, broadcast_pair, 2 * kp);
  if (K % 2) step(panel + pairs * 8 * L, broadcast_half_pair, K - 1);
  static_for<R>([&](auto m) {
    cell_epilogue(a, V(acc[m][0]), V(acc[m][1]), V(acc[m][2]), V(acc[m][3]), row0 + m, j0, cnt, t, slot, r_prev,
                  c_prev);
  });
}

void fused_forward(const ChunkRecurrenceArgs<BF, float>& a, const BF* p) {
  const int64_t panel_size = (a.H + 1) / 2 * 8 * L;
  fused_forward_steps<L, kRows>(a, [&](int64_t ub, int64_t row0, int64_t rows, int64_t t, int64_t slot,
                                       const BF* r_prev, const float* c_prev) {
    static_for<kRows>([&](auto r) {
      if (rows == r + 1) forward_tile<r + 1>(a, p + ub * panel_size, ub, row0, t, slot, r_prev, c_prev);
    });
  });
}

}  // namespace

const Bf16Kernels& bf16_kernel_table() {
  static constexpr Bf16Kernels table{&panel_width, &pack, &multiply, &pack_forward, &fused_forward};
  return table;
}

}  // namespace fastlstm::cpu::CPU_CAPABILITY
