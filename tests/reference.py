"""The test oracle: run fastlstm and torch.nn.LSTM on the same inputs and compare everything."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

# Largest error allowed, relative to the largest magnitude of the reference tensor.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def same_error(make_ref, make_ours):
    """Both calls raise, the same exception type with the same text; returns fastlstm's."""
    expected, actual = error_of(make_ref), error_of(make_ours)
    assert expected is not None, "the torch module accepted it; the test case is wrong"
    assert actual is not None, f"fastlstm accepted it; torch raised {type(expected).__name__}: {expected}"
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    return actual


def error_of(fn):
    """The exception ``fn()`` raises, or None: for comparing fastlstm's errors with torch's."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - whatever is raised is compared
        return error
    return None


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        assert actual.numel() == 0
        return 0.0
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-6)
    return diff / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten buffer?)"
    err = rel_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@dataclass
class Case:
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    proj_size: int = 0
    given_state: bool = False
    input_kind: str = "batched"  # batched | unbatched | noncontiguous | packed
    T: int = 6
    B: int = 3
    input_size: int = 5
    hidden_size: int = 7

    @classmethod
    def from_flags(cls, flags: tuple) -> "Case":
        """(num_layers, bias, batch_first, bidirectional, proj_size, given_state, input_kind)."""
        layers, bias, batch_first, bidirectional, proj, given, kind = flags
        return cls(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                   proj_size=proj, given_state=given, input_kind=kind)


def make_input(case: Case, dtype: torch.dtype, device: str = "cpu"):
    """(module input, the tensor whose gradient is checked, hx or None)."""
    T, B, I = case.T, case.B, case.input_size
    shape = (B, T, I) if case.batch_first else (T, B, I)
    if case.input_kind == "unbatched":
        x = torch.randn(T, I, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
        inp, leaf = x, x
    elif case.input_kind == "noncontiguous":
        big = torch.randn(*shape[:-1], 2 * I, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
        inp, leaf = big[..., ::2], big
    else:
        x = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
        inp, leaf = x, x
        if case.input_kind == "packed":
            lengths = torch.randint(1, T + 1, (B,))
            lengths[torch.randint(0, B, ())] = T  # unsorted, longest somewhere in the middle
            inp = pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=False)
    hx = None
    if case.given_state:
        D = 2 if case.bidirectional else 1
        state = case.proj_size or case.hidden_size
        lead = (case.num_layers * D,) if case.input_kind == "unbatched" else (case.num_layers * D, B)
        h0 = torch.randn(*lead, state, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
        c0 = torch.randn(*lead, case.hidden_size, dtype=torch.float64).to(device=device, dtype=dtype)
        hx = (h0, c0.requires_grad_())
    return inp, leaf, hx


def outputs_and_grads(module: nn.Module, inp, leaf: torch.Tensor, hx, seed: int = 7, **call):
    """Outputs, final states, and the gradients of input, (h0, c0) and every parameter."""
    out, (h, c) = module(inp, hx, **call) if call else module(inp, hx)
    y = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in (y, h, c)]
    loss = sum((t * w).sum() for t, w in zip((y, h, c), weights))
    wrt = [leaf] + ([hx[0], hx[1]] if hx is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt)
    names = ["input"] + (["h0", "c0"] if hx is not None else []) + [n for n, _ in module.named_parameters()]
    return {"output": y, "h_n": h, "c_n": c, **{f"grad {n}": gr for n, gr in zip(names, grads)}}


def compare_with_torch(case: Case, dtype: torch.dtype, device: str = "cpu", **options) -> None:
    """fastlstm in `dtype` on `device` against torch.nn.LSTM in float64 on the CPU."""
    ref = nn.LSTM(case.input_size, case.hidden_size, case.num_layers, case.bias, case.batch_first, 0.0,
                  case.bidirectional, case.proj_size, dtype=torch.float64)
    ours = fastlstm.LSTM.from_torch(copy.deepcopy(ref), **options).to(device=device, dtype=dtype)
    compare_modules(ref, ours, case, dtype, device)


def compare_modules(ref: nn.Module, ours: nn.Module, case: Case, dtype: torch.dtype, device: str = "cpu"):
    """`ours` in `dtype` on `device` against `ref` (float64, CPU) on fresh inputs of `case`: outputs,
    states and every gradient. Returns the inputs each side ran on: ((inp, hx), (inp2, hx2))."""
    inp, leaf, hx = make_input(case, torch.float64)
    expected = outputs_and_grads(ref, inp, leaf, hx)

    def convert(t):
        return t.detach().to(device=device, dtype=dtype).requires_grad_()

    leaf2 = convert(leaf)
    if isinstance(inp, PackedSequence):
        inp2 = pack_padded_sequence(leaf2, lengths_of(inp, case), batch_first=case.batch_first,
                                    enforce_sorted=False)
    elif case.input_kind == "noncontiguous":
        inp2 = leaf2[..., ::2]
    else:
        inp2 = leaf2
    hx2 = None if hx is None else (convert(hx[0]), convert(hx[1]))
    actual = outputs_and_grads(ours, inp2, leaf2, hx2)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_close(actual[key].cpu(), expected[key], dtype, f"{key} [{case}]")
    return (inp, hx), (inp2, hx2)


def lengths_of(packed: PackedSequence, case: Case) -> torch.Tensor:
    batch_sizes = packed.batch_sizes
    sorted_lengths = (torch.arange(case.B)[None, :] < batch_sizes[:, None]).sum(0)
    lengths = torch.empty_like(sorted_lengths)
    lengths[packed.sorted_indices] = sorted_lengths
    return lengths
