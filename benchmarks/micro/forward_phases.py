#!/usr/bin/env python3
"""Where fastlstm's CPU forward spends its time: `perf record` (cpu-clock sampling, which works
in VMs without hardware counters) of repeated inference forwards, samples grouped by phase:

  input projection   x W_ih^T: the fused forward's projection tiles (float kernels), else the
                     packed kernel (or ATen's mm, MKL's sgemm, for I > 512)
  recurrent product  the k loop of the fused forward tile (h_{t-1} W_hh^T in registers)
  cell epilogue      the rest of the fused tile: bias, activations, c and h stores
  barrier            the step's spin barrier, and OpenMP's own waits and wake-ups
  other              Python, torch dispatch, copies, the kernel

The step loop (with the spin barrier) and the register tiles (with the reduction and, on the
float kernels, the bias and gate loads of the epilogue; its cell update is row_epilogue) are told
apart by address: samples inside a loop (a backward branch) that holds
broadcasts and FMAs are the product's, inside one that holds `pause` the barrier's, the rest the
epilogue's (with the step's bookkeeping and prefetches).

  PYTHONPATH=. python benchmarks/micro/forward_phases.py --B 16 --H 128 [--T 1000] [--calls 20]
For the AVX2 kernels: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL ignores ATen's
variable).
Needs `perf` and perf_event_paranoid <= 2 (user-space sampling).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

WORKLOAD = """
import os, signal, subprocess, sys, time, torch, fastlstm
T, B, H, calls, threads, data = *map(int, sys.argv[1:6]), sys.argv[6]
torch.set_num_threads(threads)
torch.manual_seed(0)
m = fastlstm.LSTM(H, H)
x = torch.randn(T, B, H)
with torch.no_grad():
    m(x)
    m(x)
    # Sample only the timed calls: perf attaches to this process after the warm-up.
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", str(os.getpid()),
                             "-o", data], stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    start = time.perf_counter()
    for _ in range(calls):
        m(x)
    elapsed = time.perf_counter() - start
    perf.send_signal(signal.SIGINT)
    perf.wait()
print(f"{elapsed / calls * 1e3:.2f} ms per forward "
      f"(capability {fastlstm.cpu_capability()}, {torch.get_num_threads()} threads)")
"""

# The fused forward's step loop and its register tiles (out of line), split by split_fused.
FUSED = r"fused_forward|forward_tile<"
PHASES = ("input projection", "recurrent product", "cell epilogue", "barrier", "other")


def report_rows(report: str) -> list[tuple[float, str, str]]:
    """(percent, dso, symbol) of each line of `perf report --sort dso,sym` text."""
    rows = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*\S)", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3)))
    return rows


def phase_of(dso: str, sym: str) -> str:
    if re.search(r"mkl_|sgemm|::tile<|::multiply<|projection_tile<", sym):
        return "input projection"
    if "libgomp" in dso or re.search(r"SpinBarrier|arrive_and_wait|sched_yield", sym):
        return "barrier"
    if re.search(r"cell_epilogue|cell_forward|row_epilogue", sym):
        return "cell epilogue"
    return "other"


def split_fused(annotate: str) -> dict[str, float]:
    """A fused forward function's samples (`perf annotate` text) by phase, as fractions. Each
    instruction belongs to the innermost loop (backward branch) around it; a loop whose own
    instructions hold FMAs and broadcasts is the register-tile reduction, one holding `pause` the
    spin barrier; every other instruction is the epilogue's (and the step's bookkeeping)."""
    rows = []  # (address, percent, instruction)
    for line in annotate.splitlines():
        m = re.match(r"\s*([\d.]+)?\s*:\s*([0-9a-f]+):\s*(.*)", line)
        if m:
            rows.append((int(m.group(2), 16), float(m.group(1) or 0), m.group(3)))
    loops = []  # (first address, last address)
    for addr, _, ins in rows:
        jump = re.match(r"j\w+\s+([0-9a-f]+)", ins)
        if jump and int(jump.group(1), 16) < addr:
            loops.append((int(jump.group(1), 16), addr))
    loops.sort(key=lambda lo: lo[1] - lo[0])  # innermost first

    def innermost(addr: int) -> tuple[int, int] | None:
        return next((lo for lo in loops if lo[0] <= addr <= lo[1]), None)

    own: dict[tuple[int, int], list[str]] = defaultdict(list)
    owner = {}
    for addr, _, ins in rows:
        owner[addr] = innermost(addr)
        if owner[addr] is not None:
            own[owner[addr]].append(ins)

    def label(loop: tuple[int, int] | None) -> str:
        body = own.get(loop, []) if loop else []
        if any(i.startswith("pause") for i in body):
            return "barrier"
        if sum("vfmadd" in i for i in body) >= 4 and any("broadcast" in i for i in body):
            return "recurrent product"
        return "cell epilogue"

    total = sum(p for _, p, _ in rows) or 1.0
    out: dict[str, float] = defaultdict(float)
    for addr, p, _ in rows:
        out[label(owner[addr])] += p / total
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=1000)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        run = subprocess.run([sys.executable, "-c", WORKLOAD, str(args.T), str(args.B), str(args.H), str(args.calls),
                              str(args.threads), data], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"the profiled run failed: {run.stderr.strip()}")
        print(f"T={args.T} B={args.B} I=H={args.H}: {run.stdout.strip()}")
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym"],
                                capture_output=True, text=True).stdout
        shares: dict[str, float] = defaultdict(float)
        for pct, dso, sym in report_rows(report):
            if re.search(FUSED, sym):
                ann = subprocess.run(["perf", "annotate", "-i", data, "--stdio", "--no-source", sym],
                                     capture_output=True, text=True).stdout
                for phase, fraction in split_fused(ann).items():
                    shares[phase] += pct * fraction
            else:
                shares[phase_of(dso, sym)] += pct
    total = sum(shares.values()) or 1.0
    print("| phase | share of samples |")
    print("|---|---|")
    for phase in PHASES:
        print(f"| {phase} | {100 * shares[phase] / total:.1f}% |")
    other = [(p, sym) for p, dso, sym in report_rows(report) if phase_of(dso, sym) == "other" and not re.search(FUSED, sym)]
    print("largest in 'other':", "; ".join(f"{p:.1f}% {sym[:50]}" for p, sym in other[:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
