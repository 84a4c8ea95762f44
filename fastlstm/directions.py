"""The two directions of a bidirectional layer, independent of each other, on two CUDA streams."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

Result = TypeVar("Result", bound=tuple)

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def concurrent(x: Tensor, backend: str) -> bool:
    """Whether a bidirectional layer runs its reverse direction on a second stream.

    On CUDA, in eager mode, for the one-launch backends ("persistent", "cluster": one kernel per
    direction and chunk, which leaves most of the GPU idle at small batches), unless
    ``FASTLSTM_CONCURRENT_DIRECTIONS=0`` (for measuring the difference). "auto" keeps running the
    directions one after the other until a GPU run has measured the benefit.
    """
    return (x.is_cuda and backend in ("persistent", "cluster") and not torch.compiler.is_compiling()
            and os.environ.get("FASTLSTM_CONCURRENT_DIRECTIONS", "1") != "0")


def run_both(forward: Callable[[], Result], reverse: Callable[[], Result],
             inputs: Sequence[Tensor | None]) -> tuple[Result, Result]:
    """forward() on the current stream and reverse() on a side stream, joined before returning.

    ``inputs``: every tensor reverse() reads, so the caching allocator keeps them alive until the
    side stream is done with them. The autograd engine runs each backward on its forward's
    stream, so the two directions' backwards overlap too.
    """
    main = torch.cuda.current_stream()
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(main.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        reverse_result = reverse()
    forward_result = forward()
    main.wait_stream(side)
    for t in inputs:
        if t is not None and t.is_cuda:
            t.record_stream(side)
    for t in reverse_result:
        t.record_stream(main)
    return forward_result, reverse_result
