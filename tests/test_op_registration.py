"""The torch.library registration of fastlstm's ops: opcheck, gradcheck, torch.compile and torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import ops
from reference import assert_close, outputs_and_grads

F64 = torch.float64
LAYER_FORWARD = torch.ops.fastlstm.layer_forward.default


def _layer_args(dtype, *, T=4, B=3, I=2, H=3, proj=0, bias=True, lengths=False, reset=False, probe=False,
                checkpoint_every=0, reverse=False, requires_grad=True):
    """Positional arguments of fastlstm::layer_forward, as fastlstm/lstm.py builds them."""
    K = proj or H

    def make(*shape):
        return torch.randn(*shape, dtype=F64).to(dtype).requires_grad_(requires_grad)

    x, w_ih, w_hh = make(T, B, I), make(4 * H, I), make(4 * H, K)
    b = make(4 * H) if bias else None
    w_hr = make(K, H) if proj else None
    h0, c0 = make(B, K), make(B, H)
    lens = torch.tensor([T, 1, T - 1, 2][:B]) if lengths else None
    resets = torch.rand(T, B, generator=torch.Generator().manual_seed(3)) < 0.4 if reset else None
    acc = F64 if dtype == F64 else torch.float32
    norm_probe = torch.zeros(2, T, dtype=acc, requires_grad=True) if probe else None
    return (x, w_ih, w_hh, b, w_hr, h0, c0, lens, resets, norm_probe, reverse, checkpoint_every, 0, 0.0, "recurrent",
            "auto")


OPCHECK_CASES = {
    "plain": {},
    "no_bias": {"bias": False},
    "proj": {"proj": 2},
    "lengths": {"lengths": True},
    "reverse_lengths": {"lengths": True, "reverse": True},
    "norm_probe": {"probe": True},
    "checkpoint2": {"checkpoint_every": 2},
    "checkpoint2_all": {"checkpoint_every": 2, "lengths": True, "proj": 2, "reverse": True, "probe": True,
                        "bias": False},
    "checkpoint3_uneven": {"checkpoint_every": 3, "T": 5},
    "reset": {"reset": True},
    "reset_all": {"reset": True, "lengths": True, "proj": 2, "reverse": True, "checkpoint_every": 2},
    "checkpoint_longer_than_T": {"checkpoint_every": 64},
    "no_grad": {"requires_grad": False},
    "batch0": {"B": 0},
}


# float64 runs every case, float32 a representative subset (keeps the file fast).
OPCHECK_PARAMS = [pytest.param(case, F64, id=f"{case}-float64") for case in OPCHECK_CASES] + [
    pytest.param(case, torch.float32, id=f"{case}-float32")
    for case in ("plain", "proj", "norm_probe", "checkpoint2_all", "reset_all")]


@pytest.mark.parametrize("case, dtype", OPCHECK_PARAMS)
def test_opcheck_layer_forward(case, dtype):
    torch.library.opcheck(LAYER_FORWARD, _layer_args(dtype, **OPCHECK_CASES[case]))


# ---------------------------------------------------------------- gradcheck


GRADCHECK_CASES = {
    "forward": {},
    "reverse": {"reverse": True},
    "lengths": {"lengths": True},
    "reverse_lengths": {"lengths": True, "reverse": True},
    "checkpoint2": {"checkpoint_every": 2},
    "checkpoint3_lengths_reverse": {"checkpoint_every": 3, "lengths": True, "reverse": True},
    "proj": {"proj": 2},
    "proj_lengths_checkpoint": {"proj": 2, "lengths": True, "checkpoint_every": 2},
    "no_bias": {"bias": False},
    "reset": {"reset": True, "T": 6},
    "reset_reverse_lengths_checkpoint": {"reset": True, "T": 6, "reverse": True, "lengths": True, "checkpoint_every": 2},
    "reset_proj_lengths": {"reset": True, "T": 6, "proj": 2, "lengths": True},
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES), ids=list(GRADCHECK_CASES))
def test_gradcheck_lstm_layer(case):
    cfg = dict(GRADCHECK_CASES[case])
    reverse = cfg.pop("reverse", False)
    checkpoint_every = cfg.pop("checkpoint_every", 0)
    x, w_ih, w_hh, b, w_hr, h0, c0, lengths, reset, *_ = _layer_args(F64, **cfg)
    options = ops.LayerOptions(checkpoint_every=checkpoint_every)
    present = [t for t in (x, w_ih, w_hh, b, w_hr, h0, c0) if t is not None]
    slots = [t is not None for t in (x, w_ih, w_hh, b, w_hr, h0, c0)]

    def layer(*tensors):
        it = iter(tensors)
        full = [next(it) if has else None for has in slots]
        return ops.lstm_layer(*full, lengths, reset, reverse=reverse, options=options)

    assert torch.autograd.gradcheck(layer, present, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_module_input_and_state(packed):
    model = fastlstm.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, dtype=F64)
    x = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    c0 = torch.randn(4, 3, 3, dtype=F64, requires_grad=True)
    lengths = torch.tensor([2, 4, 3])

    def run(x, h0, c0):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        y, (h, c) = model(inp, (h0, c0))
        return (y.data if packed else y), h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=F64)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=F64, requires_grad=True)
    expected = outputs_and_grads(model, x, x, (h0, c0))
    actual = outputs_and_grads(compiled, x, x, (h0, c0))  # parameter names carry an _orig_mod. prefix
    for (n, e), a in zip(expected.items(), actual.values(), strict=True):
        assert_close(a, e, F64, f"compiled {n}")
    assert counter.frame_count == 1
    targets = [str(node.target) for node in counter.graphs[0].graph.nodes]
    assert sum("fastlstm.layer_forward" in t for t in targets) == 4  # one op per layer and direction
    torch._dynamo.reset()


# ---------------------------------------------------------------- torch.export


class Wrapper(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.proj = nn.Linear(3, 4, dtype=F64)
        self.lstm = fastlstm.LSTM(4, 5, dtype=F64, **kwargs)

    def forward(self, x):
        y, (h, c) = self.lstm(self.proj(x))
        return y, h, c


def _export_and_compare(model, example, dynamic_shapes=None, check_inputs=()):
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    targets = [str(node.target) for node in program.graph.nodes]
    assert any("fastlstm.layer_forward" in t for t in targets)
    for x in (example, *check_inputs):
        for a, e in zip(program.module()(x), model(x), strict=True):
            assert a.shape == e.shape
            assert_close(a.detach(), e.detach(), F64, "exported")


@pytest.mark.parametrize("cfg", [{}, {"num_layers": 2, "bidirectional": True, "proj_size": 2}],
                         ids=["default", "2layer-bidir-proj"])
def test_export_static(cfg):
    _export_and_compare(Wrapper(**cfg), torch.randn(6, 2, 3, dtype=F64))


def test_export_static_no_grad():
    with torch.no_grad():
        _export_and_compare(Wrapper(num_layers=2), torch.randn(6, 2, 3, dtype=F64))


@pytest.mark.parametrize("mode", ["grad", "no_grad", "checkpoint_every"])
def test_export_dynamic_sequence_length_and_batch(mode):
    model = Wrapper(num_layers=2, **({"checkpoint_every": 2} if mode == "checkpoint_every" else {}))
    dynamic = ({0: Dim("T", min=2, max=200), 1: Dim("B", min=2, max=16)},)
    others = (torch.randn(9, 5, 3, dtype=F64), torch.randn(130, 3, 3, dtype=F64), torch.randn(2, 4, 3, dtype=F64))
    if mode == "no_grad":
        with torch.no_grad():
            _export_and_compare(model, torch.randn(6, 2, 3, dtype=F64), dynamic, others)
    else:
        _export_and_compare(model, torch.randn(6, 2, 3, dtype=F64), dynamic, others)
