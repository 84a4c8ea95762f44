"""Desk model of the cluster kernels (persistent kernel v2) per step, forward and backward.

A PREDICTION, not a measurement: no GPU has run these kernels. It repeats the plan of
csrc/cuda/lstm_cluster_cuda.cu (TileSplit, BlockLayout, the kernel variants, the choice among them;
every variant compiles without spills, benchmarks/results/ptxas-cluster-sm_90-*.txt) for an H100 SXM,
and turns each block's per-step work into microseconds with the assumed costs of `Device`, which
the first GPU session replaces with measured ones (benchmarks/calibrate/sync_latency.cu, then the
contenders of benchmarks/bench.py). Run: `python benchmarks/cluster_desk_model.py` (prints markdown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARPS, THREADS = 8, 256
VARIANTS = [(0, 4), (16, 4), (32, 2), (40, 1)]  # (W tiles in registers per warp, cell elements per thread)


@dataclass(frozen=True)
class Device:
    """Assumed H100 SXM figures (estimates: PERF.md, the CUDA guide's per-SM throughputs)."""

    sms: int = 132
    ghz: float = 1.755
    smem_optin: int = 227 * 1024
    resident_clusters: dict = None  # clusters of (16, 8) blocks resident at once (assumed)
    lds_bytes_per_clk: int = 128  # shared-memory bandwidth per SM
    mma_latency_clk: float = 35  # a dependent mma.sync m16n8k16 (two accumulator chains per warp)
    mma_issue_clk: float = 6  # one mma.sync per sub-partition's tensor core (about 60% of wgmma's peak)
    dsmem_store_clk: float = 4  # one warp-wide store instruction to peers' shared memory (issue + fabric)
    cell_us: float = 0.1  # the cell (and its backward) on a thread's elements, global stores included
    block_sync_us: float = 0.02  # __syncthreads() before the slice is sent
    cluster_barrier_us: float = 0.3  # PERF.md's estimate
    second_barrier_us: float = 0.2  # one exchange buffer: the second barrier, partly overlapped
    gemm_tflops: float = 400  # cuBLAS on the input projection and weight gradients (skinny GEMMs)

    def clusters(self, C: int) -> int:
        return (self.resident_clusters or {16: 7, 8: 16})[C]


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class Split:
    """TileSplit: the bands in groups of G, every group's K cut into ksplit ranges, the (group, range)
    items dealt to the warps; G slots per k tile (the bottom group may leave some empty)."""

    G: int
    mtiles: int
    ktiles: int
    ksplit: int = 0

    @property
    def groups(self) -> int:
        return math.ceil(self.mtiles / self.G)

    @staticmethod
    def of(G: int, mtiles: int, ktiles: int) -> Split:
        best = Split(G, mtiles, ktiles, 1)
        for s in range(2, min(WARPS, ktiles) + 1):
            if Split(G, mtiles, ktiles, s).most() < best.most():
                best = Split(G, mtiles, ktiles, s)
        return best

    def tiles_of(self, warp: int) -> int:
        """Slots: G per k tile of the warp's items."""
        begin = lambda r: r * self.ktiles // self.ksplit  # noqa: E731
        return sum(self.G * (begin(i // self.groups + 1) - begin(i // self.groups))
                   for i in range(warp, self.groups * self.ksplit, WARPS))

    def most(self) -> int:
        return max(self.tiles_of(w) for w in range(WARPS))


@dataclass(frozen=True)
class Layout:
    backward: bool
    H: int
    hb: int
    rows: int
    eb: int  # bytes per tensor-core element: 2 (bf16, fp16), 4 (tf32)
    R: int
    buffers: int = 2

    @property
    def split(self) -> Split:
        Mp = round_up(self.hb if self.backward else 4 * self.hb, 16)
        Kp = round_up(4 * self.H if self.backward else self.H, 16)
        return Split.of(1 if self.backward else 2, Mp // 16, Kp // (32 // self.eb))  # bands_per_item

    @property
    def bytes(self) -> int:
        Mp = round_up(self.hb if self.backward else 4 * self.hb, 16)
        Kp = round_up(4 * self.H if self.backward else self.H, 16)
        a16 = lambda n: round_up(n, 16)  # noqa: E731
        s = self.split
        w = a16(512 * WARPS * max(0, s.most() - self.R // s.G * s.G))
        b = a16(self.eb * self.buffers * self.rows * (Kp + 16 // self.eb))
        part = a16(4 * s.ksplit * self.rows * (Mp + 4))
        return w + b + part + (a16(4 * 2 * WARPS * 2) if self.backward else 0)


@dataclass
class Plan:
    C: int
    hb: int
    R: int
    cells: int
    rows: int
    clusters: int
    buffers: int
    layout: Layout


def plan(H: int, B: int, eb: int, backward: bool, dev: Device) -> Plan | str:
    """The plan of lstm_cluster_cuda.cu's plan_for, or why it cannot run the layer."""
    reason = ""
    for C in (16, 8):
        hb = math.ceil(H / C)
        most = Layout(backward, H, hb, 8, eb, 0).split.most()
        usable = [v for v in VARIANTS if v[1] * THREADS // hb >= 8]
        order = [v for v in usable if v[0] >= most] + [v for v in reversed(usable) if v[0] < most]
        chosen = next(((v, b) for v in order for b in (2, 1) if Layout(backward, H, hb, 8, eb, v[0], b).bytes + 1024
                       <= dev.smem_optin), None)
        if chosen is None:
            reason = reason or f"W_hh does not fit {C} blocks' registers and shared memory"
            continue
        (R, cells), buffers = chosen
        rows_max = cells * THREADS // hb // 8 * 8
        resident = dev.clusters(C)
        rows = min(8 * math.ceil(math.ceil(B / 8) / resident), rows_max)
        while rows > 8 and Layout(backward, H, hb, rows, eb, R, buffers).bytes + 1024 > dev.smem_optin:
            rows -= 8
        return Plan(C, hb, R, cells, rows, math.ceil(B / rows), buffers, Layout(backward, H, hb, rows, eb, R, buffers))
    return reason


def step_us(p: Plan, dev: Device) -> float:
    """One step of one cluster: the products, the cell, the exchange over DSMEM, the barrier(s)."""
    L, s = p.layout, p.layout.split
    ntiles = p.rows // 8
    mma = [s.tiles_of(w) * ntiles for w in range(WARPS)]  # empty slots counted: an overestimate
    shared = [max(0, s.tiles_of(w) - p.R // s.G * s.G) * ntiles for w in range(WARPS)]
    latency = max(mma) * dev.mma_latency_clk / 2  # two independent chains: alternate k tiles or bands
    issue = max(sum(mma[w] for w in range(q, WARPS, 4)) for q in range(4)) * dev.mma_issue_clk
    lds = (sum(mma) // s.G * 256 + sum(shared) * 512) / dev.lds_bytes_per_clk  # a B fragment per k tile
    products = max(latency, issue, lds) / (dev.ghz * 1e3)
    # send_to_peers: the block's slice of h_t (hb values per row) or dG_t (4 hb) to the C - 1 other
    # blocks, in 16-byte pieces where the slice is 16-byte aligned, else one element per store.
    values = (4 if L.backward else 1) * p.hb
    per_row = values * L.eb // 16 if values * L.eb % 16 == 0 else values
    stores = math.ceil((p.C - 1) * p.rows * per_row / 32)  # warp-wide store instructions
    exchange = stores * dev.dsmem_store_clk / (dev.ghz * 1e3) + dev.block_sync_us
    barrier = dev.cluster_barrier_us + (dev.second_barrier_us if p.buffers == 1 else 0)
    return products + dev.cell_us + 0.02 * s.ksplit + exchange + barrier


def waves(p: Plan, dev: Device) -> int:
    """Clusters beyond those resident at once run after them: the whole sequence again."""
    return math.ceil(p.clusters / dev.clusters(p.C))


def describe(p: Plan | str) -> str:
    if isinstance(p, str):
        return f"persistent v1 ({p})"
    where = f"{p.R} reg + {max(0, p.layout.split.most() - p.R)} smem tiles/warp" if p.R < p.layout.split.most() \
        else f"{p.layout.split.most()} reg tiles/warp"
    return (f"{p.clusters}x{p.C} blocks, {p.rows} rows, {where}, {p.cells} cells"
            + (", 1 buffer" if p.buffers == 1 else ""))


def gemm_ms(T: int, B: int, I: int, H: int, dev: Device, backward: bool) -> float:
    """The input projection (and in the backward dX, dW_ih, dW_hh): cuBLAS, outside the recurrence."""
    flops = 2 * T * B * 4 * H * (I + (2 * I + H if backward else 0))
    return flops / (dev.gemm_tflops * 1e12) * 1e3


def main() -> None:
    dev = Device()
    print("Prediction (benchmarks/cluster_desk_model.py; assumed H100 SXM costs in its Device).\n")
    print("| dtype | H | B | forward plan | fwd µs/step | backward plan | bwd µs/step |")
    print("|---|---|---|---|---|---|---|")
    for name, eb in (("bf16/fp16", 2), ("fp32 (tf32)", 4)):
        for H in (256, 512, 768, 1024):
            for B in (1, 16, 64):
                f, b = plan(H, B, eb, False, dev), plan(H, B, eb, True, dev)
                fus = f"{step_us(f, dev) * waves(f, dev):.2f}" if isinstance(f, Plan) else "v1"
                bus = f"{step_us(b, dev) * waves(b, dev):.2f}" if isinstance(b, Plan) else "v1"
                print(f"| {name} | {H} | {B} | {describe(f)} | {fus} | {describe(b)} | {bus} |")
    T, B, H = 1024, 16, 768
    f, b = plan(H, B, 2, False, dev), plan(H, B, 2, True, dev)
    assert isinstance(f, Plan) and isinstance(b, Plan)
    fwd = T * step_us(f, dev) * waves(f, dev) / 1e3 + gemm_ms(T, B, H, H, dev, False)
    bwd = T * step_us(b, dev) * waves(b, dev) / 1e3 + gemm_ms(T, B, H, H, dev, True) - gemm_ms(T, B, H, H, dev, False)
    print(f"\ncuDNN's reference shape (fp16, T={T}, B={B}, I=H={H}): forward {fwd:.2f} ms (cuDNN persistent "
          f"2.01 ms: {2.01 / fwd:.2f}x), forward+backward {fwd + bwd:.2f} ms (cuDNN 5.19 ms: {5.19 / (fwd + bwd):.2f}x; "
          f"target <= 3.4 ms)")


if __name__ == "__main__":
    main()
