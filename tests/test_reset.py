"""Per-sample state resets (``lstm(x, hx, reset=r)``) against a per-segment torch.nn.LSTM reference.

The reference runs every segment of every row as its own sequence through torch.nn.LSTM in
float64, from zeros except the first segment in each direction's processing order (the forward
direction's first segment, the reverse direction's last), which starts from hx. Outputs, final
states and the gradients of input, hx and every parameter must match.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastlstm
import fastlstm.tbptt
from reference import assert_close

F64 = torch.float64


def segment_reference(ref: nn.LSTM, x: torch.Tensor, reset: torch.Tensor, lengths: torch.Tensor,
                      hx: tuple[torch.Tensor, torch.Tensor] | None):
    """y (T, B, D*K) (zero on padding), h_n, c_n of ``ref`` (batch_first=False) run segment by segment.

    x (T, B, I) time-major; reset (T, B) bool; lengths (B,); hx ((L*D, B, K), (L*D, B, H)) or None.
    """
    T, B, _ = x.shape
    D = 2 if ref.bidirectional else 1
    K = ref.proj_size or ref.hidden_size
    rows_y, rows_h, rows_c = [], [], []
    for b in range(B):
        n = int(lengths[b])
        starts = [0] + [t for t in range(1, n) if reset[t, b]]
        bounds = list(zip(starts, starts[1:] + [n]))
        outs, h_fwd, c_fwd, h_rev, c_rev = [], None, None, None, None
        for k, (s, e) in enumerate(bounds):
            first, last = k == 0, k == len(bounds) - 1
            # Layer-direction l * D + d starts from hx in its first segment: d = 0 forward, d = 1 reverse.
            keep = torch.tensor([first if d == 0 else last for _ in range(ref.num_layers) for d in range(D)])
            if hx is None:
                h0 = x.new_zeros(ref.num_layers * D, 1, K)
                c0 = x.new_zeros(ref.num_layers * D, 1, ref.hidden_size)
            else:
                h0 = torch.where(keep.view(-1, 1, 1), hx[0][:, b:b + 1], torch.zeros_like(hx[0][:, b:b + 1]))
                c0 = torch.where(keep.view(-1, 1, 1), hx[1][:, b:b + 1], torch.zeros_like(hx[1][:, b:b + 1]))
            out, (h, c) = ref(x[s:e, b:b + 1], (h0, c0))
            outs.append(out[:, 0])
            if last:
                h_fwd, c_fwd = h[0::D], c[0::D]
            if first:
                h_rev, c_rev = h[D - 1::D], c[D - 1::D]
        outs.append(x.new_zeros(T - n, D * K))
        rows_y.append(torch.cat(outs))
        # Interleave (layer, direction) as nn.LSTM orders h_n: forward state from the last segment,
        # reverse state from the first.
        h_b = torch.stack([h_fwd, h_rev], 1).flatten(0, 1) if D == 2 else h_fwd
        c_b = torch.stack([c_fwd, c_rev], 1).flatten(0, 1) if D == 2 else c_fwd
        rows_h.append(h_b[:, 0])
        rows_c.append(c_b[:, 0])
    return torch.stack(rows_y, 1), torch.stack(rows_h, 1), torch.stack(rows_c, 1)


def _random_reset(T: int, B: int, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    reset = torch.rand(T, B, generator=torch.Generator().manual_seed(seed)) < p
    reset[T // 2, 0] = True  # at least one reset in the middle
    return reset


def _loss_weights(T, B, D, K, L, H, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, D * K, generator=g, dtype=F64), torch.randn(L * D, B, K, generator=g, dtype=F64),
            torch.randn(L * D, B, H, generator=g, dtype=F64))


CASES = {
    # name: (num_layers, bidirectional, proj_size, bias, batch_first, given_state, input_kind)
    "1layer": (1, False, 0, True, False, True, "batched"),
    "1layer_zero_state": (1, False, 0, True, False, False, "batched"),
    "bidirectional": (1, True, 0, True, False, True, "batched"),
    "2layers_bidirectional": (2, True, 0, True, False, True, "batched"),
    "2layers_batch_first_no_bias": (2, False, 0, False, True, True, "batched"),
    "proj": (1, False, 3, True, False, True, "batched"),
    "2layers_bidirectional_proj": (2, True, 3, True, True, True, "batched"),
    "unbatched_bidirectional": (2, True, 0, True, False, True, "unbatched"),
    "packed": (1, False, 0, True, False, True, "packed"),
    "packed_bidirectional_2layers": (2, True, 0, True, True, True, "packed"),
    "packed_bidirectional_proj": (1, True, 3, True, False, True, "packed"),
    "packed_as_padded_bidirectional": (2, True, 0, True, True, True, "packed_padded_reset"),
}


def _run_case(flags, dtype=F64, T=9, B=4, I=3, H=5, seed=0, **options):
    layers, bidir, proj, bias, batch_first, given, kind = flags
    D, K = 2 if bidir else 1, proj or H
    if kind == "unbatched":
        B = 1
    ref = nn.LSTM(I, H, layers, bias, False, 0.0, bidir, proj, dtype=F64)
    ours = fastlstm.LSTM.from_torch(copy.deepcopy(ref), **options).to(dtype)
    ours.batch_first = batch_first
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    reset = _random_reset(T, B, seed=seed)
    lengths = torch.full((B,), T)
    if kind.startswith("packed"):
        lengths = torch.tensor([T, 3, T - 2, 1, T - 1, 5][:B])
        reset[2, 2] = reset[T - 1, 1] = True  # resets on padding: no effect
    hx = None
    if given:
        hx = (torch.randn(layers * D, B, K, dtype=F64, requires_grad=True),
              torch.randn(layers * D, B, H, dtype=F64, requires_grad=True))
    gy, gh, gc = _loss_weights(T, B, D, K, layers, H)
    mask = (torch.arange(T)[:, None] < lengths[None, :]).unsqueeze(-1)

    y_ref, h_ref, c_ref = segment_reference(ref, x, reset, lengths, hx)
    loss_ref = (y_ref * gy * mask).sum() + (h_ref * gh).sum() + (c_ref * gc).sum()
    wrt_ref = [x, *(hx or ()), *ref.parameters()]
    grads_ref = torch.autograd.grad(loss_ref, wrt_ref)

    x2 = x.detach().to(dtype).requires_grad_()
    hx2 = None if hx is None else tuple(t.detach().to(dtype).requires_grad_() for t in hx)
    xin = x2.transpose(0, 1) if batch_first else x2
    rin = reset.t() if batch_first else reset
    if kind == "unbatched":
        xin, rin = x2[:, 0], reset[:, 0]
        hx_in = None if hx2 is None else (hx2[0][:, 0], hx2[1][:, 0])
    else:
        hx_in = hx2
    if kind.startswith("packed"):
        xin = pack_padded_sequence(xin, lengths, batch_first=batch_first, enforce_sorted=False)
        if kind == "packed":
            rin = pack_padded_sequence(rin, lengths, batch_first=batch_first, enforce_sorted=False)
    out, (h, c) = ours(xin, hx_in, reset=rin)
    if isinstance(out, PackedSequence):
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    if kind == "unbatched":
        out, h, c = out.unsqueeze(1), h.unsqueeze(1), c.unsqueeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    loss = (out.double() * gy * mask).sum() + (h.double() * gh).sum() + (c.double() * gc).sum()
    wrt = [x2, *(hx2 or ()), *ours.parameters()]
    grads = torch.autograd.grad(loss, wrt)
    return (y_ref, h_ref, c_ref, grads_ref), (out, h, c, grads)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reset_matches_per_segment_nn_lstm(case):
    (y_ref, h_ref, c_ref, g_ref), (y, h, c, g) = _run_case(CASES[case])
    assert_close(y, y_ref, F64, "output")
    assert_close(h, h_ref, F64, "h_n")
    assert_close(c, c_ref, F64, "c_n")
    for index, (a, e) in enumerate(zip(g, g_ref, strict=True)):
        assert_close(a, e, F64, f"gradient {index}")


@pytest.mark.parametrize("checkpoint_every", [2, 4], ids=["checkpoint2", "checkpoint4"])
@pytest.mark.parametrize("case", ["2layers_bidirectional", "packed_bidirectional_proj"])
def test_reset_with_checkpointing(case, checkpoint_every):
    (y_ref, h_ref, c_ref, g_ref), (y, h, c, g) = _run_case(CASES[case], checkpoint_every=checkpoint_every)
    for a, e, what in [(y, y_ref, "output"), (h, h_ref, "h_n"), (c, c_ref, "c_n"),
                       *((a, e, f"gradient {i}") for i, (a, e) in enumerate(zip(g, g_ref, strict=True)))]:
        assert_close(a, e, F64, what)


@pytest.mark.parametrize("case", ["bidirectional", "packed_bidirectional_2layers", "proj"])
def test_reset_float32_several_vector_blocks(case):
    """float32 (the AVX kernels' vector width: 20 units span two blocks, 6 rows a partial row tile)."""
    (y_ref, h_ref, c_ref, g_ref), (y, h, c, g) = _run_case(CASES[case], dtype=torch.float32, B=6, H=20, T=12)
    for a, e, what in [(y, y_ref, "output"), (h, h_ref, "h_n"), (c, c_ref, "c_n"),
                       *((a, e, f"gradient {i}") for i, (a, e) in enumerate(zip(g, g_ref, strict=True)))]:
        assert_close(a, e, torch.float32, what)


OPTION_SETS = {
    "tbptt3": {"tbptt_chunk": 3},
    "clip_recurrent": {"grad_clip": 0.05},
    "clip_gates": {"grad_clip": 0.05, "grad_clip_mode": "gates"},
    "tbptt2_clip_checkpoint3": {"tbptt_chunk": 2, "grad_clip": 0.1, "checkpoint_every": 3},
}


@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize("case", ["2layers_bidirectional", "packed_bidirectional_proj"])
def test_reset_with_truncation_clipping_and_norms(case, options):
    """The kernels' backward against fastlstm.composite's (the create_graph path), an independent
    ATen implementation of the same carry rules; norms included. The forward still matches
    nn.LSTM per segment (these options change only the backward)."""
    layers, bidir, proj, bias, batch_first, given, kind = CASES[case]
    kw = OPTION_SETS[options]
    torch.manual_seed(3)
    model = fastlstm.LSTM(3, 5, layers, bias, batch_first, 0.0, bidir, proj, dtype=F64, record_grad_norms=True, **kw)
    T, B = 9, 4
    x = torch.randn(B, T, 3, dtype=F64) if batch_first else torch.randn(T, B, 3, dtype=F64)
    reset = _random_reset(T, B)
    rin = reset.t() if batch_first else reset
    if kind.startswith("packed"):
        lengths = torch.tensor([T, 3, T - 2, 1])
        rin = pack_padded_sequence(rin, lengths, batch_first=batch_first, enforce_sorted=False)
    results = []
    for create_graph in (False, True):
        leaf = x.clone().requires_grad_()
        inp = leaf
        if kind.startswith("packed"):
            inp = pack_padded_sequence(leaf, lengths, batch_first=batch_first, enforce_sorted=False)
        model.zero_grad(set_to_none=True)
        out, (h, c) = model(inp, reset=rin)
        y = out.data if isinstance(out, PackedSequence) else out
        # backward(), not autograd.grad: the norms arrive as the gradient of an internal input.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")
            (y.square().sum() + h.sum() + c.sin().sum()).backward(create_graph=create_graph)
        grads = [t.grad.detach().clone() for t in (leaf, *model.parameters())]
        norms = model.grad_norms
        results.append((grads, norms.h, norms.c))
    (g_kernel, nh_kernel, nc_kernel), (g_composite, nh_composite, nc_composite) = results
    assert max(gr.abs().max().item() for gr in g_kernel) > 0.1
    for index, (a, e) in enumerate(zip(g_kernel, g_composite, strict=True)):
        assert_close(a, e, F64, f"gradient {index}")
    assert_close(nh_kernel, nh_composite, F64, "norms of dL/dh")
    assert_close(nc_kernel, nc_composite, F64, "norms of dL/dc")


def test_no_reset_and_all_false_reset_agree_bitwise():
    model = fastlstm.LSTM(3, 5, 2, bidirectional=True, dtype=F64)
    x = torch.randn(7, 3, 3, dtype=F64, requires_grad=True)
    runs = []
    for reset in (None, torch.zeros(7, 3, dtype=torch.bool)):
        out, (h, c) = model(x, reset=reset)
        grads = torch.autograd.grad(out.square().sum() + h.sum() + c.sum(), [x, *model.parameters()])
        runs.append((out, h, c, *grads))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_reset_at_step_zero_keeps_hx():
    model = fastlstm.LSTM(3, 5, bidirectional=True, dtype=F64)
    x = torch.randn(6, 2, 3, dtype=F64)
    hx = (torch.randn(2, 2, 5, dtype=F64), torch.randn(2, 2, 5, dtype=F64))
    first = torch.zeros(6, 2, dtype=torch.bool)
    first[0] = True
    for a, b in zip(model(x, hx)[0:1] + model(x, hx)[1], model(x, hx, reset=first)[0:1] + model(x, hx, reset=first)[1]):
        assert torch.equal(a, b)


def test_every_step_reset_is_a_batch_of_single_steps():
    """Reset everywhere: each step runs from zeros (forward) with no recurrence at all."""
    model = fastlstm.LSTM(3, 4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    out, _ = model(x, reset=torch.ones(5, 2, dtype=torch.bool))
    singles, _ = model(x.view(1, 10, 3))
    assert_close(out[1:], singles.view(5, 2, 4)[1:], F64, "output")


def test_gradgradcheck_with_reset():
    model = fastlstm.LSTM(2, 3, bidirectional=True, dtype=F64)
    x = torch.randn(5, 2, 2, dtype=F64, requires_grad=True)
    reset = torch.tensor([[False, False], [False, True], [True, False], [False, False], [False, True]])

    def f(inp):
        out, (h, c) = model(inp, reset=reset)
        return out.sum() + h.square().sum() + c.sum()

    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- errors


def test_reset_errors():
    model = fastlstm.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)  # (N, L, I)
    with pytest.raises(TypeError, match="reset must be a bool tensor, got dtype torch.float32"):
        model(x, reset=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="reset must be a bool tensor or None, got list"):
        model(x, reset=[[False] * 5] * 2)
    with pytest.raises(ValueError, match=r"reset must have shape \(N, L\) with batch_first=True: expected \[2, 5\], "
                                         r"got \[5, 2\]"):
        model(x, reset=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="reset must be on the input's device"):
        model(x, reset=torch.zeros(2, 5, dtype=torch.bool, device="meta"))
    unbatched = fastlstm.LSTM(3, 4)
    with pytest.raises(ValueError, match=r"reset must have shape \(L,\) for unbatched input: expected \[5\]"):
        unbatched(torch.randn(5, 3), reset=torch.zeros(5, 1, dtype=torch.bool))


def test_packed_reset_errors():
    model = fastlstm.LSTM(3, 4)
    x = torch.randn(5, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    other = pack_padded_sequence(torch.zeros(5, 3, dtype=torch.bool), torch.tensor([5, 3, 4]), enforce_sorted=False)
    with pytest.raises(ValueError, match="packed like the input"):
        model(packed, reset=other)
    with pytest.raises(ValueError, match=r"reset must have shape \(L, N\): expected \[5, 3\], got \[4, 3\]"):
        model(packed, reset=torch.zeros(4, 3, dtype=torch.bool))


def test_op_rejects_a_bad_reset():
    args = [torch.randn(4, 2, 3), torch.randn(8, 3), torch.randn(8, 2), None, None, torch.zeros(2, 2),
            torch.zeros(2, 2), None]
    rest = [None, False, -1, 0, 0.0, "recurrent", "auto"]
    with pytest.raises(RuntimeError, match=r"reset must be a bool tensor of shape \(4, 2\), got Float"):
        torch.ops.fastlstm.layer_forward(*args, torch.zeros(4, 2), *rest)
    with pytest.raises(RuntimeError, match=r"reset must be a bool tensor of shape \(4, 2\), got Bool \[2, 4\]"):
        torch.ops.fastlstm.layer_forward(*args, torch.zeros(2, 4, dtype=torch.bool), *rest)


# ---------------------------------------------------------------- tbptt


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastlstm.LSTM(2, 6, dtype=F64)
        self.head = nn.Linear(6, 1, dtype=F64)

    def forward(self, x, state=None, reset=None):
        y, state = self.lstm(x, state, reset=reset)
        return self.head(y), state


@pytest.mark.parametrize("k1, k2", [(4, 4), (3, 7)])
def test_tbptt_with_a_reset_stream_equals_one_call(k1, k2):
    """Zero learning rate: the final state and every output equal one call over the whole stream."""
    torch.manual_seed(0)
    model = _Head()
    T, B = 23, 3
    x, y = torch.randn(T, B, 2, dtype=F64), torch.randn(T, B, 1, dtype=F64)
    reset = _random_reset(T, B, p=0.2)
    reset[8] = True  # on a window boundary for k1 = 4
    state = (torch.randn(1, B, 6, dtype=F64), torch.randn(1, B, 6, dtype=F64))
    outs = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = fastlstm.tbptt.run(model, x, y, lambda o, t: (outs.append(o.detach()), ((o - t) ** 2).mean())[1], opt,
                                k1=k1, k2=k2, reset=reset, state=state)
    with torch.no_grad():
        expected_out, expected_state = model(x, state, reset=reset)
    assert_close(torch.cat(outs), expected_out, F64, "outputs")
    assert_close(result.state[0], expected_state[0], F64, "h")
    assert_close(result.state[1], expected_state[1], F64, "c")


def test_tbptt_stream_pieces_with_reset_and_errors():
    model = _Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(10, 2, 2, dtype=F64), torch.randn(10, 2, 1, dtype=F64)
    reset = torch.zeros(10, 2, dtype=torch.bool)
    reset[5, 1] = True
    pieces = [(x[:4], y[:4], reset[:4]), (x[4:], y[4:], reset[4:])]
    a = fastlstm.tbptt.run_stream(model, pieces, nn.functional.mse_loss, opt, k1=5)
    b = fastlstm.tbptt.run(model, x, y, nn.functional.mse_loss, opt, k1=5, reset=reset)
    assert a.losses == b.losses
    with pytest.raises(ValueError, match="either every piece carries a reset or none does"):
        fastlstm.tbptt.run_stream(model, [(x[:4], y[:4], reset[:4]), (x[4:], y[4:])], nn.functional.mse_loss, opt,
                                  k1=5)
    with pytest.raises(ValueError, match="it must be bool, 2-D"):
        fastlstm.tbptt.run(model, x, y, nn.functional.mse_loss, opt, k1=5, reset=reset.float())
    with pytest.raises(ValueError, match=r"reset must be a bool tensor of shape \(T, B\) with T = 10"):
        fastlstm.tbptt.run(model, x, y, nn.functional.mse_loss, opt, k1=5, reset=reset[:9])
