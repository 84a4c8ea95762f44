// Cluster-resident LSTM forward and backward for bfloat16 / float16 (persistent kernel v2, issue
// 10; DESIGN.md section 11). The forward is described here, the backward at its kernel.
//
// One launch runs every step of a chunk. The batch is cut into slices of rows_per_cluster rows
// (a multiple of 8, the N of the tensor-core product), one slice per thread-block cluster; the
// clusters never wait for each other (no grid barrier, an ordinary cluster launch). Inside a
// cluster of C blocks, block `rank` owns hidden units [rank * hb, (rank + 1) * hb) with all four
// gates of each, and keeps those 4 * hb rows of W_hh on chip for the whole chunk: as tensor-core
// A fragments, each 16 x K tile owned by one warp (TileSplit), the first R of a warp's tiles in
// its registers and the rest in shared memory (packed: one 16-byte load per lane and fragment).
// The kernels are compiled for a few R; the plan takes the fewest registers that hold every tile,
// else the most that compile without spills. Per step:
//   1. tensor cores: pre[n][q * hb + u] = h_{t-1}[n, :] . W_hh[q * H + u0 + u, :] with
//      mma.m16n8k16 (A = W_hh rows, M = 4 gates x hb units; B = h_{t-1}, N = the slice's rows;
//      K = H, zero-padded to a multiple of 16, cut into ranges), fp32 partial sums staged in
//      shared memory;
//   2. the cell in fp32 registers on this thread's fixed (unit, row) elements: Gx + bias (loaded
//      during the previous step's barrier) + pre, c carried in registers from step to step;
//      gates, c, y (and r) written exactly as the persistent kernel writes them;
//   3. h_t (the carried state: h on live rows, h_{t-1} on padded ones, zero before a reset)
//      stored into the block's own buffer of the next step's parity, then copied from there into
//      every other block's over DSMEM (send_to_peers: 16-byte stores);
//   4. one cluster barrier, split: arrive, load the next step's Gx + bias, wait.
// Double-buffering h by step parity makes one barrier per step enough: a block writes a peer's
// buffer for step t + 1 only after the barrier that ends step t, which the peer reaches after its
// last read of that buffer (step t - 1's products and cell).
#include "lstm_cluster_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../fastlstm/cell_math.h"
#include "block_reduce.cuh"
#include "launch.cuh"
#include "mma.cuh"

namespace fastlstm::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16 bytes of padding per shared B-operand row (8 16-bit or 4 tf32 elements): the 8 rows of a
// fragment load land in distinct banks. (A operands are packed tiles, conflict-free as they are.)
__host__ __device__ constexpr int pad_elems(int elem_bytes) { return 16 / elem_bytes; }

__host__ __device__ constexpr int round_up(int n, int m) { return (n + m - 1) / m * m; }
__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// The kernel variants: R, the W tiles a warp holds in registers, and Cells, the (unit, row) cell
// elements a thread owns (fixed for the launch, so c and the next step's inputs live in registers;
// the plan keeps hb * rows_per_cluster <= Cells * kThreads). Registers are shared between the two:
// ptxas keeps these pairs within 255 registers without spills at sm_90. The plan takes the fewest
// registers that hold every tile of a warp, else the most; see TileSplit.
struct Variant {
  int register_tiles, cells;
};
constexpr Variant kVariants[] = {{0, 4}, {16, 4}, {32, 2}, {40, 1}};

// How a block's W operand, mtiles bands of 16 rows by ktiles k tiles, is split over its warps so
// that each tile has one owner for the whole launch: the bands are taken in groups of G, every
// group's K is cut into ksplit ranges, and the (group, range) items are dealt round-robin, item
// id = group + groups * range to warp id % kWarps. A warp walks its items in order, k tile after k
// tile, and at each k tile multiplies the B fragment it loads once by the group's G A tiles (its
// A tiles never move; each B fragment serves G bands). Its walk has G slots per k tile (a group
// at the bottom edge may leave some empty): the first R slots live in registers, the others in
// its region of shared memory, in walk order. The partial sums of the ksplit ranges are added in
// a fixed order by the cell (deterministic). ksplit is the smallest that deals the fewest slots
// to the busiest warp.
struct TileSplit {
  int G, mtiles, groups, ktiles, ksplit;
  __host__ __device__ TileSplit(int G_, int mtiles_, int ktiles_)
      : G(G_), mtiles(mtiles_), groups((mtiles_ + G_ - 1) / G_), ktiles(ktiles_), ksplit(1) {
    int best = most_slots();
    for (int s = 2; s <= kWarps && s <= ktiles; ++s) {
      const int keep = ksplit;
      ksplit = s;
      const int m = most_slots();
      if (m < best) {
        best = m;
      } else {
        ksplit = keep;
      }
    }
  }
  __host__ __device__ int k_begin(int range) const { return range * ktiles / ksplit; }
  __host__ __device__ int slots_of(int warp) const {
    int n = 0;
    for (int id = warp; id < groups * ksplit; id += kWarps) n += G * (k_begin(id / groups + 1) - k_begin(id / groups));
    return n;
  }
  __host__ __device__ int most_slots() const {
    int m = 0;
    for (int w = 0; w < kWarps; ++w) m = slots_of(w) > m ? slots_of(w) : m;
    return m;
  }
  // Slots per warp in shared memory when R are in registers (whole k tiles of G slots).
  __host__ __device__ int shared_slots(int R) const {
    const int in_registers = R / G * G;
    return most_slots() > in_registers ? most_slots() - in_registers : 0;
  }
};

// A warp's walk over its items: group `group` (bands [G * group, G * group + bands)), k range ks,
// k tile kt of it.
struct TileCursor {
  int id, group, bands, ks, kt, kend;
  __device__ TileCursor(const TileSplit& s, int warp) : id(warp) { enter(s); }
  __device__ void enter(const TileSplit& s) {
    group = id % s.groups;
    bands = s.mtiles - s.G * group < s.G ? s.mtiles - s.G * group : s.G;
    ks = id / s.groups;
    kt = s.k_begin(ks);
    kend = s.k_begin(ks + 1);
  }
  // To the next k tile; true where that ends an item (its partial sums are complete).
  __device__ bool next(const TileSplit& s) {
    if (++kt < kend) return false;
    id += kWarps;
    if (id < s.groups * s.ksplit) enter(s);
    return true;
  }
};

// Bands per item (TileSplit): the forward's 4 hb gate rows make several bands whose products
// share each h fragment; the backward's hb units are few bands (one up to 16 units), so its items
// stay single bands.
__host__ __device__ constexpr int bands_per_item(bool backward) { return backward ? 1 : 2; }

// One block's shared memory, from the plan's numbers (the host sizes it, the kernel carves it):
// the warps' W tiles beyond their register tiles, the B operand (h_{t-1} in the forward, dG_t in
// the backward), the products' partial sums, and in the backward the norm partials.
//   forward:  A = W_hh's rows of the block's units (M = 4 gates x hb, padded to 16), K = H;
//   backward: A = W_hh's columns of the block's units (M = hb, padded to 16), K = all 4H gate
//             columns, ordered unit-major, k = 4 j + q for gate q of unit j (a sum's order is
//             free): a thread's four gate gradients are then adjacent (one 8-byte store), and a
//             block's slice of a row is contiguous (send_to_peers).
// The B operand has one buffer per step parity (buffers = 2), or one buffer (1, where two do not
// fit) and a second split cluster barrier per step (see the kernels).
struct BlockLayout {
  int Mp, Kp, ldb, ldp;
  TileSplit split;
  size_t b_off, part_off, norm_off, bytes;
  __host__ __device__ BlockLayout(bool backward, int H, int hb, int Np, int eb, int R, int buffers)  // eb: bytes per element
      : Mp(round_up(backward ? hb : 4 * hb, 16)), Kp(round_up(backward ? 4 * H : H, 16)), ldb(Kp + pad_elems(eb)),
        ldp(Mp + 4), split(bands_per_item(backward), Mp / 16, Kp / (32 / eb)) {
    const size_t tile_bytes = size_t(eb) * 16 * (32 / eb);
    b_off = align16(tile_bytes * kWarps * split.shared_slots(R));
    part_off = b_off + align16(size_t(eb) * buffers * Np * ldb);
    norm_off = part_off + align16(sizeof(float) * split.ksplit * Np * ldp);
    bytes = norm_off + (backward ? align16(sizeof(float) * 2 * kWarps * 2) : 0);  // (parity, warp, h and c)
  }
};

// How scalar_t enters the tensor cores: bf16 and fp16 as they are, float32 as tf32 (the caller
// allows it: PyTorch's matmul precision setting). Elem<S>: the bits of one element in shared memory.
template <class S>
constexpr MmaInput kMmaInput = std::is_same_v<S, c10::BFloat16> ? MmaInput::BF16
                               : std::is_same_v<S, c10::Half>   ? MmaInput::F16
                                                                : MmaInput::TF32;
template <class S>
using TensorCoreOf = TensorCore<kMmaInput<S>>;
template <class S>
using Elem = typename TensorCoreOf<S>::Elem;

template <class S>
__device__ __forceinline__ Elem<S> encode(S v) {
  if constexpr (std::is_same_v<S, float>) {
    return to_tf32(v);
  } else {
    return v.x;
  }
}

// The warp's W tiles, gathered once from global memory: the slots of its first R / G k tiles in
// registers, the rest into its shared-memory region (one 16-byte fragment per lane). elem(row,
// col): the A operand's element as TC::Elem, zero where padded. Empty slots hold zeros, unread.
template <class TC, int G, int R, class F>
__device__ __forceinline__ void gather_tiles(const TileSplit& s, FragmentA (&regs)[R > 0 ? R : 1],
                                             FragmentA* shared, int slots, F elem) {
  constexpr int kSteps = R / G;
  const int steps = slots / G;
  TileCursor cur(s, static_cast<int>(threadIdx.x) / 32);
  auto tile = [&](int b) {
    if (b >= cur.bands) return FragmentA{};
    const int r0 = (cur.group * G + b) * 16, c0 = cur.kt * TC::kK;
    return TC::gather_a([&](int i, int c) { return elem(r0 + i, c0 + c); });
  };
#pragma unroll
  for (int r = 0; r < (R > 0 ? R : 1); ++r) regs[r] = FragmentA{};
#pragma unroll
  for (int st = 0; st < kSteps; ++st) {
    if (st < steps) {
#pragma unroll
      for (int b = 0; b < G; ++b) regs[st * G + b] = tile(b);
      cur.next(s);
    }
  }
  for (int st = kSteps; st < steps; ++st) {
    for (int b = 0; b < G; ++b) shared[((st - kSteps) * G + b) * 32 + threadIdx.x % 32] = tile(b);
    cur.next(s);
  }
}

// This warp's products A B for every batch tile: A its tiles (registers, then shared memory), B
// the (Np x Kp) operand rows in shared memory, each B fragment loaded once per k tile for the
// group's G bands. The partial sum of item (group, ks), band b and batch tile nt goes to
// part[ks][n][m], transposed (row-major in the batch row: the cell reads consecutive m). With
// G = 1, two accumulators (alternate k tiles) halve the chain of dependent mma instructions; with
// more, the bands' accumulators are the independent chains.
template <class TC, int G, int R>
__device__ __forceinline__ void warp_products(const TileSplit& s, const FragmentA (&regs)[R > 0 ? R : 1],
                                              const FragmentA* shared, int slots, const typename TC::Elem* b,
                                              int ldb, int ntiles, float* part, int Np, int ldp) {
  constexpr int kChains = G == 1 ? 2 : 1, kSteps = R / G;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int steps = slots / G;
  for (int nt = 0; nt < ntiles; ++nt) {
    const typename TC::Elem* b_tile = b + nt * 8 * ldb;
    TileCursor cur(s, warp);
    FragmentC acc[kChains * G] = {};
    // After the k tile's products: the item's partial sums out where it ends.
    auto advance = [&] {
      const int group = cur.group, bands = cur.bands, ks = cur.ks;
      if (!cur.next(s)) return;
      float* p = part + ks * Np * ldp;
      const int n = nt * 8 + 2 * (lane % 4);
#pragma unroll
      for (int band = 0; band < G; ++band) {
        if (band < bands) {
          float v[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[i] = acc[band].reg[i];
            if constexpr (kChains == 2) v[i] += acc[G + band].reg[i];
          }
          const int m = (group * G + band) * 16 + lane / 4;
          p[n * ldp + m] = v[0];
          p[(n + 1) * ldp + m] = v[1];
          p[n * ldp + m + 8] = v[2];
          p[(n + 1) * ldp + m + 8] = v[3];
        }
      }
#pragma unroll
      for (int i = 0; i < kChains * G; ++i) acc[i] = FragmentC{};
    };
    // One k tile: B once, the group's bands (warp-uniform guards: the warp stays converged).
    auto step = [&](int chain, auto a_of) {
      const FragmentB fb = TC::load_b(b_tile + cur.kt * TC::kK, ldb);
#pragma unroll
      for (int band = 0; band < G; ++band) {
        if (band < cur.bands) TC::multiply_add(acc[chain * G + band], a_of(band), fb);
      }
      advance();
    };
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
      if (st < steps) step(st % kChains, [&](int band) -> const FragmentA& { return regs[st * G + band]; });
    }
    for (int st = kSteps; st < steps; st += kChains) {
#pragma unroll
      for (int c = 0; c < kChains; ++c) {
        if (st + c < steps) {
          const FragmentA* at = shared + (st + c - kSteps) * G * 32;
          step(c, [&](int band) { return load_packed_a(at + band * 32); });
        }
      }
    }
  }
}

// Four elements (a unit's gates, adjacent in the layout) in 8-byte stores (dst 8-byte aligned).
template <class E>
__device__ __forceinline__ void store4(E* dst, const E (&v)[4]) {
  uint64_t* d = reinterpret_cast<uint64_t*>(dst);
  if constexpr (sizeof(E) == 2) {
    d[0] = uint64_t(v[0]) | uint64_t(v[1]) << 16 | uint64_t(v[2]) << 32 | uint64_t(v[3]) << 48;
  } else {
    d[0] = uint64_t(v[0]) | uint64_t(v[1]) << 32;
    d[1] = uint64_t(v[2]) | uint64_t(v[3]) << 32;
  }
}

// Sends rows x [col0, col0 + cols) of this block's row-major shared buffer (ld elements per row,
// rows 16-byte aligned) to the same place in every other block of the cluster: 16-byte pieces
// where the segment starts 16-byte aligned, single elements for the rest. One DSMEM store per
// 16 bytes instead of one per element (a unit's value, or its four gate gradients).
template <class E>
__device__ __forceinline__ void send_to_peers(const cg::cluster_group& cluster, E* buf, int rows, int ld, int col0,
                                              int cols) {
  struct alignas(16) Piece {
    uint32_t w[4];
  };
  constexpr int kPer = 16 / sizeof(E);
  const int C = static_cast<int>(cluster.num_blocks()), me = static_cast<int>(cluster.block_rank());
  const int pieces = col0 % kPer == 0 ? cols / kPer : 0, per_row = pieces + cols - pieces * kPer;
  const int per_peer = rows * per_row;
  for (int i = static_cast<int>(threadIdx.x); i < (C - 1) * per_peer; i += kThreads) {
    const int p = i / per_peer, n = (i - p * per_peer) / per_row, c = i - p * per_peer - n * per_row;
    const unsigned peer = static_cast<unsigned>(p + (p >= me));
    E* row = buf + n * ld + col0;
    if (c < pieces) {
      Piece* src = reinterpret_cast<Piece*>(row) + c;
      *cluster.map_shared_rank(src, peer) = *src;
    } else {
      E* src = row + pieces * kPer + (c - pieces);
      *cluster.map_shared_rank(src, peer) = *src;
    }
  }
}

// What a block of a cluster owns, units [u0, u0 + units) of every gate and batch rows
// [b0, b0 + rows), and this thread's fixed cell elements in it: element k is (row n[k], unit
// j[k]), consecutive threads on consecutive units (coalesced stores), mine[k] where it exists.
template <int Cells>
struct BlockElements {
  int u0, units, b0, rows;
  int n[Cells], j[Cells];
  bool mine[Cells];
  __device__ BlockElements(int C, int rank, int H, int B, int hb, int Np)
      : u0(rank * hb), units(std::max(0, std::min(hb, H - rank * hb))),
        b0(static_cast<int>(blockIdx.x) / C * Np), rows(std::max(0, std::min(Np, B - b0))) {
#pragma unroll
    for (int k = 0; k < Cells; ++k) {
      const int e = static_cast<int>(threadIdx.x) + k * kThreads, row = e / hb, u = e - row * hb;
      n[k] = row;
      j[k] = u0 + u;
      mine[k] = row < rows && u < units;
    }
  }
  // Element k's offset in a (B, H) tensor.
  __device__ int64_t offset(int k, int64_t H) const { return static_cast<int64_t>(b0 + n[k]) * H + j[k]; }
};

// Gx + bias of local step i for this thread's elements.
template <class scalar_t, class acc_t, int Cells>
__device__ __forceinline__ void load_inputs(const ChunkRecurrenceArgs<scalar_t, acc_t>& a, int64_t i,
                                            const BlockElements<Cells>& el, acc_t (&gx)[Cells][4]) {
  const int64_t s = a.s0 + i, t = a.reverse ? a.T - 1 - s : s;
  const int64_t H = a.H;
  const acc_t* g = a.gates + (t - a.tlo) * 4 * a.B * H;
#pragma unroll
  for (int k = 0; k < Cells; ++k) {
    if (!el.mine[k]) continue;
    const acc_t* row = g + static_cast<int64_t>(el.b0 + el.n[k]) * 4 * H;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      gx[k][q] = row[q * H + el.j[k]];
      if (a.bias) gx[k][q] += static_cast<acc_t>(a.bias[q * H + el.j[k]]);
    }
  }
}

template <class scalar_t, class acc_t, int R, int Cells>
__global__ void __launch_bounds__(kThreads, 1)
    cluster_forward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int Np, const int buffers) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the plan refuses such devices, so this is never launched
#else
  using TC = TensorCoreOf<scalar_t>;
  using E = Elem<scalar_t>;
  FASTLSTM_DYNAMIC_SMEM(smem);
  cg::cluster_group cluster = cg::this_cluster();
  // Sizes fit in 32 bits (checked at launch).
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B);
  const BlockLayout L(false, H, hb, Np, sizeof(E), R, buffers);
  E* hbuf = reinterpret_cast<E*>(smem + L.b_off);              // [buffer][row][k]: the slice's h_{t-1}
  float* part = reinterpret_cast<float*>(smem + L.part_off);   // [k range][row][q * hb + u]: h_{t-1} W_hh^T
  const int C = static_cast<int>(cluster.num_blocks());
  const BlockElements<Cells> el(C, static_cast<int>(cluster.block_rank()), H, B, hb, Np);
  const int u0 = el.u0, units = el.units, b0 = el.b0, rows = el.rows;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32;

  // Zero the h buffers: padded rows and columns enter the products as zeros.
  for (int i = tid; i < static_cast<int>((L.part_off - L.b_off) / 4); i += kThreads) {
    reinterpret_cast<uint32_t*>(smem + L.b_off)[i] = 0;
  }
  __syncthreads();
  // This warp's W tiles: A row q * hb + u is W_hh[q * H + u0 + u, :].
  constexpr int kBands = bands_per_item(false);
  const int slots = L.split.slots_of(warp);
  FragmentA* w_shared = reinterpret_cast<FragmentA*>(smem) + warp * L.split.shared_slots(R) * 32;
  FragmentA w_regs[R > 0 ? R : 1];
  gather_tiles<TC, kBands, R>(L.split, w_regs, w_shared, slots, [&](int row, int k) -> E {
    const int q = row / hb, u = row - q * hb;
    return q < 4 && u < units && k < H ? encode(a.w_hh[static_cast<int64_t>(q * H + u0 + u) * H + k]) : E(0);
  });
  for (int i = tid; i < rows * H; i += kThreads) {
    const int n = i / H, k = i - n * H;
    hbuf[n * L.ldb + k] = encode(a.r_init[static_cast<int64_t>(b0 + n) * H + k]);
  }
  // c and the carried h of this thread's cell elements stay in registers (h exact: the shared
  // copy may be rounded to tf32).
  acc_t c_reg[Cells], gx[Cells][4];
  scalar_t h_reg[Cells];
#pragma unroll
  for (int k = 0; k < Cells; ++k) {
    c_reg[k] = el.mine[k] ? a.c_init[el.offset(k, H)] : acc_t(0);
    h_reg[k] = el.mine[k] ? a.r_init[el.offset(k, H)] : scalar_t(0);
  }
  load_inputs(a, 0, el, gx);
  // Every block's buffers are zeroed before any peer writes into them.
  cluster.sync();

  const bool separate_state = a.r != a.y;
  const int64_t BH = static_cast<int64_t>(B) * H;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const E* hcur = hbuf + (i % buffers) * Np * L.ldb;
    E* hnext = hbuf + ((i + 1) % buffers) * Np * L.ldb;

    // 1. The gate pre-activations' recurrent part on the tensor cores.
    warp_products<TC, kBands, R>(L.split, w_regs, w_shared, slots, hcur, L.ldb, Np / 8, part, Np, L.ldp);
    __syncthreads();
    // One h buffer: the peers may overwrite it once every block has read it (waited for below).
    if (buffers == 1) cluster.barrier_arrive();

    // 2-3. The cell, and h_t to every block of the cluster.
    acc_t* gates = a.gates + slot * 4 * BH;
    scalar_t* y = a.y + slot * BH;
    scalar_t* state = a.r + slot * BH;
    acc_t* c_out = a.c + slot * BH;
#pragma unroll
    for (int k = 0; k < Cells; ++k) {
      if (!el.mine[k]) continue;
      const int n = el.n[k], j = el.j[k], u = j - u0, b = b0 + n;
      const int64_t e = static_cast<int64_t>(b) * H + j;
      acc_t* g = gates + static_cast<int64_t>(b) * 4 * H;
      if (!row_live(a.lengths, b, t)) {
        g[j] = g[H + j] = g[2 * H + j] = g[3 * H + j] = acc_t(0);
        c_out[e] = c_reg[k];
        y[e] = scalar_t(0);
        if (separate_state) state[e] = h_reg[k];
      } else {
        // The k ranges' partial sums, in a fixed order.
        acc_t pre[4] = {0, 0, 0, 0};
        for (int ks = 0; ks < L.split.ksplit; ++ks) {
          const float* p = part + (ks * Np + n) * L.ldp + u;
#pragma unroll
          for (int q = 0; q < 4; ++q) pre[q] += p[q * hb];
        }
        acc_t ai, af, ag, ao, c, h;
        const int64_t n_b = row_length(a.lengths, b, a.T);
        const acc_t c_in = state_zeroed_before(a.reset, B, b, t, n_b, a.reverse) ? acc_t(0) : c_reg[k];
        fastlstm::cell_forward<acc_t>(gx[k][0] + pre[0], gx[k][1] + pre[1], gx[k][2] + pre[2], gx[k][3] + pre[3],
                                      c_in, ai, af, ag, ao, c, h);
        g[j] = ai;
        g[H + j] = af;
        g[2 * H + j] = ag;
        g[3 * H + j] = ao;
        c_out[e] = c;
        c_reg[k] = c;
        const scalar_t hv = static_cast<scalar_t>(h);
        y[e] = hv;
        // A reset of the next step zeroes the state it reads (cell_math.h).
        const scalar_t hs = state_zeroed_after(a.reset, B, b, t, n_b, a.reverse) ? scalar_t(0) : hv;
        if (separate_state) state[e] = hs;
        h_reg[k] = hs;
      }
    }
    // h_t into this block's buffer of the next step, then from there to every peer's (with one
    // buffer, once every block has read its own).
#pragma unroll
    for (int k = 0; k < Cells; ++k) {
      if (el.mine[k]) hnext[el.n[k] * L.ldb + el.j[k]] = encode(h_reg[k]);
    }
    __syncthreads();
    if (buffers == 1) cluster.barrier_wait();
    send_to_peers(cluster, hnext, rows, L.ldb, u0, units);

    // 4. The step's barrier; the next step's inputs load while the other blocks arrive.
    cluster.barrier_arrive();
    if (i + 1 < a.n) load_inputs(a, i + 1, el, gx);
    cluster.barrier_wait();
  }
#endif
}

// What the cell backward of one element reads at one step: the saved activations, c_t, c_{t-1}
// and dL/dy_t.
template <class acc_t>
struct CellGradInputs {
  acc_t g[4], c, c_prev, dy;
};

template <class scalar_t, class acc_t, int Cells>
__device__ __forceinline__ void load_grad_inputs(const ChunkRecurrenceArgs<scalar_t, acc_t>& a, int64_t i,
                                                 const BlockElements<Cells>& el, CellGradInputs<acc_t> (&in)[Cells]) {
  const int64_t s = a.s0 + i, t = a.reverse ? a.T - 1 - s : s, slot = t - a.tlo;
  const int64_t H = a.H, BH = a.B * H;
  const acc_t* c_prev = i == 0 ? a.c_init : a.c + ((a.reverse ? a.T - s : s - 1) - a.tlo) * BH;
#pragma unroll
  for (int k = 0; k < Cells; ++k) {
    if (!el.mine[k]) continue;
    const int64_t e = el.offset(k, H);
    const acc_t* g = a.gates + slot * 4 * BH + static_cast<int64_t>(el.b0 + el.n[k]) * 4 * H + el.j[k];
#pragma unroll
    for (int q = 0; q < 4; ++q) in[k].g[q] = g[q * H];
    in[k].c = a.c[slot * BH + e];
    in[k].c_prev = c_prev[e];
    in[k].dy = a.dy ? static_cast<acc_t>(a.dy[t * BH + e]) : acc_t(0);
  }
}

// The backward of a chunk, steps in reverse processing order. Per step:
//   1. the cell backward of this thread's (unit, row) elements: dG_t from the raw carries (in
//      registers), written to dgates and over DSMEM into every block's dG buffer of the step's
//      parity; the gradient-norm partials per warp;
//   2. one cluster barrier, split: arrive, load the next step's saved activations, wait;
//   3. tensor cores: carry_h[n][u] += dG_t[n, :] . W_hh[:, u0 + u] (A = W_hh^T slice, B = dG_t),
//      partial sums over ksplit k ranges staged in shared memory, added in a fixed order.
// Same semantics as persistent_backward_kernel (cell_math.h): padded rows pass their carries
// through, truncation, resets and recurrent clipping act on the received carry, gate clipping on
// dG_t, the norms are those of dL/dh_t and dL/dc_t; the carries in and out are raw.
template <class scalar_t, class acc_t, int R, int Cells>
__global__ void __launch_bounds__(kThreads, 1)
    cluster_backward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int Np, const int buffers) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();
#else
  using TC = TensorCoreOf<scalar_t>;
  using E = Elem<scalar_t>;
  FASTLSTM_DYNAMIC_SMEM(smem);
  cg::cluster_group cluster = cg::this_cluster();
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B), G = 4 * H;
  const BlockLayout L(true, H, hb, Np, sizeof(E), R, buffers);
  E* dgbuf = reinterpret_cast<E*>(smem + L.b_off);                  // [buffer][row][4 j + q]: the slice's dG_t
  float* part = reinterpret_cast<float*>(smem + L.part_off);        // [k range][row][u]: dG_t W_hh[:, own]
  float* norm_warps = reinterpret_cast<float*>(smem + L.norm_off);  // [parity][warp][h, c]
  const int C = static_cast<int>(cluster.num_blocks());
  const BlockElements<Cells> el(C, static_cast<int>(cluster.block_rank()), H, B, hb, Np);
  const int u0 = el.u0, units = el.units, b0 = el.b0;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  // Zero the dG buffers: padded rows and gate columns enter the products as zeros.
  for (int i = tid; i < static_cast<int>((L.part_off - L.b_off) / 4); i += kThreads) {
    reinterpret_cast<uint32_t*>(smem + L.b_off)[i] = 0;
  }
  __syncthreads();
  // This warp's W tiles: A[u][4 j + q] = W_hh[q H + j, u0 + u].
  constexpr int kBands = bands_per_item(true);
  const int slots = L.split.slots_of(warp);
  FragmentA* w_shared = reinterpret_cast<FragmentA*>(smem) + warp * L.split.shared_slots(R) * 32;
  FragmentA w_regs[R > 0 ? R : 1];
  gather_tiles<TC, kBands, R>(L.split, w_regs, w_shared, slots, [&](int u, int k) -> E {
    const int j = k / 4, q = k - 4 * j;
    return u < units && k < G ? encode(a.w_hh[static_cast<int64_t>(q * H + j) * H + u0 + u]) : E(0);
  });
  acc_t carry_h[Cells], carry_c[Cells];
  CellGradInputs<acc_t> in[Cells];
#pragma unroll
  for (int k = 0; k < Cells; ++k) {
    carry_h[k] = el.mine[k] ? a.carry_h[el.offset(k, H)] : acc_t(0);
    carry_c[k] = el.mine[k] ? a.carry_c[el.offset(k, H)] : acc_t(0);
  }
  load_grad_inputs(a, a.n - 1, el, in);
  // Every block's buffers are zeroed before any peer writes into them.
  cluster.sync();

  const acc_t clip_rec = static_cast<acc_t>(a.opts.clip_recurrent);
  const acc_t clip_gates = static_cast<acc_t>(a.opts.clip_gates);
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int tiles = static_cast<int>(gridDim.x);
  for (int64_t i = a.n - 1; i >= 0; --i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const int parity = static_cast<int>(i % 2);
    E* dg_step = dgbuf + (i % buffers) * Np * L.ldb;

    // 1. The cell backward; dG_t to every block of the cluster.
    acc_t sum_h = 0, sum_c = 0;
    scalar_t* dgates = a.dgates + slot * 4 * BH;
    E sent[Cells][4];  // dG_t of gates i, f, g, o
#pragma unroll
    for (int k = 0; k < Cells; ++k) {
#pragma unroll
      for (int q = 0; q < 4; ++q) sent[k][q] = 0;
      if (!el.mine[k]) continue;
      const int n = el.n[k], j = el.j[k], b = b0 + n;
      scalar_t* dg = dgates + static_cast<int64_t>(b) * G + j;
      const int64_t n_b = row_length(a.lengths, b, a.T);
      if (t >= n_b) {  // padding: no gate gradient, the carries pass through untouched
#pragma unroll
        for (int q = 0; q < 4; ++q) dg[q * H] = scalar_t(0);
      } else {
        const int kind = carry_kind(step_of_time(t, n_b, a.reverse), n_b, a.opts.tbptt_chunk,
                                    state_zeroed_after(a.reset, B, b, t, n_b, a.reverse));
        const bool zero_in = state_zeroed_before(a.reset, B, b, t, n_b, a.reverse);
        const acc_t dh = receive_carry(carry_h[k], kind, clip_rec) + in[k].dy;
        const acc_t dc_in = receive_carry(carry_c[k], kind, clip_rec);
        acc_t d[4], dct, dcp;
        fastlstm::cell_backward<acc_t>(in[k].g[0], in[k].g[1], in[k].g[2], in[k].g[3], in[k].c,
                                       zero_in ? acc_t(0) : in[k].c_prev, dh, dc_in, d[0], d[1], d[2], d[3], dct,
                                       dcp);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const scalar_t v = static_cast<scalar_t>(clip_gate_grad(d[q], clip_gates));
          dg[q * H] = v;
          sent[k][q] = encode(v);
        }
        carry_c[k] = dcp;
        carry_h[k] = acc_t(0);  // what skips the step; dG_t W_hh is added in phase 3
        sum_h += dh * dh;
        sum_c += dct * dct;
      }
    }
    // dG_t into this block's buffer (8-byte stores: ldb and the buffer offsets are multiples of 16
    // bytes), then from there to every peer's (with one buffer, once the previous step's products
    // have read theirs).
#pragma unroll
    for (int k = 0; k < Cells; ++k) {
      if (el.mine[k]) store4(dg_step + el.n[k] * L.ldb + 4 * el.j[k], sent[k]);
    }
    __syncthreads();
    if (buffers == 1 && i != a.n - 1) cluster.barrier_wait();
    send_to_peers(cluster, dg_step, el.rows, L.ldb, 4 * u0, 4 * units);
    if (a.norm_partial) {
      sum_h = warp_sum(sum_h);
      sum_c = warp_sum(sum_c);
      if (lane == 0) {
        norm_warps[(parity * kWarps + warp) * 2] = static_cast<float>(sum_h);
        norm_warps[(parity * kWarps + warp) * 2 + 1] = static_cast<float>(sum_c);
      }
    }

    // 2. The step's barrier; the next step's inputs load while the other blocks arrive.
    cluster.barrier_arrive();
    if (i > 0) load_grad_inputs(a, i - 1, el, in);
    cluster.barrier_wait();
    if (a.norm_partial && tid == 0) {
      // One (h, c) pair per block and step, summed over its warps in a fixed order.
      acc_t h = 0, c = 0;
      for (int q = 0; q < kWarps; ++q) {
        h += norm_warps[(parity * kWarps + q) * 2];
        c += norm_warps[(parity * kWarps + q) * 2 + 1];
      }
      acc_t* np = a.norm_partial + t * 2 * tiles;
      np[blockIdx.x] = h;
      np[tiles + blockIdx.x] = c;
    }

    // 3. dG_t W_hh[:, own units] on the tensor cores.
    warp_products<TC, kBands, R>(L.split, w_regs, w_shared, slots, dg_step, L.ldb, Np / 8, part, Np, L.ldp);
    __syncthreads();
    // One dG buffer: the peers may overwrite it once every block has read it (waited for before
    // the next step's stores).
    if (buffers == 1) cluster.barrier_arrive();
    // part is rewritten after the next step's barrier, which every thread reaches after this read.
#pragma unroll
    for (int k = 0; k < Cells; ++k) {
      if (!el.mine[k]) continue;
      const int at = el.n[k] * L.ldp + (el.j[k] - u0);
      acc_t sum = 0;
      for (int ks = 0; ks < L.split.ksplit; ++ks) sum += part[ks * Np * L.ldp + at];
      carry_h[k] += sum;
    }
  }
  if (buffers == 1 && a.n > 0) cluster.barrier_wait();  // the last step's arrive
#pragma unroll
  for (int k = 0; k < Cells; ++k) {
    if (!el.mine[k]) continue;
    const int64_t e = el.offset(k, H);
    a.carry_h[e] = carry_h[k];
    a.carry_c[e] = carry_c[k];
  }
#endif
}

template <class scalar_t>
using KernelFn = void (*)(ChunkRecurrenceArgs<scalar_t, float>, int, int, int);

template <class scalar_t, size_t... V>
KernelFn<scalar_t> kernel_variant(bool backward, Variant v, std::index_sequence<V...>) {
  KernelFn<scalar_t> k = nullptr;
  auto pick = [&](auto forward, auto backward_kernel, Variant w) {
    if (w.register_tiles == v.register_tiles && w.cells == v.cells) k = backward ? backward_kernel : forward;
  };
  (pick(&cluster_forward_kernel<scalar_t, float, kVariants[V].register_tiles, kVariants[V].cells>,
        &cluster_backward_kernel<scalar_t, float, kVariants[V].register_tiles, kVariants[V].cells>, kVariants[V]),
   ...);
  return k;
}

template <class scalar_t>
KernelFn<scalar_t> kernel_for(bool backward, Variant v) {
  return kernel_variant<scalar_t>(backward, v, std::make_index_sequence<std::size(kVariants)>{});
}

cudaLaunchConfig_t cluster_config(int clusters, int C, size_t smem, cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(clusters * C));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// The attributes are ceilings: raised once per (kernel, device) to the device's limits. A device
// that refuses non-portable cluster sizes is left at 8 (its occupancy query for 16 answers 0).
template <class Kernel>
void set_attributes(Kernel kernel, int device) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  if (done.count({key, device})) return;
  const int limit = static_cast<int>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();
  }
  done.insert({key, device});
}

template <class Kernel>
int resident_clusters(Kernel kernel, int C, size_t smem) {
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = cluster_config(1, C, smem, nullptr, attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// One block's shared memory for a (direction, shape).
template <class scalar_t>
BlockLayout layout_of(bool backward, int64_t H, int hb, int rows, int R, int buffers = 2) {
  return BlockLayout(backward, static_cast<int>(H), hb, rows, sizeof(Elem<scalar_t>), R, buffers);
}

// FASTLSTM_CLUSTER_REGISTER_TILES caps the W tiles a warp holds in registers (a lower variant, for
// tests and diagnosis, as ATEN_CPU_CAPABILITY lowers the CPU kernels); unset: no cap.
int register_tile_cap() {
  const char* value = std::getenv("FASTLSTM_CLUSTER_REGISTER_TILES");
  if (value == nullptr || *value == '\0') return std::numeric_limits<int>::max();
  char* end = nullptr;
  const long cap = std::strtol(value, &end, 10);
  TORCH_CHECK(*end == '\0' && cap >= 0, "fastlstm: FASTLSTM_CLUSTER_REGISTER_TILES must be a non-negative integer, got '",
              value, "'");
  return static_cast<int>(std::min<long>(cap, std::numeric_limits<int>::max()));
}

// Whether a variant compiled without local memory (register spills would put W tiles there).
template <class scalar_t>
bool spill_free(bool backward, Variant v) {
  cudaFuncAttributes attr = {};
  if (cudaFuncGetAttributes(&attr, kernel_for<scalar_t>(backward, v)) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.localSizeBytes == 0;
}

// The variants worth trying, in order, for a layer whose busiest warp owns `most` W tiles and whose
// blocks own hb units: those that hold every tile from the fewest registers up, then the others
// from the most registers down; without spills, within the cap, with cells for 8 batch rows.
template <class scalar_t>
std::vector<Variant> variants_to_try(bool backward, int most, int hb, int cap) {
  std::vector<Variant> all, order;
  for (const Variant v : kVariants) {
    if (v.register_tiles <= cap && v.cells * kThreads / hb >= 8 && spill_free<scalar_t>(backward, v)) all.push_back(v);
  }
  for (const Variant v : all) {
    if (v.register_tiles >= most) order.push_back(v);
  }
  for (auto v = all.rbegin(); v != all.rend(); ++v) {
    if (v->register_tiles < most) order.push_back(*v);
  }
  return order;
}

std::string where_w_lives(const char* what, int R, int most) {
  if (R == 0) return std::string(what) + " in shared memory";
  if (R >= most) return std::string(what) + " in registers (" + std::to_string(most) + " tiles per warp)";
  return std::string(what) + " in registers (" + std::to_string(R) + " tiles per warp) and shared memory (" +
         std::to_string(most - R) + ")";
}

template <class scalar_t>
ClusterPlan plan_for(int64_t H, int64_t B, int device, bool backward, int cap) {
  ClusterPlan p;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (prop->major < 9 || !prop->clusterLaunch) {
    p.reason = "thread-block clusters need compute capability 9.0 (Hopper) or newer";
    return p;
  }
  if (4 * H * std::max<int64_t>(B, 1) >= (int64_t(1) << 31)) {
    p.reason = "the cluster kernel needs batch * 4 * hidden_size < 2^31";
    return p;
  }
  const size_t smem_max = prop->sharedMemPerBlockOptin, reserve = 1024;
  const char* what = backward ? "W_hh's columns and a step of gate gradients do not fit" : "W_hh does not fit";
  const char* w_name = backward ? "W_hh's columns" : "W_hh";
  for (const int C : {16, 8}) {
    const int hb = static_cast<int>((H + C - 1) / C);
    const int most = layout_of<scalar_t>(backward, H, hb, 8, 0).split.most_slots();
    const std::vector<Variant> order = variants_to_try<scalar_t>(backward, most, hb, cap);
    if (order.empty()) {
      p.reason = "hidden_size " + std::to_string(H) + " is too large for the cluster kernel: " + std::to_string(hb) +
                 " units per block of a " + std::to_string(C) + "-block cluster, at most " +
                 std::to_string(kVariants[0].cells * kThreads / 8);
      continue;
    }
    // The first variant whose shared memory fits 8 batch rows, with two exchange buffers or one.
    const Variant* chosen = nullptr;
    int buffers = 0;
    for (const Variant& v : order) {
      for (const int b : {2, 1}) {
        if (chosen == nullptr && layout_of<scalar_t>(backward, H, hb, 8, v.register_tiles, b).bytes + reserve <= smem_max) {
          chosen = &v;
          buffers = b;
        }
      }
      if (chosen != nullptr) break;
    }
    if (chosen == nullptr) {
      const Variant most_registers = *std::max_element(order.begin(), order.end(), [](Variant x, Variant y) {
        return x.register_tiles < y.register_tiles;
      });
      const int R = std::min(most_registers.register_tiles, most);
      p.reason = std::string(what) + " on chip: a block of a " + std::to_string(C) + "-block cluster needs " +
                 std::to_string(layout_of<scalar_t>(backward, H, hb, 8, R, 1).bytes / 1024) +
                 " KiB of shared memory for " + std::to_string(hb) + " hidden units with " + std::to_string(R) +
                 " of each warp's " + std::to_string(most) + " W tiles in registers, the device allows " +
                 std::to_string(smem_max / 1024) + " KiB";
      continue;
    }
    const Variant v = *chosen;
    const int R = v.register_tiles;
    const KernelFn<scalar_t> kernel = kernel_for<scalar_t>(backward, v);
    set_attributes(kernel, device);
    auto bytes = [&](int r) { return layout_of<scalar_t>(backward, H, hb, r, R, buffers).bytes; };
    const int resident = resident_clusters(kernel, C, bytes(8));
    if (resident == 0) {
      if (p.reason.empty()) p.reason = "the device cannot schedule a cluster of " + std::to_string(C) + " blocks";
      continue;
    }
    const int rows_max = v.cells * kThreads / hb / 8 * 8;  // cell elements per thread are bounded
    // The batch is spread over the clusters that can run at once; beyond that, larger slices.
    const int64_t tiles = (B + 7) / 8;
    int rows = static_cast<int>(8 * ((tiles + resident - 1) / resident));
    rows = std::min(rows, rows_max);
    // Larger slices need more shared memory: at least one such cluster must still fit an SM.
    while (rows > 8 && (bytes(rows) + reserve > smem_max || resident_clusters(kernel, C, bytes(rows)) == 0)) rows -= 8;
    p.ok = true;
    p.cluster = C;
    p.units_per_block = hb;
    p.rows_per_cluster = rows;
    p.clusters = static_cast<int>((B + rows - 1) / rows);
    p.threads = kThreads;
    p.register_tiles = R;
    p.cells_per_thread = v.cells;
    p.exchange_buffers = buffers;
    p.smem_bytes = bytes(rows);
    const std::string mma = std::string(kMmaInput<scalar_t> == MmaInput::TF32 ? "mma m16n8k8 tf32" : "mma m16n8k16") +
                            ", K in " + std::to_string(layout_of<scalar_t>(backward, H, hb, rows, R).split.ksplit) +
                            " ranges";
    const std::string exchange = std::string(backward ? "dG_t" : "h_t") + " over DSMEM" +
                                 (buffers == 1 ? " into one buffer, two cluster barriers per step"
                                               : ", one cluster barrier per step");
    const std::string shape = std::to_string(p.clusters) + " clusters x " + std::to_string(C) + " blocks x " +
                              std::to_string(hb) + " hidden units, " + std::to_string(rows) +
                              " batch rows per cluster; " + where_w_lives(w_name, R, most);
    p.reason = (backward ? "cluster backward: " + shape + ", dG_t W_hh on tensor cores ("
                         : "cluster: " + shape + ", gates on tensor cores (") +
               mma + "), " + exchange + ", no grid barrier";
    return p;
  }
  return p;
}

ClusterPlan computed_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward, int cap) {
  if (dtype == c10::kBFloat16) return plan_for<c10::BFloat16>(H, B, device, backward, cap);
  if (dtype == c10::kHalf) return plan_for<c10::Half>(H, B, device, backward, cap);
  if (dtype == c10::kFloat) return plan_for<float>(H, B, device, backward, cap);
  ClusterPlan p;
  p.reason = std::string("the cluster kernel runs bfloat16, float16 and float32 (as tf32) only (tensor cores), got ") +
             c10::toString(dtype);
  return p;
}

// Plans are computed once per key: a long sequence's chunks each launch and ask again.
const ClusterPlan& cached_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward) {
  // Keyed by the device limits and the register-tile cap too, which the CPU harness's tests change.
  using Key = std::tuple<int, int64_t, int64_t, c10::ScalarType, size_t, int, bool, int>;
  static std::mutex mutex;
  static std::map<Key, ClusterPlan> plans;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const int cap = register_tile_cap();
  const Key key{device, H, B, dtype, prop->sharedMemPerBlockOptin, prop->multiProcessorCount, backward, cap};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (auto it = plans.find(key); it != plans.end()) return it->second;
  }
  ClusterPlan p = computed_plan(H, B, dtype, device, backward, cap);
  const std::lock_guard<std::mutex> lock(mutex);
  return plans.emplace(key, std::move(p)).first->second;
}

template <class scalar_t, class acc_t>
void launch(const ChunkRecurrenceArgs<scalar_t, acc_t>& a, bool backward) {
  if (a.B == 0 || a.H == 0 || a.n == 0) return;
  const int device = c10::cuda::current_device();
  const ClusterPlan& plan = cached_plan(a.H, a.B, c10::CppTypeToScalarType<scalar_t>::value, device, backward);
  TORCH_CHECK(plan.ok, "fastlstm: the cluster kernel cannot run this layer", backward ? "'s backward: " : ": ",
              plan.reason);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config =
      cluster_config(plan.clusters, plan.cluster, plan.smem_bytes, at::cuda::getCurrentCUDAStream(), attr);
  const Variant v{plan.register_tiles, plan.cells_per_thread};
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_for<scalar_t>(backward, v), a, plan.units_per_block,
                                    plan.rows_per_cluster, plan.exchange_buffers));
}

}  // namespace

ClusterPlan cluster_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward) {
  return cached_plan(H, B, dtype, device, backward);
}

template <class scalar_t, class acc_t>
void cluster_forward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a) {
  launch(a, false);
}

template <class scalar_t, class acc_t>
void cluster_backward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a) {
  launch(a, true);
}

#define FASTLSTM_INSTANTIATE(S)                                                        \
  template void cluster_forward<S, float>(const ChunkRecurrenceArgs<S, float>&);      \
  template void cluster_backward<S, float>(const ChunkRecurrenceArgs<S, float>&);
FASTLSTM_INSTANTIATE(c10::Half)
FASTLSTM_INSTANTIATE(c10::BFloat16)
FASTLSTM_INSTANTIATE(float)
#undef FASTLSTM_INSTANTIATE

}  // namespace fastlstm::cuda
