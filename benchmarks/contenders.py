"""The implementations being compared: torch.nn.LSTM (the reference), fastlstm's backends, and other
fused-LSTM libraries when they are installed. All of them run the same weights on the same input."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import directions, dispatch

from configs import FWD, FWD_BWD_DX, Config, dtype_name
from timing import Case, describe_error

TORCH = "torch.nn.LSTM"


# forward(x, lengths) -> the outputs the loss weights: (y,) of shape (T, B, D*H) for a padded batch
# (lengths None); (h_n, c_n), each (layers*D, B, H), for a ragged one (x packed with these lengths).
Forward = Callable[[Tensor, "Tensor | None"], tuple[Tensor, ...]]


@dataclass
class Contender:
    """One implementation and how to call it (see ``Forward``)."""

    impl: str
    backend: str
    forward: Forward | None
    parameters: list[Tensor] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    plan: str = ""
    skipped: str | None = None  # not run on this configuration, and why
    error: str | None = None    # failed before any measurement (the output check), and how

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.backend}"

    @property
    def runnable(self) -> bool:
        """Neither skipped nor failed: it has a forward to time."""
        return self.forward is not None and not self.error

    def set_training(self, training: bool) -> None:
        for module in self.modules:
            module.train(training)

    def case(self, phase: str, x: Tensor, g: tuple[Tensor, ...], lengths: Tensor | None = None) -> Case:
        """The timed call of ``phase``: inference forward, or forward + backward of the sum of
        (output * weight).sum() over the outputs of ``forward`` and the weights ``g``."""
        forward = self.forward
        assert forward is not None
        if phase == FWD:
            def run_forward() -> None:
                with torch.no_grad():
                    forward(x, lengths)
            return Case(self.name, run_forward, lambda: None)

        leaf = x.detach().requires_grad_(phase == FWD_BWD_DX)
        parameters = self.parameters

        def prepare() -> None:
            leaf.grad = None
            for p in parameters:
                p.grad = None

        def run_training() -> None:
            sum((out * weight).sum() for out, weight in zip(forward(leaf, lengths), g)).backward()
        return Case(self.name, run_training, prepare)


def _module_contender(impl: str, backend: str, module: nn.Module, plan: str = "") -> Contender:
    def forward(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, ...]:
        if lengths is None:
            return (module(x)[0],)
        # Packing is inside the timed call, on both sides alike.
        _, (h_n, c_n) = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return h_n, c_n

    return Contender(impl, backend, forward, list(module.parameters()), [module], plan)


def torch_reference(config: Config, device: torch.device) -> nn.LSTM:
    """The torch.nn.LSTM every other implementation copies its weights from (seed it before calling)."""
    return nn.LSTM(config.I, config.H, config.layers, bidirectional=config.bidirectional, device=device,
                   dtype=config.dtype)


def torch_contender(reference: nn.LSTM, device: torch.device) -> Contender:
    backend = "cudnn" if device.type == "cuda" else "native/oneDNN"
    return _module_contender(TORCH, backend, reference)


def fastlstm_contenders(reference: nn.LSTM, x: Tensor) -> list[Contender]:
    """fastlstm with every backend that applies on x's device: 'cpu' on CPU; 'stepwise',
    'persistent' and 'cluster' on CUDA (the last two where they accept the size and dtype)."""
    device = x.device
    requested = ["auto"] if device.type == "cpu" else ["stepwise", "persistent", "cluster"]
    contenders = []
    for backend in requested:
        module = fastlstm.LSTM.from_torch(copy.deepcopy(reference), backend=backend)
        plan = dispatch.plan(module, x)
        if plan.backend == "error":  # the requested backend cannot run this size or dtype
            contenders.append(Contender("fastlstm", backend, None, skipped=f"{backend}: {plan.reason}"))
            continue
        contenders.append(_module_contender("fastlstm", plan.backend, module, str(plan)))
        if reference.bidirectional and directions.concurrent(x, backend):
            contenders.append(_one_stream_contender(module, plan.backend, str(plan)))
    return contenders


def _one_stream_contender(module: nn.Module, backend: str, plan: str) -> Contender:
    """The same module with its two directions one after the other on one stream (the benefit
    of fastlstm/directions.py is the difference)."""
    two_streams = _module_contender("fastlstm", backend, module, plan)
    assert two_streams.forward is not None

    def forward(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, ...]:
        os.environ["FASTLSTM_CONCURRENT_DIRECTIONS"] = "0"
        try:
            return two_streams.forward(x, lengths)
        finally:
            del os.environ["FASTLSTM_CONCURRENT_DIRECTIONS"]

    return Contender("fastlstm", f"{backend}, directions on one stream", forward, list(module.parameters()), [module],
                     plan)


def library_status() -> dict[str, str]:
    """'not installed' or the installed version, for each other fused-LSTM library tried."""
    status = {}
    for name in _BUILDERS:  # the other fused-LSTM libraries this benchmark knows how to run
        if importlib.util.find_spec(name) is None:
            status[name] = "not installed"
            continue
        try:
            status[name] = f"installed {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            status[name] = "installed (version unknown)"
    return status


def _gate_rows(weight: Tensor, order: list[int]) -> Tensor:
    """Reorder the four gate blocks (along dim 0) of an nn.LSTM weight or bias."""
    return torch.cat([weight.chunk(4, 0)[k] for k in order], 0)


def _haste(reference: nn.LSTM, config: Config) -> Contender:
    haste = importlib.import_module("haste_pytorch")
    module = haste.LSTM(config.I, config.H).to(device=reference.weight_ih_l0.device, dtype=config.dtype)
    order = [0, 2, 1, 3]  # torch gates i, f, g, o -> haste's i, g, f, o
    with torch.no_grad():
        module.kernel.copy_(_gate_rows(reference.weight_ih_l0, order).t())
        module.recurrent_kernel.copy_(_gate_rows(reference.weight_hh_l0, order).t())
        module.bias.copy_(_gate_rows(reference.bias_ih_l0 + reference.bias_hh_l0, order))
    return _module_contender("haste_pytorch", "haste LSTM", module)


def _flashrnn(reference: nn.LSTM, config: Config) -> Contender:
    library = importlib.import_module("flashrnn")
    H = config.H
    # flashrnn takes the input projection Wx precomputed (B, T, gates, heads, H): it is computed here,
    # inside the timed call, so both sides include it. Same gate order as torch (i, f, g, o).
    w_ih = nn.Parameter(reference.weight_ih_l0.detach().clone())
    r = nn.Parameter(reference.weight_hh_l0.detach().clone().view(4, 1, H, H))
    b_ih = nn.Parameter(reference.bias_ih_l0.detach().clone())
    b_hh = nn.Parameter(reference.bias_hh_l0.detach().clone())
    kernel_dtype = dtype_name(config.dtype)

    def forward(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, ...]:
        assert lengths is None, "other_contenders skips ragged batches"
        T, B, _ = x.shape
        wx = F.linear(x, w_ih).view(T, B, 4, 1, H).transpose(0, 1)
        states, _ = library.flashrnn(wx, r, (b_ih + b_hh).view(4, 1, H), function="lstm",
                                     backend="cuda_fused", dtype=kernel_dtype)
        return (states[0].transpose(0, 1).reshape(T, B, H),)  # states: (state, B, T, heads, H); state 0 is h

    return Contender("flashrnn", "cuda_fused", forward, [w_ih, r, b_ih, b_hh])


_BUILDERS: dict[str, Callable[[nn.LSTM, Config], Contender]] = {"haste_pytorch": _haste, "flashrnn": _flashrnn}


def other_contenders(reference: nn.LSTM, config: Config, device: torch.device,
                     status: dict[str, str]) -> list[Contender]:
    """The installed other libraries, on CUDA, one layer, unidirectional (what they implement)."""
    contenders = []
    for name, state in status.items():
        if state == "not installed":
            continue
        if device.type != "cuda":
            contenders.append(Contender(name, "-", None, skipped="CUDA-only library"))
        elif config.layers != 1 or config.bidirectional:
            contenders.append(Contender(name, "-", None, skipped="benchmarked for 1 layer, unidirectional only"))
        elif config.packed:
            contenders.append(Contender(name, "-", None, skipped="no PackedSequence input"))
        else:
            try:
                contenders.append(_BUILDERS[name](reference, config))
            except Exception as error:  # noqa: BLE001 - reported in the row
                contenders.append(Contender(name, "-", None, error=f"setup failed: {describe_error(error)}"))
    return contenders
