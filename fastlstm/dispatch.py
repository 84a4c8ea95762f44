"""Which kernel runs a call, and why (``fastlstm.explain``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence

from . import _extension, directions


@dataclass(frozen=True)
class Plan:
    """The kernel a call would use: ``backend`` is 'cpu', 'stepwise', 'persistent' or 'cluster'."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def persistent_support(hidden_size: int, batch: int, dtype: torch.dtype, device: torch.device,
                       proj_size: int = 0) -> tuple[bool, str]:
    """Whether the persistent CUDA kernel can run this layer on ``device``, and why not."""
    if device.type != "cuda":
        return False, "the persistent kernel is CUDA only"
    if not _extension.cuda_compiled():
        return False, "this build has no CUDA kernels"
    if proj_size > 0:
        return False, "the persistent kernel does not support proj_size > 0"
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok, reason = _extension._C.persistent_support(hidden_size, batch, str(dtype).replace("torch.", ""), index)
    return bool(ok), str(reason)


def cluster_support(hidden_size: int, batch: int, dtype: torch.dtype, device: torch.device,
                    proj_size: int = 0) -> tuple[bool, str]:
    """Whether backend 'cluster' can run this layer on ``device``, and why not: the cluster kernels
    for bfloat16, float16 and float32 where TF32 is allowed (the persistent backward where the
    cluster backward does not fit), the grid-scope persistent kernel for float64, IEEE float32
    and layers the cluster forward cannot take (W_hh beyond 16 blocks' shared memory); the
    reason names the kernels that run."""
    if device.type != "cuda":
        return False, "the cluster kernel is CUDA only"
    if not _extension.cuda_compiled():
        return False, "this build has no CUDA kernels"
    if proj_size > 0:
        return False, "the cluster kernel does not support proj_size > 0"
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok, reason = _extension._C.cluster_support(hidden_size, batch, str(dtype).replace("torch.", ""), index)
    return bool(ok), str(reason)


def cluster_fallback(hidden_size: int, batch: int, dtype: torch.dtype, device: torch.device) -> str:
    """Why backend 'cluster' runs this layer on the persistent kernel (float64, float32 without
    TF32, a layer the cluster forward cannot take), or "" where the cluster kernels run it."""
    if device.type != "cuda" or not _extension.cuda_compiled():
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return str(_extension._C.cluster_fallback(hidden_size, batch, str(dtype).replace("torch.", ""), index))


def batch_size(module: torch.nn.Module, input: torch.Tensor | PackedSequence) -> int:
    """The batch the kernels see for ``input``: a PackedSequence's widest step (its padded batch),
    1 for an unbatched (L, input_size) tensor, else the batch dimension of a (L, B, .) or, with
    ``batch_first``, (B, L, .) tensor."""
    if isinstance(input, PackedSequence):
        return int(input.batch_sizes[0])
    if input.dim() == 2:
        return 1
    return input.size(0 if getattr(module, "batch_first", False) else 1)


def plan(module: torch.nn.Module, input: torch.Tensor | PackedSequence, backend: str | None = None) -> Plan:
    """The kernel ``module`` would use for ``input`` (a tensor or a PackedSequence)."""
    options = getattr(module, "options")
    requested = backend or options.backend
    data = input.data if isinstance(input, PackedSequence) else input
    device = data.device
    if device.type == "cpu":
        if requested in ("persistent", "cluster"):
            return Plan("error", f"backend={requested!r} needs a CUDA device")
        return Plan("cpu", f"fused C++ kernels ({_extension.cpu_capability()}): the recurrence in one parallel "
                           "region, each thread computing its units' input projection for the next step while the "
                           "others finish the current one (with proj_size, the AMX bfloat16 kernels or "
                           "input_size > 512 on Intel CPUs: the projection as GEMMs over blocks of steps, and with "
                           "proj_size the recurrence step by step), weight gradients as large GEMMs after the loop")
    ok, reason = persistent_support(module.hidden_size, batch_size(module, input), data.dtype, device,
                                    getattr(module, "proj_size", 0))
    if requested == "stepwise":
        return Plan("stepwise", "requested: cuBLAS GEMM + fused cell kernel per step")
    two_streams = ("; the two directions run concurrently, on two CUDA streams"
                   if getattr(module, "bidirectional", False) and directions.concurrent(data, requested) else "")
    if requested == "persistent":
        return Plan("persistent" if ok else "error", reason + (two_streams if ok else ""))
    if requested == "cluster":
        ok, reason = cluster_support(module.hidden_size, batch_size(module, input), data.dtype, device,
                                     getattr(module, "proj_size", 0))
        if not ok:
            return Plan("error", reason)
        fallback = cluster_fallback(module.hidden_size, batch_size(module, input), data.dtype, device)
        return Plan("persistent" if fallback else "cluster", reason + two_streams)
    return Plan("stepwise", "auto picks the stepwise kernels until the persistent kernel has been validated on a "
                            f"GPU (persistent: {reason})")


def explain(module: torch.nn.Module, input: torch.Tensor | PackedSequence, backend: str | None = None) -> str:
    """A one-line description of the kernel ``module`` would use for ``input``."""
    return str(plan(module, input, backend))
