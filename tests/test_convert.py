"""fastlstm.convert and LSTM.from_torch / to_torch: in-place swaps that share the original parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import fastlstm
from reference import assert_close

F64 = torch.float64


class Block(nn.Module):
    """A custom module with an LSTM, a cell and a ModuleList / ModuleDict of LSTMs."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
        self.stack = nn.ModuleList([nn.LSTM(10, 3, proj_size=2), nn.LSTM(2, 4, batch_first=True)])
        self.heads = nn.ModuleDict({"cell": nn.LSTMCell(4, 6), "seq": nn.Sequential(nn.LSTM(4, 3, bias=False))})

    def forward(self, x):  # x: (T, B, 3)
        z = self.encoder(x)
        y, _ = self.lstm(z)
        y, _ = self.stack[0](y)
        y, (h, _) = self.stack[1](y.transpose(0, 1))
        state = None
        for t in range(z.size(0)):
            state = self.heads["cell"](z[t], state)
        s, _ = self.heads["seq"][0](z)
        return y, h, s, state[0], state[1]


LSTM_PATHS = ["lstm", "stack.0", "stack.1", "heads.seq.0"]
CELL_PATHS = ["heads.cell"]


def _model():
    torch.manual_seed(3)
    return nn.Sequential(Block()).to(F64)


def _run(model, x):
    out = model(x)
    g = torch.Generator().manual_seed(8)
    return sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in out), out


def test_convert_replaces_nested_modules_and_keeps_outputs():
    model = _model()
    x = torch.randn(5, 2, 3, dtype=F64)
    expected_loss, expected = _run(model, x)
    expected_grads = torch.autograd.grad(expected_loss, list(model.parameters()))
    params = dict(model.named_parameters())
    result = fastlstm.convert(model)
    assert result is model
    for path in LSTM_PATHS:
        assert type(model[0].get_submodule(path)) is fastlstm.LSTM, path
    for path in CELL_PATHS:
        assert type(model[0].get_submodule(path)) is fastlstm.LSTMCell, path
    assert type(model[0].encoder[0]) is nn.Linear
    # Same parameter objects under the same names, in the same order.
    assert list(model.named_parameters()) == list(params.items())
    assert all(model.get_parameter(n) is p for n, p in params.items())
    loss, actual = _run(model, x)
    for a, e in zip(actual, expected):
        assert_close(a, e, F64, "converted model output")
    for (n, _), a, e in zip(params.items(), torch.autograd.grad(loss, list(model.parameters())), expected_grads):
        assert_close(a, e, F64, f"grad {n}")


def test_convert_keeps_training_mode_device_dtype_and_requires_grad():
    model = _model()
    model[0].lstm.eval()
    model[0].stack[1].weight_hh_l0.requires_grad_(False)
    fastlstm.convert(model)
    assert not model[0].lstm.training and model[0].stack[0].training and model[0].heads["cell"].training
    assert all(p.dtype == F64 and p.device.type == "cpu" for p in model.parameters())
    assert not model[0].stack[1].weight_hh_l0.requires_grad
    model.eval()
    fastlstm.convert(model)  # idempotent: converted modules are left as they are
    assert type(model[0].lstm) is fastlstm.LSTM and not model[0].stack[0].training


def test_convert_keeps_float32_dtype():
    model = nn.Sequential(nn.LSTM(3, 4))
    fastlstm.convert(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model[0](torch.randn(2, 1, 3))[0].dtype == torch.float32


def test_options_reach_converted_lstms():
    model = _model()
    fastlstm.convert(model, backend="stepwise", tbptt_chunk=4, grad_clip=1.0)
    for path in LSTM_PATHS:
        options = model[0].get_submodule(path).options
        assert (options.backend, options.tbptt_chunk, options.grad_clip) == ("stepwise", 4, 1.0), path
    assert model[0].heads["cell"].options.backend == "stepwise"  # cells take only the backend


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="tbptt_chunk"):
        fastlstm.convert(nn.Sequential(nn.LSTM(3, 4)), tbptt_chunk=0)


def test_subclasses_are_left_alone():
    class MyLSTM(nn.LSTM):
        pass

    class MyCell(nn.LSTMCell):
        pass

    model = nn.Sequential(MyLSTM(3, 4), MyCell(3, 4), nn.LSTM(3, 4))
    fastlstm.convert(model)
    assert type(model[0]) is MyLSTM and type(model[1]) is MyCell
    assert type(model[2]) is fastlstm.LSTM
    assert type(fastlstm.convert(MyLSTM(3, 4))) is MyLSTM


def test_converting_an_lstm_returns_a_new_module():
    ref = nn.LSTM(3, 4, num_layers=2, proj_size=2, batch_first=True, dtype=F64)
    ours = fastlstm.convert(ref)
    assert type(ours) is fastlstm.LSTM and type(ref) is nn.LSTM
    assert all(p is q for p, q in zip(ours.parameters(), ref.parameters(), strict=True))
    cell = nn.LSTMCell(3, 4)
    assert type(fastlstm.convert(cell)) is fastlstm.LSTMCell


@pytest.mark.parametrize("cfg", [{}, {"num_layers": 2, "bidirectional": True, "proj_size": 2, "bias": False,
                                      "batch_first": True, "dropout": 0.5}])
def test_from_torch_to_torch_round_trip(cfg):
    ref = nn.LSTM(3, 4, dtype=F64, **cfg).eval()
    ours = fastlstm.LSTM.from_torch(ref)
    assert not ours.training
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size"):
        assert getattr(ours, attr) == getattr(ref, attr)
    assert [(n, p) for n, p in ours.named_parameters()] == [(n, p) for n, p in ref.named_parameters()]
    back = ours.to_torch()
    assert type(back) is nn.LSTM and not back.training
    assert [(n, p) for n, p in back.named_parameters()] == [(n, p) for n, p in ref.named_parameters()]
    x = torch.randn(2, 5, 3, dtype=F64) if cfg.get("batch_first") else torch.randn(5, 2, 3, dtype=F64)
    expected = ref(x)
    for a, e in zip((ours(x)[0], *ours(x)[1]), (expected[0], *expected[1])):
        assert_close(a, e, F64, "from_torch")
    for a, e in zip((back(x)[0], *back(x)[1]), (expected[0], *expected[1])):
        assert torch.equal(a, e)
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        fastlstm.LSTM.from_torch(nn.GRU(3, 4))


def test_from_torch_passes_options():
    ours = fastlstm.LSTM.from_torch(nn.LSTM(3, 4), checkpoint_every=3, record_grad_norms=True)
    assert ours.options.checkpoint_every == 3 and ours.options.record_grad_norms


def test_from_torch_rejects_a_parametrized_lstm():
    ref = weight_norm(nn.LSTM(3, 4), "weight_hh_l0")
    with pytest.raises(NotImplementedError, match="parametrization"):
        fastlstm.LSTM.from_torch(ref)
    ours = weight_norm(fastlstm.LSTM(3, 4), "weight_hh_l0")
    with pytest.raises(NotImplementedError, match="parametrization"):
        ours.to_torch()


@pytest.mark.parametrize("where", ["top_level", "nested", "cell"])
def test_convert_rejects_a_parametrized_module(where):
    if where == "cell":
        model = weight_norm(nn.LSTMCell(3, 4), "weight_hh")
    else:
        lstm = weight_norm(nn.LSTM(3, 4), "weight_hh_l0")
        model = lstm if where == "top_level" else nn.Sequential(nn.Linear(3, 3), lstm)
    with pytest.raises(NotImplementedError, match="parametrization"):
        fastlstm.convert(model)


def test_optimizer_created_before_conversion_updates_converted_module():
    model = nn.Sequential(nn.LSTM(3, 4, dtype=F64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    fastlstm.convert(model)
    assert type(model[0]) is fastlstm.LSTM
    x = torch.randn(4, 2, 3, dtype=F64)
    y, _ = model[0](x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * g, rtol=0, atol=1e-12)
        assert not torch.equal(p, b)


def test_deepcopy_of_a_converted_model_is_independent():
    model = fastlstm.convert(_model())
    clone = copy.deepcopy(model)
    assert type(clone[0].lstm) is fastlstm.LSTM
    assert all(p is not q and torch.equal(p, q) for p, q in zip(clone.parameters(), model.parameters()))
