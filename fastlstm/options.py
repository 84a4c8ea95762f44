"""The kernel options fastlstm adds to the torch.nn.LSTM contract (DESIGN.md section 7), checked."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

from .ops import LayerOptions

BACKENDS = ("auto", "stepwise", "persistent", "cluster")
CLIP_MODES = ("recurrent", "gates")


def _positive_int_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be None or a positive int, got: {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be None or a positive int, got {value}")
    return int(value)


@dataclass(frozen=True)
class KernelOptions:
    """What the kernels do beyond torch.nn.LSTM. Every field is validated on construction.

    backend: ``"auto"`` (fastest kernel that supports the call), ``"stepwise"`` (GEMM + fused cell
        per step; every device and size) or ``"persistent"`` (one CUDA launch for the whole
        sequence; CUDA only, see ``fastlstm.explain``) or ``"cluster"`` (opt-in, Hopper: the
        thread-block-cluster forward and backward on tensor cores for bfloat16, float16 and
        float32 as TF32 where ``torch.backends.cuda.matmul.fp32_precision`` is ``"tf32"``;
        float64, IEEE float32 and layers whose W_hh does not fit one cluster run on the
        grid-scope persistent kernel, and so does the backward where the cluster backward does
        not fit; validated only on the CPU harness so far; ``"auto"`` never picks it).
    tbptt_chunk: k, or None. The backward cuts the gradient carried through (h, c) between step
        s and s - 1 whenever s is a multiple of k, counting steps from the first step of the call
        in each direction's processing order (the reverse direction counts from each sequence's
        last element). Same gradients as running chunks of k steps with the state detached.
    grad_clip: c > 0, or None. Element-wise clamp to [-c, c] in the backward kernel.
    grad_clip_mode: ``"recurrent"``: the gradients a step sends back through the state
        (dL/dh_{t-1} from dG_t W_hh, and dL/dc_{t-1} = dL/dc_t * f_t) are clamped before they are
        added to anything; the gradient arriving from the layer's output is not. ``"gates"``:
        the gate pre-activation gradients dG_t are clamped before any use (Graves, 2013).
    record_grad_norms: record, per layer, direction and time step, the L2 norm (over batch and
        hidden units) of the total gradient reaching h_t and c_t; see ``LSTM.grad_norms``.
    checkpoint_every: k, or None. Save the state only every k steps and recompute the gates of
        each chunk during the backward: activation memory O(T/k + k) instead of O(T), same
        results.

    Under a backward with ``create_graph=True`` the gradient is computed by fastlstm.composite
    (differentiable; same first-order values). Its derivative: a truncated carry is the constant
    0, a clamped element has derivative 1 inside [-c, c] (bounds included) and 0 where clipped,
    the forward states stay attached. A second-order term through a layer's output (a loss
    nonlinear in it, the layer above) uses the truncated/clipped backward instead of the exact
    derivative (README, "Second-order gradients").
    """

    backend: str = "auto"
    tbptt_chunk: int | None = None
    grad_clip: float | None = None
    grad_clip_mode: str = "recurrent"
    record_grad_norms: bool = False
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")
        _positive_int_or_none("tbptt_chunk", self.tbptt_chunk)
        _positive_int_or_none("checkpoint_every", self.checkpoint_every)
        clip = self.grad_clip
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
                raise TypeError(f"grad_clip should be None or a positive number, got: {type(clip).__name__}")
            if not (math.isfinite(clip) and clip > 0):
                raise ValueError(f"grad_clip must be None or a finite number > 0, got {clip}")
        if self.grad_clip_mode not in CLIP_MODES:
            raise ValueError(
                f"grad_clip_mode must be one of {', '.join(map(repr, CLIP_MODES))}, got {self.grad_clip_mode!r}")
        if not isinstance(self.record_grad_norms, bool):
            raise TypeError(f"record_grad_norms should be of type bool, got: {type(self.record_grad_norms).__name__}")

    def updated(self, **changes: object) -> KernelOptions:
        """A copy with the given fields replaced (and validated)."""
        return replace(self, **changes) if changes else self

    def layer_options(self) -> LayerOptions:
        return LayerOptions(
            backend=self.backend,
            checkpoint_every=self.checkpoint_every or 0,
            tbptt_chunk=self.tbptt_chunk or 0,
            grad_clip=float(self.grad_clip or 0.0),
            grad_clip_mode=self.grad_clip_mode,
        )
