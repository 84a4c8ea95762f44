"""Streaming truncated BPTT: train a recurrent model on a sequence too long for one call.

The in-kernel option ``fastlstm.LSTM(tbptt_chunk=k)`` cuts the *gradient* every k steps, but one
call still holds the activations of the whole sequence. This module trains chunk by chunk instead:
forward and backward over at most ``k2`` steps at a time, an optimizer step after every ``k1`` new
steps, the recurrent state carried (detached) from one update to the next. Peak memory depends on
``k2`` (and the batch and model sizes), not on the sequence length T: a million-step sequence
trains in the memory of a few hundred steps (see benchmarks/tbptt_memory.py).

Quick start::

    import fastlstm, fastlstm.tbptt

    lstm = fastlstm.LSTM(4, 64, batch_first=True)
    head = torch.nn.Linear(64, 1)
    class Model(torch.nn.Module):                      # any model(x, state) -> (out, state)
        def __init__(self): super().__init__(); self.lstm, self.head = lstm, head
        def forward(self, x, state=None):
            y, state = self.lstm(x, state)
            return self.head(y), state

    model = Model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    result = fastlstm.tbptt.run(model, x, y, torch.nn.functional.mse_loss, opt, k1=256, k2=512)
    result.losses, result.state                        # per-update losses, final (h, c)

API choices (and why)
---------------------
* **A function, not a trainer class.** Users already own their model, optimizer, loss and
  schedule; :func:`run` borrows them for one pass over one long sequence and returns what happened
  (:class:`TBPTTResult`). Call it again for the next epoch or the next sequence, passing
  ``state=result.state`` to continue a stream.
* **The model protocol is ``model(x_chunk, state) -> (out, state)``**, the calling convention of
  ``torch.nn.LSTM`` / ``nn.GRU`` / ``fastlstm.LSTM`` themselves: those plug in as they are (the
  state is then ``(h, c)``), and a model with a head only needs a ``forward(x, state=None)`` that
  passes the state through. The first call gets ``state`` (default None: the model's own zeros).
  A state may be any nest of tensors (tuples, lists, dicts); it is detached between updates.
* **TBPTT(k1, k2) of Williams & Peng (1990), computed window by window** (below). The model
  runs on whole windows, so fused kernels see long calls, never a per-step Python loop; the price
  of k2 > k1 is recomputing the k2 - k1 overlapping steps (k2 / k1 forward passes per step).
  ``k2`` defaults to ``k1``: plain chunking, each step computed once.
* **Time is dimension 0, or 1 with ``batch_first``** (for x, y and the model's output); by default
  ``batch_first`` is the model's own ``batch_first`` attribute if it has one, else False.
* **Sequences that do not fit in memory**: :func:`run_stream` takes an iterable of
  ``(x_piece, y_piece)`` pieces of any lengths (read from disk, generated on the fly...) and keeps
  only the steps the current window needs. :func:`run` is ``run_stream`` over one piece.
* **Per-sample resets** (streams of concatenated episodes): ``run(..., reset=r)``, or pieces
  ``(x_piece, y_piece, reset_piece)``; ``r`` is a bool tensor with x's time and batch dimensions,
  (T, B) or (B, T) with ``batch_first``. The model is then called as
  ``model(x_window, state, reset=r_window)`` (``fastlstm.LSTM`` accepts it). ``r[t, b]`` zeroes
  row b's state entering step t, exactly as one ``fastlstm.LSTM`` call over the whole sequence
  with ``reset=r`` (step 0 keeps the given ``state``, as the module keeps ``hx``): inside a window
  the kernels do it; at a window's first step :func:`run_stream` zeroes those rows of the carried
  state, whose tensors must then hold the batch in dimension -2 (the (layers, B, H) layout of
  nn.LSTM's state). No gradient crosses a reset.
* **Progress**: a tqdm bar (``progress=None`` shows it on runs of 100 updates or more; tqdm is
  optional: without it the run continues silently, with a warning if ``progress=True`` asked).

Exact semantics
---------------
Time steps are 0 .. T-1; ``1 <= k1 <= k2``. Update u = 0, 1, ... (while u * k1 < T):

* new steps ``[u*k1, e_u)`` with ``e_u = min((u+1)*k1, T)``: the only outputs that enter the loss,
  ``loss_u = loss_fn(out[new steps], y[new steps])``;
* window ``[s_u, e_u)`` with ``s_u = max(0, (u+1)*k1 - k2)``: the model runs over the window
  starting from ``state_u``, the state at step ``s_u`` computed during update u-1 (detached; the
  ``state`` argument for u = 0). The gradient of ``loss_u`` flows back through the whole window
  (the newest step sees k2 steps of backprop, the oldest new step k2 - k1 + 1) and stops at
  ``state_u``;
* then ``optimizer.zero_grad()`` (before the backward), ``loss_u.backward()``, optional
  ``clip_grad_norm_(max_grad_norm)``, ``optimizer.step()``;
* ``state_{u+1}``, the state at ``s_{u+1} = max(0, (u+2)*k1 - k2)`` (which lies inside window u),
  is taken from the same forward pass: the window is run as two calls, ``[s_u, s_{u+1})`` and
  ``[s_{u+1}, e_u)``, so it was computed with the parameters *before* update u's optimizer step.

With ``k2 == k1`` this is plain chunking: windows ``[u*k1, (u+1)*k1)``, one model call each, state
carried from the end of one chunk to the start of the next. The final state returned is the state
after step T-1 from the last update's forward pass (before its optimizer step). With a zero
learning rate it equals the final state of one no-grad pass over the whole sequence.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["run", "run_stream", "chunks", "windows", "detach_state", "TBPTTResult", "Window"]

State = Any
"""A model's recurrent state: ``(h, c)`` for an LSTM, or any nest (tuple/list/dict) of tensors, or None."""

LossFn = Callable[[Tensor, Tensor], Tensor]
Model = Callable[[Tensor, State], "tuple[Tensor, State]"]

# Updates from which progress=None shows a bar.
_AUTO_PROGRESS_UPDATES = 100
# Loss tensors on an accelerator are turned into floats in batches (one device sync per batch, not
# per update); on the CPU at once.
_LOSS_FLUSH = 64


@dataclass
class TBPTTResult:
    """What one :func:`run` / :func:`run_stream` did.

    losses: ``loss_fn``'s value for each update, as floats (one per update).
    steps: the number of new time steps of each update (k1, the last one possibly fewer).
    state: the final state (after step T-1), detached; pass it as ``state=`` to continue.
    elapsed: wall-clock seconds of the run.
    """

    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    state: State = None
    elapsed: float = 0.0

    @property
    def updates(self) -> int:
        """The number of optimizer steps taken."""
        return len(self.losses)

    @property
    def total_steps(self) -> int:
        """The number of time steps trained on (T)."""
        return sum(self.steps)

    @property
    def mean_loss(self) -> float:
        """The mean of the losses weighted by their number of new steps (nan for an empty run)."""
        total = self.total_steps
        return sum(l * n for l, n in zip(self.losses, self.steps)) / total if total else math.nan


class Window(NamedTuple):
    """One update of TBPTT(k1, k2), in time steps (see the module docstring).

    The model runs over ``[start, end)`` from the state at ``start``, in two calls split at
    ``split`` (the start of the next window, whose state is carried); the loss covers
    ``[new_start, end)``.
    """

    start: int
    split: int
    new_start: int
    end: int


def _check_k(k1: object, k2: object) -> tuple[int, int]:
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be a positive int (a number of time steps), got {value}")
    if k2 < k1:
        raise ValueError(f"k2 ({k2}) must be >= k1 ({k1}): every update backpropagates at least through its own "
                         f"k1 new steps (k2 = k1 is plain chunking)")
    return int(k1), int(k2)


def _window(u: int, k1: int, k2: int, T: int) -> Window:
    new_start, full_end = u * k1, (u + 1) * k1
    end = min(full_end, T)
    start = max(0, full_end - k2)
    split = min(max(0, full_end + k1 - k2), end)
    return Window(start, split, new_start, end)


def windows(T: int, k1: int, k2: int | None = None) -> list[Window]:
    """The updates TBPTT(k1, k2) makes over a sequence of T steps, in order."""
    k1, k2 = _check_k(k1, k1 if k2 is None else k2)
    return [_window(u, k1, k2, T) for u in range(math.ceil(T / k1))]


def detach_state(state: State) -> State:
    """``state`` with every tensor detached, same structure (tuples, lists, dicts, None)."""
    if isinstance(state, Tensor):
        return state.detach()
    if state is None:
        return None
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # namedtuple
        return type(state)(*(detach_state(s) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {key: detach_state(value) for key, value in state.items()}
    return state


def chunks(x: Tensor, y: Tensor | None, k: int, *, batch_first: bool = False
           ) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Consecutive views of ``k`` time steps of ``x`` and ``y`` (the last one may be shorter).

    x: (T, ...) or (B, T, ...) with ``batch_first``; y likewise with the same T, or None.
    Yields (x[t:t+k], y[t:t+k]) along the time dimension, without copying. For a hand-written
    TBPTT loop, or as the ``stream`` of :func:`run_stream`.
    """
    _check_k(k, k)
    dim = 1 if batch_first else 0
    T = x.shape[dim]
    if y is not None and y.shape[dim] != T:
        raise ValueError(f"x and y must have the same number of time steps (dimension {dim}), got {T} and "
                         f"{y.shape[dim]}")
    for t in range(0, T, k):
        n = min(k, T - t)
        yield x.narrow(dim, t, n), (y.narrow(dim, t, n) if y is not None else None)


class _TimeBuffer:
    """The pieces of a stream that the current window still needs, addressed by absolute step."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.pieces: deque[Tensor] = deque()
        self.start = 0  # absolute step of the first buffered step
        self.end = 0  # one past the last buffered step

    def append(self, piece: Tensor) -> None:
        n = piece.shape[self.dim]
        if n:
            self.pieces.append(piece)
            self.end += n

    def window(self, a: int, b: int) -> Tensor:
        """Steps [a, b) (a view when they lie in one piece)."""
        parts, offset = [], self.start
        for piece in self.pieces:
            n = piece.shape[self.dim]
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                parts.append(piece.narrow(self.dim, lo - offset, hi - lo))
            offset += n
            if offset >= b:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)

    def drop_before(self, a: int) -> None:
        while self.pieces and self.start + self.pieces[0].shape[self.dim] <= a:
            self.start += self.pieces.popleft().shape[self.dim]
        if self.pieces and self.start < a:
            first = self.pieces[0]
            self.pieces[0] = first.narrow(self.dim, a - self.start, first.shape[self.dim] - (a - self.start))
            self.start = a


def _progress_bar(show: bool | None, total: int | None, k1: int) -> Any:
    updates = math.ceil(total / k1) if total is not None else None
    if show is None:
        show = updates is not None and updates >= _AUTO_PROGRESS_UPDATES
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("fastlstm.tbptt: progress=True needs tqdm (pip install tqdm); continuing without a "
                      "progress bar", stacklevel=3)
        return None
    return tqdm(total=total, unit="step", unit_scale=True, desc="tbptt", dynamic_ncols=True)


def _resolve_batch_first(model: Any, batch_first: bool | None) -> bool:
    own = getattr(model, "batch_first", None)
    if batch_first is None:
        return bool(own)
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool or None, got {type(batch_first).__name__}")
    if isinstance(own, bool) and own != batch_first:
        raise ValueError(f"batch_first={batch_first} but the model has batch_first={own}: the time dimension of "
                         "x, y and the output must be the model's (leave batch_first=None to use the model's)")
    return batch_first


def run(model: Model, x: Tensor, y: Tensor, loss_fn: LossFn, optimizer: torch.optim.Optimizer, *, k1: int,
        k2: int | None = None, batch_first: bool | None = None, state: State = None,
        progress: bool | None = None, max_grad_norm: float | None = None,
        on_update: Callable[[int, Tensor], None] | None = None, reset: Tensor | None = None) -> TBPTTResult:
    """Trains ``model`` on one long sequence with TBPTT(k1, k2) (exact semantics: module docstring).

    Args:
        model: called as ``model(x_window, state) -> (out, state)``: a ``torch.nn.LSTM``,
            ``fastlstm.LSTM`` (state ``(h, c)``), or any module with that signature.
        x: (T, B, ...) inputs, or (B, T, ...) with ``batch_first``.
        y: targets with the same time dimension, (T, B, ...) or (B, T, ...); only the slice of
            the new steps of an update is passed to ``loss_fn``.
        loss_fn: ``loss_fn(out_new, y_new) -> scalar tensor``, where ``out_new`` is the model's
            output on the update's new steps (time dimension as x) and ``y_new`` the matching
            targets.
        optimizer: stepped once per update, over whatever parameters it holds.
        k1: new time steps per update (the last update may have fewer).
        k2: time steps of backpropagation per update, ``k2 >= k1`` (default ``k1``).
        batch_first: whether time is dimension 1 of x, y and the output; None takes the
            model's ``batch_first`` attribute if it has one, else False.
        state: the state before step 0 (detached first); None lets the model start from zeros.
        progress: a tqdm progress bar: True, False, or None (shown for 100+ updates).
        max_grad_norm: if given, ``torch.nn.utils.clip_grad_norm_`` of the optimizer's
            parameters to this value before each step.
        on_update: called after each optimizer step as ``on_update(u, loss)`` (loss detached).
        reset: per-sample state resets, bool (T, B), or (B, T) with ``batch_first``, or None
            (module docstring, "Per-sample resets").

    Returns:
        A :class:`TBPTTResult`: per-update losses and step counts, the final detached state.

    Peak memory: one window of activations (O(k2) steps), plus x and y themselves.
    """
    dim = 1 if _resolve_batch_first(model, batch_first) else 0
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be tensors; for a sequence given in pieces use fastlstm.tbptt.run_stream")
    if x.dim() <= dim or y.dim() <= dim:
        raise ValueError(f"x and y need a time dimension {dim}; got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[dim] != y.shape[dim]:
        raise ValueError(f"x and y must have the same number of time steps (dimension {dim}), got {x.shape[dim]} "
                         f"and {y.shape[dim]}")
    if reset is not None:
        if not isinstance(reset, Tensor):
            raise TypeError(f"reset must be a bool tensor or None, got {type(reset).__name__}")
        if reset.dim() != 2 or reset.shape[dim] != x.shape[dim]:
            raise ValueError(f"reset must be a bool tensor of shape {'(B, T)' if dim else '(T, B)'} with T = "
                             f"{x.shape[dim]} time steps, got shape {tuple(reset.shape)}")
    pieces = [(x, y)] if reset is None else [(x, y, reset)]
    return run_stream(model, pieces, loss_fn, optimizer, k1=k1, k2=k2, batch_first=dim == 1, state=state,
                      progress=progress, total_steps=x.shape[dim], max_grad_norm=max_grad_norm,
                      on_update=on_update)


def run_stream(model: Model, stream: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, *, k1: int, k2: int | None = None,
               batch_first: bool | None = None, state: State = None, progress: bool | None = None,
               total_steps: int | None = None, max_grad_norm: float | None = None,
               on_update: Callable[[int, Tensor], None] | None = None) -> TBPTTResult:
    """:func:`run` over a sequence that arrives in pieces: ``stream`` yields ``(x_piece, y_piece)``,
    or ``(x_piece, y_piece, reset_piece)`` triples for a stream with per-sample resets (every piece
    then a triple; module docstring, "Per-sample resets").

    Pieces may have any number of time steps (each x_piece and its y_piece the same number);
    they are concatenated in time. Only the pieces that overlap the current window are kept (a
    window that spans two pieces is copied into one tensor), so neither the whole sequence nor its
    length need to be known in advance: memory is O(k2 + piece length). ``total_steps``, when known, sizes the
    progress bar. Other arguments as in :func:`run`.
    """
    k1, k2 = _check_k(k1, k1 if k2 is None else k2)
    dim = 1 if _resolve_batch_first(model, batch_first) else 0
    if max_grad_norm is not None and not (isinstance(max_grad_norm, numbers.Real) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be None or a number > 0, got {max_grad_norm!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]

    xs, ys, rs = _TimeBuffer(dim), _TimeBuffer(dim), _TimeBuffer(dim)
    with_reset: bool | None = None  # fixed by the first piece
    pieces = iter(stream)
    exhausted = False
    result = TBPTTResult(state=detach_state(state))
    carried = result.state
    pending: list[Tensor] = []
    bar = _progress_bar(progress, total_steps, k1)
    started = time.perf_counter()
    try:
        u = 0
        while True:
            new_start, full_end = u * k1, (u + 1) * k1
            while xs.end < full_end and not exhausted:
                try:
                    piece = next(pieces)
                except StopIteration:
                    exhausted = True
                    break
                x_piece, y_piece, r_piece = _check_piece(piece, dim, xs.end)
                if with_reset is None:
                    with_reset = r_piece is not None
                elif with_reset != (r_piece is not None):
                    raise ValueError(f"the piece at step {xs.end} is a {'pair' if with_reset else 'triple'}: "
                                     "either every piece carries a reset or none does")
                xs.append(x_piece)
                ys.append(y_piece)
                if r_piece is not None:
                    rs.append(r_piece)
            if xs.end <= new_start:
                break
            w = _window(u, k1, k2, xs.end)

            optimizer.zero_grad(set_to_none=True)
            outs = []
            mid = carried
            if w.split > w.start:
                out, mid = _call(model, xs, rs if with_reset else None, w.start, w.split, carried, dim)
                outs.append(_check_output(out, dim, w.split - w.start))
            final = mid
            if w.end > w.split:
                out, final = _call(model, xs, rs if with_reset else None, w.split, w.end, mid, dim)
                outs.append(_check_output(out, dim, w.end - w.split))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim)
            out_new = out.narrow(dim, w.new_start - w.start, w.end - w.new_start)
            loss = loss_fn(out_new, ys.window(w.new_start, w.end))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()

            loss = loss.detach()
            if loss.device.type == "cpu":
                result.losses.append(loss.item())
            else:
                # A copy: a reduction's output may be a view of its O(k) input buffer (mse_loss's is),
                # which would keep that buffer alive for every pending update.
                pending.append(loss.reshape(()).clone())
                if len(pending) >= _LOSS_FLUSH:
                    result.losses.extend(torch.stack(pending).tolist())
                    pending.clear()
            result.steps.append(w.end - w.new_start)
            carried, result.state = detach_state(mid), detach_state(final)
            del out, out_new, outs, mid, final
            if on_update is not None:
                on_update(u, loss)
            if bar is not None:
                bar.update(w.end - w.new_start)
                if u % 64 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            u += 1
            if w.end < full_end:  # a short last update: the stream is over
                break
            for buffer in (xs, ys, rs):
                buffer.drop_before(w.split)
    finally:
        if bar is not None:
            bar.close()
    if pending:
        result.losses.extend(torch.stack(pending).tolist())
    result.elapsed = time.perf_counter() - started
    return result


def _call(model: Model, xs: _TimeBuffer, rs: _TimeBuffer | None, a: int, b: int, state: State, dim: int
          ) -> tuple[Any, State]:
    """The model over steps [a, b) from ``state``, with the resets of those steps when the stream has them."""
    if rs is None:
        return model(xs.window(a, b), state)
    reset = rs.window(a, b)
    if a > 0 and state is not None:  # the kernels leave a call's first step alone: the reset at a is ours
        state = _zero_rows(state, reset.select(dim, 0))
    return model(xs.window(a, b), state, reset=reset)


def _zero_rows(state: State, rows: Tensor) -> State:
    """``state`` with the batch rows where ``rows`` (B,) is True set to zero (batch in dimension -2)."""
    if isinstance(state, Tensor):
        if state.dim() < 2 or state.shape[-2] != rows.numel():
            raise ValueError(f"reset: a state tensor of shape {tuple(state.shape)} does not hold the batch of "
                             f"{rows.numel()} rows in dimension -2, so its reset rows cannot be zeroed")
        return torch.where(rows.view(-1, 1), torch.zeros_like(state), state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_zero_rows(s, rows) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_zero_rows(s, rows) for s in state)
    if isinstance(state, dict):
        return {key: _zero_rows(value, rows) for key, value in state.items()}
    return state


def _check_piece(piece: Any, dim: int, at: int) -> tuple[Tensor, Tensor, Tensor | None]:
    if not (isinstance(piece, (tuple, list)) and len(piece) in (2, 3)):
        raise TypeError("the stream must yield (x_piece, y_piece) pairs or (x_piece, y_piece, reset_piece) "
                        "triples of tensors")
    x, y, reset = (*piece, None) if len(piece) == 2 else piece
    if not all(isinstance(t, Tensor) for t in (x, y) + ((reset,) if len(piece) == 3 else ())):
        raise TypeError("the stream must yield (x_piece, y_piece) pairs or (x_piece, y_piece, reset_piece) "
                        "triples of tensors")
    if x.dim() <= dim or y.dim() <= dim or x.shape[dim] != y.shape[dim]:
        raise ValueError(f"the piece at step {at} has x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}: "
                         f"both need the same number of time steps in dimension {dim}")
    if reset is not None and (reset.dtype != torch.bool or reset.dim() != 2 or reset.shape[dim] != x.shape[dim]):
        raise ValueError(f"the piece at step {at} has a reset of dtype {reset.dtype} and shape "
                         f"{tuple(reset.shape)}: it must be bool, 2-D, with x's {x.shape[dim]} time steps in "
                         f"dimension {dim}")
    return x, y, reset


def _check_output(out: Any, dim: int, steps: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return (output, state) with a tensor output, got {type(out).__name__}; "
                        "for a PackedSequence, train on padded tensors instead")
    if out.dim() <= dim or out.shape[dim] != steps:
        raise ValueError(f"the model's output must keep the time dimension ({dim}) of its input: got shape "
                         f"{tuple(out.shape)} for {steps} input steps (check batch_first)")
    return out
