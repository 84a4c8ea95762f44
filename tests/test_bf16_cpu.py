"""bfloat16 layers on the CPU: the bfloat16 kernels where they run, float32 compute elsewhere.

Where ``fastlstm.cpu_capability()`` is ``AMX_BF16`` (products on AMX tiles) or ``AVX512_BF16``
(vdpbf16ps) a bfloat16 layer without a projection runs the bfloat16 kernels
(csrc/cpu/kernels/avx512_bf16/): products of the bfloat16 operands with float32 accumulation,
gates and c in float32, h_t rounded to bfloat16 at every step. On an AMX machine the tests also
run with FASTLSTM_CPU_AMX=0 (the vdpbf16ps kernels) in a subprocess. The
reference is that computation in float64 (``bf16_reference``): the bfloat16 input, weights and
summed bias (b_ih + b_hh in bfloat16, as fastlstm.LSTM adds them), h_t rounded to bfloat16 after
every step (the gradient passes the rounding unchanged), c and the gates unrounded. Compared: the
output, h_n, c_n, and the gradients of the input, h0, c0 and every parameter, each within 1e-2 of
the reference's largest magnitude; the outputs must also be bit-identical to the rounded
reference for at least 97% of their elements, which only the per-step rounding gives (float32
compute, without it, matches 70-91% of them on these cases).

The backward is float32 after either forward. On other CPUs, and with ATEN_CPU_CAPABILITY=avx2 or
default, bfloat16 computes in float32 (inputs widened, outputs rounded) as before: the
subprocess test checks that it is then exactly the float32 module's result, rounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from reference import rel_error

BF16_KERNELS = fastlstm.cpu_capability() in ("AMX_BF16", "AVX512_BF16")
TOL = 1e-2
MIN_EXACT = 0.97


def _round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16 (to nearest even), the gradient passed unchanged."""
    return t + (t.bfloat16().double() - t).detach()


def _layer(x, w_ih, w_hh, bias, h, c, lengths, reverse):
    """One direction in float64 with h rounded to bfloat16 at every step; padded steps keep the state."""
    T = x.shape[0]
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        g = x[t] @ w_ih.T + h @ w_hh.T
        if bias is not None:
            g = g + bias
        i, f, gg, o = g.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h_new = _round(torch.sigmoid(o) * torch.tanh(c_new))
        live = (t < lengths)[:, None]
        h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
        ys[t] = torch.where(live, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def bf16_reference(params: dict, model: fastlstm.LSTM, x, h0, c0, lengths):
    """The bfloat16 forward of fastlstm.LSTM ``model`` in float64; params: its parameters as float64 leaves."""
    D = 2 if model.bidirectional else 1
    layer_in, hs, cs = x, [], []
    for layer in range(model.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            bias = _round(params["bias_ih" + sfx] + params["bias_hh" + sfx]) if model.bias else None
            k = layer * D + d
            y, h, c = _layer(layer_in, params["weight_ih" + sfx], params["weight_hh" + sfx], bias, h0[k], c0[k],
                             lengths, bool(d))
            outs.append(y)
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, 2)
    return layer_in, torch.stack(hs), torch.stack(cs)


def _run(model, x, h0, c0, lengths, weights, packed, **call):
    """(output, h_n, c_n) of model in bfloat16 and the gradients of x, h0, c0 and the parameters."""
    leaves = [t.detach().bfloat16().requires_grad_() for t in (x, h0, c0)]
    inp = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) if packed else leaves[0]
    out, (h, c) = model(inp, (leaves[1], leaves[2]), **call)
    y = pad_packed_sequence(out, total_length=x.shape[0])[0] if packed else out
    loss = sum((t.double() * w).sum() for t, w in zip((y, h, c), weights))
    grads = torch.autograd.grad(loss, leaves + list(model.parameters()))
    return (y, h, c), grads


def _case(T, B, I, H, layers=1, bidirectional=False, packed=False, seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    model = fastlstm.LSTM(I, H, layers, bidirectional=bidirectional, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    D = 2 if bidirectional else 1

    def bf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16().double()

    x, h0, c0 = bf(T, B, I), bf(layers * D, B, H, scale=0.5), bf(layers * D, B, H, scale=0.5)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if packed else torch.full((B,), T)
    if packed:
        lengths[B // 2] = T
    weights = [bf(T, B, D * H), bf(layers * D, B, H), bf(layers * D, B, H)]  # dL/dy, dL/dh_n, dL/dc_n
    return model, x, h0, c0, lengths, weights


def _reference(model, x, h0, c0, lengths, weights):
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
    y, h, c = bf16_reference(params, model, *leaves, lengths)
    loss = sum((t * w).sum() for t, w in zip((y, h, c), weights))
    grads = torch.autograd.grad(loss, leaves + list(params.values()))
    return (y, h, c), grads


def _exact_fraction(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    return (y.double() == y_ref.bfloat16().double()).double().mean().item()


def _check(model, x, h0, c0, lengths, weights, packed):
    outs, grads = _run(model, x, h0, c0, lengths, weights, packed)
    ref_outs, ref_grads = _reference(model, x, h0, c0, lengths, weights)
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0"] + [
        f"grad {n}" for n, _ in model.named_parameters()]
    for name, a, e in zip(names, list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        assert torch.isfinite(a).all(), name
        err = rel_error(a, e)
        assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL:.0e} ({fastlstm.cpu_capability()})"
    return _exact_fraction(outs[0], ref_outs[0])


# Sizes around the vector widths: H = 19 (one partial block, odd depth), 16 (one full block), 33
# (two full blocks and one unit), 48 (three full, even); B = 1 and rows past a 4-row tile; odd T.
# AMX tiles take 16 rows and a depth of 32: B = 16 with H and I multiples of 32 reads A in place,
# B = 20 and 33 add a partial second and third row block, I = 64 a second depth block.
SHAPES = [(7, 1, 5, 19), (9, 3, 16, 16), (5, 6, 33, 33), (11, 5, 7, 48), (3, 2, 1, 1), (6, 16, 64, 32),
          (5, 20, 9, 35), (3, 33, 32, 64)]


@pytest.mark.parametrize("T,B,I,H", SHAPES, ids=[f"T{T}-B{B}-I{I}-H{H}" for T, B, I, H in SHAPES])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_against_float64_reference(T, B, I, H, packed):
    exact = _check(*_case(T, B, I, H, packed=packed), packed)
    if BF16_KERNELS:
        assert exact >= MIN_EXACT, f"only {exact:.1%} of the outputs are the rounded reference's"


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_two_layers_bidirectional(packed):
    model, x, h0, c0, lengths, weights = _case(13, 5, 6, 21, layers=2, bidirectional=True, packed=packed, seed=1)
    exact = _check(model, x, h0, c0, lengths, weights, packed)
    if BF16_KERNELS:
        assert exact >= MIN_EXACT, f"only {exact:.1%} of the outputs are the rounded reference's"


def test_long_sequence_and_many_rows():
    # Several projection blocks and inference chunks (64 steps), 9 rows: two full 4-row tiles and one of 1.
    # Weights of nn.LSTM's scale (1 / sqrt(H)): larger ones make 150 steps chaotic, where one
    # rounding flipped early sends the two computations apart.
    model, x, h0, c0, lengths, weights = _case(150, 9, 24, 40, seed=2, scale=40 ** -0.5)
    exact = _check(model, x, h0, c0, lengths, weights, False)
    if BF16_KERNELS:
        assert exact >= MIN_EXACT, f"only {exact:.1%} of the outputs are the rounded reference's"
    # Without grad (chunked, nothing saved) the forward is bit-identical.
    with torch.no_grad():
        y, (h, c) = model(x.bfloat16(), (h0.bfloat16(), c0.bfloat16()))
    outs, _ = _run(model, x, h0, c0, lengths, weights, False)
    for a, e in zip((y, h, c), outs):
        assert torch.equal(a, e)


@pytest.mark.parametrize("every", [3, 4])
def test_checkpointing_recomputes_the_same_forward(every):
    model, x, h0, c0, lengths, weights = _case(10, 3, 5, 19, layers=2, bidirectional=True, packed=True, seed=3)
    full_outs, full_grads = _run(model, x, h0, c0, lengths, weights, True)
    outs, grads = _run(model, x, h0, c0, lengths, weights, True, checkpoint_every=every)
    for a, e in zip(outs, full_outs):
        assert torch.equal(a, e)
    # With the bfloat16 kernels the backward recomputes each chunk's gates with the forward's
    # kernels: the gradients are those of the same forward (float32 sums in another order, then
    # rounded to bfloat16: within one bfloat16 rounding of the full mode's). Float32 compute
    # saves its checkpoints of h in bfloat16, so its recomputed chunks start from rounded states
    # that its forward did not have: only within the bfloat16 tolerance.
    for a, e in zip(grads, full_grads):
        assert rel_error(a, e) <= (2 ** -8 if BF16_KERNELS else TOL)


def test_projection_layers_compute_in_float32():
    # proj_size > 0 takes the stepwise path, which has no bfloat16 kernels: float32 throughout.
    # (No bias: the bfloat16 module adds b_ih + b_hh in bfloat16, the float32 one in float32.)
    model = fastlstm.LSTM(5, 7, bias=False, proj_size=3, dtype=torch.bfloat16)
    ref = fastlstm.LSTM(5, 7, bias=False, proj_size=3)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randn(6, 2, 5).bfloat16()
    with torch.no_grad():
        y, (h, c) = model(x)
        y32, (h32, c32) = ref(x.float())
    for a, e in zip((y, h, c), (y32, h32, c32)):
        assert torch.equal(a, e.bfloat16())


# One layer without bias: a second layer would read the first's rounded output, and the bfloat16
# module adds b_ih + b_hh in bfloat16.
_CHILD = r"""
import json, torch, fastlstm
torch.manual_seed(0)
model = fastlstm.LSTM(6, 19, bias=False, bidirectional=True, dtype=torch.bfloat16)
ref = fastlstm.LSTM(6, 19, bias=False, bidirectional=True)
ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
x = torch.randn(9, 3, 6).bfloat16()
with torch.no_grad():
    y = model(x)[0]
    y32 = ref(x.float())[0]
print(json.dumps({"capability": fastlstm.cpu_capability(), "float32_compute": torch.equal(y, y32.bfloat16())}))
"""


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "FASTLSTM_CPU_AMX")}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def _child(level: str | None) -> dict:
    env = _env(ATEN_CPU_CAPABILITY=level)
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


def test_float32_compute_elsewhere():
    """The kernels run exactly where the CPU has AVX512_BF16 at the AVX512 level; elsewhere
    bfloat16 is the float32 computation, rounded."""
    native = _child(None)
    if native["capability"] in ("AMX_BF16", "AVX512_BF16"):
        assert _cpu_has_avx512_bf16()
        assert not native["float32_compute"]  # h rounded at every step: not the float32 result
    else:
        assert native["float32_compute"], native
    for level in ("avx2", "default"):
        report = _child(level)
        assert report["capability"] in ("AVX2", "DEFAULT"), report
        assert report["float32_compute"], report


@pytest.mark.skipif(fastlstm.cpu_capability() != "AMX_BF16", reason="the AMX kernels do not run here")
def test_vdpbf16ps_kernels_on_an_amx_cpu():
    """This file's kernel tests once more with FASTLSTM_CPU_AMX=0: the vdpbf16ps kernels."""
    check = subprocess.run([sys.executable, "-c", "import fastlstm; print(fastlstm.cpu_capability(), fastlstm.__file__)"],
                           env=_env(FASTLSTM_CPU_AMX="0"), capture_output=True, text=True, timeout=300)
    assert check.stdout.split() == ["AVX512_BF16", fastlstm.__file__], check.stdout + check.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "not elsewhere and not amx_cpu"], env=_env(FASTLSTM_CPU_AMX="0"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
