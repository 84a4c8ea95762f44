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
// Semantics (padding, truncation, clipping, norms) are the stepwise kernels', from cell_math.h.
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

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    persistent_forward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int bt) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  const int64_t H = a.H, B = a.B;
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);  // (4, hb, H)
  acc_t* hs = reinterpret_cast<acc_t*>(smem + align16(sizeof(scalar_t) * 4 * hb * H));  // (bt, H)
  const int64_t u0 = static_cast<int64_t>(blockIdx.x) * hb;
  const int units = static_cast<int>(std::min<int64_t>(hb, H - u0));
  for (int64_t idx = threadIdx.x; idx < 4LL * units * H; idx += blockDim.x) {
    const int64_t row = idx / H, k = idx % H, gate = row / units, u = row % units;
    w[(gate * hb + u) * H + k] = a.w_hh[(gate * H + u0 + u) * H + k];
  }
  cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool separate_state = a.r != a.y;

  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const int64_t prev = i == 0 ? -1 : (a.reverse ? a.T - s : s - 1) - a.tlo;
    const scalar_t* r_prev = prev < 0 ? a.r_init : a.r + prev * B * H;
    const acc_t* c_prev = prev < 0 ? a.c_init : a.c + prev * B * H;
    acc_t* gates = a.gates + slot * B * 4 * H;
    for (int64_t b0 = 0; b0 < B; b0 += bt) {
      const int64_t nb = std::min<int64_t>(bt, B - b0);
      __syncthreads();  // the previous tile's readers are done with hs (and w is loaded)
      for (int64_t idx = threadIdx.x; idx < nb * H; idx += blockDim.x) {
        hs[idx] = static_cast<acc_t>(load_cg(r_prev + b0 * H + idx));
      }
      __syncthreads();
      const int64_t groups = (nb + kRows - 1) / kRows;
      for (int64_t item = warp; item < groups * units; item += kWarps) {
        const int u = static_cast<int>(item % units);
        const int64_t g0 = (item / units) * kRows;
        acc_t acc[kRows][4] = {};
        for (int64_t k = lane; k < H; k += 32) {
          const acc_t w0 = static_cast<acc_t>(w[(0 * hb + u) * H + k]);
          const acc_t w1 = static_cast<acc_t>(w[(1 * hb + u) * H + k]);
          const acc_t w2 = static_cast<acc_t>(w[(2 * hb + u) * H + k]);
          const acc_t w3 = static_cast<acc_t>(w[(3 * hb + u) * H + k]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (g0 + r < nb) {
              const acc_t hv = hs[(g0 + r) * H + k];
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
        if (lane < kRows && g0 + lane < nb) {
          // Lane r finishes row r (register arrays need a static index, hence the loop).
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r != lane) continue;
            const int64_t b = b0 + g0 + r, j = u0 + u, e = b * H + j;
            acc_t* g = gates + b * 4 * H;
            scalar_t* y = a.y + slot * B * H;
            scalar_t* state = a.r + slot * B * H;
            if (!row_live(a.lengths, b, t)) {
              g[j] = g[H + j] = g[2 * H + j] = g[3 * H + j] = acc_t(0);
              a.c[slot * B * H + e] = c_prev[e];
              y[e] = scalar_t(0);
              if (separate_state) state[e] = load_cg(r_prev + e);
            } else {
              acc_t pre[4];
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                pre[q] = g[q * H + j] + acc[r][q];
                if (a.bias) pre[q] += static_cast<acc_t>(a.bias[q * H + j]);
              }
              acc_t ai, af, ag, ao, c, h;
              fastlstm::cell_forward<acc_t>(pre[0], pre[1], pre[2], pre[3], c_prev[e], ai, af, ag, ao, c, h);
              g[j] = ai;
              g[H + j] = af;
              g[2 * H + j] = ag;
              g[3 * H + j] = ao;
              a.c[slot * B * H + e] = c;
              y[e] = static_cast<scalar_t>(h);
              if (separate_state) state[e] = static_cast<scalar_t>(h);
            }
          }
        }
      }
    }
    grid.sync();  // h_t is complete: the only grid-wide barrier of the step
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    persistent_backward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int bt) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  const int64_t H = a.H, B = a.B, G = 4 * H;
  scalar_t* wt = reinterpret_cast<scalar_t*>(smem);  // (hb, 4H): wt[u][r] = W_hh[r, u0 + u]
  acc_t* dgs = reinterpret_cast<acc_t*>(smem + align16(sizeof(scalar_t) * G * hb));  // (bt, 4H)
  const int64_t u0 = static_cast<int64_t>(blockIdx.x) * hb;
  const int units = static_cast<int>(std::min<int64_t>(hb, H - u0));
  // Neighbouring threads read neighbouring columns of one W_hh row (coalesced global loads).
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(units) * G; idx += blockDim.x) {
    const int64_t u = idx % units, r = idx / units;
    wt[u * G + r] = a.w_hh[r * H + u0 + u];
  }
  cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const acc_t clip_rec = static_cast<acc_t>(a.opts.clip_recurrent);
  const acc_t clip_gates = static_cast<acc_t>(a.opts.clip_gates);
  const int64_t tiles = gridDim.x;

  for (int64_t i = a.n - 1; i >= 0; --i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const int64_t prev = i == 0 ? -1 : (a.reverse ? a.T - s : s - 1) - a.tlo;
    const acc_t* c_prev = prev < 0 ? a.c_init : a.c + prev * B * H;
    const acc_t* gates = a.gates + slot * B * G;
    scalar_t* dgates = a.dgates + slot * B * G;

    // Phase A: the cell backward of this block's units, a warp per batch row.
    for (int64_t b = warp; b < B; b += kWarps) {
      const int64_t n_b = a.lengths ? a.lengths[b] : a.T;
      const bool live = t < n_b;
      const int kind = carry_kind(step_of_time(t, n_b, a.reverse), n_b, a.opts.tbptt_chunk);
      acc_t sum_h = 0, sum_c = 0;
      for (int u = lane; u < units; u += 32) {
        const int64_t j = u0 + u, e = b * H + j;
        scalar_t* dg = dgates + b * G;
        if (!live) {  // padding: the carries pass through untouched
          dg[j] = dg[H + j] = dg[2 * H + j] = dg[3 * H + j] = scalar_t(0);
          continue;
        }
        const acc_t* g = gates + b * G;
        acc_t dh = receive_carry(a.carry_h[e], kind, clip_rec);
        if (a.dy) dh += static_cast<acc_t>(a.dy[t * B * H + e]);
        const acc_t dc_in = receive_carry(a.carry_c[e], kind, clip_rec);
        acc_t dgi, dgf, dgg, dgo, dct, dcp;
        fastlstm::cell_backward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], a.c[slot * B * H + e], c_prev[e], dh, dc_in,
                             dgi, dgf, dgg, dgo, dct, dcp);
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
        sum_h = warp_sum(sum_h);
        sum_c = warp_sum(sum_c);
        if (lane == 0) {
          acc_t* np = a.norm_partial + t * 2 * B * tiles;
          np[b * tiles + blockIdx.x] = sum_h;
          np[(B + b) * tiles + blockIdx.x] = sum_c;
        }
      }
    }
    grid.sync();  // dG_t is complete: the only grid-wide barrier of the step

    // Phase B: carry_h[b, j] += dG_t[b, :] . W_hh[:, j] for this block's units.
    for (int64_t b0 = 0; b0 < B; b0 += bt) {
      const int64_t nb = std::min<int64_t>(bt, B - b0);
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < nb * G; idx += blockDim.x) {
        dgs[idx] = static_cast<acc_t>(load_cg(dgates + b0 * G + idx));
      }
      __syncthreads();
      const int64_t groups = (nb + kRows - 1) / kRows;
      for (int64_t item = warp; item < groups * units; item += kWarps) {
        const int u = static_cast<int>(item % units);
        const int64_t g0 = (item / units) * kRows;
        acc_t acc[kRows] = {};
        for (int64_t r = lane; r < G; r += 32) {
          const acc_t wv = static_cast<acc_t>(wt[u * G + r]);
#pragma unroll
          for (int q = 0; q < kRows; ++q) {
            if (g0 + q < nb) acc[q] += dgs[(g0 + q) * G + r] * wv;
          }
        }
#pragma unroll
        for (int q = 0; q < kRows; ++q) acc[q] = warp_sum(acc[q]);
        if (lane == 0) {
#pragma unroll
          for (int q = 0; q < kRows; ++q) {
            if (g0 + q < nb) a.carry_h[(b0 + g0 + q) * H + u0 + u] += acc[q];
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
  using Key = std::tuple<const void*, int, int64_t, int64_t, c10::ScalarType>;
  static std::mutex mutex;
  static std::map<Key, LaunchSetup> setups;
  static std::set<std::pair<const void*, int>> attribute_set;
  const std::lock_guard<std::mutex> lock(mutex);
  const void* key_kernel = reinterpret_cast<const void*>(kernel);
  const Key key{key_kernel, device, H, B, dtype};
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
  const size_t acc = dtype == c10::kDouble ? 8 : 4;
  const int64_t sms = prop->multiProcessorCount;
  const size_t smem_max = prop->sharedMemPerBlockOptin;
  // Fewest units per block that keep every block on its own SM.
  const int64_t hb = std::max<int64_t>(1, (H + sms - 1) / sms);
  const size_t w_bytes = align16(elem * 4 * hb * H);
  const size_t row_bytes = acc * (backward ? 4 * H : H);
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
