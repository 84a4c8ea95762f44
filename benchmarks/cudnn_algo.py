"""The cuDNN RNN algorithm PyTorch requests for an nn.LSTM call.

Mirrors ``get_algo`` and its heuristics in PyTorch's aten/src/ATen/native/cudnn/RNN.cpp (see
/work/shared/PERF.md): the forward asks ``get_algo(..., forward=True)``, the backward
``forward=False``. Only unpacked input and proj_size == 0 are benchmarked here.
"""

from __future__ import annotations

import torch

from configs import Config

STANDARD = "standard"
PERSISTENT = "persistent"
PERSISTENT_SMALL_H = "persistent-small-h"
CPU = "n/a (oneDNN/native)"


def _small_h(hidden_size: int, forward: bool, props: torch.cuda._CudaDeviceProperties) -> bool:
    # use_rnn_persist_small_h: LSTM, sm >= 6.0, H <= 192 (forward) / H <= 128 (backward).
    if props.major < 6:
        return False
    return hidden_size <= (192 if forward else 128)


def _persistent(config: Config, props: torch.cuda._CudaDeviceProperties) -> bool:
    # use_persist_common_heuristics && use_persist_device_heuristics, fp16 only.
    if config.dtype != torch.float16:
        return False
    common = (config.layers == 1 and not config.bidirectional and config.H <= 1024 and config.H % 128 == 0
              and config.I % 128 == 0)
    if not common:
        return False
    b = config.B
    if props.major == 7:
        if props.minor == 5:  # Turing is excluded
            return False
        return (((b % 16 == 0 and b not in (80, 112)) or b == 8)
                and ((config.T >= 40 and b <= 128) or (config.T >= 20 and b <= 96) or (config.T >= 10 and b <= 32)))
    if props.major >= 8 and props.multi_processor_count >= 98 and props.minor != 6:
        return b % 8 == 0 and b <= 128  # the LSTM rule
    return False


def _algorithm(config: Config, forward: bool, props: torch.cuda._CudaDeviceProperties) -> str:
    if config.dtype != torch.float64 and _small_h(config.H, forward, props):
        return PERSISTENT_SMALL_H
    if _persistent(config, props):
        return PERSISTENT
    return STANDARD


def requested_algorithm(config: Config, device: torch.device, probe: torch.Tensor) -> tuple[str, str]:
    """(forward algorithm, backward algorithm) that torch.nn.LSTM would request for ``config``.

    ``probe`` is a tensor of the config's dtype on ``device``: PyTorch only takes its cuDNN path when
    ``torch.cudnn_is_acceptable`` says so (cuDNN enabled, a dtype the installed PyTorch routes to cuDNN).
    """
    if device.type != "cuda":
        return CPU, CPU
    if not torch.cudnn_is_acceptable(probe):
        reason = "none (cuDNN not used for this dtype/setting: native ATen)"
        return reason, reason
    props = torch.cuda.get_device_properties(device)
    return _algorithm(config, True, props), _algorithm(config, False, props)


def describe(algorithms: tuple[str, str]) -> str:
    """One label: the algorithm, or 'forward / backward' when they differ."""
    fwd, bwd = algorithms
    return fwd if fwd == bwd else f"{fwd} / {bwd}"
