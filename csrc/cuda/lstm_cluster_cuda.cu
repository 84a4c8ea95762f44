// Cluster-resident LSTM forward and backward for bfloat16 / float16 (persistent kernel v2, issue
// 10; DESIGN.md section 11). The forward is described here, the backward at its kernel.
//
// One launch runs every step of a chunk. The batch is cut into slices of rows_per_cluster rows
// (a multiple of 8, the N of the tensor-core product), one slice per thread-block cluster; the
// clusters never wait for each other (no grid barrier, an ordinary cluster launch). Inside a
// cluster of C blocks, block `rank` owns hidden units [rank * hb, (rank + 1) * hb) with all four
// gates of each, and keeps those 4 * hb rows of W_hh in shared memory for the whole chunk (this
// first version keeps W_hh in shared memory, not in registers; as packed A tiles, one 16-byte
// load per lane and fragment). Per step:
//   1. tensor cores: pre[n][q * hb + u] = h_{t-1}[n, :] . W_hh[q * H + u0 + u, :] with
//      mma.m16n8k16 (A = W_hh rows, M = 4 gates x hb units; B = h_{t-1}, N = the slice's rows;
//      K = H, zero-padded to a multiple of 16), fp32 accumulators staged in shared memory;
//   2. the cell in fp32 registers on this thread's fixed (unit, row) elements: Gx + bias (loaded
//      during the previous step's barrier) + pre, c carried in registers from step to step;
//      gates, c, y (and r) written exactly as the persistent kernel writes them;
//   3. h_t (the carried state: h on live rows, h_{t-1} on padded ones, zero before a reset)
//      stored into every block's shared memory over DSMEM, into the buffer of the next step's parity;
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
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../fastlstm/cell_math.h"
#include "block_reduce.cuh"
#include "launch.cuh"
#include "mma.cuh"

namespace fastlstm::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// (unit, row) cell elements per thread: fixed for the launch, so c and the next step's inputs
// live in registers. The plan keeps hb * rows_per_cluster <= kElems * kThreads.
constexpr int kElems = 4;
// 16 bytes of padding per shared B-operand row (8 16-bit or 4 tf32 elements): the 8 rows of a
// fragment load land in distinct banks. (A operands are packed tiles, conflict-free as they are.)
__host__ __device__ constexpr int pad_elems(int elem_bytes) { return 16 / elem_bytes; }

__host__ __device__ constexpr int round_up(int n, int m) { return (n + m - 1) / m * m; }
__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// One forward block's shared memory, from the plan's numbers (the host sizes it, the kernel carves it).
struct ForwardLayout {
  int Kp, Mp, ldh, ldp;
  size_t h_off, pre_off, bytes;
  __host__ __device__ ForwardLayout(int H, int hb, int Np, int eb)  // eb: bytes per tensor-core element
      : Kp(round_up(H, 16)), Mp(round_up(4 * hb, 16)), ldh(Kp + pad_elems(eb)), ldp(Mp + 4) {
    h_off = align16(size_t(eb) * Mp * Kp);                       // W slice (Mp, Kp), packed tiles
    pre_off = h_off + align16(size_t(eb) * 2 * Np * ldh);        // h (2, Np, ldh)
    bytes = pre_off + align16(sizeof(float) * Np * ldp);               // products (Np, ldp)
  }
};

// One backward block's shared memory. The block owns units [u0, u0 + hb) and computes their
// carry dL/dh_{t-1} = dG_t W_hh[:, own units]: M = the units (padded to 16), N = the slice's rows,
// K = all 4H gate columns (padded to 16), so it keeps W_hh's columns of its units and receives
// every block's dG_t. K is ordered unit-major, k = 4 j + q for gate q of unit j (a sum's order
// is free): a thread's four gate gradients are then adjacent, one 8-byte DSMEM store per peer.
// The K loop is split over ksplit warps when the M x N tiles are fewer than the warps; their
// partial sums are added in a fixed order (deterministic).
struct BackwardLayout {
  int Mp, Kp, ldg, ldp, ksplit;
  size_t g_off, part_off, norm_off, bytes;
  __host__ __device__ BackwardLayout(int H, int hb, int Np, int eb)
      : Mp(round_up(hb, 16)), Kp(round_up(4 * H, 16)), ldg(Kp + pad_elems(eb)), ldp(Mp + 4) {
    const int tiles = Mp / 16 * (Np / 8), ktiles = Kp / 16;
    ksplit = kWarps / tiles < 1 ? 1 : (kWarps / tiles < ktiles ? kWarps / tiles : ktiles);
    g_off = align16(size_t(eb) * Mp * Kp);                            // W^T slice (Mp, Kp), packed tiles
    part_off = g_off + align16(size_t(eb) * 2 * Np * ldg);            // dG (2, Np, ldg)
    norm_off = part_off + align16(sizeof(float) * ksplit * Np * ldp);       // products (ksplit, Np, ldp)
    bytes = norm_off + align16(sizeof(float) * 2 * kWarps * 2);             // norm partials (2, warps, 2)
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

// Where element (row, col) of a tensor-core A operand of `ktiles` k tiles per 16-row band goes:
// tile (row / 16, col / kK), packed (mma.cuh).
template <class TC>
__device__ __forceinline__ int packed_a_offset(int row, int col, int ktiles) {
  return ((row / 16) * ktiles + col / TC::kK) * TC::kTileElems + TC::packed_a_index(row % 16, col % TC::kK);
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

// What a block of a cluster owns, units [u0, u0 + units) of every gate and batch rows
// [b0, b0 + rows), and this thread's fixed cell elements in it: element k is (row n[k], unit
// j[k]), consecutive threads on consecutive units (coalesced stores), mine[k] where it exists.
struct BlockElements {
  int u0, units, b0, rows;
  int n[kElems], j[kElems];
  bool mine[kElems];
  __device__ BlockElements(int C, int rank, int H, int B, int hb, int Np)
      : u0(rank * hb), units(std::max(0, std::min(hb, H - rank * hb))),
        b0(static_cast<int>(blockIdx.x) / C * Np), rows(std::max(0, std::min(Np, B - b0))) {
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
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
template <class scalar_t, class acc_t>
__device__ __forceinline__ void load_inputs(const ChunkRecurrenceArgs<scalar_t, acc_t>& a, int64_t i,
                                            const BlockElements& el, acc_t (&gx)[kElems][4]) {
  const int64_t s = a.s0 + i, t = a.reverse ? a.T - 1 - s : s;
  const int64_t H = a.H;
  const acc_t* g = a.gates + (t - a.tlo) * 4 * a.B * H;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    if (!el.mine[k]) continue;
    const acc_t* row = g + static_cast<int64_t>(el.b0 + el.n[k]) * 4 * H;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      gx[k][q] = row[q * H + el.j[k]];
      if (a.bias) gx[k][q] += static_cast<acc_t>(a.bias[q * H + el.j[k]]);
    }
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    cluster_forward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int Np) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the plan refuses such devices, so this is never launched
#else
  using TC = TensorCoreOf<scalar_t>;
  using E = Elem<scalar_t>;
  FASTLSTM_DYNAMIC_SMEM(smem);
  cg::cluster_group cluster = cg::this_cluster();
  // Sizes fit in 32 bits (checked at launch).
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B);
  const ForwardLayout L(H, hb, Np, sizeof(E));
  E* w = reinterpret_cast<E*>(smem);                 // A rows q * hb + u = W_hh[q * H + u0 + u, :], packed
  E* hbuf = reinterpret_cast<E*>(smem + L.h_off);    // [parity][row][k]: the slice's h_{t-1}
  float* pre = reinterpret_cast<float*>(smem + L.pre_off);         // [row][q * hb + u]: h_{t-1} W_hh^T
  const int C = static_cast<int>(cluster.num_blocks());
  const BlockElements el(C, static_cast<int>(cluster.block_rank()), H, B, hb, Np);
  const int u0 = el.u0, units = el.units, b0 = el.b0, rows = el.rows;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  // Zero W and both h buffers: padded rows and columns enter the products as zeros.
  for (int i = tid; i < static_cast<int>(L.pre_off / 4); i += kThreads) reinterpret_cast<uint32_t*>(smem)[i] = 0;
  __syncthreads();
  for (int i = tid; i < 4 * units * H; i += kThreads) {
    const int row = i / H, k = i - row * H, q = row / units, u = row - q * units;
    w[packed_a_offset<TC>(q * hb + u, k, L.Kp / TC::kK)] = encode(a.w_hh[static_cast<int64_t>(q * H + u0 + u) * H + k]);
  }
  for (int i = tid; i < rows * H; i += kThreads) {
    const int n = i / H, k = i - n * H;
    hbuf[n * L.ldh + k] = encode(a.r_init[static_cast<int64_t>(b0 + n) * H + k]);
  }
  // c and the carried h of this thread's cell elements stay in registers (h exact: the shared
  // copy may be rounded to tf32).
  acc_t c_reg[kElems], gx[kElems][4];
  scalar_t h_reg[kElems];
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    c_reg[k] = el.mine[k] ? a.c_init[el.offset(k, H)] : acc_t(0);
    h_reg[k] = el.mine[k] ? a.r_init[el.offset(k, H)] : scalar_t(0);
  }
  load_inputs(a, 0, el, gx);
  // Every block's buffers are zeroed before any peer writes into them.
  cluster.sync();

  const bool separate_state = a.r != a.y;
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int mtiles = L.Mp / 16, ntiles = Np / 8, ktiles = L.Kp / TC::kK;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const E* hcur = hbuf + (i % 2) * Np * L.ldh;
    E* hnext = hbuf + ((i + 1) % 2) * Np * L.ldh;

    // 1. The gate pre-activations' recurrent part on the tensor cores, a warp per 16x8 tile.
    // Two accumulators (even and odd k tiles) halve the chain of dependent mma instructions.
    for (int item = warp; item < mtiles * ntiles; item += kWarps) {
      const int mt = item % mtiles, nt = item / mtiles;
      const E* w_band = w + mt * ktiles * TC::kTileElems;  // packed tiles (mt, 0..ktiles)
      const E* h_tile = hcur + nt * 8 * L.ldh;
      FragmentC even = {}, odd = {};
#pragma unroll 2
      for (int kt = 0; kt < ktiles; kt += 2) {
        TC::multiply_add(even, w_band + kt * TC::kTileElems, h_tile + kt * TC::kK, L.ldh);
        if (kt + 1 < ktiles) {  // warp-uniform: the warp stays converged for the mma
          TC::multiply_add(odd, w_band + (kt + 1) * TC::kTileElems, h_tile + (kt + 1) * TC::kK, L.ldh);
        }
      }
      // Stored transposed (row-major in the batch row) so the cell reads consecutive units.
      const int m = mt * 16 + lane / 4, n = nt * 8 + 2 * (lane % 4);
      pre[n * L.ldp + m] = even.reg[0] + odd.reg[0];
      pre[(n + 1) * L.ldp + m] = even.reg[1] + odd.reg[1];
      pre[n * L.ldp + m + 8] = even.reg[2] + odd.reg[2];
      pre[(n + 1) * L.ldp + m + 8] = even.reg[3] + odd.reg[3];
    }
    __syncthreads();

    // 2-3. The cell, and h_t to every block of the cluster.
    acc_t* gates = a.gates + slot * 4 * BH;
    scalar_t* y = a.y + slot * BH;
    scalar_t* state = a.r + slot * BH;
    acc_t* c_out = a.c + slot * BH;
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
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
        const float* p = pre + n * L.ldp + u;
        acc_t ai, af, ag, ao, c, h;
        const int64_t n_b = row_length(a.lengths, b, a.T);
        const acc_t c_in = state_zeroed_before(a.reset, B, b, t, n_b, a.reverse) ? acc_t(0) : c_reg[k];
        fastlstm::cell_forward<acc_t>(gx[k][0] + p[0], gx[k][1] + p[hb], gx[k][2] + p[2 * hb], gx[k][3] + p[3 * hb],
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
      const E carried = encode(h_reg[k]);
      for (int r = 0; r < C; ++r) cluster.map_shared_rank(hnext, r)[n * L.ldh + j] = carried;
    }

    // 4. The step's only barrier; the next step's inputs load while the other blocks arrive.
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

template <class scalar_t, class acc_t>
__device__ __forceinline__ void load_grad_inputs(const ChunkRecurrenceArgs<scalar_t, acc_t>& a, int64_t i,
                                                 const BlockElements& el, CellGradInputs<acc_t> (&in)[kElems]) {
  const int64_t s = a.s0 + i, t = a.reverse ? a.T - 1 - s : s, slot = t - a.tlo;
  const int64_t H = a.H, BH = a.B * H;
  const acc_t* c_prev = i == 0 ? a.c_init : a.c + ((a.reverse ? a.T - s : s - 1) - a.tlo) * BH;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
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
template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    cluster_backward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int Np) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();
#else
  using TC = TensorCoreOf<scalar_t>;
  using E = Elem<scalar_t>;
  FASTLSTM_DYNAMIC_SMEM(smem);
  cg::cluster_group cluster = cg::this_cluster();
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B), G = 4 * H;
  const BackwardLayout L(H, hb, Np, sizeof(E));
  E* w = reinterpret_cast<E*>(smem);                                // A[u][4 j + q] = W_hh[q H + j, u0 + u], packed
  E* dgbuf = reinterpret_cast<E*>(smem + L.g_off);                  // [parity][row][4 j + q]: the slice's dG_t
  float* part = reinterpret_cast<float*>(smem + L.part_off);        // [k range][row][u]: dG_t W_hh[:, own]
  float* norm_warps = reinterpret_cast<float*>(smem + L.norm_off);  // [parity][warp][h, c]
  const int C = static_cast<int>(cluster.num_blocks());
  const BlockElements el(C, static_cast<int>(cluster.block_rank()), H, B, hb, Np);
  const int u0 = el.u0, units = el.units, b0 = el.b0;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  // Zero W and both dG buffers: padded units, rows and gate columns enter the products as zeros.
  for (int i = tid; i < static_cast<int>(L.part_off / 4); i += kThreads) reinterpret_cast<uint32_t*>(smem)[i] = 0;
  __syncthreads();
  // Neighbouring threads read neighbouring columns of one W_hh row (coalesced).
  for (int i = tid; i < units * G; i += kThreads) {
    const int m = i / units, u = i - m * units, q = m / H, j = m - q * H;
    w[packed_a_offset<TC>(u, 4 * j + q, L.Kp / TC::kK)] = encode(a.w_hh[static_cast<int64_t>(m) * H + u0 + u]);
  }
  acc_t carry_h[kElems], carry_c[kElems];
  CellGradInputs<acc_t> in[kElems];
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    carry_h[k] = el.mine[k] ? a.carry_h[el.offset(k, H)] : acc_t(0);
    carry_c[k] = el.mine[k] ? a.carry_c[el.offset(k, H)] : acc_t(0);
  }
  load_grad_inputs(a, a.n - 1, el, in);
  // Every block's buffers are zeroed before any peer writes into them.
  cluster.sync();

  const acc_t clip_rec = static_cast<acc_t>(a.opts.clip_recurrent);
  const acc_t clip_gates = static_cast<acc_t>(a.opts.clip_gates);
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int mtiles = L.Mp / 16, ntiles = Np / 8, ktiles = L.Kp / TC::kK;
  const int tiles = static_cast<int>(gridDim.x);
  for (int64_t i = a.n - 1; i >= 0; --i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const int parity = static_cast<int>(i % 2);
    E* dg_step = dgbuf + parity * Np * L.ldg;

    // 1. The cell backward; dG_t to every block of the cluster.
    acc_t sum_h = 0, sum_c = 0;
    scalar_t* dgates = a.dgates + slot * 4 * BH;
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      if (!el.mine[k]) continue;
      const int n = el.n[k], j = el.j[k], b = b0 + n;
      scalar_t* dg = dgates + static_cast<int64_t>(b) * G + j;
      const int64_t n_b = row_length(a.lengths, b, a.T);
      E sent[4] = {0, 0, 0, 0};  // dG_t of gates i, f, g, o
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
          sent[q] = encode(v);
        }
        carry_c[k] = dcp;
        carry_h[k] = acc_t(0);  // what skips the step; dG_t W_hh is added in phase 3
        sum_h += dh * dh;
        sum_c += dct * dct;
      }
      // Aligned: ldg and the buffer offsets are multiples of 16 bytes.
      for (int r = 0; r < C; ++r) store4(cluster.map_shared_rank(dg_step, r) + n * L.ldg + 4 * j, sent);
    }
    if (a.norm_partial) {
      sum_h = warp_sum(sum_h);
      sum_c = warp_sum(sum_c);
      if (lane == 0) {
        norm_warps[(parity * kWarps + warp) * 2] = static_cast<float>(sum_h);
        norm_warps[(parity * kWarps + warp) * 2 + 1] = static_cast<float>(sum_c);
      }
    }

    // 2. The step's only barrier; the next step's inputs load while the other blocks arrive.
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

    // 3. dG_t W_hh[:, own units] on the tensor cores, a warp per (16 x 8 tile, k range).
    for (int item = warp; item < mtiles * ntiles * L.ksplit; item += kWarps) {
      const int mt = item % mtiles, nt = item / mtiles % ntiles, ks = item / (mtiles * ntiles);
      const int k0 = ks * ktiles / L.ksplit, k1 = (ks + 1) * ktiles / L.ksplit;
      const E* w_band = w + mt * ktiles * TC::kTileElems;
      const E* g_tile = dg_step + nt * 8 * L.ldg;
      FragmentC even = {}, odd = {};
#pragma unroll 2
      for (int kt = k0; kt < k1; kt += 2) {
        TC::multiply_add(even, w_band + kt * TC::kTileElems, g_tile + kt * TC::kK, L.ldg);
        if (kt + 1 < k1) {  // warp-uniform
          TC::multiply_add(odd, w_band + (kt + 1) * TC::kTileElems, g_tile + (kt + 1) * TC::kK, L.ldg);
        }
      }
      float* p = part + ks * Np * L.ldp;
      const int m = mt * 16 + lane / 4, n = nt * 8 + 2 * (lane % 4);
      p[n * L.ldp + m] = even.reg[0] + odd.reg[0];
      p[(n + 1) * L.ldp + m] = even.reg[1] + odd.reg[1];
      p[n * L.ldp + m + 8] = even.reg[2] + odd.reg[2];
      p[(n + 1) * L.ldp + m + 8] = even.reg[3] + odd.reg[3];
    }
    __syncthreads();
    // part is rewritten after the next step's barrier, which every thread reaches after this read.
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      if (!el.mine[k]) continue;
      const int at = el.n[k] * L.ldp + (el.j[k] - u0);
      acc_t sum = 0;
      for (int ks = 0; ks < L.ksplit; ++ks) sum += part[ks * Np * L.ldp + at];
      carry_h[k] += sum;
    }
  }
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    if (!el.mine[k]) continue;
    const int64_t e = el.offset(k, H);
    a.carry_h[e] = carry_h[k];
    a.carry_c[e] = carry_c[k];
  }
#endif
}

template <class scalar_t>
auto kernel_for(bool backward) {
  return backward ? &cluster_backward_kernel<scalar_t, float> : &cluster_forward_kernel<scalar_t, float>;
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
size_t layout_bytes(bool backward, int64_t H, int hb, int rows) {
  const int h = static_cast<int>(H), eb = sizeof(Elem<scalar_t>);
  return backward ? BackwardLayout(h, hb, rows, eb).bytes : ForwardLayout(h, hb, rows, eb).bytes;
}

template <class scalar_t>
ClusterPlan plan_for(int64_t H, int64_t B, int device, bool backward) {
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
  auto kernel = kernel_for<scalar_t>(backward);
  set_attributes(kernel, device);
  const size_t smem_max = prop->sharedMemPerBlockOptin, reserve = 1024;
  const char* what = backward ? "W_hh's columns and two steps of gate gradients do not fit" : "W_hh does not fit";
  for (const int C : {16, 8}) {
    const int hb = static_cast<int>((H + C - 1) / C);
    const int rows_max = kElems * kThreads / hb / 8 * 8;  // cell elements per thread are bounded
    const size_t least = layout_bytes<scalar_t>(backward, H, hb, 8);
    if (rows_max < 8) {
      p.reason = "hidden_size " + std::to_string(H) + " is too large for the cluster kernel: " + std::to_string(hb) +
                 " units per block of a " + std::to_string(C) + "-block cluster, at most " +
                 std::to_string(kElems * kThreads / 8);
      continue;
    }
    if (least + reserve > smem_max) {
      p.reason = std::string(what) + " on chip: a block of a " + std::to_string(C) + "-block cluster needs " +
                 std::to_string(least / 1024) + " KiB of shared memory for " + std::to_string(hb) +
                 " hidden units (this version keeps W_hh in shared memory), the device allows " +
                 std::to_string(smem_max / 1024) + " KiB";
      continue;
    }
    const int resident = resident_clusters(kernel, C, least);
    if (resident == 0) {
      if (p.reason.empty()) p.reason = "the device cannot schedule a cluster of " + std::to_string(C) + " blocks";
      continue;
    }
    // The batch is spread over the clusters that can run at once; beyond that, larger slices.
    const int64_t tiles = (B + 7) / 8;
    int rows = static_cast<int>(8 * ((tiles + resident - 1) / resident));
    rows = std::min(rows, rows_max);
    // Larger slices need more shared memory: at least one such cluster must still fit an SM.
    while (rows > 8 && (layout_bytes<scalar_t>(backward, H, hb, rows) + reserve > smem_max ||
                        resident_clusters(kernel, C, layout_bytes<scalar_t>(backward, H, hb, rows)) == 0)) {
      rows -= 8;
    }
    p.ok = true;
    p.cluster = C;
    p.units_per_block = hb;
    p.rows_per_cluster = rows;
    p.clusters = static_cast<int>((B + rows - 1) / rows);
    p.threads = kThreads;
    p.smem_bytes = layout_bytes<scalar_t>(backward, H, hb, rows);
    const std::string mma = kMmaInput<scalar_t> == MmaInput::TF32 ? "mma m16n8k8 tf32" : "mma m16n8k16";
    const std::string shape = std::to_string(p.clusters) + " clusters x " + std::to_string(C) + " blocks x " +
                              std::to_string(hb) + " hidden units, " + std::to_string(rows) +
                              " batch rows per cluster; ";
    p.reason = backward ? "cluster backward: " + shape +
                              "W_hh's columns in shared memory, dG_t W_hh on tensor cores (" + mma + ", K split "
                              "over " + std::to_string(BackwardLayout(static_cast<int>(H), hb, rows, sizeof(Elem<scalar_t>)).ksplit) +
                              " warps), dG_t over DSMEM, one cluster barrier per step, no grid barrier"
                        : "cluster: " + shape +
                              "W_hh in shared memory, gates on tensor cores (" + mma + "), h_t over DSMEM, one "
                              "cluster barrier per step, no grid barrier";
    return p;
  }
  return p;
}

ClusterPlan computed_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward) {
  if (dtype == c10::kBFloat16) return plan_for<c10::BFloat16>(H, B, device, backward);
  if (dtype == c10::kHalf) return plan_for<c10::Half>(H, B, device, backward);
  if (dtype == c10::kFloat) return plan_for<float>(H, B, device, backward);
  ClusterPlan p;
  p.reason = std::string("the cluster kernel runs bfloat16, float16 and float32 (as tf32) only (tensor cores), got ") +
             c10::toString(dtype);
  return p;
}

// Plans are computed once per key: a long sequence's chunks each launch and ask again.
const ClusterPlan& cached_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward) {
  // Keyed by the device limits too, which the CPU harness's tests change.
  using Key = std::tuple<int, int64_t, int64_t, c10::ScalarType, size_t, int, bool>;
  static std::mutex mutex;
  static std::map<Key, ClusterPlan> plans;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const Key key{device, H, B, dtype, prop->sharedMemPerBlockOptin, prop->multiProcessorCount, backward};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (auto it = plans.find(key); it != plans.end()) return it->second;
  }
  ClusterPlan p = computed_plan(H, B, dtype, device, backward);
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
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_for<scalar_t>(backward), a, plan.units_per_block,
                                    plan.rows_per_cluster));
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
