"""The backward of one layer written out with ATen ops, for backwards that must themselves be differentiated.

The fused kernels compute the first-order gradient directly and have no derivative of their own.
When a backward runs with ``create_graph=True`` (Hessian-vector products, gradient penalties,
MAML), :mod:`fastlstm.ops` calls :func:`layer_gradients` instead: it recomputes the layer's
forward and then runs the same backward recurrence as the kernels (``cell_math.h``: the carry
rules of truncation and recurrent clipping, the clamp of gate clipping, padding, projections),
step by step with differentiable ATen ops. The gradient it returns is therefore an explicit
function of the layer's inputs, parameters and incoming gradients, and autograd differentiates it
exactly (almost everywhere):

* a carry cut by ``tbptt_chunk`` is the constant 0 (derivative 0); the forward states are not
  detached, so the derivative of the truncated gradient still follows how each state depends on
  the earlier steps and the parameters (unlike the double backward of a model run in chunks with
  ``.detach()`` between them, which treats the detached state as a constant);
* a clamped element u -> clamp(u, -c, c) (recurrent carries, or gate gradients dG) has derivative
  1 where -c <= u <= c (torch.clamp's convention at the bounds) and 0 where it was clipped; which
  elements are clipped is piecewise constant and not differentiated;
* a per-sample reset multiplies the state by 0, so nothing crosses it, in any order.

Speed is not the goal: a Python loop over the time steps, every step's values kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LayerGradients(NamedTuple):
    """dx (T, B, I), dw_ih, dw_hh, dbias (or None), dw_hr (or None), dh0 (B, K), dc0 (B, H), and
    norms (2, T): per time the L2 norm over batch and units of the total gradient reaching the
    cell's h_t and c_t (row 0: h, row 1: c)."""

    dx: Tensor
    dw_ih: Tensor
    dw_hh: Tensor
    dbias: Tensor | None
    dw_hr: Tensor | None
    dh0: Tensor
    dc0: Tensor
    norms: Tensor


class _Step(NamedTuple):
    """What the forward of one step keeps for the backward; ``live`` marks the rows holding a real element."""

    t: int
    live: Tensor  # (B, 1) bool
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor       # c_t of the cell
    c_prev: Tensor  # the states the step read (zero after a reset)
    r_prev: Tensor
    h: Tensor       # the cell's h_t, before the projection


def layer_gradients(grad_y: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None, x: Tensor,
                    w_ih: Tensor, w_hh: Tensor, bias: Tensor | None, w_hr: Tensor | None, h0: Tensor, c0: Tensor,
                    lengths: Tensor | None, reset: Tensor | None, *, reverse: bool, tbptt_chunk: int,
                    clip_recurrent: float, clip_gates: float) -> LayerGradients:
    """The gradient ``fastlstm::layer_backward`` computes, as a differentiable function of every argument.

    Shapes as ``fastlstm.ops.lstm_layer``; grad_y (T, B, K), grad_h_n (B, K), grad_c_n (B, H), None
    for zero; reset (T, B) bool or None. tbptt_chunk, clip_recurrent, clip_gates: 0 disables.
    """
    T, B = x.shape[0], x.shape[1]
    n = lengths.view(B, 1) if lengths is not None else torch.full((B, 1), T, dtype=torch.int64, device=x.device)
    zeroed = _zeroed_before(reset, n, reverse)
    steps = _forward(x, w_ih, w_hh, bias, w_hr, h0, c0, n, zeroed, reverse)
    carry_h = grad_h_n if grad_h_n is not None else h0.new_zeros(h0.shape)
    carry_c = grad_c_n if grad_c_n is not None else c0.new_zeros(c0.shape)
    dgates: list[Tensor | None] = [None] * T
    squares: list[list[Tensor | None]] = [[None] * T, [None] * T]  # (h, c) per time
    dw_hr = None
    for p in range(T - 1, -1, -1):
        st = steps[p]
        dr = carry_h + grad_y[st.t] if grad_y is not None else carry_h
        dr = torch.where(st.live, dr, torch.zeros_like(dr))
        if w_hr is not None:
            part = dr.t() @ st.h
            dw_hr = part if dw_hr is None else dw_hr + part
            dh = dr @ w_hr
        else:
            dh = dr
        tc = torch.tanh(st.c)
        dc = carry_c + dh * st.o * (1 - tc * tc)
        dg = torch.cat([dc * st.g * st.i * (1 - st.i), dc * st.c_prev * st.f * (1 - st.f), dc * st.i * (1 - st.g * st.g),
                        dh * tc * st.o * (1 - st.o)], dim=1)
        if clip_gates > 0:
            dg = dg.clamp(-clip_gates, clip_gates)
        dg = torch.where(st.live, dg, torch.zeros_like(dg))
        dgates[st.t] = dg
        dc_live = torch.where(st.live, dc, torch.zeros_like(dc))
        squares[0][st.t], squares[1][st.t] = dh.detach().square().sum(), dc_live.detach().square().sum()
        # The carries sent back through the state read by position p; padded rows pass theirs through.
        carry_h = torch.where(st.live, dg @ w_hh, carry_h)
        carry_c = torch.where(st.live, dc * st.f, carry_c)
        cut, clamp = _carry_rule(p, st.t, reverse, n, tbptt_chunk, clip_recurrent)
        if zeroed is not None:  # the state this step read was zeroed by a reset: nothing flows back
            cut = cut | zeroed[st.t]
        carry_h, carry_c = (_receive(carry, cut, clamp, clip_recurrent) for carry in (carry_h, carry_c))
    dG = torch.stack(dgates)  # (T, B, 4H), indexed by time
    r_prev = torch.stack([steps[p].r_prev for p in _positions_by_time(T, reverse)])
    dx = dG @ w_ih
    dw_ih = dG.flatten(0, 1).t() @ x.flatten(0, 1)
    dw_hh = dG.flatten(0, 1).t() @ r_prev.flatten(0, 1)
    dbias = dG.sum((0, 1)) if bias is not None else None
    norms = torch.stack([torch.stack(row) for row in squares]).sqrt()
    return LayerGradients(dx, dw_ih, dw_hh, dbias, dw_hr, carry_h, carry_c, norms)


def _zeroed_before(reset: Tensor | None, n: Tensor, reverse: bool) -> Tensor | None:
    """(T, B, 1) bool: whether the state entering time t of row b is zero (cell_math.h's resets)."""
    if reset is None:
        return None
    T = reset.shape[0]
    # The reset at time a cuts the state entering a (forward) or a - 1 (reverse), for 0 < a < n.
    times = torch.arange(T, device=reset.device).view(T, 1, 1)
    cut = reset.view(T, -1, 1) & (times > 0) & (times < n)
    if reverse:
        cut = torch.cat([cut[1:], torch.zeros_like(cut[:1])])
    return cut


def _forward(x, w_ih, w_hh, bias, w_hr, h0, c0, n, zeroed, reverse) -> list[_Step]:
    """The layer's forward, one _Step per processing position (gate order i, f, g, o as torch)."""
    T = x.shape[0]
    pre_x = x @ w_ih.t()
    if bias is not None:
        pre_x = pre_x + bias
    r, c = h0, c0
    steps = []
    for p in range(T):
        t = T - 1 - p if reverse else p
        live = t < n
        if zeroed is not None:
            r, c = (torch.where(zeroed[t], torch.zeros_like(s), s) for s in (r, c))
        gi, gf, gg, go = (pre_x[t] + r @ w_hh.t()).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg), torch.sigmoid(go)
        c_cell = f * c + i * g
        h = o * torch.tanh(c_cell)
        out = h @ w_hr.t() if w_hr is not None else h
        steps.append(_Step(t, live, i, f, g, o, c_cell, c, r, h))
        r = torch.where(live, out, r)
        c = torch.where(live, c_cell, c)
    return steps


def _positions_by_time(T: int, reverse: bool) -> range:
    """The processing position of each time 0 .. T-1."""
    return range(T - 1, -1, -1) if reverse else range(T)


def _receive(carry: Tensor, cut: Tensor, clamp: Tensor, clip: float) -> Tensor:
    if clip > 0:
        carry = torch.where(clamp, carry.clamp(-clip, clip), carry)
    return torch.where(cut, torch.zeros_like(carry), carry)


def _carry_rule(p: int, t: int, reverse: bool, n: Tensor, tbptt_chunk: int, clip: float) -> tuple[Tensor, Tensor]:
    """Per row (B, 1): whether the gradient the step at processing position p sends back through
    the state it reads is cut, and whether it is clamped.

    Position 0 reads (h_0, c_0): clamped, never cut. Otherwise the previous position's time t' is
    step s' of its row; when t' and t are both real elements the step s' + 1 sends back to s' is
    cut when s' + 1 is a multiple of k, else clamped; across padding it passes unchanged (the
    carry of the row's last element is dL/dh_n, dL/dc_n, and the carry to (h_0, c_0) is clamped at
    position 0).
    """
    if p == 0:
        return torch.zeros_like(n, dtype=torch.bool), torch.full_like(n, clip > 0, dtype=torch.bool)
    t_prev = t + 1 if reverse else t - 1
    real = (t < n) & (t_prev < n)
    cut = torch.zeros_like(real)
    if tbptt_chunk > 0:
        step_prev = n - 1 - t_prev if reverse else torch.full_like(n, t_prev)
        cut = real & ((step_prev + 1) % tbptt_chunk == 0)
    return cut, (real & ~cut) if clip > 0 else torch.zeros_like(real)
