"""The demo's two figures: training loss against wall time (per task), and the gradient norms of the
regression model against the distance from its loss."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fastlstm  # noqa: E402
from demo_training import Outcome  # noqa: E402


def running_mean(values: list[float], window: int = 10) -> list[float]:
    """The mean of the last ``window`` values at every position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(tasks: list[tuple[str, str, list[Outcome]]], path: Path, footnote: str) -> None:
    """One panel per task: (title, y label, outcomes); training loss (running mean of 10 updates)
    against training wall time, one line per contender."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, (title, ylabel, outcomes) in zip(axes[0], tasks):
        for o in outcomes:
            ax.plot(o.elapsed, running_mean(o.losses), label=f"{o.name} ({o.seconds:.0f} s)", linewidth=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training wall time (s, log scale)")
        ax.set_ylabel(ylabel + " (mean of last 10 updates, log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.5, 0.005, footnote, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grad_norms_by_distance(curves: dict[str, fastlstm.GradNorms], path: Path, title: str) -> None:
    """||dL/dh_t|| and ||dL/dc_t|| of the forward direction against the distance T-1-t from the
    last-output loss, both on log scales, one line per recording (label -> GradNorms of a 1-layer
    BiLSTM). The x axis spans the whole signal, so the reach of the gradient is seen against T.

    Zeros cannot sit on a log scale: they are left out of the line, and the legend says from which
    distance on the recorded norm is 0 (the norm underflows once the gradient is ~1e-20 or less).
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    T = 1
    for ax, which in zip(axes, ("h", "c")):
        for label, norms in curves.items():
            forward = getattr(norms, which)[0, 0].detach().double().cpu().flip(0)  # index = distance
            T = forward.numel()
            distance = torch.arange(T)
            live = forward > 0
            suffix = ""
            if not bool(live.all()):
                first_zero = int((~live).nonzero()[0])
                suffix = f" (0 from distance {first_zero} on: not drawn)"
            ax.plot(distance[live].numpy() + 1, forward[live].numpy(), label=label + suffix, linewidth=1.2)
        ax.axvline(T, color="gray", linestyle="--", linewidth=1)
        ax.text(T, ax.get_ylim()[1], " t = 0\n (start)", va="top", ha="right", fontsize=8, color="gray")
        ax.set_xscale("log")
        ax.set_xlim(1, T * 1.05)
        ax.set_yscale("log")
        ax.set_xlabel("distance from the loss + 1, T-t (steps, log scale)")
        ax.set_ylabel(f"||dL/d{which}_t|| (L2 over batch and units, log scale)")
        ax.set_title(f"gradient reaching {which}_t, forward direction")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
