// The fused CPU recurrence (lstm_recurrence_cpu.h), the CPU counterpart of the persistent CUDA
// kernels, compiled once per SIMD level.
//
// One at::parallel_for region runs every step of a chunk. The hidden units are cut into blocks
// of one vector (L units) and each thread owns a contiguous run of blocks: all four gates of its
// units in the forward, the same units' columns of W_hh in the backward. Its slice of W_hh is
// packed once, so it stays in that core's cache for the whole sequence. Per step:
//   forward   gates of own units = Gx + h_{t-1} W_hh^T (register tile of kRows rows x
//             gates_per_pass gate vectors), cell update in registers, h_t written; one barrier,
//             during which the thread computes the next steps' Gx of its own units (x W_ih^T,
//             where the caller passes W_ih's panels; else Gx is in the gate buffer already).
//   backward  cell backward of own units -> dG_t; barrier; carry_h of own units
//             += dG_t W_hh[:, own] (register tile of kCarryRows rows x kCarryBlocks unit blocks).
// The semantics (padding, resets, truncation, clipping, norms) are cell_math.h's, as in the stepwise path.
#include "../lstm_recurrence_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>

#include "fused_forward.h"
#include "static_for.h"

namespace fastlstm::cpu::CPU_CAPABILITY {
namespace {

template <class T>
struct Blocking {
  using V = at::vec::Vectorized<T>;
  static constexpr int L = V::size();
  static constexpr bool kWide = L * sizeof(T) >= 64;  // AVX-512: 32 vector registers, else 16
  // Forward tile: up to kRows rows x gates_per_pass gate vectors of accumulators, one broadcast
  // and gates_per_pass weights. Six rows: with 4 the tile ran at 50-65% of the FMA peak once its
  // panel no longer fits L1, with 5-6 at 75% (benchmarks/NOTES.md). AVX-512 holds all four
  // gates (24 accumulators); AVX2 has room for 6 x 2 (12 accumulators, each weight read once
  // per 6 rows), so it takes the gates in two passes, the first one's sums parked in the gate buffer.
  static constexpr int kRows = 6;
  // Up to 2 rows all four gates fit AVX2 too, and 2 gates of 1-2 rows would leave too few
  // independent FMA chains to hide the FMA latency (1 row x 2 gates ran at half the speed).
  template <int R>
  static constexpr int gates_per_pass() { return kWide || R <= 2 ? 4 : 2; }
  // Backward carry tile: up to kCarryRows rows x kCarryBlocks unit blocks of accumulators.
  static constexpr int kCarryRows = 6;
  static constexpr int kCarryBlocks = kWide ? 4 : 2;
};

// acc[m][q] += rows[m][0] w[0][q] + rows[m][1] w[1][q] + ... over k < depth, in k order: w the
// gate vectors q of a unit block's panel (rows of 4 gates x L units, from the pass's first gate).
template <class T, int R, int NG>
C10_ALWAYS_INLINE void accumulate_gates(at::vec::Vectorized<T> (&acc)[R][NG], const T* const (&rows)[R], const T* panel,
                                        int64_t depth) {
  using V = at::vec::Vectorized<T>;
  constexpr int L = V::size();
  for (int64_t k = 0; k < depth; ++k) {
    const T* w = panel + k * 4 * L;
    V wq[NG];
    static_for<NG>([&](auto q) { wq[q] = V::loadu(w + q * L); });
    static_for<R>([&](auto m) {
      const V s(rows[m][k]);
      static_for<NG>([&](auto q) { acc[m][q] = at::vec::fmadd(s, wq[q], acc[m][q]); });
    });
  }
}

// One forward tile: R rows from row0 x unit block ub: the gates' x W_ih^T plus h_{t-1} W_hh^T
// accumulated in registers, then the cell update. kFull: the block has L units, so no access is
// masked. Never inlined: inlined into the step loop, GCC stored some tiles' accumulators to the
// stack on every k. Each gate's sum is Gx + h_{t-1}[0] w[0] + ... in k order in every tiling,
// so a row's result does not depend on its tile or pass.
template <class T, int R, bool kFull>
C10_NOINLINE void forward_tile(const ChunkRecurrenceArgs<T, T>& a, const T* panel, int64_t ub, int64_t row0, int64_t t,
                  int64_t slot, const T* r_prev, const T* c_prev) {
  using V = typename Blocking<T>::V;
  constexpr int L = Blocking<T>::L, NG = Blocking<T>::template gates_per_pass<R>(), kPasses = 4 / NG;
  const int64_t H = a.H, B = a.B, K = a.H, j0 = ub * L, cnt = kFull ? L : std::min<int64_t>(L, H - j0);
  T* g0 = a.gates + (slot * B + row0) * 4 * H + j0;
  const T* h[R];
  static_for<R>([&](auto m) { h[m] = r_prev + (row0 + m) * K; });
  // Always inlined: an outlined pass keeps its accumulators in memory.
  static_for<kPasses>([&](auto p) C10_ALWAYS_INLINE_ATTRIBUTE {
    constexpr int q0 = p * NG;
    V acc[R][NG];
    static_for<R>([&](auto m) {
      static_for<NG>([&](auto q) { acc[m][q] = V::loadu(g0 + m * 4 * H + (q0 + q) * H, cnt); });
    });
    accumulate_gates<T, R, NG>(acc, h, panel + q0 * L, K);
    if constexpr (p + 1 < kPasses) {
      static_for<R>([&](auto m) {
        static_for<NG>([&](auto q) { acc[m][q].store(g0 + m * 4 * H + (q0 + q) * H, cnt); });
      });
      // Read the parked sums back from memory: kept in registers across the next pass, they
      // would crowd out its accumulators.
      asm volatile("" ::: "memory");
    } else {
      static_for<R>([&](auto m) {
        V pre[4];
        static_for<q0>([&](auto q) { pre[q] = V::loadu(g0 + m * 4 * H + q * H, cnt); });
        static_for<NG>([&](auto q) { pre[q0 + q] = acc[m][q]; });
        row_epilogue<L, kFull>(a, pre[0], pre[1], pre[2], pre[3], row0 + m, j0, cnt, t, slot, r_prev, c_prev);
      });
    }
  });
}

// One input-projection tile: gate rows [row0, row0 + R) (row slot * B + b) x unit block ub =
// x W_ih^T, from the layer input's rows tlo * B + row0 + m. Each gate's sum is
// 0 + x[0] w[0] + x[1] w[1] + ... in k order, as the packed GEMM computes it, so the gates are
// bitwise those of the driver's projection.
template <class T, int R, bool kFull>
C10_NOINLINE void projection_tile(const ChunkRecurrenceArgs<T, T>& a, const T* panel, int64_t ub, int64_t row0) {
  using V = typename Blocking<T>::V;
  constexpr int L = Blocking<T>::L, NG = Blocking<T>::template gates_per_pass<R>(), kPasses = 4 / NG;
  const int64_t H = a.H, I = a.I, j0 = ub * L, cnt = kFull ? L : std::min<int64_t>(L, H - j0);
  T* g0 = a.gates + row0 * 4 * H + j0;
  const T* x[R];
  static_for<R>([&](auto m) { x[m] = a.x + (a.tlo * a.B + row0 + m) * I; });
  static_for<kPasses>([&](auto p) C10_ALWAYS_INLINE_ATTRIBUTE {
    constexpr int q0 = p * NG;
    V acc[R][NG];
    static_for<R>([&](auto m) { static_for<NG>([&](auto q) { acc[m][q] = V(T(0)); }); });
    accumulate_gates<T, R, NG>(acc, x, panel + q0 * L, I);
    static_for<R>([&](auto m) {
      static_for<NG>([&](auto q) { acc[m][q].store(g0 + m * 4 * H + (q0 + q) * H, cnt); });
    });
  });
}

// carry[R rows from row0, NV unit blocks from ub] += dG_t[rows, :] W_hh[:, those units]
template <class T, int R, int NV>
C10_NOINLINE void carry_tile(const ChunkRecurrenceArgs<T, T>& a, const T* packed, int64_t ub, int64_t row0, const T* dg) {
  using V = typename Blocking<T>::V;
  constexpr int L = Blocking<T>::L;
  const int64_t H = a.H, G = 4 * H;
  V acc[R][NV];
  const T* d[R];
  const T* panel[NV];
  static_for<NV>([&](auto v) { panel[v] = packed + (ub + v) * G * L; });
  static_for<R>([&](auto m) {
    d[m] = dg + (row0 + m) * G;
    static_for<NV>([&](auto v) { acc[m][v] = V(T(0)); });
  });
  for (int64_t n = 0; n < G; ++n) {
    V w[NV];
    static_for<NV>([&](auto v) { w[v] = V::loadu(panel[v] + n * L); });
    static_for<R>([&](auto m) {
      const V s(d[m][n]);
      static_for<NV>([&](auto v) { acc[m][v] = at::vec::fmadd(s, w[v], acc[m][v]); });
    });
  }
  static_for<R>([&](auto m) {
    static_for<NV>([&](auto v) {
      const int64_t j0 = (ub + v) * L, cnt = std::min<int64_t>(L, H - j0);
      T* out = a.carry_h + (row0 + m) * H + j0;
      (acc[m][v] + V::loadu(out, cnt)).store(out, cnt);
    });
  });
}

// Unit blocks [ub0, ub1) x rows [row0, row0 + rows), rows <= kCarryRows: groups of up to
// kCarryBlocks unit blocks (one broadcast then serves that many blocks, one weight load all rows).
template <class T>
void carry_rows(const ChunkRecurrenceArgs<T, T>& a, const T* packed, int64_t ub0, int64_t ub1, int64_t row0,
                int64_t rows, const T* dg) {
  constexpr int G = Blocking<T>::kCarryBlocks;
  for (int64_t ub = ub0; ub < ub1;) {
    const int64_t group = std::min<int64_t>(G, ub1 - ub);
    static_for<Blocking<T>::kCarryRows>([&](auto r) {
      if (rows != r + 1) return;
      static_for<G>([&](auto v) {
        if (group == v + 1) carry_tile<T, r + 1, v + 1>(a, packed, ub, row0, dg);
      });
    });
    ub += group;
  }
}

// Cell backward of unit block ub for row b; returns the squared norms of dL/dh_t and dL/dc_t.
template <class T>
void backward_cell(const ChunkRecurrenceArgs<T, T>& a, int64_t ub, int64_t b, int64_t t, int64_t slot,
                   const T* c_prev, T* dgates, T& sum_h, T& sum_c) {
  using V = typename Blocking<T>::V;
  constexpr int L = Blocking<T>::L;
  const int64_t H = a.H, B = a.B, j0 = ub * L, cnt = std::min<int64_t>(L, H - j0), e = b * H + j0;
  T* dg = dgates + b * 4 * H + j0;
  const int64_t n_b = row_length(a.lengths, b, a.T);
  sum_h = sum_c = T(0);
  if (t >= n_b) {  // padding: no gate gradient, the carries pass through untouched
    for (int q = 0; q < 4; ++q) V(T(0)).store(dg + q * H, cnt);
    return;
  }
  const int kind = carry_kind(step_of_time(t, n_b, a.reverse), n_b, a.opts.tbptt_chunk,
                              state_zeroed_after(a.reset, B, b, t, n_b, a.reverse));
  const bool zero_in = state_zeroed_before(a.reset, B, b, t, n_b, a.reverse);
  const T clip_rec = static_cast<T>(a.opts.clip_recurrent), clip_gates = static_cast<T>(a.opts.clip_gates);
  const T* g = a.gates + (slot * B + b) * 4 * H + j0;
  V dh = receive_carry(V::loadu(a.carry_h + e, cnt), kind, clip_rec);
  if (a.dy) dh = dh + V::loadu(a.dy + t * B * H + e, cnt);
  const V dc_in = receive_carry(V::loadu(a.carry_c + e, cnt), kind, clip_rec);
  V dgi, dgf, dgg, dgo, dct, dcp;
  fastlstm::cell_backward(V::loadu(g, cnt), V::loadu(g + H, cnt), V::loadu(g + 2 * H, cnt), V::loadu(g + 3 * H, cnt),
                          V::loadu(a.c + slot * B * H + e, cnt), zero_in ? V(T(0)) : V::loadu(c_prev + e, cnt), dh,
                          dc_in, dgi, dgf, dgg, dgo, dct, dcp);
  clip_gate_grad(dgi, clip_gates).store(dg, cnt);
  clip_gate_grad(dgf, clip_gates).store(dg + H, cnt);
  clip_gate_grad(dgg, clip_gates).store(dg + 2 * H, cnt);
  clip_gate_grad(dgo, clip_gates).store(dg + 3 * H, cnt);
  dcp.store(a.carry_c + e, cnt);
  V(T(0)).store(a.carry_h + e, cnt);  // what skips the step; dG_t W_hh is added after the barrier
  if (a.norm_partial) {  // lanes past cnt hold zeros: loadu zero-fills them
    sum_h = at::vec::vec_reduce_all<T>([](const V& x, const V& y) { return x + y; }, dh * dh);
    sum_c = at::vec::vec_reduce_all<T>([](const V& x, const V& y) { return x + y; }, dct * dct);
  }
}

template <class T>
int64_t unit_blocks(int64_t H) {
  return (H + Blocking<T>::L - 1) / Blocking<T>::L;
}

// Forward panels: packed[ub][k][gate][l] = W_hh[gate * H + ub * L + l, k], zero past H.
template <class T>
at::Tensor pack_fused_forward(const T* w, int64_t H) {
  return pack_gate_panels<1>(w, H, H, Blocking<T>::L, H);
}

// The same for W_ih (4H, I), for the forward's own input projection.
template <class T>
at::Tensor pack_fused_projection(const T* w_ih, int64_t H, int64_t I) {
  return pack_gate_panels<1>(w_ih, H, I, Blocking<T>::L, I);
}

// Backward panels: packed[ub][n][l] = W_hh[n, ub * L + l], zero past H.
template <class T>
at::Tensor pack_fused_backward(const T* w, int64_t H) {
  constexpr int L = Blocking<T>::L;
  const int64_t blocks = unit_blocks<T>(H), G = 4 * H;
  at::Tensor packed = at::zeros({blocks, G, L}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* p = packed.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ub = b0; ub < b1; ++ub)
      for (int64_t n = 0; n < G; ++n)
        for (int64_t l = 0; l < L && ub * L + l < H; ++l) p[(ub * G + n) * L + l] = w[n * H + ub * L + l];
  });
  return packed;
}

template <class T>
void fused_forward(const ChunkRecurrenceArgs<T, T>& a, const T* p, const T* p_ih) {
  TORCH_CHECK((a.x == nullptr) == (p_ih == nullptr), "fastlstm: internal error: input and W_ih panels go together");
  constexpr int L = Blocking<T>::L;
  constexpr int kRows = Blocking<T>::kRows;
  const auto tile_rows = [&](int64_t ub, int64_t row0, int64_t rows, int64_t t, int64_t slot, const T* r_prev,
                             const T* c_prev) {
    with_tile_shape<L, kRows>(a.H, ub, rows, [&](auto r, auto full) {
      forward_tile<T, decltype(r)::value, decltype(full)::value>(a, p + ub * a.H * 4 * L, ub, row0, t, slot, r_prev,
                                                                  c_prev);
    });
  };
  const auto project = [&](int64_t ub, int64_t row0, int64_t rows) {
    with_tile_shape<L, kRows>(a.H, ub, rows, [&](auto r, auto full) {
      projection_tile<T, decltype(r)::value, decltype(full)::value>(a, p_ih + ub * a.I * 4 * L, ub, row0);
    });
  };
  // AVX2 with a short reduction: the two passes' fixed costs outweigh the taller tile (T=4000,
  // B=4, H=64: 15 ms a forward with 4-row tiles, 13 with 2-row ones).
  if (!Blocking<T>::kWide && a.H < 128) {
    fused_forward_steps<L, 2>(a, stateless(tile_rows), project);
  } else {
    fused_forward_steps<L, kRows>(a, stateless(tile_rows), project);
  }
}

template <class T>
void fused_backward(const ChunkRecurrenceArgs<T, T>& a, const T* p) {
  if (a.B == 0 || a.H == 0 || a.n == 0) return;
  constexpr int L = Blocking<T>::L;
  const int64_t H = a.H, B = a.B, blocks = unit_blocks<T>(H);
  SpinBarrier barrier(slices_for(blocks));
  for_each_slice(blocks, [&](int64_t ub0, int64_t ub1, int64_t weight) {
    for (int64_t i = a.n - 1; i >= 0; --i) {
      const int64_t s = a.s0 + i, slot = slot_of_step(a, s), t = slot + a.tlo;
      const int64_t prev = i == 0 ? -1 : slot_of_step(a, s - 1);
      const T* c_prev = prev < 0 ? a.c_init : a.c + prev * B * H;
      T* dgates = a.dgates + slot * B * 4 * H;
      T* norms = a.norm_partial ? a.norm_partial + t * 2 * B * blocks : nullptr;
      if (i > 0) {  // the step processed next is step s - 1, in slot prev
        const int64_t j0 = ub0 * L, j1 = std::min(H, ub1 * L);
        prefetch_units(a.gates + prev * B * 4 * H, B, 4 * H, 4, H, j0, j1);
        prefetch_units(a.c + prev * B * H, B, H, 1, 0, j0, j1);
        if (a.dy) prefetch_units(a.dy + (a.tlo + prev) * B * H, B, H, 1, 0, j0, j1);
      }
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t ub = ub0; ub < ub1; ++ub) {
          T sum_h, sum_c;
          backward_cell(a, ub, b, t, slot, c_prev, dgates, sum_h, sum_c);
          if (norms) {
            norms[b * blocks + ub] = sum_h;
            norms[(B + b) * blocks + ub] = sum_c;
          }
        }
      }
      barrier.arrive_and_wait(weight);  // dG_t complete for every unit
      for_each_row_block<Blocking<T>::kCarryRows>(
          B, [&](int64_t row0, int64_t rows) { carry_rows(a, p, ub0, ub1, row0, rows, dgates); });
      // The next step's cell backward reads only this thread's own carries: no barrier needed.
    }
  });
}

}  // namespace

template <class T>
const RecurrenceKernels<T>& recurrence_kernel_table() {
  static constexpr RecurrenceKernels<T> table{&unit_blocks<T>,     &pack_fused_forward<T>, &pack_fused_projection<T>,
                                              &pack_fused_backward<T>, &fused_forward<T>,  &fused_backward<T>};
  return table;
}

template const RecurrenceKernels<float>& recurrence_kernel_table<float>();
template const RecurrenceKernels<double>& recurrence_kernel_table<double>();

}  // namespace fastlstm::cpu::CPU_CAPABILITY
