"""fastlstm.LSTM keeps torch.nn.LSTM's module contract: constructor, parameters, errors, state, pickling.

Numerical parity of outputs and gradients over every flag combination is in test_parity.py; the
value comparisons here only check that a contract feature (packing, re-read weights, state_dict,
dropout, autocast, ...) reaches the kernels the way it reaches nn.LSTM's.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm
from fastlstm.options import KernelOptions
from reference import assert_close, error_of, rel_error, same_error

F64 = torch.float64

# Constructor configurations (input_size=4, hidden_size=5 unless given).
CONFIGS = [
    {},
    {"num_layers": 2, "bidirectional": True},
    {"num_layers": 2, "proj_size": 3, "bias": False},
    {"num_layers": 3, "bidirectional": True, "proj_size": 2, "batch_first": True, "dropout": 0.25},
    {"bias": False},
]


def _cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def _pair(cfg=None, dtype=F64, input_size=4, hidden_size=5):
    """An nn.LSTM and a fastlstm.LSTM with equal (independent copies of the) parameters."""
    cfg = cfg or {}
    ref = nn.LSTM(input_size, hidden_size, dtype=dtype, **cfg)
    ours = fastlstm.LSTM(input_size, hidden_size, dtype=dtype, **cfg)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(out, inputs, seed=3):
    """Gradients of a fixed random projection of ``out`` (a tuple of tensors) w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in out)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _flat(out):
    y, (h, c) = out
    return (y.data if isinstance(y, PackedSequence) else y), h, c


# ---------------------------------------------------------------- constructor


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_parameter_names_shapes_and_order_match(cfg):
    ref, ours = _pair(cfg)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    # all_weights: same nesting and shapes, and the entries are the registered parameters.
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [[w.shape for w in ws] for ws in ref.all_weights]
    for names, weights in zip(ours._all_weights, ours.all_weights):
        assert all(w is getattr(ours, n) for n, w in zip(names, weights))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_same_seed_gives_the_same_initial_parameters(cfg):
    torch.manual_seed(11)
    ref = nn.LSTM(4, 5, **cfg)
    after_ref = torch.rand(())
    torch.manual_seed(11)
    ours = fastlstm.LSTM(4, 5, **cfg)
    after_ours = torch.rand(())
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(after_ref, after_ours)  # same number of random draws


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_configuration_attributes_match(cfg):
    ref, ours = _pair(cfg)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
        assert type(getattr(ours, attr)) is type(getattr(ref, attr)), attr


def test_dropout_is_stored_as_float_like_nn_lstm():
    assert fastlstm.LSTM(4, 5, num_layers=2, dropout=1).dropout == 1.0
    assert type(fastlstm.LSTM(4, 5, num_layers=2, dropout=1).dropout) is float


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_and_dtype_arguments(dtype):
    ours = fastlstm.LSTM(4, 5, num_layers=2, proj_size=2, device="cpu", dtype=dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in ours.parameters())
    meta = fastlstm.LSTM(4, 5, device=torch.device("meta"), dtype=dtype)
    assert all(p.is_meta and p.dtype == dtype for p in meta.parameters())


def test_default_dtype_follows_torch_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert all(p.dtype == torch.float64 for p in fastlstm.LSTM(4, 5).parameters())
    finally:
        torch.set_default_dtype(previous)


BAD_ARGS = [
    pytest.param({"input_size": 4, "hidden_size": 0}, id="hidden_size=0"),
    pytest.param({"input_size": 0, "hidden_size": 5}, id="input_size=0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "num_layers": 0}, id="num_layers=0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "num_layers": 2.0}, id="num_layers=2.0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "proj_size": 5}, id="proj_size=hidden"),
    pytest.param({"input_size": 4, "hidden_size": 5, "proj_size": 7}, id="proj_size>hidden"),
    pytest.param({"input_size": 4, "hidden_size": 5, "proj_size": -1}, id="proj_size<0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "dropout": 2}, id="dropout=2"),
    pytest.param({"input_size": 4, "hidden_size": 5, "dropout": -0.1}, id="dropout<0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "dropout": True}, id="dropout=True"),
    pytest.param({"input_size": 4, "hidden_size": 5, "bias": "yes"}, id="bias=yes"),
    pytest.param({"input_size": 4, "hidden_size": 5, "batch_first": 1}, id="batch_first=1"),
    pytest.param({"input_size": 4.0, "hidden_size": 5}, id="input_size=4.0"),
    pytest.param({"input_size": 4, "hidden_size": 5.0}, id="hidden_size=5.0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "num_layers": -1.0}, id="num_layers=-1.0"),
    pytest.param({"input_size": 4, "hidden_size": 5, "dropout": None}, id="dropout=None"),
]


@pytest.mark.parametrize("kwargs", BAD_ARGS)
def test_constructor_errors_match_nn_lstm(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same_error(lambda: nn.LSTM(**kwargs), lambda: fastlstm.LSTM(**kwargs))


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with warnings.catch_warnings(record=True) as ref_warnings:
        warnings.simplefilter("always")
        nn.LSTM(4, 5, dropout=0.5)
    with warnings.catch_warnings(record=True) as our_warnings:
        warnings.simplefilter("always")
        fastlstm.LSTM(4, 5, dropout=0.5)
    assert len(ref_warnings) == 1
    assert [(w.category, str(w.message)) for w in our_warnings] == [(w.category, str(w.message))
                                                                     for w in ref_warnings]


def test_no_warning_for_dropout_with_several_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlstm.LSTM(4, 5, num_layers=2, dropout=0.5)
        fastlstm.LSTM(4, 5, dropout=0.0)


# ---------------------------------------------------------------- forward errors


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


FORWARD_ERRORS = [
    ("4d_input", lambda m: m(_x(3, 2, 4, 1))),
    ("1d_input", lambda m: m(_x(4))),
    ("wrong_input_size", lambda m: m(_x(3, 2, 5))),
    ("wrong_input_size_unbatched", lambda m: m(_x(3, 6))),
    ("batched_input_2d_hx", lambda m: m(_x(3, 2, 4), (_zeros(1, 5), _zeros(1, 5)))),
    ("batched_input_2d_cx", lambda m: m(_x(3, 2, 4), (_zeros(1, 2, 5), _zeros(2, 5)))),
    ("unbatched_input_3d_hx", lambda m: m(_x(3, 4), (_zeros(1, 1, 5), _zeros(1, 1, 5)))),
    ("wrong_hx_batch", lambda m: m(_x(3, 2, 4), (_zeros(1, 3, 5), _zeros(1, 2, 5)))),
    ("wrong_hx_layers", lambda m: m(_x(3, 2, 4), (_zeros(2, 2, 5), _zeros(1, 2, 5)))),
    ("wrong_hx_features", lambda m: m(_x(3, 2, 4), (_zeros(1, 2, 4), _zeros(1, 2, 5)))),
    ("wrong_cx_size", lambda m: m(_x(3, 2, 4), (_zeros(1, 2, 5), _zeros(1, 2, 6)))),
    ("wrong_cx_unbatched", lambda m: m(_x(3, 4), (_zeros(1, 5), _zeros(1, 6)))),
    ("input_float64_weights_float32", lambda m: m(_x(3, 2, 4, dtype=torch.float64))),
    ("input_int_weights_float32", lambda m: m(torch.ones(3, 2, 4, dtype=torch.int32))),
    ("seq_len_0", lambda m: m(_x(0, 2, 4))),
    ("seq_len_0_unbatched", lambda m: m(_x(0, 4))),
]


@pytest.mark.parametrize("call", [c for _, c in FORWARD_ERRORS], ids=[n for n, _ in FORWARD_ERRORS])
def test_forward_errors_match_nn_lstm(call):
    ref, ours = nn.LSTM(4, 5), fastlstm.LSTM(4, 5)
    same_error(lambda: call(ref), lambda: call(ours))


def test_seq_len_0_error_text():
    with pytest.raises(RuntimeError, match="^Expected sequence length to be larger than 0 in RNN$"):
        fastlstm.LSTM(4, 5, batch_first=True)(_x(2, 0, 4))


def test_forward_errors_with_projection_and_batch_first_match():
    ref, ours = _pair({"proj_size": 2, "num_layers": 2, "batch_first": True, "bidirectional": True},
                      dtype=torch.float32)
    for call in (lambda m: m(_x(2, 3, 4), (_zeros(4, 3, 2), _zeros(4, 2, 5))),  # batch is dim 0
                 lambda m: m(_x(2, 3, 4), (_zeros(4, 2, 5), _zeros(4, 2, 5))),  # hx of hidden_size, not proj
                 lambda m: m(_x(2, 3, 4), (_zeros(4, 2, 2), _zeros(4, 2, 2)))):  # cx of proj_size
        same_error(lambda: call(ref), lambda: call(ours))


@pytest.mark.parametrize("which", [0, 1], ids=["hx", "cx"])
def test_hidden_dtype_mismatch_names_the_tensor_and_dtypes(which):
    state = [_zeros(1, 2, 5), _zeros(1, 2, 5)]
    state[which] = state[which].double()
    expected = error_of(lambda: nn.LSTM(4, 5)(_x(3, 2, 4), tuple(state)))
    assert expected is not None  # nn.LSTM rejects it too (with 'get_mkldnn_dtype: unsupported data type')
    with pytest.raises(type(expected)) as info:
        fastlstm.LSTM(4, 5)(_x(3, 2, 4), tuple(state))
    message = str(info.value)
    assert ("hx", "cx")[which] in message
    assert "torch.float64" in message and "torch.float32" in message


# ---------------------------------------------------------------- shapes, hx, repr


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=_cfg_id)
def test_batch_size_zero(cfg):
    ref, ours = _pair(cfg)
    shape = (0, 3, 4) if cfg.get("batch_first") else (3, 0, 4)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    expected, actual = _flat(ref(x)), _flat(ours(x))
    assert [t.shape for t in actual] == [t.shape for t in expected]
    assert [t.dtype for t in actual] == [t.dtype for t in expected]
    grads = _grads(actual, [x] + list(ours.parameters()))
    assert grads[0].shape == x.shape
    assert all(g is not None and (g == 0).all() for g in grads[1:])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("given", [False, True])
def test_unbatched_input(batch_first, given):
    ref, ours = _pair({"num_layers": 2, "bidirectional": True, "proj_size": 3, "batch_first": batch_first})
    x = torch.randn(6, 4, dtype=F64)
    hx = (torch.randn(4, 3, dtype=F64), torch.randn(4, 5, dtype=F64)) if given else None
    expected, actual = _flat(ref(x, hx)), _flat(ours(x, hx))
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert a.shape == e.shape, name
        assert_close(a, e, F64, name)
    assert actual[0].shape == (6, 6) and actual[1].shape == (4, 3) and actual[2].shape == (4, 5)


def test_zero_hx_is_the_same_as_no_hx():
    ours = fastlstm.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3, dtype=F64)
    x = torch.randn(6, 2, 4, dtype=F64)
    zeros = (torch.zeros(4, 2, 3, dtype=F64), torch.zeros(4, 2, 5, dtype=F64))
    for a, b in zip(_flat(ours(x)), _flat(ours(x, zeros))):
        assert_close(a, b, F64, "zero hx")
    h0 = (torch.randn(4, 2, 3, dtype=F64), torch.randn(4, 2, 5, dtype=F64))
    assert rel_error(_flat(ours(x, h0))[0], _flat(ours(x))[0]) > 1e-3  # hx is actually used


def test_flatten_parameters_is_a_no_op():
    ours = fastlstm.LSTM(4, 5, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(5, 2, 4, dtype=F64)
    before = [t.clone() for t in _flat(ours(x))]
    params = [(p, p.data_ptr(), p.clone()) for p in ours.parameters()]
    assert ours.flatten_parameters() is None
    assert [p for p in ours.parameters()] == [p for p, _, _ in params]
    assert all(p.data_ptr() == ptr and torch.equal(p, v) for p, ptr, v in params)
    for a, b in zip(_flat(ours(x)), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_repr_matches_nn_lstm_for_default_options(cfg):
    ref, ours = _pair(cfg)
    assert repr(ours) == repr(ref)
    assert ours.extra_repr() == ref.extra_repr()


def test_repr_adds_non_default_kernel_options():
    ref = nn.LSTM(4, 5, num_layers=2)
    ours = fastlstm.LSTM(4, 5, num_layers=2, tbptt_chunk=3, backend="stepwise")
    text = ours.extra_repr()
    assert text.startswith(ref.extra_repr())
    assert "tbptt_chunk=3" in text and "backend='stepwise'" in text


# ---------------------------------------------------------------- PackedSequence


@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_contract(batch_first):
    ref, ours = _pair({"num_layers": 2, "bidirectional": True, "proj_size": 3, "batch_first": batch_first})
    T, B = 5, 4
    lengths = torch.tensor([2, 5, 3, 1])  # unsorted, longest not first
    x = torch.randn(*((B, T, 4) if batch_first else (T, B, 4)), dtype=F64)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    hx = (torch.randn(4, B, 3, dtype=F64), torch.randn(4, B, 5, dtype=F64))
    ref_out, (ref_h, ref_c) = ref(packed, hx)
    out, (h, c) = ours(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert torch.equal(out.sorted_indices, ref_out.sorted_indices)
    assert torch.equal(out.unsorted_indices, ref_out.unsorted_indices)
    assert out.data.shape == ref_out.data.shape
    assert_close(out.data, ref_out.data, F64, "packed output")
    assert_close(h, ref_h, F64, "h_n")
    assert_close(c, ref_c, F64, "c_n")
    # h_n is in the caller's batch order: the last layer's forward direction ends at each row's last
    # valid step, which for row b is output[lengths[b] - 1, b].
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=False)
    for b in range(B):
        assert torch.equal(h[2, b], padded[lengths[b] - 1, b, :3])
        assert torch.equal(h[3, b], padded[0, b, 3:])  # the reverse direction ends at t = 0


def test_packed_sequence_without_hx_and_sorted():
    ref, ours = _pair({"num_layers": 1})
    x = torch.randn(4, 3, 4, dtype=F64)
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 1]))
    assert packed.sorted_indices is None
    ref_out, (ref_h, _) = ref(packed)
    out, (h, _) = ours(packed)
    assert out.sorted_indices is None and out.unsorted_indices is None
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert_close(out.data, ref_out.data, F64, "output")
    assert_close(h, ref_h, F64, "h_n")


# ---------------------------------------------------------------- weights are read on every call


def test_assigning_a_new_parameter_is_used_by_the_next_call():
    ref, ours = _pair({"num_layers": 2})
    x = torch.randn(5, 2, 4, dtype=F64)
    first = _flat(ours(x))[0].detach()
    new = nn.Parameter(torch.randn(20, 5, dtype=F64))
    old = ours.weight_hh_l0
    ref.weight_hh_l0 = nn.Parameter(new.detach().clone())
    ours.weight_hh_l0 = new
    assert ours.weight_hh_l0 is new and dict(ours.named_parameters())["weight_hh_l0"] is new
    out_ref, out = _flat(ref(x)), _flat(ours(x))
    assert rel_error(out[0], first) > 1e-3
    for a, e in zip(out, out_ref):
        assert_close(a, e, F64, "after assignment")
    g_ref, g_new, g_old = _grads(out_ref, [ref.weight_hh_l0])[0], *_grads(out, [new, old], seed=3)
    assert g_old is None
    assert_close(g_new, g_ref, F64, "grad of the new parameter")


def test_functional_call_uses_the_given_parameters():
    ref, ours = _pair({"num_layers": 2, "bidirectional": True, "proj_size": 3})
    x = torch.randn(5, 2, 4, dtype=F64)
    own = _flat(ours(x))[0].detach()
    new = {n: torch.randn(p.shape, dtype=F64, requires_grad=True) for n, p in ref.named_parameters()}
    out_ref = _flat(torch.func.functional_call(ref, new, (x,)))
    out = _flat(torch.func.functional_call(ours, new, (x,)))
    for a, e in zip(out, out_ref):
        assert_close(a, e, F64, "functional_call")
    assert rel_error(out[0], own) > 1e-3
    for n, a, e in zip(new, _grads(out, list(new.values())), _grads(out_ref, list(new.values()))):
        assert_close(a, e, F64, f"grad {n}")
    # The module's own parameters are back in place afterwards.
    assert torch.equal(_flat(ours(x))[0], own)


def test_weight_norm_parametrization():
    from torch.nn.utils.parametrizations import weight_norm

    ref, ours = _pair({"num_layers": 2})
    ref = weight_norm(ref, "weight_hh_l0")
    ours = weight_norm(ours, "weight_hh_l0")
    ref_names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == ref_names
    assert "parametrizations.weight_hh_l0.original0" in ref_names
    x = torch.randn(5, 2, 4, dtype=F64)
    out_ref, out = _flat(ref(x)), _flat(ours(x))
    for a, e in zip(out, out_ref):
        assert_close(a, e, F64, "weight_norm output")
    g_ref = _grads(out_ref, list(ref.parameters()))
    g = _grads(out, list(ours.parameters()))
    for n, a, e in zip(ref_names, g, g_ref):
        assert_close(a, e, F64, f"grad {n}")
    # The parametrization is re-evaluated on each call: scaling g scales the effective weight.
    with torch.no_grad():
        ours.parametrizations.weight_hh_l0.original0.mul_(2)
        ref.parametrizations.weight_hh_l0.original0.mul_(2)
    assert rel_error(_flat(ours(x))[0], out[0]) > 1e-3
    assert_close(_flat(ours(x))[0], _flat(ref(x))[0], F64, "after changing g")


def test_tied_weights_between_layers():
    ref, ours = _pair({"num_layers": 2})
    for m in (ref, ours):
        m.weight_hh_l1 = m.weight_hh_l0
    assert ours.weight_hh_l1 is ours.weight_hh_l0
    assert len(list(ours.parameters())) == len(list(ref.parameters())) == 7
    x = torch.randn(5, 2, 4, dtype=F64)
    out_ref, out = _flat(ref(x)), _flat(ours(x))
    for a, e in zip(out, out_ref):
        assert_close(a, e, F64, "tied output")
    for n, a, e in zip([n for n, _ in ref.named_parameters()], _grads(out, list(ours.parameters())),
                       _grads(out_ref, list(ref.parameters()))):
        assert_close(a, e, F64, f"grad {n}")


# ---------------------------------------------------------------- state_dict, pickling


@pytest.mark.parametrize("cfg", CONFIGS[1:4], ids=_cfg_id)
def test_state_dict_round_trips(cfg):
    torch.manual_seed(2)
    ref = nn.LSTM(4, 5, dtype=F64, **cfg).eval()
    ours = fastlstm.LSTM(4, 5, dtype=F64, **cfg).eval()  # different initial values
    assert not torch.equal(ours.weight_ih_l0, ref.weight_ih_l0)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(*((2, 5, 4) if cfg.get("batch_first") else (5, 2, 4)), dtype=F64)
    for a, e in zip(_flat(ours(x)), _flat(ref(x))):
        assert_close(a, e, F64, "nn -> fast")
    back = nn.LSTM(4, 5, dtype=F64, **cfg).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    for a, e in zip(_flat(back(x)), _flat(ref(x))):
        assert torch.equal(a, e)


def _norm_recording_model():
    model = fastlstm.LSTM(4, 5, num_layers=2, bidirectional=True, dtype=F64, record_grad_norms=True,
                          tbptt_chunk=3)
    x = torch.randn(5, 2, 4, dtype=F64)
    y, (h, c) = model(x)
    (y.square().sum() + h.sum()).backward()
    assert model.grad_norms is not None
    return model, x


def _check_equivalent(loaded, model, x):
    assert type(loaded) is fastlstm.LSTM
    assert loaded.options == model.options
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    for p, q in zip(loaded.parameters(), model.parameters()):
        assert p is not q and torch.equal(p, q)
    for a, e in zip(_flat(loaded(x)), _flat(model(x))):
        assert torch.equal(a, e)
    # The copy trains and records norms on its own.
    y, _ = loaded(x)
    y.sum().backward()
    assert loaded.grad_norms is not None and loaded.grad_norms.h.shape == (2, 2, 5)


def test_pickle_round_trip():
    model, x = _norm_recording_model()
    _check_equivalent(pickle.loads(pickle.dumps(model)), model, x)


def test_torch_save_load_round_trip():
    model, x = _norm_recording_model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _check_equivalent(torch.load(buffer, weights_only=False), model, x)


def test_deepcopy():
    model, x = _norm_recording_model()
    _check_equivalent(copy.deepcopy(model), model, x)


# ---------------------------------------------------------------- dropout


def test_dropout_eval_mode_matches_nn_lstm():
    ref, ours = _pair({"num_layers": 3, "dropout": 0.5, "bidirectional": True})
    ref.eval()
    ours.eval()
    x = torch.randn(5, 2, 4, dtype=F64)
    for a, e in zip(_flat(ours(x)), _flat(ref(x))):
        assert_close(a, e, F64, "eval with dropout")


def test_dropout_training_is_stochastic_and_seeded():
    ours = fastlstm.LSTM(4, 5, num_layers=2, dropout=0.5, dtype=F64)
    ours.train()
    x = torch.randn(5, 3, 4, dtype=F64)
    a, b = _flat(ours(x))[0], _flat(ours(x))[0]
    assert not torch.equal(a, b)
    torch.manual_seed(9)
    c = _flat(ours(x))
    torch.manual_seed(9)
    d = _flat(ours(x))
    for u, v in zip(c, d):
        assert torch.equal(u, v)
    ours.eval()
    e = _flat(ours(x))[0]
    assert not torch.equal(c[0], e)
    assert torch.equal(e, _flat(ours(x))[0])


def test_no_dropout_after_the_last_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastlstm.LSTM(4, 5, num_layers=1, dropout=0.5, dtype=F64)
    x = torch.randn(5, 3, 4, dtype=F64)
    ours.train()
    trained = _flat(ours(x))
    ours.eval()
    for a, b in zip(trained, _flat(ours(x))):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- kernel options


@pytest.mark.parametrize("kwargs, error, name", [
    ({"backend": "fast"}, ValueError, "backend"),
    ({"backend": None}, ValueError, "backend"),
    ({"tbptt_chunk": 0}, ValueError, "tbptt_chunk"),
    ({"tbptt_chunk": 1.5}, TypeError, "tbptt_chunk"),
    ({"tbptt_chunk": True}, TypeError, "tbptt_chunk"),
    ({"grad_clip": -1}, ValueError, "grad_clip"),
    ({"grad_clip": 0}, ValueError, "grad_clip"),
    ({"grad_clip": float("nan")}, ValueError, "grad_clip"),
    ({"grad_clip": float("inf")}, ValueError, "grad_clip"),
    ({"grad_clip": "1"}, TypeError, "grad_clip"),
    ({"grad_clip_mode": "norm"}, ValueError, "grad_clip_mode"),
    ({"record_grad_norms": "yes"}, TypeError, "record_grad_norms"),
    ({"checkpoint_every": 0}, ValueError, "checkpoint_every"),
    ({"checkpoint_every": 2.0}, TypeError, "checkpoint_every"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_invalid_kernel_options_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        fastlstm.LSTM(4, 5, **kwargs)
    with pytest.raises(error, match=name):  # the same check for a per-call override
        fastlstm.LSTM(4, 5)(torch.randn(3, 2, 4), **kwargs)


def test_valid_kernel_options_are_stored():
    ours = fastlstm.LSTM(4, 5, backend="stepwise", tbptt_chunk=4, grad_clip=0.5, grad_clip_mode="gates",
                         record_grad_norms=True, checkpoint_every=2)
    assert ours.options == KernelOptions("stepwise", 4, 0.5, "gates", True, 2)
    assert ours.tbptt_chunk == 4 and ours.grad_clip_mode == "gates"


def test_per_call_override_applies_to_that_call_only():
    ours = fastlstm.LSTM(4, 5, num_layers=2, dtype=F64)
    chunked = fastlstm.LSTM(4, 5, num_layers=2, dtype=F64, tbptt_chunk=2)
    chunked.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 4, dtype=F64, requires_grad=True)
    params = [x] + list(ours.parameters())
    out_override = _flat(ours(x, tbptt_chunk=2))
    assert ours.options.tbptt_chunk is None
    out_full = _flat(ours(x))
    out_chunked = _flat(chunked(x))
    for a, b, c in zip(out_override, out_full, out_chunked):  # the forward is not affected
        assert_close(a, b, F64, "forward")
        assert_close(a, c, F64, "forward")
    g_override = _grads(out_override, params)
    g_full = _grads(out_full, params)
    g_chunked = _grads(out_chunked, [x] + list(chunked.parameters()))
    for a, c in zip(g_override, g_chunked):
        assert_close(a, c, F64, "override == constructed with tbptt_chunk")
    assert rel_error(g_override[0], g_full[0]) > 1e-6  # truncation really happened
    assert ours.options == KernelOptions()


def test_setting_an_option_attribute_updates_options():
    ours = fastlstm.LSTM(4, 5)
    ours.tbptt_chunk = 3
    assert ours.options.tbptt_chunk == 3 and ours.tbptt_chunk == 3
    assert "tbptt_chunk" not in ours.__dict__
    ours.grad_clip = 1.5
    assert ours.options == KernelOptions(tbptt_chunk=3, grad_clip=1.5)
    with pytest.raises(ValueError, match="tbptt_chunk"):
        ours.tbptt_chunk = 0
    assert ours.options.tbptt_chunk == 3  # a rejected value leaves the options as they were
    ours.tbptt_chunk = None
    assert ours.options.tbptt_chunk is None


@pytest.mark.parametrize("backend", ["persistent", "cluster"])
@pytest.mark.parametrize("where", ["constructor", "per_call"])
def test_cuda_only_backend_on_cpu_mentions_cuda(where, backend):
    x = torch.randn(3, 2, 4)
    with pytest.raises((RuntimeError, ValueError)) as info:
        if where == "constructor":
            fastlstm.LSTM(4, 5, backend=backend)(x)
        else:
            fastlstm.LSTM(4, 5)(x, backend=backend)
    assert "CUDA" in str(info.value)
    assert "fused_recurrence" not in str(info.value)


def test_explain_on_cpu():
    ours = fastlstm.LSTM(4, 5)
    x = torch.randn(3, 2, 4)
    text = fastlstm.explain(ours, x)
    assert isinstance(text, str) and text and "cpu" in text
    packed = pack_padded_sequence(x, torch.tensor([3, 2]))
    assert "cpu" in fastlstm.explain(ours, packed)
    assert "CUDA" in fastlstm.explain(ours, x, backend="persistent")


# ---------------------------------------------------------------- autocast


def _autocast_reference(ref: nn.LSTM, x: torch.Tensor) -> tuple[tuple, tuple]:
    """nn.LSTM's outputs and gradients as CPU bfloat16 autocast defines them, on any CPU.

    Autocast casts the input and every weight of ``lstm`` to bfloat16 and returns bfloat16 outputs.
    torch runs that through oneDNN, which computes from the bfloat16 operands in float32 but has no
    bfloat16 LSTM on CPUs without AVX-512 (it raises there). This is the same definition computed
    in float64: the bfloat16-rounded input and weights, outputs rounded to bfloat16; the gradients
    are those of the rounded copies (autocast's cast passes the gradient through), as float32.
    """
    exact = copy.deepcopy(ref).double()
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.bfloat16())
    leaf = x.bfloat16().double().requires_grad_()
    out = _flat(exact(leaf))
    grads = _grads(out, [leaf] + list(exact.parameters()))
    return tuple(t.bfloat16() for t in out), tuple(g.float() for g in grads)


def test_autocast_bfloat16_matches_nn_lstm():
    ref, ours = _pair({"num_layers": 2, "bidirectional": True}, dtype=torch.float32)
    x = torch.randn(6, 3, 4)
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _flat(ours(leaf))
    grads = _grads(tuple(t.float() for t in out), [leaf] + list(ours.parameters()))
    ref_out, ref_grads = _autocast_reference(ref, x)
    for a, e in zip(out, ref_out):
        assert a.dtype == torch.bfloat16
        assert_close(a.float(), e.float(), torch.bfloat16, "autocast output")
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for n, a, e in zip(names, grads, ref_grads):
        assert a.dtype == torch.float32, n
        assert_close(a, e, torch.bfloat16, f"autocast grad {n}")


def test_autocast_leaves_float64_alone():
    ref, ours = _pair({})
    x = torch.randn(4, 2, 4, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = _flat(ref(x)), _flat(ours(x))
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == F64
        assert_close(a, e, F64, "float64 under autocast")


def test_large_cpu_buffers_are_reused_and_can_be_released():
    """CPU activations of 1 MiB and more come back to fastlstm's cache when their tensors die."""
    fastlstm.empty_cache()
    assert fastlstm.cached_bytes() == 0
    model = fastlstm.LSTM(8, 64)
    x = torch.randn(512, 8, 8)  # gates: 512 * 8 * 256 floats = 4 MiB
    y, _ = model(x)
    y.sum().backward()
    del y
    held = fastlstm.cached_bytes()
    assert held >= 4 << 20
    y, _ = model(x)  # served from the cache: nothing new is kept
    y.sum().backward()
    del y
    assert fastlstm.cached_bytes() == held
    fastlstm.empty_cache()
    assert fastlstm.cached_bytes() == 0
