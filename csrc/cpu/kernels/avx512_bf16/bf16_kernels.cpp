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
#include <memory>
#include <type_traits>
#include <vector>

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

// Packed weights hold their reduction in pairs, padded with zero pairs to a multiple of 16 pairs
// (32 reduction indices): the depth of an AMX tile, which reads 16 pairs at a time.
constexpr int64_t kTilePairs = 16;
inline int64_t padded_pairs(int64_t depth) { return (depth + 2 * kTilePairs - 1) / (2 * kTilePairs) * kTilePairs; }

// Both elements of the pair at p, broadcast to every lane; kHalf: the pair (p[0], 0), the last,
// half pair of an odd depth (p[1] may be past the end). A template, not a function passed to the
// tiles: passed as a pointer, it was called through it once per broadcast.
template <bool kHalf>
C10_ALWAYS_INLINE __m512bh broadcast_pair(const BF* p) {
  using Bits = std::conditional_t<kHalf, uint16_t, uint32_t>;
  Bits bits;
  std::memcpy(&bits, p, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
}

inline __m512bh load_pairs(const BF* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }

// ---------------------------------------------------------------- packed GEMM (input projection)

// A tile of kRows rows x kVecs vectors of columns, as the float kernel's
// (packed_gemm_kernels.cpp): 24 accumulators (with 4 x 3 the product ran at half the rate of 8 x 3).
constexpr int kGemmRows = 8, kGemmVecs = 3, kGemmWidth = kGemmVecs * L;

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
  auto step = [&](const BF* p, auto half, int64_t k) C10_ALWAYS_INLINE_ATTRIBUTE {
    __m512bh b[kGemmVecs];
    static_for<kGemmVecs>([&](auto v) { b[v] = load_pairs(p + v * 2 * L); });
    static_for<R>([&](auto m) {
      const __m512bh s = broadcast_pair<decltype(half)::value>(a[m] + k);
      static_for<kGemmVecs>([&](auto v) { acc[m][v] = _mm512_dpbf16_ps(acc[m][v], s, b[v]); });
    });
  };
  for (int64_t kp = 0; kp < pairs; ++kp) step(panel + kp * 2 * kGemmWidth, std::false_type{}, 2 * kp);
  if (depth % 2) step(panel + pairs * 2 * kGemmWidth, std::true_type{}, depth - 1);
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

// dst[p][k / 2][c][k % 2] = element (k, p * width + c), zero past the matrix (padded_pairs).
void pack(const BF* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col, BF* dst) {
  constexpr int64_t W = kGemmWidth;
  const int64_t panels = (cols + W - 1) / W, pairs = padded_pairs(rows);
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
  const int64_t panel_size = padded_pairs(rows) * 2 * kGemmWidth;
  for_each_tile<kGemmRows, kGemmWidth>(M, rows, cols, [&](auto r, int64_t row0, int64_t p, int) {
    const int64_t col0 = p * kGemmWidth;
    gemm_tile<decltype(r)::value>(rows, A + row0 * rows, packed + p * panel_size, C + row0 * cols + col0, cols,
                                  std::min<int64_t>(kGemmWidth, cols - col0), accumulate);
  });
}

// ---------------------------------------------------------------- fused forward

// Forward tile: up to kRows rows x the 4 gate vectors of one unit block, 24 accumulators (4
// rows ran at 50-65% of the FMA rate in the float kernels, 6 at 75%; benchmarks/NOTES.md).
constexpr int kRows = 6;

// Forward panels: packed[ub][k / 2][gate][l][k % 2] = W_hh[gate * H + ub * L + l, k], zero past H
// (units) and past K (padded_pairs).
at::Tensor pack_forward(const BF* w, int64_t H) { return pack_gate_panels<2>(w, H, H, L, 2 * padded_pairs(H)); }

// acc[m][q] += the dot products of rows[m] with gate vector q of a unit block's panel over depth,
// pair by pair (an odd depth ends with a half pair), as gemm_tile orders them.
template <int R>
C10_ALWAYS_INLINE void accumulate_pairs(__m512 (&acc)[R][4], const BF* const (&rows)[R], const BF* panel, int64_t depth) {
  auto step = [&](const BF* w, auto half, int64_t k) C10_ALWAYS_INLINE_ATTRIBUTE {
    __m512bh wq[4];
    static_for<4>([&](auto q) { wq[q] = load_pairs(w + q * 2 * L); });
    static_for<R>([&](auto m) {
      const __m512bh s = broadcast_pair<decltype(half)::value>(rows[m] + k);
      static_for<4>([&](auto q) { acc[m][q] = _mm512_dpbf16_ps(acc[m][q], s, wq[q]); });
    });
  };
  const int64_t pairs = depth / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) step(panel + kp * 8 * L, std::false_type{}, 2 * kp);
  if (depth % 2) step(panel + pairs * 8 * L, std::true_type{}, depth - 1);
}

// R rows from row0 x unit block ub: the gates' x W_ih^T (already in a.gates) plus h_{t-1} W_hh^T
// accumulated in registers, then the cell update. kFull: the block has L units (no masks). Never
// inlined, for the float kernels' reason (recurrence_kernels.cpp).
template <int R, bool kFull>
C10_NOINLINE void forward_tile(const ChunkRecurrenceArgs<BF, float>& a, const BF* panel, int64_t ub, int64_t row0,
                               int64_t t, int64_t slot, const BF* r_prev, const float* c_prev) {
  using V = at::vec::Vectorized<float>;
  const int64_t H = a.H, B = a.B, K = a.H, j0 = ub * L, cnt = kFull ? L : std::min<int64_t>(L, H - j0);
  const __mmask16 mask = lanes(cnt);
  const float* g0 = a.gates + (slot * B + row0) * 4 * H + j0;
  __m512 acc[R][4];
  const BF* h[R];
  static_for<R>([&](auto m) {
    h[m] = r_prev + (row0 + m) * K;
    static_for<4>([&](auto q) { acc[m][q] = _mm512_maskz_loadu_ps(mask, g0 + m * 4 * H + q * H); });
  });
  accumulate_pairs<R>(acc, h, panel, K);
  static_for<R>([&](auto m) {
    row_epilogue<L, kFull>(a, V(acc[m][0]), V(acc[m][1]), V(acc[m][2]), V(acc[m][3]), row0 + m, j0, cnt, t, slot,
                           r_prev, c_prev);
  });
}

// The fused forward's own input projection: gate rows [row0, row0 + R) (row slot * B + b) x unit
// block ub = x W_ih^T, from the layer input's rows tlo * B + row0 + m; the same dot products in
// the same order as gemm_tile's, so bitwise the gates of the layer's projection.
template <int R, bool kFull>
C10_NOINLINE void projection_tile(const ChunkRecurrenceArgs<BF, float>& a, const BF* panel, int64_t ub, int64_t row0) {
  const int64_t H = a.H, j0 = ub * L, cnt = kFull ? L : std::min<int64_t>(L, H - j0);
  const __mmask16 mask = lanes(cnt);
  float* g0 = a.gates + row0 * 4 * H + j0;
  __m512 acc[R][4];
  const BF* x[R];
  static_for<R>([&](auto m) {
    x[m] = a.x + (a.tlo * a.B + row0 + m) * a.I;
    static_for<4>([&](auto q) { acc[m][q] = _mm512_setzero_ps(); });
  });
  accumulate_pairs<R>(acc, x, panel, a.I);
  static_for<R>([&](auto m) {
    static_for<4>([&](auto q) { _mm512_mask_storeu_ps(g0 + m * 4 * H + q * H, mask, acc[m][q]); });
  });
}

// W_ih (4H, I) in the forward panels' layout, its depth I padded to pairs of tiles.
at::Tensor pack_projection(const BF* w, int64_t H, int64_t I) {
  return pack_gate_panels<2>(w, H, I, L, 2 * padded_pairs(I));
}

void fused_forward(const ChunkRecurrenceArgs<BF, float>& a, const BF* p, const BF* p_ih) {
  TORCH_CHECK((a.x == nullptr) == (p_ih == nullptr), "fastlstm: internal error: input and W_ih panels go together");
  const int64_t panel_size = padded_pairs(a.H) * 8 * L, projection_panel = padded_pairs(a.I) * 8 * L;
  fused_forward_steps<L, kRows>(
      a,
      stateless([&](int64_t ub, int64_t row0, int64_t rows, int64_t t, int64_t slot, const BF* r_prev,
                    const float* c_prev) {
        with_tile_shape<L, kRows>(a.H, ub, rows, [&](auto r, auto full) {
          forward_tile<decltype(r)::value, decltype(full)::value>(a, p + ub * panel_size, ub, row0, t, slot, r_prev,
                                                                   c_prev);
        });
      }),
      [&](int64_t ub, int64_t row0, int64_t rows) {
        with_tile_shape<L, kRows>(a.H, ub, rows, [&](auto r, auto full) {
          projection_tile<decltype(r)::value, decltype(full)::value>(a, p_ih + ub * projection_panel, ub, row0);
        });
      });
}

// ---------------------------------------------------------------- AMX (tiles of 16 rows)
//
// The same products on AMX tiles (tdpbf16ps: C[16 x 16] float += A[16 x 32] bfloat16 times B, 16
// pairs of rows x 16 columns in the pair layout above), for CPUs with AMX-BF16 whose kernel grants
// the tile state (cpu_capability.cpp). Every tile is 16 rows x 64 bytes: tmm0-3 accumulate, tmm4
// holds A, tmm5-7 the weights. An A block is read in place when it has 16 rows and a depth that
// is a multiple of 32, else from a zero-padded copy. Each row's result is the same whatever the
// other rows of its tile, so the forward stays bit-identical however it is chunked.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the tile configuration on the calling thread for its lifetime and releases the tiles after.
class TileScope {
 public:
  TileScope() {
    TileConfig c;
    for (int i = 0; i < 8; ++i) {
      c.colsb[i] = 64;
      c.rows[i] = 16;
    }
    // Not _tile_loadconfig: GCC 12's tells the compiler only 8 bytes of c are read, and the
    // stores to the rest were dropped (a #GP, SIGSEGV, on ldtilecfg).
    asm volatile("ldtilecfg %0" : : "m"(c));
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// C[16][NC * 16] (row stride NC * 16 floats) = A[16 rows, lda apart][kblocks * 32] times the
// packed weights w: pair row kp of column vector v at w + kp * ldw + v * 32 elements.
template <int NC>
void amx_block(const BF* A, int64_t lda, const BF* w, int64_t ldw, int64_t kblocks, float* C) {
  static_assert(NC == 3 || NC == 4);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  if constexpr (NC == 4) _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const BF* b = w + kb * kTilePairs * ldw;
    _tile_loadd(4, A + kb * 2 * kTilePairs, lda * sizeof(BF));
    _tile_loadd(5, b, ldw * sizeof(BF));
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 32, ldw * sizeof(BF));
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, b + 64, ldw * sizeof(BF));
    _tile_dpbf16ps(2, 4, 7);
    if constexpr (NC == 4) {
      _tile_loadd(5, b + 96, ldw * sizeof(BF));
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  constexpr int64_t ldc = NC * L * sizeof(float);
  _tile_stored(0, C, ldc);
  _tile_stored(1, C + L, ldc);
  _tile_stored(2, C + 2 * L, ldc);
  if constexpr (NC == 4) _tile_stored(3, C + 3 * L, ldc);
}

// Rows [row0, row0 + rows) of the (M, depth) matrix src, as an A block of 16 rows x depth
// padded to kblocks * 32: src itself when nothing needs padding, else a zero-padded copy in buf.
const BF* a_block(const BF* src, int64_t depth, int64_t row0, int64_t rows, int64_t lda_padded, BF* buf) {
  if (rows == 16 && depth == lda_padded) return src + row0 * depth;
  for (int64_t m = 0; m < 16; ++m) {
    BF* out = buf + m * lda_padded;
    if (m < rows) std::copy(src + (row0 + m) * depth, src + (row0 + m + 1) * depth, out);
    std::fill(out + (m < rows ? depth : 0), out + lda_padded, BF(0.f));
  }
  return buf;
}

struct AmxGemmThread {
  TileScope tiles;
  std::vector<BF> a;  // a padded A block
  alignas(64) float c[16 * kGemmWidth];
};

void multiply_amx(int64_t M, const BF* A, const BF* packed, int64_t rows, int64_t cols, float* C, bool accumulate) {
  if (M == 0 || cols == 0) return;
  if (rows == 0) {
    if (!accumulate) std::fill(C, C + M * cols, 0.f);
    return;
  }
  const int64_t pairs = padded_pairs(rows), depth = 2 * pairs, panel_size = pairs * 2 * kGemmWidth;
  auto make_state = [&] {
    auto s = std::make_unique<AmxGemmThread>();
    s->a.resize(16 * depth);
    return s;
  };
  for_each_tile<16, kGemmWidth>(
      M, rows, cols,
      [&](auto r, int64_t row0, int64_t p, const std::unique_ptr<AmxGemmThread>& s) {
        constexpr int live = decltype(r)::value;
        const int64_t col0 = p * kGemmWidth, valid = std::min<int64_t>(kGemmWidth, cols - col0);
        amx_block<kGemmVecs>(a_block(A, rows, row0, live, depth, s->a.data()), depth, packed + p * panel_size,
                             2 * kGemmWidth, pairs / kTilePairs, s->c);
        for (int m = 0; m < live; ++m) {
          float* out = C + (row0 + m) * cols + col0;
          for (int64_t col = 0; col < valid; col += L) {
            const __mmask16 mask = lanes(valid - col);
            __m512 v = _mm512_load_ps(s->c + m * kGemmWidth + col);
            if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, out + col));
            _mm512_mask_storeu_ps(out + col, mask, v);
          }
        }
      },
      make_state);
}

// The fused forward on tiles: per step, h_{t-1} (as an A block of 16 rows) times the 4 gate
// panels of a unit block into tmm0-3, then the cell update of those rows from the products plus
// the gates' x W_ih^T.
class AmxForwardWorker {
 public:
  explicit AmxForwardWorker(const ChunkRecurrenceArgs<BF, float>& a, const BF* packed)
      : a_(a), packed_(packed), pairs_(padded_pairs(a.H)), depth_(2 * pairs_) {
    if (a.B % 16 != 0 || a.H != depth_) h_.resize((a.B + 15) / 16 * 16 * depth_);  // rows and depth padded
  }

  // h_{t-1} into the padded copy, if one is needed (its padding stays zero).
  void step(const BF* r_prev) {
    for (int64_t b = 0; b < a_.B && !h_.empty(); ++b) {
      std::copy(r_prev + b * a_.H, r_prev + (b + 1) * a_.H, h_.data() + b * depth_);
    }
  }

  void operator()(int64_t ub, int64_t row0, int64_t rows, int64_t t, int64_t slot, const BF* r_prev,
                  const float* c_prev) {
    using V = at::vec::Vectorized<float>;
    const int64_t H = a_.H, B = a_.B, j0 = ub * L, cnt = std::min<int64_t>(L, H - j0);
    const BF* h = h_.empty() ? r_prev + row0 * H : h_.data() + row0 * depth_;
    amx_block<4>(h, depth_, packed_ + ub * pairs_ * 8 * L, 8 * L, pairs_ / kTilePairs, c_);
    const __mmask16 mask = lanes(cnt);
    for (int64_t m = 0; m < rows; ++m) {
      const float* g = a_.gates + (slot * B + row0 + m) * 4 * H + j0;
      V p[4];
      for (int q = 0; q < 4; ++q) {
        p[q] = V(_mm512_add_ps(_mm512_load_ps(c_ + m * 4 * L + q * L), _mm512_maskz_loadu_ps(mask, g + q * H)));
      }
      cell_epilogue(a_, p[0], p[1], p[2], p[3], row0 + m, j0, cnt, t, slot, r_prev, c_prev);
    }
  }

 private:
  TileScope tiles_;
  const ChunkRecurrenceArgs<BF, float>& a_;
  const BF* packed_;
  const int64_t pairs_, depth_;
  std::vector<BF> h_;
  alignas(64) float c_[16 * 4 * L];
};

void fused_forward_amx(const ChunkRecurrenceArgs<BF, float>& a, const BF* p, const BF* p_ih) {
  TORCH_CHECK(p_ih == nullptr, "fastlstm: internal error: the AMX forward takes the layer's input projection");
  fused_forward_steps<L, 16>(a, [&] { return AmxForwardWorker(a, p); });
}

}  // namespace

const Bf16Kernels& bf16_kernel_table() {
  static constexpr Bf16Kernels table{&panel_width, &pack, &multiply, &pack_forward, &pack_projection, &fused_forward};
  return table;
}

const Bf16Kernels& bf16_amx_kernel_table() {
  static constexpr Bf16Kernels table{&panel_width, &pack, &multiply_amx, &pack_forward, nullptr, &fused_forward_amx};
  return table;
}

}  // namespace fastlstm::cpu::CPU_CAPABILITY
