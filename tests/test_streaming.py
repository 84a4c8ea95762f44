"""fastlstm.tbptt: the streaming TBPTT(k1, k2) trainer, against hand-written training loops."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastlstm
from fastlstm import tbptt
from reference import assert_close
from long_sequence_reference import one_thread

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """What is tested here is the trainer's bookkeeping, not the kernels: run on one thread (the
    step-by-step references are long chains of tiny ops; see long_sequence_reference.one_thread)."""
    with one_thread():
        yield


class Head(nn.Module):
    """A small custom model with the (x, state) -> (out, state) protocol: an LSTM and a Linear head."""

    def __init__(self, lstm: nn.Module, out: int = 2) -> None:
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size, out, dtype=F64)

    def forward(self, x, state=None):
        y, state = self.lstm(x, state)
        return self.head(y), state


def make(kind: str, batch_first: bool = False) -> nn.Module:
    if kind == "fastlstm":
        return fastlstm.LSTM(3, 5, batch_first=batch_first, dtype=F64)
    if kind == "torch":
        return nn.LSTM(3, 5, batch_first=batch_first, dtype=F64)
    if kind == "head-fastlstm":
        return Head(fastlstm.LSTM(3, 5, 2, batch_first=batch_first, dtype=F64))
    return Head(nn.LSTM(3, 5, batch_first=batch_first, dtype=F64))


def data(model: nn.Module, T: int, B: int = 2, batch_first: bool = False):
    out = model.head.out_features if isinstance(model, Head) else model.hidden_size
    x = torch.randn(T, B, 3, dtype=F64)
    y = torch.randn(T, B, out, dtype=F64)
    if batch_first:
        x, y = x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous()
    return x, y


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (p, q) in enumerate(zip(a, b)):
        assert_close(p, q, F64, f"parameter {i}")


def manual_chunked(model, x, y, k, lr=0.1, batch_first=False, loss_fn=F.mse_loss, max_grad_norm=None):
    """The plain k1 = k2 = k loop a user would write (with gradient-norm clipping when asked)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    state, losses = None, []
    for xc, yc in tbptt.chunks(x, y, k, batch_first=batch_first):
        opt.zero_grad()
        out, state = model(xc, state)
        loss = loss_fn(out, yc)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        state = tuple(s.detach() for s in state)
        losses.append(loss.item())
    return losses, state


def manual_k1_k2(model, x, y, k1, k2, lr=0.1, loss_fn=F.mse_loss):
    """Williams & Peng TBPTT(k1, k2), written step by step from the definition.

    The state after every step is kept in ``states`` (keyed by the number of steps done), each
    overwritten by the latest forward pass that computed it. Update u runs one step at a time
    from the stored state at s_u = max(0, (u+1)k1 - k2) to e_u = min((u+1)k1, T) with gradients,
    puts the outputs of the new steps [u*k1, e_u) in the loss, backpropagates through all of it
    and steps the optimizer.
    """
    T = x.shape[0]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    states = {0: None}
    losses = []
    u = 0
    while u * k1 < T:
        start, end = max(0, (u + 1) * k1 - k2), min((u + 1) * k1, T)
        opt.zero_grad()
        state = states[start]
        state = None if state is None else tuple(s.detach() for s in state)
        outs = []
        for t in range(start, end):
            out, state = model(x[t:t + 1], state)
            outs.append(out)
            states[t + 1] = state
        new = torch.cat(outs)[u * k1 - start:]
        loss = loss_fn(new, y[u * k1:end])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        u += 1
    return losses, tuple(s.detach() for s in states[T])


def run_tbptt(model, x, y, k1, k2=None, lr=0.1, loss_fn=F.mse_loss, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    return tbptt.run(model, x, y, loss_fn, opt, k1=k1, k2=k2, **kw)


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fastlstm", "torch", "head-fastlstm"])
@pytest.mark.parametrize("k", [1, 4, 5, 17, 40])
def test_k1_equals_k2_is_manual_chunking(k, kind):
    model = make(kind)
    twin = copy.deepcopy(model)
    x, y = data(model, 17)
    expected_losses, expected_state = manual_chunked(twin, x, y, k)
    result = run_tbptt(model, x, y, k)
    assert len(result.losses) == len(expected_losses) == -(-17 // k)
    assert_close(torch.tensor(result.losses), torch.tensor(expected_losses), F64, "losses")
    assert_params_close(params_of(model), params_of(twin))
    for a, b in zip(result.state, expected_state):
        assert_close(a, b, F64, "final state")
    assert result.steps == [min(k, 17 - t) for t in range(0, 17, k)]
    assert result.total_steps == 17 and result.updates == len(expected_losses)


@pytest.mark.parametrize("kind", ["fastlstm", "torch-head"])
@pytest.mark.parametrize("k1,k2", [(2, 3), (2, 4), (2, 5), (3, 7), (1, 4), (4, 6), (5, 20)])
def test_k2_greater_than_k1_matches_hand_written_reference(k1, k2, kind):
    model = make(kind)
    twin = copy.deepcopy(model)
    x, y = data(model, 13)
    expected_losses, expected_state = manual_k1_k2(twin, x, y, k1, k2)
    result = run_tbptt(model, x, y, k1, k2)
    assert_close(torch.tensor(result.losses), torch.tensor(expected_losses), F64, "losses")
    assert_params_close(params_of(model), params_of(twin))
    for a, b in zip(result.state, expected_state):
        assert_close(a, b, F64, "final state")


def test_k2_changes_the_training():
    # Guards the test above: with the same k1, a longer backprop window gives other parameters.
    model = make("fastlstm")
    twin = copy.deepcopy(model)
    x, y = data(model, 13)
    run_tbptt(model, x, y, 2, 2)
    run_tbptt(twin, x, y, 2, 6)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters())) > 1e-4


def test_windows_by_hand():
    W = tbptt.Window
    assert tbptt.windows(5, 2, 3) == [W(0, 1, 0, 2), W(1, 3, 2, 4), W(3, 5, 4, 5)]
    assert tbptt.windows(6, 3) == [W(0, 3, 0, 3), W(3, 6, 3, 6)]
    assert tbptt.windows(7, 2, 6) == [W(0, 0, 0, 2), W(0, 0, 2, 4), W(0, 2, 4, 6), W(2, 4, 6, 7)]
    assert tbptt.windows(0, 2) == []
    for T, k1, k2 in [(13, 2, 5), (20, 3, 3), (9, 4, 5), (10, 1, 3)]:
        ws = tbptt.windows(T, k1, k2)
        assert [w.new_start for w in ws] == list(range(0, T, k1))
        assert all(w.end - w.start <= k2 and w.start <= w.new_start < w.end for w in ws)
        assert all(a.split == b.start for a, b in zip(ws, ws[1:]))  # the carried state starts the next window


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 5), (5, 12)])
@pytest.mark.parametrize("kind", ["fastlstm", "torch", "head-fastlstm"])
def test_state_is_carried(kind, k1, k2):
    # lr = 0: the parameters never change, so the carried state must be the full sequence's.
    model = make(kind)
    x, y = data(model, 23)
    with torch.no_grad():
        out, (h, c) = model(x)
    result = run_tbptt(model, x, y, k1, k2, lr=0.0, loss_fn=lambda o, t: ((o - t) ** 2).sum())
    assert_close(result.state[0], h, F64, "h")
    assert_close(result.state[1], c, F64, "c")
    # ... and every update's loss is the loss of the full forward's outputs on its new steps.
    expected = [((out[w.new_start:w.end] - y[w.new_start:w.end]) ** 2).sum().item()
                for w in tbptt.windows(23, k1, k2)]
    assert_close(torch.tensor(result.losses), torch.tensor(expected), F64, "losses")


def test_streaming_gradients_equal_in_kernel_tbptt():
    # With lr = 0 and a sum loss, the gradients of the k-step updates add up to the gradient of one
    # fastlstm call with tbptt_chunk=k (the streaming trainer and the in-kernel option agree).
    model = fastlstm.LSTM(3, 5, 2, dtype=F64)
    x, y = data(model, 20)
    total = [torch.zeros_like(p) for p in model.parameters()]

    def accumulate(u, loss):
        for t, p in zip(total, model.parameters()):
            t += p.grad

    sum_loss = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    run_tbptt(model, x, y, 6, lr=0.0, loss_fn=sum_loss, on_update=accumulate)
    model.zero_grad()
    out, _ = model(x, tbptt_chunk=6)
    sum_loss(out, y).backward()
    for t, p in zip(total, model.parameters()):
        assert_close(t, p.grad, F64, "accumulated gradient")


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 6)])
@pytest.mark.parametrize("kind", ["fastlstm", "torch-head"])
def test_batch_first(kind, k1, k2):
    # Same training as on the time-major layout of the same data.
    model = make(kind, batch_first=True)
    twin = make(kind, batch_first=False)
    twin.load_state_dict(model.state_dict())
    x, y = data(twin, 11, B=3)
    # fastlstm.LSTM has a batch_first attribute, the custom model does not: then it is given.
    flag = None if kind == "fastlstm" else True
    result = run_tbptt(model, x.transpose(0, 1), y.transpose(0, 1), k1, k2, batch_first=flag)
    expected = run_tbptt(twin, x, y, k1, k2)
    assert_close(torch.tensor(result.losses), torch.tensor(expected.losses), F64, "losses")
    assert_params_close(params_of(model), params_of(twin))


def test_batch_first_errors():
    model = make("fastlstm", batch_first=False)
    x, y = data(model, 12, B=3)
    with pytest.raises(ValueError, match="batch_first=True but the model has batch_first=False"):
        run_tbptt(model, x, y, 5, batch_first=True)
    # A model whose output does not keep the time dimension of its input is caught.
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(ValueError, match="time dimension"):
        tbptt.run(lambda x, s: (x.sum(0), s), x, y, F.mse_loss, opt, k1=4)


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)])
def test_stream_of_pieces_equals_one_tensor(k1, k2):
    model = make("head-fastlstm")
    twin = copy.deepcopy(model)
    x, y = data(model, 29)
    whole = run_tbptt(model, x, y, k1, k2)
    cuts = [0, 1, 2, 9, 9, 15, 29]  # includes an empty piece and pieces shorter than k1
    pieces = [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5)
    streamed = tbptt.run_stream(twin, iter(pieces), F.mse_loss, opt, k1=k1, k2=k2)
    assert streamed.losses == whole.losses
    assert streamed.steps == whole.steps
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_state_argument_continues_a_sequence():
    # Two runs over the halves, the second from the first's state (same optimizer), equal one run
    # over the whole sequence.
    model = make("fastlstm")
    twin = copy.deepcopy(model)
    x, y = data(model, 20)
    whole = run_tbptt(model, x, y, 5)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5)
    first = tbptt.run(twin, x[:10], y[:10], F.mse_loss, opt, k1=5)
    second = tbptt.run(twin, x[10:], y[10:], F.mse_loss, opt, k1=5, state=first.state)
    assert first.losses + second.losses == whole.losses
    for a, b in zip(second.state, whole.state):
        assert torch.equal(a, b)
    assert second.state[0].grad_fn is None and not second.state[0].requires_grad


def test_max_grad_norm_and_result_fields():
    model = make("fastlstm")
    twin = copy.deepcopy(model)
    x, y = data(model, 12)
    result = run_tbptt(model, x, y, 4, max_grad_norm=0.01)
    manual_chunked(twin, x, y, 4, max_grad_norm=0.01)
    assert_params_close(params_of(model), params_of(twin))
    assert result.updates == 3 and result.total_steps == 12 and result.elapsed > 0
    assert result.mean_loss == pytest.approx(sum(result.losses) / 3)
    assert tbptt.TBPTTResult().mean_loss != tbptt.TBPTTResult().mean_loss  # nan for an empty run


def test_bad_arguments():
    model = make("fastlstm")
    x, y = data(model, 10)
    for k1, k2, error, match in [(0, None, ValueError, "k1 must be a positive int"),
                                 (-3, 4, ValueError, "k1 must be a positive int"),
                                 (4, 0, ValueError, "k2 must be a positive int"),
                                 (5, 4, ValueError, r"k2 \(4\) must be >= k1 \(5\)"),
                                 (2.0, None, TypeError, "k1 must be a positive int"),
                                 (True, None, TypeError, "k1 must be a positive int"),
                                 (2, "3", TypeError, "k2 must be a positive int")]:
        with pytest.raises(error, match=match):
            run_tbptt(model, x, y, k1, k2)
    with pytest.raises(ValueError, match="same number of time steps"):
        run_tbptt(model, x, y[:9], 3)
    with pytest.raises(ValueError, match="max_grad_norm"):
        run_tbptt(model, x, y, 3, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        run_tbptt(model, x, y, 3, loss_fn=lambda o, t: (o - t) ** 2)
    with pytest.raises(TypeError, match="pairs"):
        tbptt.run_stream(model, [x], F.mse_loss, torch.optim.SGD(model.parameters(), 0.1), k1=3)
    with pytest.raises(ValueError, match="positive int"):
        list(tbptt.chunks(x, y, 0))


def test_progress_bar(capsys, monkeypatch):
    model = make("fastlstm")
    x, y = data(model, 12)
    run_tbptt(model, x, y, 4, progress=True)
    assert "tbptt" in capsys.readouterr().err
    run_tbptt(model, x, y, 4)  # 3 updates: no bar by default
    assert capsys.readouterr().err == ""
    # Without tqdm: a warning, and the run goes on.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.warns(UserWarning, match="tqdm"):
        result = run_tbptt(model, x, y, 4, progress=True)
    assert result.updates == 3
    run_tbptt(model, x, y, 1, progress=None)  # 12 updates: below the automatic threshold, no warning


def test_memory_does_not_grow_with_T():
    # The bytes saved for backward during one update are the same at T = 60 and T = 600.
    def peak(T):
        model = make("fastlstm")
        x, y = data(model, T)
        current, worst = [0], [0]

        def pack(t):
            current[0] += t.numel() * t.element_size()
            worst[0] = max(worst[0], current[0])
            return t

        def reset(u, loss):
            current[0] = 0

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run_tbptt(model, x, y, 10, 20, on_update=reset)
        return worst[0]

    assert peak(600) == peak(60) > 0


def test_chunks_views():
    x = torch.arange(20.0).view(2, 10, 1)
    got = list(tbptt.chunks(x, None, 4, batch_first=True))
    assert [c.shape[1] for c, _ in got] == [4, 4, 2]
    assert all(y is None for _, y in got)
    assert got[1][0].data_ptr() == x[:, 4:].data_ptr()  # views, no copies
    with pytest.raises(ValueError, match="same number of time steps"):
        list(tbptt.chunks(x, x[:, :3], 4, batch_first=True))


def test_detach_state_structures():
    a = torch.ones(2, requires_grad=True) * 2
    st = {"h": (a, [a]), "n": None, "k": 3}
    out = tbptt.detach_state(st)
    assert not out["h"][0].requires_grad and not out["h"][1][0].requires_grad
    assert out["n"] is None and out["k"] == 3 and isinstance(out["h"][1], list)
