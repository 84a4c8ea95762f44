// Persistent LSTM recurrence (DESIGN.md section 2 "persistent", issue 4).
//
// One cooperative launch covers every step of a chunk. Block k owns hidden units
// [k * hb, (k + 1) * hb) with all four gates of each, and keeps its slice of W_hh in shared
// memory for the whole sequence:
//   forward   rows W_hh[g * H + j, :] of its units j: G_t[b, gates of j] = Gx + h_{t-1}[b, :] . rows
//   backward  columns W_hh[:, j] of its units:        dh_{t-1}[b, j] = dG_t[b, :] . column
// The state crosses blocks through global memory (L2): the forward writes h_t and, after one
// grid barrier, every block reads all of h_t; the backward writes dG_t for its units and, after
// one grid barrier, every block reads all of dG_t. One grid-wide barrier per step. Cell state and
// all accumulation stay in acc_t (fp32 for half types). Dot products: a warp per (hidden unit,
// group of kRows batch rows), lanes striding over the reduction dimension, so each weight read
// from shared memory serves kRows rows. The batch is tiled through shared memory inside a step.
//
// Semantics (padding, resets, truncation, clipping, norms) are the stepwise kernels', from cell_math.h.
#include "lstm_persistent_cuda.h"

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

namespace fastlstm::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;  // batch rows per warp work item

// Loads that bypass L1: the data was written by other SMs during this launch.
template <class T>
__device__ __forceinline__ T load_cg(const T* p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return __ldcg(p);
  } else {
    static_assert(sizeof(T) == 2, "half types");
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    return T(bits, T::from_bits());
  }
}

__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Copies a (rows, cols) block from global to shared memory with every thread of the block.
// Where the rows are 16-byte aligned the copy moves 16 bytes per load with kInFlight independent
// loads per thread issued before their stores (one dependent element-sized load at a time is
// latency-bound: ~13 us per step at H=1024, B=16, by the desk review). No conversion: shared
// memory holds the tensor dtype, converted to acc_t when read. 32-bit index math throughout.
template <class T>
__device__ __forceinline__ void copy_to_shared(T* dst, int dst_stride, const T* src, int64_t src_stride, int rows,
                                               int cols) {
  constexpr int kVec = 16 / sizeof(T), kInFlight = 4;
  const int threads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const bool vector = cols % kVec == 0 && dst_stride % kVec == 0 && src_stride % kVec == 0 &&
                      ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0;
  if (vector) {
    const int per_row = cols / kVec, total = rows * per_row;
    for (int v0 = tid; v0 < total; v0 += kInFlight * threads) {
      uint4 r[kInFlight];
#pragma unroll
      for (int q = 0; q < kInFlight; ++q) {
        const int v = v0 + q * threads, row = v / per_row;
        if (v < total) r[q] = __ldcg(reinterpret_cast<const uint4*>(src + row * src_stride) + (v - row * per_row));
      }
#pragma unroll
      for (int q = 0; q < kInFlight; ++q) {
        const int v = v0 + q * threads, row = v / per_row;
        if (v < total) reinterpret_cast<uint4*>(dst + row * dst_stride)[v - row * per_row] = r[q];
      }
    }
  } else {
    const int total = rows * cols;
    for (int i = tid; i < total; i += threads) {
      const int row = i / cols, c = i - row * cols;
      dst[row * dst_stride + c] = load_cg(src + row * src_stride + c);
    }
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int bt) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  // Sizes fit in 32 bits (checked at launch): no 64-bit division in the loops.
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);  // (4, hb, H)
  scalar_t* hs = reinterpret_cast<scalar_t*>(smem + align16(sizeof(scalar_t) * 4 * hb * H));  // (bt, H)
  const int u0 = static_cast<int>(blockIdx.x) * hb;
  const int units = std::min(hb, H - u0);
  for (int gate = 0; gate < 4; ++gate) {
    copy_to_shared(w + gate * hb * H, H, a.w_hh + (static_cast<int64_t>(gate) * H + u0) * H, H, units, H);
  }
  cg::grid_group grid = cg::this_grid();
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const bool separate_state = a.r != a.y;
  const int64_t BH = static_cast<int64_t>(B) * H;

  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const int64_t prev = i == 0 ? -1 : (a.reverse ? a.T - s : s - 1) - a.tlo;
    const scalar_t* r_prev = prev < 0 ? a.r_init : a.r + prev * BH;
    const acc_t* c_prev = prev < 0 ? a.c_init : a.c + prev * BH;
    acc_t* gates = a.gates + slot * 4 * BH;
    for (int b0 = 0; b0 < B; b0 += bt) {
      const int nb = std::min(bt, B - b0);
      __syncthreads();  // the previous tile's readers are done with hs (and w is loaded)
      copy_to_shared(hs, nb * H, r_prev + static_cast<int64_t>(b0) * H, static_cast<int64_t>(nb) * H, 1, nb * H);
      __syncthreads();
      const int groups = (nb + kRows - 1) / kRows;
      for (int item = warp; item < groups * units; item += kWarps) {
        const int g0 = item / units * kRows, u = item - item / units * units, j = u0 + u;
        // Lane r < kRows finishes batch row g0 + r: its inputs are loaded before the dot products,
        // so their latency hides behind them.
        const int b = b0 + g0 + lane;
        const bool finisher = lane < kRows && g0 + lane < nb;
        const bool live = finisher && row_live(a.lengths, b, t);
        const int64_t e = static_cast<int64_t>(b) * H + j;
        acc_t pre[4] = {}, c_in = 0;
        if (finisher) {
          const acc_t* g = gates + static_cast<int64_t>(b) * 4 * H;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            pre[q] = g[q * H + j];
            if (a.bias) pre[q] += static_cast<acc_t>(a.bias[q * H + j]);
          }
          const bool zero_in = state_zeroed_before(a.reset, B, b, t, row_length(a.lengths, b, a.T), a.reverse);
          c_in = zero_in ? acc_t(0) : c_prev[e];
        }
        acc_t acc[kRows][4] = {};
        for (int k = lane; k < H; k += 32) {
          const acc_t w0 = static_cast<acc_t>(w[(0 * hb + u) * H + k]);
          const acc_t w1 = static_cast<acc_t>(w[(1 * hb + u) * H + k]);
          const acc_t w2 = static_cast<acc_t>(w[(2 * hb + u) * H + k]);
          const acc_t w3 = static_cast<acc_t>(w[(3 * hb + u) * H + k]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (g0 + r < nb) {
              const acc_t hv = static_cast<acc_t>(hs[(g0 + r) * H + k]);
              acc[r][0] += w0 * hv;
              acc[r][1] += w1 * hv;
              acc[r][2] += w2 * hv;
              acc[r][3] += w3 * hv;
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[r][q] = warp_allsum(acc[r][q]);
        }
        if (!finisher) continue;
        // Register arrays need a static index: lane r copies row r's sums.
        acc_t mine[4] = {};
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r == lane) {
#pragma unroll
            for (int q = 0; q < 4; ++q) mine[q] = acc[r][q];
          }
        }
        acc_t* g = gates + static_cast<int64_t>(b) * 4 * H;
        scalar_t* y = a.y + slot * BH;
        scalar_t* state = a.r + slot * BH;
        if (!live) {
          g[j] = g[H + j] = g[2 * H + j] = g[3 * H + j] = acc_t(0);
          a.c[slot * BH + e] = c_in;
          y[e] = scalar_t(0);
          if (separate_state) state[e] = load_cg(r_prev + e);
        } else {
          acc_t ai, af, ag, ao, c, h;
          fastlstm::cell_forward<acc_t>(pre[0] + mine[0], pre[1] + mine[1], pre[2] + mine[2], pre[3] + mine[3], c_in,
                                        ai, af, ag, ao, c, h);
          g[j] = ai;
          g[H + j] = af;
          g[2 * H + j] = ag;
          g[3 * H + j] = ao;
          a.c[slot * BH + e] = c;
          y[e] = static_cast<scalar_t>(h);
          if (separate_state) {
            const bool zero_out = state_zeroed_after(a.reset, B, b, t, row_length(a.lengths, b, a.T), a.reverse);
            state[e] = zero_out ? scalar_t(0) : static_cast<scalar_t>(h);
          }
        }
      }
    }
    grid.sync();  // h_t is complete: the only grid-wide barrier of the step
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int bt) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B), G = 4 * H;
  scalar_t* wt = reinterpret_cast<scalar_t*>(smem);  // (hb, 4H): wt[u][r] = W_hh[r, u0 + u]
  scalar_t* dgs = reinterpret_cast<scalar_t*>(smem + align16(sizeof(scalar_t) * G * hb));  // (bt, 4H)
  const int u0 = static_cast<int>(blockIdx.x) * hb;
  const int units = std::min(hb, H - u0);
  // Neighbouring threads read neighbouring columns of one W_hh row (coalesced global loads).
  for (int idx = static_cast<int>(threadIdx.x); idx < units * G; idx += static_cast<int>(blockDim.x)) {
    const int r = idx / units, u = idx - r * units;
    wt[u * G + r] = a.w_hh[static_cast<int64_t>(r) * H + u0 + u];
  }
  cg::grid_group grid = cg::this_grid();
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const acc_t clip_rec = static_cast<acc_t>(a.opts.clip_recurrent);
  const acc_t clip_gates = static_cast<acc_t>(a.opts.clip_gates);
  const int tiles = static_cast<int>(gridDim.x);
  const int64_t BH = static_cast<int64_t>(B) * H;

  for (int64_t i = a.n - 1; i >= 0; --i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const int64_t prev = i == 0 ? -1 : (a.reverse ? a.T - s : s - 1) - a.tlo;
    const acc_t* c_prev = prev < 0 ? a.c_init : a.c + prev * BH;
    const acc_t* gates = a.gates + slot * 4 * BH;
    scalar_t* dgates = a.dgates + slot * 4 * BH;
    // Without padding or resets every row shares the step's carry kind: computed once, not per element.
    const int uniform_kind = carry_kind(step_of_time(t, a.T, a.reverse), a.T, a.opts.tbptt_chunk);

    // Phase A: the cell backward of this block's units, every thread on (row, unit) elements.
    acc_t sum_h = 0, sum_c = 0;
    for (int idx = static_cast<int>(threadIdx.x); idx < B * units; idx += static_cast<int>(blockDim.x)) {
      const int b = idx / units, j = u0 + (idx - b * units);
      const int64_t e = static_cast<int64_t>(b) * H + j;
      scalar_t* dg = dgates + static_cast<int64_t>(b) * G;
      int kind = uniform_kind;
      bool zero_in = false;
      if (a.lengths || a.reset) {
        const int64_t n_b = row_length(a.lengths, b, a.T);
        if (t >= n_b) {  // padding: the carries pass through untouched
          dg[j] = dg[H + j] = dg[2 * H + j] = dg[3 * H + j] = scalar_t(0);
          continue;
        }
        kind = carry_kind(step_of_time(t, n_b, a.reverse), n_b, a.opts.tbptt_chunk,
                          state_zeroed_after(a.reset, B, b, t, n_b, a.reverse));
        zero_in = state_zeroed_before(a.reset, B, b, t, n_b, a.reverse);
      }
      const acc_t* g = gates + static_cast<int64_t>(b) * G;
      acc_t dh = receive_carry(a.carry_h[e], kind, clip_rec);
      if (a.dy) dh += static_cast<acc_t>(a.dy[t * BH + e]);
      const acc_t dc_in = receive_carry(a.carry_c[e], kind, clip_rec);
      acc_t dgi, dgf, dgg, dgo, dct, dcp;
      fastlstm::cell_backward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], a.c[slot * BH + e],
                                     zero_in ? acc_t(0) : c_prev[e], dh, dc_in, dgi, dgf, dgg, dgo, dct, dcp);
      dg[j] = static_cast<scalar_t>(clip_gate_grad(dgi, clip_gates));
      dg[H + j] = static_cast<scalar_t>(clip_gate_grad(dgf, clip_gates));
      dg[2 * H + j] = static_cast<scalar_t>(clip_gate_grad(dgg, clip_gates));
      dg[3 * H + j] = static_cast<scalar_t>(clip_gate_grad(dgo, clip_gates));
      a.carry_c[e] = dcp;
      a.carry_h[e] = acc_t(0);  // what skips the step; dG_t W_hh is added in phase B
      sum_h += dh * dh;
      sum_c += dct * dct;
    }
    if (a.norm_partial) {
      // Summed over the block's rows and units in a fixed order: one (h, c) pair per block and
      // step, deterministic, and (T, 2, blocks) in memory instead of (T, 2, B, blocks).
      block_sum2(sum_h, sum_c);
      if (threadIdx.x == 0) {
        acc_t* np = a.norm_partial + t * 2 * tiles;
        np[blockIdx.x] = sum_h;
        np[tiles + blockIdx.x] = sum_c;
      }
    }
    grid.sync();  // dG_t is complete: the only grid-wide barrier of the step

    // Phase B: carry_h[b, j] += dG_t[b, :] . W_hh[:, j] for this block's units.
    for (int b0 = 0; b0 < B; b0 += bt) {
      const int nb = std::min(bt, B - b0);
      __syncthreads();
      copy_to_shared(dgs, nb * G, dgates + static_cast<int64_t>(b0) * G, static_cast<int64_t>(nb) * G, 1, nb * G);
      __syncthreads();
      const int groups = (nb + kRows - 1) / kRows;
      for (int item = warp; item < groups * units; item += kWarps) {
        const int g0 = item / units * kRows, u = item - item / units * units;
        acc_t acc[kRows] = {};
        for (int r = lane; r < G; r += 32) {
          const acc_t wv = static_cast<acc_t>(wt[u * G + r]);
#pragma unroll
          for (int q = 0; q < kRows; ++q) {
            if (g0 + q < nb) acc[q] += static_cast<acc_t>(dgs[(g0 + q) * G + r]) * wv;
          }
        }
#pragma unroll
        for (int q = 0; q < kRows; ++q) acc[q] = warp_sum(acc[q]);
        if (lane == 0) {
#pragma unroll
          for (int q = 0; q < kRows; ++q) {
            if (g0 + q < nb) a.carry_h[static_cast<int64_t>(b0 + g0 + q) * H + u0 + u] += acc[q];
          }
        }
      }
    }
    __syncthreads();  // phase A of the next step reads this block's carries
  }
}

// What a launch needs to know about a (kernel, device, layer shape): the plan and how many blocks
// of that kernel fit on one SM. Computed once per key, since with chunked or inference-mode
// calls the driver launches once per chunk (thousands of launches on a long sequence).
struct LaunchSetup {
  PersistentPlan plan;
  int resident_per_sm = 0;
};

template <class Kernel>
const LaunchSetup& launch_setup(Kernel* kernel, int device, int64_t H, int64_t B, c10::ScalarType dtype,
                                bool backward) {
  // Keyed by the device limits too, which the CPU harness's tests change.
  using Key = std::tuple<const void*, int, int64_t, int64_t, c10::ScalarType, size_t, int>;
  static std::mutex mutex;
  static std::map<Key, LaunchSetup> setups;
  static std::set<std::pair<const void*, int>> attribute_set;
  const std::lock_guard<std::mutex> lock(mutex);
  const void* key_kernel = reinterpret_cast<const void*>(kernel);
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const Key key{key_kernel, device, H, B, dtype, prop->sharedMemPerBlockOptin, prop->multiProcessorCount};
  if (auto it = setups.find(key); it != setups.end()) return it->second;
  LaunchSetup setup;
  setup.plan = persistent_plan(H, B, dtype, device, backward);
  if (setup.plan.ok) {
    // The attribute is a ceiling, so it is raised once to the device's limit, for every plan.
    if (attribute_set.count({key_kernel, device}) == 0) {
      const int limit = static_cast<int>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin);
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
      attribute_set.insert({key_kernel, device});
    }
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&setup.resident_per_sm, kernel, setup.plan.threads,
                                                                 setup.plan.smem_bytes));
  }
  return setups.emplace(key, std::move(setup)).first->second;
}

template <class scalar_t, class acc_t>
void launch(void (*kernel)(ChunkRecurrenceArgs<scalar_t, acc_t>, int, int), const ChunkRecurrenceArgs<scalar_t, acc_t>& a,
            bool backward) {
  if (a.B == 0 || a.H == 0 || a.n == 0) return;
  const int device = c10::cuda::current_device();
  const LaunchSetup& setup =
      launch_setup(kernel, device, a.H, a.B, c10::CppTypeToScalarType<scalar_t>::value, backward);
  const PersistentPlan& plan = setup.plan;
  TORCH_CHECK(plan.ok, "fastlstm: the persistent kernel cannot run this layer: ", plan.reason);
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  // The kernels index within a step in 32 bits.
  TORCH_CHECK(a.B * 4 * a.H < (int64_t(1) << 31), "fastlstm: the persistent kernel needs batch * 4 * hidden_size < 2^31, got ",
              a.B, " * 4 * ", a.H, " (use backend='stepwise')");
  TORCH_CHECK(setup.resident_per_sm * sms >= plan.blocks, "fastlstm: the persistent kernel needs ", plan.blocks,
              " co-resident blocks but the device holds ", setup.resident_per_sm * sms, " (use backend='stepwise')");
  ChunkRecurrenceArgs<scalar_t, acc_t> args = a;
  int hb = plan.units_per_block, bt = plan.batch_tile;
  void* params[] = {&args, &hb, &bt};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), params, plan.smem_bytes,
                                             at::cuda::getCurrentCUDAStream()));
}

}  // namespace

PersistentPlan persistent_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device, bool backward) {
  PersistentPlan p;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (!prop->cooperativeLaunch) {
    p.reason = "the device does not support cooperative launches";
    return p;
  }
  const size_t elem = c10::elementSize(dtype);
  const int64_t sms = prop->multiProcessorCount;
  const size_t smem_max = prop->sharedMemPerBlockOptin;
  // Fewest units per block that keep every block on its own SM.
  const int64_t hb = std::max<int64_t>(1, (H + sms - 1) / sms);
  const size_t w_bytes = align16(elem * 4 * hb * H);
  const size_t row_bytes = elem * (backward ? 4 * H : H);  // staged in the tensor dtype
  // A margin below the opt-in limit (the kernels themselves use no static shared memory).
  const size_t reserve = 1024;
  if (w_bytes + row_bytes + reserve > smem_max) {
    p.reason = "W_hh does not fit on chip: a block needs " + std::to_string((w_bytes + row_bytes) / 1024) +
               " KiB of shared memory for " + std::to_string(hb) + " hidden units, the device allows " +
               std::to_string(smem_max / 1024) + " KiB";
    return p;
  }
  const int64_t fit_rows = static_cast<int64_t>((smem_max - w_bytes - reserve) / row_bytes);
  p.ok = true;
  p.reason = "persistent: " + std::to_string((H + hb - 1) / hb) + " blocks x " + std::to_string(hb) +
             " hidden units, W_hh resident in shared memory, one grid barrier per step";
  p.blocks = static_cast<int>((H + hb - 1) / hb);
  p.units_per_block = static_cast<int>(hb);
  p.batch_tile = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(B, fit_rows)));
  p.threads = kThreads;
  p.smem_bytes = w_bytes + row_bytes * p.batch_tile;
  return p;
}

template <class scalar_t, class acc_t>
void persistent_forward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a) {
  launch(&persistent_forward_kernel<scalar_t, acc_t>, a, false);
}

template <class scalar_t, class acc_t>
void persistent_backward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a) {
  launch(&persistent_backward_kernel<scalar_t, acc_t>, a, true);
}

#define FASTLSTM_INSTANTIATE(S, A)                                                   \
  template void persistent_forward<S, A>(const ChunkRecurrenceArgs<S, A>&);         \
  template void persistent_backward<S, A>(const ChunkRecurrenceArgs<S, A>&);
FASTLSTM_INSTANTIATE(float, float)
FASTLSTM_INSTANTIATE(double, double)
FASTLSTM_INSTANTIATE(c10::Half, float)
FASTLSTM_INSTANTIATE(c10::BFloat16, float)
#undef FASTLSTM_INSTANTIATE

}  // namespace fastlstm::cuda
