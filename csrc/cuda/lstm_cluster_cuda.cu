// Cluster-resident LSTM forward for bfloat16 / float16 (persistent kernel v2, issue 10; DESIGN.md
// section 11).
//
// One launch runs every step of a chunk. The batch is cut into slices of rows_per_cluster rows
// (a multiple of 8, the N of the tensor-core product), one slice per thread-block cluster; the
// clusters never wait for each other (no grid barrier, an ordinary cluster launch). Inside a
// cluster of C blocks, block `rank` owns hidden units [rank * hb, (rank + 1) * hb) with all four
// gates of each, and keeps those 4 * hb rows of W_hh in shared memory for the whole chunk (this
// first version keeps W_hh in shared memory, not in registers). Per step:
//   1. tensor cores: pre[n][q * hb + u] = h_{t-1}[n, :] . W_hh[q * H + u0 + u, :] with
//      mma.m16n8k16 (A = W_hh rows, M = 4 gates x hb units; B = h_{t-1}, N = the slice's rows;
//      K = H, zero-padded to a multiple of 16), fp32 accumulators staged in shared memory;
//   2. the cell in fp32 registers on this thread's fixed (unit, row) elements: Gx + bias (loaded
//      during the previous step's barrier) + pre, c carried in registers from step to step;
//      gates, c, y (and r) written exactly as the persistent kernel writes them;
//   3. h_t (the carried state: h on live rows, h_{t-1} on padded ones, zero before a reset) stored into every block's
//      shared memory over DSMEM, into the buffer of the next step's parity;
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
// 16-bit elements of padding per shared row: the 8 rows of a fragment load land in distinct banks.
constexpr int kPad = 8;

__host__ __device__ constexpr int round_up(int n, int m) { return (n + m - 1) / m * m; }
__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// One block's shared memory, from the plan's numbers (the host sizes it, the kernel carves it).
struct Layout {
  int Kp, Mp, ldw, ldh, ldp;
  size_t h_off, pre_off, bytes;
  __host__ __device__ Layout(int H, int hb, int Np)
      : Kp(round_up(H, 16)), Mp(round_up(4 * hb, 16)), ldw(Kp + kPad), ldh(Kp + kPad), ldp(Mp + 4) {
    h_off = align16(sizeof(uint16_t) * Mp * ldw);                      // W slice (Mp, ldw)
    pre_off = h_off + align16(sizeof(uint16_t) * 2 * Np * ldh);        // h (2, Np, ldh)
    bytes = pre_off + align16(sizeof(float) * Np * ldp);               // products (Np, ldp)
  }
};

template <class S>
__device__ __forceinline__ uint16_t bits(S v) {
  return v.x;
}
template <class S>
__device__ __forceinline__ S from_bits(uint16_t b) {
  return S(b, S::from_bits());
}

// Gx + bias of local step i for this thread's elements.
template <class scalar_t, class acc_t>
__device__ __forceinline__ void load_inputs(const ChunkRecurrenceArgs<scalar_t, acc_t>& a, int64_t i, const int (&n)[kElems],
                                            const int (&j)[kElems], const bool (&mine)[kElems], int b0,
                                            acc_t (&gx)[kElems][4]) {
  const int64_t s = a.s0 + i, t = a.reverse ? a.T - 1 - s : s;
  const int64_t H = a.H;
  const acc_t* g = a.gates + (t - a.tlo) * 4 * a.B * H;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    if (!mine[k]) continue;
    const acc_t* row = g + static_cast<int64_t>(b0 + n[k]) * 4 * H;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      gx[k][q] = row[q * H + j[k]];
      if (a.bias) gx[k][q] += static_cast<acc_t>(a.bias[q * H + j[k]]);
    }
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    cluster_forward_kernel(const ChunkRecurrenceArgs<scalar_t, acc_t> a, const int hb, const int Np) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the plan refuses such devices, so this is never launched
#else
  constexpr MmaInput kIn = std::is_same_v<scalar_t, c10::BFloat16> ? MmaInput::BF16 : MmaInput::F16;
  FASTLSTM_DYNAMIC_SMEM(smem);
  cg::cluster_group cluster = cg::this_cluster();
  // Sizes fit in 32 bits (checked at launch).
  const int H = static_cast<int>(a.H), B = static_cast<int>(a.B);
  const Layout L(H, hb, Np);
  uint16_t* w = reinterpret_cast<uint16_t*>(smem);                 // row q * hb + u: W_hh[q * H + u0 + u, :]
  uint16_t* hbuf = reinterpret_cast<uint16_t*>(smem + L.h_off);    // [parity][row][k]: the slice's h_{t-1}
  float* pre = reinterpret_cast<float*>(smem + L.pre_off);         // [row][q * hb + u]: h_{t-1} W_hh^T
  const int C = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int u0 = rank * hb, units = std::max(0, std::min(hb, H - u0));
  const int b0 = static_cast<int>(blockIdx.x) / C * Np, rows = std::max(0, std::min(Np, B - b0));
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  // Zero W and both h buffers: padded rows and columns enter the products as zeros.
  for (int i = tid; i < static_cast<int>(L.pre_off / 4); i += kThreads) reinterpret_cast<uint32_t*>(smem)[i] = 0;
  __syncthreads();
  for (int i = tid; i < 4 * units * H; i += kThreads) {
    const int row = i / H, k = i - row * H, q = row / units, u = row - q * units;
    w[(q * hb + u) * L.ldw + k] = bits(a.w_hh[static_cast<int64_t>(q * H + u0 + u) * H + k]);
  }
  for (int i = tid; i < rows * H; i += kThreads) {
    const int n = i / H, k = i - n * H;
    hbuf[n * L.ldh + k] = bits(a.r_init[static_cast<int64_t>(b0 + n) * H + k]);
  }
  // This thread's cell elements: consecutive threads take consecutive units (coalesced stores).
  int en[kElems], ej[kElems];
  bool mine[kElems];
  acc_t c_reg[kElems], gx[kElems][4];
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    const int e = tid + k * kThreads, n = e / hb, u = e - n * hb;
    en[k] = n;
    ej[k] = u0 + u;
    mine[k] = n < rows && u < units;
    c_reg[k] = mine[k] ? a.c_init[static_cast<int64_t>(b0 + n) * H + u0 + u] : acc_t(0);
  }
  load_inputs(a, 0, en, ej, mine, b0, gx);
  // Every block's buffers are zeroed before any peer writes into them.
  cluster.sync();

  const bool separate_state = a.r != a.y;
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int mtiles = L.Mp / 16, ntiles = Np / 8, ktiles = L.Kp / 16;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t s = a.s0 + i;
    const int64_t t = a.reverse ? a.T - 1 - s : s;
    const int64_t slot = t - a.tlo;
    const uint16_t* hcur = hbuf + (i % 2) * Np * L.ldh;
    uint16_t* hnext = hbuf + ((i + 1) % 2) * Np * L.ldh;

    // 1. The gate pre-activations' recurrent part on the tensor cores, a warp per 16x8 tile.
    // Two accumulators (even and odd k tiles) halve the chain of dependent mma instructions.
    for (int item = warp; item < mtiles * ntiles; item += kWarps) {
      const int mt = item % mtiles, nt = item / mtiles;
      const uint16_t* w_tile = w + mt * 16 * L.ldw;
      const uint16_t* h_tile = hcur + nt * 8 * L.ldh;
      FragmentC even = {}, odd = {};
#pragma unroll 2
      for (int kt = 0; kt < ktiles; kt += 2) {
        mma_m16n8k16<kIn>(even, load_fragment_a(w_tile + kt * 16, L.ldw), load_fragment_b(h_tile + kt * 16, L.ldh),
                          even);
        if (kt + 1 < ktiles) {  // warp-uniform: the warp stays converged for the mma
          mma_m16n8k16<kIn>(odd, load_fragment_a(w_tile + (kt + 1) * 16, L.ldw),
                            load_fragment_b(h_tile + (kt + 1) * 16, L.ldh), odd);
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
      if (!mine[k]) continue;
      const int n = en[k], j = ej[k], u = j - u0, b = b0 + n;
      const int64_t e = static_cast<int64_t>(b) * H + j;
      acc_t* g = gates + static_cast<int64_t>(b) * 4 * H;
      uint16_t carried;
      if (!row_live(a.lengths, b, t)) {
        g[j] = g[H + j] = g[2 * H + j] = g[3 * H + j] = acc_t(0);
        c_out[e] = c_reg[k];
        y[e] = scalar_t(0);
        carried = hcur[n * L.ldh + j];
        if (separate_state) state[e] = from_bits<scalar_t>(carried);
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
        carried = bits(hs);
      }
      for (int r = 0; r < C; ++r) cluster.map_shared_rank(hnext, r)[n * L.ldh + j] = carried;
    }

    // 4. The step's only barrier; the next step's inputs load while the other blocks arrive.
    cluster.barrier_arrive();
    if (i + 1 < a.n) load_inputs(a, i + 1, en, ej, mine, b0, gx);
    cluster.barrier_wait();
  }
#endif
}

template <class scalar_t>
auto kernel_for() {
  return &cluster_forward_kernel<scalar_t, float>;
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

template <class scalar_t>
ClusterPlan plan_for(int64_t H, int64_t B, int device) {
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
  auto kernel = kernel_for<scalar_t>();
  set_attributes(kernel, device);
  const size_t smem_max = prop->sharedMemPerBlockOptin, reserve = 1024;
  for (const int C : {16, 8}) {
    const int hb = static_cast<int>((H + C - 1) / C);
    const int rows_max = kElems * kThreads / hb / 8 * 8;  // cell elements per thread are bounded
    const size_t least = Layout(static_cast<int>(H), hb, 8).bytes;
    if (rows_max < 8) {
      p.reason = "hidden_size " + std::to_string(H) + " is too large for the cluster kernel: " + std::to_string(hb) +
                 " units per block of a " + std::to_string(C) + "-block cluster, at most " +
                 std::to_string(kElems * kThreads / 8);
      continue;
    }
    if (least + reserve > smem_max) {
      p.reason = "W_hh does not fit on chip: a block of a " + std::to_string(C) + "-block cluster needs " +
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
    while (rows > 8 && Layout(static_cast<int>(H), hb, rows).bytes + reserve > smem_max) rows -= 8;
    p.ok = true;
    p.cluster = C;
    p.units_per_block = hb;
    p.rows_per_cluster = rows;
    p.clusters = static_cast<int>((B + rows - 1) / rows);
    p.threads = kThreads;
    p.smem_bytes = Layout(static_cast<int>(H), hb, rows).bytes;
    p.reason = "cluster: " + std::to_string(p.clusters) + " clusters x " + std::to_string(C) + " blocks x " +
               std::to_string(hb) + " hidden units, " + std::to_string(rows) +
               " batch rows per cluster; W_hh in shared memory, gates on tensor cores (mma m16n8k16), h_t over "
               "DSMEM, one cluster barrier per step, no grid barrier";
    return p;
  }
  return p;
}

const ClusterPlan& cached_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device) {
  // Keyed by the device limits too, which the CPU harness's tests change.
  using Key = std::tuple<int, int64_t, int64_t, c10::ScalarType, size_t, int>;
  static std::mutex mutex;
  static std::map<Key, ClusterPlan> plans;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const Key key{device, H, B, dtype, prop->sharedMemPerBlockOptin, prop->multiProcessorCount};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (auto it = plans.find(key); it != plans.end()) return it->second;
  }
  ClusterPlan p = cluster_plan(H, B, dtype, device);
  const std::lock_guard<std::mutex> lock(mutex);
  return plans.emplace(key, std::move(p)).first->second;
}

}  // namespace

ClusterPlan cluster_plan(int64_t H, int64_t B, c10::ScalarType dtype, int device) {
  if (dtype == c10::kBFloat16) return plan_for<c10::BFloat16>(H, B, device);
  if (dtype == c10::kHalf) return plan_for<c10::Half>(H, B, device);
  ClusterPlan p;
  p.reason = std::string("the cluster kernel runs bfloat16 and float16 only (tensor cores), got ") + c10::toString(dtype);
  return p;
}

template <class scalar_t, class acc_t>
void cluster_forward(const ChunkRecurrenceArgs<scalar_t, acc_t>& a) {
  if (a.B == 0 || a.H == 0 || a.n == 0) return;
  const int device = c10::cuda::current_device();
  const ClusterPlan& plan = cached_plan(a.H, a.B, c10::CppTypeToScalarType<scalar_t>::value, device);
  TORCH_CHECK(plan.ok, "fastlstm: the cluster kernel cannot run this layer: ", plan.reason);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config =
      cluster_config(plan.clusters, plan.cluster, plan.smem_bytes, at::cuda::getCurrentCUDAStream(), attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, &cluster_forward_kernel<scalar_t, acc_t>, a, plan.units_per_block,
                                    plan.rows_per_cluster));
}

template void cluster_forward<c10::Half, float>(const ChunkRecurrenceArgs<c10::Half, float>&);
template void cluster_forward<c10::BFloat16, float>(const ChunkRecurrenceArgs<c10::BFloat16, float>&);

}  // namespace fastlstm::cuda
