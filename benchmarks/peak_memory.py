"""Peak memory of a block of code, beyond what was in use when it started (the demo and the
streaming-memory benchmark).

CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics. CPU: the process's
peak RSS, VmHWM, after resetting it through /proc/self/clear_refs (Linux). Where that reset is not
possible, the lifetime peak from ``getrusage`` minus the RSS at the start when ``rusage_fallback``
(an upper bound, and said so in ``method``), else NaN. On the CPU, freed heap memory is returned to
the OS first (glibc ``malloc_trim``), so that what an earlier phase freed but the allocator kept
does not hide this phase's growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
import resource

import torch

VMHWM = "peak RSS (VmHWM reset via /proc/self/clear_refs)"
RUSAGE = "peak RSS of the process (getrusage) minus RSS before the run"


def _status(field: str) -> int:
    """A /proc/self/status field in bytes, or -1."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else -1
    except OSError:
        return -1


def _release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), so that memory a previous phase freed
    but the allocator kept does not sit in the starting RSS and hide this phase's growth."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: the starting RSS may include freed memory (the peak is then an underestimate)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``start()`` then ``peak()`` (bytes), or ``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``."""

    def __init__(self, device: torch.device, rusage_fallback: bool = False) -> None:
        self.device = device
        self.rusage_fallback = rusage_fallback
        self.method = ""
        self.base: int | None = None

    def start(self) -> None:
        gc.collect()
        if self.device.type != "cuda":
            _release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_hwm():
            self.base = _status("VmRSS")
            self.method = VMHWM
        elif self.rusage_fallback:
            self.base = _status("VmRSS") if os.path.exists("/proc/self/status") else 0
            self.method = RUSAGE
        else:
            self.base = None
            self.method = "not measured (no /proc/self/clear_refs)"

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.method == VMHWM:
            return _status("VmHWM") - self.base
        if self.method == RUSAGE:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return float("nan")

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = self.peak()
