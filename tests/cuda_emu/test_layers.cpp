// The CUDA layer ops, host code and kernels, run on the CPU harness and compared with the CPU path.
//
// The reference is the CPU path in float64 on the same inputs (rounded to the dtype under test).
// Both kernels of each op are reached through the dispatcher: the CPU kernel as usual, the CUDA
// kernel (csrc/cuda/lstm_layer_cuda.cpp, the shared LayerDriver with the CUDA policy, cuBLAS
// replaced by gemm_stand_in.cpp) by redispatching to the CUDA key with the same CPU tensors.
// Every buffer the kernels allocate is poisoned with NaN, so an unwritten element fails.
// Tolerances, relative to the reference's largest magnitude: float64 1e-10, float32 2e-5,
// float16 1e-2, bfloat16 2e-2.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/cuda/lstm_cluster_cuda.h"
#include "../../csrc/cuda/lstm_persistent_cuda.h"
#include "../../csrc/cuda/persistent_support.h"
#include "../../csrc/fastlstm/buffers.h"
#include "../../csrc/fastlstm/layer_op.h"
#include "check.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using ForwardSig = fastlstm::ForwardOut(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                        const OptTensor&, bool, int64_t, int64_t, double, c10::string_view,
                                        c10::string_view);
using BackwardSig = fastlstm::BackwardOut(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                          const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, int64_t,
                                          int64_t, double,
                                          c10::string_view, bool, bool, c10::string_view);

const c10::DispatchKeySet kCpu(c10::DispatchKey::CPU), kCuda(c10::DispatchKey::CUDA);

c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastlstm::layer_forward", "").typed<ForwardSig>();
  return op;
}
c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastlstm::layer_backward", "").typed<BackwardSig>();
  return op;
}

struct Case {
  at::ScalarType dtype = at::kFloat;
  std::string backend = "persistent";
  int64_t T = 7, B = 5, I = 3, H = 24, P = 0;
  bool bias = true, reverse = false, packed = false, norms = false, input_grad = true, state_grads = true;
  bool reset = false;  // per-sample state resets at random steps
  bool tf32 = false;   // float32 products may use TF32 (torch.backends.cuda.matmul.fp32_precision)
  int64_t checkpoint_every = 0, tbptt = 0;
  double clip = 0;
  std::string clip_mode = "recurrent";
  uint64_t seed = 1;
};

double tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 1e-2;
    default: return 2e-2;
  }
}

void expect_close(const Tensor& got, const Tensor& want, const std::string& what, double tol) {
  if (!want.defined() || want.numel() == 0) {
    EXPECT(!got.defined() || got.numel() == 0, what + ": expected an empty result");
    return;
  }
  if (got.sizes() != want.sizes()) {
    EXPECT(false, what + ": shape " + c10::str(got.sizes()) + " instead of " + c10::str(want.sizes()));
    return;
  }
  const Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  EXPECT(!g.isnan().any().item<bool>(), what + ": NaN in the CUDA result (an unwritten element?)");
  EXPECT(!w.isnan().any().item<bool>(), what + ": NaN in the CPU result");
  const double scale = std::max(w.abs().max().item<double>(), 1e-30);
  const double err = (g - w).abs().max().item<double>() / scale;
  EXPECT(err <= tol, what + ": relative error " + std::to_string(err) + " > " + std::to_string(tol));
}

// Runs a layer forward and backward through the CPU and the CUDA kernels, compares everything,
// and returns the CUDA kernels' results.
// PyTorch's float32 matmul precision for the scope (restored to IEEE after).
class Tf32Setting {
 public:
  explicit Tf32Setting(bool on) { set(on); }
  ~Tf32Setting() { set(false); }

 private:
  static void set(bool on) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL,
                                            on ? at::Float32Precision::TF32 : at::Float32Precision::IEEE);
  }
};

std::vector<Tensor> compare(const Case& c) {
  at::manual_seed(c.seed);
  const int64_t K = c.P > 0 ? c.P : c.H;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto cast = [&](const Tensor& t) { return t.to(c.dtype); };
  const Tensor x = cast(at::randn({c.T, c.B, c.I}, f64));
  const Tensor w_ih = cast(at::randn({4 * c.H, c.I}, f64) * 0.4);
  const Tensor w_hh = cast(at::randn({4 * c.H, K}, f64) * (0.8 / std::sqrt(static_cast<double>(K))));
  const OptTensor bias = c.bias ? OptTensor(cast(at::randn({4 * c.H}, f64) * 0.2)) : std::nullopt;
  const OptTensor w_hr = c.P > 0 ? OptTensor(cast(at::randn({c.P, c.H}, f64) * 0.3)) : std::nullopt;
  const Tensor h0 = cast(at::randn({c.B, K}, f64) * 0.5), c0 = cast(at::randn({c.B, c.H}, f64) * 0.5);
  OptTensor lengths;
  if (c.packed) {
    Tensor l = at::randint(1, c.T + 1, {c.B}, at::TensorOptions().dtype(at::kLong));
    l[0] = c.T;  // the longest row has the full length, as pack_padded_sequence gives
    lengths = l;
  }
  const OptTensor reset = c.reset ? OptTensor(at::rand({c.T, c.B}, f64) < 0.3) : std::nullopt;
  const Tensor dy = cast(at::randn({c.T, c.B, K}, f64));
  const OptTensor dh_n = c.state_grads ? OptTensor(cast(at::randn({c.B, K}, f64))) : std::nullopt;
  const OptTensor dc_n = c.state_grads ? OptTensor(cast(at::randn({c.B, c.H}, f64))) : std::nullopt;
  const double tol = c.tf32 ? 1e-2 : tolerance(c.dtype);  // tf32: a 10-bit mantissa, like float16
  const Tf32Setting tf32(c.tf32);

  // The CPU path has one backend; "auto" is its name for it.
  auto backend = [&](c10::DispatchKeySet keys) { return keys == kCpu ? std::string("auto") : c.backend; };
  // The reference: the CPU path in float64 on the same (rounded) inputs.
  auto wide = [&](const Tensor& t, bool f64) { return f64 ? t.to(at::kDouble) : t; };
  auto wide_opt = [&](const OptTensor& t, bool f64) { return t && f64 ? OptTensor(t->to(at::kDouble)) : t; };
  auto forward = [&](c10::DispatchKeySet keys, bool f64) {
    return forward_op().redispatch(keys, wide(x, f64), wide(w_ih, f64), wide(w_hh, f64), wide_opt(bias, f64),
                                   wide_opt(w_hr, f64), wide(h0, f64), wide(c0, f64), lengths, reset, std::nullopt,
                                   c.reverse, c.checkpoint_every, c.tbptt, c.clip, c.clip_mode, backend(keys));
  };
  const fastlstm::ForwardOut ref = forward(kCpu, true), out = forward(kCuda, false);
  expect_close(std::get<0>(out), std::get<0>(ref), "y", tol);
  expect_close(std::get<1>(out), std::get<1>(ref), "h_n", tol);
  expect_close(std::get<2>(out), std::get<2>(ref), "c_n", tol);
  std::vector<Tensor> results = {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  if (c.checkpoint_every == fastlstm::kNoBackward) return results;  // inference: nothing saved, no backward

  auto backward = [&](c10::DispatchKeySet keys, bool f64, const fastlstm::ForwardOut& f) {
    return backward_op().redispatch(keys, wide(dy, f64), wide_opt(dh_n, f64), wide_opt(dc_n, f64), wide(x, f64),
                                    wide(w_ih, f64), wide(w_hh, f64), wide_opt(bias, f64), wide_opt(w_hr, f64),
                                    wide(h0, f64), wide(c0, f64), lengths, reset, std::get<0>(f),
                                    std::get<3>(f), std::get<4>(f), std::get<5>(f), c.reverse, c.checkpoint_every,
                                    c.tbptt, c.clip, c.clip_mode, c.norms, c.input_grad, backend(keys));
  };
  const fastlstm::BackwardOut gref = backward(kCpu, true, ref), gout = backward(kCuda, false, out);
  const char* names[] = {"dx", "dw_ih", "dw_hh", "dbias", "dw_hr", "dh0", "dc0", "norms"};
  const Tensor got[] = {std::get<0>(gout), std::get<1>(gout), std::get<2>(gout), std::get<3>(gout),
                        std::get<4>(gout), std::get<5>(gout), std::get<6>(gout), std::get<7>(gout)};
  const Tensor want[] = {std::get<0>(gref), std::get<1>(gref), std::get<2>(gref), std::get<3>(gref),
                         std::get<4>(gref), std::get<5>(gref), std::get<6>(gref), std::get<7>(gref)};
  for (int k = 0; k < 8; ++k) expect_close(got[k], want[k], names[k], tol);
  results.insert(results.end(), std::begin(got), std::end(got));
  return results;
}

// Changes the emulated device for one test and restores it on the way out, exceptions included.
class DeviceLimits {
 public:
  DeviceLimits() : saved_(cuda_emu::device()) {}
  ~DeviceLimits() { set(saved_.multiProcessorCount, saved_.sharedMemPerBlockOptin); }
  void set(int sms, size_t smem) { cuda_emu::set_device_limits(sms, smem); }
  const cudaDeviceProp& saved() const { return saved_; }

 private:
  const cudaDeviceProp saved_;
};

const at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
const char* const kBackends[] = {"stepwise", "persistent"};

std::string label(const Case& c) {
  return c.backend + " " + std::string(c10::toString(c.dtype));
}

// Runs `base` with every dtype and both backends (or only `backends`), each labelled on failure.
template <class F>
void for_each_config(F&& edit, std::vector<std::string> backends = {"stepwise", "persistent"}) {
  for (at::ScalarType dtype : kDtypes) {
    for (const std::string& backend : backends) {
      Case c;
      c.dtype = dtype;
      c.backend = backend;
      edit(c);
      const int before = check::current_failures();
      compare(c);
      if (check::current_failures() != before) std::fprintf(stderr, "    in case: %s\n", label(c).c_str());
    }
  }
}

TEST(plain_layer) {
  for_each_config([](Case&) {});
}

TEST(reverse_direction) {
  for_each_config([](Case& c) { c.reverse = true; });
}

TEST(packed_lengths_both_directions) {
  for_each_config([](Case& c) { c.packed = true; });
  for_each_config([](Case& c) {
    c.packed = true;
    c.reverse = true;
    c.seed = 2;
  });
}

TEST(no_bias_no_state_gradients_no_input_gradient) {
  for_each_config([](Case& c) {
    c.bias = false;
    c.state_grads = false;
    c.input_grad = false;
  });
}

TEST(truncated_bptt) {
  for_each_config([](Case& c) {
    c.tbptt = 3;
    c.packed = true;
  });
}

TEST(recurrent_clipping) {
  for_each_config([](Case& c) {
    c.clip = 0.05;
    c.reverse = true;
  });
}

TEST(gate_clipping) {
  for_each_config([](Case& c) {
    c.clip = 0.02;
    c.clip_mode = "gates";
    c.packed = true;
  });
}

TEST(gradient_norms) {
  for_each_config([](Case& c) {
    c.norms = true;
    c.packed = true;
    c.tbptt = 4;
  });
}

TEST(checkpointing) {
  for_each_config([](Case& c) {
    c.checkpoint_every = 3;
    c.packed = true;
    c.norms = true;
  });
}

// Per-sample resets: the state zeroed at random steps of random rows, with padding in both
// directions, and with everything else the backward does.
TEST(per_sample_resets) {
  for_each_config([](Case& c) {
    c.reset = true;
    c.packed = true;
  });
  for_each_config([](Case& c) {
    c.reset = true;
    c.packed = true;
    c.reverse = true;
    c.norms = true;
    c.tbptt = 3;
    c.clip = 0.05;
    c.seed = 4;
  });
  for_each_config([](Case& c) {
    c.reset = true;
    c.reverse = true;
    c.checkpoint_every = 3;
    c.clip = 0.02;
    c.clip_mode = "gates";
    c.seed = 5;
  });
}

// Without a backward the driver works in chunks: 64 steps on the CPU, many more on CUDA.
TEST(inference_chunks) {
  for_each_config([](Case& c) {
    c.checkpoint_every = fastlstm::kNoBackward;
    c.T = 130;
    c.B = 2;
    c.H = 8;
    c.packed = true;
  });
}

TEST(projection_stepwise) {
  for_each_config(
      [](Case& c) {
        c.P = 5;
        c.packed = true;
        c.tbptt = 3;
        // Not tighter: with dh0 clamped to a small range, bfloat16's absolute rounding of the
        // carried gradient (the same as unclipped) is a large fraction of the range.
        c.clip = 0.5;
      },
      {"stepwise"});
  for_each_config(
      [](Case& c) {
        c.P = 7;
        c.reverse = true;
        c.norms = true;
        c.checkpoint_every = 4;
      },
      {"stepwise"});
  for_each_config(
      [](Case& c) {
        c.P = 4;
        c.reset = true;
        c.packed = true;
        c.reverse = true;
      },
      {"stepwise"});
}

TEST(persistent_refuses_projection_clearly) {
  Case c;
  c.P = 5;
  bool raised = false;
  try {
    compare(c);
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("does not support proj_size") != std::string::npos;
  }
  EXPECT(raised);
}

// A larger hidden size and batch than the other tests: several units per block, several rows per warp.
TEST(wider_layer) {
  for_each_config([](Case& c) {
    c.H = 70;
    c.B = 11;
    c.T = 4;
    c.packed = true;
  });
}

// The emulated device shrunk, per dtype, until the persistent backward stages at most two batch
// rows at a time (the forward a few more), so both kernels loop over batch tiles. The hidden
// size is used by no other test: the kernels' host code caches its launch plan per shape.
TEST(persistent_batch_tiling) {
  DeviceLimits limits;
  const int64_t H = 13, B = 14;
  for (at::ScalarType dtype : kDtypes) {
    size_t smem = 64 * 1024;
    for (;; smem -= 256) {
      limits.set(3, smem);
      const fastlstm::cuda::PersistentPlan b = fastlstm::cuda::persistent_plan(H, B, dtype, 0, true);
      EXPECT(b.ok, b.reason);
      if (!b.ok || b.batch_tile <= 2) break;
    }
    const fastlstm::cuda::PersistentPlan f = fastlstm::cuda::persistent_plan(H, B, dtype, 0, false);
    EXPECT(f.ok && f.batch_tile < B, "forward tile " + std::to_string(f.batch_tile));
    Case c;
    c.dtype = dtype;
    c.H = H;
    c.B = B;
    c.packed = true;
    c.norms = true;
    c.tbptt = 3;
    compare(c);
  }
}

// One SM (a block owns every unit) and more SMs than units per block would need.
TEST(persistent_sm_counts) {
  DeviceLimits limits;
  struct Setting {
    int sms;
    int64_t H, B;
  };
  for (const Setting& s : {Setting{1, 17, 4}, Setting{16, 33, 3}}) {
    limits.set(s.sms, limits.saved().sharedMemPerBlockOptin);
    for (at::ScalarType dtype : kDtypes) {
      Case c;
      c.dtype = dtype;
      c.H = s.H;
      c.B = s.B;
      c.reverse = true;
      c.norms = true;
      compare(c);
    }
  }
}

// ---- backend "cluster": the cluster kernels (forward and backward) ----

// Runs `edit`ed cases on the cluster backend in each dtype it runs on the tensor cores: bfloat16,
// float16, and float32 as tf32 (allowed for the case).
template <class F>
void for_each_tensor_core_type(F&& edit, std::vector<at::ScalarType> dtypes = {at::kBFloat16, at::kHalf, at::kFloat}) {
  for (at::ScalarType dtype : dtypes) {
    Case c;
    c.dtype = dtype;
    c.backend = "cluster";
    c.tf32 = dtype == at::kFloat;
    const Tf32Setting tf32(c.tf32);  // for the plan checks inside `edit`
    edit(c);
    const int before = check::current_failures();
    compare(c);
    if (check::current_failures() != before) {
      std::fprintf(stderr, "    in case: %s H=%lld B=%lld seed=%llu\n", label(c).c_str(), static_cast<long long>(c.H),
                   static_cast<long long>(c.B), static_cast<unsigned long long>(c.seed));
    }
  }
}

// The plan the kernel will use for a case (checked so each test exercises what it says).
fastlstm::cuda::ClusterPlan plan_of(const Case& c, bool backward = false) {
  return fastlstm::cuda::cluster_plan(c.H, c.B, c.dtype, 0, backward);
}

std::string refusal(const Case& c) {
  try {
    compare(c);
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(cluster_plain_packed_reverse) {
  for_each_tensor_core_type([](Case&) {});
  for_each_tensor_core_type([](Case& c) { c.packed = true; });
  for_each_tensor_core_type([](Case& c) {
    c.packed = true;
    c.reverse = true;
    c.bias = false;
    c.seed = 3;
  });
  for_each_tensor_core_type([](Case& c) {
    c.reset = true;
    c.packed = true;
    c.reverse = true;
    c.seed = 6;
  });
  // 8 units per block: h_t and dG_t cross the cluster in 16-byte pieces; the last block's 4 units
  // (H = 124) as single elements.
  for_each_tensor_core_type([](Case& c) {
    c.H = 124;
    c.B = 9;
    c.T = 4;
    c.packed = true;
    c.norms = true;
    c.seed = 8;
    EXPECT(plan_of(c).units_per_block == 8, plan_of(c).reason);
  });
}

TEST(cluster_checkpointing_and_inference_chunks) {
  for_each_tensor_core_type([](Case& c) {
    c.checkpoint_every = 3;  // the backward recomputes the chunks' gates with the cluster kernel
    c.packed = true;
    c.norms = true;
    c.tbptt = 4;
  });
  for_each_tensor_core_type([](Case& c) {
    c.checkpoint_every = fastlstm::kNoBackward;
    c.T = 40;
    c.B = 3;
    c.H = 8;
    c.packed = true;
  });
  for_each_tensor_core_type([](Case& c) {
    c.checkpoint_every = 2;
    c.reset = true;
    c.norms = true;
  });
}

// Several clusters (one batch slice each, the last one partial), a hidden size that is not a
// multiple of 16 (K padded) and not of the cluster size (the last blocks own fewer or no units).
TEST(cluster_several_slices_odd_sizes) {
  DeviceLimits limits;
  limits.set(16, limits.saved().sharedMemPerBlockOptin);  // room for 8 resident clusters of 16
  for_each_tensor_core_type([](Case& c) {
    c.H = 40;
    c.B = 21;
    c.T = 5;
    c.packed = true;
    c.reverse = true;
    const fastlstm::cuda::ClusterPlan p = plan_of(c);
    EXPECT(p.ok && p.cluster == 16 && p.clusters == 3 && p.rows_per_cluster == 8, p.reason);
  });
  for_each_tensor_core_type([](Case& c) {
    c.H = 70;
    c.B = 11;
    c.T = 4;
    c.packed = true;
    const fastlstm::cuda::ClusterPlan p = plan_of(c);
    EXPECT(p.ok && p.clusters == 2 && p.units_per_block == 5, p.reason);
  });
}

// The cluster backward with every backward option; K cut into many ranges (one output tile) and
// over few (several row tiles per cluster, k ranges of odd lengths);
// several clusters with norm partials per block.
TEST(cluster_backward_options) {
  DeviceLimits limits;
  auto expect_backward_plan = [](const Case& c, const std::string& split) {
    const fastlstm::cuda::ClusterPlan p = plan_of(c, true);
    EXPECT(p.ok && contains(p.reason, "cluster backward") && contains(p.reason, split), p.reason);
  };
  for_each_tensor_core_type([&](Case& c) {
    c.packed = true;
    c.norms = true;
    c.tbptt = 3;
    c.clip = 0.05;
    c.clip_mode = "gates";
    expect_backward_plan(c, "K in 6 ranges");  // 6 k tiles (K = 4 * 24), one per warp
  });
  for_each_tensor_core_type([&](Case& c) {
    c.reverse = true;
    c.reset = true;
    c.norms = true;
    c.clip = 0.2;
    c.clip_mode = "recurrent";
    c.seed = 5;
  });
  for_each_tensor_core_type([](Case& c) {
    c.input_grad = false;
    c.state_grads = false;
    c.bias = false;
  });
  limits.set(8, limits.saved().sharedMemPerBlockOptin);  // few resident clusters: 2 row tiles in each
  for_each_tensor_core_type([&](Case& c) {
    c.H = 130;  // 9 units per block, K = 520 padded to 528: 33 k tiles (66 k8 tiles), ranges of odd lengths
    c.B = 40;
    c.T = 3;
    c.packed = true;
    c.norms = true;
    c.clip = 0.5;
    expect_backward_plan(c, c.dtype == at::kFloat ? "16 batch rows per cluster; W_hh's columns in registers (9 tiles "
                                                    "per warp), dG_t W_hh on tensor cores (mma m16n8k8 tf32, K in 8 ranges)"
                                                  : "16 batch rows per cluster; W_hh's columns in registers (5 tiles "
                                                    "per warp), dG_t W_hh on tensor cores (mma m16n8k16, K in 7 ranges)");
  }, {at::kBFloat16, at::kFloat});  // the largest case: float16 shares bfloat16's code but the mma type
  limits.set(16, limits.saved().sharedMemPerBlockOptin);  // 3 clusters, the last one partial
  for_each_tensor_core_type([&](Case& c) {
    c.H = 40;
    c.B = 21;
    c.T = 5;
    c.packed = true;
    c.reverse = true;
    c.norms = true;
    c.tbptt = 2;
    const fastlstm::cuda::ClusterPlan p = plan_of(c, true);
    EXPECT(p.ok && p.clusters == 3 && p.rows_per_cluster == 8, p.reason);
  });
}

// Where two steps of the exchanged operand do not fit beside W_hh, one buffer and a second
// cluster barrier per step: the backward (two steps of 4H gate gradients per row; W_hh in
// registers), with every backward option, and the forward (inference). Where one buffer does not
// fit either, the persistent kernel runs the backward, and the reason says so.
TEST(cluster_one_exchange_buffer_and_the_fallback) {
  DeviceLimits limits;
  auto base = [](Case& c) {
    c.H = 64;
    c.B = 6;
    c.norms = true;
    c.packed = true;
    c.reset = true;
    c.tbptt = 3;
  };
  limits.set(16, 12 * 1024);
  for_each_tensor_core_type([&](Case& c) {
    base(c);
    c.clip = 0.05;
    c.clip_mode = c.dtype == at::kHalf ? "gates" : "recurrent";
    const fastlstm::cuda::ClusterPlan f = plan_of(c), b = plan_of(c, true);
    EXPECT(f.ok && f.exchange_buffers == 2 && contains(f.reason, "h_t over DSMEM, one cluster barrier per step"),
           f.reason);
    EXPECT(b.ok && b.exchange_buffers == 1 &&
               contains(b.reason, "dG_t over DSMEM into one buffer, two cluster barriers per step"),
           b.reason);
  }, {at::kBFloat16, at::kHalf});  // float32's buffers are twice as large: other sizes
  limits.set(16, 4864);  // the forward's h: one buffer
  for_each_tensor_core_type([&](Case& c) {
    base(c);
    c.checkpoint_every = fastlstm::kNoBackward;
    const fastlstm::cuda::ClusterPlan f = plan_of(c);
    EXPECT(f.ok && f.exchange_buffers == 1 &&
               contains(f.reason, "h_t over DSMEM into one buffer, two cluster barriers per step"),
           f.reason);
  }, {at::kBFloat16, at::kHalf});
  limits.set(16, 9 * 1024);
  for_each_tensor_core_type([&](Case& c) {
    base(c);
    EXPECT(plan_of(c).ok && !plan_of(c, true).ok, plan_of(c).reason + " / " + plan_of(c, true).reason);
    const auto [ok, reason] = fastlstm::cuda::cluster_support(c.H, c.B, c.dtype, 0, 0);
    EXPECT(ok && contains(reason, "backward on the persistent kernel (the cluster backward: W_hh's columns and a "
                                  "step of gate gradients do not fit on chip"),
           reason);
  }, {at::kBFloat16, at::kHalf});
}

// float64, and float32 where TF32 is not allowed, run on the persistent kernel under backend
// "cluster", at their own precision, and the reason says so.
TEST(cluster_runs_float64_and_ieee_float32_on_the_persistent_kernel) {
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    Case c;
    c.dtype = dtype;
    c.backend = "cluster";
    c.packed = true;
    c.norms = true;
    c.reset = true;
    const auto [ok, reason] = fastlstm::cuda::cluster_support(c.H, c.B, c.dtype, 0, 0);
    EXPECT(ok && contains(reason, dtype == at::kDouble ? "cluster: float64 stays on CUDA cores; the persistent "
                                                         "kernel runs it: persistent: "
                                                       : "cluster: float32 uses the tensor cores only as TF32"),
           reason);
    compare(c);
  }
}

// Sets FASTLSTM_CLUSTER_REGISTER_TILES (the most W tiles a warp may hold in registers) for a
// scope; the plans are keyed by it.
class RegisterTileCap {
 public:
  explicit RegisterTileCap(const char* cap) { setenv("FASTLSTM_CLUSTER_REGISTER_TILES", cap, 1); }
  ~RegisterTileCap() { unsetenv("FASTLSTM_CLUSTER_REGISTER_TILES"); }
};

// W_hh (and its columns in the backward) wholly in shared memory, split between registers and
// shared memory, and wholly in registers with fewer cell elements per thread: each kernel variant
// the plan can pick runs every option against the CPU path.
TEST(cluster_weights_in_registers_and_shared_memory) {
  DeviceLimits limits;
  limits.set(16, limits.saved().sharedMemPerBlockOptin);  // a cluster resident whatever CUDA_EMU_SMS is
  cuda_emu::set_max_cluster_size(8);  // 8 blocks: more tiles per warp at a small H
  auto options = [](Case& c) {
    c.H = 200;  // 25 units per block of 8: forward 7 bands x 13 k tiles (26 in float32), backward 2 x 50
    c.B = 9;
    c.T = 3;
    c.packed = true;
    c.reverse = c.dtype != at::kBFloat16;
    c.norms = true;
    c.tbptt = 2;
    c.clip = 0.5;
    c.reset = true;
  };
  auto expect_plans = [](const Case& c, const std::string& forward, const std::string& backward) {
    const fastlstm::cuda::ClusterPlan f = plan_of(c), b = plan_of(c, true);
    EXPECT(f.ok && contains(f.reason, forward), f.reason);
    EXPECT(b.ok && contains(b.reason, backward), b.reason);
  };
  {
    const RegisterTileCap cap("0");
    for_each_tensor_core_type([&](Case& c) {
      options(c);
      expect_plans(c, "; W_hh in shared memory, gates", "; W_hh's columns in shared memory, dG_t");
    }, {at::kBFloat16, at::kFloat});  // float16 shares bfloat16's code but the mma type
  }
  {
    const RegisterTileCap cap("16");  // float32's k8 tiles: at most 26 and 25 per warp, 16 of them in registers
    for_each_tensor_core_type([&](Case& c) {
      options(c);
      expect_plans(c, "; W_hh in registers (16 tiles per warp) and shared memory (10)",
                   "; W_hh's columns in registers (16 tiles per warp) and shared memory (9)");
    }, {at::kFloat});
  }
  // No cap: every tile in registers; float32's 26 per warp (the forward's 7 bands in groups of 2:
  // 4 groups, the last one half empty) take the variant of 32 register tiles and 2 cell elements
  // per thread, bfloat16's 14 that of 16 and 4.
  for_each_tensor_core_type([&](Case& c) {
    options(c);
    const bool f32 = c.dtype == at::kFloat;
    const fastlstm::cuda::ClusterPlan f = plan_of(c);
    EXPECT(f.ok && contains(f.reason, std::string("; W_hh in registers (") + (f32 ? "26" : "14") + " tiles per warp)") &&
               f.register_tiles == (f32 ? 32 : 16) && f.cells_per_thread == (f32 ? 2 : 4),
           f.reason);
  }, {at::kBFloat16, at::kFloat});
  cuda_emu::set_max_cluster_size(16);
  {
    const RegisterTileCap cap("sixteen");
    Case c;
    c.dtype = at::kBFloat16;
    c.backend = "cluster";
    const std::string why = refusal(c);
    EXPECT(contains(why, "FASTLSTM_CLUSTER_REGISTER_TILES must be a non-negative integer, got 'sixteen'"), why);
  }
}

// cuDNN's reference shape, H=768 in float16 and bfloat16, on an H100's limits (132 SMs, 227 KiB
// of shared memory per block): W_hh does not fit 16 blocks' shared memory, registers and shared
// memory together hold it, in the forward and in the backward (there with one dG_t buffer: two
// steps of 4H gate gradients per row do not fit beside it).
TEST(cluster_takes_the_reference_shape_h768) {
  DeviceLimits limits;
  limits.set(132, 227 * 1024);
  for_each_tensor_core_type([](Case& c) {
    c.H = 768;
    c.I = 5;
    c.B = 3;
    c.T = 2;
    c.packed = true;
    c.reset = true;
    c.norms = true;
    for (const bool backward : {false, true}) {
      const fastlstm::cuda::ClusterPlan p = plan_of(c, backward);
      EXPECT(p.ok && p.cluster == 16 && p.units_per_block == 48 && p.register_tiles == 32 && p.cells_per_thread == 2 &&
                 p.exchange_buffers == (backward ? 1 : 2) &&
                 contains(p.reason, "in registers (32 tiles per warp) and shared memory (40)"),
             p.reason);
    }
  }, {at::kBFloat16});  // the largest case: float16 shares bfloat16's code but the mma type
}

// A device that refuses non-portable cluster sizes: clusters of 8.
TEST(cluster_of_eight_without_nonportable_sizes) {
  cuda_emu::set_max_cluster_size(8);
  for_each_tensor_core_type([](Case& c) {
    c.H = 30;
    c.B = 9;
    c.packed = true;
    const fastlstm::cuda::ClusterPlan p = plan_of(c);
    EXPECT(p.ok && p.cluster == 8 && p.units_per_block == 4, p.reason);
  });
  cuda_emu::set_max_cluster_size(16);
}

TEST(cluster_refuses_clearly) {
  Case c;
  c.backend = "cluster";
  c.dtype = at::kBFloat16;
  c.P = 5;
  std::string why = refusal(c);
  EXPECT(why.find("does not support proj_size > 0") != std::string::npos, why);
  // The cluster kernels' buffers beyond a block's shared memory (W_hh in registers), and W_hh
  // beyond the persistent kernel's 2 blocks: both reasons, whatever CUDA_EMU_SMS the run has.
  DeviceLimits limits;
  limits.set(2, 3 * 1024);
  c.P = 0;
  c.H = 64;
  why = refusal(c);
  EXPECT(contains(why, "backend='cluster' cannot run this layer: cluster: W_hh does not fit on chip") &&
             contains(why, "; nor can the persistent kernel: W_hh does not fit on chip"),
         why);
}

// A layer the cluster forward cannot take (W_hh beyond 16 blocks' shared memory) runs on the
// grid-scope persistent kernel, which spreads W_hh over every SM, and the reason says so.
TEST(cluster_too_large_runs_on_the_persistent_kernel) {
  DeviceLimits limits;
  limits.set(64, 4 * 1024);  // 16 blocks cannot hold W_hh at H=64; 64 blocks of one unit can
  for_each_tensor_core_type([](Case& c) {
    c.H = 64;
    c.B = 6;
    c.packed = true;
    c.norms = true;
    EXPECT(!plan_of(c).ok, plan_of(c).reason);
    const auto [ok, reason] = fastlstm::cuda::cluster_support(c.H, c.B, c.dtype, 0, 0);
    EXPECT(ok && contains(reason, "cluster: W_hh does not fit on chip") &&
               contains(reason, "; the persistent kernel runs it: persistent: "),
           reason);
    EXPECT(!fastlstm::cuda::cluster_fallback(c.H, c.B, c.dtype, 0).empty(), "no fallback reason");
  });
}

// Bitwise reproducibility: no atomics in any reduction, fixed reduction orders. The digest printed
// here is compared by run.py across the runs of different schedules: a result that depended on
// the order in which threads or blocks ran would differ between them.
TEST(results_are_bitwise_reproducible) {
  DeviceLimits limits;
  limits.set(4, limits.saved().sharedMemPerBlockOptin);  // the partition into blocks is fixed
  uint64_t digest = 1469598103934665603ull;  // FNV-1a over every result's bytes
  for (const std::string& backend : {"stepwise", "persistent", "cluster"}) {
    for (at::ScalarType dtype : kDtypes) {
      Case c;
      c.dtype = dtype;
      c.backend = backend;
      c.tf32 = backend == "cluster" && dtype == at::kFloat;  // float64: the persistent kernel
      c.H = 19;
      c.packed = true;
      c.reset = true;
      c.norms = true;
      c.tbptt = 3;
      c.clip = 0.5;
      const std::vector<Tensor> first = compare(c), second = compare(c);
      for (size_t k = 0; k < first.size(); ++k) {
        EXPECT(first[k].numel() == 0 || at::equal(first[k], second[k]), backend + " result " + std::to_string(k));
        const Tensor bytes = first[k].contiguous().view(at::kByte);
        for (int64_t i = 0; i < bytes.numel(); ++i) {
          digest = (digest ^ bytes.data_ptr<uint8_t>()[i]) * 1099511628211ull;
        }
      }
    }
  }
  std::printf("digest %016llx\n", static_cast<unsigned long long>(digest));
}

}  // namespace

int main(int argc, char** argv) {
  fastlstm::poison_buffers() = true;
  return check::main(argc, argv);
}
