"""fastlstm.LSTMCell against torch.nn.LSTMCell: parameters, values, every gradient, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlstm
from reference import assert_close, same_error

I, H = 4, 5


def _pair(bias=True, dtype=torch.float64):
    ref = nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    ours = fastlstm.LSTMCell.from_torch(copy.deepcopy(ref))
    return ref, ours


@pytest.mark.parametrize("bias", [True, False])
def test_parameters_names_shapes_and_init_match(bias):
    torch.manual_seed(21)
    ref = nn.LSTMCell(I, H, bias=bias)
    torch.manual_seed(21)
    ours = fastlstm.LSTMCell(I, H, bias=bias)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert (ours.bias_ih is None) == (ref.bias_ih is None) == (not bias)
    assert (ours.input_size, ours.hidden_size, ours.bias) == (ref.input_size, ref.hidden_size, ref.bias)
    assert repr(ours) == repr(ref)


def test_device_and_dtype_arguments():
    ours = fastlstm.LSTMCell(I, H, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in ours.parameters())


def _run(cell, x, hx):
    h, c = cell(x, hx)
    g = torch.Generator().manual_seed(5)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    wc = torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.dtype)
    wrt = [x] + (list(hx) if hx is not None else []) + list(cell.parameters())
    grads = torch.autograd.grad((h * wh).sum() + (c * wc).sum(), wrt)
    names = ["input"] + (["h", "c"] if hx is not None else []) + [n for n, _ in cell.named_parameters()]
    return {"h'": h, "c'": c, **{f"grad {n}": gr for n, gr in zip(names, grads)}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("given", [True, False])
def test_values_and_all_gradients_match(dtype, bias, batched, given):
    ref, ours = _pair(bias, dtype)
    lead = (3,) if batched else ()
    x = torch.randn(*lead, I, dtype=torch.float64).to(dtype).requires_grad_()
    hx = None
    if given:
        hx = tuple(torch.randn(*lead, H, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    expected, actual = _run(ref, x, hx), _run(ours, x, hx)
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        assert actual[key].dtype == expected[key].dtype, key
        assert_close(actual[key], expected[key], dtype, key)


def test_a_sequence_of_steps_matches():
    ref, ours = _pair()
    xs = torch.randn(4, 2, I, dtype=torch.float64)
    state_ref = state = None
    for x in xs:
        state_ref = ref(x, state_ref)
        state = ours(x, state)
    for a, e in zip(state, state_ref):
        assert_close(a, e, torch.float64, "after 4 steps")


ERRORS = [
    ("3d_input", lambda m: m(torch.randn(2, 3, I))),
    ("3d_hx", lambda m: m(torch.randn(3, I), (torch.randn(1, 3, H), torch.randn(3, H)))),
    ("3d_cx", lambda m: m(torch.randn(3, I), (torch.randn(3, H), torch.randn(1, 3, H)))),
    ("wrong_input_size", lambda m: m(torch.randn(2, 3))),
    ("wrong_input_size_unbatched", lambda m: m(torch.randn(3))),
    ("batch_mismatch_h", lambda m: m(torch.randn(2, I), (torch.randn(3, H), torch.randn(3, H)))),
    ("batch_mismatch_c", lambda m: m(torch.randn(2, I), (torch.randn(2, H), torch.randn(3, H)))),
    ("wrong_hidden_size_h", lambda m: m(torch.randn(2, I), (torch.randn(2, 6), torch.randn(2, H)))),
    ("wrong_hidden_size_c", lambda m: m(torch.randn(2, I), (torch.randn(2, H), torch.randn(2, 6)))),
    ("unbatched_input_2d_hx", lambda m: m(torch.randn(I), (torch.randn(1, H), torch.randn(1, H)))),
    ("hx_one_tensor", lambda m: m(torch.randn(2, I), (torch.randn(2, H),))),
]


@pytest.mark.parametrize("call", [c for _, c in ERRORS], ids=[n for n, _ in ERRORS])
def test_errors_match_nn_lstm_cell(call):
    torch.manual_seed(0)
    same_error(lambda: call(nn.LSTMCell(I, H)), lambda: call(fastlstm.LSTMCell(I, H)))


def test_wrong_input_size_text():
    with pytest.raises(RuntimeError, match="^input has inconsistent input_size: got 3 expected 4$"):
        fastlstm.LSTMCell(4, 5)(torch.randn(2, 3))


def test_dtype_mismatch_is_rejected_with_a_message_naming_the_dtypes():
    cell = fastlstm.LSTMCell(I, H)
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        cell(torch.randn(2, I, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch\.float64\)"):
        cell(torch.randn(2, I), (torch.randn(2, H, dtype=torch.float64), torch.randn(2, H)))


@pytest.mark.parametrize("given", [False, True])
def test_batch_zero(given):
    ref, ours = _pair()
    x = torch.randn(0, I, dtype=torch.float64, requires_grad=True)
    hx = (torch.zeros(0, H, dtype=torch.float64), torch.zeros(0, H, dtype=torch.float64)) if given else None
    expected, actual = ref(x, hx), ours(x, hx)
    assert [t.shape for t in actual] == [t.shape for t in expected] == [(0, H), (0, H)]
    (actual[0].sum() + actual[1].sum()).backward()
    assert x.grad.shape == (0, I)
    assert all((p.grad == 0).all() for p in ours.parameters())


def test_from_torch_and_to_torch_share_parameters():
    ref = nn.LSTMCell(I, H, dtype=torch.float64).eval()
    ours = fastlstm.LSTMCell.from_torch(ref)
    assert type(ours) is fastlstm.LSTMCell and not ours.training
    for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert n == m and p is q
    back = ours.to_torch()
    assert type(back) is nn.LSTMCell
    assert all(p is q for p, q in zip(back.parameters(), ref.parameters(), strict=True))
    x = torch.randn(2, I, dtype=torch.float64)
    with torch.no_grad():
        ref.weight_hh.add_(0.5)  # an in-place change is seen by all three
    for a, e in zip(ours(x), back(x)):
        assert_close(a, e, torch.float64, "shared")
    for a, e in zip(ours(x), ref(x)):
        assert_close(a, e, torch.float64, "shared")
    with pytest.raises(TypeError, match="nn.LSTMCell"):
        fastlstm.LSTMCell.from_torch(nn.LSTM(I, H))


def test_backend_option():
    cell = fastlstm.LSTMCell(I, H, backend="stepwise", dtype=torch.float64)
    assert cell.options.backend == "stepwise"
    assert "backend='stepwise'" in repr(cell)
    ref = nn.LSTMCell(I, H, dtype=torch.float64)
    ref.load_state_dict(cell.state_dict())
    x = torch.randn(2, I, dtype=torch.float64)
    for a, e in zip(cell(x), ref(x)):
        assert_close(a, e, torch.float64, "stepwise")
    with pytest.raises(ValueError, match="backend"):
        fastlstm.LSTMCell(I, H, backend="fast")
