// The packed kernel (csrc/cpu/packed_gemm_cpu.h) against ATen's mm (the vendor BLAS) on this
// library's products with a weight, float32, the two sides interleaved:
//   proj      C[M, 4H]  = X[M, I] W_ih^T      input projection (forward), I = H
//   dx        C[M, I]   = dG[M, 4H] W_ih      input gradient (backward)
//   step      G[B, 4H] += h[B, H] W_hh^T      recurrent product of the stepwise path
//   step_bwd  D[B, H]  += dG[B, 4H] W_hh      its backward
//   dw        dW[4H, I] = dG[M, 4H]^T X[M, I]  weight gradient (backward), I = H: the in-place
//             kernel (GemmKernels::multiply_at, computing dW^T, then transposed as the layer does)
// Both sides are called as lstm_layer_cpu.cpp calls them (at::mm_out / addmm_ on the weight or
// its transposed view); the packed side runs the extension's own kernel objects, at the level
// ATEN_CPU_CAPABILITY allows. The weight is packed once per layer call: its cost is a column.
//   benchmarks/micro/build.sh && benchmarks/micro/gemm_micro [threads (2)] [repeats (7)] [H ...]
// With "bf16" first (CPUs with AVX512-BF16): the bfloat16 input projection, packed vdpbf16ps
// kernel against ATen's bfloat16 mm, see compare_bf16_projection.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_capability.h"
#include "cpu/packed_gemm_cpu.h"

namespace {

using fastlstm::cpu::PackedMatrix;
using Clock = std::chrono::steady_clock;

double seconds_of(const std::function<void()>& f) {
  const auto start = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Stats {
  double median, min;
};

Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front()};
}

// Per-call times of a and b: repeats samples each, interleaved with the order alternating, each
// sample enough calls for about 20 ms of a.
std::pair<Stats, Stats> interleaved(const std::function<void()>& a, const std::function<void()>& b, int repeats) {
  const double one = std::min(seconds_of(a), seconds_of(a));
  const int calls = std::max(1, static_cast<int>(0.02 / std::max(one, 1e-7)));
  auto sample = [&](const std::function<void()>& f) {
    return seconds_of([&] {
             for (int i = 0; i < calls; ++i) f();
           }) / calls;
  };
  std::vector<double> ta, tb;
  for (int r = 0; r < repeats; ++r) {
    if (r % 2) {
      ta.push_back(sample(a));
      tb.push_back(sample(b));
    } else {
      tb.push_back(sample(b));
      ta.push_back(sample(a));
    }
  }
  return {stats(ta), stats(tb)};
}

// One product, both ways: packed(A, C) and blas(A, C) compute the same C from A.
struct Product {
  std::string name;
  int64_t M, K, N;
  bool accumulate, forward;
  // The library's choice for this product (packed_gemm_cpu.h).
  bool library_packs() const {
    return forward ? K <= fastlstm::cpu::forward_packed_max_depth() : M <= fastlstm::cpu::packed_max_rows();
  }
};

void compare(const Product& p, const at::Tensor& w, bool transposed, int repeats) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::randn({p.M, p.K}, f32), c = at::zeros({p.M, p.N}, f32);
  // W as the library stores it: W_ih (4H, I) / W_hh (4H, H); the product reads W^T or W.
  const int64_t rows = w.size(0), cols = w.size(1);
  PackedMatrix<float> packed;
  const double pack_s = seconds_of([&] {
    packed = transposed ? PackedMatrix<float>(w.data_ptr<float>(), cols, rows, 1, cols)
                        : PackedMatrix<float>(w.data_ptr<float>(), rows, cols, cols, 1);
  });
  const at::Tensor b = transposed ? w.t() : w;
  at::Tensor cc = c;
  auto run_packed = [&] { packed.multiply(p.M, a.data_ptr<float>(), c.data_ptr<float>(), p.accumulate); };
  auto run_blas = [&] {
    if (p.accumulate) {
      cc.addmm_(a, b);
    } else {
      at::mm_out(cc, a, b);
    }
  };
  // Check once that both compute the same product.
  c.zero_();
  run_packed();
  const at::Tensor ref = c.clone();
  c.zero_();
  run_blas();
  const double err = (c - ref).abs().max().item<double>() / std::max(1e-30, ref.abs().max().item<double>());
  if (err > 1e-4) std::fprintf(stderr, "%s M=%lld: packed and mm differ by %g (relative)\n", p.name.c_str(),
                               (long long)p.M, err);
  const auto [sp, sb] = interleaved(run_packed, run_blas, repeats);
  const double flops = 2.0 * p.M * p.K * p.N;
  std::printf("| %s | %lld | %lld | %lld | %.4g / %.4g | %.4g / %.4g | %.2f | %.0f / %.0f | %.3g | %s | %s |\n",
              p.name.c_str(), (long long)p.M, (long long)p.K, (long long)p.N, sp.median * 1e3, sp.min * 1e3,
              sb.median * 1e3, sb.min * 1e3, sb.median / sp.median, flops / sp.min / 1e9, flops / sb.min / 1e9,
              pack_s * 1e3, sb.median < sp.median ? "mm" : "packed", p.library_packs() ? "packed" : "mm");
  std::fflush(stdout);
}

// The weight gradient dW = dG^T X both ways, as CpuPolicy::weight_gradient computes it: the
// in-place kernel into dW^T, then made a contiguous dW; or ATen's mm on dG's transposed view.
void compare_weight_gradient(int64_t M, int64_t H, int repeats) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor dg = at::randn({M, 4 * H}, f32), x = at::randn({M, H}, f32);
  at::Tensor wt = at::empty({H, 4 * H}, f32), dw = at::empty({4 * H, H}, f32), ref = at::empty({4 * H, H}, f32);
  const auto& kernels = fastlstm::cpu::gemm_kernels<float>();
  auto run_packed = [&] {
    kernels.multiply_at(M, H, 4 * H, x.data_ptr<float>(), dg.data_ptr<float>(), wt.data_ptr<float>());
    dw.copy_(wt.t());
  };
  auto run_blas = [&] { at::mm_out(ref, dg.t(), x); };
  run_packed();
  run_blas();
  const double err = (dw - ref).abs().max().item<double>() / std::max(1e-30, ref.abs().max().item<double>());
  if (err > 1e-4) std::fprintf(stderr, "dw M=%lld: packed and mm differ by %g (relative)\n", (long long)M, err);
  const auto [sp, sb] = interleaved(run_packed, run_blas, repeats);
  const double flops = 2.0 * M * H * 4 * H;
  std::printf("| dw | %lld | %lld | %lld | %.4g / %.4g | %.4g / %.4g | %.2f | %.0f / %.0f | - | %s | %s |\n",
              (long long)M, (long long)(4 * H), (long long)H, sp.median * 1e3, sp.min * 1e3, sb.median * 1e3,
              sb.min * 1e3, sb.median / sp.median, flops / sp.min / 1e9, flops / sb.min / 1e9,
              sb.median < sp.median ? "mm" : "packed", fastlstm::cpu::packed_products_only() ? "packed" : "mm");
  std::fflush(stdout);
}

// The bfloat16 input projection, gates[M, 4H] = x[M, I] W_ih^T (I = H) in float32, two ways: the
// packed kernel (bf16_kernels_cpu.h, float32 out, as Bf16Policy calls it: on AMX tiles, or with
// vdpbf16ps under FASTLSTM_CPU_AMX=0; the first line names which) and ATen's bfloat16 mm (oneDNN;
// bfloat16 out, widened to float32 into the gates).
void compare_bf16_projection(int64_t M, int64_t H, int repeats) {
  const auto bf = at::TensorOptions().dtype(at::kBFloat16);
  const at::Tensor x = at::randn({M, H}, bf), w = (at::randn({4 * H, H}) * 0.05).to(at::kBFloat16);
  at::Tensor gates = at::empty({M, 4 * H}), scratch = at::empty({M, 4 * H}, bf);
  const fastlstm::cpu::PackedMatrix<c10::BFloat16> packed(w.data_ptr<c10::BFloat16>(), H, 4 * H, 1, H);
  auto run_packed = [&] { packed.multiply(M, x.data_ptr<c10::BFloat16>(), gates.data_ptr<float>(), false); };
  auto run_mm = [&] {
    at::mm_out(scratch, x, w.t());
    gates.copy_(scratch);
  };
  run_packed();
  const at::Tensor ref = gates.clone();
  run_mm();
  const double err = (gates - ref).abs().max().item<double>() / ref.abs().max().item<double>();
  const auto [sp, sm] = interleaved(run_packed, run_mm, repeats);
  const double flops = 2.0 * M * H * 4 * H;
  std::printf("| proj bf16 | %lld | %lld | %lld | %.4g / %.4g | %.4g / %.4g | %.2f | %.0f / %.0f | %.1e |\n",
              (long long)M, (long long)H, (long long)(4 * H), sp.median * 1e3, sp.min * 1e3, sm.median * 1e3,
              sm.min * 1e3, sm.median / sp.median, flops / sp.min / 1e9, flops / sm.min / 1e9, err);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "bf16") {  // gemm_micro bf16 [threads] [repeats] [H ...]
    TORCH_CHECK(fastlstm::cpu::bf16_kernels() != nullptr, "gemm_micro bf16: this CPU (or level) has no AVX512-BF16 kernels");
    const int threads = argc > 2 ? std::atoi(argv[2]) : 2, repeats = argc > 3 ? std::atoi(argv[3]) : 7;
    std::vector<int64_t> hs;
    for (int i = 4; i < argc; ++i) hs.push_back(std::atoll(argv[i]));
    if (hs.empty()) hs = {64, 128, 256, 512};
    at::set_num_threads(threads);
    at::manual_seed(0);
    std::printf("bfloat16 input projection, %s, torch %s, %d threads, %d interleaved samples per side\n\n",
                fastlstm::cpu::capability_report(), at::get_cpu_capability().c_str(), at::get_num_threads(), repeats);
    std::printf("| product | M | K | N | packed ms (median / min) | bf16 mm + widen ms (median / min) "
                "| packed speedup (mm / packed) | GFLOP/s at min (packed / mm) | max rel. diff |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    for (const int64_t H : hs)
      for (const int64_t M : {256, 2048, 16000}) compare_bf16_projection(M, H, repeats);
    return 0;
  }
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 7;
  std::vector<int64_t> hs;
  for (int i = 3; i < argc; ++i) hs.push_back(std::atoll(argv[i]));
  if (hs.empty()) hs = {64, 128, 256, 512, 768};
  at::set_num_threads(threads);
  at::manual_seed(0);
  std::printf("packed kernel level %s, torch %s, %d threads, %d interleaved samples per side\n\n",
              fastlstm::cpu::capability_name(fastlstm::cpu::capability()), at::get_cpu_capability().c_str(),
              at::get_num_threads(), repeats);
  std::printf("| product | M | K | N | packed ms (median / min) | mm ms (median / min) | packed speedup (mm / packed) "
              "| GFLOP/s at min (packed / mm) | pack ms | faster | library |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (const int64_t H : hs) {
    const at::Tensor w = at::randn({4 * H, H}, f32) * 0.05;  // W_ih with I = H, or W_hh
    for (const int64_t M : {256, 2048, 16000}) compare({"proj", M, H, 4 * H, false, true}, w, true, repeats);
    for (const int64_t M : {256, 2048, 16000}) compare({"dx", M, 4 * H, H, false, false}, w, false, repeats);
    for (const int64_t B : {1, 16, 64}) compare({"step", B, H, 4 * H, true, true}, w, true, repeats);
    for (const int64_t B : {1, 16, 64}) compare({"step_bwd", B, 4 * H, H, true, false}, w, false, repeats);
    for (const int64_t M : {2048, 16000}) compare_weight_gradient(M, H, repeats);
  }
  return 0;
}
