#!/usr/bin/env python3
"""fastlstm.LSTM against torch.nn.LSTM (cuDNN on GPU, native/oneDNN on CPU): forward and
forward+backward time, peak memory (GPU) and speedup, for every backend that applies on the device.

Presets (default: the full grid of the device):
  full         CUDA: T in {1k,4k,16k,64k} x B in {1,16,64,256} x H in {256,512,1024}, I=H, fp32 and bf16,
               plus the PyTorch fastrnns default (T=100 B=64 I=H=512 fp32) and T=1024 B=16 I=H=768 bf16.
               CPU: the --cpu-table grid.
  --quick      CUDA: T in {1k,4k} x B in {16,64} x H in {256,1024}, fp32 and bf16.
               CPU: T=1000 B in {1,16} H=128, and T=200 B=16 H=256, fp32 (sized for under 2 minutes on 2 cores).
  --cpu-table  CPU (default device): fp32, T=1000 I=H=128 B in {1,16,64}; T=1000 B=16 H=256;
               T=4000 B=4 H=64; forward, forward+backward, and forward+backward with the input
               requiring grad; 10 repeats by default. Plus ragged batches (B=16 I=H=128, T in
               {250,500,1000}, lengths drawn in [T/2, T], PackedSequence with enforce_sorted=False,
               loss on h_n and c_n), 3 repeats.
  --T/--B/--H/--I/--dtype   a custom grid (the product of the values given; unspecified axes
               default to T=1000, B=16, H=128 on CPU / 256 on CUDA, I=H, float32); --packed makes
               its batches ragged, as the --cpu-table's packed rows.

Writes <device>-<date>-<preset>.json, .md and .png under benchmarks/results/ (or --out; on the CPU
<device>-<date>-<level>-<preset>, the level fastlstm.cpu_capability() reports) and prints
the markdown to stdout (progress goes to stderr). Configurations whose estimated memory exceeds what
is free are skipped and reported as such; a configuration that fails is reported in its row.

Run from the repository root with the extension built in place:
  PYTHONPATH=. python benchmarks/bench.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

try:
    import fastlstm  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import fastlstm ({error}). Install it (make install) or run from the repository root "
             "with PYTHONPATH=. after building the extension in place.")

import configs
import contenders
import cudnn_algo
import environment
import report
from configs import FWD, FWD_BWD, FWD_BWD_DX, Config, Preset
from timing import DeviceTimer, Measurement, describe_error, measure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULTS = {"cuda": {"warmup": 3, "repeats": 10}, "cpu": {"warmup": 1, "repeats": 5}}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a handful of configurations (see above)")
    preset.add_argument("--cpu-table", action="store_true", help="the README's CPU table (see above)")
    parser.add_argument("--device", help="'cpu', 'cuda' or 'cuda:N' (default: cuda when available, "
                                         "cpu for --cpu-table)")
    parser.add_argument("--T", type=_positive, nargs="+", help="sequence lengths (custom grid)")
    parser.add_argument("--B", type=_positive, nargs="+", help="batch sizes (custom grid)")
    parser.add_argument("--H", type=_positive, nargs="+", help="hidden sizes (custom grid)")
    parser.add_argument("--I", type=_positive, nargs="+", help="input sizes (custom grid; default I = H)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(configs.DTYPES), metavar="DTYPE",
                        help=f"dtypes (custom grid): {', '.join(sorted(configs.DTYPES))}")
    parser.add_argument("--packed", action="store_true",
                        help="custom grid of ragged batches: lengths drawn in [T/2, T], PackedSequence "
                             "(enforce_sorted=False), loss on h_n and c_n")
    parser.add_argument("--layers", type=_positive, default=1, help="number of layers (default 1)")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional LSTMs")
    parser.add_argument("--input-grad", action="store_true",
                        help="the input requires grad in forward+backward (default: parameters only)")
    parser.add_argument("--repeats", type=_positive,
                        help="timed calls per side (default: 10 on CUDA, 5 on CPU, 10 for --cpu-table)")
    parser.add_argument("--warmup", type=_non_negative,
                        help="untimed calls per side first (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=_positive, help="torch.set_num_threads for both sides (CPU)")
    parser.add_argument("--tf32", choices=("off", "on"), default="off",
                        help="CUDA float32: TF32 for both cuBLAS matmuls (fastlstm) and cuDNN (torch), "
                             "so both sides do the same arithmetic (default: off, full fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, input and g (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    args.custom = args.packed or any(v is not None for v in (args.T, args.B, args.H, args.I, args.dtype))
    if args.custom and (args.quick or args.cpu_table):
        parser.error("--T/--B/--H/--I/--dtype/--packed define a custom grid: do not combine them with --quick or "
                     "--cpu-table")
    return args


def choose_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        device = torch.device(args.device)
    elif args.cpu_table or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def choose_preset(args: argparse.Namespace, device: torch.device) -> Preset:
    cuda = device.type == "cuda"
    train = FWD_BWD_DX if args.input_grad else FWD_BWD
    phases: tuple[str, ...] = (FWD, train)
    repeats = None
    if args.custom:
        name = "custom"
        # Deduplicated by dtype, not by name: --dtype fp32 float32 is one dtype.
        dtypes = list(dict.fromkeys(configs.DTYPES[d] for d in args.dtype or ["float32"]))
        grid = configs.grid(args.T or [1000], args.B or [16], args.H or [256 if cuda else 128], dtypes, args.I)
        if args.packed:
            grid = [replace(c, packed=True, label=configs.PACKED_LABEL) for c in grid]
    elif args.cpu_table:
        # The README's table: more repeats than the CPU default, for steadier medians on a noisy machine.
        name, grid, phases, repeats = "cpu-table", configs.cpu_table(), (FWD, FWD_BWD, FWD_BWD_DX), 10
    elif args.quick:
        name, grid = "quick", configs.gpu_quick() if cuda else configs.cpu_quick()
    else:
        name, grid = "full", configs.gpu_full() if cuda else configs.cpu_table()
    return Preset(name, configs.with_layers(grid, args.layers, args.bidirectional), phases, repeats)


def _max_abs_diff(y: torch.Tensor, expected: torch.Tensor, chunk: int = 256) -> float:
    """max |y - expected| in float32, a chunk of time steps at a time (no full-size float copies)."""
    return max(float((y[t:t + chunk].float() - expected[t:t + chunk].float()).abs().max())
               for t in range(0, y.size(0), chunk))


def check_outputs(reference: contenders.Contender, others: Sequence[contenders.Contender],
                  x: torch.Tensor, lengths: torch.Tensor | None) -> dict[str, float]:
    """Largest |output - torch's| of each implementation's inference forward, over the outputs the
    loss weights (a failure marks it as errored)."""
    differences = {}
    for contender in [reference, *others]:
        contender.set_training(False)
    with torch.no_grad():
        assert reference.forward is not None
        expected = reference.forward(x, lengths)
        for contender in others:
            if not contender.runnable:
                continue
            try:
                differences[contender.name] = max(_max_abs_diff(out, ref)
                                                  for out, ref in zip(contender.forward(x, lengths), expected))
            except Exception as error:  # noqa: BLE001 - reported in the row
                contender.error = describe_error(error)
    return differences


def _summary(results: dict[str, Measurement], reference: str) -> str:
    parts = []
    base = results[reference].median_ms
    for name, m in results.items():
        if m.error:
            parts.append(f"{name} error: {m.error}")
            continue
        text = f"{name} {report.format_ms(m.median_ms)} ms"
        if name != reference and base and m.median_ms:
            text += f" ({base / m.median_ms:.2f}x)"
        parts.append(text)
    return " | ".join(parts)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_config(config: Config, phases: Sequence[str], timer: DeviceTimer, settings: dict[str, Any],
               libraries: dict[str, str]) -> list[report.Row]:
    """Measure one configuration: one row per implementation other than torch.nn.LSTM."""
    device = timer.device
    probe = torch.empty(1, dtype=config.dtype, device=device)
    algo = cudnn_algo.describe(cudnn_algo.requested_algorithm(config, device, probe))
    available = timer.available_bytes()
    skip = {}
    for phase in phases:
        estimate = configs.estimate_peak_bytes(config, phase)
        if available is not None and estimate > available:
            skip[phase] = f"estimated peak {_size(estimate)} > {_size(available)} available"
    if len(skip) == len(phases):
        print(f"  skipped: {skip[phases[0]]}", file=sys.stderr)
        return [report.Row(device.type, config, algo, "fastlstm", "all",
                           phases={p: (Measurement(skipped=r), Measurement(skipped=r)) for p, r in skip.items()})]

    torch.manual_seed(settings["seed"])
    reference = contenders.torch_reference(config, device)
    x = torch.randn(config.T, config.B, config.I, device=device, dtype=config.dtype)
    lengths = configs.packed_lengths(config, torch.Generator().manual_seed(settings["seed"])) if config.packed else None
    # The loss weights: y's, or h_n's and c_n's for a ragged batch.
    weight_shapes = ([(config.layers * config.directions, config.B, config.H)] * 2 if config.packed
                     else [(config.T, config.B, config.directions * config.H)])
    g = tuple(torch.randn(shape, device=device, dtype=config.dtype) for shape in weight_shapes)
    ref = contenders.torch_contender(reference, device)
    others = contenders.fastlstm_contenders(reference, x) + contenders.other_contenders(reference, config, device,
                                                                                         libraries)
    differences = check_outputs(ref, others, x, lengths) if FWD not in skip else {}
    repeats = min(settings["repeats"], config.repeats or settings["repeats"])
    results: dict[str, dict[str, Measurement]] = {}
    for phase in phases:
        if phase in skip:
            print(f"  {phase:<10} skipped: {skip[phase]}", file=sys.stderr)
            continue
        runnable = [ref] + [c for c in others if c.runnable]
        for contender in runnable:
            contender.set_training(phase != FWD)
        results[phase] = measure(timer, [c.case(phase, x, g, lengths) for c in runnable], settings["warmup"],
                                 repeats)
        print(f"  {phase:<10} {_summary(results[phase], ref.name)}", file=sys.stderr)

    rows = []
    for contender in others:
        row = report.Row(device.type, config, algo, contender.impl, contender.backend, contender.plan,
                         max_abs_diff=differences.get(contender.name))
        if contender.skipped:
            row.notes.append(f"skipped: {contender.skipped}")
        if contender.error:
            row.notes.append(f"error: {contender.error}")
        for phase in phases:
            if phase in skip:
                row.phases[phase] = (Measurement(skipped=skip[phase]), Measurement(skipped=skip[phase]))
            else:
                # No measurement of an implementation that was skipped or failed the output check:
                # its reason is already in the row's notes.
                row.phases[phase] = (results[phase][ref.name], results[phase].get(contender.name, Measurement()))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = choose_device(args)
    preset = choose_preset(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    settings: dict[str, Any] = {
        "preset": preset.name + (" (on CPU: the cpu-table grid)" if preset.name == "full" and device.type == "cpu"
                                 else ""),
        "phases": list(preset.phases),
        "warmup": args.warmup if args.warmup is not None else defaults["warmup"],
        "repeats": args.repeats or preset.repeats or defaults["repeats"],
        "seed": args.seed,
        "tf32": args.tf32 if device.type == "cuda" else None,
    }
    libraries = contenders.library_status()
    meta = environment.collect(device, settings, libraries)  # at the start: the code and state being measured
    timer = DeviceTimer(device)
    print(f"{len(preset.configs)} configurations on {environment.device_name(device)} ({device}), "
          f"phases {', '.join(preset.phases)}, warm-up {settings['warmup']}, repeats {settings['repeats']}",
          file=sys.stderr)
    print("other libraries: " + ", ".join(f"{k}: {v}" for k, v in libraries.items()), file=sys.stderr)

    rows: list[report.Row] = []
    for number, config in enumerate(preset.configs, 1):
        print(f"[{number}/{len(preset.configs)}] {config}", file=sys.stderr)
        try:
            rows += run_config(config, preset.phases, timer, settings, libraries)
        except Exception as error:  # noqa: BLE001 - one configuration failing must not stop the run
            message = describe_error(error)
            print(f"  error: {message}", file=sys.stderr)
            rows.append(report.Row(device.type, config, "-", "fastlstm", "-", notes=[f"error: {message}"]))
        timer.release()

    settings["run_seconds"] = round(time.perf_counter() - started, 1)
    text = report.markdown(meta, rows)
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    # On the CPU the SIMD level is part of the name: one machine gives a table per level.
    level = f"-{meta['fastlstm_cpu_capability'].lower()}" if device.type == "cpu" else ""
    stem = f"{environment.device_slug(device)}-{meta['date'][:10]}{level}-{preset.name}"
    report.write_json(args.out / f"{stem}.json", meta, rows)
    report.write_markdown(args.out / f"{stem}.md", text)
    note = report.write_plot(args.out / f"{stem}.png", meta, rows)
    written = [f"{stem}.json", f"{stem}.md"] + ([] if note else [f"{stem}.png"])
    print(f"wrote {', '.join(str(args.out / name) for name in written)} in {settings['run_seconds']} s",
          file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
