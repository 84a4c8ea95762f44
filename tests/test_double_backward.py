"""Second-order gradients: a backward with create_graph=True returns a gradient that is itself
differentiable, correctly (fastlstm/composite.py).

* gradgradcheck (float64) over every flag combination of the parity table, over LSTMCell, and
  with each backward option (truncation, both clipping modes, checkpointing);
* the first-order gradient (and the recorded norms) computed under create_graph=True equals the
  kernels' one, for every option;
* Hessian-vector products equal torch.nn.LSTM's.

Every test here turns warnings into errors: PyTorch's "an autograd kernel was not registered"
warning (what a double backward through the bare kernels gives) fails it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm
from long_sequence_reference import one_thread
from reference import Case, assert_close, lengths_of, make_input
from test_parity import FLAGS

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(autouse=True)
def single_thread():
    """Thousands of tiny ATen ops: one thread is much faster than waking a second (see one_thread)."""
    with one_thread():
        yield

F64 = torch.float64


def tiny(flags: tuple) -> Case:
    """The parity-table case of ``flags`` at a size where gradgradcheck takes milliseconds."""
    case = Case.from_flags(flags)
    case.T, case.B, case.input_size, case.hidden_size = 3, 2, 2, 3
    case.proj_size = 2 if case.proj_size else 0
    return case


def module_function(module: nn.Module, case: Case):
    """(fn, inputs): fn(x, [h0, c0,] *parameters) -> (output data, h_n, c_n), the module's call on
    the inputs of ``case`` with every differentiable value an explicit float64 input."""
    inp, leaf, hx = make_input(case, F64)
    lengths = lengths_of(inp, case) if isinstance(inp, PackedSequence) else None
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    state = list(hx) if hx is not None else []

    def fn(x, *rest):
        given, weights = rest[:len(state)], rest[len(state):]
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=False)
        elif case.input_kind == "noncontiguous":
            x = x[..., ::2]
        out, (h, c) = functional_call(module, dict(zip(names, weights)), (x, tuple(given) if given else None))
        return (out.data if isinstance(out, PackedSequence) else out), h, c

    return fn, (leaf, *state, *params)


def fast_lstm(case: Case, **options) -> fastlstm.LSTM:
    return fastlstm.LSTM(case.input_size, case.hidden_size, case.num_layers, case.bias, case.batch_first,
                         bidirectional=case.bidirectional, proj_size=case.proj_size, dtype=F64, **options)


# Every flag of the parity table, on 1 and 2 layers (what a third layer adds, its input being a
# layer's output, a second layer already has), over 2 steps; 3 layers on a few cases.
TABLE = [f for f in FLAGS if f[0] < 3] + [f for f in FLAGS if f[0] == 3 and f[3] and f[5] and f[2]][:4]


@pytest.mark.parametrize("flags", TABLE, ids=lambda f: "-".join(map(str, f)))
def test_gradgradcheck_every_flag_combination(flags):
    case = tiny(flags)
    case.T = 2
    fn, inputs = module_function(fast_lstm(case), case)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# The options change what the first-order gradient is; its derivative must follow. One layer, and
# gradgradcheck's incoming gradients independent of the outputs: a second-order term through a
# layer's output uses the truncated/clipped backward, which finite differences do not (README,
# "Second-order gradients").
# A case with every feature (packed: per-row steps in the reverse direction; projection: the
# carry through r).
OPTIONS = [
    {"tbptt_chunk": 2},
    {"tbptt_chunk": 1},
    {"grad_clip": 0.05},
    {"grad_clip": 0.05, "grad_clip_mode": "gates"},
    {"grad_clip": 0.05, "tbptt_chunk": 2},
    {"checkpoint_every": 2},
    {"record_grad_norms": True},
]
OPTION_CASES = [(1, True, False, True, 4, True, "packed"), (1, False, True, False, 0, True, "batched")]


def _ids(value) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items())
    return "-".join(map(str, value))


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
@pytest.mark.parametrize("flags", OPTION_CASES, ids=_ids)
def test_gradgradcheck_with_backward_options(flags, options):
    case = tiny(flags)
    case.T = 4
    fn, inputs = module_function(fast_lstm(case, **options), case)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("given", [True, False])
def test_gradgradcheck_lstm_cell(bias, batched, given):
    cell = fastlstm.LSTMCell(2, 3, bias=bias, dtype=F64)
    lead = (2,) if batched else ()
    x = torch.randn(*lead, 2, dtype=F64, requires_grad=True)
    state = [torch.randn(*lead, 3, dtype=F64, requires_grad=True) for _ in range(2)] if given else []
    names = [name for name, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def fn(x, *rest):
        given_state, weights = rest[:len(state)], rest[len(state):]
        return functional_call(cell, dict(zip(names, weights)), (x, tuple(given_state) if given_state else None))

    assert torch.autograd.gradgradcheck(fn, (x, *state, *params))


def _first_order(module, inp, wrt, create_graph: bool):
    out, (h, c) = module(inp[0], inp[1])
    y = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in (y, h, c))
    grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, retain_graph=True)
    return grads, loss


@pytest.mark.parametrize("options", OPTIONS + [{"grad_clip": 0.02, "grad_clip_mode": "gates", "tbptt_chunk": 3,
                                                "record_grad_norms": True}], ids=_ids)
@pytest.mark.parametrize("flags", OPTION_CASES + [(2, True, False, True, 4, True, "packed")], ids=_ids)
def test_first_order_gradient_under_create_graph_is_the_kernels(flags, options):
    """The composite recomputation keeps the options' first-order meaning (and the norms)."""
    case = Case.from_flags(flags)
    case.T = 9
    model = fast_lstm(case, **options)
    inp, leaf, hx = make_input(case, F64)
    wrt = [leaf, *hx, *model.parameters()]
    expected, loss = _first_order(model, (inp, hx), wrt, create_graph=False)
    loss.backward(retain_graph=True)
    kernel_norms = model.grad_norms
    actual, loss = _first_order(model, (inp, hx), wrt, create_graph=True)
    assert all(a.requires_grad for a in actual)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a.detach(), e, F64, f"gradient {index}")
    if options.get("record_grad_norms"):
        with warnings.catch_warnings():  # torch's advice to prefer autograd.grad; the norms need a backward
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            loss.backward(create_graph=True)
        assert_close(model.grad_norms.h, kernel_norms.h, F64, "h norms")
        assert_close(model.grad_norms.c, kernel_norms.c, F64, "c norms")
        assert not model.grad_norms.h.requires_grad


def _hvp(module, inp, hx, leaf, vectors):
    """(H v) for the Hessian of a fixed projection of the outputs with respect to input, hx, parameters."""
    wrt = [leaf, *hx, *module.parameters()]
    grads, _ = _first_order(module, (inp, hx), wrt, create_graph=True)
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors)), wrt)


@pytest.mark.parametrize("flags", [(1, True, False, False, 0, True, "batched"), (2, True, True, True, 4, True, "packed"),
                                   (3, False, False, True, 0, True, "unbatched")], ids=_ids)
def test_hessian_vector_product_matches_nn_lstm(flags):
    case = Case.from_flags(flags)
    ref = nn.LSTM(case.input_size, case.hidden_size, case.num_layers, case.bias, case.batch_first,
                  bidirectional=case.bidirectional, proj_size=case.proj_size, dtype=F64)
    ours = fastlstm.LSTM.from_torch(copy.deepcopy(ref))
    inp, leaf, hx = make_input(case, F64)
    vectors = [torch.randn_like(t) for t in [leaf, *hx, *ref.parameters()]]
    expected = _hvp(ref, inp, hx, leaf, vectors)
    leaf2 = leaf.detach().clone().requires_grad_()
    if isinstance(inp, PackedSequence):
        inp2 = pack_padded_sequence(leaf2, lengths_of(inp, case), batch_first=case.batch_first, enforce_sorted=False)
    else:
        inp2 = leaf2
    hx2 = tuple(t.detach().clone().requires_grad_() for t in hx)
    actual = _hvp(ours, inp2, hx2, leaf2, vectors)
    assert max(e.abs().max().item() for e in expected) > 0.1  # a product that checks something
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, F64, f"Hessian-vector product, input {index}")


def test_the_warning_filter_catches_a_backward_through_the_bare_kernel():
    """What these tests guard against: autograd through fastlstm::layer_backward, which has no derivative."""
    model = fastlstm.LSTM(2, 3, dtype=F64)
    x = torch.randn(4, 1, 2, dtype=F64)
    w = [p.detach() for p in model.parameters()]
    zeros = torch.zeros(1, 3, dtype=F64)
    y, _, _, gates, saved_c, saved_r = torch.ops.fastlstm.layer_forward(
        x, w[0], w[1], w[2] + w[3], None, zeros, zeros, None, None, None, False, 0, 0, 0.0, "recurrent", "auto")
    grad_y = torch.ones_like(y, requires_grad=True)
    grads = torch.ops.fastlstm.layer_backward(grad_y, None, None, x, w[0], w[1], w[2] + w[3], None, zeros, zeros,
                                              None, None, y, gates, saved_c, saved_r, False, 0, 0, 0.0, "recurrent",
                                              False, True, "auto")
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        grads[1].sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_order_under_create_graph_in_lower_precision(dtype):
    """The composite path runs in float32 for the half types; its gradient keeps each input's dtype."""
    model = fastlstm.LSTM(3, 4, 2, bidirectional=True, proj_size=2, dtype=dtype, grad_clip=0.1)
    x = torch.randn(5, 2, 3, dtype=F64).to(dtype).requires_grad_()
    wrt = [x, *model.parameters()]
    expected = torch.autograd.grad(model(x)[0].double().square().sum(), wrt)
    actual = torch.autograd.grad(model(x)[0].double().square().sum(), wrt, create_graph=True)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == dtype and a.requires_grad
        assert_close(a.detach(), e, dtype, f"gradient {index}")
