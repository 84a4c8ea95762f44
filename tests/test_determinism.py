"""Run-to-run determinism on the CPU: the same call twice gives bitwise identical results.

Outputs, final states, every gradient (input, state, parameters) and the recorded gradient norms
are compared with torch.equal, for every option combination the CPU offers: both CPU code paths
(the fused recurrence; the step-by-step one that projections take), truncation, both clipping
modes, norms, checkpointing, packed input, per-sample resets, bidirectional, in float32 (float64 and bfloat16 on
subsets), at sizes where the kernels split work across threads. The double-backward
(composite) path is deterministic too and checked once.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm

# T, B, I, H: several vector blocks of hidden units (float32 AVX-512: 16 lanes) and enough batch
# rows that the fused recurrence, the cell kernels and the GEMMs use more than one thread.
T, B, I, H, P = 12, 8, 16, 48, 24

OPTIONS = list(itertools.product(
    [None, 5],                             # tbptt_chunk
    [None, "recurrent", "gates"],          # grad_clip_mode (None: no clipping)
    [False, True],                         # record_grad_norms
    [None, 4],                             # checkpoint_every
    [False, True],                         # packed
    [False, True],                         # bidirectional
    [0, P],                                # proj_size
))


def _id(flags) -> str:
    tbptt, clip, norms, ckpt, packed, bidir, proj = flags
    return (f"tbptt={tbptt}-clip={clip}-norms={norms}-ckpt={ckpt}-packed={packed}-bidir={bidir}-proj={proj}")


def run(model: fastlstm.LSTM, x: torch.Tensor, lengths: torch.Tensor | None, h0, c0, create_graph=False,
        reset: torch.Tensor | None = None) -> dict:
    """Everything one forward and backward produce, as {name: tensor}."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    h0, c0 = h0.detach().requires_grad_(), c0.detach().requires_grad_()
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, (h, c) = model(inp, (h0, c0), reset=reset)
    y = pad_packed_sequence(out, total_length=x.shape[0])[0] if lengths is not None else out
    g = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.dtype)).sum() for t in (y, h, c))
    loss.backward(create_graph=create_graph)
    result = {"output": y, "h_n": h, "c_n": c, "grad input": x.grad, "grad h0": h0.grad, "grad c0": c0.grad}
    result.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    if model.record_grad_norms:
        result["norms h"], result["norms c"] = model.grad_norms.h, model.grad_norms.c
    return {key: value.detach().clone() for key, value in result.items()}


def make(flags, dtype):
    tbptt, clip, norms, ckpt, packed, bidir, proj = flags
    model = fastlstm.LSTM(I, H, 2, bidirectional=bidir, proj_size=proj, dtype=dtype, tbptt_chunk=tbptt,
                          grad_clip=None if clip is None else 0.01, grad_clip_mode=clip or "recurrent",
                          record_grad_norms=norms, checkpoint_every=ckpt)
    D = 2 if bidir else 1
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(2 * D, B, proj or H, dtype=dtype)
    c0 = torch.randn(2 * D, B, H, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,)) if packed else None
    if lengths is not None:
        lengths[B // 2] = T
    return model, (x, lengths, h0, c0)


def assert_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical calls"


@pytest.mark.parametrize("flags", OPTIONS, ids=_id)
def test_two_runs_are_bitwise_identical(flags):
    model, data = make(flags, torch.float32)
    assert_identical(run(model, *data), run(model, *data))


# float64 runs the same code with other vector widths: the option products on packed bidirectional input.
@pytest.mark.parametrize("flags", [f for f in OPTIONS if f[4] and f[5]], ids=_id)
def test_two_runs_are_bitwise_identical_float64(flags):
    model, data = make(flags, torch.float64)
    assert_identical(run(model, *data), run(model, *data))


@pytest.mark.parametrize("flags", [(None, None, False, None, False, False, 0), (5, "gates", True, 4, True, True, 0),
                                   (5, "recurrent", True, None, True, True, P)], ids=_id)
def test_two_runs_are_bitwise_identical_bfloat16(flags):
    model, data = make(flags, torch.bfloat16)
    assert_identical(run(model, *data), run(model, *data))


# Per-sample resets (about one step in four of every row) on the bidirectional option products.
@pytest.mark.parametrize("flags", [f for f in OPTIONS if f[5]], ids=_id)
def test_two_runs_with_resets_are_bitwise_identical(flags):
    model, (x, lengths, h0, c0) = make(flags, torch.float32)
    reset = torch.rand(T, B, generator=torch.Generator().manual_seed(1)) < 0.25
    first = run(model, x, lengths, h0, c0, reset=reset)
    assert_identical(first, run(model, x, lengths, h0, c0, reset=reset))
    # The resets took effect: the same call without them differs.
    assert not torch.equal(first["output"], run(model, x, lengths, h0, c0)["output"])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_double_backward_is_deterministic():
    model, data = make((5, "recurrent", True, None, True, True, P), torch.float64)
    assert_identical(run(model, *data, create_graph=True), run(model, *data, create_graph=True))
