// One layer-direction of an LSTM over a whole sequence: the orchestration shared by every device.
//
// The driver arranges buffers, runs the input projection as large GEMMs, runs the recurrence, and
// computes the weight and input gradients as large GEMMs after the loop (DESIGN.md sections 2-4).
// The recurrence runs either step by step here (a GEMM with W_hh plus one fused pointwise kernel
// per step: the CUDA "stepwise" backend, and CPU layers with a projection) or, with
// fused_recurrence, as the Policy's own kernel for a whole chunk of steps (the persistent CUDA
// kernels, the fused CPU recurrence).
//
// Layout: everything is time-major and row-major. x (T, B, I), y (T, B, K) with K = P (proj_size)
// or H, gates (T, B, 4H). "Steps" count in processing order (s = t forward, s = T-1-t reverse);
// "times" index the tensors.
//
// Policy contract: Matrix<scalar_t>, a weight prepared once per call for repeated products
// (times_transposed: out = A W^T, times: out = A W); Recurrent<scalar_t>, the same for W_hh plus
// fused_forward / fused_backward, a whole-chunk recurrence, and projects_input(I) (whether
// fused_forward computes x W_ih^T itself, from the args' x and w_ih); projection_steps (how many steps of
// input projection to run ahead of the recurrence); inference_chunk (steps per chunk when no
// backward follows); norm_rows and norm_tiles (the shape of the per-step norm partial sums);
// weight_gradient(dG, X) = dG^T X over a chunk's rows; the pointwise kernels of step_args.h.
//
// Memory modes: with checkpoint_every = 0 the forward saves the activated gates and the cell
// state of every step. With checkpoint_every = k it saves only the state (r, c) at the boundaries of
// the k-step chunks; the backward recomputes each chunk's gates from its checkpoint, so the
// activation memory is O(T/k + k) instead of O(T) and the results are the same.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "buffers.h"
#include "cell_math.h"
#include "step_args.h"

namespace fastlstm {

struct LayerForwardResult {
  at::Tensor y, h_n, c_n, saved_gates, saved_c, saved_r;
};

struct LayerBackwardResult {
  at::Tensor dx, dw_ih, dw_hh, dbias, dw_hr, dh0, dc0, norms;
};

// checkpoint_every: 0 saves every step for the backward; k > 0 saves the state every k steps
// (the backward recomputes the rest); kNoBackward saves nothing because no backward will run,
// and the forward works through Policy::inference_chunk steps at a time in chunk-sized buffers
// (kInferenceChunk on the CPU, whose buffers should stay in cache).
constexpr int64_t kNoBackward = -1;
constexpr int64_t kInferenceChunk = 64;

template <class Policy, class scalar_t>
class LayerDriver {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  // All tensors contiguous, on one device, of dtype scalar_t (lengths: int64, reset: bool (T, B)).
  LayerDriver(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
              const at::Tensor& bias, const at::Tensor& w_hr, const at::Tensor& lengths,
              const at::Tensor& reset, bool reverse, int64_t checkpoint_every, bool fused_recurrence)
      : x_(x), w_ih_(w_ih), w_hh_(w_hh), bias_(bias), w_hr_(w_hr), lengths_(lengths), reset_(reset),
        reverse_(reverse), fused_(fused_recurrence),
        T_(x.size(0)), B_(x.size(1)), I_(x.size(2)), H_(w_hh.size(0) / 4),
        K_(w_hh.size(1)), proj_(w_hr.defined()),
        chunk_(std::min(checkpoint_every > 0               ? checkpoint_every
                        : checkpoint_every == kNoBackward
                            ? Policy::inference_chunk(x.size(1), w_hh.size(0) / 4, w_hh.size(1), x.element_size())
                                                          : x.size(0),
                        x.size(0))),
        nchunks_((T_ + chunk_ - 1) / chunk_),
        checkpointing_(checkpoint_every != 0),
        no_backward_(checkpoint_every == kNoBackward),
        acc_type_(c10::CppTypeToScalarType<acc_t>::value), acc_opts_(x.options().dtype(acc_type_)),
        w_ih_mat_(w_ih), recurrent_(w_hh) {
    if (proj_) w_hr_mat_.emplace(w_hr);
  }

  LayerForwardResult forward(const at::Tensor& h0, const at::Tensor& c0) {
    LayerForwardResult out;
    out.y = new_buffer({T_, B_, K_}, x_.options());
    const at::Tensor c0_acc = c0.to(acc_type_).contiguous();
    if (!checkpointing_) {
      out.saved_gates = new_buffer({T_, B_, 4 * H_}, acc_opts_);
      out.saved_c = new_buffer({T_, B_, H_}, acc_opts_);
      out.saved_r = separate_state() ? new_buffer({T_, B_, K_}, x_.options()) : at::empty({0}, x_.options());
      Storage st = full_storage(out.y, out.saved_gates, out.saved_c, out.saved_r);
      chunk_forward(0, T_, st, h0.data_ptr<scalar_t>(), c0_acc.data_ptr<acc_t>());
      const int64_t last = time_of(T_ - 1);
      out.h_n = slot_tensor(st.r, last, st.tlo, K_, x_.options()).clone();
      out.c_n = slot_tensor(st.c, last, st.tlo, H_, acc_opts_).to(x_.scalar_type(), false, /*copy=*/true);
      return out;
    }
    // Checkpointing: chunk-sized work buffers, the state saved at every chunk boundary, both ends
    // included (nchunks + 1 slots; the backward reads the first nchunks; the last, the final
    // state, keeps the saved tensors at least 2 long, so torch.export traces a symbolic T
    // without a size-1 guard). With no backward to come, a ring of two holds the current chunk's
    // initial state.
    out.saved_gates = at::empty({0}, acc_opts_);
    const int64_t slots = no_backward_ ? 2 : nchunks_ + 1;
    at::Tensor state_r = new_buffer({slots, B_, K_}, x_.options());
    at::Tensor state_c = new_buffer({slots, B_, H_}, acc_opts_);
    state_r[0].copy_(h0);
    state_c[0].copy_(c0_acc);
    Workspace ws = chunk_workspace();
    for (int64_t ci = 0; ci < nchunks_; ++ci) {
      const int64_t s0 = ci * chunk_, n = std::min(chunk_, T_ - s0);
      Storage st = chunk_storage(ws, s0, n, out.y.data_ptr<scalar_t>() + block_start(s0, n) * B_ * K_);
      chunk_forward(s0, n, st, state_r[ci % slots].data_ptr<scalar_t>(), state_c[ci % slots].data_ptr<acc_t>());
      const int64_t last = time_of(s0 + n - 1);
      at::Tensor r_last = slot_tensor(st.r, last, st.tlo, K_, x_.options());
      at::Tensor c_last = slot_tensor(st.c, last, st.tlo, H_, acc_opts_);
      state_r[(ci + 1) % slots].copy_(r_last);
      state_c[(ci + 1) % slots].copy_(c_last);
      if (ci + 1 == nchunks_) {
        out.h_n = r_last.clone();
        out.c_n = c_last.to(x_.scalar_type(), false, /*copy=*/true);
      }
    }
    out.saved_r = no_backward_ ? at::empty({0}, x_.options()) : state_r;
    out.saved_c = no_backward_ ? at::empty({0}, acc_opts_) : state_c;
    return out;
  }

  LayerBackwardResult backward(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n,
                               const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& y,
                               const at::Tensor& saved_gates, const at::Tensor& saved_c,
                               const at::Tensor& saved_r, const BackwardOptions& opts) {
    LayerBackwardResult out;
    const at::Tensor c0_acc = c0.to(acc_type_).contiguous();
    at::Tensor carry_h = dh_n.defined() ? dh_n.to(acc_type_).contiguous().clone()
                                        : at::zeros({B_, K_}, acc_opts_);
    at::Tensor carry_c = dc_n.defined() ? dc_n.to(acc_type_).contiguous().clone()
                                        : at::zeros({B_, H_}, acc_opts_);
    const int64_t tiles = Policy::template norm_tiles<scalar_t>(H_, B_, fused_);
    const int64_t rows = Policy::norm_rows(B_, fused_);
    at::Tensor norm_partial =
        opts.record_norms ? new_buffer({T_, 2, rows, tiles}, acc_opts_) : at::Tensor();
    at::Tensor dh_ws = proj_ ? new_buffer({B_, H_}, acc_opts_) : at::Tensor();
    out.dx = opts.input_grad ? new_buffer({T_, B_, I_}, x_.options()) : at::empty({0}, x_.options());

    // Gate gradients (and dL/dr_t for projections) for one chunk at a time, or for all of T.
    at::Tensor dgates = new_buffer({chunk_, B_, 4 * H_}, x_.options());
    at::Tensor dr = proj_ ? new_buffer({chunk_, B_, K_}, x_.options()) : at::Tensor();
    Workspace ws = checkpointing_ ? chunk_workspace() : Workspace{};
    at::Tensor dw_ih, dw_hh, dbias, dw_hr;

    for (int64_t ci = nchunks_ - 1; ci >= 0; --ci) {
      const int64_t s0 = ci * chunk_, n = std::min(chunk_, T_ - s0), tlo = block_start(s0, n);
      Storage st;
      const scalar_t* r_init;
      const acc_t* c_init;
      if (checkpointing_) {
        st = chunk_storage(ws, s0, n, ws.y.template data_ptr<scalar_t>());
        r_init = saved_r[ci].data_ptr<scalar_t>();
        c_init = saved_c[ci].data_ptr<acc_t>();
        chunk_forward(s0, n, st, r_init, c_init);
      } else {
        st = full_storage(y, saved_gates, saved_c, saved_r);
        r_init = h0.data_ptr<scalar_t>();
        c_init = c0_acc.data_ptr<acc_t>();
      }
      scalar_t* dg_base = dgates.data_ptr<scalar_t>();
      scalar_t* dr_base = proj_ ? dr.data_ptr<scalar_t>() : nullptr;
      const scalar_t* dy_ptr = dy.defined() ? dy.data_ptr<scalar_t>() : nullptr;
      acc_t* norm_ptr = opts.record_norms ? norm_partial.data_ptr<acc_t>() : nullptr;

      if (fused_) {
        ChunkRecurrenceArgs<scalar_t, acc_t> a = recurrence_args(st, s0, n, r_init, c_init);
        a.dy = dy_ptr;
        a.dgates = dg_base;
        a.carry_h = carry_h.data_ptr<acc_t>();
        a.carry_c = carry_c.data_ptr<acc_t>();
        a.norm_partial = norm_ptr;
        a.opts = opts;
        recurrent_.fused_backward(a);
      } else {
        for (int64_t i = n - 1; i >= 0; --i) {
          const int64_t s = s0 + i, t = time_of(s), slot = t - tlo;
          const acc_t* c_prev = i == 0 ? c_init : st.c + (time_of(s - 1) - tlo) * B_ * H_;
          BackwardCellArgs<scalar_t, acc_t> a{};
          a.gates = st.gates + slot * B_ * 4 * H_;
          a.c = st.c + slot * B_ * H_;
          a.c_prev = c_prev;
          a.dc = carry_c.data_ptr<acc_t>();
          a.dgates = dg_base + slot * B_ * 4 * H_;
          a.norm_partial = norm_ptr ? norm_ptr + t * 2 * rows * tiles : nullptr;
          a.lengths = lengths_ptr();
          a.reset = reset_ptr();
          a.t = t;
          a.T = T_;
          a.B = B_;
          a.H = H_;
          a.reverse = reverse_;
          a.tbptt_chunk = opts.tbptt_chunk;
          a.clip_recurrent = static_cast<acc_t>(opts.clip_recurrent);
          a.clip_gates = static_cast<acc_t>(opts.clip_gates);
          if (proj_) {
            BackwardProjArgs<scalar_t, acc_t> p{};
            p.dy = dy_ptr ? dy_ptr + t * B_ * K_ : nullptr;
            p.dr_carry = carry_h.data_ptr<acc_t>();
            p.dr_total = dr_base + slot * B_ * K_;
            p.lengths = lengths_ptr();
            p.reset = reset_ptr();
            p.t = t;
            p.T = T_;
            p.B = B_;
            p.P = K_;
            p.reverse = reverse_;
            p.tbptt_chunk = opts.tbptt_chunk;
            p.clip_recurrent = a.clip_recurrent;
            Policy::proj_backward(p);
            w_hr_mat_->times(B_, p.dr_total, dh_ws.data_ptr<acc_t>(), false);
            a.dy = nullptr;
            a.dh_in = dh_ws.data_ptr<acc_t>();
            a.dh_pass = nullptr;
          } else {
            a.dy = dy_ptr ? dy_ptr + t * B_ * K_ : nullptr;
            a.dh_in = carry_h.data_ptr<acc_t>();
            a.dh_pass = carry_h.data_ptr<acc_t>();
          }
          Policy::cell_backward(a);
          // The carry step t sends back: dG_t W_hh, added to what skipped the step.
          recurrent_.backward(B_, a.dgates, carry_h.data_ptr<acc_t>());
        }
      }

      // Weight and input gradients of the chunk as large GEMMs.
      const at::Tensor dg = dgates.narrow(0, 0, n).view({n * B_, 4 * H_});
      const at::Tensor xc = x_.narrow(0, tlo, n).view({n * B_, I_});
      if (opts.input_grad) {
        w_ih_mat_.times(n * B_, dg.data_ptr<scalar_t>(), out.dx.data_ptr<scalar_t>() + tlo * B_ * I_, false);
      }
      accumulate(dw_ih, Policy::weight_gradient(dg, xc));
      if (bias_.defined()) accumulate(dbias, dg.sum(0, false, acc_type_));
      // dW_hh = sum_t dG_t^T r_{t-1}: the states each step read, r_init first in processing order,
      // gathered into one contiguous block so the product is a single large GEMM.
      const at::Tensor r_blk = slot_range(st.r, tlo, tlo, n, K_, x_.options());
      const at::Tensor r0 = at::from_blob(const_cast<scalar_t*>(r_init), {1, B_, K_}, x_.options());
      at::Tensor r_prev = new_buffer({n, B_, K_}, x_.options());
      if (reverse_) {
        at::cat_out(r_prev, {r_blk.narrow(0, 1, n - 1), r0});
      } else {
        at::cat_out(r_prev, {r0, r_blk.narrow(0, 0, n - 1)});
      }
      accumulate(dw_hh, Policy::weight_gradient(dg, r_prev.view({n * B_, K_})));
      if (proj_) {
        const at::Tensor g_blk = slot_range(st.gates, tlo, tlo, n, 4 * H_, acc_opts_);
        const at::Tensor c_blk = slot_range(st.c, tlo, tlo, n, H_, acc_opts_);
        const at::Tensor h_blk = (g_blk.narrow(2, 3 * H_, H_) * c_blk.tanh()).to(x_.scalar_type());
        accumulate(dw_hr, Policy::weight_gradient(dr.narrow(0, 0, n).view({n * B_, K_}), h_blk.view({n * B_, H_})));
      }
    }

    const auto dtype = x_.scalar_type();
    out.dw_ih = dw_ih.to(dtype);
    out.dw_hh = dw_hh.to(dtype);
    out.dbias = bias_.defined() ? dbias.to(dtype) : at::empty({0}, x_.options());
    out.dw_hr = proj_ ? dw_hr.to(dtype) : at::empty({0}, x_.options());
    // Step 0 sends its carry to the initial state: clipped like any other step, never cut.
    if (opts.clip_recurrent > 0) {
      carry_h.clamp_(-opts.clip_recurrent, opts.clip_recurrent);
      carry_c.clamp_(-opts.clip_recurrent, opts.clip_recurrent);
    }
    out.dh0 = carry_h.to(dtype);
    out.dc0 = carry_c.to(dtype);
    out.norms = opts.record_norms ? norm_partial.sum({2, 3}).sqrt_().t().contiguous()
                                  : at::empty({0}, acc_opts_);
    return out;
  }

 private:
  // Per-step slots of one chunk: slot(t) = base + (t - tlo) * row.
  struct Storage {
    acc_t* gates = nullptr;
    acc_t* c = nullptr;
    scalar_t* r = nullptr;
    scalar_t* y = nullptr;
    int64_t tlo = 0;
  };
  struct Workspace {
    at::Tensor gates, c, r, y;
  };

  // Padding and resets make the carried state differ from the output: it gets its own buffer r.
  bool separate_state() const { return lengths_.defined() || reset_.defined(); }
  const int64_t* lengths_ptr() const { return lengths_.defined() ? lengths_.data_ptr<int64_t>() : nullptr; }
  const bool* reset_ptr() const { return reset_.defined() ? reset_.data_ptr<bool>() : nullptr; }
  const scalar_t* bias_ptr() const { return bias_.defined() ? bias_.data_ptr<scalar_t>() : nullptr; }
  int64_t time_of(int64_t s) const { return reverse_ ? T_ - 1 - s : s; }
  // First time index of the block covered by processing steps [s0, s0 + n).
  int64_t block_start(int64_t s0, int64_t n) const { return reverse_ ? T_ - s0 - n : s0; }

  // Views of slots [t, t + n) of a chunk buffer whose slot 0 holds time tlo.
  template <class P>
  at::Tensor slot_range(P* base, int64_t t, int64_t tlo, int64_t n, int64_t width, at::TensorOptions o) const {
    return at::from_blob(base + (t - tlo) * B_ * width, {n, B_, width}, o);
  }
  template <class P>
  at::Tensor slot_tensor(P* base, int64_t t, int64_t tlo, int64_t width, at::TensorOptions o) const {
    return at::from_blob(base + (t - tlo) * B_ * width, {B_, width}, o);
  }

  Storage full_storage(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& c, const at::Tensor& r) const {
    Storage st;
    st.gates = gates.data_ptr<acc_t>();
    st.c = c.data_ptr<acc_t>();
    st.y = y.data_ptr<scalar_t>();
    st.r = separate_state() ? r.data_ptr<scalar_t>() : st.y;
    st.tlo = 0;
    return st;
  }

  Workspace chunk_workspace() const {
    Workspace ws;
    ws.gates = new_buffer({chunk_, B_, 4 * H_}, acc_opts_);
    ws.c = new_buffer({chunk_, B_, H_}, acc_opts_);
    ws.y = new_buffer({chunk_, B_, K_}, x_.options());
    ws.r = separate_state() ? new_buffer({chunk_, B_, K_}, x_.options()) : at::Tensor();
    return ws;
  }

  // y_base: the y slot of the block's first time (the layer output in the forward, a scratch
  // buffer when the backward recomputes a chunk).
  Storage chunk_storage(const Workspace& ws, int64_t s0, int64_t n, scalar_t* y_base) const {
    Storage st;
    st.gates = ws.gates.template data_ptr<acc_t>();
    st.c = ws.c.template data_ptr<acc_t>();
    st.y = y_base;
    st.r = separate_state() ? ws.r.template data_ptr<scalar_t>() : y_base;
    st.tlo = block_start(s0, n);
    return st;
  }

  ChunkRecurrenceArgs<scalar_t, acc_t> recurrence_args(const Storage& st, int64_t s0, int64_t n,
                                                       const scalar_t* r_init, const acc_t* c_init) const {
    ChunkRecurrenceArgs<scalar_t, acc_t> a{};
    a.gates = st.gates;
    a.c = st.c;
    a.r = st.r;
    a.y = st.y;
    a.w_hh = w_hh_.data_ptr<scalar_t>();
    a.bias = bias_ptr();
    a.r_init = r_init;
    a.c_init = c_init;
    a.lengths = lengths_ptr();
    a.reset = reset_ptr();
    a.s0 = s0;
    a.n = n;
    a.tlo = st.tlo;
    a.T = T_;
    a.B = B_;
    a.H = H_;
    a.reverse = reverse_;
    return a;
  }

  // Runs processing steps [s0, s0 + n) into the chunk's slots, from state (r_init, c_init). The
  // input projection runs inside the fused recurrence where the policy's kernel computes it
  // (Recurrent::projects_input), else a block of Policy::projection_steps at a time, just before
  // the block's recurrence, so its output is still in cache when the recurrence reads it.
  void chunk_forward(int64_t s0, int64_t n, const Storage& st, const scalar_t* r_init, const acc_t* c_init) {
    if (fused_ && recurrent_.projects_input(I_)) {
      ChunkRecurrenceArgs<scalar_t, acc_t> a = recurrence_args(st, s0, n, r_init, c_init);
      a.x = x_.data_ptr<scalar_t>();
      a.w_ih = w_ih_.data_ptr<scalar_t>();
      a.I = I_;
      recurrent_.fused_forward(a);
      return;
    }
    const int64_t block = std::max<int64_t>(1, std::min(n, Policy::projection_steps(B_, H_)));
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t m = std::min(block, n - i0), tb = block_start(s0 + i0, m);
      // gates = x W_ih^T for the block (the cell kernels add the bias)
      w_ih_mat_.times_transposed(m * B_, x_.data_ptr<scalar_t>() + tb * B_ * I_,
                                 st.gates + (tb - st.tlo) * B_ * 4 * H_, false);
      const int64_t before = i0 == 0 ? -1 : time_of(s0 + i0 - 1) - st.tlo;
      const scalar_t* r0 = before < 0 ? r_init : st.r + before * B_ * K_;
      const acc_t* c0 = before < 0 ? c_init : st.c + before * B_ * H_;
      if (fused_) {
        recurrent_.fused_forward(recurrence_args(st, s0 + i0, m, r0, c0));
      } else {
        forward_steps(s0 + i0, m, st, r0, c0);
      }
    }
  }

  // The step-by-step recurrence: per step a GEMM with W_hh and the fused cell kernel.
  void forward_steps(int64_t s0, int64_t n, const Storage& st, const scalar_t* r_init, const acc_t* c_init) {
    const int64_t tlo = st.tlo;
    at::Tensor hbuf = proj_ ? new_buffer({B_, H_}, x_.options()) : at::Tensor();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = s0 + i, t = time_of(s), slot = t - tlo;
      const int64_t prev = i == 0 ? -1 : time_of(s - 1) - tlo;
      const scalar_t* r_prev = prev < 0 ? r_init : st.r + prev * B_ * K_;
      const acc_t* c_prev = prev < 0 ? c_init : st.c + prev * B_ * H_;
      acc_t* gates = st.gates + slot * B_ * 4 * H_;
      scalar_t* y_t = st.y + slot * B_ * K_;
      scalar_t* r_t = st.r + slot * B_ * K_;
      recurrent_.forward(B_, r_prev, gates);
      ForwardCellArgs<scalar_t, acc_t> a{};
      a.gates = gates;
      a.c_prev = c_prev;
      a.bias = bias_ptr();
      a.c_next = st.c + slot * B_ * H_;
      a.h_prev = r_prev;
      a.h_out = proj_ ? hbuf.data_ptr<scalar_t>() : y_t;
      a.h_state = (!proj_ && separate_state()) ? r_t : nullptr;
      a.lengths = lengths_ptr();
      a.reset = reset_ptr();
      a.t = t;
      a.T = T_;
      a.B = B_;
      a.H = H_;
      a.reverse = reverse_;
      Policy::cell_forward(a);
      if (proj_) {
        w_hr_mat_->times_transposed(B_, a.h_out, y_t, false);
        if (separate_state()) {
          Policy::state_select(
              StateSelectArgs<scalar_t>{y_t, r_prev, r_t, lengths_ptr(), reset_ptr(), t, T_, B_, K_, reverse_});
        }
      }
    }
  }

  void accumulate(at::Tensor& total, const at::Tensor& part) const {
    if (!total.defined()) {
      total = part;
    } else {
      if (total.scalar_type() != acc_type_) total = total.to(acc_type_);
      total.add_(part);
    }
  }

  const at::Tensor x_, w_ih_, w_hh_, bias_, w_hr_, lengths_, reset_;
  const bool reverse_, fused_;
  const int64_t T_, B_, I_, H_, K_;
  const bool proj_;
  const int64_t chunk_, nchunks_;
  const bool checkpointing_, no_backward_;
  const at::ScalarType acc_type_;
  const at::TensorOptions acc_opts_;
  // Weights prepared once per call for their repeated products (the policy may pack them).
  typename Policy::template Matrix<scalar_t> w_ih_mat_;
  std::optional<typename Policy::template Matrix<scalar_t>> w_hr_mat_;  // projection layers only
  typename Policy::template Recurrent<scalar_t> recurrent_;             // W_hh: step products, fused kernels
};

}  // namespace fastlstm
