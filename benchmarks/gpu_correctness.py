#!/usr/bin/env python3
"""The CUDA backends against a float64 CPU reference on a few hard cases (run by gpu_check.py).

    PYTHONPATH=. python3 benchmarks/gpu_correctness.py [--device cuda|cpu] [--cases NAME ...]

Each case builds one float64 model and one input, rounds both to the dtype under test, and runs
(a) that copy on the device with each backend (stepwise, persistent, cluster; on the CPU the CPU
kernels) and
(b) the float64 CPU reference on the rounded values upcast to float64: ``torch.nn.LSTM`` for the
cases it can compute, fastlstm's own CPU kernels in float64 where the case uses a fastlstm-only
option (TBPTT, clipping, gradient norms, checkpointing, resets; those CPU kernels are themselves checked
against independent references in tests/). Compared: output, h_n, c_n, the gradients of input,
h0, c0 and every parameter under one random loss, and the recorded gradient norms. Every kernel
buffer is poisoned with NaN first, so an unwritten element fails.

Error = max |device - reference| / max |reference| per tensor; a line per (case, backend, dtype)
gives the worst tensor, its error and the tolerance (float64 1e-10, float32 1e-5, bfloat16 2e-2,
float16 1e-2: the test suite's), PASS or FAIL; a size or dtype the persistent or cluster kernel
refuses is SKIP with its reason. The last line is 'N passed, M failed, K skipped'; exit code 1 when anything failed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm
from fastlstm import _extension
from fastlstm.dispatch import cluster_support, persistent_support

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
TOLERANCE = {F64: 1e-10, F32: 1e-5, BF16: 2e-2, F16: 1e-2}
FASTLSTM_ONLY = ("tbptt_chunk", "grad_clip", "grad_clip_mode", "record_grad_norms", "checkpoint_every")


@dataclass(frozen=True)
class Case:
    """One LSTM call: x (T, B, I), hidden size H; ``options`` are fastlstm module options."""

    name: str
    T: int
    B: int
    I: int
    H: int
    dtypes: tuple[torch.dtype, ...]
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    reset: bool = False  # per-sample state resets at random steps (fastlstm only)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_can_compute(self) -> bool:
        return not self.reset and not any(key in self.options for key in FASTLSTM_ONLY)


CASES = [
    # Unsorted lengths, both directions (the reverse one starts at each sequence's own end), stacked.
    Case("packed-bidirectional-2layers", T=23, B=5, I=7, H=33, layers=2, bidirectional=True, packed=True,
         dtypes=(F64, F32, BF16, F16)),
    # A batch wider than one batch tile of the persistent kernel, H a multiple of 128.
    Case("batch-tiles", T=12, B=96, I=16, H=256, bidirectional=True, dtypes=(F32, BF16, F16)),
    # Truncation, recurrent clipping, norms and checkpointing together, on a packed batch.
    Case("tbptt-clip-norms-checkpoint", T=20, B=3, I=5, H=40, bidirectional=True, packed=True,
         options={"tbptt_chunk": 6, "grad_clip": 0.05, "record_grad_norms": True, "checkpoint_every": 5},
         dtypes=(F64, F32, BF16)),
    # Per-sample resets in both directions of a stacked packed layer, with truncation and norms.
    Case("resets-packed-bidirectional", T=17, B=6, I=5, H=40, layers=2, bidirectional=True, packed=True, reset=True,
         options={"tbptt_chunk": 5, "record_grad_norms": True}, dtypes=(F64, F32, BF16)),
    Case("clip-gates", T=15, B=4, I=6, H=64, packed=True,
         options={"grad_clip": 0.05, "grad_clip_mode": "gates", "record_grad_norms": True}, dtypes=(F64, F32, F16)),
    # The benchmark's shape (cuDNN's persistent reference), shorter: the timed kernels compute the right thing.
    Case("benchmark-shape", T=64, B=16, I=768, H=768, dtypes=(F16, BF16, F32)),
]


def make_inputs(case: Case, generator: torch.Generator) -> dict[str, Tensor]:
    """float64 x (T, B, I), h0 and c0 (layers*D, B, H), output-gradient weights, lengths (B,)."""
    D = 2 if case.bidirectional else 1
    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=F64)
    lengths = torch.randint(1, case.T + 1, (case.B,), generator=generator)
    lengths[case.B // 2] = case.T  # unsorted, the longest in the middle
    return {"x": randn(case.T, case.B, case.I), "h0": randn(case.layers * D, case.B, case.H),
            "c0": randn(case.layers * D, case.B, case.H), "gy": randn(case.T, case.B, D * case.H),
            "gh": randn(case.layers * D, case.B, case.H), "gc": randn(case.layers * D, case.B, case.H),
            "lengths": lengths if case.packed else torch.full((case.B,), case.T),
            "reset": torch.rand(case.T, case.B, generator=generator, dtype=F64) < 0.2}


def run_model(model: nn.Module, case: Case, data: dict[str, Tensor], device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Forward and backward of sum(y*gy) + sum(h_n*gh) + sum(c_n*gc) on copies of the data in
    ``dtype`` on ``device``; every output and gradient, float64 on the CPU."""
    leaves = {k: data[k].to(device=device, dtype=dtype, copy=True).requires_grad_() for k in ("x", "h0", "c0")}
    weights = {k: data[k].to(device=device, dtype=dtype) for k in ("gy", "gh", "gc")}
    x = leaves["x"]
    inp: Tensor | PackedSequence = x
    if case.packed:
        inp = pack_padded_sequence(x, data["lengths"], enforce_sorted=False)
    extra = {"reset": data["reset"].to(device)} if case.reset else {}
    y, (h, c) = model(inp, (leaves["h0"], leaves["c0"]), **extra)
    if isinstance(y, PackedSequence):
        y = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=case.T)[0]
    loss = (y * weights["gy"]).sum() + (h * weights["gh"]).sum() + (c * weights["gc"]).sum()
    for p in model.parameters():
        p.grad = None
    loss.backward()  # not autograd.grad: gradient norms are recorded by .backward() only
    out = {"output": y, "h_n": h, "c_n": c}
    out.update({f"grad {k}": v.grad for k, v in leaves.items()})
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    norms = getattr(model, "grad_norms", None)
    if norms is not None:
        out.update({"grad norms h": norms.h, "grad norms c": norms.c})
    return {k: v.detach().to(device="cpu", dtype=F64) for k, v in out.items()}


def reference(model: fastlstm.LSTM, case: Case, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """The float64 CPU results of ``model`` (already rounded to the dtype under test, then upcast)."""
    ref64 = copy.deepcopy(model).to(device="cpu", dtype=F64)
    if not case.torch_can_compute:
        ref64.backend = "auto"
        return run_model(ref64, case, data, "cpu", F64)
    torch_lstm = nn.LSTM(case.I, case.H, case.layers, bidirectional=case.bidirectional, dtype=F64)
    with torch.no_grad():
        for name, p in torch_lstm.named_parameters():
            p.copy_(getattr(ref64, name))
    return run_model(torch_lstm, case, data, "cpu", F64)


def relative_errors(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, float]:
    """max |a - e| / max |e| per tensor; inf for a non-finite result or a missing tensor."""
    errors = {}
    for name, e in expected.items():
        a = actual.get(name)
        if a is None or a.shape != e.shape or not torch.isfinite(a).all():
            errors[name] = float("inf")
            continue
        scale = max(e.abs().max().item(), 1e-6) if e.numel() else 1.0
        errors[name] = (a - e).abs().max().item() / scale if e.numel() else 0.0
    return errors


# The backends that refuse some layers, and the function that says why.
SUPPORT = {"persistent": persistent_support, "cluster": cluster_support}


def check(case: Case, dtype: torch.dtype, backends: list[str], device: str, seed: int) -> list[tuple[str, str]]:
    """(PASS | FAIL | SKIP, the line that says so) for each backend, against one reference."""
    generator = torch.Generator().manual_seed(seed)
    data = make_inputs(case, generator)
    torch.manual_seed(seed)
    model64 = fastlstm.LSTM(case.I, case.H, case.layers, bidirectional=case.bidirectional, dtype=F64, **case.options)
    # The model and data as the device sees them (rounded to dtype); the reference starts from these.
    model = copy.deepcopy(model64).to(device=device, dtype=dtype)
    data = {k: v if k in ("lengths", "reset") else v.to(dtype).to(F64) for k, v in data.items()}
    expected = reference(model, case, data)
    reference_name = "torch.nn.LSTM" if case.torch_can_compute else "fastlstm CPU"
    tolerance = TOLERANCE[dtype]
    lines = []
    for backend in backends:
        label = f"{case.name} {backend} {str(dtype).removeprefix('torch.')}"
        if backend in SUPPORT:
            ok, why = SUPPORT[backend](case.H, case.B, dtype, torch.device(device))
            if not ok:
                lines.append(("SKIP", f"SKIP {label}: {SUPPORT[backend].__name__}: {why}"))
                continue
        model.backend = backend
        try:
            actual = run_model(model, case, data, device, dtype)
        except RuntimeError as error:
            lines.append(("FAIL", f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0]}"))
            continue
        errors = relative_errors(actual, expected)
        worst = max(errors, key=errors.get)
        status = "PASS" if errors[worst] <= tolerance else "FAIL"
        failing = [f"{n} {e:.2e}" for n, e in errors.items() if e > tolerance]
        detail = f"; over tolerance: {', '.join(failing)}" if len(failing) > 1 else ""
        lines.append((status, f"{status} {label}: max rel err {errors[worst]:.2e} ({worst}) tol {tolerance:.0e}, "
                              f"{len(errors)} tensors vs float64 {reference_name}{detail}"))
        if case.bidirectional and device == "cuda" and backend in ("persistent", "cluster"):
            lines.append(same_as_sequential(model, case, data, dtype, actual, label))
    return lines


def same_as_sequential(model: nn.Module, case: Case, data: dict[str, Tensor], dtype: torch.dtype,
                       concurrent: dict[str, Tensor], label: str) -> tuple[str, str]:
    """The directions on two streams (fastlstm/directions.py) against one stream: the same kernels,
    so the same results (bitwise, unless cuBLAS picks other algorithms per stream: then within the
    dtype's tolerance)."""
    os.environ["FASTLSTM_CONCURRENT_DIRECTIONS"] = "0"
    try:
        sequential = run_model(model, case, data, "cuda", dtype)
    finally:
        del os.environ["FASTLSTM_CONCURRENT_DIRECTIONS"]
    differ = [name for name, t in sequential.items() if not torch.equal(t, concurrent[name])]
    errors = relative_errors(concurrent, sequential)
    worst = max(errors, key=errors.get)
    status = "PASS" if errors[worst] <= TOLERANCE[dtype] else "FAIL"
    detail = (f"{len(sequential)} tensors bitwise equal" if not differ
              else f"{len(differ)} tensors differ, max rel diff {errors[worst]:.2e} ({worst})")
    return status, f"{status} {label}: directions on two streams vs one stream: {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: the CUDA backends (default); cpu: the CPU kernels (checks this script)")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], metavar="NAME",
                        help="only these cases: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and fastlstm.cuda_compiled()):
        print("needs a CUDA GPU and a build with the CUDA kernels (use --device cpu to check the script)")
        return 1
    backends = ["stepwise", "persistent", "cluster"] if args.device == "cuda" else ["auto"]
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # float32 GEMMs without TF32: the 1e-5 tolerance
    _extension._C.set_poison_buffers(True)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        for dtype in case.dtypes:
            for status, line in check(case, dtype, backends, args.device, args.seed):
                counts[status] += 1
                print(line, flush=True)
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
