"""Build and run the CUDA execution harness (see tests/cuda_emu/README.md).

    python tests/cuda_emu/run.py            # build, run under the in-order and a random schedule
    python tests/cuda_emu/run.py --ci       # ... and an AddressSanitizer+UBSan build (make test)
    python tests/cuda_emu/run.py --gpu      # the emulator's own tests built with nvcc, on a real GPU
    python tests/cuda_emu/run.py -k tiling  # only the tests whose name contains "tiling"

Needs an installed torch (its headers and libraries), not the fastlstm extension. Objects are kept
in build/cuda_emu/<variant>/ and rebuilt only when a source or a header it includes changed. The
last line printed is "N passed, M failed" over every run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "cuda_emu"
CSRC = ROOT / "csrc"

# Sources the harness builds. The .cu files compile as C++ with the runtime force-included.
RUNTIME = [HERE / "src" / "runtime.cpp"]
EMULATED_CUDA = sorted((CSRC / "cuda").glob("*.cu")) + [
    p for p in sorted((CSRC / "cuda").glob("*.cpp")) if p.name != "cublas_gemm.cpp"
]
HOST = [CSRC / "op_schemas.cpp", HERE / "src" / "gemm_stand_in.cpp"] + sorted((CSRC / "cpu").glob("*.cpp"))
# The CPU path's per-ISA kernels, at the default level only (the reference need not be fast).
HOST_KERNELS = sorted((CSRC / "cpu" / "kernels").glob("*.cpp"))
KERNEL_LEVEL = ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


@dataclass
class Variant:
    name: str
    flags: list[str]
    # Flags only for the code under test (the emulator, the CUDA sources, the tests); the CPU
    # reference path is reused from the plain build.
    sanitize: list[str] = field(default_factory=list)


PLAIN = Variant("plain", ["-O1"])  # no -g: it costs compile time; the sanitizer build has it
SANITIZED = Variant("asan", ["-O1", "-g"], ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                                            "-fno-sanitize-recover=undefined"])


@dataclass
class Run:
    variant: Variant
    env: dict[str, str]

    def describe(self) -> str:
        return f"{self.variant.name}: " + " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))


def torch_paths() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension  # imported late: only the build needs torch

    return cpp_extension.include_paths(), cpp_extension.library_paths()


def compile_flags(includes: list[str]) -> list[str]:
    import torch

    flags = ["-std=c++20", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{CSRC}"]
    if torch.backends.openmp.is_available():
        flags.append("-fopenmp")
    return flags + [f"-isystem{d}" for d in includes]


def stale(obj: Path, dep: Path) -> bool:
    if not obj.exists() or not dep.exists():
        return True
    t = obj.stat().st_mtime
    for name in re.split(r"(?<!\\)\s+", dep.read_text().replace("\\\n", " "))[1:]:
        if name and (not os.path.exists(name) or os.stat(name).st_mtime > t):
            return True
    return False


def compile_one(src: Path, obj: Path, flags: list[str]) -> tuple[Path, str | None]:
    dep = obj.with_suffix(".d")
    if not stale(obj, dep):
        return obj, None
    obj.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["g++", *flags, "-MMD", "-MF", str(dep), "-c", str(src), "-o", str(obj)]
    if src.suffix == ".cu":
        cmd = ["g++", *flags, "-MMD", "-MF", str(dep), "-x", "c++", "-c", str(src), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return obj, f"$ {shlex.join(cmd)}\n{proc.stderr}"
    return obj, None


def build(variant: Variant, jobs: int) -> dict[str, Path]:
    """Compiles what changed and links the two test programs; returns their paths."""
    includes, libdirs = torch_paths()
    base = compile_flags(includes)
    emu = base + variant.flags + variant.sanitize + [f"-I{HERE / 'include'}", "-include", "cuda_emu/runtime.h"]
    host = base + PLAIN.flags  # the reference path: identical in every variant
    out = ROOT / "build" / "cuda_emu"
    units = [(s, out / variant.name / f"{s.stem}{s.suffix.replace('.', '_')}.o", emu) for s in
             RUNTIME + EMULATED_CUDA + [HERE / "test_emulator.cu", HERE / "test_layers.cpp"]]
    units += [(s, out / PLAIN.name / f"host_{s.stem}.o", host) for s in HOST]
    units += [(s, out / PLAIN.name / f"host_kernels_{s.stem}.o", host + KERNEL_LEVEL) for s in HOST_KERNELS]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda u: compile_one(*u), units))
    errors = [e for _, e in results if e]
    if errors:
        sys.exit("cuda_emu: build failed\n" + "\n".join(errors))
    objs = {u[0].name: r[0] for u, r in zip(units, results)}
    link = ["g++", *variant.flags, *variant.sanitize, "-pthread", "-rdynamic"]
    if "-fopenmp" in base:
        link.append("-fopenmp")
    libs = [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath,{d}" for d in libdirs] + ["-ltorch_cpu", "-lc10"]
    programs = {
        "emulator_tests": [objs["runtime.cpp"], objs["test_emulator.cu"]],
        "layer_tests": [objs["runtime.cpp"], objs["test_layers.cpp"]]
        + [objs[s.name] for s in EMULATED_CUDA + HOST + HOST_KERNELS],
    }
    paths = {}
    for name, members in programs.items():
        exe = out / variant.name / name
        if not exe.exists() or any(m.stat().st_mtime > exe.stat().st_mtime for m in members):
            extra = libs if name == "layer_tests" else []
            # --no-as-needed: the tests reach the ops only through the dispatcher's registrations.
            cmd = [*link, *map(str, members), "-Wl,--no-as-needed", *extra, "-o", str(exe)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"cuda_emu: link failed\n$ {shlex.join(cmd)}\n{proc.stderr}")
        paths[name] = exe
    print(f"cuda_emu: {variant.name} build ready ({time.monotonic() - start:.0f} s)", flush=True)
    return paths


SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)
DIGEST = re.compile(r"^digest ([0-9a-f]+)$", re.M)


@dataclass
class Outcome:
    passed: int
    failed: int
    report: str  # what the program printed, headed by what it ran
    digests: list[str]


def run_program(exe: Path, run: Run, filter_: str) -> Outcome:
    env = dict(os.environ, **run.env)
    if run.variant.sanitize:
        # libtorch is not instrumented; leaks at exit in its static state are not ours.
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    proc = subprocess.run([str(exe), filter_], env=env, capture_output=True, text=True)
    report = f"--- {exe.name} [{run.describe()}]\n{proc.stdout}{proc.stderr}"
    m = SUMMARY.findall(proc.stdout)
    if proc.returncode != 0 and not m:
        report += f"cuda_emu: {exe.name} exited with status {proc.returncode} before its summary\n"
        return Outcome(0, 1, report, DIGEST.findall(proc.stdout))
    passed, failed = (int(v) for v in m[-1]) if m else (0, 1)
    return Outcome(passed, failed + (1 if proc.returncode != 0 and failed == 0 else 0), report,
                   DIGEST.findall(proc.stdout))


def gpu(jobs: int) -> int:
    """The emulator's own tests on a real GPU: the same source, compiled by nvcc."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    out = ROOT / "build" / "cuda_emu" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    exe = out / "emulator_tests"
    arch = os.environ.get("CUDA_EMU_GPU_ARCH", "native")
    cmd = [nvcc, "-std=c++20", "-O2", f"-arch={arch}", f"-I{CSRC}", str(HERE / "test_emulator.cu"), "-o", str(exe)]
    print("$ " + shlex.join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("0 passed, 1 failed")
        return 1
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    sys.stdout.write(proc.stdout + proc.stderr)
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true", help="also the AddressSanitizer+UBSan build and run")
    parser.add_argument("--gpu", action="store_true", help="build the emulator's own tests with nvcc and run them")
    parser.add_argument("-k", dest="filter", default="", help="run only tests whose name contains this")
    parser.add_argument("-j", dest="jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if args.gpu:
        return gpu(args.jobs)
    runs = [Run(PLAIN, {"CUDA_EMU_SCHEDULE": "inorder", "CUDA_EMU_SMS": "4"}),
            Run(PLAIN, {"CUDA_EMU_SCHEDULE": "random", "CUDA_EMU_SEED": "7", "CUDA_EMU_SMS": "3"})]
    if args.ci:
        runs.append(Run(SANITIZED, {"CUDA_EMU_SCHEDULE": "random", "CUDA_EMU_SEED": "3", "CUDA_EMU_SMS": "5"}))
    start = time.monotonic()
    passed = failed = 0
    built: dict[str, dict[str, Path]] = {}
    digests: set[str] = set()
    for variant in dict.fromkeys(run.variant.name for run in runs):
        variant_runs = [run for run in runs if run.variant.name == variant]
        built[variant] = build(variant_runs[0].variant, args.jobs)
        # Each program is single-threaded (the emulator schedules the CUDA threads itself): the
        # runs of a build go side by side, one per core, the layer tests of a build with fewer
        # runs than cores split into shards; their reports printed in order.
        shards = max(1, args.jobs // len(variant_runs))
        programs = [(exe, replace(run, env={**run.env, "CUDA_EMU_SHARD": f"{i}/{shards}"}) if name == "layer_tests"
                     else run)
                    for run in variant_runs for name, exe in built[variant].items()
                    for i in range(shards if name == "layer_tests" else 1)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[0], job[1], args.filter), programs))
        for outcome in outcomes:
            sys.stdout.write(outcome.report)
            digests.update(outcome.digests)
            passed, failed = passed + outcome.passed, failed + outcome.failed
        sys.stdout.flush()
    # The reproducibility test's digest must not depend on the schedule (or the sanitizer build).
    if len(digests) > 1:
        print(f"FAIL results differ between schedules: digests {sorted(digests)}")
        failed += 1
    elif digests:
        print(f"PASS results are bitwise identical across the {len(runs)} runs' schedules")
        passed += 1
    print(f"cuda_emu: {len(runs)} runs in {time.monotonic() - start:.0f} s")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
