"""In-kernel truncated BPTT (``tbptt_chunk=k``) against an independent reference.

The reference is torch.nn.LSTM itself, run over the sequence in chunks of k steps with the state
detached between chunks (DESIGN.md section 4). For a bidirectional layer the documented semantics
are per direction: the forward direction is that chunked forward LSTM; the reverse direction
processes the time-reversed sequence, so its chunks count from its own first processed step (the
last time step): flip time, run the chunked forward LSTM with the ``_reverse`` weights, flip back.
Layers are composed one by one. For packed input every sequence is its own reference run (its
chunks count from its own first element, and for the reverse direction from its own last one).

Everything is float64; every gradient (input, h0, c0, all parameters) and every output is compared
with a relative tolerance of 1e-10 of the reference tensor's largest magnitude.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlstm
from long_sequence_reference import (F64, LAYER_CONFIG_IDS, LAYER_CONFIGS, assert_all_close, chunked_stack,
                                     device_results, fast_run, loss_of, make_data, make_model, reference_run,
                                     results, skip_unless_supported)
from reference import assert_close


def check_against_chunked(model: fastlstm.LSTM, T: int, B: int, packed: bool = False, device: str = "cpu",
                          **call) -> dict:
    """Compares outputs and every gradient of ``model`` (float64) with nn.LSTM run in chunks of its
    tbptt_chunk (the per-call one when ``call`` overrides it), the state detached between chunks."""
    k = model.options.updated(**call).tbptt_chunk
    data = x, h0, c0, lengths = make_data(model, T, B, packed)
    params = dict(model.named_parameters())
    expected = results(lambda: reference_run(chunked_stack, x, h0, c0, lengths, params=params,
                                             num_layers=model.num_layers, bidirectional=model.bidirectional, k=k),
                       model, x, h0, c0, reference=True)
    actual = device_results(model, data, device, **call)
    assert_all_close(actual, expected, f"{model!r} k={k} T={T} packed={packed} device={device} call={call}")
    return actual


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize("layers,bidirectional", LAYER_CONFIGS, ids=LAYER_CONFIG_IDS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 10, 20])
def test_tbptt_equals_detached_chunks(k, layers, bidirectional):
    model = make_model(layers, bidirectional, tbptt_chunk=k)
    check_against_chunked(model, T=10, B=3)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)], ids=["1layer", "2layers-bi"])
def test_tbptt_packed_counts_per_sequence(k, layers, bidirectional):
    # Lengths differ per sequence: the reverse direction's chunks start at each sequence's own last
    # element, so the cut positions differ row by row.
    model = make_model(layers, bidirectional, tbptt_chunk=k)
    check_against_chunked(model, T=9, B=4, packed=True)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_tbptt_with_projection(k, packed):
    model = make_model(2, True, proj_size=3, H=6, tbptt_chunk=k)
    check_against_chunked(model, T=8, B=3, packed=packed)


def test_tbptt_several_unit_blocks():
    # H = 19 spans several vector blocks of the fused CPU recurrence (threads own unit slices).
    model = make_model(1, True, I=4, H=19, tbptt_chunk=4)
    check_against_chunked(model, T=11, B=5)


def test_chunk_of_T_or_more_is_full_bptt():
    model = make_model(2, True, tbptt_chunk=10)
    x, h0, c0, _ = make_data(model, 10, 3, False)
    ref = nn.LSTM(3, 5, 2, bidirectional=True, dtype=F64)
    ref.load_state_dict(model.state_dict())
    expected = results(lambda: fast_run(ref, x, h0, c0, None), ref, x, h0, c0, reference=True)
    for k in (10, 11, 1000, None):
        actual = results(lambda: fast_run(model, x, h0, c0, None, tbptt_chunk=k), model, x, h0, c0)
        assert_all_close(actual, expected, f"tbptt_chunk={k}")


def test_tbptt_changes_the_gradient():
    # Guards the reference itself: truncation must make a difference for these sizes.
    model = make_model(1, False)
    x, h0, c0, _ = make_data(model, 10, 3, False)
    full = results(lambda: fast_run(model, x, h0, c0, None), model, x, h0, c0)
    cut = results(lambda: fast_run(model, x, h0, c0, None, tbptt_chunk=3), model, x, h0, c0)
    assert torch.equal(full["output"], cut["output"])  # forward untouched
    assert (full["grad weight_hh_l0"] - cut["grad weight_hh_l0"]).abs().max() > 1e-3
    assert (full["grad h0"] - cut["grad h0"]).abs().max() > 1e-3


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_per_call_override_equals_module_option(packed):
    with_option = make_model(2, True, tbptt_chunk=3)
    without = make_model(2, True)
    without.load_state_dict(with_option.state_dict())
    x, h0, c0, lengths = make_data(with_option, 10, 3, packed)
    a = results(lambda: fast_run(with_option, x, h0, c0, lengths), with_option, x, h0, c0)
    b = results(lambda: fast_run(without, x, h0, c0, lengths, tbptt_chunk=3), without, x, h0, c0)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ... and the override wins over the module option in both directions.
    c = results(lambda: fast_run(with_option, x, h0, c0, lengths, tbptt_chunk=None), with_option, x, h0, c0)
    d = results(lambda: fast_run(without, x, h0, c0, lengths), without, x, h0, c0)
    for key in c:
        assert torch.equal(c[key], d[key]), key
    check_against_chunked(without, T=10, B=3, packed=packed, tbptt_chunk=4)
    assert without.tbptt_chunk is None  # the override did not stick


LOSSES = {
    "output only": lambda y, h, c: loss_of(y, y.new_zeros(()), y.new_zeros(())),
    "h_n only": lambda y, h, c: (h * torch.randn(h.shape, generator=torch.Generator().manual_seed(3),
                                                 dtype=F64)).sum(),
    "c_n only": lambda y, h, c: (c * torch.randn(c.shape, generator=torch.Generator().manual_seed(4),
                                                 dtype=F64)).sum(),
}


@pytest.mark.parametrize("loss", list(LOSSES), ids=list(LOSSES))
@pytest.mark.parametrize("layers", [1, 2])
def test_tbptt_partial_losses(layers, loss):
    # Gradients that autograd does not produce (no output gradient, or no dL/dh_n) count as zero.
    model = make_model(layers, True, tbptt_chunk=3)
    x, h0, c0, _ = make_data(model, 8, 3, False)
    params = dict(model.named_parameters())
    expected = results(lambda: chunked_stack(x, h0, c0, params, layers, True, 3), model, x, h0, c0, LOSSES[loss],
                       reference=True)
    actual = results(lambda: fast_run(model, x, h0, c0, None), model, x, h0, c0, LOSSES[loss])
    assert_all_close(actual, expected, loss)


def test_tbptt_unbatched_batch_first_and_default_state():
    model = make_model(2, True, tbptt_chunk=3, batch_first=True)
    params = dict(model.named_parameters())
    x = torch.randn(2, 9, 3, dtype=F64, requires_grad=True)
    zeros_h = torch.zeros(4, 2, 5, dtype=F64)
    y_ref, h_ref, c_ref = chunked_stack(x.transpose(0, 1), zeros_h, zeros_h, params, 2, True, 3)
    y, (h, c) = model(x)
    g_ref = torch.autograd.grad(loss_of(y_ref.transpose(0, 1), h_ref, c_ref), [x, *params.values()])
    g = torch.autograd.grad(loss_of(y, h, c), [x, *params.values()])
    for a, b in zip(g, g_ref):
        assert_close(a, b, F64, "batch_first")
    # unbatched (T, I): the batch dimension is added and removed around the same computation
    model.batch_first = False
    xu = torch.randn(9, 3, dtype=F64, requires_grad=True)
    y_ref, h_ref, c_ref = chunked_stack(xu.unsqueeze(1), zeros_h[:, :1], zeros_h[:, :1], params, 2, True, 3)
    y, (h, c) = model(xu)
    g_ref = torch.autograd.grad(loss_of(y_ref.squeeze(1), h_ref.squeeze(1), c_ref.squeeze(1)), [xu, *params.values()])
    g = torch.autograd.grad(loss_of(y, h, c), [xu, *params.values()])
    for a, b in zip(g, g_ref):
        assert_close(a, b, F64, "unbatched")


def test_module_attribute_sets_the_option():
    model = make_model(1, True)
    model.tbptt_chunk = 2
    check_against_chunked(model, T=7, B=2)


@pytest.mark.parametrize("k,every", [(3, 4), (5, 2), (2, 2), (4, 100), (1, 3)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_tbptt_with_checkpointing(k, every, packed):
    model = make_model(2, True, tbptt_chunk=k, checkpoint_every=every)
    check_against_chunked(model, T=10, B=3, packed=packed)


def test_tbptt_float32():
    model = make_model(2, True, tbptt_chunk=3)
    x, h0, c0, _ = make_data(model, 12, 3, False)
    params = dict(model.named_parameters())
    expected = results(lambda: chunked_stack(x, h0, c0, params, 2, True, 3), model, x, h0, c0, reference=True)
    actual = device_results(model, (x, h0, c0, None), dtype=torch.float32)
    for key in expected:
        assert_close(actual[key], expected[key], torch.float32, key)


def test_invalid_chunk_is_rejected():
    with pytest.raises(ValueError, match="tbptt_chunk"):
        make_model(tbptt_chunk=0)
    with pytest.raises(TypeError, match="tbptt_chunk"):
        make_model(tbptt_chunk=2.5)
    model = make_model()
    with pytest.raises(ValueError, match="tbptt_chunk"):
        model(torch.randn(3, 1, 3, dtype=F64), tbptt_chunk=-1)


@pytest.mark.slow
@pytest.mark.parametrize("k", [7, 64])
def test_tbptt_larger_sizes(k):
    # Many chunks, several unit blocks and row tiles, packed, with checkpointing on top.
    model = make_model(2, True, I=6, H=40, tbptt_chunk=k, checkpoint_every=50)
    check_against_chunked(model, T=300, B=7, packed=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_tbptt_cuda(k, packed, backend):
    model = make_model(2, True, I=4, H=32, tbptt_chunk=k)
    skip_unless_supported(backend, model, 3)
    check_against_chunked(model, T=10, B=3, packed=packed, device="cuda", backend=backend)
    check_against_chunked(model, T=10, B=3, packed=packed, device="cuda", backend=backend, checkpoint_every=4)
