"""A differentiable ATen recomputation of one layer, for backwards that must themselves be differentiated.

The fused kernels compute the first-order gradient directly and have no derivative of their own.
When a backward runs with ``create_graph=True`` (Hessian-vector products, gradient penalties,
MAML), :mod:`fastlstm.ops` instead recomputes the layer here with plain ATen ops and lets autograd
differentiate it, so the gradient it returns carries a graph. Two identity functions in the
recurrence give autograd's gradient the kernels' exact first-order semantics:

* :class:`_ReceiveCarry` on the state (r_{s-1}, c_{s-1}) entering step s: its backward cuts
  (tbptt) or clamps (recurrent clipping) the gradient step s sends back, per row, as
  ``cell_math.h``'s ``receive_carry`` does;
* :class:`_ClipGateGrad` on the gate pre-activations G_s (gate clipping): its backward clamps dG_s.

Both backwards are written with differentiable ops, so the second order of the clipped or truncated
gradient is the derivative of exactly that function: a cut carry is the constant 0 (derivative 0);
a clamped element g -> clamp(g, -c, c) has derivative 1 where -c <= g <= c (torch.clamp's
convention at the bounds) and 0 where it was clipped. The clipping decision is not itself
differentiated (it is piecewise constant).

Speed is not the goal (a Python loop over time steps); the recurrence matches the kernels: gate
order i, f, g, o, padding rows pass their state through unchanged and output zeros, the reverse
direction starts each row at its own last element.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class _ReceiveCarry(torch.autograd.Function):
    """Identity; the backward applies the carry rule of the step that reads this state.

    cut, clamp: (B, 1) bool, per row: the gradient is zeroed (cut), clamped to [-clip, clip]
    (clamp), or passed unchanged (neither).
    """

    @staticmethod
    def forward(ctx, state: Tensor, cut: Tensor, clamp: Tensor, clip: float) -> Tensor:
        ctx.save_for_backward(cut, clamp)
        ctx.clip = clip
        return state.view_as(state)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cut, clamp = ctx.saved_tensors
        if ctx.clip > 0:
            grad = torch.where(clamp, grad.clamp(-ctx.clip, ctx.clip), grad)
        return torch.where(cut, torch.zeros_like(grad), grad), None, None, None


class _ClipGateGrad(torch.autograd.Function):
    """Identity; the backward clamps the gate pre-activation gradient dG to [-clip, clip]."""

    @staticmethod
    def forward(ctx, gates: Tensor, clip: float) -> Tensor:
        ctx.clip = clip
        return gates.view_as(gates)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.clamp(-ctx.clip, ctx.clip), None


class LayerTrace(NamedTuple):
    """The outputs of :func:`lstm_layer` and the per-step cell values the gradient norms are taken at.

    y (T, B, K), h_n (B, K), c_n (B, H); h_cells, c_cells: T tensors (B, H) indexed by time, the cell's
    h_t (before the projection) and c_t.
    """

    y: Tensor
    h_n: Tensor
    c_n: Tensor
    h_cells: list[Tensor]
    c_cells: list[Tensor]


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None, w_hr: Tensor | None, h0: Tensor,
               c0: Tensor, lengths: Tensor | None, *, reverse: bool, tbptt_chunk: int, clip_recurrent: float,
               clip_gates: float) -> LayerTrace:
    """One layer and direction, as ``fastlstm.ops.lstm_layer`` (same shapes and semantics).

    tbptt_chunk, clip_recurrent, clip_gates: 0 disables (the kernels' ``BackwardOptions``). The
    forward values do not depend on them; autograd's gradient of the result equals the kernels'.
    """
    T, B = x.shape[0], x.shape[1]
    pre_x = x @ w_ih.t()
    if bias is not None:
        pre_x = pre_x + bias
    times = range(T - 1, -1, -1) if reverse else range(T)
    n = lengths.view(B, 1) if lengths is not None else torch.full((B, 1), T, dtype=torch.int64, device=x.device)
    r, c = h0, c0
    y: list[Tensor | None] = [None] * T
    h_cells: list[Tensor | None] = [None] * T
    c_cells: list[Tensor | None] = [None] * T
    for p, t in enumerate(times):
        live = t < n
        cut, clamp = _carry_rule(p, t, reverse, n, tbptt_chunk, clip_recurrent)
        r = _ReceiveCarry.apply(r, cut, clamp, clip_recurrent)
        c = _ReceiveCarry.apply(c, cut, clamp, clip_recurrent)
        gates = pre_x[t] + r @ w_hh.t()
        if clip_gates > 0:
            gates = _ClipGateGrad.apply(gates, clip_gates)
        i, f, g, o = gates.chunk(4, dim=1)
        c_cell = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_cell = torch.sigmoid(o) * torch.tanh(c_cell)
        out = h_cell @ w_hr.t() if w_hr is not None else h_cell
        y[t] = torch.where(live, out, torch.zeros_like(out))
        r = torch.where(live, out, r)
        c = torch.where(live, c_cell, c)
        h_cells[t], c_cells[t] = h_cell, c_cell
    return LayerTrace(torch.stack(y), r, c, h_cells, c_cells)


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
