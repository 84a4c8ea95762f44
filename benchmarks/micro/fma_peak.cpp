// The machine's float32 FMA ceiling: vfmadd231ps throughput with 12 independent accumulators per
// thread (more than latency x ports on current x86 cores, so the chain never stalls), on ymm
// (AVX2) and zmm (AVX-512) registers, on 1 and 2 threads. What the kernels' GFLOP/s compare to.
// Also vdpbf16ps on zmm (AVX512-BF16: 32 bfloat16 pairs, 64 flops per instruction), the
// instruction of the bfloat16 kernels without AMX (csrc/cpu/kernels/avx512_bf16/).
// Built with the build machine's widest SIMD flags (build.sh): zmm only on an AVX-512 machine.
//   benchmarks/micro/build.sh && benchmarks/micro/fma_peak [seconds per measurement, default 0.5]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int kAccumulators = 12;

// Runs `iterations` rounds of kAccumulators independent FMAs; returns a sum so nothing is elided.
template <class V, V (*Set1)(float), V (*Fma)(V, V, V), float (*First)(V)>
float fma_chain(long iterations) {
  V acc[kAccumulators];
  for (int i = 0; i < kAccumulators; ++i) acc[i] = Set1(1.0f + 1e-3f * i);
  const V a = Set1(0.999999f), b = Set1(1e-7f);
  for (long n = 0; n < iterations; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kAccumulators; ++i) acc[i] = Fma(acc[i], a, b);
  }
  float s = 0;
  for (int i = 0; i < kAccumulators; ++i) s += First(acc[i]);
  return s;
}

inline __m256 set256(float v) { return _mm256_set1_ps(v); }
inline __m256 fma256(__m256 x, __m256 a, __m256 b) { return _mm256_fmadd_ps(x, a, b); }
inline float first256(__m256 v) { return _mm256_cvtss_f32(v); }
float run256(long n) { return fma_chain<__m256, set256, fma256, first256>(n); }
#ifdef __AVX512F__
inline __m512 set512(float v) { return _mm512_set1_ps(v); }
inline __m512 fma512(__m512 x, __m512 a, __m512 b) { return _mm512_fmadd_ps(x, a, b); }
inline float first512(__m512 v) { return _mm512_cvtss_f32(v); }
float run512(long n) { return fma_chain<__m512, set512, fma512, first512>(n); }
#endif
#ifdef __AVX512BF16__
// The float constants' bit patterns read as bfloat16 pairs: 1.0039 with 1.0039 (bits 0x3F80 0x3F81).
inline __m512 dp512(__m512 x, __m512 a, __m512 b) {
  return _mm512_dpbf16_ps(x, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}
inline __m512 set_pairs(float) { return _mm512_castsi512_ps(_mm512_set1_epi32(0x3F803F81)); }
float run_dp512(long n) { return fma_chain<__m512, set_pairs, dp512, first512>(n); }
#endif

// GFLOP/s of `threads` threads each running run(iterations) (2 flops per lane per FMA).
double gflops(float (*run)(long), int lanes, int threads, long iterations) {
  std::vector<std::thread> pool;
  std::vector<float> sink(threads);
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[t] = run(iterations); });
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (sink[0] == 12345.f) std::puts("");
  return 2.0 * lanes * kAccumulators * iterations * threads / s / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
  __builtin_cpu_init();
  struct Isa {
    const char* name;
    float (*run)(long);
    int lanes;
    bool supported;
  };
  const Isa isas[] = {
    {"AVX2 ymm", run256, 8, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")},
#ifdef __AVX512F__  // built with build.sh's AVX-512 flags (an AVX-512 build machine)
    {"AVX-512 zmm", run512, 16, __builtin_cpu_supports("avx512f") != 0},
#endif
#ifdef __AVX512BF16__  // an AVX512-BF16 build machine; lanes: the 32 bfloat16 pairs
    {"vdpbf16ps zmm", run_dp512, 32, __builtin_cpu_supports("avx512bf16") != 0},
#endif
  };
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (const Isa& isa : isas) {
    if (!isa.supported) continue;
    // Size the loop to about `seconds` on one thread, then take the best of 5 runs per count.
    long iterations = 1 << 20;
    while (true) {
      const double g = gflops(isa.run, isa.lanes, 1, iterations);
      const double s = 2.0 * isa.lanes * kAccumulators * iterations / (g * 1e9);
      if (s > seconds / 4) {
        iterations = static_cast<long>(iterations * seconds / s);
        break;
      }
      iterations *= 4;
    }
    for (int threads : {1, 2}) {
      if (threads > hw) continue;
      double best = 0;
      for (int rep = 0; rep < 5; ++rep) best = std::max(best, gflops(isa.run, isa.lanes, threads, iterations));
      std::printf("%-12s %d thread%s: %7.1f GFLOP/s (best of 5, %.2f s each)\n", isa.name, threads,
                  threads > 1 ? "s" : " ", best, seconds);
    }
  }
  return 0;
}
