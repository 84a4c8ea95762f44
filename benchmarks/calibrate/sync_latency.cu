// Calibration of the costs a persistent LSTM step cannot avoid (PERF.md, "Calibrate first"):
//   1. grid.sync() latency, all SMs, 128/256/512 threads per block
//   2. a counter barrier through L2 plus the exchange of a 1-4 KiB h vector (what the persistent
//      kernels' one barrier per step costs, with the data it must move)
//   3. cluster.sync() at cluster sizes 2/4/8/16 and a DSMEM broadcast of 1-4 KiB (Hopper)
//   4. an empty kernel: plain launch vs replayed in a CUDA graph
// Each latency is (time of 2N iterations - time of N) / N, so launch overheads cancel.
// Build and run (on the GPU machine):
//   nvcc -O3 -arch=sm_90 -o sync_latency benchmarks/calibrate/sync_latency.cu && ./sync_latency
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace cg = cooperative_groups;

#define CHECK(call)                                                                          \
  do {                                                                                       \
    cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_));      \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

__global__ void grid_sync_loop(int iterations) {
  cg::grid_group grid = cg::this_grid();
  for (int i = 0; i < iterations; ++i) grid.sync();
}

// Every block writes `words` floats of its own slice of h, then a generation barrier on a global
// counter, then reads all of h back (what one persistent step exchanges).
__global__ void l2_exchange_loop(int iterations, float* h, int words, unsigned* counter, unsigned* generation) {
  const unsigned blocks = gridDim.x;
  float acc = 0.f;
  for (int i = 0; i < iterations; ++i) {
    for (int w = threadIdx.x; w < words; w += blockDim.x) h[blockIdx.x * words + w] = acc + w;
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned gen = atomicAdd(generation, 0u);
      __threadfence();
      if (atomicAdd(counter, 1u) == blocks - 1) {
        atomicExch(counter, 0u);
        __threadfence();
        atomicAdd(generation, 1u);
      } else {
        while (atomicAdd(generation, 0u) == gen) {
        }
      }
      __threadfence();
    }
    __syncthreads();
    for (int w = threadIdx.x; w < words * (int)blocks; w += blockDim.x) acc += __ldcg(h + w);
  }
  if (acc == -1.f) h[0] = acc;  // keep the reads alive
}

__global__ void cluster_sync_loop(int iterations, int words, float* sink) {
  extern __shared__ float buf[];
  cg::cluster_group cluster = cg::this_cluster();
  float acc = 0.f;
  for (int i = 0; i < iterations; ++i) {
    for (int w = threadIdx.x; w < words; w += blockDim.x) buf[w] = acc + w;
    cluster.sync();
    // Read the neighbour's words through distributed shared memory.
    const float* remote = cluster.map_shared_rank(buf, (cluster.block_rank() + 1) % cluster.num_blocks());
    for (int w = threadIdx.x; w < words; w += blockDim.x) acc += remote[w];
    cluster.sync();
  }
  if (acc == -1.f) sink[0] = acc;
}

__global__ void empty_kernel() {}

float time_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

template <class Launch>
double per_iteration_us(Launch launch, int n) {
  cudaEvent_t e0, e1, e2;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  CHECK(cudaEventCreate(&e2));
  launch(n);  // warm-up
  CHECK(cudaEventRecord(e0));
  launch(n);
  CHECK(cudaEventRecord(e1));
  launch(2 * n);
  CHECK(cudaEventRecord(e2));
  CHECK(cudaEventSynchronize(e2));
  const double us = (time_ms(e1, e2) - time_ms(e0, e1)) * 1000.0 / n;
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  CHECK(cudaEventDestroy(e2));
  return us;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %zu KiB shared memory per block (opt-in)\n", prop.name, prop.multiProcessorCount,
              prop.sharedMemPerBlockOptin / 1024);
  const int sms = prop.multiProcessorCount, n = 2000;

  std::printf("\n| measurement | config | us per iteration |\n|---|---|---|\n");
  for (int threads : {128, 256, 512}) {
    const double us = per_iteration_us(
        [&](int iters) {
          void* args[] = {&iters};
          CHECK(cudaLaunchCooperativeKernel((void*)grid_sync_loop, sms, threads, args, 0, 0));
        },
        n);
    std::printf("| grid.sync | %d blocks x %d threads | %.3f |\n", sms, threads, us);
  }

  float* h;
  unsigned *counter, *generation;
  CHECK(cudaMalloc(&h, sizeof(float) * 1024 * sms));
  CHECK(cudaMalloc(&counter, sizeof(unsigned)));
  CHECK(cudaMalloc(&generation, sizeof(unsigned)));
  CHECK(cudaMemset(counter, 0, sizeof(unsigned)));
  CHECK(cudaMemset(generation, 0, sizeof(unsigned)));
  for (int target_bytes : {1024, 2048, 4096}) {
    // Each block owns an equal slice of h, whole words, rounded up so that h is at least the target
    // size; the label gives the bytes really exchanged (words x 4 x blocks), not the target.
    const int words = (target_bytes / 4 + sms - 1) / sms;
    const long exchanged = 4L * words * sms;
    const double us = per_iteration_us(
        [&](int iters) {
          int words_arg = words;
          void* args[] = {&iters, &h, &words_arg, &counter, &generation};
          CHECK(cudaLaunchCooperativeKernel((void*)l2_exchange_loop, sms, 256, args, 0, 0));
        },
        n);
    std::printf("| L2 counter barrier + exchange | h = %ld B (%d words per block) over %d blocks | %.3f |\n",
                exchanged, words, sms, us);
  }

  if (prop.major >= 9) {
    CHECK(cudaFuncSetAttribute(cluster_sync_loop, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    CHECK(cudaFuncSetAttribute(cluster_sync_loop, cudaFuncAttributeMaxDynamicSharedMemorySize, 4096));
    for (int cluster : {2, 4, 8, 16}) {
      for (int bytes : {1024, 4096}) {
        int words = bytes / 4;
        const double us = per_iteration_us(
            [&](int iters) {
              cudaLaunchConfig_t config = {};
              config.gridDim = dim3(cluster);
              config.blockDim = dim3(256);
              config.dynamicSmemBytes = bytes;
              cudaLaunchAttribute attr;
              attr.id = cudaLaunchAttributeClusterDimension;
              attr.val.clusterDim.x = cluster;
              attr.val.clusterDim.y = 1;
              attr.val.clusterDim.z = 1;
              config.attrs = &attr;
              config.numAttrs = 1;
              CHECK(cudaLaunchKernelEx(&config, cluster_sync_loop, iters, words, h));
            },
            n);
        // Two cluster.sync() per iteration: report one sync plus half the DSMEM read.
        std::printf("| cluster.sync + DSMEM read | cluster %d, %d B | %.3f |\n", cluster, bytes, us / 2);
      }
    }
  } else {
    std::printf("| cluster.sync | needs sm_90 | n/a |\n");
  }

  const double plain = per_iteration_us(
      [&](int iters) {
        for (int i = 0; i < iters; ++i) empty_kernel<<<1, 32>>>();
        CHECK(cudaGetLastError());
      },
      n);
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  const int per_graph = 100;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < per_graph; ++i) empty_kernel<<<1, 32, 0, stream>>>();
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double graphed = per_iteration_us(
      [&](int iters) {
        for (int i = 0; i < iters / per_graph; ++i) CHECK(cudaGraphLaunch(exec, 0));
      },
      n);
  std::printf("| empty kernel | plain launch | %.3f |\n", plain);
  // n iterations replay n / per_graph graphs of per_graph kernels: the figure is per kernel.
  std::printf("| empty kernel | inside a CUDA graph | %.3f |\n", graphed);
  CHECK(cudaDeviceSynchronize());
  return 0;
}
