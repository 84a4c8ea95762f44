"""Peak memory of the streaming TBPTT trainer (fastlstm.tbptt) at T = 10,000 and T = 1,000,000.

The claim under test: training with ``fastlstm.tbptt.run_stream`` needs memory that depends on the
window length (k2), the batch and the model, not on the sequence length T. So the peak at
T = 1,000,000 must be within 10% of the peak at T = 10,000 (the script checks this and exits with
status 1 if not). For contrast it also measures one ordinary full-sequence call (forward and
backward over all of T at once), whose memory grows linearly with T.

How memory is measured
----------------------
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the bytes
  allocated before the run: the peak of live tensor bytes during the run, everything included
  (activations, gradients, optimizer state, the kernels' workspaces).
* CPU: PyTorch keeps no allocator statistics for the CPU, and ``tracemalloc`` does not see
  tensor memory. The script measures the process's **peak resident set size** instead, with
  Linux's resettable high-water mark: after setup and a warm-up run it writes ``5`` to
  ``/proc/self/clear_refs`` (which resets ``VmHWM`` to the current RSS), runs the training, and
  reports ``VmHWM - VmRSS(at reset)`` from ``/proc/self/status``. This is what the operating
  system had to provide at the worst moment of the run, beyond what was already resident: every
  allocation counts (tensors, the C++ kernels' internal buffers, Python objects, allocator
  fragmentation), nothing is sampled, and nothing can be missed between samples. Each
  measurement runs in a fresh subprocess so that one run's allocator state cannot hide or
  inflate another's, with glibc malloc told to return freed buffers to the system (see
  ``MALLOC_ENV``) so that RSS follows the live memory rather than the allocator's history,
  after a warm-up of 200 updates (see ``worker``). Where ``clear_refs`` is not available the peak RSS of the fresh
  subprocess (``resource.getrusage``) minus its RSS before the run is used, and said so.
* Both devices, in addition: the largest number of bytes saved for backward within one update
  (``torch.autograd.graph.saved_tensors_hooks``, each saved tensor counted, reset after every
  optimizer step). Exact and noise-free, it shows the activation memory of one window.

The input sequence is generated piece by piece (2,000 steps at a time) and streamed into
``run_stream``, so the data itself does not need O(T) memory either: the measurement is of the
trainer, and a 1M-step sequence that would not fit in memory can be trained this way.

Model: fastlstm.LSTM(I=4, H=32) + Linear(32, 1), batch B=4, float32, Adam; task: predict the next
value of a noisy sum of sinusoids (loss MSE). Defaults: k1 = k2 = 1000.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/tbptt_memory.py            # T = 10k and 1M, writes results
    PYTHONPATH=. .venv/bin/python benchmarks/tbptt_memory.py --k1 500 --k2 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fastlstm  # noqa: E402
from fastlstm import tbptt  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402  (this script's folder)

RESULTS = REPO / "benchmarks" / "results"

# glibc malloc settings of the worker processes (CPU): a fixed mmap threshold, so that every buffer
# of 128 KiB or more is mapped on allocation and unmapped on free, and the heap trimmed above
# 128 KiB of free space. Then RSS follows the live memory. With glibc's defaults the threshold
# adapts to the allocation history (freed buffers are kept and reused), which makes a peak-RSS
# reading depend on that history by several MiB either way. Other allocators ignore these.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0",
              "MALLOC_ARENA_MAX": "2"}


class Model(nn.Module):
    def __init__(self, I: int, H: int) -> None:
        super().__init__()
        self.lstm = fastlstm.LSTM(I, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x, state=None):
        y, state = self.lstm(x, state)
        return self.head(y), state


def signal(start: int, n: int, B: int, I: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps [start, start + n) of the task: x (n, B, I) noisy sinusoids, y (n, B, 1) next value."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    t = torch.arange(start, start + n + 1, dtype=torch.float64)[:, None, None]
    periods = torch.tensor([7.0, 31.0, 113.0, 997.0][:I] + [50.0] * max(0, I - 4), dtype=torch.float64)
    phase = torch.arange(B, dtype=torch.float64)[None, :, None]
    clean = torch.sin(2 * math.pi * t / periods + phase).float()
    x = clean[:-1] + 0.1 * torch.randn(n, B, I, generator=g)
    y = clean[1:, :, :1]
    return x, y


def stream(T: int, B: int, I: int, seed: int, piece: int, device: torch.device):
    """The sequence in pieces of ``piece`` steps, generated when asked for.

    The generator keeps no reference to a piece it has handed out (no local variable holds it),
    so only the pieces the trainer still buffers are alive.
    """
    for start in range(0, T, piece):
        yield tuple(t.to(device) for t in signal(start, min(piece, T - start), B, I, seed))


# ---- memory probes ----

class SavedBytes:
    """Largest number of bytes saved for backward within one update."""

    def __init__(self) -> None:
        self.current = 0
        self.worst = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.current += t.numel() * t.element_size()
        self.worst = max(self.worst, self.current)
        return t

    def reset(self, *_args) -> None:
        self.current = 0


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Model(args.I, args.H).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.functional.mse_loss
    # Warm-up: thread pools, lazy initialisation, optimizer state, every code path of the run
    # (windows inside a piece and across two; library code pages count in RSS), and 200 updates
    # for the heap to reach its steady state (a cold process grows its heap by a few MiB over the
    # first hundred updates, then stays flat), so that the measurement compares steady states.
    warmup = max(3 * args.piece, 200 * args.k1)
    tbptt.run_stream(model, stream(warmup, args.B, args.I, args.seed + 1, args.piece, device), loss_fn, opt,
                     k1=args.k1, k2=args.k2, progress=False)
    saved = SavedBytes()
    probe = PeakMemory(device, rusage_fallback=True)
    if args.mode == "stream":
        probe.start()
        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            result = tbptt.run_stream(model, stream(args.T, args.B, args.I, args.seed, args.piece, device), loss_fn,
                                      opt, k1=args.k1, k2=args.k2, total_steps=args.T, progress=args.progress,
                                      on_update=saved.reset)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        peak = probe.peak()
        final_loss = sum(result.losses[-10:]) / len(result.losses[-10:])
        updates = result.updates
    else:  # one call over the whole sequence (the data is materialised: it is part of this mode's cost)
        probe.start()
        started = time.perf_counter()
        x, y = signal(0, args.T, args.B, args.I, args.seed)
        x, y = x.to(device), y.to(device)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            opt.zero_grad()
            out, _ = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        peak = probe.peak()
        final_loss, updates = loss.item(), 1
    return {"T": args.T, "mode": args.mode, "peak_bytes": peak, "saved_bytes": saved.worst, "seconds": elapsed,
            "updates": updates, "final_loss": final_loss, "method": probe.method,
            "threads": torch.get_num_threads()}


def measure(args: argparse.Namespace, T: int, mode: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--T", str(T), "--mode", mode, "--device", args.device,
               "--k1", str(args.k1), "--k2", str(args.k2), "--B", str(args.B), "--I", str(args.I),
               "--H", str(args.H), "--seed", str(args.seed), "--piece", str(args.piece),
               "--threads", str(args.threads or 0)]
    if args.progress:
        command.append("--progress")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(MALLOC_ENV)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[10_000, 1_000_000], help="sequence lengths (streamed)")
    parser.add_argument("--full-T", type=int, nargs="*", default=[10_000, 100_000],
                        help="sequence lengths for the one-call contrast (memory O(T)); none to skip")
    parser.add_argument("--k1", type=int, default=1000)
    parser.add_argument("--k2", type=int, default=1000)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--I", type=int, default=4)
    parser.add_argument("--H", type=int, default=32)
    parser.add_argument("--piece", type=int, default=2_000, help="steps per generated piece of the stream")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="tqdm bar in the workers")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: results/tbptt_memory-DEVICE.md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.T = args.T[0]
        print(json.dumps(worker(args)))
        return 0

    rows = [measure(args, T, "stream") for T in args.T]
    rows += [measure(args, T, "full") for T in args.full_T]
    from environment import device_name as name_of  # the benchmarks' shared helper (this script's folder)
    device_name = name_of(torch.device(args.device))
    lines = [
        f"# Streaming TBPTT memory ({args.device}: {device_name})",
        "",
        f"fastlstm.LSTM(I={args.I}, H={args.H}) + Linear({args.H}, 1), B={args.B}, float32, Adam; "
        f"k1={args.k1}, k2={args.k2}; torch {torch.__version__}, {rows[0]['threads']} thread(s).",
        f"Peak memory: {rows[0]['method']}, measured in a fresh process per row, beyond what was resident "
        "after setup and warm-up. Saved/update: the most bytes saved for backward within one update.",
        "",
        "| mode | T | updates | peak memory | saved/update | time | s per 1M steps | mean loss (last 10 updates) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = "streamed (run_stream)" if r["mode"] == "stream" else "one call over all of T"
        lines.append(f"| {mode} | {r['T']:,} | {r['updates']:,} | {mib(r['peak_bytes'])} | {mib(r['saved_bytes'])} | "
                     f"{r['seconds']:.1f} s | {r['seconds'] / r['T'] * 1e6:.1f} | {r['final_loss']:.4g} |")
    streamed = [r for r in rows if r["mode"] == "stream"]
    lo, hi = min(r["peak_bytes"] for r in streamed), max(r["peak_bytes"] for r in streamed)
    ok = hi <= 1.10 * lo
    verdict = (f"Streamed peaks from T={min(args.T):,} to T={max(args.T):,}: {mib(lo)} .. {mib(hi)} "
               f"(ratio {hi / max(lo, 1):.3f}): {'within' if ok else 'NOT within'} 10%.")
    lines += ["", verdict, ""]
    text = "\n".join(lines)
    print(text)
    out = args.out or RESULTS / f"tbptt_memory-{'cuda' if args.device.startswith('cuda') else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/tbptt_memory.py " + " ".join(sys.argv[1:])
    out.write_text(text + f"\nCommand: `{command.strip()}`\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
