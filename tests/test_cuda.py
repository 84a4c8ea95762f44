"""The CUDA kernels against a float64 CPU torch.nn.LSTM reference (skipped without a GPU).

Every test here is marked ``cuda``; conftest.py skips them where there is no GPU or no CUDA build.
Kernel buffers are poisoned with NaN (conftest.py), so an element a kernel does not write fails.
"""

import copy
import itertools

import pytest
import torch
from torch import nn

import fastlstm
from reference import Case, assert_close, compare_modules, compare_with_torch, rel_error

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 GEMMs in full precision (TF32 only when PyTorch's setting allows it, which it does not here)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    yield
    matmul.fp32_precision = previous


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_float32_follows_the_fp32_precision_setting(backend):
    """With TF32 allowed through the fp32_precision API (which makes the legacy allow_tf32 query raise),
    float32 still runs, and agrees with the IEEE run to TF32 accuracy."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(48, 64, num_layers=2, device="cuda", backend=backend)
    x = torch.randn(20, 3, 48, device="cuda")
    results = {}
    for precision in ["ieee", "tf32"]:
        torch.backends.cuda.matmul.fp32_precision = precision
        leaf = x.clone().requires_grad_()
        y, _ = model(leaf)
        y.square().sum().backward()
        results[precision] = (y.detach(), leaf.grad, model.weight_hh_l0.grad.clone())
        model.zero_grad()
    for name, tf32, ieee in zip(["output", "grad input", "grad weight_hh_l0"], results["tf32"], results["ieee"]):
        assert torch.isfinite(tf32).all(), name
        assert rel_error(tf32, ieee) <= 1e-2, name


FLAGS = list(itertools.product([1, 2], [True, False], [False, True], [False, True], [0, 4], [False, True],
                               ["batched", "unbatched", "noncontiguous", "packed"]))


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(map(str, f)))
def test_stepwise_every_flag_combination_float64(flags):
    compare_with_torch(Case.from_flags(flags), torch.float64, device="cuda", backend="stepwise")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", [(2, True, False, True, 4, True, "packed"), (1, True, True, False, 0, False, "batched"),
                                   (3, False, False, True, 0, True, "noncontiguous")],
                         ids=lambda f: "-".join(map(str, f)))
def test_stepwise_dtypes(flags, dtype):
    compare_with_torch(Case.from_flags(flags), dtype, device="cuda", backend="stepwise")


PERSISTENT_FLAGS = [f for f in FLAGS if f[4] == 0]  # the persistent kernel has no projection


@pytest.mark.parametrize("flags", PERSISTENT_FLAGS, ids=lambda f: "-".join(map(str, f)))
def test_persistent_every_flag_combination_float64(flags):
    compare_with_torch(Case.from_flags(flags), torch.float64, device="cuda", backend="persistent")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [(7, 1, 5, 33), (9, 3, 16, 64), (5, 70, 24, 257), (4, 2, 8, 1024)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_persistent_odd_sizes(size, dtype):
    T, B, I, H = size
    if dtype == torch.float64 and H > 512:
        pytest.skip("float64 W_hh at this H does not fit on chip; the dispatcher refuses it (tested below)")
    compare_with_torch(Case(T=T, B=B, input_size=I, hidden_size=H, given_state=True, bidirectional=True), dtype,
                       device="cuda", backend="persistent")


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("size", [(17, 1, 3, 33), (6, 3, 9, 50), (3, 5, 64, 100)], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_odd_sizes(size, backend):
    T, B, I, H = size
    compare_with_torch(Case(T=T, B=B, input_size=I, hidden_size=H, given_state=True), torch.float32, device="cuda",
                       backend=backend)


@pytest.mark.parametrize("checkpoint_every", [1, 3, 100])
@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_checkpointing(checkpoint_every, backend):
    case = Case(num_layers=2, bidirectional=True, given_state=True, input_kind="packed", T=9)
    compare_with_torch(case, torch.float64, device="cuda", backend=backend, checkpoint_every=checkpoint_every)


def test_cpu_and_cuda_agree():
    torch.manual_seed(0)
    cpu = fastlstm.LSTM(6, 10, num_layers=2, bidirectional=True, proj_size=4, dtype=torch.float64)
    gpu = copy.deepcopy(cpu).to("cuda")
    x = torch.randn(11, 3, 6, dtype=torch.float64)
    y_cpu, (h_cpu, c_cpu) = cpu(x)
    y_gpu, (h_gpu, c_gpu) = gpu(x.cuda())
    for a, b in [(y_gpu, y_cpu), (h_gpu, h_cpu), (c_gpu, c_cpu)]:
        assert_close(a.cpu(), b, torch.float64, "cpu vs cuda")


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
@pytest.mark.parametrize("options", [{"tbptt_chunk": 3}, {"grad_clip": 0.05}, {"grad_clip": 0.05, "grad_clip_mode": "gates"},
                                     {"record_grad_norms": True}, {"tbptt_chunk": 4, "grad_clip": 0.1}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_backward_options_match_the_cpu(options, backend):
    """TBPTT, clipping and norm recording give the CPU kernels' results (themselves tested against references)."""
    torch.manual_seed(0)
    cpu = fastlstm.LSTM(5, 12, num_layers=2, bidirectional=True, dtype=torch.float64, **options)
    gpu = copy.deepcopy(cpu).to("cuda")
    gpu.backend = backend
    case = Case(num_layers=2, bidirectional=True, given_state=True, input_kind="packed", T=10, input_size=5,
                hidden_size=12)
    (inp, hx), (inp_g, hx_g) = compare_modules(cpu, gpu, case, torch.float64, "cuda")
    if options.get("record_grad_norms"):
        # Norms are recorded by .backward() (not by the autograd.grad above): one backward each.
        for model, data, state in ((cpu, inp, hx), (gpu, inp_g, hx_g)):
            out, (h, c) = model(data._replace(data=data.data.detach()), tuple(t.detach() for t in state))
            (out.data.sum() + h.sum() + c.sum()).backward()
        assert_close(gpu.grad_norms.h.cpu(), cpu.grad_norms.h, torch.float64, "grad norms h")
        assert_close(gpu.grad_norms.c.cpu(), cpu.grad_norms.c, torch.float64, "grad norms c")


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_long_sequence_forward_is_finite_and_backends_agree(backend):
    torch.manual_seed(0)
    model = fastlstm.LSTM(8, 64, device="cuda")
    x = torch.randn(100_000, 2, 8, device="cuda")
    with torch.no_grad():
        y, (h, c) = model(x, backend=backend)
        y_ref, (h_ref, c_ref) = model(x, backend="stepwise")
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    assert_close(y, y_ref, torch.float32, "T=100k output vs stepwise")


def test_runs_on_the_current_stream_without_host_syncs():
    model = fastlstm.LSTM(8, 32, num_layers=2, device="cuda")
    x = torch.randn(50, 4, 8, device="cuda")
    expected, _ = model(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            y, (h, c) = model(x)
            (y.sum() + h.sum() + c.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend", ["persistent", "cluster"])
def test_bidirectional_directions_on_two_streams_match_one_stream(backend, monkeypatch):
    """fastlstm/directions.py runs the reverse direction on a side stream (forward and backward):
    the same kernels, so the same results as one stream, also when called from a non-default
    stream, without host synchronisation."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(8, 40, num_layers=2, bidirectional=True, device="cuda", dtype=torch.float64,
                          backend=backend)
    x = torch.randn(30, 4, 8, device="cuda", dtype=torch.float64)
    assert fastlstm.directions.concurrent(x, backend)
    assert "the two directions run concurrently, on two CUDA streams" in fastlstm.explain(model, x)

    def run():
        leaf = x.clone().requires_grad_()
        y, (h, c) = model(leaf)
        (y.square().sum() + h.sum() + c.sum()).backward()
        results = [y.detach(), h.detach(), c.detach(), leaf.grad] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return results

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            two_streams = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    monkeypatch.setenv("FASTLSTM_CONCURRENT_DIRECTIONS", "0")
    assert not fastlstm.directions.concurrent(x, backend)
    one_stream = run()
    for a, b in zip(two_streams, one_stream):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_any_device_index():
    cpu = fastlstm.LSTM(5, 9, dtype=torch.float64)
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    y_ref, _ = cpu(x)
    model = copy.deepcopy(cpu).to("cuda:1")
    y, (h, c) = model(x.to("cuda:1"))
    assert y.device == h.device == c.device == torch.device("cuda:1")
    assert_close(y.cpu(), y_ref, torch.float64, "cuda:1")


def test_persistent_refuses_what_does_not_fit_with_a_clear_error():
    model = fastlstm.LSTM(8, 8192, device="cuda", dtype=torch.float64, backend="persistent")
    with pytest.raises(RuntimeError, match="persistent"):
        model(torch.randn(3, 2, 8, device="cuda", dtype=torch.float64))


def test_explain_names_the_backend():
    model = fastlstm.LSTM(8, 256, device="cuda")
    x = torch.randn(10, 4, 8, device="cuda")
    assert fastlstm.explain(model, x).startswith("stepwise")
    assert fastlstm.explain(model, x, backend="persistent").startswith("persistent")


def test_mixed_devices_raise_like_torch():
    model = fastlstm.LSTM(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        model(torch.randn(3, 2, 4))
    with pytest.raises(RuntimeError, match="Input and hidden tensors are not at the same device"):
        model(torch.randn(3, 2, 4, device="cuda"), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)))


def test_lstm_cell_on_cuda():
    ref = nn.LSTMCell(6, 7, dtype=torch.float64)
    cell = fastlstm.LSTMCell.from_torch(copy.deepcopy(ref)).cuda()
    x = torch.randn(3, 6, dtype=torch.float64)
    h_ref, c_ref = ref(x)
    h, c = cell(x.cuda())
    assert_close(h.cpu(), h_ref.detach(), torch.float64, "cell h")
    assert_close(c.cpu(), c_ref.detach(), torch.float64, "cell c")
