"""The fastlstm ops: fake (shape) kernels, autograd, and the Python entry point of one layer.

The schemas and the device kernels live in C++ (csrc/ops.cpp, csrc/cpu, csrc/cuda); this file
teaches torch.library how to trace the ops (``register_fake``) and differentiate them
(``register_autograd``), so ``torch.compile`` sees one op per layer and direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (loads the library)
from . import composite

_layer_forward = torch.ops.fastlstm.layer_forward.default
_layer_backward = torch.ops.fastlstm.layer_backward.default


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastlstm::layer_forward")
def _layer_forward_fake(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, norm_probe, reverse,
                        checkpoint_every, tbptt_chunk, grad_clip, grad_clip_mode, backend):
    T, B, _ = x.shape
    H, K = w_hh.shape[0] // 4, w_hh.shape[1]
    acc = _acc_dtype(x.dtype)
    y = x.new_empty((T, B, K))
    h_n = x.new_empty((B, K))
    c_n = x.new_empty((B, H))
    if checkpoint_every == NO_BACKWARD:
        gates, saved_c, saved_r = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc), x.new_empty((0,))
    elif checkpoint_every > 0:
        # The states at the chunk boundaries, both ends included: ceil(T / min(k, T)) + 1, written
        # without min or true division (equal for every T >= 1) so a symbolic T traces without
        # a guard; at least 2, so no size-1 guard either.
        chunks = (T + checkpoint_every - 1) // checkpoint_every + 1
        gates = x.new_empty((0,), dtype=acc)
        saved_c = x.new_empty((chunks, B, H), dtype=acc)
        saved_r = x.new_empty((chunks, B, K))
    else:
        gates = x.new_empty((T, B, 4 * H), dtype=acc)
        saved_c = x.new_empty((T, B, H), dtype=acc)
        saved_r = x.new_empty((T, B, K) if lengths is not None or reset is not None else (0,))
    return y, h_n, c_n, gates, saved_c, saved_r


@torch.library.register_fake("fastlstm::layer_backward")
def _layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, y,
                         saved_gates, saved_c, saved_r, reverse, checkpoint_every, tbptt_chunk,
                         grad_clip, grad_clip_mode, record_norms, input_grad, backend):
    T = x.shape[0]
    return (
        torch.empty_like(x) if input_grad else x.new_empty((0,)),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        torch.empty_like(bias) if bias is not None else x.new_empty((0,)),
        torch.empty_like(w_hr) if w_hr is not None else x.new_empty((0,)),
        torch.empty_like(h0),
        torch.empty_like(c0),
        x.new_empty((2, T) if record_norms else (0,), dtype=_acc_dtype(x.dtype)),
    )


def _setup_context(ctx, inputs, output):
    (x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, norm_probe, reverse, checkpoint_every,
     tbptt_chunk, grad_clip, grad_clip_mode, backend) = inputs
    y, _, _, saved_gates, saved_c, saved_r = output
    ctx.save_for_backward(x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, y, saved_gates, saved_c, saved_r)
    ctx.options = (reverse, checkpoint_every, tbptt_chunk, grad_clip, grad_clip_mode)
    ctx.backend = backend
    ctx.record_norms = norm_probe is not None
    ctx.mark_non_differentiable(saved_gates, saved_c, saved_r)


def _backward(ctx, grad_y, grad_h_n, grad_c_n, *_unused):
    if torch.is_grad_enabled():
        # create_graph=True: the kernels' gradient would have no derivative.
        return _composite_backward(ctx, grad_y, grad_h_n, grad_c_n)
    x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, y, saved_gates, saved_c, saved_r = ctx.saved_tensors
    reverse, checkpoint_every, tbptt_chunk, grad_clip, grad_clip_mode = ctx.options
    dx, dw_ih, dw_hh, dbias, dw_hr, dh0, dc0, norms = _layer_backward(
        grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, y, saved_gates,
        saved_c, saved_r, reverse, checkpoint_every, tbptt_chunk, grad_clip, grad_clip_mode,
        ctx.record_norms, ctx.needs_input_grad[0], ctx.backend)
    return (dx if ctx.needs_input_grad[0] else None, dw_ih, dw_hh, dbias if bias is not None else None,
            dw_hr if w_hr is not None else None, dh0, dc0, None, None, norms if ctx.record_norms else None,
            None, None, None, None, None, None)


def _composite_backward(ctx, grad_y, grad_h_n, grad_c_n):
    """The backward as a differentiable function of the layer's inputs and of the incoming gradients.

    fastlstm.composite runs the kernels' backward recurrence (truncation, clipping, padding,
    projection) with ATen ops. Same first-order values as the kernels up to rounding; the norms
    (when recorded) are those of this first-order gradient and carry no graph.
    """
    x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset = ctx.saved_tensors[:9]
    reverse, _, tbptt_chunk, grad_clip, grad_clip_mode = ctx.options
    acc = _acc_dtype(x.dtype)
    inputs = (x, w_ih, w_hh, bias, w_hr, h0, c0)
    grads = composite.layer_gradients(
        *(g if g is None else g.to(acc) for g in (grad_y, grad_h_n, grad_c_n)),
        *(t if t is None else t.to(acc) for t in inputs), lengths, reset, reverse=reverse, tbptt_chunk=tbptt_chunk,
        clip_recurrent=grad_clip if grad_clip_mode == "recurrent" else 0.0,
        clip_gates=grad_clip if grad_clip_mode == "gates" else 0.0)
    result = [g.to(t.dtype) if need else None for g, t, need in zip(grads[:7], inputs, ctx.needs_input_grad)]
    return (*result, None, None, grads.norms if ctx.record_norms else None, None, None, None, None, None, None)


torch.library.register_autograd("fastlstm::layer_forward", _backward, setup_context=_setup_context)


@dataclass(frozen=True)
class LayerOptions:
    """Kernel options of one layer call (validated by the modules)."""

    backend: str = "auto"
    checkpoint_every: int = 0
    tbptt_chunk: int = 0
    grad_clip: float = 0.0
    grad_clip_mode: str = "recurrent"


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None, w_hr: Tensor | None,
               h0: Tensor, c0: Tensor, lengths: Tensor | None = None, reset: Tensor | None = None, *,
               reverse: bool = False, options: LayerOptions = LayerOptions(), norm_probe: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction over a time-major sequence.

    Shapes: x (T, B, I); w_ih (4H, I); w_hh (4H, K); bias (4H,) = b_ih + b_hh; w_hr (K, H) or
    None (then K = H); h0 (B, K); c0 (B, H); lengths (B,) int64 on x's device, or None.
    Returns y (T, B, K), h_n (B, K), c_n (B, H). With ``lengths``, row b is padding from time
    ``lengths[b]`` on: its output is zero and its state passes through unchanged; the reverse
    direction starts each row at its own last element. Every length must lie in [1, T]: checked
    on the CPU, not on CUDA (the check would synchronise with the host on every call), where
    lengths outside that range give meaningless results. ``reset`` (T, B) bool, or None: where
    ``reset[t, b]`` a new segment of row b starts at time t, whose state starts from zeros (the
    forward direction's state entering t, the reverse direction's entering t - 1; no gradient
    crosses it; ``reset[0]`` and resets on padding change nothing). ``norm_probe`` (2, T), when given,
    receives the per-step gradient norms of h and c as its gradient. A backward with
    ``create_graph=True`` computes the gradient with fastlstm.composite, so it is differentiable
    (second order: see that module).
    """
    checkpoint_every = options.checkpoint_every
    if not _needs_grad(x, w_ih, w_hh, bias, w_hr, h0, c0, norm_probe):
        # Nothing will run a backward: the kernels save nothing and work in chunk-sized buffers
        # (same results, memory independent of T).
        checkpoint_every = NO_BACKWARD
    y, h_n, c_n, _, _, _ = _layer_forward(
        x, w_ih, w_hh, bias, w_hr, h0, c0, lengths, reset, norm_probe, reverse, checkpoint_every,
        options.tbptt_chunk, options.grad_clip, options.grad_clip_mode, options.backend)
    return y, h_n, c_n


# checkpoint_every value telling the kernels that no backward will run (csrc/fastlstm/layer_driver.h).
NO_BACKWARD = -1


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
