"""``record_grad_norms=True``: per layer, direction and time step, the L2 norm (over batch and
hidden units) of the total gradient reaching h_t and c_t (DESIGN.md section 6).

Reference: the unrolled float64 cell loop of tests/test_clipping.py with the cell written out
(so c_t is a tensor of the graph that feeds both h_t = o * tanh(c_t) and the next step), with
``retain_grad`` on h_t (the cell's hidden output at time t, before any projection) and on c_t.
Their ``.grad`` is everything that reaches them: the layer-output gradient plus the carry from
the next step, after truncation (``tbptt_chunk``) and clipping (``grad_clip``) of that carry, and
dL/dh_n, dL/dc_n at the last step. Packed batches run one sequence at a time; the norm at time t
sums over the sequences that are live at t (padded positions record 0).
"""

from __future__ import annotations

import pytest
import torch

import fastlstm
from reference import assert_close
from long_sequence_reference import (F64, LAYER_CONFIG_IDS, LAYER_CONFIGS, fast_run, loss_of, make_data, make_model,
                                     moved, one_thread, reference_run, skip_unless_supported,
                                     unrolled_stack)


def reference_norms(model: fastlstm.LSTM, x, h0, c0, lengths, **call) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, c) norms of shape (num_layers, D, T) from the unrolled reference (run on one thread)."""
    with one_thread():
        return _reference_norms(model, x, h0, c0, lengths, **call)


def _reference_norms(model, x, h0, c0, lengths, **call):
    options = model.options.updated(**call)
    D = 2 if model.bidirectional else 1
    LD = model.num_layers * D
    # One record for every sequence of the batch: its lists run over (sequence, layer * D +
    # direction), each a per-time list as long as that sequence.
    record: dict = {}
    y, h, c = reference_run(unrolled_stack, x, h0, c0, lengths, params=dict(model.named_parameters()),
                            num_layers=model.num_layers, bidirectional=model.bidirectional, clip=options.grad_clip,
                            mode=options.grad_clip_mode, k=options.tbptt_chunk, explicit=True, record=record)
    loss_of(y, h, c).backward()  # populates the retained grads
    norms = {}
    for key in ("h", "c"):
        sq = torch.zeros(model.num_layers, D, x.shape[0], dtype=F64)
        for index, per_time in enumerate(record[key]):
            for t, value in enumerate(per_time):
                sq[(index % LD) // D, index % D, t] += value.grad.pow(2).sum()
        norms[key] = sq.sqrt()
    return norms["h"], norms["c"]


def fast_norms(model, x, h0, c0, lengths, **call):
    y, h, c = fast_run(model, x, h0, c0, lengths, **call)
    assert model.grad_norms is None  # before backward
    loss_of(y, h, c).backward()
    return model.grad_norms


def check_norms(model, T=8, B=3, packed=False, device="cpu", **call):
    x, h0, c0, lengths = make_data(model, T, B, packed)
    expected_h, expected_c = reference_norms(model, x, h0, c0, lengths, **call)
    model, (x, h0, c0, lengths) = moved(model, (x, h0, c0, lengths), device)
    norms = fast_norms(model, x, h0, c0, lengths, **call)
    assert isinstance(norms, fastlstm.GradNorms)
    norms = fastlstm.GradNorms(h=norms.h.cpu(), c=norms.c.cpu())
    D = 2 if model.bidirectional else 1
    assert norms.h.shape == norms.c.shape == (model.num_layers, D, T)
    assert norms.h.dtype == norms.c.dtype == F64
    what = f"{model!r} packed={packed} call={call}"
    assert_close(norms.h, expected_h, F64, f"h norms [{what}]")
    assert_close(norms.c, expected_c, F64, f"c norms [{what}]")
    return norms


@pytest.mark.parametrize("layers,bidirectional", LAYER_CONFIGS, ids=LAYER_CONFIG_IDS)
def test_norms_match_reference(layers, bidirectional):
    check_norms(make_model(layers, bidirectional, record_grad_norms=True))


@pytest.mark.parametrize("layers,bidirectional", LAYER_CONFIGS, ids=LAYER_CONFIG_IDS)
@pytest.mark.parametrize("k", [1, 3])
def test_norms_with_tbptt(k, layers, bidirectional):
    check_norms(make_model(layers, bidirectional, record_grad_norms=True, tbptt_chunk=k))


@pytest.mark.parametrize("mode", ["recurrent", "gates"])
@pytest.mark.parametrize("k", [None, 3])
def test_norms_with_clipping(k, mode):
    check_norms(make_model(2, True, record_grad_norms=True, grad_clip=0.05, grad_clip_mode=mode, tbptt_chunk=k))


@pytest.mark.parametrize("call", [{}, {"tbptt_chunk": 2}, {"grad_clip": 0.05}],
                         ids=["plain", "tbptt", "clip"])
def test_norms_packed(call):
    # Per-sequence lengths: padded (t >= length) positions contribute 0 to the norm.
    norms = check_norms(make_model(2, True, record_grad_norms=True), T=8, B=4, packed=True, **call)
    assert (norms.h > 0).any()


def test_norms_packed_shortest_rows():
    # All rows shorter than T except one: the tail of the time axis has a single live row.
    model = make_model(1, True, record_grad_norms=True)
    x, h0, c0, _ = make_data(model, 7, 3, False)
    lengths = torch.tensor([2, 7, 1])
    expected_h, expected_c = reference_norms(model, x, h0, c0, lengths)
    norms = fast_norms(model, x, h0, c0, lengths)
    assert_close(norms.h, expected_h, F64, "h")
    assert_close(norms.c, expected_c, F64, "c")


def test_norms_with_checkpointing():
    model = make_model(2, True, record_grad_norms=True, checkpoint_every=3)
    a = check_norms(model, tbptt_chunk=2)
    assert (a.h > 0).all()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_norms_with_projection(packed):
    # With proj_size > 0, h_t is the cell's hidden output before the projection (DESIGN.md: r_t = h_t W_hr^T).
    check_norms(make_model(2, True, proj_size=3, H=6, record_grad_norms=True, grad_clip=0.05, tbptt_chunk=3),
                B=4, packed=packed)


def test_norms_several_unit_blocks():
    check_norms(make_model(1, True, I=4, H=19, record_grad_norms=True, tbptt_chunk=4), T=9, B=5)


def test_norms_per_call_option_and_off_by_default():
    model = make_model(1, False)
    x, h0, c0, lengths = make_data(model, 6, 2, False)
    y, h, c = fast_run(model, x, h0, c0, lengths)
    loss_of(y, h, c).backward()
    assert model.grad_norms is None  # option off
    expected_h, _ = reference_norms(model, x, h0, c0, lengths)
    norms = fast_norms(model, x, h0, c0, lengths, record_grad_norms=True)
    assert_close(norms.h, expected_h, F64, "per-call record_grad_norms")


def test_per_call_override_turns_recording_off():
    model = make_model(1, False, record_grad_norms=True)
    out, _ = model(torch.randn(5, 2, 3, dtype=F64), record_grad_norms=False)
    out.sum().backward()
    assert model.grad_norms is None


def test_norms_not_recorded_without_grad():
    model = make_model(1, False, record_grad_norms=True)
    with torch.no_grad():
        model(torch.randn(5, 2, 3, dtype=F64))
    assert model.grad_norms is None


@pytest.mark.parametrize("every", [None, 3])
@pytest.mark.parametrize("H", [5, 37])
def test_norms_float32(H, every):
    # H = 37 spans three 16-wide float32 unit blocks: the norm is summed over the blocks.
    model = make_model(2, True, H=H, record_grad_norms=True, tbptt_chunk=3, checkpoint_every=every)
    x, h0, c0, _ = make_data(model, 8, 3, False)
    expected_h, expected_c = reference_norms(model, x, h0, c0, None)
    model32, (x32, h32, c32, _) = moved(model, (x, h0, c0, None), dtype=torch.float32)
    norms = fast_norms(model32, x32, h32, c32, None)
    assert norms.h.dtype == torch.float32
    assert_close(norms.h, expected_h, torch.float32, "h")
    assert_close(norms.c, expected_c, torch.float32, "c")


def test_tbptt_shows_in_the_norms():
    # With tbptt_chunk=k and the loss on the last output only, nothing reaches h_t before the last chunk.
    model = make_model(1, False, record_grad_norms=True, tbptt_chunk=4)
    x = torch.randn(12, 2, 3, dtype=F64)
    out, _ = model(x)
    out[-1].sum().backward()
    norms = model.grad_norms.h[0, 0]
    assert (norms[:8] == 0).all()
    assert (norms[8:] > 0).all()


def test_plot_grad_norms(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    model = make_model(2, True, record_grad_norms=True)
    with pytest.raises(ValueError, match="record_grad_norms"):
        fastlstm.plot_grad_norms(model)  # nothing recorded yet
    out, _ = model(torch.randn(10, 2, 3, dtype=F64))
    out.pow(2).sum().backward()
    path = tmp_path / "norms.png"
    fig = fastlstm.plot_grad_norms(model, str(path), title="test")
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert len(ax.lines) == 4  # 2 layers x 2 directions
    assert ax.get_yscale() == "log"
    first = ax.lines[0].get_ydata()
    assert torch.allclose(torch.as_tensor(first, dtype=F64), model.grad_norms.h[0, 0].clamp_min(1e-30))
    fig2 = fastlstm.plot_grad_norms(model.grad_norms)  # a GradNorms works too
    assert isinstance(fig2, Figure)
    import matplotlib.pyplot as plt
    plt.close(fig)
    plt.close(fig2)


def test_backward_twice_adds_the_norms():
    # Documented on LSTM.grad_norms: a second backward through the same forward adds its norms.
    model = make_model(1, False, record_grad_norms=True)
    x = torch.randn(5, 2, 3, dtype=F64)
    out, _ = model(x)
    out.sum().backward(retain_graph=True)
    once = model.grad_norms.h.clone()
    out.sum().backward()
    assert_close(model.grad_norms.h, 2 * once, F64, "twice")


def test_reference_c_norm_includes_the_h_path():
    # Guards the reference: c_t.grad of the explicit cell includes dL/dh_t * o * (1 - tanh(c)^2).
    model = make_model(1, False, record_grad_norms=True, tbptt_chunk=1)
    x, h0, c0, _ = make_data(model, 4, 2, False)
    _, c_norms = reference_norms(model, x, h0, c0, None)
    assert (c_norms > 0).all()  # with k = 1 no carry reaches c_t: only the h path is left


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("call", [{}, {"tbptt_chunk": 3, "grad_clip": 0.05}, {"grad_clip": 0.05, "grad_clip_mode": "gates",
                                                                            "checkpoint_every": 4}],
                         ids=["plain", "tbptt-clip", "gates-checkpointing"])
def test_norms_cuda(call, packed, backend):
    model = make_model(2, True, I=4, H=32, record_grad_norms=True)
    skip_unless_supported(backend, model, 3)
    check_norms(model, T=10, B=3, packed=packed, device="cuda", backend=backend, **call)
