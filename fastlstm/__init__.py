"""fastlstm: fused C++/CUDA LSTM kernels for PyTorch, built for very long sequences.

Public surface:

* :class:`LSTM`, :class:`LSTMCell` - drop-in ``torch.nn.LSTM`` / ``nn.LSTMCell`` replacements with
  truncated BPTT, in-kernel gradient clipping, gradient-norm recording and checkpointing options.
* :func:`convert` - swap every ``nn.LSTM`` / ``nn.LSTMCell`` inside a model.
* :mod:`fastlstm.tbptt` - a streaming trainer for sequences too long for one call.
* :func:`plot_grad_norms`, :class:`GradNorms` - gradient diagnostics.
* :func:`explain` - which kernel a call would use, and why.
"""

from ._extension import cached_bytes, cpu_capability, cuda_compiled, empty_cache
from .convert import convert
from .diagnostics import GradNorms, plot_grad_norms
from .dispatch import explain
from .lstm import LSTM, LSTMCell
from .options import KernelOptions
from . import tbptt


__version__ = "0.1.0"

__all__ = ["LSTM", "LSTMCell", "convert", "tbptt", "plot_grad_norms", "GradNorms", "KernelOptions", "explain",
           "cuda_compiled", "cpu_capability", "empty_cache", "cached_bytes", "__version__"]
