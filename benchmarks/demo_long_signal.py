"""Newcomer demo: LSTMs on 10,000-step signals, at full length, against the usual shortcut and the plain module.

Two tasks on locally generated machine-vibration-like signals (benchmarks/demo_signals.py):

1. **Regression from the last output** (the practitioner's setting: a BiLSTM with
   ``OutputMode="last"`` and a regression head): the duty cycle of the whole recording, carried by a
   carrier that downsampling averages away, early steps counting as much as late ones
   (benchmarks/demo_regression.py). (a) ``torch.nn.LSTM`` on the signal downsampled to 200 points,
   (b) ``torch.nn.LSTM`` at full length, full BPTT, (c) ``fastlstm.LSTM`` at full length with
   checkpointing and in-kernel clipping (the output explains why truncated BPTT does not fit).
   Then the picture of the problem: the gradient norms of one backward of this loss against the
   distance from it, at initialisation and after training, with and without clipping.
2. **Per-step labelling**, the truncated-BPTT showcase (benchmarks/demo_labelling.py): (a) downsampled,
   (b) ``torch.nn.LSTM`` full BPTT, (b') ``torch.nn.LSTM`` with a hand-written detach-every-k loop,
   (c) ``fastlstm.LSTM`` with ``tbptt_chunk`` and ``grad_clip`` in the kernel.

Within a task every contender has the same model size, initial weights, optimizer (Adam, same
learning rate), batches (pre-generated, the same ones in the same order) and number of updates.
Per contender: training wall time, time per update, peak memory of the training phase, final
training loss and test error; one markdown table per task, a loss-vs-wall-time plot and the
gradient-norm plot, written to ``benchmarks/results/``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (after a reset), on the CPU the growth
of the process's peak resident set size during the phase (benchmarks/peak_memory.py), both beyond
what was allocated before the phase (so the pre-generated data does not count).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/demo_long_signal.py            # --quick: CPU, a few minutes
    PYTHONPATH=. .venv/bin/python benchmarks/demo_long_signal.py --full     # bigger model and budget: a GPU

On a CPU shared with other jobs, ``--threads 1`` avoids the slowdown of OpenMP threads that wait
for each other on oversubscribed cores (the committed run used it); ``--machine-note`` adds a
sentence about the machine to the results.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fastlstm  # noqa: E402
import demo_labelling as labelling  # noqa: E402  (this script's folder)
import demo_regression as regression  # noqa: E402
from demo_plots import plot_grad_norms_by_distance, plot_loss_curves  # noqa: E402
from demo_signals import DUTY_STD, PERIODS, POINTS, labelling_batch, regression_batch  # noqa: E402
from demo_training import Outcome, Update, mib, train  # noqa: E402
from environment import device_name, device_slug  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Config:
    """Sizes and budgets. T: steps per signal for the full-length contenders; hidden: units per
    direction; regression_updates / labelling_updates: optimizer steps (one batch each) per
    contender; checkpoint_every: (c)'s checkpoint interval in task 1; tbptt_chunk: k of task 2's
    truncation (fastlstm's tbptt_chunk and the hand-written loop's chunk); grad_clip: (c)'s
    in-kernel clipping bound; probe_batch: signals in the gradient-norm probe's batch."""

    T: int
    batch: int
    hidden: int
    regression_updates: int
    labelling_updates: int
    checkpoint_every: int
    tbptt_chunk: int
    grad_clip: float
    lr: float
    test_sequences: int
    probe_batch: int


# --quick: sized for a few minutes on 2 CPU cores, at the full T = 10,000.
QUICK = Config(T=10_000, batch=16, hidden=32, regression_updates=150, labelling_updates=150, checkpoint_every=100,
               tbptt_chunk=250, grad_clip=1.0, lr=1e-2, test_sequences=32, probe_batch=8)
# --full: a larger model, batch and budget, for a GPU.
FULL = Config(T=10_000, batch=64, hidden=128, regression_updates=1000, labelling_updates=500, checkpoint_every=100,
              tbptt_chunk=500, grad_clip=1.0, lr=3e-3, test_sequences=256, probe_batch=64)

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def make_batches(make: Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]], n: int, B: int,
                 T: int, seed: int) -> Batches:
    g = torch.Generator().manual_seed(seed)
    return [make(B, T, g) for _ in range(n)]


def warm_up(device: torch.device, hidden: int) -> None:
    """One forward and backward through each library with throwaway modules, so first-use costs
    (code pages, thread pools) do not land in whichever contender happens to run first."""
    x = torch.randn(2 * POINTS, 2, 1, device=device)
    for lstm in (nn.LSTM(1, hidden, bidirectional=True), fastlstm.LSTM(1, hidden, bidirectional=True)):
        out, _ = lstm.to(device)(x)
        out.sum().backward()


def run_contender(name: str, base: nn.Module, lstm: nn.Module | None, update: Update, batches: Batches,
                  cfg: Config, device: torch.device, evaluate: Callable[[nn.Module], float]
                  ) -> tuple[Outcome, nn.Module]:
    """Train a copy of ``base`` (its LSTM replaced by ``lstm`` when given) and evaluate it."""
    model = copy.deepcopy(base)
    if lstm is not None:
        model.lstm = lstm
    model = model.to(device)
    outcome = train(name, model, update, batches, cfg.lr, device)
    outcome.test_error = evaluate(model)
    return outcome, model


def regression_task(cfg: Config, device: torch.device, seed: int) -> tuple[list[Outcome], dict, float]:
    """Task 1: the three contenders, and the gradient norms of (c) before and after training."""
    print(f"\n== Task 1: duty-cycle regression from the BiLSTM's last output ({cfg.regression_updates} updates) ==")
    print(regression.TBPTT_DOES_NOT_FIT)
    batches = make_batches(regression_batch, cfg.regression_updates, cfg.batch, cfg.T, seed + 1)
    test_x, test_y = regression_batch(cfg.test_sequences, cfg.T, torch.Generator().manual_seed(seed + 10_000))
    probe_x, probe_y = (t.to(device) for t in regression_batch(cfg.probe_batch, cfg.T,
                                                               torch.Generator().manual_seed(seed + 20_000)))
    torch.manual_seed(seed)
    base = regression.Regressor(regression.bilstm(cfg.hidden), cfg.hidden)

    def evaluate(downsampled: bool) -> Callable[[nn.Module], float]:
        return lambda model: regression.test_rmse(model, test_x, test_y, downsampled, device)

    def fast() -> fastlstm.LSTM:
        return fastlstm.LSTM.from_torch(copy.deepcopy(base.lstm), checkpoint_every=cfg.checkpoint_every,
                                        grad_clip=cfg.grad_clip)

    a, _ = run_contender(f"(a) torch.nn.LSTM, downsampled to {POINTS}", base, None, regression.downsampled_update,
                         batches, cfg, device, evaluate(True))
    b, _ = run_contender(f"(b) torch.nn.LSTM, full {cfg.T}, full BPTT", base, None, regression.full_length_update,
                         batches, cfg, device, evaluate(False))
    initial = copy.deepcopy(base)
    initial.lstm = fast()
    initial = initial.to(device)
    norms = {"at initialisation, no clipping": regression.grad_norms(initial, probe_x, probe_y, None),
             f"at initialisation, grad_clip={cfg.grad_clip}": regression.grad_norms(initial, probe_x, probe_y,
                                                                                  cfg.grad_clip)}
    c, trained = run_contender(f"(c) fastlstm.LSTM, full {cfg.T}, checkpoint_every={cfg.checkpoint_every}, "
                               f"grad_clip={cfg.grad_clip}", base, fast(), regression.full_length_update, batches,
                               cfg, device, evaluate(False))
    norms[f"after {cfg.regression_updates} updates, no clipping"] = regression.grad_norms(trained, probe_x, probe_y,
                                                                                          None)
    norms[f"after {cfg.regression_updates} updates, grad_clip={cfg.grad_clip}"] = regression.grad_norms(
        trained, probe_x, probe_y, cfg.grad_clip)
    return [a, b, c], norms, regression.mean_rmse(test_y)


def labelling_task(cfg: Config, device: torch.device, seed: int) -> list[Outcome]:
    """Task 2: downsampled, full BPTT, hand-written detach-every-k, fastlstm's in-kernel TBPTT."""
    print(f"\n== Task 2: per-step state labelling, truncated BPTT showcase ({cfg.labelling_updates} updates) ==")
    batches = make_batches(labelling_batch, cfg.labelling_updates, cfg.batch, cfg.T, seed + 2)
    test_x, test_y = labelling_batch(cfg.test_sequences, cfg.T, torch.Generator().manual_seed(seed + 30_000))
    torch.manual_seed(seed)
    base = labelling.Tagger(nn.LSTM(1, cfg.hidden), cfg.hidden)
    k = cfg.tbptt_chunk

    def evaluate(downsampled: bool) -> Callable[[nn.Module], float]:
        return lambda model: labelling.test_error(model, test_x, test_y, downsampled, device)

    fast = fastlstm.LSTM.from_torch(copy.deepcopy(base.lstm), tbptt_chunk=k, grad_clip=cfg.grad_clip,
                                    checkpoint_every=cfg.checkpoint_every)
    runs = [
        (f"(a) torch.nn.LSTM, downsampled to {POINTS}", None, labelling.downsampled_update, True),
        (f"(b) torch.nn.LSTM, full {cfg.T}, full BPTT", None, labelling.full_length_update, False),
        (f"(b') torch.nn.LSTM, full {cfg.T}, detach every {k} (hand-written loop)", None,
         labelling.detach_every(k), False),
        (f"(c) fastlstm.LSTM, full {cfg.T}, tbptt_chunk={k}, checkpoint_every={cfg.checkpoint_every}, "
         f"grad_clip={cfg.grad_clip}", fast,
         labelling.full_length_update, False),
    ]
    return [run_contender(name, base, lstm, update, batches, cfg, device, evaluate(down))[0]
            for name, lstm, update, down in runs]


def norm_summary(norms: dict[str, fastlstm.GradNorms], cfg: Config) -> str:
    """One sentence per recording: how far the gradient reaches, and what clipping changed."""
    parts = []
    for when in ("at initialisation", f"after {cfg.regression_updates} updates"):
        plain, clipped = norms[f"{when}, no clipping"], norms[f"{when}, grad_clip={cfg.grad_clip}"]
        h = plain.h[0, 0].flip(0).double()  # index = distance from the loss
        below = (h < 1e-6 * h[0]).nonzero()
        reach = int(below[0]) if below.numel() else h.numel()
        difference = max((clipped.h - plain.h).abs().max().item(), (clipped.c - plain.c).abs().max().item())
        clipping = ("identical to the unclipped ones (no recurrent gradient reached the bound)" if difference == 0
                    else f"differ from the unclipped ones by at most {difference:.1e}")
        parts.append(f"{when.capitalize()}, ||dL/dh_t|| of the forward direction falls below a millionth of its "
                     f"value at the loss within {reach} steps of the {cfg.T}; with grad_clip={cfg.grad_clip} the "
                     f"norms are {clipping}.")
    return " ".join(parts)


def table(outcomes: list[Outcome], error_header: str, error: Callable[[float], str]) -> list[str]:
    lines = [f"| contender | training time | time per update | peak memory (training) | final train loss | "
             f"{error_header} |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {o.name} | {o.seconds:.1f} s | {o.per_update:.2f} s | {mib(o.peak_bytes)} | {o.final_loss:.3f} | "
              f"{error(o.test_error)} |" for o in outcomes]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU-sized run (default): a few minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="bigger model, batch and budget: for a GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--updates", type=int, help="override both tasks' number of updates")
    parser.add_argument("--hidden", type=int, help="override the hidden size (per direction)")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--machine-note", default="",
                        help="a sentence about the machine for the results file (e.g. that it was shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    cfg = FULL if args.full else QUICK
    if args.updates:
        cfg = replace(cfg, regression_updates=args.updates, labelling_updates=args.updates)
    cfg = replace(cfg, hidden=args.hidden or cfg.hidden, batch=args.batch or cfg.batch)
    tag = "full" if args.full else "quick"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{device_name(device)}, {torch.get_num_threads()} thread(s)"
    print(f"Signals of T={cfg.T} steps, state in a period-{PERIODS[0]:g} vs period-{PERIODS[1]:g} carrier; "
          f"downsampled: {POINTS} points (means of {cfg.T // POINTS} steps). Device {device} ({machine}). "
          f"Model: hidden {cfg.hidden} per direction, batch {cfg.batch}, Adam lr {cfg.lr}.")
    warm_up(device, cfg.hidden)
    started = time.perf_counter()
    reg, norms, mean_baseline = regression_task(cfg, device, args.seed)
    lab = labelling_task(cfg, device, args.seed)
    total = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"demo_long_signal-{device_slug(device)}-{tag}"
    curves_path, norms_path = args.out / f"{stem}-loss_vs_time.png", args.out / f"{stem}-grad_norms.png"
    where = f"{machine}" + (f"; {args.machine_note}" if args.machine_note else "")
    plot_loss_curves([(f"Task 1: duty-cycle regression from the BiLSTM's last output, T={cfg.T}", "training MSE "
                       "(standardised target)", reg),
                      (f"Task 2: per-step state labelling, T={cfg.T}", "training cross-entropy", lab)],
                     curves_path, f"Same model size, initial weights, batches, Adam lr {cfg.lr} and number of "
                                  f"updates within a task. {where}.")
    plot_grad_norms_by_distance(
        norms, norms_path,
        f"Task 1 model (c), BiLSTM hidden {cfg.hidden}: one backward of the last-output loss on {cfg.probe_batch} "
        f"signals of T={cfg.T}. Reverse direction not drawn: its output at the last step has seen one step.")

    chance = 0.5
    lines = [
        f"# Long-signal demo ({tag}, {device.type})",
        "",
        f"Machine: {where}. torch {torch.__version__}. Whole run: {total:.0f} s.",
        "",
        f"## Task 1: regression from the last output of a bidirectional LSTM (T = {cfg.T})",
        "",
        f"Target: the fraction of the recording spent in the period-4 state (the duty cycle; every step counts, "
        f"early as much as late), read from `output[-1]` of a 1-layer BiLSTM (hidden {cfg.hidden} per direction) "
        f"through a linear head; MSE on the standardised target. Batch {cfg.batch}, Adam lr {cfg.lr}, "
        f"{cfg.regression_updates} updates, {cfg.test_sequences} test signals. Always predicting the mean "
        f"scores a test RMSE of {mean_baseline:.1f} points (the duty cycle's spread, std ≈ {DUTY_STD * 100:.1f}).",
        "",
        *table(reg, "test RMSE (duty cycle, % points)", lambda e: f"{e:.1f}"),
        "",
        regression.TBPTT_DOES_NOT_FIT,
        "",
        f"Gradient norms of one backward of this loss against the distance from it (model (c), {cfg.probe_batch} "
        f"signals): `{norms_path.name}`. {norm_summary(norms, cfg)}",
        "",
        f"## Task 2: per-step state labelling, the truncated-BPTT showcase (T = {cfg.T})",
        "",
        f"Label: the state at every step; cross-entropy at every step. 1-layer LSTM, hidden {cfg.hidden}. Batch "
        f"{cfg.batch}, Adam lr {cfg.lr}, {cfg.labelling_updates} updates; test error at {POINTS} points of each of "
        f"{cfg.test_sequences} test signals (chance = {chance:.0%}). (b') runs chunks of {cfg.tbptt_chunk} steps with "
        f"the state detached between them and one backward per chunk, one optimizer step per batch: the gradient "
        f"of (c) without its clipping.",
        "",
        *table(lab, "test error", lambda e: f"{e:.1%}"),
        "",
        f"Training loss against wall time, both tasks: `{curves_path.name}`.",
        "",
        "Peak memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                           "growth of the process's peak RSS during training (VmHWM reset via /proc/self/clear_refs)")
        + ", beyond what was allocated before the phase (the pre-generated batches do not count).",
    ]
    command = "PYTHONPATH=. .venv/bin/python benchmarks/demo_long_signal.py " + " ".join(
        a if " " not in a else repr(a) for a in sys.argv[1:])
    text = "\n".join(lines)
    print()
    print(text)
    (args.out / f"{stem}.md").write_text(text + f"\n\nCommand: `{command.strip()}`\n")
    print(f"\nwrote {args.out / (stem + '.md')}, {curves_path} and {norms_path}")


if __name__ == "__main__":
    main()
