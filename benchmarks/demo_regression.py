"""Task 1, the practitioner's setting: one number per 10,000-step signal, read from a BiLSTM's last output.

The model: a bidirectional LSTM whose output at the last time step, ``output[-1]`` as
``torch.nn.LSTM`` defines it, feeds a linear regression head. ``output[-1]`` is the forward
direction after the whole signal and the reverse direction after one step (its first: the reverse
direction starts at the last step), so only the forward direction can carry what happened early
in the signal to the loss; ``h_n`` of both directions would be the other reading of "last output".
The target is the duty cycle of the whole recording (benchmarks/demo_signals.py); the loss is the
mean squared error of the standardised target.

Contenders (same model size, optimizer, batches and number of updates):
(a) ``torch.nn.LSTM`` on the signal downsampled to 200 points;
(b) ``torch.nn.LSTM`` at full length, full BPTT;
(c) ``fastlstm.LSTM`` at full length, full BPTT with ``checkpoint_every`` (activation memory
    O(T/k + k)) and in-kernel recurrent clipping ``grad_clip``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import fastlstm
from demo_signals import DUTY_STD, downsample

TBPTT_DOES_NOT_FIT = (
    "Why (c) uses no truncated BPTT: the loss sits on the last step only. Truncating the gradient every "
    "k steps (tbptt_chunk=k, or a hand-written loop that detaches the state every k steps) gives every "
    "step before the last k exactly zero gradient, so the model could only learn from the last k steps "
    "and never from the early part of the signal the target depends on; streaming TBPTT "
    "(fastlstm.tbptt) needs a loss in every chunk, and there is none before the end. What fits a "
    "last-output loss is full BPTT with checkpointing (memory) and clipping (stability).")


class Regressor(nn.Module):
    """A bidirectional LSTM and a linear head on ``output[-1]``: (T, B, 1) -> (B, 1)."""

    def __init__(self, lstm: nn.Module, hidden: int) -> None:
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x: torch.Tensor, **options: object) -> torch.Tensor:
        out, _ = self.lstm(x, **options)
        return self.head(out[-1])


def bilstm(hidden: int) -> nn.LSTM:
    return nn.LSTM(1, hidden, bidirectional=True)


def full_length_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss.item()


def downsampled_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return full_length_update(model, downsample(x), y)


def test_rmse(model: Regressor, x: torch.Tensor, y: torch.Tensor, downsampled: bool, device: torch.device) -> float:
    """RMSE of the duty cycle in percentage points on the test signals x (T, N, 1), y (N, 1)."""
    model.eval()
    with torch.no_grad():
        pred = model((downsample(x) if downsampled else x).to(device)).cpu()
    model.train()
    return ((pred - y).square().mean().sqrt() * DUTY_STD * 100).item()


def mean_rmse(y: torch.Tensor) -> float:
    """RMSE (percentage points) of always predicting the mean duty cycle: the no-information baseline."""
    return (y.square().mean().sqrt() * DUTY_STD * 100).item()


def grad_norms(model: Regressor, x: torch.Tensor, y: torch.Tensor, grad_clip: float | None,
               ) -> fastlstm.GradNorms:
    """The per-step gradient norms of one backward of the last-output loss on (x, y); the model's
    ``.grad`` is cleared afterwards (this is a probe, not an update)."""
    loss = F.mse_loss(model(x, record_grad_norms=True, grad_clip=grad_clip), y)
    loss.backward()
    norms = model.lstm.grad_norms
    model.zero_grad(set_to_none=True)
    return norms
