"""The demo's claims about its own contenders (benchmarks/demo_*.py), on small float64 cases."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fastlstm  # noqa: E402
import demo_labelling as labelling  # noqa: E402
import demo_regression as regression  # noqa: E402
from demo_signals import POINTS, downsample, eval_points, labelling_batch  # noqa: E402


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_hand_written_detach_loop_is_fastlstm_tbptt_without_clipping() -> None:
    # (b') of task 2 is described as "the gradient of (c) without its clipping".
    torch.manual_seed(0)
    T, B, H, k = 47, 3, 5, 10  # T not a multiple of k: a short last chunk
    base = labelling.Tagger(nn.LSTM(1, H), H).double()
    x = torch.randn(T, B, 1, dtype=torch.float64)
    y = torch.randint(0, 2, (T, B))
    by_hand = copy.deepcopy(base)
    loss_by_hand = labelling.detach_every(k)(by_hand, x, y)
    fast = copy.deepcopy(base)
    fast.lstm = fastlstm.LSTM.from_torch(fast.lstm, tbptt_chunk=k)
    loss_fast = labelling.full_length_update(fast, x, y)
    assert abs(loss_by_hand - loss_fast) <= 1e-12
    expected, got = grads(by_hand), grads(fast)
    assert expected.keys() == got.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert scale > 0, name
        assert (expected[name] - got[name]).abs().max().item() <= 1e-10 * scale, name


def test_last_output_reaches_the_reverse_direction_only_through_its_first_step() -> None:
    # The regression model reads output[-1]: the reverse direction has seen one step there, so no
    # gradient reaches its input projection from any earlier step.
    torch.manual_seed(0)
    T, B, H = 30, 2, 4
    model = regression.Regressor(regression.bilstm(H), H).double()
    x = torch.randn(T, B, 1, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad[:-1].abs().max().item() > 0  # the forward direction sees every step
    reverse_only = regression.Regressor(regression.bilstm(H), H).double()
    reverse_only.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(reverse_only.lstm, name).zero_()
    x.grad = None
    reverse_only(x).sum().backward()
    assert x.grad[:-1].abs().max().item() == 0
    assert x.grad[-1].abs().max().item() > 0


def test_downsampling_and_evaluation_points() -> None:
    x, y = labelling_batch(2, 10 * POINTS, torch.Generator().manual_seed(0))
    xs = downsample(x)
    assert xs.shape == (POINTS, 2, 1)
    torch.testing.assert_close(xs[3], x[30:40].mean(0), rtol=1e-6, atol=1e-6)
    points = eval_points(y)
    assert points.shape == (POINTS, 2)
    assert torch.equal(points[3], y[39])
