"""Shared pieces of the long-sequence tests: independent references and small helpers.

* The chunked reference of truncated BPTT: torch.nn.LSTM run over the sequence in chunks with the
  state detached between chunks, one layer and direction at a time (the reverse direction flips
  time; packed sequences run one by one).
* The unrolled reference of clipping and gradient norms: an nn.LSTMCell (or explicit cell) loop
  with identity ops whose backward clamps, on the state between steps or on the gate
  pre-activations.
* Model/data factories, the fastlstm run whose results are compared, and tolerance checks.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from reference import assert_close

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# The reference: chunked torch.nn.LSTM, one layer and direction at a time.
# ---------------------------------------------------------------------------------------------

def _direction_params(params: dict[str, torch.Tensor], layer: int, reverse: bool) -> dict[str, torch.Tensor]:
    """The parameters of one layer/direction, renamed for a 1-layer unidirectional nn.LSTM."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    out = {}
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
        if name + suffix in params:
            out[name + "_l0"] = params[name + suffix]
    return out


def chunked_direction(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, p: dict[str, torch.Tensor], *,
                      k: int | None, reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, B, I), h0 (B, K), c0 (B, H) -> y (T, B, K), h_n, c_n: chunks of k, state detached."""
    hidden, inp = p["weight_hh_l0"].shape[0] // 4, p["weight_ih_l0"].shape[1]
    proj = p["weight_hr_l0"].shape[0] if "weight_hr_l0" in p else 0
    module = nn.LSTM(inp, hidden, bias="bias_ih_l0" in p, proj_size=proj, device="meta")
    seq = x.flip(0) if reverse else x
    T = seq.shape[0]
    k = k or T
    h, c = h0.unsqueeze(0), c0.unsqueeze(0)
    outs = []
    for start in range(0, T, k):
        if start > 0:
            h, c = h.detach(), c.detach()
        out, (h, c) = functional_call(module, p, (seq[start:start + k], (h, c)))
        outs.append(out)
    y = torch.cat(outs)
    return (y.flip(0) if reverse else y), h[0], c[0]


def compose_layers(direction, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, params: dict[str, torch.Tensor],
                   num_layers: int, bidirectional: bool, **kw):
    """A stacked (bi)LSTM from a one-direction reference, layer by layer: x (T, B, I); h0 (L*D, B, K);
    c0 (L*D, B, H). ``direction(x, h0, c0, p, reverse=..., **kw) -> (y, h_n, c_n)``."""
    D = 2 if bidirectional else 1
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            index = layer * D + d
            y, h, c = direction(layer_input, h0[index], c0[index], _direction_params(params, layer, d == 1),
                                reverse=d == 1, **kw)
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, dim=2)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def chunked_stack(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, params: dict[str, torch.Tensor],
                  num_layers: int, bidirectional: bool, k: int | None):
    """The TBPTT reference for an unpacked batch (chunks of k, state detached between chunks)."""
    return compose_layers(chunked_direction, x, h0, c0, params, num_layers, bidirectional, k=k)


def reference_run(stack_fn, x, h0, c0, lengths, **kw):
    """Runs ``stack_fn`` on the whole batch, or on each sequence of a packed batch separately.

    Returns y (T, B, D*K) zero on padding, h_n, c_n (as a packed LSTM call returns them).
    """
    if lengths is None:
        return stack_fn(x, h0, c0, **kw)
    T = x.shape[0]
    ys, hs, cs = [], [], []
    for b, n in enumerate(lengths.tolist()):
        y, h, c = stack_fn(x[:n, b:b + 1], h0[:, b:b + 1], c0[:, b:b + 1], **kw)
        ys.append(torch.cat([y, y.new_zeros(T - n, 1, y.shape[2])]))
        hs.append(h)
        cs.append(c)
    return torch.cat(ys, 1), torch.cat(hs, 1), torch.cat(cs, 1)


# ---------------------------------------------------------------------------------------------
# The fastlstm side, and the comparison.
# ---------------------------------------------------------------------------------------------

def make_model(num_layers=1, bidirectional=False, proj_size=0, I=3, H=5, **options) -> fastlstm.LSTM:
    return fastlstm.LSTM(I, H, num_layers, bidirectional=bidirectional, proj_size=proj_size, dtype=F64,
                         **options)


def make_data(model: fastlstm.LSTM, T: int, B: int, packed: bool):
    D = 2 if model.bidirectional else 1
    K = model.proj_size or model.hidden_size
    x = torch.randn(T, B, model.input_size, dtype=F64, requires_grad=True)
    h0 = torch.randn(model.num_layers * D, B, K, dtype=F64, requires_grad=True)
    c0 = torch.randn(model.num_layers * D, B, model.hidden_size, dtype=F64, requires_grad=True)
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[B // 2] = T  # unsorted, longest in the middle
    return x, h0, c0, lengths


def loss_of(y, h, c, seed=11):
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in (y, h, c))


# (num_layers, bidirectional) of the long-sequence tests, and their ids.
LAYER_CONFIGS = [(1, False), (2, False), (1, True), (2, True)]
LAYER_CONFIG_IDS = ["1layer", "2layers", "1layer-bi", "2layers-bi"]


def fast_run(model, x, h0, c0, lengths, **call):
    """Output (T, B, D*K) zero on padding, h_n, c_n of fastlstm."""
    if lengths is None:
        out, (h, c) = model(x, (h0, c0), **call)
        return out, h, c
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h, c) = model(packed, (h0, c0), **call)
    return pad_packed_sequence(out, total_length=x.shape[0])[0], h, c


@contextlib.contextmanager
def one_thread():
    """Runs a reference on one thread, then restores the thread count.

    The references are long chains of tiny torch ops. On a 2-core machine shared with other work,
    each 2-thread OpenMP region of such an op can cost a scheduler time slice (measured: the
    exploding-gradient reference took 8 s instead of 0.08 s). fastlstm itself always runs with
    the default thread count, so its multi-threaded paths stay under test.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def results(run, model, x, h0, c0, loss=loss_of, reference=False):
    """{name: tensor} of outputs and the gradients of x, h0, c0 and every parameter.

    ``reference=True``: a reference computation, run on one thread (see ``one_thread``).
    """
    with one_thread() if reference else contextlib.nullcontext():
        y, h, c = run()
        names = [n for n, _ in model.named_parameters()]
        wrt = [x, h0, c0] + [p for _, p in model.named_parameters()]
        grads = torch.autograd.grad(loss(y, h, c), wrt, allow_unused=True, materialize_grads=True)
    out = {"output": y, "h_n": h, "c_n": c}
    out.update({f"grad {n}": g for n, g in zip(["input", "h0", "c0"] + names, grads)})
    return out


def assert_all_close(actual: dict, expected: dict, what: str, dtype=F64) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_close(actual[key], expected[key], dtype, f"{key} [{what}]")


def moved(model, data, device="cpu", dtype=None):
    """Copies of ``model`` and of data = (x, h0, c0, lengths) on ``device`` in ``dtype`` (None: the
    model's), x, h0, c0 as fresh leaves; the originals when neither changes. lengths stay on the CPU."""
    if device == "cpu" and dtype is None:
        return model, data
    x, h0, c0, lengths = data
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    x, h0, c0 = (t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, h0, c0))
    return model, (x, h0, c0, lengths)


def device_results(model, data, device="cpu", dtype=None, **call) -> dict:
    """``results`` of fastlstm on ``device`` in ``dtype`` (copies of model and data, see ``moved``),
    on the CPU."""
    model, (x, h0, c0, lengths) = moved(model, data, device, dtype)
    out = results(lambda: fast_run(model, x, h0, c0, lengths, **call), model, x, h0, c0)
    return {key: value.cpu() for key, value in out.items()}


def skip_unless_supported(backend: str, model: fastlstm.LSTM, B: int) -> None:
    from fastlstm.dispatch import persistent_support
    if backend == "persistent":
        ok, reason = persistent_support(model.hidden_size, B, F64, torch.device("cuda"), model.proj_size)
        if not ok:
            pytest.skip(f"persistent kernel: {reason}")


class ClampGrad(torch.autograd.Function):
    """Identity in the forward; clamps the gradient to [-c, c] in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: float) -> torch.Tensor:
        ctx.c = c
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-ctx.c, ctx.c), None


def _clamp(t: torch.Tensor, clip: float | None) -> torch.Tensor:
    return t if clip is None else ClampGrad.apply(t, clip)


def cell_step(x_t, h, c, p, *, gates_clip=None, explicit=False):
    """One step of the cell. Returns (h_t before projection, c_t)."""
    if not explicit and gates_clip is None:
        cell = nn.LSTMCell(p["weight_ih_l0"].shape[1], p["weight_hh_l0"].shape[0] // 4,
                           bias="bias_ih_l0" in p, device="meta")
        names = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0", "bias_ih": "bias_ih_l0",
                 "bias_hh": "bias_hh_l0"}
        return functional_call(cell, {k: p[v] for k, v in names.items() if v in p}, (x_t, (h, c)))
    G = x_t @ p["weight_ih_l0"].t() + h @ p["weight_hh_l0"].t()
    if "bias_ih_l0" in p:
        G = G + p["bias_ih_l0"] + p["bias_hh_l0"]
    G = _clamp(G, gates_clip)
    gi, gf, gg, go = G.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg), torch.sigmoid(go)
    c_t = f * c + i * g
    return o * torch.tanh(c_t), c_t


def unrolled_direction(x, h0, c0, p, *, reverse, clip=None, mode="recurrent", k=None, explicit=False,
                       record=None):
    """x (T, B, I), h0 (B, K), c0 (B, H) -> y (T, B, K), h_n, c_n.

    ``record``: a dict that receives lists "h" and "c" of the tensors h_t, c_t indexed by time t,
    each with retain_grad() (so their .grad is the total gradient reaching them).
    """
    T = x.shape[0]
    rec_clip = clip if mode == "recurrent" else None
    gates_clip = clip if mode == "gates" else None
    w_hr = p.get("weight_hr_l0")
    h, c = _clamp(h0, rec_clip), _clamp(c0, rec_clip)  # the carry step 0 sends to (h0, c0): clipped, never cut
    ys = [None] * T
    hs, cs = [None] * T, [None] * T
    for s in range(T):
        t = T - 1 - s if reverse else s
        if s > 0:
            if k is not None and s % k == 0:
                h, c = h.detach(), c.detach()
            else:
                h, c = _clamp(h, rec_clip), _clamp(c, rec_clip)
        h_t, c_t = cell_step(x[t], h, c, p, gates_clip=gates_clip, explicit=explicit or w_hr is not None)
        if record is not None:
            h_t.retain_grad()
            c_t.retain_grad()
            hs[t], cs[t] = h_t, c_t
        r_t = h_t @ w_hr.t() if w_hr is not None else h_t
        ys[t] = r_t
        h, c = r_t, c_t
    if record is not None:
        record.setdefault("h", []).append(hs)
        record.setdefault("c", []).append(cs)
    return torch.stack(ys), h, c


def unrolled_stack(x, h0, c0, params, num_layers, bidirectional, clip=None, mode="recurrent", k=None,
                   explicit=False, record=None):
    """The reference for one batch of equal-length sequences: x (T, B, I), h0/c0 (L*D, B, .).

    ``record`` (a dict) receives "h" and "c": lists over layer*D + direction of per-time lists.
    """
    return compose_layers(unrolled_direction, x, h0, c0, params, num_layers, bidirectional, clip=clip, mode=mode,
                          k=k, explicit=explicit, record=record)
