"""Benchmark configurations: the presets (config grids), the phases measured, and memory estimates."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

# What is measured for each configuration.
FWD = "fwd"                # forward under torch.no_grad(), modules in eval mode
FWD_BWD = "fwd+bwd"        # forward + backward of (y * g).sum(); parameters require grad, the input does not
FWD_BWD_DX = "fwd+bwd+dx"  # as FWD_BWD, and the input requires grad too (dL/dx is computed)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ... for a torch dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Config:
    """One LSTM shape to measure: sequence length T, batch B, input size I, hidden size H."""

    T: int
    B: int
    I: int
    H: int
    dtype: torch.dtype
    layers: int = 1
    bidirectional: bool = False
    label: str = ""  # why this point is in the grid, when it is a named reference point
    packed: bool = False  # a ragged batch: see packed_lengths; the loss is on h_n and c_n
    repeats: int | None = None  # caps the preset's repeat count (for configurations with long calls)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def direction(self) -> str:
        return "bi" if self.bidirectional else "uni"

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def __str__(self) -> str:
        text = (f"T={self.T} B={self.B} I={self.I} H={self.H} {dtype_name(self.dtype)} "
                f"layers={self.layers} {self.direction}" + (" packed" if self.packed else ""))
        return f"{text} ({self.label})" if self.label else text


@dataclass(frozen=True)
class Preset:
    """A named list of configurations, the phases measured for each, and its own default repeat count
    (None: the device's default)."""

    name: str
    configs: tuple[Config, ...]
    phases: tuple[str, ...]
    repeats: int | None = None


def grid(T: Iterable[int], B: Iterable[int], H: Iterable[int], dtypes: Iterable[torch.dtype],
         I: Sequence[int] | None = None) -> list[Config]:
    """The Cartesian product, ordered dtype > H > B > T (so that T varies fastest, as in the plots).

    ``I`` defaults to I = H for every point.
    """
    configs = []
    for dtype, h, b, t in itertools.product(dtypes, H, B, T):
        for i in (I if I else [h]):
            configs.append(Config(T=t, B=b, I=i, H=h, dtype=dtype))
    return configs


# Named reference points (see /work/shared/PERF.md).
FASTRNNS_DEFAULT = Config(T=100, B=64, I=512, H=512, dtype=torch.float32, label="PyTorch fastrnns default")
PERF_REFERENCE = Config(T=1024, B=16, I=768, H=768, dtype=torch.bfloat16, label="PERF.md cuDNN reference shape")


def gpu_full() -> list[Config]:
    """T in {1k, 4k, 16k, 64k}, B in {1, 16, 64, 256}, H in {256, 512, 1024}, I = H, fp32 and bf16,
    plus the two reference points."""
    return grid([1000, 4000, 16000, 64000], [1, 16, 64, 256], [256, 512, 1024],
                [torch.float32, torch.bfloat16]) + [FASTRNNS_DEFAULT, PERF_REFERENCE]


def gpu_quick() -> list[Config]:
    """T in {1k, 4k}, B in {16, 64}, H in {256, 1024}, I = H, fp32 and bf16."""
    return grid([1000, 4000], [16, 64], [256, 1024], [torch.float32, torch.bfloat16])


def cpu_quick() -> list[Config]:
    """T=1000 with B in {1, 16} and H=128, plus T=200 B=16 H=256; float32."""
    return grid([1000], [1, 16], [128], [torch.float32]) + grid([200], [16], [256], [torch.float32])


PACKED_LABEL = "PackedSequence, lengths in [T/2, T], loss on h_n and c_n"


def packed_lengths(config: Config, generator: torch.Generator) -> torch.Tensor:
    """The B sequence lengths of a ragged batch, drawn uniformly in [T/2, T] (int64, CPU)."""
    return torch.randint(config.T // 2, config.T + 1, (config.B,), generator=generator)


def cpu_packed() -> list[Config]:
    """Ragged batches, packed with enforce_sorted=False: B=16 I=H=128 float32, T in {250, 500, 1000}.

    torch.nn.LSTM's packed forward+backward time grows faster than linearly in T (README), so the
    rows show the scaling in T; 3 repeats keep them short.
    """
    return [Config(T=t, B=16, I=128, H=128, dtype=torch.float32, label=PACKED_LABEL, packed=True, repeats=3)
            for t in (250, 500, 1000)]


def cpu_table() -> list[Config]:
    """The README's CPU table: float32, T=1000 I=H=128 B in {1, 16, 64}; T=1000 B=16 H=256; T=4000 B=4 H=64;
    and the ragged batches of cpu_packed."""
    return (grid([1000], [1, 16, 64], [128], [torch.float32]) + grid([1000], [16], [256], [torch.float32])
            + grid([4000], [4], [64], [torch.float32]) + cpu_packed())


def with_layers(configs: Iterable[Config], layers: int, bidirectional: bool) -> tuple[Config, ...]:
    """The same configurations with ``layers`` layers and the given direction."""
    return tuple(replace(c, layers=layers, bidirectional=bidirectional) for c in configs)


def estimate_peak_bytes(config: Config, phase: str) -> int:
    """A deliberately generous estimate of the memory one side needs for ``phase``, inputs included.

    Used only to skip configurations that cannot fit (and to say so); never reported as a
    measurement. Inputs: x (T, B, I) and g (T, B, D*H). Forward: each layer's output. Training,
    per layer and direction: fp32 gate pre-activations (4H) and cell state (H) plus the output,
    kept for the backward; then the backward's transients (gate gradients, output gradient,
    input gradient).
    """
    e, acc = config.element_size, 4
    tb = config.T * config.B
    dh = config.directions * config.H
    inputs = tb * (config.I + dh) * e
    if phase == FWD:
        return inputs + 2 * tb * dh * e
    saved = config.layers * config.directions * tb * config.H * (5 * acc + e)
    backward = tb * (2 * dh * e + 4 * config.H * acc + max(config.I, dh) * e)
    return int(1.2 * (inputs + saved + backward))
