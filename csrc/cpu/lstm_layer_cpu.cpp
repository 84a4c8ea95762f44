// The layer ops on the CPU: the forward's products with a weight go through the packed kernel of
// packed_gemm_cpu.h up to a reduction depth of 512 and through ATen's mm beyond; the backward's
// through the packed kernel when they have few rows (packed_max_rows), through ATen's mm
// otherwise; the weight gradients through ATen's mm. Off Intel CPUs, where mm's MKL is slower, all of them
// run on fastlstm's kernels (packed_products_only). The recurrence is fused in one parallel region
// (lstm_recurrence_cpu.cpp), or, for projection layers, runs step by step with the cell kernels of
// lstm_cell_cpu.cpp. Half types run in float and are converted at the boundary, so the cell state
// and every accumulation are fp32 (DESIGN.md section 7), except for bfloat16 layers without a
// projection where the AVX512-BF16 kernels run (Bf16Policy below).
#include <torch/library.h>

#include <type_traits>

#include "../fastlstm/layer_op.h"
#include "bf16_kernels_cpu.h"
#include "lstm_cell_cpu.h"
#include "lstm_recurrence_cpu.h"
#include "packed_gemm_cpu.h"

namespace fastlstm::cpu {
namespace {

struct CpuPolicy {
  // A weight W (rows x cols) for repeated products; each packed layout is made once, on first use.
  template <class S>
  class Matrix {
   public:
    explicit Matrix(const at::Tensor& w) : w_(w) {}

    // out[M, rows] (+)= A[M, cols] W^T
    template <class C>
    void times_transposed(int64_t M, const S* A, C* out, bool accumulate) {
      static_assert(std::is_same_v<S, C>, "the CPU path computes in one dtype");
      const int64_t rows = w_.size(0), cols = w_.size(1);
      if (cols <= forward_packed_max_depth()) {
        if (transposed_.empty()) transposed_ = PackedMatrix<S>(w_.data_ptr<S>(), cols, rows, 1, cols);
        transposed_.multiply(M, A, out, accumulate);
      } else {
        mm(M, rows, A, w_.t(), out, accumulate);
      }
    }

    // out[M, cols] (+)= A[M, rows] W
    template <class C>
    void times(int64_t M, const S* A, C* out, bool accumulate) {
      static_assert(std::is_same_v<S, C>, "the CPU path computes in one dtype");
      const int64_t rows = w_.size(0), cols = w_.size(1);
      if (M <= packed_max_rows()) {
        if (plain_.empty()) plain_ = PackedMatrix<S>(w_.data_ptr<S>(), rows, cols, cols, 1);
        plain_.multiply(M, A, out, accumulate);
      } else {
        mm(M, cols, A, w_, out, accumulate);
      }
    }

   private:
    static void mm(int64_t M, int64_t N, const S* A, const at::Tensor& b, S* out, bool accumulate) {
      const at::Tensor a = at::from_blob(const_cast<S*>(A), {M, b.size(0)}, b.options());
      at::Tensor c = at::from_blob(out, {M, N}, b.options());
      if (accumulate) {
        c.addmm_(a, b);
      } else {
        at::mm_out(c, a, b);
      }
    }

    at::Tensor w_;
    PackedMatrix<S> transposed_, plain_;
  };

  // W_hh for the step products and the fused recurrence, each layout packed once per call.
  template <class S>
  class Recurrent {
   public:
    explicit Recurrent(const at::Tensor& w_hh) : w_(w_hh), mat_(w_hh) {}
    // gates[B, 4H] += r[B, K] W_hh^T
    void forward(int64_t B, const S* r, S* gates) { mat_.times_transposed(B, r, gates, true); }
    // carry[B, K] += dG[B, 4H] W_hh
    void backward(int64_t B, const S* dgates, S* carry) { mat_.times(B, dgates, carry, true); }
    // The fused forward computes x W_ih^T itself (a.x, a.w_ih), in the time its threads would
    // spend waiting at each step's barrier (kernels/fused_forward.h), up to the depth where the
    // packed kernel would run the projection anyway (beyond it, MKL on Intel CPUs).
    static bool projects_input(int64_t I) { return I <= forward_packed_max_depth(); }
    void fused_forward(const ChunkRecurrenceArgs<S, S>& a) {
      if (!fused_fwd_.defined()) fused_fwd_ = pack_fused_forward<S>(w_.data_ptr<S>(), w_.size(1));
      if (a.x != nullptr && !fused_ih_.defined()) fused_ih_ = pack_fused_projection<S>(a.w_ih, w_.size(1), a.I);
      cpu::fused_forward<S>(a, fused_fwd_.data_ptr<S>(), a.x != nullptr ? fused_ih_.data_ptr<S>() : nullptr);
    }
    void fused_backward(const ChunkRecurrenceArgs<S, S>& a) {
      if (!fused_bwd_.defined()) fused_bwd_ = pack_fused_backward<S>(w_.data_ptr<S>(), w_.size(1));
      cpu::fused_backward<S>(a, fused_bwd_.data_ptr<S>());
    }

   private:
    at::Tensor w_, fused_fwd_, fused_ih_, fused_bwd_;
    Matrix<S> mat_;
  };

  // Enough steps for an efficient input-projection GEMM (>= 256 rows), few enough that its
  // output (about 512 KiB) is still in cache when the recurrence reads it.
  static int64_t projection_steps(int64_t B, int64_t H) {
    return std::max<int64_t>({8, (256 + B - 1) / std::max<int64_t>(B, 1), (1 << 17) / std::max<int64_t>(4 * B * H, 1)});
  }

  // dW = dG^T X over a chunk's rows (dG: rows x G, X: rows x I): ATen's mm, or where
  // packed_products_only() the in-place kernel of packed_gemm_cpu.h, which computes dW^T = X^T dG.
  static at::Tensor weight_gradient(const at::Tensor& dg, const at::Tensor& x) {
    const auto dtype = x.scalar_type();
    if (!packed_products_only() || dg.scalar_type() != dtype || (dtype != at::kFloat && dtype != at::kDouble)) {
      return at::mm(dg.t(), x);
    }
    const at::Tensor a = x.contiguous(), b = dg.contiguous();
    at::Tensor wt = at::empty({a.size(1), b.size(1)}, b.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "fastlstm_weight_gradient", [&] {
      gemm_kernels<scalar_t>().multiply_at(a.size(0), a.size(1), b.size(1), a.data_ptr<scalar_t>(),
                                           b.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>());
    });
    return wt.t().contiguous();
  }

  template <class S>
  static int64_t norm_tiles(int64_t H, int64_t, bool fused) { return fused ? unit_blocks<S>(H) : 1; }
  static int64_t norm_rows(int64_t B, bool) { return B; }
  static int64_t inference_chunk(int64_t, int64_t, int64_t, size_t) { return kInferenceChunk; }

  template <class S, class A>
  static void cell_forward(const ForwardCellArgs<S, A>& a) { cpu::cell_forward<S>(a); }
  template <class S, class A>
  static void cell_backward(const BackwardCellArgs<S, A>& a) { cpu::cell_backward<S>(a); }
  template <class S, class A>
  static void proj_backward(const BackwardProjArgs<S, A>& a) { cpu::proj_backward<S>(a); }
  template <class S>
  static void state_select(const StateSelectArgs<S>& a) { cpu::state_select<S>(a); }
};

using BF16 = c10::BFloat16;

// The forward of bfloat16 layers without a projection on CPUs with the AVX512-BF16 kernels
// (bf16_kernels_cpu.h), as a bfloat16 torch.nn.LSTM computes it: x W_ih^T and h_{t-1} W_hh^T
// from the bfloat16 operands with float32 accumulation (AMX tiles or vdpbf16ps), gates and c in float32, h_t
// rounded to bfloat16 at every step. The driver's stepwise path (projection layers) is
// instantiated but never taken: those layers compute in float32.
struct Bf16Policy : CpuPolicy {
  template <class S>
  class Matrix {
    static_assert(std::is_same_v<S, BF16>);

   public:
    explicit Matrix(const at::Tensor& w) : w_(w) {}

    // out[M, rows] (+)= A[M, cols] W^T, accumulated and returned in float32.
    template <class C>
    void times_transposed(int64_t M, const BF16* A, C* out, bool accumulate) {
      if constexpr (std::is_same_v<C, float>) {
        const int64_t rows = w_.size(0), cols = w_.size(1);
        if (packed_.empty()) packed_ = PackedMatrix<BF16>(w_.data_ptr<BF16>(), cols, rows, 1, cols);
        packed_.multiply(M, A, out, accumulate);
      } else {
        TORCH_CHECK(false, "fastlstm: internal error: bfloat16 products with a bfloat16 result");
      }
    }

   private:
    at::Tensor w_;
    PackedMatrix<BF16> packed_;
  };

  template <class S>
  class Recurrent {
    static_assert(std::is_same_v<S, BF16>);

   public:
    explicit Recurrent(const at::Tensor& w_hh) : w_(w_hh) {}
    // The vdpbf16ps kernels compute x W_ih^T themselves, as the float ones do; the AMX ones
    // (16-row tiles) take the layer's projection.
    static bool projects_input(int64_t) { return PackedKernels<BF16>::get().pack_projection != nullptr; }
    void forward(int64_t, const BF16*, float*) { stepwise(); }
    void fused_forward(const ChunkRecurrenceArgs<BF16, float>& a) {
      const Bf16Kernels& k = PackedKernels<BF16>::get();
      if (!packed_.defined()) packed_ = k.pack_forward(w_.data_ptr<BF16>(), w_.size(1));
      if (a.x != nullptr && !packed_ih_.defined()) packed_ih_ = k.pack_projection(a.w_ih, w_.size(1), a.I);
      k.forward(a, packed_.data_ptr<BF16>(), a.x != nullptr ? packed_ih_.data_ptr<BF16>() : nullptr);
    }

   private:
    at::Tensor w_, packed_, packed_ih_;
  };

  template <class S, class A>
  static void cell_forward(const ForwardCellArgs<S, A>&) { stepwise(); }
  template <class S>
  static void state_select(const StateSelectArgs<S>&) { stepwise(); }

 private:
  static void stepwise() {
    TORCH_CHECK(false, "fastlstm: internal error: the bfloat16 kernels have no stepwise path");
  }
};

// The float32 backward of a layer whose forward ran Bf16Policy. Its only difference from
// CpuPolicy is the forward that checkpointing recomputes: Bf16Policy's kernels, on the
// float32 copies of the bfloat16 operands (exact both ways), so the recomputed gates, c and h
// are bit-identical to those the forward had (its kernels' rows do not depend on the chunking).
struct Bf16RecomputePolicy : CpuPolicy {
  static at::Tensor to_bf16(const float* p, int64_t n) {
    return at::from_blob(const_cast<float*>(p), {n}, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
  }

  template <class S>
  class Matrix : public CpuPolicy::Matrix<S> {
    static_assert(std::is_same_v<S, float>);

   public:
    explicit Matrix(const at::Tensor& w)
        : CpuPolicy::Matrix<S>(w), bf16_(w.to(at::kBFloat16)), cols_(w.size(1)) {}

    // The input projection (the forward's only use of W^T): in bfloat16, as the forward did it.
    void times_transposed(int64_t M, const float* A, float* out, bool accumulate) {
      bf16_.times_transposed(M, to_bf16(A, M * cols_).data_ptr<BF16>(), out, accumulate);
    }

   private:
    Bf16Policy::Matrix<BF16> bf16_;
    int64_t cols_;
  };

  template <class S>
  class Recurrent : public CpuPolicy::Recurrent<S> {
    static_assert(std::is_same_v<S, float>);

   public:
    explicit Recurrent(const at::Tensor& w_hh) : CpuPolicy::Recurrent<S>(w_hh), bf16_(w_hh.to(at::kBFloat16)) {}
    static constexpr bool projects_input(int64_t) { return false; }  // Matrix's bfloat16 projection

    // Steps [s0, s0 + n): the bfloat16 forward into bfloat16 copies of their h slots, then back.
    void fused_forward(const ChunkRecurrenceArgs<float, float>& a) {
      const int64_t BH = a.B * a.H, first = a.reverse ? a.T - a.s0 - a.n : a.s0, offset = first - a.tlo;
      const auto bf = at::TensorOptions().dtype(at::kBFloat16);
      const bool separate = a.r != a.y;
      const at::Tensor r_init = to_bf16(a.r_init, BH);
      const at::Tensor bias = a.bias ? to_bf16(a.bias, 4 * a.H) : at::Tensor();
      at::Tensor y = at::empty({a.n, BH}, bf), r = separate ? at::empty({a.n, BH}, bf) : y;
      ChunkRecurrenceArgs<BF16, float> b{};
      b.gates = a.gates + offset * 4 * BH;
      b.c = a.c + offset * BH;
      b.y = y.data_ptr<BF16>();
      b.r = r.data_ptr<BF16>();
      b.bias = bias.defined() ? bias.data_ptr<BF16>() : nullptr;
      b.r_init = r_init.data_ptr<BF16>();
      b.c_init = a.c_init;
      b.lengths = a.lengths;
      b.reset = a.reset;
      b.s0 = a.s0;
      b.n = a.n;
      b.tlo = first;
      b.T = a.T;
      b.B = a.B;
      b.H = a.H;
      b.reverse = a.reverse;
      bf16_.fused_forward(b);
      at::from_blob(a.y + offset * BH, {a.n, BH}, at::TensorOptions().dtype(at::kFloat)).copy_(y);
      if (separate) at::from_blob(a.r + offset * BH, {a.n, BH}, at::TensorOptions().dtype(at::kFloat)).copy_(r);
    }

   private:
    Bf16Policy::Recurrent<BF16> bf16_;
  };
};

// Bfloat16 layers without a projection run the AVX512-BF16 kernels where the CPU has them.
bool runs_bf16_kernels(at::ScalarType dtype, bool fused) {
  return dtype == at::kBFloat16 && fused && bf16_kernels() != nullptr;
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The CUDA-only backends are refused, not silently replaced by the CPU path.
void check_backend(std::string_view backend) {
  const Backend b = parse_backend(backend);
  TORCH_CHECK(b != Backend::Persistent && b != Backend::Cluster, "fastlstm: backend='", std::string(backend),
              "' needs a CUDA device; the input is on the CPU (use backend='auto' or 'stepwise')");
}

ForwardOut layer_forward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
                         const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                         const std::optional<at::Tensor>& reset,
                         const std::optional<at::Tensor>& /*norm_probe*/, bool reverse, int64_t checkpoint_every,
                         int64_t tbptt_chunk, double grad_clip, c10::string_view grad_clip_mode,
                         c10::string_view backend) {
  check_backend(backend);
  backward_options(tbptt_chunk, grad_clip, grad_clip_mode, false);
  check_checkpoint_every(checkpoint_every);
  const LayerInputs in(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset);
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const bool fused = !in.w_hr.defined();
  if (runs_bf16_kernels(dtype, fused)) {
    return forward_typed<Bf16Policy, BF16>(in.cast(dtype), reverse, checkpoint_every, fused);
  }
  const LayerInputs ci = in.cast(compute);
  ForwardOut out = compute == at::kDouble ? forward_typed<CpuPolicy, double>(ci, reverse, checkpoint_every, fused)
                                          : forward_typed<CpuPolicy, float>(ci, reverse, checkpoint_every, fused);
  if (compute != dtype) {
    std::get<0>(out) = std::get<0>(out).to(dtype);
    std::get<1>(out) = std::get<1>(out).to(dtype);
    std::get<2>(out) = std::get<2>(out).to(dtype);
    std::get<5>(out) = std::get<5>(out).to(dtype);
  }
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
  check_backend(backend);
  const BackwardOptions opts = backward_options(tbptt_chunk, grad_clip, grad_clip_mode, record_norms, input_grad);
  const LayerInputs in(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset);
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const LayerInputs ci = in.cast(compute);
  const at::Tensor dy = contiguous_as(grad_y, compute), dh = contiguous_as(grad_h_n, compute),
                   dc = contiguous_as(grad_c_n, compute);
  const at::Tensor yc = y.to(compute).contiguous(), rc = saved_r.to(compute).contiguous();
  const at::Tensor gc = saved_gates.contiguous(), cc = saved_c.contiguous();
  const bool fused = !ci.w_hr.defined();
  // After a forward on the bfloat16 kernels the backward runs in float32 too; it recomputes
  // checkpointed chunks with those kernels.
  BackwardOut out = compute == at::kDouble
                        ? backward_typed<CpuPolicy, double>(ci, dy, dh, dc, yc, gc, cc, rc, reverse,
                                                            checkpoint_every, fused, opts)
                    : runs_bf16_kernels(dtype, fused)
                        ? backward_typed<Bf16RecomputePolicy, float>(ci, dy, dh, dc, yc, gc, cc, rc, reverse,
                                                                     checkpoint_every, fused, opts)
                        : backward_typed<CpuPolicy, float>(ci, dy, dh, dc, yc, gc, cc, rc, reverse,
                                                           checkpoint_every, fused, opts);
  if (compute != dtype) {
    std::get<0>(out) = std::get<0>(out).to(dtype);
    std::get<1>(out) = std::get<1>(out).to(dtype);
    std::get<2>(out) = std::get<2>(out).to(dtype);
    std::get<3>(out) = std::get<3>(out).to(dtype);
    std::get<4>(out) = std::get<4>(out).to(dtype);
    std::get<5>(out) = std::get<5>(out).to(dtype);
    std::get<6>(out) = std::get<6>(out).to(dtype);
  }
  return out;
}

}  // namespace
}  // namespace fastlstm::cpu

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("layer_forward", &fastlstm::cpu::layer_forward);
  m.impl("layer_backward", &fastlstm::cpu::layer_backward);
}
