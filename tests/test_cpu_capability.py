"""The CPU kernels of every SIMD level in the one build: ATEN_CPU_CAPABILITY picks a lower one.

The level is chosen once per process, so each level runs in a subprocess of its own, which
compares fastlstm with a float64 nn.LSTM on shapes that exercise the vector tails (H and B not
multiples of any vector width) through the fused recurrence, the stepwise projection path and
every CPU dtype (bfloat16: the AVX512-BF16 kernels where they run, float32 compute elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

LEVELS = ["DEFAULT", "AVX2", "AVX512"]
# What cpu_capability() reports for a level that also runs the bfloat16 kernels (CPUs with
# AVX512_BF16; AMX_BF16 where their products run on AMX tiles).
WITH_BF16 = {"AVX512_BF16": "AVX512", "AMX_BF16": "AVX512"}

# Runs in the subprocess: prints {"capability": fastlstm's level, "torch": torch's level,
# "errors": {case: (dtype, relative error)}}.
_CHILD = r"""
import json
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
import fastlstm

def rel(a, e):
    return ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-6)).item()

torch.manual_seed(0)
errors = {}
# (hidden size, batch, options). H=130 and B of 16 and 4: the fused forward's tall tiles (6 and
# 4 rows; in two passes of two gates on AVX2, which takes them from H=128), full and partial
# unit blocks.
# B=67: 603 rows, over two chunks of the weight-gradient kernel (256 rows), 4H = 148 columns with
# a partial vector at every level.
cases = {"fused": (19, 5, dict(num_layers=2, bidirectional=True)), "projection": (19, 5, dict(proj_size=3)),
         "tall-16": (130, 16, {}), "tall-4": (130, 4, {}), "rows-603": (37, 67, dict(proj_size=5))}
for name, (H, B, cfg) in cases.items():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ref = nn.LSTM(6, H, dtype=torch.float64, **cfg)
        ours = fastlstm.LSTM(6, H, dtype=dtype, **cfg)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(9, B, 6, dtype=torch.float64)
        lengths = torch.tensor([9, 4, 7, 1, 9] * (B // 5) + [9, 2, 5, 8][: B % 5])
        results = []
        for model, data in ((ref, x), (ours, x.to(dtype))):
            leaf = data.clone().requires_grad_()
            y, (h, c) = model(pack_padded_sequence(leaf, lengths, enforce_sorted=False))
            loss = (y.data ** 2).sum() + (h ** 2).sum() + c.sum()
            grads = torch.autograd.grad(loss, [leaf] + list(model.parameters()))
            results.append((y.data, h, c) + grads)
        errors[f"{name}-{str(dtype)[6:]}"] = (str(dtype)[6:], max(rel(a, e) for a, e in zip(results[1], results[0])))
# Non-finite and saturating inputs through the activations' branches (exp's and tanh's NaN
# selection, tanh's sign and small-|x| selections): NaN exactly where float64 torch has NaN.
special = torch.tensor([0.1, -0.2, 30.0, -30.0, float("inf"), -float("inf"), float("nan"), 0.05, -4.0])
for dtype in (torch.float32, torch.float64):
    ref = nn.LSTM(1, 19, dtype=torch.float64)
    ours = fastlstm.LSTM(1, 19, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.stack([special.roll(k) for k in range(5)], 1).unsqueeze(-1).double()
    with torch.no_grad():
        expected, actual = ref(x)[0], ours(x.to(dtype))[0].double()
    same_nans = bool(torch.equal(expected.isnan(), actual.isnan()))
    finite = ~expected.isnan()
    errors[f"special-{str(dtype)[6:]}"] = (str(dtype)[6:], rel(actual[finite], expected[finite]) if same_nans else float("inf"))
print(json.dumps({"capability": fastlstm.cpu_capability(), "torch": torch.backends.cpu.get_cpu_capability(),
                  "errors": errors}))
"""

TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 2e-2}


def _run_at(level: str | None, gemm: str | None = None) -> dict:
    """The child's report with ATEN_CPU_CAPABILITY=level (None: unset, the CPU's own level) and
    FASTLSTM_CPU_GEMM=gemm (None: unset, the CPU's own choice)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "FASTLSTM_CPU_GEMM")}
    if level is not None:
        env["ATEN_CPU_CAPABILITY"] = level
    if gemm is not None:
        env["FASTLSTM_CPU_GEMM"] = gemm
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ATEN_CPU_CAPABILITY={level}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_level_runs_correctly_and_reports_itself():
    native = _run_at(None)
    level = WITH_BF16.get(native["capability"], native["capability"])
    assert level in LEVELS
    # Our detection claims no more than torch's own (a build with fewer levels may report less;
    # torch's non-x86 levels, such as SVE256, have no fastlstm counterpart beyond DEFAULT).
    torch_rank = LEVELS.index(native["torch"]) if native["torch"] in LEVELS else 0
    assert LEVELS.index(level) <= torch_rank, (native["capability"], native["torch"])
    reports = {"native": native}
    # A forced lower level also turns the bfloat16 kernels off: it reports a plain level.
    for forced in ("avx2", "default"):
        report = _run_at(forced)
        expected = LEVELS[min(LEVELS.index(forced.upper()), LEVELS.index(level))]
        assert report["capability"] == expected, (forced, report["capability"])
        reports[forced] = report
    # Both choices of the products' kernels (fastlstm's everywhere, or ATen's mm where it measured
    # faster on an Intel CPU), whichever this CPU takes by default.
    for gemm in ("packed", "blas"):
        reports[f"gemm={gemm}"] = _run_at(None, gemm)
    for run, report in reports.items():
        for case, (dtype, err) in report["errors"].items():
            assert err <= TOLERANCE[dtype], f"{run} ({report['capability']}), {case}: relative error {err:.2e}"
