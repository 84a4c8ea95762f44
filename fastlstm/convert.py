"""Swap torch.nn.LSTM / nn.LSTMCell modules inside a model for fastlstm's."""

from __future__ import annotations

from typing import Any

from torch import nn

from .lstm import LSTM, LSTMCell, reject_parametrized


def convert(model: nn.Module, **options: Any) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` in ``model`` with fastlstm's.

    The replacements share the original parameters (same tensors: weights, device, dtype and
    ``requires_grad`` are kept, and an optimizer built before the conversion still updates them),
    and keep each module's training mode. ``options`` go to every converted ``LSTM`` (for example
    ``backend="stepwise"``, ``tbptt_chunk=256``); ``LSTMCell`` takes only ``backend``.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, children are replaced in place and the
    converted model is returned; when ``model`` itself is an LSTM, the new module is returned.
    Subclasses of nn.LSTM are left alone (their forward may differ).
    """
    if isinstance(model, (nn.LSTM, nn.LSTMCell)):
        reject_parametrized(model)  # parametrize turns the module into a subclass: say so, do not skip it
    if type(model) is nn.LSTM:
        return LSTM.from_torch(model, **options)
    if type(model) is nn.LSTMCell:
        cell_options = {k: v for k, v in options.items() if k == "backend"}
        return LSTMCell.from_torch(model, **cell_options)
    for name, child in list(model.named_children()):
        converted = convert(child, **options)
        if converted is not child:
            setattr(model, name, converted)
    return model
