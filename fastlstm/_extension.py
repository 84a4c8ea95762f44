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


def cpu_capability() -> str:
    """The SIMD level the CPU kernels were compiled for ('AVX2' or 'DEFAULT')."""
    return str(_C.cpu_capability())
