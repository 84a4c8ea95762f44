// The layer ops' inputs, their checks, and the typed entry points that every device calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "layer_driver.h"

namespace fastlstm {

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

enum class Backend { Auto, Stepwise, Persistent, Cluster };

inline Backend parse_backend(std::string_view s) {
  if (s == "auto") return Backend::Auto;
  if (s == "stepwise") return Backend::Stepwise;
  if (s == "persistent") return Backend::Persistent;
  if (s == "cluster") return Backend::Cluster;
  TORCH_CHECK(false, "fastlstm: backend must be one of 'auto', 'stepwise', 'persistent', 'cluster', got '",
              std::string(s), "'");
}

inline void check_checkpoint_every(int64_t checkpoint_every) {
  TORCH_CHECK(checkpoint_every >= kNoBackward,
              "fastlstm: checkpoint_every must be >= 0, or -1 when no backward will run; got ", checkpoint_every);
}

inline BackwardOptions backward_options(int64_t tbptt_chunk, double grad_clip, std::string_view clip_mode,
                                        bool record_norms, bool input_grad = true) {
  TORCH_CHECK(tbptt_chunk >= 0, "fastlstm: tbptt_chunk must be >= 0 (0 disables truncation), got ", tbptt_chunk);
  TORCH_CHECK(grad_clip >= 0, "fastlstm: grad_clip must be >= 0 (0 disables clipping), got ", grad_clip);
  TORCH_CHECK(clip_mode == "recurrent" || clip_mode == "gates",
              "fastlstm: grad_clip_mode must be 'recurrent' or 'gates', got '", std::string(clip_mode), "'");
  BackwardOptions o;
  o.tbptt_chunk = tbptt_chunk;
  o.clip_recurrent = clip_mode == "recurrent" ? grad_clip : 0.0;
  o.clip_gates = clip_mode == "gates" ? grad_clip : 0.0;
  o.record_norms = record_norms;
  o.input_grad = input_grad;
  return o;
}

// One layer-direction's inputs. bias (b_ih + b_hh), w_hr, lengths and reset may be undefined.
struct LayerInputs {
  at::Tensor x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset;

  LayerInputs(const at::Tensor& x_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
              const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& w_hr_, const at::Tensor& h0_,
              const at::Tensor& c0_, const std::optional<at::Tensor>& lengths_,
              const std::optional<at::Tensor>& reset_)
      : x(x_), w_ih(w_ih_), w_hh(w_hh_), bias(bias_.value_or(at::Tensor())), w_hr(w_hr_.value_or(at::Tensor())),
        h0(h0_), c0(c0_), lengths(lengths_.value_or(at::Tensor())), reset(reset_.value_or(at::Tensor())) {
    check();
  }

  int64_t hidden_size() const { return w_hh.size(0) / 4; }

  // Contiguous copies in `dtype` (lengths and reset untouched).
  LayerInputs cast(at::ScalarType dtype) const {
    LayerInputs c = *this;
    auto conv = [dtype](const at::Tensor& t) { return t.defined() ? t.to(dtype).contiguous() : t; };
    c.x = conv(x);
    c.w_ih = conv(w_ih);
    c.w_hh = conv(w_hh);
    c.bias = conv(bias);
    c.w_hr = conv(w_hr);
    c.h0 = conv(h0);
    c.c0 = conv(c0);
    c.lengths = lengths.defined() ? lengths.contiguous() : lengths;
    c.reset = reset.defined() ? reset.contiguous() : reset;
    return c;
  }

 private:
  void check() const {
    TORCH_CHECK(x.dim() == 3, "fastlstm: x must be 3-D (seq_len, batch, input_size), got ", x.dim(), "-D");
    TORCH_CHECK(x.size(0) > 0, "fastlstm: the sequence length must be at least 1, got 0");
    TORCH_CHECK(x.is_floating_point(), "fastlstm: x must be a floating-point tensor, got ", x.scalar_type());
    TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0,
                "fastlstm: w_hh must be (4 * hidden_size, state_size), got ", w_hh.sizes());
    const int64_t H = hidden_size(), B = x.size(1), K = w_hh.size(1);
    TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * H && w_ih.size(1) == x.size(2), "fastlstm: w_ih must be (",
                4 * H, ", ", x.size(2), "), got ", w_ih.sizes());
    if (w_hr.defined()) {
      TORCH_CHECK(w_hr.dim() == 2 && w_hr.size(0) == K && w_hr.size(1) == H, "fastlstm: w_hr must be (", K, ", ", H,
                  "), got ", w_hr.sizes());
    } else {
      TORCH_CHECK(K == H, "fastlstm: w_hh must be (", 4 * H, ", ", H, ") without a projection, got ", w_hh.sizes());
    }
    if (bias.defined()) {
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == 4 * H, "fastlstm: bias must be (", 4 * H, "), got ",
                  bias.sizes());
    }
    TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && h0.size(1) == K, "fastlstm: h0 must be (", B, ", ", K, "), got ",
                h0.sizes());
    TORCH_CHECK(c0.dim() == 2 && c0.size(0) == B && c0.size(1) == H, "fastlstm: c0 must be (", B, ", ", H, "), got ",
                c0.sizes());
    for (const at::Tensor* t : {&w_ih, &w_hh, &bias, &w_hr, &h0, &c0}) {
      if (!t->defined()) continue;
      TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fastlstm: all tensors must have the dtype of x (",
                  x.scalar_type(), "), got ", t->scalar_type());
      TORCH_CHECK(t->device() == x.device(), "fastlstm: all tensors must be on the device of x (", x.device(),
                  "), got ", t->device());
    }
    if (lengths.defined()) {
      TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong,
                  "fastlstm: lengths must be an int64 tensor of shape (", B, "), got ", lengths.scalar_type(), " ",
                  lengths.sizes());
      TORCH_CHECK(lengths.device() == x.device(), "fastlstm: lengths must be on the device of x (", x.device(),
                  "), got ", lengths.device());
      if (lengths.device().is_cpu() && B > 0) {
        TORCH_CHECK(lengths.min().item<int64_t>() >= 1 && lengths.max().item<int64_t>() <= x.size(0),
                    "fastlstm: lengths must lie in [1, ", x.size(0), "]");
      }
    }
    if (reset.defined()) {
      TORCH_CHECK(reset.scalar_type() == at::kBool && reset.dim() == 2 && reset.size(0) == x.size(0) &&
                      reset.size(1) == B,
                  "fastlstm: reset must be a bool tensor of shape (", x.size(0), ", ", B, "), got ",
                  reset.scalar_type(), " ", reset.sizes());
      TORCH_CHECK(reset.device() == x.device(), "fastlstm: reset must be on the device of x (", x.device(), "), got ",
                  reset.device());
    }
  }
};

template <class Policy, class scalar_t>
ForwardOut forward_typed(const LayerInputs& in, bool reverse, int64_t checkpoint_every, bool fused_recurrence) {
  LayerDriver<Policy, scalar_t> d(in.x, in.w_ih, in.w_hh, in.bias, in.w_hr, in.lengths, in.reset, reverse,
                                  checkpoint_every, fused_recurrence);
  LayerForwardResult r = d.forward(in.h0, in.c0);
  return {r.y, r.h_n, r.c_n, r.saved_gates, r.saved_c, r.saved_r};
}

// Gradients that autograd did not produce arrive undefined and count as zero.
template <class Policy, class scalar_t>
BackwardOut backward_typed(const LayerInputs& in, const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n,
                           const at::Tensor& y, const at::Tensor& saved_gates, const at::Tensor& saved_c,
                           const at::Tensor& saved_r, bool reverse, int64_t checkpoint_every, bool fused_recurrence,
                           const BackwardOptions& opts) {
  LayerDriver<Policy, scalar_t> d(in.x, in.w_ih, in.w_hh, in.bias, in.w_hr, in.lengths, in.reset, reverse,
                                  checkpoint_every, fused_recurrence);
  LayerBackwardResult r = d.backward(dy, dh_n, dc_n, in.h0, in.c0, y, saved_gates, saved_c, saved_r, opts);
  return {r.dx, r.dw_ih, r.dw_hh, r.dbias, r.dw_hr, r.dh0, r.dc0, r.norms};
}

inline at::Tensor contiguous_as(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() && t->defined() ? t->to(dtype).contiguous() : at::Tensor();
}

}  // namespace fastlstm
