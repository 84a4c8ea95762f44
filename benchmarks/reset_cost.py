#!/usr/bin/env python3
"""What per-sample state resets cost: in the kernel (``reset=``) against the ways to get the same
result without it, forward + backward, median of interleaved calls.

    PYTHONPATH=. python3 benchmarks/reset_cost.py [--device cpu|cuda] [--T 2000] [--B 16] [--H 128]
                                                  [--segment 200] [--repeats 5] [--threads 2] [--out DIR]

A stream of concatenated episodes: x (T, B, H), every row cut into segments of random lengths
(mean ``--segment`` steps, at different steps in each row). Contenders, all computing the same
outputs (each segment from zero state) and the gradients of a fixed random loss on them:

* ``fastlstm reset=``: one call over the whole stream with ``reset=r``;
* ``fastlstm, segments packed``: every segment as its own sequence of one PackedSequence
  (the batch becomes the number of segments, the length the longest segment), the best a user
  can do without in-kernel resets, plus one gather and one scatter between the two layouts;
* ``torch.nn.LSTM, segments packed``: the same with PyTorch's LSTM (cuDNN / oneDNN);
* ``fastlstm, no resets``: the same call without ``reset`` (a different result: the cost of the
  bare recurrence, for scale).

The rows of a markdown table (and a JSON file with every timing under ``--out``) name the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastlstm  # noqa: E402
from environment import device_name  # noqa: E402
from timing import Case, DeviceTimer, measure  # noqa: E402


def make_resets(T: int, B: int, mean_segment: int, generator: torch.Generator) -> torch.Tensor:
    """(T, B) bool: a row starts a new segment at step t with probability 1 / mean_segment."""
    r = torch.rand(T, B, generator=generator) < 1.0 / mean_segment
    r[0] = True
    return r


def segments(reset: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every segment of every row."""
    T, B = reset.shape
    out = []
    for b in range(B):
        starts = torch.nonzero(reset[:, b]).flatten().tolist()
        ends = starts[1:] + [T]
        out.extend((b, s, e) for s, e in zip(starts, ends))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--T", type=int, default=2000)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--segment", type=int, default=200, help="mean segment length in steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    T, B, H = args.T, args.B, args.H
    reset = make_resets(T, B, args.segment, g)
    segs = segments(reset)
    x = torch.randn(T, B, H, generator=g).to(device)
    gy = torch.randn(T, B, H, generator=g).to(device)
    reference = nn.LSTM(H, H).to(device)
    ours = fastlstm.LSTM.from_torch(reference)
    # Every segment as a column of a padded (longest, segments) layout: one gather from the
    # stream and one scatter back (index tensors built once, outside the timed calls).
    lengths = torch.tensor([e - s for _, s, e in segs])
    local = torch.arange(int(lengths.max()))[:, None]
    starts = torch.tensor([s for _, s, _ in segs])[None, :]
    rows = torch.tensor([b for b, _, _ in segs])[None, :]
    valid = local < lengths[None, :]
    flat = torch.where(valid, (starts + local) * B + rows, 0).to(device)  # into the (T * B) rows
    valid, flat_valid = valid.to(device), flat[valid.to(device)]

    def split_call(model: nn.Module) -> None:
        xs = x.detach().requires_grad_()
        pieces = xs.reshape(T * B, H)[flat]  # (longest, segments, H)
        out, _ = model(pack_padded_sequence(pieces, lengths, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out, total_length=flat.size(0))
        y = torch.zeros(T * B, H, device=device).index_put((flat_valid,), padded[valid]).reshape(T, B, H)
        (y * gy).sum().backward()

    def reset_call(with_reset: bool) -> None:
        xs = x.detach().requires_grad_()
        y, _ = ours(xs, reset=reset.to(device) if with_reset else None)
        (y * gy).sum().backward()

    def ours_reset() -> None:
        reset_call(True)

    def ours_split() -> None:
        split_call(ours)

    def torch_split() -> None:
        split_call(reference)

    def ours_plain() -> None:
        reset_call(False)

    # The contenders compute the same thing: the weight gradients, checked once before timing.
    def grads(fn, model: nn.Module) -> torch.Tensor:
        for p in model.parameters():
            p.grad = None
        fn()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    want = grads(torch_split, reference)
    worst = max((grads(fn, ours) - want).abs().max().item() for fn in (ours_reset, ours_split))
    agree = worst / want.abs().max().item()
    cases = [Case("fastlstm reset=", ours_reset, lambda: None),
             Case("fastlstm, segments packed", ours_split, lambda: None),
             Case("torch.nn.LSTM, segments packed", torch_split, lambda: None),
             Case("fastlstm, no resets", ours_plain, lambda: None)]
    results = measure(DeviceTimer(device), cases, warmup=1, repeats=args.repeats)
    machine = device_name(device)
    header = (f"reset cost, fwd+bwd, T={T}, B={B}, I=H={H}, float32, {len(segs)} segments (mean length "
              f"{args.segment}), {args.threads} threads, {args.device} ({machine}), torch {torch.__version__}, "
              f"median of {args.repeats} interleaved calls; gradients agree to {agree:.1e} (relative)")
    lines = [header, "", "| contender | median ms | min ms |", "|---|---|---|"]
    for case in cases:
        m = results[case.name]
        lines.append(f"| {case.name} | {m.median_ms:.1f} | {m.min_ms:.1f} |" if m.ok
                     else f"| {case.name} | {m.error} | |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reset_cost.md").write_text("\n".join(lines) + "\n")
        report = {"header": header, **{name: m.to_json() for name, m in results.items()}}
        (args.out / "reset_cost.json").write_text(json.dumps(report, indent=1))
    return 0 if agree < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
