"""Loads the compiled extension, or says exactly how to build it."""

from __future__ import annotations

import torch

_BUILD_HINT = (
    "fastlstm's compiled extension (fastlstm._C) is missing or was built against another torch "
    "(installed: torch {torch}). Build it from the repository root, after installing torch:\n"
    "    pip install --no-build-isolation -e .\n"
    "Set TORCH_CUDA_ARCH_LIST (for example '9.0') to choose CUDA targets, or FASTLSTM_FORCE_CPU=1 "
    "to build the CPU kernels only.\nOriginal error: {error}"
)

try:
    from fastlstm import _C  # noqa: F401  (registers torch.ops.fastlstm)
except ImportError as error:  # pragma: no cover - depends on the build state
    raise ImportError(_BUILD_HINT.format(torch=torch.__version__, error=error)) from error


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernels."""
    return bool(_C.cuda_compiled())


def empty_cache() -> None:
    """Free the idle host buffers fastlstm keeps for reuse between CPU calls.

    Large CPU activation and workspace buffers (1 MiB and more) return to a cache when their
    tensors die, so the next call reuses pages that are already mapped instead of paying a page
    fault per 4 KiB again. At most FASTLSTM_CPU_CACHE_MB megabytes (default 1024) are kept idle.
    """
    _C.empty_cache()


def cached_bytes() -> int:
    """Bytes of idle host buffers fastlstm currently keeps for reuse (see :func:`empty_cache`)."""
    return int(_C.cached_bytes())


def cpu_capability() -> str:
    """The SIMD level the CPU kernels run at in this process: 'AVX512', 'AVX2' or 'DEFAULT'.

    The extension holds the kernels of every level; the widest one the running CPU supports is
    chosen when first needed. ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``), set before the first
    CPU call, forces a lower level, as it does for torch's own CPU kernels. At the AVX512 level on
    a CPU with AVX512_BF16 it reads 'AMX_BF16' or 'AVX512_BF16' instead: bfloat16 layers without a
    projection then run bfloat16 kernels, their products on AMX tiles (where the CPU has AMX-BF16
    and FASTLSTM_CPU_AMX is not 0) or with vdpbf16ps; elsewhere bfloat16 computes in float32.
    """
    return str(_C.cpu_capability())
