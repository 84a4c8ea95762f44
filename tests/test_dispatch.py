"""fastlstm.dispatch: the batch the dispatcher asks the persistent kernel about, for every input form."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import dispatch


def test_batch_size_of_every_input_form():
    model = fastlstm.LSTM(4, 6)
    batch_first = fastlstm.LSTM(4, 6, batch_first=True)
    x = torch.randn(5, 3, 4)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 3]), enforce_sorted=False)
    assert packed.data.size(0) == 10  # what plan used to pass as the batch
    assert dispatch.batch_size(model, packed) == 3
    assert dispatch.batch_size(model, x) == 3
    assert dispatch.batch_size(batch_first, x.transpose(0, 1)) == 3
    assert dispatch.batch_size(model, x[:, 0]) == 1  # unbatched (L, input_size)


@pytest.mark.parametrize("form", ["packed", "padded", "batch_first", "unbatched"])
def test_plan_asks_the_persistent_kernel_about_the_padded_batch(form, monkeypatch):
    """plan() hands persistent_support the batch the kernels will run (a PackedSequence: its widest
    step, not its packed length). A meta-device input takes plan's CUDA branch without a GPU."""
    asked = []

    def fake_support(hidden_size, batch, dtype, device, proj_size=0):
        asked.append((hidden_size, batch, dtype, device.type))
        return True, "fits"

    monkeypatch.setattr(dispatch, "persistent_support", fake_support)
    model = fastlstm.LSTM(4, 6, batch_first=form == "batch_first")
    x = torch.randn(7, 3, 4)
    inputs = {
        "packed": pack_padded_sequence(x, torch.tensor([7, 1, 4]), enforce_sorted=False).to("meta"),
        "padded": x.to("meta"),
        "batch_first": x.transpose(0, 1).to("meta"),
        "unbatched": x[:, 0].to("meta"),
    }
    plan = dispatch.plan(model, inputs[form], backend="persistent")
    assert plan == dispatch.Plan("persistent", "fits")
    assert asked == [(6, 1 if form == "unbatched" else 3, torch.float32, "meta")]


def test_cluster_backend_is_opt_in(monkeypatch):
    """backend='cluster' asks cluster_support; 'auto' never picks it, even where it fits."""
    monkeypatch.setattr(dispatch, "persistent_support", lambda *a, **k: (True, "persistent fits"))
    monkeypatch.setattr(dispatch, "cluster_support", lambda *a, **k: (True, "cluster fits"))
    model = fastlstm.LSTM(4, 6)
    x = torch.randn(7, 3, 4, dtype=torch.bfloat16).to("meta")
    assert dispatch.plan(model, x, backend="cluster") == dispatch.Plan("cluster", "cluster fits")
    assert dispatch.plan(model, x, backend="auto").backend == "stepwise"
    assert dispatch.plan(model, torch.randn(7, 3, 4), backend="cluster").backend == "error"


def test_cluster_backend_names_the_kernel_that_runs(monkeypatch):
    """Where the cluster kernels cannot take a layer (cluster_fallback says why: float64, float32
    without TF32, W_hh beyond 16 blocks), backend='cluster' runs the persistent kernel, and the
    plan names it. The rule itself is C++, tested on the CUDA harness
    (test_layers.cpp: cluster_runs_float64_and_ieee_float32_on_the_persistent_kernel,
    cluster_too_large_runs_on_the_persistent_kernel)."""
    assert dispatch.cluster_fallback(6, 3, torch.float64, torch.device("cpu")) == ""  # CUDA devices only
    monkeypatch.setattr(dispatch, "cluster_support", lambda *a, **k: (True, "reason"))
    asked = []

    def fallback(hidden_size, batch, dtype, device):
        asked.append((hidden_size, batch, dtype, device.type))
        return "float64 stays on CUDA cores" if dtype == torch.float64 else ""

    monkeypatch.setattr(dispatch, "cluster_fallback", fallback)
    model = fastlstm.LSTM(4, 6)
    x = torch.randn(7, 3, 4)
    assert dispatch.plan(model, x.double().to("meta"), backend="cluster") == dispatch.Plan("persistent", "reason")
    assert dispatch.plan(model, x.bfloat16().to("meta"), backend="cluster") == dispatch.Plan("cluster", "reason")
    assert asked == [(6, 3, torch.float64, "meta"), (6, 3, torch.bfloat16, "meta")]
