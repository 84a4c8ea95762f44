// The fused forward's parts that do not depend on how the recurrent product is computed, shared
// by the float/double kernels (recurrence_kernels.cpp) and the bfloat16 ones
// (avx512_bf16/bf16_kernels.cpp): the threads' slices of unit blocks, the step loop with its
// barrier and prefetches, and the cell epilogue. S is the dtype of the state h, the output, the
// bias and W_hh; A (float or double) that of the gates and the cell state. StateIO<S> loads S
// into vectors of A and stores them back (the identity for S = A; kernels of another S specialise it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../../fastlstm/step_args.h"
#include "spin_barrier.h"
#include "static_for.h"
#include "vec_math.h"

namespace fastlstm::cpu::CPU_CAPABILITY {

template <class S, class A>
struct StateIO;

template <class T>
struct StateIO<T, T> {
  using V = at::vec::Vectorized<T>;
  static V load(const T* p, int64_t cnt) { return V::loadu(p, cnt); }
  static void store(const V& v, T* p, int64_t cnt) { v.store(p, cnt); }
};

// The fused forward's weight panels, unit blocks of L units with the four gates of each unit side
// by side: packed[ub][k / P][gate][l][k % P] = W[gate * H + ub * L + l, k] for W (4H x K): W_hh
// (K = H), or W_ih (K = I) where the kernel computes the input projection; zero past H units and
// for k in [K, depth). P = 1 for the float kernels; 2 for the bfloat16 ones, which read the
// reduction in pairs (vdpbf16ps, AMX), with depth padded to their tiles.
template <int P, class T>
at::Tensor pack_gate_panels(const T* w, int64_t H, int64_t K, int64_t L, int64_t depth) {
  const int64_t blocks = (H + L - 1) / L;
  at::Tensor packed = at::zeros({blocks, depth / P, 4, L, P}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* p = packed.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ub = b0; ub < b1; ++ub)
      for (int64_t k = 0; k < K; ++k)
        for (int g = 0; g < 4; ++g)
          for (int64_t l = 0; l < L && ub * L + l < H; ++l)
            p[(((ub * (depth / P) + k / P) * 4 + g) * L + l) * P + k % P] = w[(g * H + ub * L + l) * K + k];
  });
  return packed;
}

inline int64_t slices_for(int64_t blocks) {
  if (at::in_parallel_region()) return 1;  // nested: run serially rather than wait on absent threads
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

// Runs body(first_block, last_block, weight) on the threads of one parallel region, each with a
// contiguous run of unit blocks; weight is what the thread passes to the barrier.
template <class F>
void for_each_slice(int64_t blocks, const F& body) {
  const int64_t slices = slices_for(blocks);
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    body(s0 * blocks / slices, s1 * blocks / slices, s1 - s0);
  });
}

// Calls f(row0, rows) for row blocks of at most kMax of B rows, as even as they go (16 rows in
// blocks of 6: 5 + 5 + 6, not 6 + 6 + 4): a short tile reads the same panel for fewer rows. The
// tiles compute each row alike, so a row's result does not depend on its block.
template <int kMax, class F>
void for_each_row_block(int64_t B, const F& f) {
  const int64_t blocks = (B + kMax - 1) / kMax;
  for (int64_t r = 0; r < blocks; ++r) f(r * B / blocks, (r + 1) * B / blocks - r * B / blocks);
}

// Calls tile(std::integral_constant<int, R>, std::bool_constant<kFull>) for R = rows (<= kRows)
// rows of unit block ub, kFull when the block has all L of its units (below H): both compile-time
// in the tile, which then needs no masks for a full block.
template <int L, int kRows, class Tile>
void with_tile_shape(int64_t H, int64_t ub, int64_t rows, const Tile& tile) {
  const bool full = (ub + 1) * L <= H;
  static_for<kRows>([&](auto r) {
    if (rows != r + 1) return;
    if (full) {
      tile(std::integral_constant<int, r + 1>{}, std::true_type{});
    } else {
      tile(std::integral_constant<int, r + 1>{}, std::false_type{});
    }
  });
}

// The cell update of row b, units [j0, j0 + cnt), from its gates' x W_ih^T + h W_hh^T.
// Always inlined: a constant cnt (a full block) then removes its masks.
template <class S, class A>
C10_ALWAYS_INLINE void cell_epilogue(const ChunkRecurrenceArgs<S, A>& a, at::vec::Vectorized<A> p_i,
                                     at::vec::Vectorized<A> p_f, at::vec::Vectorized<A> p_g,
                                     at::vec::Vectorized<A> p_o, int64_t b, int64_t j0, int64_t cnt, int64_t t,
                                     int64_t slot, const S* r_prev, const A* c_prev) {
  using V = at::vec::Vectorized<A>;
  using IO = StateIO<S, A>;
  const int64_t H = a.H, B = a.B, e = b * H + j0;
  A* g = a.gates + (slot * B + b) * 4 * H + j0;
  A* c_next = a.c + slot * B * H + e;
  S* y = a.y + slot * B * H + e;
  S* state = a.r != a.y ? a.r + slot * B * H + e : nullptr;
  if (!row_live(a.lengths, b, t)) {
    for (int q = 0; q < 4; ++q) V(A(0)).store(g + q * H, cnt);
    V::loadu(c_prev + e, cnt).store(c_next, cnt);
    IO::store(V(A(0)), y, cnt);
    if (state) IO::store(IO::load(r_prev + e, cnt), state, cnt);
    return;
  }
  const int64_t n_b = row_length(a.lengths, b, a.T);
  V pre[4] = {p_i, p_f, p_g, p_o};
  if (a.bias) {
    for (int q = 0; q < 4; ++q) pre[q] = pre[q] + IO::load(a.bias + q * H + j0, cnt);
  }
  V i, f, gg, o, c, hv;
  const bool zero_in = state_zeroed_before(a.reset, B, b, t, n_b, a.reverse);
  fastlstm::cell_forward(pre[0], pre[1], pre[2], pre[3], zero_in ? V(A(0)) : V::loadu(c_prev + e, cnt), i, f, gg, o,
                         c, hv);
  i.store(g, cnt);
  f.store(g + H, cnt);
  gg.store(g + 2 * H, cnt);
  o.store(g + 3 * H, cnt);
  c.store(c_next, cnt);
  IO::store(hv, y, cnt);
  if (state) IO::store(state_zeroed_after(a.reset, B, b, t, n_b, a.reverse) ? V(A(0)) : hv, state, cnt);
}

// cell_epilogue of one row of a forward tile of L-unit blocks (kFull: cnt = L). Out of line:
// inlined into a tile, GCC gave the tile's accumulator array an address and stored it on every k.
template <int L, bool kFull, class S, class A>
C10_NOINLINE void row_epilogue(const ChunkRecurrenceArgs<S, A>& a, at::vec::Vectorized<A> p_i,
                               at::vec::Vectorized<A> p_f, at::vec::Vectorized<A> p_g, at::vec::Vectorized<A> p_o,
                               int64_t b, int64_t j0, int64_t cnt, int64_t t, int64_t slot, const S* r_prev,
                               const A* c_prev) {
  cell_epilogue(a, p_i, p_f, p_g, p_o, b, j0, kFull ? L : cnt, t, slot, r_prev, c_prev);
}

// The buffer slot of processing step s (slot = time - tlo; time and step map to each other by
// the same involution, step_of_time).
template <class S, class A>
int64_t slot_of_step(const ChunkRecurrenceArgs<S, A>& a, int64_t s) {
  return step_of_time(s, a.T, a.reverse) - a.tlo;
}

// Brings rows [0, B) x units of blocks [ub0, ub1) of a (B, width) slot array into cache ahead
// of use: the per-step slices of the big gate and state buffers are scattered cache lines that
// the hardware prefetcher does not anticipate, and each miss would otherwise stall a step.
template <class T>
void prefetch_units(const T* base, int64_t B, int64_t width, int64_t parts, int64_t part_stride, int64_t j0,
                    int64_t j1) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < parts; ++q)
      for (int64_t j = j0; j < j1; j += kLine) __builtin_prefetch(base + b * width + q * part_stride + j, 0, 3);
}

// Every step of a chunk in one parallel region: each thread computes the gates and cell update
// of its own unit blocks of L units, up to kRows rows at a time, then waits for the others (the next
// step reads every unit of h_t). make_worker() runs on each thread before its first step and
// returns its worker w: w.step(r_prev) starts each step, w(ub, row0, rows, t, slot, r_prev, c_prev)
// computes a tile.
//
// With a projection (a.x set), project(ub, row0, rows) computes x W_ih^T into the gate rows
// [row0, row0 + rows) (row slot * B + b) of unit block ub: each thread projects its own units, which
// only it reads, so no barrier guards them. It runs ahead, for the next steps, between the thread's
// arrival at a step's barrier and its wait there: the time a thread would spend waiting for the
// slowest one goes into work that does not depend on h_t. The steps go in groups of
// ceil(kRows / B), so that a projection tile has up to kRows rows also for small batches.
template <int L, int kRows, class S, class A, class MakeWorker, class Project>
void fused_forward_steps(const ChunkRecurrenceArgs<S, A>& a, const MakeWorker& make_worker, const Project& project) {
  if (a.B == 0 || a.H == 0 || a.n == 0) return;
  const int64_t H = a.H, B = a.B, blocks = (H + L - 1) / L;
  const int64_t group = a.x ? (kRows + B - 1) / B : 0;
  SpinBarrier barrier(slices_for(blocks));
  for_each_slice(blocks, [&](int64_t ub0, int64_t ub1, int64_t weight) {
    // Steps [i0, min(i0 + group, n)): their slots are consecutive, in either direction.
    const auto project_steps = [&](int64_t i0) {
      const int64_t i1 = std::min(a.n, i0 + group);
      const int64_t first = slot_of_step(a, a.s0 + i0), last = slot_of_step(a, a.s0 + i1 - 1);
      const int64_t lo = std::min(first, last), rows = (std::max(first, last) - lo + 1) * B;
      for (int64_t ub = ub0; ub < ub1; ++ub) {
        for_each_row_block<kRows>(rows, [&](int64_t row0, int64_t count) { project(ub, lo * B + row0, count); });
      }
    };
    if (group) project_steps(0);
    auto worker = make_worker();
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t s = a.s0 + i, slot = slot_of_step(a, s), t = slot + a.tlo;
      const int64_t prev = i == 0 ? -1 : slot_of_step(a, s - 1);
      const S* r_prev = prev < 0 ? a.r_init : a.r + prev * B * H;
      const A* c_prev = prev < 0 ? a.c_init : a.c + prev * B * H;
      if (!group && i + 1 < a.n) {  // a projection writes them just before they are read
        prefetch_units(a.gates + slot_of_step(a, s + 1) * B * 4 * H, B, 4 * H, 4, H, ub0 * L, std::min(H, ub1 * L));
      }
      worker.step(r_prev);
      // Unit block outermost: its panel stays in cache across the row blocks.
      for (int64_t ub = ub0; ub < ub1; ++ub) {
        for_each_row_block<kRows>(B, [&](int64_t row0, int64_t rows) {
          worker(ub, row0, rows, t, slot, r_prev, c_prev);
        });
      }
      const int64_t token = barrier.arrive(weight);
      if (group && (i + 1) % group == 0 && i + 1 < a.n) project_steps(i + 1);
      barrier.wait(token);
    }
  });
}

// Without a projection: a.gates holds x W_ih^T on entry.
template <int L, int kRows, class S, class A, class MakeWorker>
void fused_forward_steps(const ChunkRecurrenceArgs<S, A>& a, const MakeWorker& make_worker) {
  TORCH_CHECK(a.x == nullptr, "fastlstm: internal error: this fused forward does not compute the input projection");
  fused_forward_steps<L, kRows>(a, make_worker, [](int64_t, int64_t, int64_t) {});
}

// The worker of a kernel that keeps no per-thread state: rows(...) per tile.
template <class Rows>
struct StatelessWorker {
  const Rows& rows;
  void step(const void*) const {}
  template <class... Args>
  void operator()(Args... args) const { rows(args...); }
};

template <class Rows>
auto stateless(const Rows& rows) {
  return [&rows] { return StatelessWorker<Rows>{rows}; };
}

}  // namespace fastlstm::cpu::CPU_CAPABILITY
