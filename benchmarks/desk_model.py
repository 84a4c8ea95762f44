"""Desk model of the persistent kernel v1 per step, before and after the desk-review fixes.

A PREDICTION, not a measurement: no GPU has run these kernels. It turns the instruction mix read
from the SASS (`cuobjdump -sass`, see benchmarks/NOTES.md) into microseconds with the H100 SXM
costs below, which the first GPU session replaces with calibrated ones
(benchmarks/calibrate/sync_latency.cu). Run: `python benchmarks/desk_model.py` (prints markdown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """Assumed H100 SXM costs (estimates; PERF.md and the CUDA guide's per-SM throughputs)."""

    sms: int = 132
    ghz: float = 1.755
    smem_bytes_per_clk: int = 128  # shared-memory bandwidth per SM
    fma_per_clk: int = 128  # FP32 FMA lanes per SM
    l2_bytes_per_us: float = 5.5e6  # aggregate L2 bandwidth, 5.5 TB/s
    l2_latency_us: float = 0.35  # a global load that misses L1 (~600 cycles)
    dependent_iteration_us: float = 0.2  # one iteration of a loop of dependent element loads
    grid_barrier_us: float = 1.0  # grid.sync() over all SMs (PERF.md's estimate)
    epilogue_us: float = 0.3  # cell math and stores after the dot products


THREADS, ROWS, IN_FLIGHT = 256, 4, 4  # kThreads, kRows, copy_to_shared's loads in flight


def shape(H: int, dev: Device) -> tuple[int, int]:
    hb = math.ceil(H / dev.sms)
    return hb, math.ceil(H / hb)


def stage_us(values: int, elem: int, blocks: int, dev: Device, fixed: bool) -> float:
    """Every block copies `values` elements of the step's exchange from L2 to shared memory."""
    if not fixed:  # one dependent element load per thread per iteration
        return math.ceil(values / THREADS) * dev.dependent_iteration_us
    rounds = math.ceil(values * elem / (THREADS * 16 * IN_FLIGHT))
    return max(rounds * dev.l2_latency_us, blocks * values * elem / dev.l2_bytes_per_us)


def dot_us(hb: int, B: int, depth: int, w_elem: int, x_elem: int, dev: Device, gates: int) -> float:
    """Warp items of (unit, ROWS batch rows) over a reduction of `depth`: shared memory or FMA bound."""
    groups = math.ceil(B / ROWS)
    smem = hb * groups * depth * (gates * w_elem + ROWS * x_elem)
    fma = hb * B * depth * gates
    clk = max(smem / dev.smem_bytes_per_clk, fma / dev.fma_per_clk)
    return clk / (dev.ghz * 1e3)


def forward_us(H: int, B: int, elem: int, dev: Device, fixed: bool) -> float:
    hb, blocks = shape(H, dev)
    staged = elem if fixed else 4  # v1 staged in fp32 (acc_t), now in the tensor dtype
    return (dev.grid_barrier_us + stage_us(B * H, elem, blocks, dev, fixed)
            + dot_us(hb, B, H, elem, staged, dev, 4) + dev.epilogue_us)


def backward_us(H: int, B: int, elem: int, dev: Device, fixed: bool) -> float:
    hb, blocks = shape(H, dev)
    if fixed:  # phase A over all threads: independent loads per element
        phase_a = math.ceil(B * hb / THREADS) * dev.l2_latency_us
    else:  # a warp per batch row, lanes over the block's few units
        phase_a = math.ceil(B / (THREADS // 32)) * math.ceil(hb / 32) * dev.l2_latency_us
    staged = elem if fixed else 4
    return (dev.grid_barrier_us + phase_a + stage_us(B * 4 * H, elem, blocks, dev, fixed)
            + dot_us(hb, B, 4 * H, elem, staged, dev, 1) + dev.epilogue_us)


def main() -> None:
    dev = Device()
    print("Prediction (desk model, H100 SXM costs assumed in benchmarks/desk_model.py), µs per step")
    print()
    print("| dtype | H | B | forward before | forward after | backward before | backward after |")
    print("|---|---|---|---|---|---|---|")
    for name, elem in (("fp32", 4), ("bf16", 2)):
        for H in (256, 512, 1024):
            for B in (1, 16, 64):
                f0, f1 = forward_us(H, B, elem, dev, False), forward_us(H, B, elem, dev, True)
                b0, b1 = backward_us(H, B, elem, dev, False), backward_us(H, B, elem, dev, True)
                print(f"| {name} | {H} | {B} | {f0:.1f} | {f1:.1f} | {b0:.1f} | {b1:.1f} |")


if __name__ == "__main__":
    main()
