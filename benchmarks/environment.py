"""What the results were measured on: device, software versions, settings and the command line."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import fastlstm

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(command: list[str]) -> str | None:
    """stdout of a short command, or None when it is missing or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
    name = re.sub(r"\((r|tm)\)", "", device_name(device), flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type
    return slug if device.type == "cuda" else f"cpu-{slug}"


def _git_commit() -> str | None:
    commit = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    if commit is None:
        return None
    dirty = _run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return f"{commit} (uncommitted changes)" if dirty else commit


def _gpu(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    driver = None
    if shutil.which("nvidia-smi"):
        driver = _run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "gpu_name": props.name,
        "gpu_index": index,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "driver_version": driver,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "tf32_cublas_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def collect(device: torch.device, settings: dict[str, Any], libraries: dict[str, str]) -> dict[str, Any]:
    """Everything needed to interpret and reproduce a run."""
    now = datetime.datetime.now().astimezone()
    info: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "fastlstm_version": fastlstm.__version__,
        "fastlstm_cuda_compiled": fastlstm.cuda_compiled(),
        "fastlstm_cpu_capability": fastlstm.cpu_capability(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # What lowers the SIMD level of each side: ATen's and fastlstm's kernels, MKL, oneDNN.
        "isa_environment": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
        "git_commit": _git_commit(),
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "other_libraries": libraries,
        "settings": settings,
    }
    if device.type == "cuda":
        info.update(_gpu(device))
    return info
