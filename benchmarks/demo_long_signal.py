"""Newcomer demo: train on a long signal at full resolution instead of downsampling it.

The task (generated locally, no download)
-----------------------------------------
A machine-vibration-like signal of T = 10,000 steps: a slow drift (a sinusoid with
a period of 800-1200 steps and random phase), white noise (std 0.3), and a fast carrier of
amplitude 0.7 whose period tells the machine's state: 4 steps in state 0, 6 steps in state 1. The
state changes at random every 150-600 steps. The label is the state at every step; the test error
is measured at 200 evenly spaced points per sequence (the last step of each window of T/200
steps).

The usual shortcut for an LSTM on long signals is to downsample, here to 200 points by averaging
windows of T/200 steps (anti-aliased decimation). That averages the carrier away (its period is
far shorter than the window): what is left is drift and noise, so the downsampled model cannot
know the state. At full resolution the state is a local pattern of a few steps.

The two contenders
------------------
(a) ``torch.nn.LSTM`` on the downsampled signal: 200 steps, label of each window's last step.
(b) ``fastlstm.LSTM`` on the full signal with in-kernel truncated BPTT (``tbptt_chunk``) and
    in-kernel recurrent gradient clipping (``grad_clip``), a loss at every step, and
    ``record_grad_norms=True`` to plot the gradient norm reaching h_t against t.

Same hidden size, optimizer (Adam), batch size and number of updates for both. The script prints
a table (training wall time, peak memory during training, final test error) and writes it with
the gradient-norm plot to ``benchmarks/results/``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (after a reset), on the CPU the growth
of the process's peak resident set size during the phase (``VmHWM`` reset through
``/proc/self/clear_refs``; see benchmarks/tbptt_memory.py), both beyond what was allocated before
the phase.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/demo_long_signal.py            # --quick: CPU, about 2 minutes
    PYTHONPATH=. .venv/bin/python benchmarks/demo_long_signal.py --full     # bigger model and budget: a GPU
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fastlstm  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402  (this script's folder)

RESULTS = REPO / "benchmarks" / "results"
POINTS = 200  # the downsampled length, and the number of evaluation points per sequence
PERIODS = (4.0, 6.0)


@dataclass
class Config:
    T: int
    batch: int
    hidden: int
    updates: int
    tbptt_chunk: int
    grad_clip: float
    lr: float
    test_sequences: int


# --quick: the full-length task with a small model and few updates (about 2 minutes on 2 CPU cores).
QUICK = Config(T=10_000, batch=16, hidden=32, updates=200, tbptt_chunk=250, grad_clip=1.0, lr=1e-2,
               test_sequences=32)
# --full: a larger model, batch and budget, for a GPU.
FULL = Config(T=10_000, batch=64, hidden=128, updates=1000, tbptt_chunk=500, grad_clip=1.0, lr=3e-3,
              test_sequences=128)


def make_batch(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, B, 1) float32, y (T, B) int64: the state at every step."""
    t = torch.arange(T, dtype=torch.float32)[:, None]
    x = 0.3 * torch.randn(T, B, generator=g)
    drift_period = 800 + 400 * torch.rand(B, generator=g)
    x += torch.sin(2 * math.pi * t / drift_period + 2 * math.pi * torch.rand(B, generator=g))
    y = torch.zeros(T, B, dtype=torch.long)
    for b in range(B):
        start = 0
        while start < T:
            length = int(torch.randint(150, 600, (1,), generator=g))
            state = int(torch.randint(0, 2, (1,), generator=g))
            end = min(T, start + length)
            phase = 2 * math.pi * float(torch.rand((), generator=g))
            x[start:end, b] += 0.7 * torch.sin(2 * math.pi * t[start:end, 0] / PERIODS[state] + phase)
            y[start:end, b] = state
            start = end
    return x.unsqueeze(-1), y


def eval_points(t: torch.Tensor) -> torch.Tensor:
    """The POINTS evaluation steps of a time-major tensor: the last step of each window."""
    w = t.shape[0] // POINTS
    return t[w - 1::w][:POINTS]


def downsample(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, B, 1), (T, B) -> (POINTS, B, 1) window means, (POINTS, B) labels of each window's last step."""
    T, B, _ = x.shape
    w = T // POINTS
    xs = x[:w * POINTS].reshape(POINTS, w, B, 1).mean(1)
    return xs, eval_points(y)


class Tagger(nn.Module):
    """An LSTM and a linear read-out of the state at every step."""

    def __init__(self, lstm: nn.Module, hidden: int) -> None:
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


# ---- training ----

def evaluate(model: Tagger, xs: torch.Tensor, ys: torch.Tensor, downsampled: bool, device: torch.device) -> float:
    """Error rate at the POINTS evaluation steps of every test sequence."""
    model.eval()
    with torch.no_grad():
        if downsampled:
            xd, yd = downsample(xs, ys)
            pred = model(xd.to(device)).argmax(-1).cpu()
            target = yd
        else:
            pred = eval_points(model(xs.to(device)).argmax(-1).cpu())
            target = eval_points(ys)
    model.train()
    return (pred != target).float().mean().item()


def train(name: str, model: Tagger, cfg: Config, downsampled: bool, device: torch.device,
          test: tuple[torch.Tensor, torch.Tensor], seed: int) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    report_every = max(1, cfg.updates // 6)
    losses = []
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for update in range(cfg.updates):
            x, y = make_batch(cfg.batch, cfg.T, g)
            if downsampled:
                x, y = downsample(x, y)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if update % report_every == 0 or update == cfg.updates - 1:
                print(f"  [{name}] update {update:4d}  loss {loss.item():.4f}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    # The norms of the last backward: read them before evaluating, since LSTM.grad_norms belongs
    # to the module's latest forward (a no-grad forward records none).
    norms = getattr(model.lstm, "grad_norms", None)
    error = evaluate(model, *test, downsampled=downsampled, device=device)
    return {"name": name, "seconds": seconds, "peak": memory.peak_bytes, "error": error,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "norms": norms}


def mib(n: float) -> str:
    return "n/a" if n != n else f"{n / 2 ** 20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU-sized run (default): H=32, batch 16, 200 updates")
    size.add_argument("--full", action="store_true", help="H=128, batch 64, 1000 updates: for a GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--T", type=int, help="override the sequence length")
    parser.add_argument("--updates", type=int, help="override the number of updates")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="fastlstm checkpoint_every for (b) (0: off): activation memory O(T/k + k)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    cfg = FULL if args.full else QUICK
    if args.T:
        cfg.T = args.T
    if args.updates:
        cfg.updates = args.updates
    tag = "full" if args.full else "quick"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    window = cfg.T // POINTS
    print(f"Task: T={cfg.T} steps, state in a period-{PERIODS[0]:g} vs period-{PERIODS[1]:g} carrier; "
          f"downsampled: {POINTS} points (means of {window} steps). Device {device}, "
          f"{torch.get_num_threads()} thread(s).")
    test = make_batch(cfg.test_sequences, cfg.T, torch.Generator().manual_seed(10_000 + args.seed))
    # Warm-up with throwaway modules: the first use of each library (code pages, thread pools)
    # should not count in whichever phase happens to run first.
    def fast_lstm() -> fastlstm.LSTM:
        return fastlstm.LSTM(1, cfg.hidden, tbptt_chunk=cfg.tbptt_chunk, grad_clip=cfg.grad_clip,
                             record_grad_norms=True, checkpoint_every=args.checkpoint_every or None)

    for throwaway in (nn.LSTM(1, cfg.hidden), fast_lstm()):
        warm = Tagger(throwaway, cfg.hidden).to(device)
        F.cross_entropy(warm(torch.randn(2 * POINTS, 2, 1, device=device)).reshape(-1, 2),
                        torch.zeros(4 * POINTS, dtype=torch.long, device=device)).backward()
        evaluate(warm, *make_batch(2, 2 * POINTS, torch.Generator().manual_seed(1)), downsampled=False, device=device)

    # (a) torch.nn.LSTM on the downsampled signal.
    torch.manual_seed(args.seed)
    small = Tagger(nn.LSTM(1, cfg.hidden), cfg.hidden).to(device)
    a = train(f"(a) torch.nn.LSTM, downsampled to {POINTS}", small, cfg, True, device, test, args.seed + 1)

    # (b) fastlstm.LSTM on the full signal: TBPTT + recurrent clipping in the kernel, norms recorded.
    torch.manual_seed(args.seed)
    big = Tagger(fast_lstm(), cfg.hidden).to(device)
    b = train(f"(b) fastlstm.LSTM, full {cfg.T} steps", big, cfg, False, device, test, args.seed + 1)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"demo_long_signal-{device.type}-{tag}"
    plot_path = args.out / f"{stem}-grad_norms.png"
    fastlstm.plot_grad_norms(b["norms"], str(plot_path),
                             title=f"||dL/dh_t|| in the last update of (b): tbptt_chunk={cfg.tbptt_chunk}, "
                                   f"grad_clip={cfg.grad_clip}")

    opts = f"tbptt_chunk={cfg.tbptt_chunk}, grad_clip={cfg.grad_clip}" + (
        f", checkpoint_every={args.checkpoint_every}" if args.checkpoint_every else "")
    chance = 0.5
    lines = [
        f"# Long-signal demo ({tag}, {device.type})",
        "",
        f"Per-step state labelling of a {cfg.T}-step signal whose state is in a period-4 vs period-6 carrier "
        f"(amplitude 0.7) under drift and noise; test error at {POINTS} points per sequence "
        f"({cfg.test_sequences} test sequences; chance = {chance:.0%}). Both: hidden {cfg.hidden}, Adam lr {cfg.lr}, "
        f"batch {cfg.batch}, {cfg.updates} updates; torch {torch.__version__}, {torch.get_num_threads()} thread(s).",
        "",
        "| model | steps per sequence | training time | peak memory (training) | final train loss | test error |",
        "|---|---:|---:|---:|---:|---:|",
        f"| (a) torch.nn.LSTM, downsampled (means of {window} steps) | {POINTS} | {a['seconds']:.1f} s | "
        f"{mib(a['peak'])} | {a['final_loss']:.3f} | {a['error']:.1%} |",
        f"| (b) fastlstm.LSTM, full length ({opts}) | {cfg.T} | {b['seconds']:.1f} s | {mib(b['peak'])} | "
        f"{b['final_loss']:.3f} | {b['error']:.1%} |",
        "",
        f"Gradient norm vs step of (b)'s last update: `{plot_path.name}`.",
        "",
        "Peak memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                           "growth of the process's peak RSS during training (VmHWM reset via /proc/self/clear_refs)")
        + ", beyond what was allocated before the phase.",
    ]
    command = "PYTHONPATH=. .venv/bin/python benchmarks/demo_long_signal.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines)
    print()
    print(text)
    (args.out / f"{stem}.md").write_text(text + f"\n\nCommand: `{command.strip()}`\n")
    print(f"\nwrote {args.out / (stem + '.md')} and {plot_path}")


if __name__ == "__main__":
    main()
