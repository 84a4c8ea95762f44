"""Task 2, the truncated-BPTT showcase: the state at every step of a 10,000-step signal.

A unidirectional LSTM and a linear read-out at every step, cross-entropy at every step. The
state is a local pattern of a few steps, so a gradient truncated every k steps loses little, and
truncation is what a user reaches for at this length.

Contenders (same model size, optimizer, batches and number of updates):
(a) ``torch.nn.LSTM`` on the signal downsampled to 200 points (label: each window's last step);
(b) ``torch.nn.LSTM`` at full length, full BPTT;
(b') ``torch.nn.LSTM`` at full length, the loop a user writes by hand: chunks of k steps, the
     state detached between chunks, one backward per chunk (so only one chunk's activations are
     alive), one optimizer step per batch - the same gradient as (c) without its clipping;
(c) ``fastlstm.LSTM`` at full length, one call, truncated BPTT and recurrent clipping in the
    backward kernel (``tbptt_chunk=k``, ``grad_clip``), and ``checkpoint_every`` for memory.
The test error is measured at the 200 evaluation points of every test sequence (the last step of
each window), for every contender.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from demo_signals import downsample, eval_points


class Tagger(nn.Module):
    """An LSTM and a linear read-out of the state at every step: (T, B, 1) -> (T, B, 2) logits."""

    def __init__(self, lstm: nn.Module, hidden: int) -> None:
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(x, state)
        return self.head(out), state


def full_length_update(model: Tagger, x: torch.Tensor, y: torch.Tensor) -> float:
    logits, _ = model(x)
    loss = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1))
    loss.backward()
    return loss.item()


def downsampled_update(model: Tagger, x: torch.Tensor, y: torch.Tensor) -> float:
    return full_length_update(model, downsample(x), eval_points(y))


def detach_every(k: int):
    """The hand-written truncated-BPTT update: chunks of k steps, state detached between them."""

    def update(model: Tagger, x: torch.Tensor, y: torch.Tensor) -> float:
        T, state, total = x.shape[0], None, 0.0
        for xc, yc in zip(x.split(k), y.split(k)):
            logits, state = model(xc, state)
            # Weighted by the chunk's share of the steps: the sum is the full-length mean loss.
            loss = F.cross_entropy(logits.reshape(-1, 2), yc.reshape(-1)) * (xc.shape[0] / T)
            loss.backward()
            total += loss.item()
            state = (state[0].detach(), state[1].detach())
        return total

    return update


def test_error(model: Tagger, x: torch.Tensor, y: torch.Tensor, downsampled: bool, device: torch.device) -> float:
    """Error rate at the evaluation points of the test sequences x (T, N, 1), y (T, N)."""
    model.eval()
    with torch.no_grad():
        if downsampled:
            pred = model(downsample(x).to(device))[0].argmax(-1).cpu()
        else:
            pred = eval_points(model(x.to(device))[0].argmax(-1).cpu())
    model.train()
    return (pred != eval_points(y)).float().mean().item()
