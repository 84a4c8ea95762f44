// The harness's own tests: each CUDA feature fastlstm's kernels rely on, checked against what
// the CUDA C++ Programming Guide defines. The same file builds with nvcc for a real GPU
// (`run.py --gpu`), which checks the harness against the hardware; the death tests (aborts
// instead of hangs) exist only in the harness.
#include <cooperative_groups.h>

#include <cmath>
#include <limits>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "../../csrc/cuda/block_reduce.cuh"
#include "../../csrc/cuda/launch.cuh"
#include "../../csrc/cuda/mma.cuh"
#include "check.h"

namespace cg = cooperative_groups;

namespace {

template <class T>
struct Managed {
  T* p = nullptr;
  explicit Managed(size_t n, T fill = T()) {
    cudaMallocManaged(&p, n * sizeof(T));
    for (size_t i = 0; i < n; ++i) p[i] = fill;
  }
  ~Managed() { cudaFree(p); }
  T& operator[](size_t i) { return p[i]; }
};

bool ok(cudaError_t e) { return e == cudaSuccess; }

// out[5, n]: xor 1, down 3, up 5, idx 7 (each within segments of `width`), one launch.
__global__ void shuffle_kernel(int* out, int width) {
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  const int v = 1000 + t;
  out[0 * n + t] = __shfl_xor_sync(0xffffffffu, v, 1, width);
  out[1 * n + t] = __shfl_down_sync(0xffffffffu, v, 3, width);
  out[2 * n + t] = __shfl_up_sync(0xffffffffu, v, 5, width);
  out[3 * n + t] = __shfl_sync(0xffffffffu, v, 7, width);
  out[4 * n + t] = static_cast<int>(__shfl_xor_sync(0xffffffffu, static_cast<double>(v) + 0.5, 16) * 2);
}

TEST(shuffles_follow_cuda_semantics) {
  for (int width : {32, 16, 8}) {
    const int n = 64;
    Managed<int> out(5 * n, -1);
    FASTLSTM_LAUNCH(shuffle_kernel, 1, n, 0, nullptr, out.p, width);
    EXPECT(ok(cudaDeviceSynchronize()));
    for (int t = 0; t < n; ++t) {
      const int base = t / width * width;
      const int down = t + 3 < base + width ? t + 3 : t, up = t - 5 >= base ? t - 5 : t;
      EXPECT(out[t] == 1000 + (t ^ 1));
      EXPECT(out[n + t] == 1000 + down, "width " + std::to_string(width) + " lane " + std::to_string(t));
      EXPECT(out[2 * n + t] == 1000 + up, "width " + std::to_string(width) + " lane " + std::to_string(t));
      EXPECT(out[3 * n + t] == 1000 + base + 7 % width);
      EXPECT(out[4 * n + t] == 2 * (1000 + (t ^ 16)) + 1);
    }
  }
}

// Votes, and a shuffle among the first 16 lanes only (the others take another branch).
__global__ void vote_kernel(unsigned* out) {
  const int t = static_cast<int>(threadIdx.x);
  const bool odd = t % 2 == 1;
  out[t * 4 + 0] = __ballot_sync(0xffffffffu, odd);
  out[t * 4 + 1] = __any_sync(0xffffffffu, t == 31);
  out[t * 4 + 2] = __all_sync(0xffffffffu, t < 32);
  if (t < 16) {
    out[t * 4 + 3] = __shfl_down_sync(0x0000ffffu, 100u + t, 8, 16);
  } else {
    __syncwarp(0xffff0000u);
    out[t * 4 + 3] = __ballot_sync(0xffff0000u, t >= 24);
  }
}

TEST(votes_and_partial_masks) {
  Managed<unsigned> out(32 * 4, 7);
  FASTLSTM_LAUNCH(vote_kernel, 1, 32, 0, nullptr, out.p);
  EXPECT(ok(cudaDeviceSynchronize()));
  for (int t = 0; t < 32; ++t) {
    EXPECT(out[t * 4 + 0] == 0xaaaaaaaau);
    EXPECT(out[t * 4 + 1] == 1u);
    EXPECT(out[t * 4 + 2] == 1u);
    EXPECT(out[t * 4 + 3] == (t < 16 ? 100u + (t + 8 < 16 ? t + 8 : t) : 0xff000000u), "lane " + std::to_string(t));
  }
}

// fastlstm's block reduction (block_reduce.cuh): every thread contributes, thread 0 holds the sums.
__global__ void block_sum_kernel(double* out) {
  double a = threadIdx.x + 1.0, b = 2.0 * blockIdx.x;
  fastlstm::cuda::block_sum2(a, b);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = a;
    out[2 * blockIdx.x + 1] = b;
  }
}

TEST(block_reduction_sums_every_thread) {
  for (int threads : {32, 96, 256, 1024}) {
    Managed<double> out(6, -1);
    FASTLSTM_LAUNCH(block_sum_kernel, 3, threads, 0, nullptr, out.p);
    EXPECT(ok(cudaDeviceSynchronize()));
    for (int blk = 0; blk < 3; ++blk) {
      EXPECT(out[2 * blk] == threads * (threads + 1) / 2.0, std::to_string(threads) + " threads");
      EXPECT(out[2 * blk + 1] == 2.0 * blk * threads);
    }
  }
}

// Staging through dynamic shared memory: each thread reads what its neighbour wrote.
__global__ void staging_kernel(float* out, int n) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 2.0f * i;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[(i + 1) % n];
}

TEST(dynamic_shared_memory_and_barrier) {
  const int n = 1000;
  Managed<float> out(n, -1);
  FASTLSTM_LAUNCH(staging_kernel, 1, 128, n * sizeof(float), nullptr, out.p, n);
  EXPECT(ok(cudaDeviceSynchronize()));
  for (int i = 0; i < n; ++i) EXPECT(out[i] == 2.0f * ((i + 1) % n));
}

#ifdef FASTLSTM_CUDA_EMU
__global__ void read_unwritten_kernel(float* out) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x];
}

TEST(dynamic_shared_memory_starts_as_nan) {
  Managed<float> out(64, 0);
  FASTLSTM_LAUNCH(read_unwritten_kernel, 1, 64, 64 * sizeof(float), nullptr, out.p);
  for (int i = 0; i < 64; ++i) EXPECT(std::isnan(out[i]));
}
#endif

// A grid-wide exchange: in round r every block publishes a value and reads its neighbour's.
__global__ void grid_exchange_kernel(int* slots, int* out, int rounds) {
  cg::grid_group grid = cg::this_grid();
  const int blk = static_cast<int>(blockIdx.x), nb = static_cast<int>(gridDim.x);
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) slots[blk] = 100 * r + blk;
    grid.sync();
    if (threadIdx.x == 0) out[r * nb + blk] = slots[(blk + 1) % nb];
    grid.sync();
  }
}

TEST(cooperative_grid_sync_is_a_barrier) {
  int dev = 0, sms = 0;
  cudaDeviceProp prop;
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&prop, dev);
  sms = prop.multiProcessorCount;
  const int rounds = 5;
  Managed<int> slots(sms, -1), out(rounds * sms, -1);
  int* s = slots.p;
  int* o = out.p;
  int r = rounds;
  void* args[] = {&s, &o, &r};
  EXPECT(ok(cudaLaunchCooperativeKernel(grid_exchange_kernel, dim3(sms), dim3(64), args, 0, nullptr)));
  EXPECT(ok(cudaDeviceSynchronize()));
  for (int k = 0; k < rounds; ++k) {
    for (int b = 0; b < sms; ++b) EXPECT(out[k * sms + b] == 100 * k + (b + 1) % sms);
  }
}

__global__ void atomic_kernel(unsigned long long* counter, float* sum) {
  atomicAdd(counter, 1ull);
  atomicAdd(sum, 0.5f);
}

TEST(atomics_count_every_thread) {
  Managed<unsigned long long> counter(1, 0);
  Managed<float> sum(1, 0);
  FASTLSTM_LAUNCH(atomic_kernel, 4, 96, 0, nullptr, counter.p, sum.p);
  EXPECT(ok(cudaDeviceSynchronize()));
  EXPECT(counter[0] == 4 * 96);
  EXPECT(sum[0] == 0.5f * 4 * 96);
}

__global__ void empty_kernel(int) {}

TEST(launch_limits_fail_like_cuda) {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  int per_sm = 0;
  EXPECT(ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, empty_kernel, 1024, 0)));
  EXPECT(per_sm == prop.maxThreadsPerMultiProcessor / 1024, std::to_string(per_sm));
  int x = 0;
  void* args[] = {&x};
  EXPECT(cudaLaunchCooperativeKernel(empty_kernel, dim3(per_sm * prop.multiProcessorCount + 1), dim3(1024), args, 0,
                                     nullptr) == cudaErrorCooperativeLaunchTooLarge);
  EXPECT(ok(cudaLaunchCooperativeKernel(empty_kernel, dim3(per_sm * prop.multiProcessorCount), dim3(1024), args, 0,
                                        nullptr)));
  // Dynamic shared memory above 48 KiB needs the attribute; beyond the opt-in limit nothing helps.
  cudaGetLastError();
  FASTLSTM_LAUNCH(empty_kernel, 1, 32, 64 * 1024, nullptr, 0);
  EXPECT(cudaGetLastError() != cudaSuccess);
  EXPECT(ok(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024)));
  FASTLSTM_LAUNCH(empty_kernel, 1, 32, 64 * 1024, nullptr, 0);
  EXPECT(ok(cudaGetLastError()));
  EXPECT(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(prop.sharedMemPerBlockOptin) + 1) != cudaSuccess);
}

// ---- thread-block clusters ----

// A launch of `clusters` clusters of `size` blocks along x (cudaLaunchKernelEx with the cluster
// dimension attribute).
template <class... P, class... A>
cudaError_t launch_clusters(void (*kernel)(P...), unsigned clusters, unsigned size, unsigned threads, size_t smem,
                            A... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = size;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(clusters * size);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// DSMEM ring: in round r every thread writes into the next rank's shared memory (double
// buffered by round parity), one cluster barrier, then reads what the previous rank wrote.
__global__ void ring_kernel(int* out, int rounds, unsigned* shape) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  int* buf = reinterpret_cast<int*>(smem);  // (2, blockDim.x)
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks(), n = blockDim.x, t = threadIdx.x;
  if (t == 0) {
    shape[blockIdx.x * 3] = rank;
    shape[blockIdx.x * 3 + 1] = size;
    shape[blockIdx.x * 3 + 2] = cluster.dim_blocks().x;
  }
  int* next = cluster.map_shared_rank(buf, (rank + 1) % size);
  for (int r = 0; r < rounds; ++r) {
    next[(r % 2) * n + t] = 100000 * r + 100 * static_cast<int>(blockIdx.x) + static_cast<int>(t);
    cluster.sync();
    out[(static_cast<size_t>(r) * gridDim.x + blockIdx.x) * n + t] = buf[(r % 2) * n + t];
  }
  cluster.sync();  // no block exits while a peer may still write into its shared memory
}

TEST(cluster_dsmem_ring_exchange) {
  for (unsigned size : {2u, 4u, 8u, 16u}) {
    EXPECT(ok(cudaFuncSetAttribute(ring_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)));
    const unsigned clusters = 2, threads = 64, blocks = clusters * size;
    const int rounds = 4;
    Managed<int> out(rounds * blocks * threads, -1);
    Managed<unsigned> shape(3 * blocks, 99);
    EXPECT(ok(launch_clusters(ring_kernel, clusters, size, threads, 2 * threads * sizeof(int), out.p, rounds,
                              shape.p)),
           "size " + std::to_string(size));
    EXPECT(ok(cudaDeviceSynchronize()));
    for (unsigned b = 0; b < blocks; ++b) {
      EXPECT(shape[3 * b] == b % size && shape[3 * b + 1] == size && shape[3 * b + 2] == size);
      const unsigned from = b / size * size + (b % size + size - 1) % size;
      for (int r = 0; r < rounds; ++r) {
        for (unsigned t = 0; t < threads; ++t) {
          const int want = 100000 * r + 100 * static_cast<int>(from) + static_cast<int>(t);
          EXPECT(out[(r * blocks + b) * threads + t] == want,
                 "size " + std::to_string(size) + " block " + std::to_string(b) + " round " + std::to_string(r));
        }
      }
    }
  }
}

// The split barrier: the DSMEM write, arrive, independent work (a global write), wait, the read.
__global__ void split_barrier_kernel(int* out, int* side, int rounds) {
  FASTLSTM_DYNAMIC_SMEM(smem);
  int* buf = reinterpret_cast<int*>(smem);  // (2, blockDim.x)
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks(), n = blockDim.x, t = threadIdx.x;
  int* prev = cluster.map_shared_rank(buf, (rank + size - 1) % size);
  for (int r = 0; r < rounds; ++r) {
    prev[(r % 2) * n + t] = 1000 * r + static_cast<int>(rank * n + t);
    cluster.barrier_arrive();
    side[(static_cast<size_t>(r) * gridDim.x + blockIdx.x) * n + t] = r;  // overlaps the other blocks' arrival
    cluster.barrier_wait();
    out[(static_cast<size_t>(r) * gridDim.x + blockIdx.x) * n + t] = buf[(r % 2) * n + t];
  }
  cluster.sync();
}

TEST(cluster_split_barrier) {
  const unsigned size = 4, threads = 32;
  const int rounds = 3;
  Managed<int> out(rounds * size * threads, -1), side(rounds * size * threads, -1);
  EXPECT(ok(launch_clusters(split_barrier_kernel, 1, size, threads, 2 * threads * sizeof(int), out.p, side.p, rounds)));
  EXPECT(ok(cudaDeviceSynchronize()));
  for (int r = 0; r < rounds; ++r) {
    for (unsigned b = 0; b < size; ++b) {
      for (unsigned t = 0; t < threads; ++t) {
        EXPECT(out[(r * size + b) * threads + t] == 1000 * r + static_cast<int>(((b + 1) % size) * threads + t));
        EXPECT(side[(r * size + b) * threads + t] == r);
      }
    }
  }
}

__global__ void empty_cluster_kernel(int) {}

TEST(cluster_launch_limits_fail_like_cuda) {
  // Beyond 8 blocks a cluster needs the non-portable attribute; beyond 16 nothing helps.
  EXPECT(cudaFuncSetAttribute(empty_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 0) == cudaSuccess);
  EXPECT(ok(launch_clusters(empty_cluster_kernel, 2, 8, 32, 0, 0)));
  EXPECT(launch_clusters(empty_cluster_kernel, 1, 16, 32, 0, 0) != cudaSuccess);
  cudaGetLastError();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 16;
  attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(16);
  config.blockDim = dim3(32);
  config.attrs = attr;
  config.numAttrs = 1;
  int clusters = -1;
  EXPECT(ok(cudaOccupancyMaxActiveClusters(&clusters, empty_cluster_kernel, &config)));
  EXPECT(clusters == 0, std::to_string(clusters));
  EXPECT(ok(cudaFuncSetAttribute(empty_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)));
  EXPECT(ok(cudaOccupancyMaxActiveClusters(&clusters, empty_cluster_kernel, &config)));
  EXPECT(clusters >= 1, std::to_string(clusters));
  EXPECT(ok(launch_clusters(empty_cluster_kernel, 1, 16, 32, 0, 0)));
  EXPECT(launch_clusters(empty_cluster_kernel, 1, 32, 32, 0, 0) != cudaSuccess);
  cudaGetLastError();
  // The grid must be a multiple of the cluster.
  config.gridDim = dim3(24);
  EXPECT(cudaLaunchKernelEx(&config, empty_cluster_kernel, 0) != cudaSuccess);
  cudaGetLastError();
}

// One tensor-core k tile per warp: D = A B + C from tiles in memory, through the loaders: A packed
// (a_rows null), or A gathered into its register fragment from the row-major tile a_rows.
template <fastlstm::cuda::MmaInput In>
__global__ void mma_kernel(const typename fastlstm::cuda::TensorCore<In>::Elem* a,
                           const typename fastlstm::cuda::TensorCore<In>::Elem* a_rows,
                           const typename fastlstm::cuda::TensorCore<In>::Elem* b_cols, const float* c, float* d) {
  using namespace fastlstm::cuda;
  constexpr int K = TensorCore<In>::kK;
  FragmentC fd;
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  fd.reg[0] = c[g * 8 + 2 * q];
  fd.reg[1] = c[g * 8 + 2 * q + 1];
  fd.reg[2] = c[(g + 8) * 8 + 2 * q];
  fd.reg[3] = c[(g + 8) * 8 + 2 * q + 1];
  if (a_rows) {
    const FragmentA fa = TensorCore<In>::gather_a([&](int i, int k) { return a_rows[i * K + k]; });
    TensorCore<In>::multiply_add(fd, fa, TensorCore<In>::load_b(b_cols, K));
  } else {
    TensorCore<In>::multiply_add(fd, load_packed_a(a), TensorCore<In>::load_b(b_cols, K));
  }
  store_fragment_c(fd, d, 8);
}

// Values k / 8 with |k| <= 24 are exact in bf16, fp16 and tf32, and so is every sum of 16 products:
// the tensor-core result must equal the plain product exactly.
uint32_t to_bits(float v, fastlstm::cuda::MmaInput in) {
  uint32_t f;
  std::memcpy(&f, &v, sizeof f);
  if (in == fastlstm::cuda::MmaInput::TF32) return f;
  if (in == fastlstm::cuda::MmaInput::BF16) return f >> 16;
  if (v == 0) return (f >> 16) & 0x8000u;
  const uint32_t sign = (f >> 16) & 0x8000u, exp = (f >> 23) & 0xffu, mant = f & 0x7fffffu;
  return sign | ((exp - 112) << 10) | (mant >> 13);
}

template <fastlstm::cuda::MmaInput In>
void check_mma(const char* name) {
  using Elem = typename fastlstm::cuda::TensorCore<In>::Elem;
  constexpr int K = fastlstm::cuda::TensorCore<In>::kK;
  Managed<Elem> a(16 * K), a_rows(16 * K), b(8 * K);
  Managed<float> c(16 * 8);
  std::vector<float> av(16 * K), bv(K * 8);  // bv[k * 8 + n]
  for (int i = 0; i < 16 * K; ++i) av[i] = static_cast<float>((i * 7 + 3) % 49 - 24) / 8;
  for (int i = 0; i < K * 8; ++i) bv[i] = static_cast<float>((i * 5 + 1) % 41 - 20) / 8;
  for (int i = 0; i < 16; ++i) {
    for (int k = 0; k < K; ++k) {
      a[fastlstm::cuda::TensorCore<In>::packed_a_index(i, k)] = static_cast<Elem>(to_bits(av[i * K + k], In));
      a_rows[i * K + k] = static_cast<Elem>(to_bits(av[i * K + k], In));
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int n = 0; n < 8; ++n) b[n * K + k] = static_cast<Elem>(to_bits(bv[k * 8 + n], In));  // column by column
  }
  for (int i = 0; i < 16 * 8; ++i) c[i] = static_cast<float>(i % 9) - 4;
  for (const bool gathered : {false, true}) {
    Managed<float> d(16 * 8, -1);
    FASTLSTM_LAUNCH(mma_kernel<In>, 1, 32, 0, nullptr, a.p, gathered ? a_rows.p : nullptr, b.p, c.p, d.p);
    EXPECT(ok(cudaDeviceSynchronize()));
    const std::string what = std::string(name) + (gathered ? ", A gathered into registers" : ", A packed");
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 8; ++n) {
        double want = c[m * 8 + n];
        for (int k = 0; k < K; ++k) want += static_cast<double>(av[m * K + k]) * bv[k * 8 + n];
        EXPECT(d[m * 8 + n] == want, what + " D[" + std::to_string(m) + "][" + std::to_string(n) +
                                         "] = " + std::to_string(d[m * 8 + n]) + ", want " + std::to_string(want));
      }
    }
  }
}

TEST(mma_matches_a_plain_product) {
  check_mma<fastlstm::cuda::MmaInput::BF16>("bf16 m16n8k16");
  check_mma<fastlstm::cuda::MmaInput::F16>("fp16 m16n8k16");
  check_mma<fastlstm::cuda::MmaInput::TF32>("tf32 m16n8k8");
}

// float32 to tf32: nearest, ties away from zero; inf and NaN unchanged.
__global__ void tf32_kernel(const float* in, uint32_t* out, int n) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) {
    out[i] = fastlstm::cuda::to_tf32(in[i]);
  }
}

TEST(tf32_rounding) {
  const float inf = std::numeric_limits<float>::infinity();
  // 1 + 2^-11 is a tie (rounds away to 1 + 2^-10); 1 + 2^-11 - 2^-23 rounds down; -(1 + 3 * 2^-11) up in magnitude.
  const std::vector<float> in = {1.0f, 1.0f + std::ldexp(1.0f, -11), 1.0f + std::ldexp(1.0f, -11) - std::ldexp(1.0f, -23),
                                 -(1.0f + 3 * std::ldexp(1.0f, -11)), inf, -inf, 0.0f};
  const std::vector<float> want = {1.0f, 1.0f + std::ldexp(1.0f, -10), 1.0f, -(1.0f + 2 * std::ldexp(1.0f, -10)),
                                   inf, -inf, 0.0f};
  const int n = static_cast<int>(in.size());
  Managed<float> x(n);
  Managed<uint32_t> y(n);
  for (int i = 0; i < n; ++i) x[i] = in[i];
  FASTLSTM_LAUNCH(tf32_kernel, 1, 32, 0, nullptr, x.p, y.p, n);
  EXPECT(ok(cudaDeviceSynchronize()));
  for (int i = 0; i < n; ++i) {
    float got;
    std::memcpy(&got, &y[i], sizeof got);
    EXPECT(got == want[i], "to_tf32(" + std::to_string(in[i]) + ") = " + std::to_string(got));
  }
}

#ifdef FASTLSTM_CUDA_EMU
// ---- the harness aborts, with a message, where CUDA would hang or be undefined ----

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}
DEATH_TEST(divergent_syncthreads_aborts, "divergent __syncthreads()") {
  FASTLSTM_LAUNCH(divergent_barrier_kernel, 1, 64, 0, nullptr);
}

__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
DEATH_TEST(shuffle_waiting_for_exited_lane_aborts, "which has exited") {
  Managed<float> out(32);
  FASTLSTM_LAUNCH(shuffle_after_exit_kernel, 1, 32, 0, nullptr, out.p);
}

__global__ void shuffle_vs_barrier_kernel() {
  if (threadIdx.x == 3) {
    __syncthreads();
  } else {
    __shfl_xor_sync(0xffffffffu, 1, 1);
    __syncthreads();
  }
}
DEATH_TEST(shuffle_waiting_for_a_lane_at_a_barrier_aborts, "waits at __syncthreads()") {
  FASTLSTM_LAUNCH(shuffle_vs_barrier_kernel, 1, 32, 0, nullptr);
}

__global__ void foreign_mask_kernel() { __shfl_xor_sync(0x0000ffffu, 1, 1); }
DEATH_TEST(mask_without_own_lane_aborts, "does not include its own lane") {
  FASTLSTM_LAUNCH(foreign_mask_kernel, 1, 32, 0, nullptr);
}

__global__ void read_outside_mask_kernel() {
  if (threadIdx.x < 16) __shfl_xor_sync(0x0000ffffu, 1, 16);
}
DEATH_TEST(shuffle_reading_outside_its_mask_aborts, "not in the mask") {
  FASTLSTM_LAUNCH(read_outside_mask_kernel, 1, 32, 0, nullptr);
}

__global__ void grid_sync_kernel() { cg::this_grid().sync(); }
DEATH_TEST(grid_sync_outside_cooperative_launch_aborts, "not cooperative") {
  FASTLSTM_LAUNCH(grid_sync_kernel, 2, 32, 0, nullptr);
}

__global__ void early_exit_grid_kernel() {
  if (blockIdx.x == 1) return;
  cg::this_grid().sync();
}
DEATH_TEST(block_exiting_before_grid_sync_aborts, "have exited while") {
  void* args[] = {nullptr};
  cudaLaunchCooperativeKernel(early_exit_grid_kernel, dim3(2), dim3(32), args, 0, nullptr);
}

__global__ void cluster_sync_kernel() { cg::this_cluster().sync(); }
DEATH_TEST(cluster_sync_outside_a_cluster_launch_aborts, "in a launch without clusters") {
  FASTLSTM_LAUNCH(cluster_sync_kernel, 2, 32, 0, nullptr);
}

__global__ void early_exit_cluster_kernel(int) {
  if (cg::this_cluster().block_rank() == 1) return;
  cg::this_cluster().sync();
}
DEATH_TEST(block_exiting_while_its_cluster_waits_aborts, "has exited while") {
  launch_clusters(early_exit_cluster_kernel, 1, 2, 32, 0, 0);
}

__global__ void wait_without_arrive_kernel(int) { cg::this_cluster().barrier_wait(); }
DEATH_TEST(cluster_wait_without_arrive_aborts, "without having arrived") {
  launch_clusters(wait_without_arrive_kernel, 1, 2, 32, 0, 0);
}

__global__ void double_arrive_kernel(int) {
  cg::this_cluster().barrier_arrive();
  cg::this_cluster().barrier_arrive();
}
DEATH_TEST(cluster_arrive_twice_aborts, "twice without waiting") {
  launch_clusters(double_arrive_kernel, 1, 2, 32, 0, 0);
}

__global__ void map_static_kernel(int) {
  __shared__ int x;
  cg::this_cluster().map_shared_rank(&x, 1)[0] = 1;
}
DEATH_TEST(mapping_static_shared_memory_aborts, "static __shared__ variables are not supported") {
  launch_clusters(map_static_kernel, 1, 2, 32, 64, 0);
}

__global__ void spin_kernel(volatile int* flag) {
  while (*flag == 0) {}
}
DEATH_TEST(a_kernel_that_never_returns_trips_the_watchdog, "did not finish within") {
  setenv("CUDA_EMU_TIMEOUT_S", "1", 1);
  Managed<int> flag(1, 0);
  FASTLSTM_LAUNCH(spin_kernel, 1, 1, 0, nullptr, flag.p);
}
#endif

}  // namespace

int main(int argc, char** argv) { return check::main(argc, argv); }
