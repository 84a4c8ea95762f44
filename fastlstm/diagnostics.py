"""Per-step gradient norms recorded by the backward kernel, and their plot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .lstm import LSTM


@dataclass(frozen=True)
class GradNorms:
    """L2 norms, over batch and hidden units, of the total gradient reaching h_t and c_t.

    h, c: (num_layers, num_directions, T), indexed by time step t (not processing order), on the
    module's device, float32 (float64 for float64 modules). "Total" means everything that reaches
    h_t / c_t: the gradient from the layer's output plus the carry from the next step, after
    truncation and clipping. Padded positions of a packed batch contribute zero.
    """

    h: Tensor
    c: Tensor


def plot_grad_norms(norms: GradNorms | LSTM, path: str | None = None, *, title: str | None = None,
                    ax: Any = None) -> Any:
    """Plot gradient norm vs time step on a log scale, one line per layer and direction.

    ``norms`` is a :class:`GradNorms` or an LSTM run with ``record_grad_norms=True`` after its
    backward. Saves to ``path`` when given. Returns the matplotlib Figure. Needs matplotlib
    (``pip install matplotlib``).
    """
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plot_grad_norms needs matplotlib: pip install matplotlib") from error

    if not isinstance(norms, GradNorms):
        recorded = norms.grad_norms
        if recorded is None:
            raise ValueError("no gradient norms recorded: construct the LSTM with record_grad_norms=True "
                             "and run a backward first")
        norms = recorded
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    else:
        fig = ax.figure
    h = norms.h.detach().float().cpu()
    layers, directions, _ = h.shape
    for layer in range(layers):
        for direction in range(directions):
            label = f"layer {layer}" + (" reverse" if direction == 1 else "")
            values = h[layer, direction].clamp_min(1e-30).numpy()
            ax.plot(range(len(values)), values, label=label, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(title or "Gradient norm reaching h_t")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
