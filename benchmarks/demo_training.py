"""The demo's training loop: one contender, a fixed list of batches, timed, with its memory peak.

Every contender of a task trains on the same pre-generated batches in the same order (generated
before the clock starts, so data generation is not timed), with Adam at the same learning rate,
for the same number of updates. A contender is a model plus an ``update`` function that runs the
forward and backward of one batch (however that contender computes its gradient) and returns the
loss; the loop owns the optimizer, the clock and the memory measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from peak_memory import PeakMemory

# update(model, x, y) -> loss: forward and backward of one batch, gradients left in .grad.
Update = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]


@dataclass
class Outcome:
    """What one contender's training did.

    seconds: training wall time (all updates); per_update: seconds / updates.
    peak_bytes: peak memory of the training phase beyond what was in use before it (PeakMemory).
    losses, elapsed: the training loss of every update and the wall time at its end (the curve).
    test_error: the task's test metric after training.
    """

    name: str
    seconds: float
    per_update: float
    peak_bytes: float
    losses: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    test_error: float = float("nan")

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last 10 updates (one batch is noisy)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def train(name: str, model: nn.Module, update: Update, batches: list[tuple[torch.Tensor, torch.Tensor]],
          lr: float, device: torch.device) -> Outcome:
    """Adam(lr) over ``batches`` (each (x, y), moved to ``device`` as it is used), one update each."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    report_every = max(1, len(batches) // 5)
    losses, elapsed = [], []
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for u, (x, y) in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            losses.append(update(model, x.to(device), y.to(device)))
            optimizer.step()
            elapsed.append(time.perf_counter() - started)
            if u % report_every == 0 or u == len(batches) - 1:
                print(f"  [{name}] update {u + 1:4d}/{len(batches)}  loss {losses[-1]:.4f}  ({elapsed[-1]:.0f} s)",
                      flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return Outcome(name, seconds, seconds / len(batches), memory.peak_bytes, losses, elapsed)


def mib(n: float) -> str:
    """Bytes as MiB for a table ('n/a' for NaN: not measured)."""
    return "n/a" if n != n else f"{n / 2 ** 20:.1f} MiB"
