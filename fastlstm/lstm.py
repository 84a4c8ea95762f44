"""``fastlstm.LSTM`` and ``fastlstm.LSTMCell``: the torch.nn.LSTM / nn.LSTMCell contract on fused kernels."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _extension
from . import directions as directions_on_streams
from .diagnostics import GradNorms
from .ops import lstm_layer
from .options import KernelOptions

_KEEP: Any = object()  # "use the module's setting" for per-call options


def _check_devices(input: Tensor, hx: tuple[Tensor, Tensor], weights: list[Tensor]) -> None:
    # Same wording as ATen's RNN checks.
    for w in weights:
        if w.device != input.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {w.device}")
    for h in hx:
        if h.device != input.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at "
                               f"{input.device} and hidden tensor at {h.device}")
    if input.device.type == "cuda" and not _extension.cuda_compiled():
        raise RuntimeError("fastlstm was built without its CUDA kernels, so it cannot run on "
                           f"{input.device}. Rebuild on a machine with nvcc: pip install --no-build-isolation -e .")


def _check_hidden_dtype(hx: tuple[Tensor, Tensor], dtype: torch.dtype) -> None:
    for name, h in zip(("hx", "cx"), hx):
        if h.dtype != dtype:
            raise RuntimeError(f"{name} dtype ({h.dtype}) does not match the input and weight dtype ({dtype})")


def _autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype autocast runs an LSTM in, or None. Like torch, autocast leaves float64 alone."""
    if dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class LSTM(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LSTM` running on fastlstm's fused kernels.

    Same constructor arguments, parameters (names, shapes, order, initialisation), inputs, outputs
    and errors as ``torch.nn.LSTM``:

    * ``input``: (L, H_in) unbatched, (L, N, H_in), (N, L, H_in) with ``batch_first=True``, or a
      ``PackedSequence``.
    * ``hx``: optional ``(h_0, c_0)`` of shapes (D * num_layers, N, H_out) and
      (D * num_layers, N, H_cell) (no N for unbatched input); zeros when absent.
    * returns ``output`` (L, N, D * H_out) (or packed), and ``(h_n, c_n)``.

    H_out = proj_size if proj_size > 0 else hidden_size; D = 2 if bidirectional else 1.

    Keyword-only extras (see :class:`fastlstm.options.KernelOptions` for exact semantics):
    ``backend``, ``tbptt_chunk``, ``grad_clip``, ``grad_clip_mode``, ``record_grad_norms``,
    ``checkpoint_every``. Each may also be overridden for one call: ``lstm(x, tbptt_chunk=64)``.

    Per-sample state resets, for streams of concatenated episodes: ``lstm(x, hx, reset=r)`` with
    ``r`` a bool tensor of shape (L, N), (N, L) with ``batch_first=True``, (L,) for unbatched
    input; for a ``PackedSequence`` input either a ``PackedSequence`` of the same ``batch_sizes``
    and ``sorted_indices`` (e.g. ``pack_padded_sequence`` of a padded reset with the input's
    lengths) or a padded (L, N) / (N, L) tensor in the input's batch order. ``r[t, b]`` True starts
    a new segment of row b at step t. The result (outputs, h_n, c_n and every gradient) equals
    running every segment of every row as its own sequence, each from zeros except the first in
    each direction's processing order, which starts from ``hx``: in every layer the forward
    direction's state entering step t, and the reverse direction's state entering step t - 1, is
    zeroed when ``r[t, b]``. No gradient crosses a reset; ``r[0]`` and resets on padding change
    nothing. Runs inside the kernels (no Python loop, no host synchronisation) and combines with
    every other option (``tbptt_chunk`` still counts steps from the start of the call).
    """

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"]

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None, *, backend: str = "auto",
                 tbptt_chunk: int | None = None, grad_clip: float | None = None,
                 grad_clip_mode: str = "recurrent", record_grad_norms: bool = False,
                 checkpoint_every: int | None = None) -> None:
        super().__init__()
        dropout_value = float(dropout)  # first, as in torch: float(None) is a TypeError
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=2)
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if not isinstance(num_layers, int):
            raise TypeError(f"'{type(num_layers).__name__}' object cannot be interpreted as an integer")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout_value
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.options = KernelOptions(backend=backend, tbptt_chunk=tbptt_chunk, grad_clip=grad_clip,
                                     grad_clip_mode=grad_clip_mode, record_grad_norms=record_grad_norms,
                                     checkpoint_every=checkpoint_every)
        self._norm_probe: Tensor | None = None

        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        state_size = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else state_size * directions
                suffix = "_reverse" if direction == 1 else ""
                shapes = [(f"weight_ih_l{layer}{suffix}", (4 * hidden_size, layer_input)),
                          (f"weight_hh_l{layer}{suffix}", (4 * hidden_size, state_size))]
                if bias:
                    shapes += [(f"bias_ih_l{layer}{suffix}", (4 * hidden_size,)),
                               (f"bias_hh_l{layer}{suffix}", (4 * hidden_size,))]
                if proj_size > 0:
                    shapes.append((f"weight_hr_l{layer}{suffix}", (proj_size, hidden_size)))
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                names = [name for name, _ in shapes]
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    # ---- the nn.LSTM surface ----

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, kept for torch.nn.LSTM compatibility (fastlstm reads the weights where they are)."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        defaults = KernelOptions()
        for field in ("backend", "tbptt_chunk", "grad_clip", "grad_clip_mode", "record_grad_norms",
                      "checkpoint_every"):
            value = getattr(self.options, field)
            if value != getattr(defaults, field):
                s += f", {field}={value!r}"
        return s

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_norm_probe"] = None  # per-call diagnostics are not part of the model
        return state

    # Per-option attribute access, e.g. ``lstm.tbptt_chunk = 128``.
    def __getattr__(self, name: str) -> Any:
        if name in KernelOptions.__dataclass_fields__ and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in KernelOptions.__dataclass_fields__ and "options" in self.__dict__:
            self.__dict__["options"] = self.__dict__["options"].updated(**{name: value})
        else:
            super().__setattr__(name, value)

    @property
    def grad_norms(self) -> GradNorms | None:
        """Gradient norms recorded by the backward of the latest forward that recorded them.

        None before such a backward. Forwards that do not record (option off, or no grad) leave the
        last recording in place. The norms arrive as the gradient of an internal input, so they are
        recorded by ``loss.backward()`` but not by ``torch.autograd.grad(loss, some_inputs)``;
        running backward twice through one forward adds the two runs' norms.
        """
        probe = self._norm_probe
        if probe is None or probe.grad is None:
            return None
        return GradNorms(h=probe.grad[:, :, 0].clone(), c=probe.grad[:, :, 1].clone())

    # ---- forward ----

    def _expected_sizes(self, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        state = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (layers, batch, state), (layers, batch, self.hidden_size)

    def _check_forward_args(self, input: Tensor, hx: tuple[Tensor, Tensor], batch: int,
                            expected_dim: int, autocast: bool) -> None:
        weight_dtype = self._flat_weights[0].dtype
        if input.dtype != weight_dtype and not autocast:
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                             f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})")
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError("input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")
        expected_h, expected_c = self._expected_sizes(batch)
        if hx[0].size() != expected_h:
            raise RuntimeError(f"Expected hidden[0] size {expected_h}, got {list(hx[0].size())}")
        if hx[1].size() != expected_c:
            raise RuntimeError(f"Expected hidden[1] size {expected_c}, got {list(hx[1].size())}")

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None, *,
                reset: Tensor | PackedSequence | None = None, backend: str = _KEEP,
                tbptt_chunk: int | None = _KEEP, grad_clip: float | None = _KEEP, grad_clip_mode: str = _KEEP, record_grad_norms: bool = _KEEP,
                checkpoint_every: int | None = _KEEP) -> tuple[Any, tuple[Tensor, Tensor]]:
        overrides = {k: v for k, v in (("backend", backend), ("tbptt_chunk", tbptt_chunk),
                                       ("grad_clip", grad_clip), ("grad_clip_mode", grad_clip_mode),
                                       ("record_grad_norms", record_grad_norms),
                                       ("checkpoint_every", checkpoint_every)) if v is not _KEEP}
        options = self.options.updated(**overrides)
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        sorted_indices = unsorted_indices = None
        is_batched = True
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            expected_dim = 2
        else:
            data, batch_sizes = input, None
            if data.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {data.dim()}D instead")
            is_batched = data.dim() == 3
            if not is_batched:
                data = data.unsqueeze(0 if self.batch_first else 1)
            batch = data.size(0 if self.batch_first else 1)
            expected_dim = 3
        if hx is None:
            zeros = {"dtype": data.dtype, "device": data.device}
            hx = (torch.zeros(self.num_layers * directions, batch, state_size, **zeros),
                  torch.zeros(self.num_layers * directions, batch, self.hidden_size, **zeros))
        elif not packed:
            want = 3 if is_batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        autocast = _autocast_dtype(data.device, data.dtype)
        self._check_forward_args(data, hx, batch, expected_dim, autocast is not None)
        weights = self._flat_weights
        _check_devices(data, hx, weights)
        if sorted_indices is not None:
            hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))
        dtype = autocast or weights[0].dtype
        if autocast is None:
            _check_hidden_dtype(hx, dtype)
        else:
            data, hx, weights = data.to(dtype), (hx[0].to(dtype), hx[1].to(dtype)), [w.to(dtype) for w in weights]

        lengths = flat_index = None
        if reset is not None:
            reset = _time_major_reset(reset, input, data, is_batched, self.batch_first)
        if packed:
            if batch_sizes.numel() == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            # Packed data is time-major with the live rows of each step first: pad it to (T, B, I).
            T = batch_sizes.numel()
            live = torch.arange(batch)[None, :] < batch_sizes[:, None].cpu()
            lengths = live.sum(0).to(data.device)
            flat_index = live.flatten().nonzero().squeeze(1).to(data.device)
            x = data.new_zeros(T * batch, data.size(-1)).index_copy(0, flat_index, data).view(T, batch, -1)
            if isinstance(reset, PackedSequence):
                reset = reset.data.new_zeros(T * batch).index_copy(0, flat_index, reset.data).view(T, batch)
            elif reset is not None and sorted_indices is not None:
                reset = reset.index_select(1, sorted_indices)
        else:
            x = data.transpose(0, 1) if self.batch_first else data
            if x.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        y, h_n, c_n = self._run_layers(x, hx, lengths, reset, weights, options)

        if packed:
            output: Any = PackedSequence(y.reshape(-1, y.size(-1)).index_select(0, flat_index), batch_sizes,
                                         sorted_indices, unsorted_indices)
        else:
            output = y.transpose(0, 1) if self.batch_first else y
            if not is_batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return output, (h_n, c_n)

    def _run_layers(self, x: Tensor, hx: tuple[Tensor, Tensor], lengths: Tensor | None, reset: Tensor | None,
                    weights: list[Tensor], options: KernelOptions) -> tuple[Tensor, Tensor, Tensor]:
        directions = 2 if self.bidirectional else 1
        per_layer = len(weights) // (self.num_layers * directions)
        layer_options = options.layer_options()
        probe = None
        if options.record_grad_norms and torch.is_grad_enabled():
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            probe = torch.zeros(self.num_layers, directions, 2, x.size(0), dtype=acc, device=x.device,
                                requires_grad=True)
            # The norms belong to the latest recording forward: an evaluation pass in between keeps them.
            self._norm_probe = probe
        h_n, c_n = [], []
        layer_input = x
        concurrent = directions == 2 and directions_on_streams.concurrent(x, layer_options.backend)
        for layer in range(self.num_layers):
            jobs, inputs = [], []
            for direction in range(directions):
                index = layer * directions + direction
                w = weights[index * per_layer:(index + 1) * per_layer]
                args = (layer_input, w[0], w[1], w[2] + w[3] if self.bias else None,
                        w[-1] if self.proj_size > 0 else None, hx[0][index], hx[1][index], lengths, reset)
                norm_probe = None if probe is None else probe[layer, direction]
                jobs.append(functools.partial(lstm_layer, *args, reverse=direction == 1, options=layer_options,
                                              norm_probe=norm_probe))
                inputs += [*args, norm_probe]
            results = directions_on_streams.run_both(*jobs, inputs) if concurrent else [job() for job in jobs]
            outputs = [y for y, _, _ in results]
            h_n += [h for _, h, _ in results]
            c_n += [c for _, _, c in results]
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    # ---- conversion ----

    @classmethod
    def from_torch(cls, module: nn.LSTM, **options: Any) -> LSTM:
        """A fastlstm.LSTM with the configuration of ``module`` that shares its parameters.

        ``options`` are fastlstm's extra keyword arguments (``backend``, ``tbptt_chunk``, ...).
        The training mode is kept; hooks registered on ``module`` are not carried over.
        """
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"from_torch expects a torch.nn.LSTM, got {type(module).__name__}")
        reject_parametrized(module)
        new = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                  module.dropout, module.bidirectional, module.proj_size, device="meta", **options)
        _share_parameters(module, new)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.LSTM:
        """A torch.nn.LSTM with this module's configuration, sharing its parameters."""
        reject_parametrized(self)
        new = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
                      self.dropout, self.bidirectional, self.proj_size, device="meta")
        _share_parameters(self, new)
        new.train(self.training)
        return new


class LSTMCell(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LSTMCell` on fastlstm's fused kernels.

    ``input`` (N, input_size) or (input_size,); ``hx`` optional ``(h, c)``, each (N, hidden_size)
    or (hidden_size,). Returns ``(h', c')`` of the same shapes. Parameters ``weight_ih``
    (4H, input_size), ``weight_hh`` (4H, H), ``bias_ih``, ``bias_hh`` (4H) as in torch.
    """

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, backend: str = "auto") -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.options = KernelOptions(backend=backend)
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.options.backend != "auto":
            s += f", backend={self.options.backend!r}"
        return s

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            if len(hx) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for index, h in enumerate(hx):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{index} batch size "
                                   f"{h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got {h.size(1)}, expected "
                                   f"{self.hidden_size}")
        weights = [w for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh) if w is not None]
        _check_devices(input, hx, weights)
        autocast = _autocast_dtype(input.device, input.dtype)
        dtype = autocast or self.weight_ih.dtype
        if autocast is None:
            if input.dtype != dtype:
                raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({dtype}). "
                                 f"Convert input: input.to({dtype}), or convert model: model.to({input.dtype})")
            _check_hidden_dtype(hx, dtype)
        else:
            input, hx, weights = input.to(dtype), (hx[0].to(dtype), hx[1].to(dtype)), [w.to(dtype) for w in weights]
        bias = weights[2] + weights[3] if self.bias else None
        _, h, c = lstm_layer(input.unsqueeze(0), weights[0], weights[1], bias, None, hx[0], hx[1],
                             options=self.options.layer_options())
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    @classmethod
    def from_torch(cls, module: nn.LSTMCell, **options: Any) -> LSTMCell:
        """A fastlstm.LSTMCell with the configuration of ``module`` that shares its parameters."""
        if not isinstance(module, nn.LSTMCell):
            raise TypeError(f"from_torch expects a torch.nn.LSTMCell, got {type(module).__name__}")
        reject_parametrized(module)
        new = cls(module.input_size, module.hidden_size, module.bias, device="meta", **options)
        _share_parameters(module, new)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.LSTMCell:
        """A torch.nn.LSTMCell with this module's configuration, sharing its parameters."""
        reject_parametrized(self)
        new = nn.LSTMCell(self.input_size, self.hidden_size, self.bias, device="meta")
        _share_parameters(self, new)
        new.train(self.training)
        return new


def _time_major_reset(reset: Any, input: Tensor | PackedSequence, data: Tensor, is_batched: bool,
                      batch_first: bool) -> Tensor | PackedSequence:
    """``reset`` checked against the input: a contiguous (T, N) bool tensor, or for packed input
    a checked PackedSequence or a (T, N) tensor in the input's batch order."""
    if isinstance(input, PackedSequence):
        batch_sizes = input.batch_sizes
        T, N = batch_sizes.numel(), int(batch_sizes[0]) if batch_sizes.numel() else 0
        if isinstance(reset, PackedSequence):
            same_order = ((reset.sorted_indices is None) == (input.sorted_indices is None)
                          and (input.sorted_indices is None
                               or torch.equal(reset.sorted_indices.cpu(), input.sorted_indices.cpu())))
            if not torch.equal(reset.batch_sizes, batch_sizes) or not same_order:
                raise ValueError("reset: a PackedSequence reset must be packed like the input (same batch_sizes "
                                 "and sorted_indices), e.g. pack_padded_sequence(reset, lengths, "
                                 "enforce_sorted=...) with the input's lengths")
            _check_reset_tensor(reset.data, (data.size(0),), "packed like the input", data.device)
            return reset
        expected = (N, T) if batch_first else (T, N)
        what = "(N, L) with batch_first=True" if batch_first else "(L, N)"
    else:  # data is (T, N, I), or (N, T, I) with batch_first; N = 1 for unbatched input
        T, N = (data.size(1), data.size(0)) if batch_first else (data.size(0), data.size(1))
        if is_batched:
            expected = (N, T) if batch_first else (T, N)
            what = "(N, L) with batch_first=True" if batch_first else "(L, N)"
        else:
            expected, what = (T,), "(L,) for unbatched input"
    _check_reset_tensor(reset, expected, what, data.device)
    if not is_batched:
        reset = reset.view(T, 1)
    elif batch_first:
        reset = reset.t()
    return reset.contiguous()


def _check_reset_tensor(reset: Any, expected: tuple[int, ...], what: str, device: torch.device) -> None:
    if not isinstance(reset, Tensor):
        raise TypeError(f"reset must be a bool tensor or None, got {type(reset).__name__}")
    if reset.dtype != torch.bool:
        raise TypeError(f"reset must be a bool tensor, got dtype {reset.dtype}")
    if tuple(reset.shape) != expected:
        raise ValueError(f"reset must have shape {what}: expected {list(expected)}, got {list(reset.shape)}")
    if reset.device != device:
        raise RuntimeError(f"reset must be on the input's device ({device}), got {reset.device}")


def reject_parametrized(module: nn.Module) -> None:
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise NotImplementedError(
            f"cannot convert a {type(module).__name__} that has parametrizations (e.g. weight_norm); "
            "convert first, then apply the parametrization to the converted module")


def _share_parameters(source: nn.Module, target: nn.Module) -> None:
    names = [name for name, _ in target.named_parameters()]
    source_params = dict(source.named_parameters())
    if sorted(names) != sorted(source_params):
        raise RuntimeError(f"parameter names differ: {sorted(source_params)} vs {sorted(names)}")
    for name in names:
        setattr(target, name, source_params[name])
