"""In-kernel gradient clipping (``grad_clip``, ``grad_clip_mode``) against an unrolled reference.

The reference (DESIGN.md section 5) is an unrolled cell loop in float64 with the module's own
weights (bias = b_ih, b_hh), in which an identity op with a clamping backward (``ClampGrad``:
forward returns its input, backward returns grad.clamp(-c, c)) sits

* mode ``"recurrent"``: on the state (h, c) passed into each step, including the initial state,
  but not on the copy of h that goes to the layer output (nor on h_n, c_n: the last step receives
  dL/dh_n, dL/dc_n unchanged);
* mode ``"gates"``: on the gate pre-activations G_t = x W_ih^T + b_ih + h W_hh^T + b_hh, with the
  cell written out explicitly (gate order i, f, g, o).

With ``tbptt_chunk=k`` the state passed into step s (counted in the direction's processing
order) is detached instead when s is a multiple of k: the cut takes precedence over the clamp.
The reverse direction is the same loop over the time-reversed sequence; layers are composed;
packed batches run one sequence at a time (each sequence's steps counted from its own start).

``unrolled_stack`` is also the reference of tests/test_grad_norms.py: it can record h_t (the
cell's hidden output, before any projection) and c_t with ``retain_grad``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlstm
from reference import assert_close, rel_error
from long_sequence_reference import (F64, LAYER_CONFIG_IDS, LAYER_CONFIGS, assert_all_close, device_results, fast_run,
                                     make_data, make_model, reference_run, results, skip_unless_supported,
                                     unrolled_stack)

def check_against_unrolled(model: fastlstm.LSTM, T: int, B: int, packed: bool = False, explicit: bool = False,
                           data=None, device: str = "cpu", **call) -> dict:
    """Compares outputs and every gradient of ``model`` (float64) with the clamped reference."""
    options = model.options.updated(**call)
    data = x, h0, c0, lengths = data or make_data(model, T, B, packed)
    params = dict(model.named_parameters())
    expected = results(lambda: reference_run(unrolled_stack, x, h0, c0, lengths, params=params,
                                             num_layers=model.num_layers, bidirectional=model.bidirectional,
                                             clip=options.grad_clip, mode=options.grad_clip_mode,
                                             k=options.tbptt_chunk, explicit=explicit),
                       model, x, h0, c0, reference=True)
    actual = device_results(model, data, device, **call)
    assert_all_close(actual, expected, f"{model!r} T={T} packed={packed} device={device} call={call}")
    return actual


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("explicit", [False, True], ids=["LSTMCell", "explicit-cell"])
def test_reference_without_clipping_is_torch_lstm(explicit):
    model = make_model(2, True)
    x, h0, c0, _ = make_data(model, 7, 3, False)
    ref = nn.LSTM(3, 5, 2, bidirectional=True, dtype=F64)
    ref.load_state_dict(model.state_dict())
    expected = results(lambda: fast_run(ref, x, h0, c0, None), ref, x, h0, c0, reference=True)
    params = dict(model.named_parameters())
    actual = results(lambda: unrolled_stack(x, h0, c0, params, 2, True, explicit=explicit), model, x, h0, c0,
                     reference=True)
    assert_all_close(actual, expected, "unrolled reference")


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_clip_is_active_in_these_tests(mode):
    # Guards against a vacuous comparison: at c = 0.05 the clamp changes the gradients.
    model = make_model(1, False)
    x, h0, c0, _ = make_data(model, 8, 3, False)
    params = dict(model.named_parameters())
    free = results(lambda: unrolled_stack(x, h0, c0, params, 1, False, explicit=True), model, x, h0, c0,
                   reference=True)
    clipped = results(lambda: unrolled_stack(x, h0, c0, params, 1, False, clip=0.05, mode=mode), model, x, h0, c0,
                      reference=True)
    assert rel_error(clipped["grad weight_hh_l0"], free["grad weight_hh_l0"]) > 1e-2


# ---------------------------------------------------------------------------------------------
# fastlstm against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,bidirectional", LAYER_CONFIGS, ids=LAYER_CONFIG_IDS)
@pytest.mark.parametrize("clip", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_clipping_matches_reference(mode, clip, layers, bidirectional):
    model = make_model(layers, bidirectional, grad_clip=clip, grad_clip_mode=mode)
    check_against_unrolled(model, T=8, B=3)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_tbptt_and_clipping(mode, k):
    # The cut takes precedence over the clamp (recurrent mode); gates mode clamps dG_t, cut or not.
    model = make_model(2, True, grad_clip=0.05, grad_clip_mode=mode, tbptt_chunk=k)
    check_against_unrolled(model, T=8, B=3)


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
@pytest.mark.parametrize("k", [None, 2])
def test_clipping_packed(k, mode):
    model = make_model(2, True, grad_clip=0.05, grad_clip_mode=mode, tbptt_chunk=k)
    check_against_unrolled(model, T=8, B=4, packed=True)


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_clipping_with_projection(packed, mode):
    model = make_model(2, True, proj_size=3, H=6, grad_clip=0.05, grad_clip_mode=mode)
    check_against_unrolled(model, T=7, B=3, packed=packed)


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_clipping_with_checkpointing(mode):
    model = make_model(2, True, grad_clip=0.05, grad_clip_mode=mode, tbptt_chunk=3, checkpoint_every=2)
    check_against_unrolled(model, T=9, B=3)


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_clipping_several_unit_blocks(mode):
    model = make_model(1, True, I=4, H=19, grad_clip=0.02, grad_clip_mode=mode)
    check_against_unrolled(model, T=9, B=5)


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_forward_is_bit_identical_with_and_without_clipping(mode):
    model = make_model(2, True, proj_size=2)
    x = torch.randn(9, 3, 3, dtype=F64)
    free = model(x)
    for call in ({"grad_clip": 0.01, "grad_clip_mode": mode}, {"grad_clip": 0.01, "grad_clip_mode": mode,
                                                               "tbptt_chunk": 2}):
        clipped = model(x, **call)
        assert torch.equal(free[0], clipped[0])
        assert torch.equal(free[1][0], clipped[1][0]) and torch.equal(free[1][1], clipped[1][1])


def test_grad_clip_is_a_runtime_value():
    model = make_model(1, True, grad_clip=0.5)
    data = make_data(model, 8, 3, False)
    a = check_against_unrolled(model, 8, 3, data=data)
    model.grad_clip = 0.02
    b = check_against_unrolled(model, 8, 3, data=data)
    assert rel_error(a["grad weight_hh_l0"], b["grad weight_hh_l0"]) > 1e-3
    model.grad_clip = None
    c = check_against_unrolled(model, 8, 3, data=data)
    assert rel_error(b["grad weight_hh_l0"], c["grad weight_hh_l0"]) > 1e-3
    # per-call value, without touching the module
    d = check_against_unrolled(model, 8, 3, data=data, grad_clip=0.02)
    for key in b:
        assert torch.equal(b[key], d[key]), key
    assert model.grad_clip is None


def test_invalid_clip_arguments():
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_clip"):
            make_model(grad_clip=bad)
    with pytest.raises(TypeError, match="grad_clip"):
        make_model(grad_clip="1")
    with pytest.raises(ValueError, match="grad_clip_mode"):
        make_model(grad_clip=1.0, grad_clip_mode="global")


# ---------------------------------------------------------------------------------------------
# Exploding gradients
# ---------------------------------------------------------------------------------------------

def exploding_model(T_hidden=8) -> fastlstm.LSTM:
    """A layer whose backward multiplies dL/dh by 2 per step: its state stays exactly zero.

    W_ih = 0; biases put i, o at sigmoid(8) ~ 1 and f at sigmoid(-8) ~ 0; W_hh is 2 I on the g rows
    and 0 elsewhere. With h0 = c0 = 0 the forward keeps h_t = c_t = 0, and the backward carry is
    dL/dh_{t-1} ~ 2 dL/dh_t: after 200 steps 2^200 ~ 1.6e60 overflows float32 (max 3.4e38).
    (dL/dx = dG W_ih is then exactly 0; the weight, bias and h0 gradients carry the explosion.)
    """
    H = T_hidden
    model = fastlstm.LSTM(3, H, dtype=F64)
    with torch.no_grad():
        model.weight_ih_l0.zero_()
        model.weight_hh_l0.zero_()
        model.weight_hh_l0[2 * H:3 * H] = 2.0 * torch.eye(H, dtype=F64)
        bias = torch.zeros(4 * H, dtype=F64)
        bias[:H], bias[H:2 * H], bias[3 * H:] = 8.0, -8.0, 8.0
        model.bias_ih_l0.copy_(bias)
        model.bias_hh_l0.zero_()
    return model


@pytest.mark.parametrize("mode,clip", [("recurrent", 1.0), ("gates", 0.5)])
def test_exploding_gradients_are_tamed(mode, clip):
    T, B = 200, 2
    model64 = exploding_model()
    x = torch.randn(T, B, 3, dtype=F64)
    h0 = torch.zeros(1, B, 8, dtype=F64, requires_grad=True)
    c0 = torch.zeros(1, B, 8, dtype=F64, requires_grad=True)
    x.requires_grad_()
    params = dict(model64.named_parameters())
    # The float64 reference without clipping confirms the regime: the gradients do explode.
    free = results(lambda: unrolled_stack(x, h0, c0, params, 1, False), model64, x, h0, c0, reference=True)
    assert free["grad bias_ih_l0"].abs().max() > 1e45
    expected = results(lambda: unrolled_stack(x, h0, c0, params, 1, False, clip=clip, mode=mode), model64, x, h0, c0,
                       reference=True)

    unclipped = device_results(model64, (x, h0, c0, None), dtype=torch.float32)
    for key in ("grad bias_ih_l0", "grad weight_ih_l0", "grad h0"):
        assert not torch.isfinite(unclipped[key]).all(), key

    clipped = device_results(model64, (x, h0, c0, None), dtype=torch.float32, grad_clip=clip, grad_clip_mode=mode)
    for key in expected:
        assert torch.isfinite(clipped[key]).all(), key
        assert_close(clipped[key], expected[key], torch.float32, f"{key} ({mode} clip={clip})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["recurrent", "gates"])
def test_half_types(mode, dtype):
    # fp32 accumulation and carries in the kernel; the reference runs in float64 on the same
    # (rounded) inputs and weights. Tolerances are tests/reference.py's for these types.
    model = make_model(2, True, grad_clip=0.05, grad_clip_mode=mode, tbptt_chunk=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).double())
    x, h0, c0, lengths = (t.detach().to(dtype).double().requires_grad_() if t.is_floating_point() else t
                          for t in make_data(model, 8, 3, True))
    params = dict(model.named_parameters())
    expected = results(lambda: reference_run(unrolled_stack, x, h0, c0, lengths, params=params, num_layers=2,
                                             bidirectional=True, clip=0.05, mode=mode, k=3), model, x, h0, c0,
                       reference=True)
    actual = device_results(model, (x, h0, c0, lengths), dtype=dtype)
    for key in expected:
        assert actual[key].dtype == dtype
        assert_close(actual[key].double(), expected[key], dtype, f"{key} ({dtype}, {mode})")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("mode", ["recurrent", "gates"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_clipping_cuda(packed, mode, backend):
    model = make_model(2, True, I=4, H=32, grad_clip=0.02, grad_clip_mode=mode)
    skip_unless_supported(backend, model, 3)
    check_against_unrolled(model, T=9, B=3, packed=packed, device="cuda", backend=backend)
    check_against_unrolled(model, T=9, B=3, packed=packed, device="cuda", backend=backend, tbptt_chunk=2,
                           checkpoint_every=4)
