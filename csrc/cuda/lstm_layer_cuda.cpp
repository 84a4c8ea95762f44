// The layer ops on CUDA: the shared driver with cuBLAS GEMMs and the CUDA pointwise kernels
// (backend "stepwise"), or the persistent kernels for the recurrence (backend "persistent"), or
// the cluster kernels (backend "cluster", opt-in).
// Everything runs on the current stream of the input's device, workspaces come from the
// caching allocator, and nothing synchronises with the host.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

#include "../fastlstm/layer_op.h"
#include "cublas_gemm.h"
#include "fp32_precision.h"
#include "lstm_cell_cuda.h"
#include "lstm_cluster_cuda.h"
#include "lstm_persistent_cuda.h"
#include "persistent_support.h"

namespace fastlstm::cuda {
namespace {

struct CudaPolicy {
  // A weight W (rows x cols): products are cuBLAS calls on its memory.
  template <class S>
  class Matrix {
   public:
    explicit Matrix(const at::Tensor& w) : w_(w.data_ptr<S>()), rows_(w.size(0)), cols_(w.size(1)) {}
    // out[M, rows] (+)= A[M, cols] W^T
    template <class C>
    void times_transposed(int64_t M, const S* A, C* out, bool accumulate) {
      gemm_nt<S, C>(M, rows_, cols_, A, w_, out, accumulate);
    }
    // out[M, cols] (+)= A[M, rows] W
    template <class C>
    void times(int64_t M, const S* A, C* out, bool accumulate) {
      gemm_nn<S, C>(M, cols_, rows_, A, w_, out, accumulate);
    }

   private:
    const S* w_;
    int64_t rows_, cols_;
  };

  // One input-projection GEMM for the whole chunk: the GPU wants the largest GEMM it can get.
  static int64_t projection_steps(int64_t, int64_t) { return std::numeric_limits<int64_t>::max(); }

  // dW = dG^T X over a chunk's rows: cuBLAS.
  static at::Tensor weight_gradient(const at::Tensor& dg, const at::Tensor& x) { return at::mm(dg.t(), x); }

  template <class S>
  class Recurrent {
   public:
    using A = at::opmath_type<S>;
    explicit Recurrent(const at::Tensor& w_hh) : mat_(w_hh) {}
    void forward(int64_t B, const S* r, A* gates) { mat_.times_transposed(B, r, gates, true); }
    void backward(int64_t B, const S* dgates, A* carry) { mat_.times(B, dgates, carry, true); }
    static constexpr bool projects_input(int64_t) { return false; }  // one cuBLAS GEMM per chunk
    void fused_forward(const ChunkRecurrenceArgs<S, A>& a) { persistent_forward<S, A>(a); }
    void fused_backward(const ChunkRecurrenceArgs<S, A>& a) { persistent_backward<S, A>(a); }

   private:
    Matrix<S> mat_;
  };

  // Steps per chunk without a backward: chunk buffers of at most kInferenceBytes, so a launch
  // (and its W_hh fill, tens of microseconds at large H) is amortised over many steps.
  static int64_t inference_chunk(int64_t B, int64_t H, int64_t K, size_t elem) {
    constexpr int64_t kInferenceBytes = int64_t(256) << 20;
    const int64_t per_step = std::max<int64_t>(1, B * (5 * H * 4 + 2 * K * static_cast<int64_t>(elem)));
    return std::clamp<int64_t>(kInferenceBytes / per_step, 64, 1 << 16);
  }

  // The persistent backward sums the norm partials over the batch inside each block.
  static int64_t norm_rows(int64_t B, bool fused) { return fused ? 1 : B; }

  template <class S>
  static int64_t norm_tiles(int64_t H, int64_t B, bool fused) {
    if (!fused) return cell_norm_tiles(H);
    const PersistentPlan plan =
        persistent_plan(H, B, c10::CppTypeToScalarType<S>::value, c10::cuda::current_device(), true);
    return std::max(plan.blocks, 1);
  }
  template <class S, class A>
  static void cell_forward(const ForwardCellArgs<S, A>& a) { cuda::cell_forward<S, A>(a); }
  template <class S, class A>
  static void cell_backward(const BackwardCellArgs<S, A>& a) { cuda::cell_backward<S, A>(a); }
  template <class S, class A>
  static void proj_backward(const BackwardProjArgs<S, A>& a) { cuda::proj_backward<S, A>(a); }
  template <class S>
  static void state_select(const StateSelectArgs<S>& a) { cuda::state_select<S>(a); }
};

// The dtypes the cluster kernels are built for (tensor cores: bf16, fp16, and float32 as tf32).
template <class S>
constexpr bool kClusterType = std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16> ||
                              std::is_same_v<S, float>;

// Whether the cluster backward runs a layer (else the persistent backward does, on the same
// saved tensors).
bool cluster_backward_runs(int64_t H, int64_t B, c10::ScalarType dtype) {
  return cluster_plan(H, B, dtype, c10::cuda::current_device(), true).ok;
}

// Backend "cluster": the recurrence on the cluster kernels (the forward, the backward's
// recomputation of checkpointed chunks, the backward); the backward on the persistent kernel
// where the cluster backward's buffers do not fit (it receives 4H gate gradients per row and
// step, the forward H hidden values).
struct CudaClusterPolicy : CudaPolicy {
  template <class S>
  class Recurrent : public CudaPolicy::Recurrent<S> {
   public:
    using A = at::opmath_type<S>;
    using CudaPolicy::Recurrent<S>::Recurrent;
    void fused_forward(const ChunkRecurrenceArgs<S, A>& a) {
      if constexpr (kClusterType<S>) {
        cluster_forward<S, A>(a);
      } else {
        TORCH_CHECK(false, "fastlstm: the cluster kernel has no ", c10::CppTypeToScalarType<S>::value, " path");
      }
    }
    void fused_backward(const ChunkRecurrenceArgs<S, A>& a) {
      if constexpr (kClusterType<S>) {
        if (cluster_backward_runs(a.H, a.B, c10::CppTypeToScalarType<S>::value)) {
          cluster_backward<S, A>(a);
          return;
        }
      }
      persistent_backward<S, A>(a);
    }
  };

  // The backward's norm partials: one per block of the kernel that runs it.
  template <class S>
  static int64_t norm_tiles(int64_t H, int64_t B, bool fused) {
    if (fused && kClusterType<S> && cluster_backward_runs(H, B, c10::CppTypeToScalarType<S>::value)) {
      const ClusterPlan plan = cluster_plan(H, B, c10::CppTypeToScalarType<S>::value, c10::cuda::current_device(), true);
      return static_cast<int64_t>(plan.clusters) * plan.cluster;
    }
    return CudaPolicy::norm_tiles<S>(H, B, fused);
  }
};

// Which kernels run the recurrence. "auto" runs the stepwise kernels until the persistent ones
// have been validated on a GPU (it never picks "cluster"); "persistent" and "cluster" run where
// they can, and say why not otherwise. with_backward: a backward will run.
enum class Recurrence { Stepwise, Persistent, Cluster };

Recurrence recurrence_for(std::string_view backend, const LayerInputs& in, bool with_backward) {
  const Backend b = parse_backend(backend);
  if (b != Backend::Persistent && b != Backend::Cluster) return Recurrence::Stepwise;
  const int64_t H = in.hidden_size(), B = in.x.size(1), proj = in.w_hr.defined() ? in.w_hr.size(0) : 0;
  if (b == Backend::Persistent) {
    const auto [ok, reason] = persistent_support(H, B, in.x.scalar_type(), proj, in.x.get_device());
    TORCH_CHECK(ok, "fastlstm: backend='persistent' cannot run this layer: ", reason);
    return Recurrence::Persistent;
  }
  const auto [ok, reason] = cluster_support(H, B, in.x.scalar_type(), proj, in.x.get_device());
  TORCH_CHECK(ok, "fastlstm: backend='cluster' cannot run this layer: ", reason);
  if (!cluster_fallback(H, B, in.x.scalar_type(), in.x.get_device()).empty()) return Recurrence::Persistent;
  if (with_backward && !cluster_backward_runs(H, B, in.x.scalar_type())) {
    const int device = static_cast<int>(in.x.get_device());
    const PersistentPlan bwd = persistent_plan(H, B, in.x.scalar_type(), device, true);
    TORCH_CHECK(bwd.ok, "fastlstm: backend='cluster' cannot run the backward of this layer: the cluster backward: ",
                cluster_plan(H, B, in.x.scalar_type(), device, true).reason, "; the persistent backward: ", bwd.reason);
  }
  return Recurrence::Cluster;
}

ForwardOut layer_forward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
                         const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                         const std::optional<at::Tensor>& reset,
                         const std::optional<at::Tensor>& /*norm_probe*/, bool reverse, int64_t checkpoint_every,
                         int64_t tbptt_chunk, double grad_clip, c10::string_view grad_clip_mode,
                         c10::string_view backend) {
  const c10::cuda::CUDAGuard guard(x.device());
  backward_options(tbptt_chunk, grad_clip, grad_clip_mode, false);
  check_checkpoint_every(checkpoint_every);
  const LayerInputs in = LayerInputs(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset).cast(x.scalar_type());
  const Recurrence rec = recurrence_for(backend, in, checkpoint_every != kNoBackward);
  ForwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlstm_layer_forward_cuda", [&] {
    out = rec == Recurrence::Cluster
              ? forward_typed<CudaClusterPolicy, scalar_t>(in, reverse, checkpoint_every, true)
              : forward_typed<CudaPolicy, scalar_t>(in, reverse, checkpoint_every, rec == Recurrence::Persistent);
  });
  return out;
}

BackwardOut layer_backward(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
                           const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& w_hr, const at::Tensor& h0, const at::Tensor& c0,
                           const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& reset,
                           const at::Tensor& y,
                           const at::Tensor& saved_gates, const at::Tensor& saved_c, const at::Tensor& saved_r,
                           bool reverse, int64_t checkpoint_every, int64_t tbptt_chunk, double grad_clip,
                           c10::string_view grad_clip_mode, bool record_norms, bool input_grad,
                           c10::string_view backend) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BackwardOptions opts = backward_options(tbptt_chunk, grad_clip, grad_clip_mode, record_norms, input_grad);
  const auto dtype = x.scalar_type();
  const LayerInputs in = LayerInputs(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset).cast(dtype);
  const Recurrence rec = recurrence_for(backend, in, true);
  const at::Tensor dy = contiguous_as(grad_y, dtype), dh = contiguous_as(grad_h_n, dtype),
                   dc = contiguous_as(grad_c_n, dtype);
  BackwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastlstm_layer_backward_cuda", [&] {
    const at::Tensor yc = y.contiguous(), gates = saved_gates.contiguous(), cs = saved_c.contiguous(),
                     rs = saved_r.contiguous();
    out = rec == Recurrence::Cluster
              ? backward_typed<CudaClusterPolicy, scalar_t>(in, dy, dh, dc, yc, gates, cs, rs, reverse,
                                                            checkpoint_every, true, opts)
              : backward_typed<CudaPolicy, scalar_t>(in, dy, dh, dc, yc, gates, cs, rs, reverse, checkpoint_every,
                                                     rec == Recurrence::Persistent, opts);
  });
  return out;
}

}  // namespace

std::string cluster_fallback(int64_t hidden_size, int64_t batch, c10::ScalarType dtype, int64_t device) {
  if (dtype == c10::kDouble) return "float64 stays on CUDA cores";
  if (dtype == c10::kFloat && !matmul_allows_tf32()) {
    return "float32 uses the tensor cores only as TF32, which torch.backends.cuda.matmul.fp32_precision "
           "does not allow (set it to 'tf32')";
  }
  const ClusterPlan fwd = cluster_plan(hidden_size, batch, dtype, static_cast<int>(device), false);
  return fwd.ok ? "" : fwd.reason;
}

std::tuple<bool, std::string> persistent_support(int64_t hidden_size, int64_t batch, c10::ScalarType dtype,
                                                 int64_t proj_size, int64_t device) {
  if (proj_size > 0) return {false, "the persistent kernel does not support proj_size > 0"};
  const PersistentPlan fwd = persistent_plan(hidden_size, batch, dtype, static_cast<int>(device), false);
  if (!fwd.ok) return {false, fwd.reason};
  const PersistentPlan bwd = persistent_plan(hidden_size, batch, dtype, static_cast<int>(device), true);
  if (!bwd.ok) return {false, bwd.reason};
  return {true, fwd.reason};
}

std::tuple<bool, std::string> cluster_support(int64_t hidden_size, int64_t batch, c10::ScalarType dtype,
                                              int64_t proj_size, int64_t device) {
  if (proj_size > 0) return {false, "the cluster kernel does not support proj_size > 0"};
  if (const std::string why = cluster_fallback(hidden_size, batch, dtype, device); !why.empty()) {
    // The grid-scope persistent kernel (v1) takes what the cluster kernels cannot.
    const auto [ok, reason] = persistent_support(hidden_size, batch, dtype, proj_size, device);
    return {ok, "cluster: " + why + (ok ? "; the persistent kernel runs it: " : "; nor can the persistent kernel: ") +
                    reason};
  }
  const int dev = static_cast<int>(device);
  const ClusterPlan fwd = cluster_plan(hidden_size, batch, dtype, dev, false);
  const ClusterPlan bwd = cluster_plan(hidden_size, batch, dtype, dev, true);
  if (bwd.ok) return {true, fwd.reason + "; " + bwd.reason};
  const PersistentPlan persistent = persistent_plan(hidden_size, batch, dtype, dev, true);
  return {true, fwd.reason + "; backward on the persistent kernel (the cluster backward: " + bwd.reason + ")" +
                    (persistent.ok ? "" : ", which cannot run it either: " + persistent.reason +
                                          " (inference only)")};
}

}  // namespace fastlstm::cuda

TORCH_LIBRARY_IMPL(fastlstm, CUDA, m) {
  m.impl("layer_forward", &fastlstm::cuda::layer_forward);
  m.impl("layer_backward", &fastlstm::cuda::layer_backward);
}
