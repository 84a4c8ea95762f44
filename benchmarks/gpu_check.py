#!/usr/bin/env python3
"""The prepared run for a lent GPU machine: one call that ends by itself within its deadline.

    python3 benchmarks/gpu_check.py [--out DIR] [--deadline SECONDS] [--only STAGE ...]
    python3 benchmarks/gpu_check.py --dry-run [--out DIR]     # the plumbing, with fake stages (no GPU)

Stages, most important first (each a subprocess with a KILL timeout; a stage that would overrun the
global deadline is skipped with the reason printed; a stage whose prerequisite failed is skipped):

  facts        GPU name, SMs, clocks, memory, driver, torch, CUDA, cuDNN, nvcc, compute-sanitizer
  build        the extension in place (setup.py -v build_ext --inplace), FASTLSTM_PTXAS_VERBOSE=1,
               MAX_JOBS = the CPU count, TORCH_CUDA_ARCH_LIST = the device's; the ptxas report
               (registers, spills, shared memory, stack per kernel) parsed into ptxas.txt
  correctness  benchmarks/gpu_correctness.py: both CUDA backends against a float64 CPU reference
  emulator     tests/cuda_emu/run.py --gpu: the CUDA-on-CPU emulator's tests built with nvcc
  bench        benchmarks/bench.py at cuDNN's persistent reference shape (fp16, T=1024, B=16,
               I=H=768) and its standard path (bf16, fp32), B in {1, 16, 64}: ms per call and
               us per step, forward and forward+backward, every row tagged with cuDNN's algorithm
  pytest       pytest -m cuda tests, a per-test timeout (faulthandler, this file as the plugin):
               a test that hangs is reported and the run resumes after it
  calibrate    benchmarks/calibrate/sync_latency.cu built with nvcc and run
  sanitizer    compute-sanitizer memcheck and racecheck over benchmarks/sanitizer_cases.py,
               PYTORCH_NO_CUDA_MEMORY_CACHING=1

Everything printed goes to <out>/gpu_check.log too; the summary (status and seconds per stage)
prints last. At most 7 files are written under <out> (FILES below; a device call returns 8);
scratch files go to a temporary directory. <out> defaults to $OUT, else benchmarks/results/gpu-<date>.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable or "python3"
DEFAULT_DEADLINE_S = 540  # 9 minutes: a device command may run 10
SUMMARY_RESERVE_S = 5     # kept back from every stage for the summary
DRY_RUN_DEADLINE_S = 18   # the fake stages take about 7 s; the last one runs into the deadline

# Every file this run may write under --out, by key (at most MAX_FILES).
FILES = {
    "log": "gpu_check.log",
    "build": "build.log",
    "ptxas": "ptxas.txt",
    "correctness": "correctness.log",
    "bench": "bench.json",
    "pytest": "pytest.log",
    "sanitizer": "sanitizer.log",
}
MAX_FILES = 7


# ---------------------------------------------------------------------------------------------
# The run: output files, the console, subprocesses under deadlines.
# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    """One subprocess: exit code (None when it was killed at its timeout), seconds, its output."""

    rc: int | None
    seconds: float
    output: str
    timeout_s: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def describe(self) -> str:
        if self.rc is None:
            return f"killed at its {self.timeout_s:.0f} s timeout"
        return f"exit code {self.rc}"


class Run:
    """The output directory (only the FILES), the console log, and the global deadline."""

    def __init__(self, out: Path, deadline_s: float) -> None:
        self.out = out
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s
        self.stage_deadline = self.deadline
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES.values():  # no stale file from an earlier run in the same directory
            (out / name).unlink(missing_ok=True)
        self.path("log").write_text("")

    def path(self, key: str) -> Path:
        """The file of ``key``; anything not declared in FILES is refused (the file budget)."""
        if key not in FILES:
            raise KeyError(f"{key!r} is not one of the declared output files {sorted(FILES)}")
        return self.out / FILES[key]

    def remaining(self) -> float:
        """Seconds left for the current stage (its own timeout or the global deadline)."""
        return min(self.stage_deadline, self.deadline - SUMMARY_RESERVE_S) - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        with self.path("log").open("a") as log:
            log.write(text + "\n")

    def append(self, key: str, text: str) -> None:
        with self.path(key).open("a") as f:
            f.write(text)

    def scratch_path(self, name: str) -> Path:
        """A file outside --out, for output that is not kept (deleted at exit)."""
        return self.scratch / name

    def run(self, command: list[str], key: str | Path, timeout_s: float | None = None,
            env: dict[str, str] | None = None) -> Result:
        """Runs ``command`` in its own process group, killed with SIGKILL, children included, at
        ``timeout_s`` or the stage's deadline. Its stdout and stderr are appended to the file of
        ``key`` (a FILES key, or a ``scratch_path``)."""
        limit = self.remaining() if timeout_s is None else min(timeout_s, self.remaining())
        limit = max(limit, 1.0)
        if isinstance(key, Path):
            if self.scratch not in key.parents:
                raise ValueError(f"{key} is neither a declared output file nor a scratch file")
            path = key
        else:
            path = self.path(key)
        with path.open("a") as f:
            f.write(f"\n$ {' '.join(command)}   # timeout {limit:.0f} s\n")
            f.flush()
            offset = f.tell()
            begin = time.monotonic()
            try:
                process = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                           start_new_session=True)
            except OSError as error:
                f.write(f"cannot start: {error}\n")
                return Result(127, 0.0, f"cannot start: {error}\n", limit)
            try:
                rc: int | None = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                rc = None
            seconds = time.monotonic() - begin
            f.write(f"# {'killed at its timeout' if rc is None else f'exit code {rc}'} after {seconds:.1f} s\n")
        with path.open() as f:
            f.seek(offset)
            output = f.read()
        return Result(rc, seconds, output, limit)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # ok | failed | skipped
    note: str = ""


@dataclass
class Stage:
    """``body(run)`` returns the outcome; ``cap_s`` is its KILL timeout, ``min_s`` the least time
    worth starting it with; it is skipped unless every stage in ``needs`` succeeded (or was not
    selected: then an earlier call is assumed to have done it)."""

    name: str
    body: Callable[[Run], Outcome]
    cap_s: float
    min_s: float
    needs: tuple[str, ...] = ()


@dataclass
class Facts:
    """What later stages need from the facts stage."""

    arch: str = ""  # TORCH_CUDA_ARCH_LIST form, '9.0'


FACTS = Facts()

FACTS_SCRIPT = r"""
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, "
          f"{torch.cuda.device_count()} device(s)")
    print("ARCH", f"{p.major}.{p.minor}")
"""


def stage_facts(run: Run) -> Outcome:
    queries = ("name,driver_version,pci.bus_id,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,"
               "clocks.max.mem,power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current")
    steps = [
        [PYTHON, "-c", FACTS_SCRIPT],
        ["nvidia-smi", f"--query-gpu={queries}", "--format=csv"],
        [cuda_tool("nvcc"), "--version"],
        [cuda_tool("compute-sanitizer"), "--version"],
    ]
    ok = True
    for command in steps:
        result = run.run(command, "log", timeout_s=30)
        text = "\n".join(line for line in result.output.splitlines() if not line.startswith(("$ ", "# ")))
        for line in text.splitlines():
            print(line, flush=True)  # already in gpu_check.log: run() appended it there
            if line.startswith("ARCH "):
                FACTS.arch = line.split()[1]
        ok = ok and result.ok
    if not FACTS.arch:
        return Outcome("failed", "torch sees no CUDA device")
    # A failed query (a tool missing) is reported but blocks nothing: the GPU is there.
    return Outcome("ok", f"arch {FACTS.arch}" + ("" if ok else "; a query failed (above)"))


PTXAS_ENTRY = re.compile(r"ptxas info\s*: (?:Compiling entry function|Function properties for) '?([^' ]+)'?")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelResources:
    name: str
    registers: int | None = None
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas(text: str) -> list[KernelResources]:
    """Per-function resources from ``-Xptxas -v`` output (static shared memory only)."""
    kernels: dict[str, KernelResources] = {}
    current: KernelResources | None = None
    for line in text.splitlines():
        entry = PTXAS_ENTRY.search(line)
        if entry:
            current = kernels.setdefault(entry.group(1), KernelResources(entry.group(1)))
            continue
        if current is None:
            continue
        frame = PTXAS_FRAME.search(line)
        if frame:
            current.stack, current.spill_stores, current.spill_loads = map(int, frame.groups())
        used = PTXAS_USED.search(line)
        if used:
            current.registers = int(used.group(1))
            smem = PTXAS_SMEM.search(line)
            current.smem = int(smem.group(1)) if smem else 0
    return list(kernels.values())


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if done.returncode == 0 and len(out) == len(names) else names


def ptxas_table(kernels: list[KernelResources]) -> str:
    """Markdown, spilling kernels first, then by registers."""
    kernels = sorted(kernels, key=lambda k: (-(k.spill_stores + k.spill_loads), -(k.registers or 0), k.name))
    names = demangle([k.name for k in kernels])
    lines = ["| registers | spill stores B | spill loads B | stack B | static smem B | kernel |",
             "|---|---|---|---|---|---|"]
    for k, name in zip(kernels, names):
        lines.append(f"| {k.registers} | {k.spill_stores} | {k.spill_loads} | {k.stack} | {k.smem} | `{name}` |")
    return "\n".join(lines)


def stage_build(run: Run) -> Outcome:
    env = {"FASTLSTM_PTXAS_VERBOSE": "1", "MAX_JOBS": str(os.cpu_count() or 4),
           "TORCH_CUDA_ARCH_LIST": FACTS.arch or "9.0"}
    result = run.run([PYTHON, "setup.py", "-v", "build_ext", "--inplace"], "build", env=env)
    if not result.ok:
        run.say(tail(result.output, 30))
        return Outcome("failed", f"build {result.describe()} after {result.seconds:.0f} s (build.log)")
    kernels = parse_ptxas(result.output)
    table = ptxas_table(kernels)
    run.path("ptxas").write_text(f"ptxas -v report, TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}\n\n"
                                 + table + "\n")
    spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
    run.say(f"{len(kernels)} functions in the ptxas report, {len(spilling)} spill (ptxas.txt); top of the table:")
    run.say("\n".join(table.splitlines()[:12]))
    check = run.run([PYTHON, "-c", "import fastlstm; print(fastlstm.__file__, 'cuda kernels:', "
                                   "fastlstm.cuda_compiled())"], "build", timeout_s=60, env=pythonpath())
    run.say(tail(check.output, 2))
    if not check.ok or "cuda kernels: True" not in check.output:
        return Outcome("failed", "the built extension has no CUDA kernels or does not import")
    return Outcome("ok", f"{result.seconds:.0f} s build, {len(kernels)} functions, {len(spilling)} spilling")


def pythonpath() -> dict[str, str]:
    """The in-place build first on the path, before any installed fastlstm."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1"}


def counted_outcome(result: Result, what: str) -> Outcome:
    """ok/failed from the exit code, with the closing 'N passed, M failed' line when there is one."""
    counts = re.findall(r"^.*\d+ passed.*$", result.output, re.MULTILINE)
    note = counts[-1].strip() if counts else result.describe()
    return Outcome("ok" if result.ok else "failed", f"{what}: {note}")


def stage_correctness(run: Run) -> Outcome:
    result = run.run([PYTHON, "benchmarks/gpu_correctness.py"], "correctness", env=pythonpath())
    run.say("\n".join(line for line in result.output.splitlines()
                      if line.startswith(("FAIL", "ERROR")) or re.search(r"\d+ passed", line)) or tail(result.output, 15))
    return counted_outcome(result, "gpu_correctness")


def stage_emulator(run: Run) -> Outcome:
    entry = ROOT / "tests" / "cuda_emu" / "run.py"
    if not entry.exists():
        run.say(f"{entry.relative_to(ROOT)}: missing")
        return Outcome("skipped", "tests/cuda_emu/run.py missing")
    result = run.run([PYTHON, str(entry.relative_to(ROOT)), "--gpu"], "correctness", env=pythonpath())
    run.say(tail(result.output, 10))
    return counted_outcome(result, "emulator --gpu")


# cuDNN's persistent-algorithm shape first (the published reference), then its standard path.
BENCH_RUNS = [
    ("fp16-reference", ["--dtype", "fp16", "--B", "16"]),
    # two directions on two streams against one stream (fastlstm/directions.py), cuDNN bidirectional
    ("bf16-bidirectional", ["--dtype", "bf16", "--B", "16", "--bidirectional"]),
    ("fp16", ["--dtype", "fp16", "--B", "1", "64"]),
    ("bf16", ["--dtype", "bf16", "--B", "1", "16", "64"]),
    ("fp32", ["--dtype", "fp32", "--B", "1", "16", "64"]),
]
BENCH_SHAPE = ["--T", "1024", "--I", "768", "--H", "768"]
BENCH_DEVICE = "cuda"
REFERENCE_NOTE = ("published reference (H100, /work/shared/PERF.md): cuDNN persistent, fp16 T=1024 B=16 "
                  "I=H=768: 2.01 ms forward, 5.19 ms forward+backward")


def per_step_table(reports: dict[str, dict]) -> str:
    """us per step (median ms x 1000 / T) of every side, from bench.py's JSON rows."""
    lines = ["| dtype | B | cuDNN algo | impl | fwd us/step torch | fwd us/step impl | fwd+bwd us/step torch "
             "| fwd+bwd us/step impl | notes |", "|---|---|---|---|---|---|---|---|---|"]

    def us(side: dict) -> str:
        median = side.get("median_ms")
        return "-" if median is None else f"{median * 1000 / row['T']:.2f}"

    for payload in reports.values():
        for row in payload.get("rows", []):
            phases = row.get("phases", {})
            cells = []
            for phase in ("fwd", "fwd+bwd"):
                sides = phases.get(phase, {})
                cells += [us(sides.get("torch", {})), us(sides.get("impl", {}))]
            notes = "; ".join(row.get("notes", []))[:80]
            lines.append(f"| {row['dtype']} | {row['B']} | {row['cudnn_algo']} | {row['impl']}/{row['backend']} | "
                         + " | ".join(cells) + f" | {notes} |")
    return "\n".join(lines)


def stage_bench(run: Run) -> Outcome:
    reports: dict[str, dict] = {}
    failed = []
    run.say(REFERENCE_NOTE)
    for name, grid in BENCH_RUNS:
        scratch = run.scratch / f"bench-{name}"
        command = [PYTHON, "benchmarks/bench.py", "--device", BENCH_DEVICE, *BENCH_SHAPE, *grid, "--warmup", "2",
                   "--repeats", "7", "--out", str(scratch)]
        if run.remaining() < 20:
            failed.append(f"{name}: not started, {run.remaining():.0f} s left")
            break
        result = run.run(command, run.scratch_path(f"bench-{name}.log"), env=pythonpath())
        jsons = sorted(scratch.glob("*.json"))
        if result.ok and jsons:
            reports[name] = json.loads(jsons[0].read_text())
            md = sorted(scratch.glob("*.md"))
            run.say(md[0].read_text() if md else "")
        else:
            failed.append(f"{name}: {result.describe()}")
            run.say(tail(result.output, 15))
        run.path("bench").write_text(json.dumps(reports, indent=1) + "\n")  # after each run: partial results stay
    if reports:
        run.say("us per step (median):\n" + per_step_table(reports))
    status = "ok" if not failed else "failed"
    return Outcome(status, f"{len(reports)}/{len(BENCH_RUNS)} grids" + (f"; {'; '.join(failed)}" if failed else ""))


# ---- pytest with a per-test timeout: this file is also the pytest plugin (-p gpu_check) ----

TEST_TIMEOUT_S = 45  # the slowest CUDA test (T=100k forward, twice) should take a few seconds
PYTEST_RESTARTS = 3
_session = None
_watchdog_file = None  # faulthandler writes into it: pytest's capture owns the test's stderr


def pytest_sessionstart(session) -> None:  # noqa: ANN001 - pytest hook
    global _session
    _session = session


def _started_file() -> Path | None:
    """GPU_CHECK_STARTED: the node ids of the tests started so far, one a line (set by run_pytest)."""
    name = os.environ.get("GPU_CHECK_STARTED")
    return Path(name) if name else None


def _timeout_file(started: Path) -> Path:
    return started.with_suffix(".timeout")


def _reports_file(started: Path) -> Path:
    return started.with_suffix(".reports")


def _collected_file(started: Path) -> Path:
    return started.with_suffix(".collected")


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001 - pytest hook
    """Every phase's outcome, kept across the runs of the stage (a killed run prints no summary)."""
    started = _started_file()
    if started is not None:
        with _reports_file(started).open("a") as f:
            f.write(f"{report.when} {report.outcome} {report.nodeid}\n")


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ANN001 - pytest hook
    """Deselect the tests an earlier (killed) run of this stage already started."""
    started = _started_file()
    if started is None or not started.exists():
        return
    done = set(started.read_text().splitlines())
    deselected = [item for item in items if item.nodeid in done]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.nodeid not in done]


def pytest_collection_finish(session) -> None:  # noqa: ANN001 - pytest hook
    """The number of tests selected, by the first run of the stage (later runs leave out the started)."""
    started = _started_file()
    if started is not None and not _collected_file(started).exists():
        _collected_file(started).write_text(f"{len(session.items)}\n")


def pytest_runtest_logstart(nodeid: str, location) -> None:  # noqa: ANN001 - pytest hook
    """Record the test, then arm the watchdog: past the timeout, dump every thread's stack and exit."""
    global _watchdog_file
    started = _started_file()
    if started is None:
        return
    with started.open("a") as f:
        f.write(nodeid + "\n")
    if _watchdog_file is None:
        _watchdog_file = _timeout_file(started).open("w")
    faulthandler.dump_traceback_later(float(os.environ.get("GPU_CHECK_TEST_TIMEOUT", TEST_TIMEOUT_S)), exit=True,
                                      file=_watchdog_file)


def pytest_runtest_logfinish(nodeid: str, location) -> None:  # noqa: ANN001 - pytest hook
    """Disarm the watchdog; past the stage's deadline, end the session after this test."""
    if _started_file() is None:
        return
    faulthandler.cancel_dump_traceback_later()
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", "inf"))
    if _session is not None and time.time() > deadline:
        _session.shouldstop = "gpu_check: the stage's deadline passed"


@dataclass
class TestTally:
    """Outcomes of the tests over all the runs of a pytest stage."""

    outcomes: dict[str, str] = field(default_factory=dict)  # node id -> passed | failed | skipped
    hung: list[str] = field(default_factory=list)
    runs: list[Result] = field(default_factory=list)
    selected: int = 0  # tests selected by the first run

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    @property
    def not_run(self) -> int:
        """Selected tests that never ended (the stage's deadline, or a run that broke)."""
        return max(0, self.selected - len(self.outcomes) - len(self.hung))

    def line(self) -> str:
        return (f"{self.count('passed')} passed, {self.count('failed')} failed, {self.count('skipped')} skipped, "
                f"{len(self.hung)} hung, {self.not_run} not run ({len(self.runs)} pytest runs)")


def tally_reports(text: str) -> dict[str, str]:
    """'when outcome nodeid' lines -> the outcome of each test: failed if any phase failed, else
    skipped if one was skipped, else passed once its call passed."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        when, outcome, nodeid = line.split(" ", 2)
        previous = outcomes.get(nodeid)
        if outcome == "failed" or previous == "failed":
            outcomes[nodeid] = "failed"
        elif outcome == "skipped" or previous == "skipped":
            outcomes[nodeid] = "skipped"
        elif when == "call":
            outcomes[nodeid] = "passed"
    return outcomes


def run_pytest(run: Run, arguments: list[str], test_timeout_s: float) -> TestTally:
    """pytest with this file as plugin; after a hang, again without the tests already started.
    The stacks of a hung test are appended to pytest.log."""
    started = run.scratch_path("pytest-started.txt")
    watchdog = _timeout_file(started)
    path = pythonpath()
    env = {**path, "PYTHONPATH": os.pathsep.join([path["PYTHONPATH"], str(ROOT / "benchmarks")]),
           "GPU_CHECK_STARTED": str(started), "GPU_CHECK_TEST_TIMEOUT": str(test_timeout_s)}
    tally = TestTally()
    for _ in range(1 + PYTEST_RESTARTS):
        # The session stops itself shortly before the KILL so that pytest prints its summary; a test
        # still running at the KILL loses nothing else, the outcomes are in the reports file.
        env["GPU_CHECK_DEADLINE"] = str(time.time() + run.remaining() - 5)
        result = run.run([PYTHON, "-m", "pytest", "-p", "gpu_check", *arguments], "pytest", env=env)
        tally.runs.append(result)
        dump = watchdog.read_text() if watchdog.exists() else ""
        watchdog.unlink(missing_ok=True)
        if not dump.strip():
            break
        test = started.read_text().splitlines()[-1]
        tally.hung.append(test)
        run.append("pytest", f"# HUNG over {test_timeout_s:.0f} s: {test}\n{dump}")
        if run.remaining() < min(30, 3 * test_timeout_s):  # too little left for collection and a few tests
            break
    reports, collected = _reports_file(started), _collected_file(started)
    tally.outcomes = tally_reports(reports.read_text() if reports.exists() else "")
    tally.selected = int(collected.read_text()) if collected.exists() else 0
    return tally


def stage_pytest(run: Run) -> Outcome:
    tally = run_pytest(run, ["-m", "cuda", "tests", "-q", "-rfE", "--durations=10", "-p", "no:cacheprovider"],
                       TEST_TIMEOUT_S)
    failed = sorted(n for n, o in tally.outcomes.items() if o == "failed")
    for nodeid in failed[:40]:
        run.say(f"FAILED {nodeid}")
    for nodeid in tally.hung:
        run.say(f"HUNG (over {TEST_TIMEOUT_S} s, stacks in pytest.log) {nodeid}")
    stopped = [r for r in tally.runs if r.rc not in (0, 1)]  # 1: tests failed; None: killed; other: pytest broke
    run.say(tally.line())
    ok = not failed and not tally.hung and not stopped and not tally.not_run and tally.count("passed") > 0
    return Outcome("ok" if ok else "failed", tally.line() + "".join(f"; a run {r.describe()}" for r in stopped))


def stage_calibrate(run: Run) -> Outcome:
    binary = run.scratch_path("sync_latency")
    arch = (FACTS.arch or "9.0").replace(".", "")
    build = run.run([cuda_tool("nvcc"), "-O3", f"-arch=sm_{arch}", "-o", str(binary), "benchmarks/calibrate/sync_latency.cu"],
                    run.scratch_path("calibrate-build.log"), timeout_s=120)
    if not build.ok:
        run.say(tail(build.output, 15))
        return Outcome("failed", f"nvcc {build.describe()}")
    result = run.run([str(binary)], run.scratch_path("calibrate.log"), timeout_s=90)
    run.say("\n".join(line for line in result.output.splitlines() if not line.startswith(("$ ", "# "))))
    return Outcome("ok" if result.ok else "failed", f"sync_latency {result.describe()}")


def cuda_tool(name: str) -> str:
    """``name`` on the PATH, else in the toolkit's bin/ (CUDA_HOME, default /usr/local/cuda)."""
    return shutil.which(name) or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)


def stage_sanitizer(run: Run) -> Outcome:
    env = {**pythonpath(), "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    notes, ok = [], True
    tools = ["memcheck", "racecheck"]
    for number, tool in enumerate(tools):
        share = run.remaining() / (len(tools) - number)  # what is left, split between the tools to come
        result = run.run([cuda_tool("compute-sanitizer"), "--tool", tool, "--error-exitcode", "9", "--print-limit", "20",
                          PYTHON, "benchmarks/sanitizer_cases.py"], "sanitizer", timeout_s=share, env=env)
        cases = len(re.findall(r"^ok ", result.output, re.MULTILINE))
        summary = re.findall(r"ERROR SUMMARY: .*", result.output)
        notes.append(f"{tool}: {result.describe()}, {cases} cases, {summary[-1] if summary else 'no error summary'}")
        run.say(notes[-1])
        if not result.ok:
            run.say(tail(result.output, 12))
        ok = ok and result.ok
    return Outcome("ok" if ok else "failed", "; ".join(notes))


STAGES = [
    Stage("facts", stage_facts, cap_s=60, min_s=5),
    Stage("build", stage_build, cap_s=330, min_s=60, needs=("facts",)),
    Stage("correctness", stage_correctness, cap_s=100, min_s=20, needs=("build",)),
    Stage("emulator", stage_emulator, cap_s=60, min_s=15, needs=("facts",)),
    Stage("bench", stage_bench, cap_s=150, min_s=30, needs=("build",)),
    Stage("pytest", stage_pytest, cap_s=150, min_s=40, needs=("build",)),
    Stage("calibrate", stage_calibrate, cap_s=60, min_s=15, needs=("facts",)),
    Stage("sanitizer", stage_sanitizer, cap_s=100, min_s=25, needs=("build",)),
]


# ---------------------------------------------------------------------------------------------
# The driver, and the dry run that checks it without a GPU.
# ---------------------------------------------------------------------------------------------

def run_stages(run: Run, stages: list[Stage], selected: set[str]) -> list[tuple[Stage, Outcome, float]]:
    done: dict[str, Outcome] = {}
    summary = []
    for stage in stages:
        if stage.name not in selected:
            continue
        begin = time.monotonic()
        left = run.deadline - SUMMARY_RESERVE_S - begin
        blocked = [n for n in stage.needs if n in selected and done.get(n, Outcome("skipped")).status != "ok"]
        run.say(f"\n== {stage.name} (at {run.elapsed():.0f} s, {left:.0f} s left)")
        if blocked:
            outcome = Outcome("skipped", f"needs {', '.join(blocked)}, which did not succeed")
        elif left < stage.min_s:
            outcome = Outcome("skipped", f"would overrun the deadline: needs at least {stage.min_s:.0f} s, "
                                         f"{left:.0f} s left")
        else:
            run.stage_deadline = begin + min(stage.cap_s, left)
            try:
                outcome = stage.body(run)
            except Exception as error:  # noqa: BLE001 - one broken stage must not end the run
                outcome = Outcome("failed", f"{type(error).__name__}: {error}")
            run.stage_deadline = run.deadline
        done[stage.name] = outcome
        seconds = time.monotonic() - begin
        run.say(f"-- {stage.name}: {outcome.status} ({seconds:.0f} s) {outcome.note}")
        summary.append((stage, outcome, seconds))
    return summary


def print_summary(run: Run, summary: list[tuple[Stage, Outcome, float]]) -> None:
    written = sorted(p.name for p in run.out.iterdir() if p.is_file())
    run.say(f"\n== summary ({run.elapsed():.0f} s in all; {len(written)} files in {run.out}: {', '.join(written)})")
    width = max((len(stage.name) for stage, _, _ in summary), default=5)
    for stage, outcome, seconds in summary:
        run.say(f"{stage.name:<{width}}  {outcome.status:<7}  {seconds:5.0f} s  {outcome.note}")


def fake(command: list[str]) -> Callable[[Run], Outcome]:
    def body(run: Run) -> Outcome:
        result = run.run(command, "log")
        return Outcome("ok" if result.ok else "failed", result.describe())
    return body


def fake_extra_file(run: Run) -> Outcome:
    run.path("an-eighth-file")
    return Outcome("ok", "wrote an undeclared file")


FAKE_TESTS = """
import time

def test_passes():
    pass

def test_fails():
    assert False

def test_hangs():
    time.sleep(60)

def test_after_the_hang():
    pass
"""


def fake_pytest(run: Run) -> Outcome:
    """The per-test timeout: the hanging test is reported, the run resumes after it, every outcome
    counts (also those of the run the watchdog ended)."""
    tests = run.scratch_path("test_fake.py")
    tests.write_text(FAKE_TESTS)
    tally = run_pytest(run, [str(tests), "-q", "-p", "no:cacheprovider"], test_timeout_s=2)
    expected = {"test_passes": "passed", "test_fails": "failed", "test_after_the_hang": "passed"}
    outcomes = {nodeid.rsplit("::", 1)[-1]: outcome for nodeid, outcome in tally.outcomes.items()}
    held = (outcomes == expected and len(tally.runs) == 2 and len(tally.hung) == 1
            and tally.hung[0].endswith("::test_hangs") and tally.selected == 4 and tally.not_run == 0)
    return Outcome("ok" if held else "failed", tally.line() + ("" if held else f"; outcomes {outcomes}"))


def dry_run_stages(pid_file: Path) -> tuple[list[Stage], dict[str, str]]:
    """Fake stages for every path of the driver, and the status each must end with."""
    hang = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    stages = [
        Stage("fake-ok", fake([PYTHON, "-c", "print('fine')"]), cap_s=20, min_s=1),
        Stage("fake-fail", fake([PYTHON, "-c", "raise SystemExit(3)"]), cap_s=20, min_s=1),
        Stage("fake-needs-failed", fake([PYTHON, "-c", "pass"]), cap_s=20, min_s=1, needs=("fake-fail",)),
        Stage("fake-hang", fake([PYTHON, "-c", hang]), cap_s=2, min_s=1),
        Stage("fake-extra-file", fake_extra_file, cap_s=5, min_s=1),
        Stage("fake-missing-tool", fake(["no-such-tool-gpu-check"]), cap_s=5, min_s=1),
        Stage("fake-pytest", fake_pytest, cap_s=40, min_s=1),
        Stage("fake-overrun", fake([PYTHON, "-c", "pass"]), cap_s=20, min_s=10_000),
        Stage("fake-until-deadline", fake([PYTHON, "-c", "import time; time.sleep(600)"]), cap_s=600, min_s=1),
    ]
    expected = {"fake-ok": "ok", "fake-fail": "failed", "fake-needs-failed": "skipped", "fake-hang": "failed",
                "fake-extra-file": "failed", "fake-missing-tool": "failed", "fake-pytest": "ok",
                "fake-overrun": "skipped", "fake-until-deadline": "failed"}
    return stages, expected


def process_alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (re)parent to reap it (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+[ZX]", status, re.MULTILINE)


def dry_run(run: Run, deadline_s: float) -> int:
    """Runs the fake stages and checks what the driver did: statuses, the KILL of a hung stage and
    its child, the file budget, the deadline. Exit code 0 when all held."""
    pid_file = run.scratch_path("child.pid")
    stages, expected = dry_run_stages(pid_file)
    summary = run_stages(run, stages, {s.name for s in stages})
    print_summary(run, summary)
    problems = [f"{stage.name}: {outcome.status}, expected {expected[stage.name]}"
                for stage, outcome, _ in summary if outcome.status != expected[stage.name]]
    if process_alive(int(pid_file.read_text())):
        problems.append("the hung stage's child process survived the KILL")
    files = [p for p in run.out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES or any(p.name not in FILES.values() for p in files):
        problems.append(f"files under --out: {sorted(p.name for p in files)}")
    if run.elapsed() > deadline_s:
        problems.append(f"took {run.elapsed():.1f} s, over the {deadline_s} s deadline")
    for problem in problems:
        run.say(f"DRY RUN PROBLEM: {problem}")
    run.say(f"dry run: {len(summary) - len(problems)} passed, {len(problems)} failed")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory (default: $OUT, else benchmarks/results/gpu-<date>)")
    parser.add_argument("--deadline", type=float,
                        help=f"seconds for the whole run, summary included (default {DEFAULT_DEADLINE_S}; "
                             f"{DRY_RUN_DEADLINE_S} for --dry-run)")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STAGES], metavar="STAGE",
                        help="run only these stages (in the fixed order); " + ", ".join(s.name for s in STAGES))
    parser.add_argument("--dry-run", action="store_true", help="check the driver with fake stages (no GPU needed)")
    args = parser.parse_args(argv)
    if len(FILES) > MAX_FILES:
        raise SystemExit(f"gpu_check: {len(FILES)} output files declared, at most {MAX_FILES}")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" /
                           f"gpu-{datetime.date.today().isoformat()}")
    deadline = args.deadline or (DRY_RUN_DEADLINE_S if args.dry_run else DEFAULT_DEADLINE_S)
    run = Run(out, deadline)
    try:
        run.say(f"gpu_check: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
                f"deadline {deadline:.0f} s, output in {out}")
        if args.dry_run:
            return dry_run(run, deadline)
        selected = set(args.only or [s.name for s in STAGES])
        summary = run_stages(run, STAGES, selected)
        print_summary(run, summary)
        return 0 if all(outcome.status != "failed" for _, outcome, _ in summary) else 1
    finally:
        shutil.rmtree(run.scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
