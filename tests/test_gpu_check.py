"""benchmarks/gpu_check.py and gpu_correctness.py, the parts that run without a GPU: the stage driver
(deadlines, KILL timeouts, the file budget, the pytest watchdog) through --dry-run, the ptxas
report parser, the pytest outcome tally, the us/step table, and the correctness check's own
reference and comparison code on the CPU kernels."""

import os
import re
import subprocess
import sys
from pathlib import Path

import fastlstm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

# `nvcc -Xptxas -v` output as CUDA 13.0 prints it for sm_90 (the first kernel verbatim), plus a kernel
# that spills and uses static shared memory.
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z12empty_kernelv' for 'sm_90'
ptxas info    : Function properties for _Z12empty_kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers, used 0 barriers
ptxas info    : Compile time = 16.743 ms
ptxas info    : Compiling entry function '_Z5heavyPf' for 'sm_90'
ptxas info    : Function properties for _Z5heavyPf
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem
"""


def test_dry_run_checks_the_driver(tmp_path):
    """Every fake stage ends as it must (a hung one killed with its child, one past the deadline
    skipped, an undeclared file refused, a hung test reported and the run resumed), within the
    deadline, with at most 7 files written."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"^dry run: \d+ passed, 0 failed$", done.stdout, re.MULTILINE)
    files = [p.name for p in out.iterdir()]
    assert 0 < len(files) <= gpu_check.MAX_FILES and set(files) <= set(gpu_check.FILES.values())
    assert done.stdout.rstrip().splitlines()[-1].startswith("dry run:")


def test_ptxas_report_is_parsed_per_kernel():
    kernels = {k.name: k for k in gpu_check.parse_ptxas(PTXAS_SAMPLE)}
    assert set(kernels) == {"_Z12empty_kernelv", "_Z5heavyPf"}
    heavy = kernels["_Z5heavyPf"]
    assert (heavy.registers, heavy.stack, heavy.spill_stores, heavy.spill_loads, heavy.smem) == (255, 48, 40, 36, 4096)
    assert kernels["_Z12empty_kernelv"].registers == 4 and kernels["_Z12empty_kernelv"].smem == 0
    table = gpu_check.ptxas_table(list(kernels.values())).splitlines()
    assert "heavy" in table[2]  # spilling kernels first


def test_pytest_tally_takes_the_worst_phase():
    reports = "\n".join(["setup passed a::t1", "call passed a::t1", "teardown passed a::t1",
                         "setup passed a::t2", "call failed a::t2", "teardown passed a::t2",
                         "setup skipped a::t3", "teardown passed a::t3",
                         "setup passed a::t4", "call passed a::t4", "teardown failed a::t4",
                         "setup passed a::hung"])
    assert gpu_check.tally_reports(reports) == {"a::t1": "passed", "a::t2": "failed", "a::t3": "skipped",
                                                "a::t4": "failed"}


def test_per_step_table_divides_by_the_sequence_length():
    side = {"median_ms": 2.0}
    row = {"T": 1000, "B": 16, "dtype": "float16", "cudnn_algo": "persistent", "impl": "fastlstm",
           "backend": "stepwise", "notes": [],
           "phases": {"fwd": {"torch": side, "impl": {"median_ms": 8.0}},
                      "fwd+bwd": {"torch": {"median_ms": 5.0}, "impl": {"median_ms": None}}}}
    line = gpu_check.per_step_table({"fp16": {"rows": [row]}}).splitlines()[-1]
    assert line == "| float16 | 16 | persistent | fastlstm/stepwise | 2.00 | 8.00 | 5.00 | - |  |"


def test_correctness_check_runs_on_the_cpu_kernels():
    """gpu_correctness's reference, rounding and comparison, on one case with the CPU kernels."""
    # The script's own directory is on its sys.path, not the one holding fastlstm: point it at the
    # fastlstm this test imported (the source tree built in place, or an installed wheel).
    env = {**os.environ, "PYTHONPATH": str(Path(fastlstm.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_correctness.py"), "--device", "cpu",
                           "--cases", "clip-gates"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "3 passed, 0 failed, 0 skipped"
    assert all(line.startswith("PASS clip-gates auto ") for line in lines[:-1])
