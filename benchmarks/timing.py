"""Timing and peak-memory helpers.

* CUDA: one pair of CUDA events around each call, ``torch.cuda.synchronize()`` before and after;
  peak memory = ``max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the call.
* CPU: ``time.perf_counter()`` around each call; no peak memory.

Contenders are interleaved call by call (A B, then B A, ...) after their warm-up, so slow drifts of
a noisy machine hit every side alike; the median and the minimum of the repeats are kept.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Measurement:
    """Repeated timings of one call, its peak memory, or why there are none."""

    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None    # the call failed: 'RuntimeError: CUDA out of memory ...'
    skipped: str | None = None  # the call was not attempted, and why

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and bool(self.times_ms)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def min_ms(self) -> float | None:
        return min(self.times_ms) if self.times_ms else None

    def to_json(self) -> dict[str, object]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "times_ms": self.times_ms,
                "peak_mib": None if self.peak_bytes is None else self.peak_bytes / 2**20,
                "error": self.error, "skipped": self.skipped}


@dataclass
class Case:
    """One contender in one phase: ``prepare`` runs untimed before every call, ``run`` is timed."""

    name: str
    run: Callable[[], None]
    prepare: Callable[[], None]


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message', short enough for a table cell."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= 160 else text[:157] + "..."


class DeviceTimer:
    """Times calls and measures their peak memory on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def release(self) -> None:
        """Return cached blocks after a failure or between configurations."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def available_bytes(self) -> int | None:
        """Free device memory (CUDA, after emptying the cache), or MemAvailable on Linux; None if unknown."""
        if self.cuda:
            self.release()
            return int(torch.cuda.mem_get_info(self.device)[0])
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def time_ms(self, fn: Callable[[], None]) -> float:
        """Wall time of one call in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return float(start.elapsed_time(end))
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    def peak_bytes(self, fn: Callable[[], None]) -> int | None:
        """Peak memory allocated during one call beyond what was allocated before it (CUDA only)."""
        if not self.cuda:
            return None
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - before)


def measure(timer: DeviceTimer, cases: Sequence[Case], warmup: int, repeats: int) -> dict[str, Measurement]:
    """``warmup`` untimed calls, one call for peak memory (CUDA), then ``repeats`` timed calls of every
    case, interleaved.

    A case that raises is recorded with its error and leaves the rotation; the others go on.
    """
    results = {case.name: Measurement() for case in cases}
    active = list(cases)

    def attempt(case: Case, action: Callable[[Callable[[], None]], object]) -> object:
        try:
            case.prepare()
            return action(case.run)
        except Exception as error:  # noqa: BLE001 - any failure is reported in the row
            results[case.name].error = describe_error(error)
            active.remove(case)
        timer.release()  # outside the handler, once the failed call's tensors are unreachable
        return None

    for _ in range(warmup):
        for case in list(active):
            attempt(case, lambda fn: fn())
    for case in list(active):  # after the warm-up: lazily created workspaces are not charged to a call
        results[case.name].peak_bytes = attempt(case, timer.peak_bytes)  # type: ignore[assignment]
    for rep in range(repeats):
        for case in list(active if rep % 2 == 0 else reversed(active)):
            elapsed = attempt(case, timer.time_ms)
            if elapsed is not None:
                results[case.name].times_ms.append(float(elapsed))  # type: ignore[arg-type]
    return results
