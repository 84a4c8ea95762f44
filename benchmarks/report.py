"""Result rows and their reports: the markdown table, the JSON file and the speedup plot."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from configs import FWD, Config, dtype_name
from timing import Measurement


@dataclass
class Row:
    """One configuration x one implementation, with the torch.nn.LSTM numbers it is compared to."""

    device: str
    config: Config
    cudnn_algo: str
    impl: str
    backend: str
    plan: str = ""
    phases: dict[str, tuple[Measurement, Measurement]] = field(default_factory=dict)  # (torch, impl)
    max_abs_diff: float | None = None  # forward output vs torch.nn.LSTM's, same weights and input
    notes: list[str] = field(default_factory=list)

    def speedup(self, phase: str, statistic: str = "median_ms") -> float | None:
        """torch.nn.LSTM time / this implementation's time (> 1: this one is faster)."""
        if phase not in self.phases:
            return None
        reference, impl = self.phases[phase]
        ref_ms, impl_ms = getattr(reference, statistic), getattr(impl, statistic)
        if not (reference.ok and impl.ok) or not impl_ms:
            return None
        return float(ref_ms / impl_ms)

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "device": self.device, "T": c.T, "B": c.B, "I": c.I, "H": c.H, "layers": c.layers,
            "direction": c.direction, "dtype": dtype_name(c.dtype), "label": c.label,
            "cudnn_algo": self.cudnn_algo, "impl": self.impl, "backend": self.backend, "plan": self.plan,
            "max_abs_diff": self.max_abs_diff, "notes": self.notes,
            "phases": {phase: {"torch": reference.to_json(), "impl": impl.to_json(),
                               "speedup_median": self.speedup(phase), "speedup_min": self.speedup(phase, "min_ms")}
                       for phase, (reference, impl) in self.phases.items()},
        }


# ---- markdown ----

# A side whose median time exceeds this multiple of its minimum is flagged: the machine was busy
# during the measurement, and its median (and the median-based speedup) is not to be trusted.
UNSTEADY = 1.5

def format_ms(value: float | None) -> str:
    """Milliseconds with about three significant digits; '-' for no value."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _time_cell(m: Measurement, with_min: bool) -> str:
    if m.skipped:
        return "skipped"
    if m.error:
        return "error"
    if not m.times_ms:
        return "-"
    return f"{format_ms(m.median_ms)} ({format_ms(m.min_ms)})" if with_min else format_ms(m.median_ms)


def _speedup_cell(row: Row, phase: str, with_min: bool) -> str:
    median = row.speedup(phase)
    if median is None:
        return "-"
    if with_min:
        return f"{median:.2f}× ({row.speedup(phase, 'min_ms'):.2f}×)"
    return f"{median:.2f}×"


def _memory_cell(m: Measurement) -> str:
    return "-" if m.peak_bytes is None else f"{m.peak_bytes / 2**20:.1f}"


def _row_notes(row: Row) -> str:
    """Reference-point label, row notes, every skipped or failed measurement with its reason, and
    every unsteady one."""
    notes = ([row.config.label] if row.config.label else []) + row.notes
    for phase, (reference, impl) in row.phases.items():
        if reference.skipped and reference.skipped == impl.skipped:
            notes.append(f"{phase} skipped: {reference.skipped}")
            continue
        for who, m in (("torch", reference), (row.impl, impl)):
            if m.error:
                notes.append(f"{phase} {who} error: {m.error}")
            elif m.skipped:
                notes.append(f"{phase} {who} skipped: {m.skipped}")
            elif m.median_ms and m.min_ms and m.median_ms > UNSTEADY * m.min_ms:
                notes.append(f"{phase} {who} unsteady: median {m.median_ms / m.min_ms:.1f}× min")
    return "; ".join(notes).replace("|", "\\|")


def markdown_table(rows: Sequence[Row], phases: Sequence[str], with_min: bool, with_memory: bool) -> str:
    """The results table; times in ms (median, or 'median (min)'), speedup = torch / implementation."""
    head = ["device", "T", "B", "I", "H", "layers", "dir", "dtype", "cuDNN algo", "impl", "backend"]
    for phase in phases:
        head += [f"{phase} torch ms", f"{phase} impl ms", f"{phase} speedup"]
    if with_memory:
        for phase in phases:
            head += [f"{phase} torch peak MiB", f"{phase} impl peak MiB"]
    head += ["max abs diff", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        c = row.config
        cells = [row.device, str(c.T), str(c.B), str(c.I), str(c.H), str(c.layers), c.direction,
                 dtype_name(c.dtype), row.cudnn_algo, row.impl, row.backend]
        for phase in phases:
            if phase in row.phases:
                reference, impl = row.phases[phase]
                cells += [_time_cell(reference, with_min), _time_cell(impl, with_min),
                          _speedup_cell(row, phase, with_min)]
            else:
                cells += ["-", "-", "-"]
        if with_memory:
            for phase in phases:
                pair = row.phases.get(phase)
                cells += [_memory_cell(pair[0]), _memory_cell(pair[1])] if pair else ["-", "-"]
        cells += ["-" if row.max_abs_diff is None else f"{row.max_abs_diff:.1e}", _row_notes(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_header(meta: dict[str, Any]) -> str:
    """The metadata above the table: what ran where, and how it was timed."""
    s = meta["settings"]
    lines = [f"# fastlstm vs torch.nn.LSTM: {meta['device_name']} ({meta['device']})", "",
             f"- command: `{meta['command']}` (in `{meta['cwd']}`)",
             f"- date: {meta['date']}; preset: {s['preset']}; whole run: {s['run_seconds']} s wall clock",
             f"- torch {meta['torch_version']}, Python {meta['python']}, {meta['platform']}",
             f"- fastlstm {meta['fastlstm_version']} (git {meta['git_commit']}), CUDA kernels compiled: "
             f"{meta['fastlstm_cuda_compiled']}, CPU kernels: {meta['fastlstm_cpu_capability']} "
             f"(torch's: {meta.get('torch_cpu_capability', '?')}; "
             f"{', '.join(f'{k}={v}' for k, v in meta.get('isa_environment', {}).items()) or 'no ISA variable set'})"]
    if "gpu_name" in meta:
        lines.append(f"- GPU: {meta['gpu_name']} (sm_{meta['compute_capability'].replace('.', '')}, "
                     f"{meta['sm_count']} SMs, {meta['gpu_memory_gib']} GiB), driver {meta['driver_version']}, "
                     f"CUDA {meta['cuda_version']}, cuDNN {meta['cudnn_version']}; "
                     f"TF32: cuBLAS matmul {meta['tf32_cublas_matmul']}, cuDNN {meta['tf32_cudnn']}")
        lines.append(f"- timing: CUDA events around each call with torch.cuda.synchronize() before and after; "
                     f"{s['warmup']} warm-up + {s['repeats']} timed calls per side, interleaved; median shown "
                     "(all times in the JSON); "
                     "peak memory = max_memory_allocated during one call minus memory allocated before it")
    else:
        lines.append(f"- CPU: {meta['cpu_model']}, {meta['cpu_logical_cores']} logical cores, "
                     f"torch threads {meta['torch_num_threads']} (both sides), oneDNN {meta['mkldnn_enabled']}")
        lines.append(f"- timing: time.perf_counter around each call; {s['warmup']} warm-up + {s['repeats']} "
                     "timed calls per side, interleaved call by call; cells show median (min); "
                     "peak memory is not measured on CPU")
    lines += [f"- phases: {', '.join(s['phases'])} ({FWD}: torch.no_grad(), eval mode; fwd+bwd: loss = (y * g).sum() "
              "with a fixed random g, parameters require grad, input does not; fwd+bwd+dx: the input requires "
              "grad too)",
              "- both sides: same dtype, same weights (fastlstm.LSTM.from_torch(copy.deepcopy(ref))), same input, "
              "input projection included; speedup = torch.nn.LSTM time / implementation time (> 1: faster "
              "than torch); max abs diff = largest |y - y_torch| of the forward output",
              "- other libraries: " + ", ".join(f"{k}: {v}" for k, v in meta["other_libraries"].items())]
    return "\n".join(lines)


def markdown(meta: dict[str, Any], rows: Sequence[Row]) -> str:
    """Header and table: median (min) times on CPU, medians on CUDA; memory columns where measured."""
    s = meta["settings"]
    with_memory = any(m.peak_bytes is not None for row in rows for pair in row.phases.values() for m in pair)
    with_min = "gpu_name" not in meta
    return (markdown_header(meta) + "\n\n" + markdown_table(rows, s["phases"], with_min, with_memory) + "\n")


# ---- files ----

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    payload = {"metadata": meta, "rows": [row.to_json() for row in rows]}
    _write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_markdown(path: Path, text: str) -> None:
    _write_atomic(path, text.encode())


def write_plot(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> str | None:
    """Speedup plot; returns a note instead when it cannot be drawn (matplotlib missing, no data)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: PNG skipped"
    phases = [p for p in meta["settings"]["phases"] if any(row.speedup(p) is not None for row in rows)]
    if not phases:
        return "no speedup was measured: PNG skipped"
    if "gpu_name" in meta:
        figure = _lines_vs_t(plt, rows, phases)
    else:
        figure = _bars(plt, rows, phases)
    figure.suptitle(f"speedup over torch.nn.LSTM (torch time / implementation time): {meta['device_name']}")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    _write_atomic(path, png.getvalue())
    return None


def _lines_vs_t(plt: Any, rows: Sequence[Row], phases: Sequence[str]) -> Any:
    """One panel per (phase, dtype); one line per B x H and implementation, speedup against T.

    Colour: B; marker: H; line style: implementation. Named reference points are left out (table only).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [row for row in rows if not row.config.label]
    dtypes = list(dict.fromkeys(dtype_name(row.config.dtype) for row in rows))
    impls = list(dict.fromkeys(f"{row.impl}/{row.backend}" for row in rows))
    batches = sorted({row.config.B for row in rows})
    hiddens = sorted({row.config.H for row in rows})
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v", "P"]
    colors = plt.get_cmap("tab10")
    figure, axes = plt.subplots(len(phases), len(dtypes), figsize=(6.5 * len(dtypes), 4.2 * len(phases)),
                                squeeze=False)
    handles: dict[str, Any] = {}
    for r, phase in enumerate(phases):
        for k, dtype in enumerate(dtypes):
            ax = axes[r][k]
            for b, h, impl in ((b, h, impl) for b in batches for h in hiddens for impl in impls):
                points = sorted((row.config.T, row.speedup(phase)) for row in rows
                                if (row.config.B, row.config.H, dtype_name(row.config.dtype)) == (b, h, dtype)
                                and f"{row.impl}/{row.backend}" == impl and row.speedup(phase) is not None)
                if not points:
                    continue
                label = f"B={b} H={h} {impl}"
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points],
                                  styles[impls.index(impl) % len(styles)],
                                  marker=markers[hiddens.index(h) % len(markers)],
                                  color=colors(batches.index(b) % 10), label=label)
                handles.setdefault(label, line)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=2))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("T (sequence length)")
            ax.set_ylabel("speedup (×)")
            ax.set_title(f"{phase}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
    figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return figure


def _bars(plt: Any, rows: Sequence[Row], phases: Sequence[str]) -> Any:
    """One panel per phase; one bar per configuration and implementation (median; the dot: from minima)."""
    figure, axes = plt.subplots(1, len(phases), figsize=(max(6, 1.6 * len(rows)) * len(phases) / 2 + 3, 4.5),
                                squeeze=False)
    for ax, phase in zip(axes[0], phases):
        labels, medians, minima = [], [], []
        for row in rows:
            c = row.config
            labels.append(f"T={c.T}\nB={c.B} H={c.H}\n{row.backend}")
            medians.append(row.speedup(phase) or 0.0)
            minima.append(row.speedup(phase, "min_ms") or 0.0)
        positions = range(len(labels))
        bars = ax.bar(positions, medians, color="tab:blue", label="median / median")
        ax.plot(positions, minima, "o", color="tab:orange", label="min / min")
        for bar, value in zip(bars, medians):
            if value:
                ax.annotate(f"{value:.2f}×", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                            va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(positions), labels, fontsize=7)
        ax.set_ylabel("speedup (×)")
        ax.set_title(phase)
        ax.legend(fontsize=7)
    return figure
