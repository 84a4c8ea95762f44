// The layer ops on the CPU: ATen GEMMs (MKL/OpenBLAS through ATen) for the input projection and
// the weight gradients; the recurrence fused in one parallel region (lstm_recurrence_cpu.cpp), or
// for projection layers step by step with packed GEMMs and the cell kernels of lstm_cell_cpu.cpp. Half types run in float and are converted at the boundary, so the cell
// state and every accumulation are fp32 (DESIGN.md section 7).
#include <torch/library.h>

#include <type_traits>

#include "../fastlstm/layer_op.h"
#include "lstm_cell_cpu.h"
#include "lstm_recurrence_cpu.h"
#include "packed_gemm_cpu.h"

namespace fastlstm::cpu {
namespace {

// The packed kernel beats MKL's sgemm on the big products of a layer (input projection, dL/dx)
// up to a reduction depth of 512 (measured on AVX-512 and AVX2 machines); beyond that, and for
// the small per-step products of projection layers (where packing would not pay off), ATen's mm.
bool use_packed(int64_t M, int64_t depth) { return M >= 256 && depth <= 512; }

struct CpuPolicy {
  // C[M, N] (+)= A[M, K] B[N, K]^T, all row-major.
  template <class S, class C>
  static void gemm_nt(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate) {
    static_assert(std::is_same_v<S, C>, "the CPU path computes in one dtype");
    if (use_packed(M, K)) {
      PackedMatrix<S>(B, K, N, 1, K).multiply(M, A, out, accumulate);
      return;
    }
    const auto o = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
    const at::Tensor a = at::from_blob(const_cast<S*>(A), {M, K}, o);
    const at::Tensor b = at::from_blob(const_cast<S*>(B), {N, K}, o);
    at::Tensor c = at::from_blob(out, {M, N}, o);
    if (accumulate) {
      c.addmm_(a, b.t());
    } else {
      at::mm_out(c, a, b.t());
    }
  }

  // C[M, N] (+)= A[M, K] B[K, N], all row-major.
  template <class S, class C>
  static void gemm_nn(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate) {
    static_assert(std::is_same_v<S, C>, "the CPU path computes in one dtype");
    if (use_packed(M, K)) {
      PackedMatrix<S>(B, K, N, N, 1).multiply(M, A, out, accumulate);
      return;
    }
    const auto o = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
    const at::Tensor a = at::from_blob(const_cast<S*>(A), {M, K}, o);
    const at::Tensor b = at::from_blob(const_cast<S*>(B), {K, N}, o);
    at::Tensor c = at::from_blob(out, {M, N}, o);
    if (accumulate) {
      c.addmm_(a, b);
    } else {
      at::mm_out(c, a, b);
    }
  }

  // W_hh packed once per layer call, for each direction of use.
  template <class S>
  class Recurrent {
   public:
    explicit Recurrent(const at::Tensor& w_hh) : w_(w_hh) {}
    // gates[B, 4H] += r[B, K] W_hh^T
    void forward(int64_t B, const S* r, S* gates) {
      if (w_t_.empty()) w_t_ = PackedMatrix<S>(w_.data_ptr<S>(), w_.size(1), w_.size(0), 1, w_.size(1));
      w_t_.multiply(B, r, gates, true);
    }
    // carry[B, K] += dG[B, 4H] W_hh
    void backward(int64_t B, const S* dgates, S* carry) {
      if (w_n_.empty()) w_n_ = PackedMatrix<S>(w_.data_ptr<S>(), w_.size(0), w_.size(1), w_.size(1), 1);
      w_n_.multiply(B, dgates, carry, true);
    }

   private:
    at::Tensor w_;
    PackedMatrix<S> w_t_, w_n_;
  };

  template <class S>
  static int64_t norm_tiles(int64_t H, int64_t, bool fused) { return fused ? unit_blocks<S>(H) : 1; }

  template <class S, class A>
  static void cell_forward(const ForwardCellArgs<S, A>& a) { cpu::cell_forward<S>(a); }
  template <class S, class A>
  static void cell_backward(const BackwardCellArgs<S, A>& a) { cpu::cell_backward<S>(a); }
  template <class S, class A>
  static void proj_backward(const BackwardProjArgs<S, A>& a) { cpu::proj_backward<S>(a); }
  template <class S>
  static void state_select(const StateSelectArgs<S>& a) { cpu::state_select<S>(a); }

  template <class S, class A>
  static void recurrence_forward(const ChunkRecurrenceArgs<S, A>& a) { fused_forward<S>(a); }
  template <class S, class A>
  static void recurrence_backward(const ChunkRecurrenceArgs<S, A>& a) { fused_backward<S>(a); }
};

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

void check_backend(std::string_view backend) {
  TORCH_CHECK(parse_backend(backend) != Backend::Persistent,
              "fastlstm: backend='persistent' needs a CUDA device; the input is on the CPU "
              "(use backend='auto' or 'stepwise')");
}

ForwardOut layer_forward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
                         const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                         const std::optional<at::Tensor>& /*norm_probe*/, bool reverse, int64_t checkpoint_every,
                         int64_t tbptt_chunk, double grad_clip, c10::string_view grad_clip_mode,
                         c10::string_view backend) {
  check_backend(backend);
  backward_options(tbptt_chunk, grad_clip, grad_clip_mode, false);
  TORCH_CHECK(checkpoint_every >= 0, "fastlstm: checkpoint_every must be >= 0, got ", checkpoint_every);
  const LayerInputs in(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths);
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const LayerInputs ci = in.cast(compute);
  const bool fused = !ci.w_hr.defined();
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
                           const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                           const at::Tensor& saved_gates, const at::Tensor& saved_c, const at::Tensor& saved_r,
                           bool reverse, int64_t checkpoint_every, int64_t tbptt_chunk, double grad_clip,
                           c10::string_view grad_clip_mode, bool record_norms, bool input_grad,
                           c10::string_view backend) {
  check_backend(backend);
  const BackwardOptions opts = backward_options(tbptt_chunk, grad_clip, grad_clip_mode, record_norms, input_grad);
  const LayerInputs in(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths);
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const LayerInputs ci = in.cast(compute);
  const at::Tensor dy = contiguous_as(grad_y, compute), dh = contiguous_as(grad_h_n, compute),
                   dc = contiguous_as(grad_c_n, compute);
  const at::Tensor yc = y.to(compute).contiguous(), rc = saved_r.to(compute).contiguous();
  const at::Tensor gc = saved_gates.contiguous(), cc = saved_c.contiguous();
  const bool fused = !ci.w_hr.defined();
  BackwardOut out = compute == at::kDouble
                        ? backward_typed<CpuPolicy, double>(ci, dy, dh, dc, yc, gc, cc, rc, reverse,
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
