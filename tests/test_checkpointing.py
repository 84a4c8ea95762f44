"""``checkpoint_every=k``: the same results as the full mode, with activation memory O(T/k + k).

Results: float64, every output and gradient within 1e-10 (relative to the largest magnitude) of
the same module without checkpointing, and of torch.nn.LSTM (tests/reference.py's oracle).

Memory: the bytes of the tensors one ``fastlstm.LSTM`` call saves for its backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once). See ``test_saved_activation_memory``
for exactly what is asserted.
"""

from __future__ import annotations

import pytest
import torch

import fastlstm
from reference import Case, assert_close, compare_with_torch
from long_sequence_reference import (F64, assert_all_close, device_results, fast_run, loss_of, make_data, make_model,
                                     results)


def _same_as_full(model: fastlstm.LSTM, every: int, T: int, B: int, packed: bool, **call) -> None:
    data = make_data(model, T, B, packed)
    x, h0, c0, lengths = data
    full = results(lambda: fast_run(model, x, h0, c0, lengths, checkpoint_every=None, **call), model, x, h0, c0)
    ckpt = results(lambda: fast_run(model, x, h0, c0, lengths, checkpoint_every=every, **call), model, x, h0, c0)
    assert_all_close(ckpt, full, f"{model!r} checkpoint_every={every} packed={packed} {call}")
    # The forward is computed the same way step by step: outputs are bit-identical.
    assert torch.equal(ckpt["output"], full["output"])
    assert torch.equal(ckpt["h_n"], full["h_n"]) and torch.equal(ckpt["c_n"], full["c_n"])


CONFIGS = [dict(num_layers=1), dict(num_layers=2, bidirectional=True), dict(num_layers=2, bidirectional=True,
                                                                            proj_size=3, H=6)]
CONFIG_IDS = ["1layer", "2layers-bi", "2layers-bi-proj"]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("every", [1, 3, 4, 10, 11, 100])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_checkpointing_equals_full_mode(packed, every, config):
    # T = 10: k = 3 and 4 leave a short last chunk, 10 is one chunk, 11 and 100 exceed T.
    _same_as_full(make_model(**config), every, T=10, B=3, packed=packed)


@pytest.mark.parametrize("every", [1, 4, 64])
def test_checkpointing_against_torch(every):
    # (The 2-layer bidirectional packed projection case is test_parity's checkpointing test.)
    compare_with_torch(Case(num_layers=1, given_state=True, T=10, hidden_size=19), F64, checkpoint_every=every)


def test_checkpointing_module_option_and_float32():
    model = make_model(2, True, checkpoint_every=4)
    ref = make_model(2, True)
    ref.load_state_dict(model.state_dict())
    x, h0, c0, _ = make_data(model, 9, 2, False)
    a = results(lambda: fast_run(model, x, h0, c0, None), model, x, h0, c0)
    b = results(lambda: fast_run(ref, x, h0, c0, None), ref, x, h0, c0)
    assert_all_close(a, b, "module option")
    a = device_results(model, (x, h0, c0, None), dtype=torch.float32)
    b = device_results(ref, (x, h0, c0, None), dtype=torch.float32)
    assert_all_close(a, b, "float32", dtype=torch.float32)


def test_checkpointing_with_every_other_option():
    model = make_model(2, True, tbptt_chunk=3, grad_clip=0.05, record_grad_norms=True)
    x, h0, c0, lengths = make_data(model, 10, 3, True)
    full = results(lambda: fast_run(model, x, h0, c0, lengths), model, x, h0, c0)
    y, h, c = fast_run(model, x, h0, c0, lengths)
    loss_of(y, h, c).backward()
    norms_full = model.grad_norms
    ckpt = results(lambda: fast_run(model, x, h0, c0, lengths, checkpoint_every=4), model, x, h0, c0)
    assert_all_close(ckpt, full, "tbptt + clip + norms")
    y, h, c = fast_run(model, x, h0, c0, lengths, checkpoint_every=4)
    loss_of(y, h, c).backward()
    assert_close(model.grad_norms.h, norms_full.h, F64, "norms h")
    assert_close(model.grad_norms.c, norms_full.c, F64, "norms c")


def test_invalid_checkpoint_every():
    with pytest.raises(ValueError, match="checkpoint_every"):
        make_model(checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_every"):
        make_model(checkpoint_every=True)


# ---------------------------------------------------------------------------------------------
# Activation memory
# ---------------------------------------------------------------------------------------------

def saved_storages(fn):
    """(bytes of each storage that fn() saved for backward, keyed by storage address; fn's result)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return seen, result


def saved_bytes(model: fastlstm.LSTM, T: int, B: int, **call) -> dict[str, int]:
    """Bytes saved for backward by one call, split into the call's input/output and the rest.

    Each storage is counted once (several saved tensors may share one). "io" are the storages of
    the input x and of the output y: the caller holds those anyway and they are O(T) in every
    mode. "activations" is everything else the call saved: parameters (O(1)), and the per-step
    gates and cell states (full mode, O(T)) or the per-chunk checkpoints (O(T / k)).
    """
    x = torch.randn(T, B, model.input_size, requires_grad=True)
    seen, (y, _) = saved_storages(lambda: model(x, **call))
    io = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    assert io <= set(seen), "x and y are saved for the backward in both modes"
    return {"io": sum(n for p, n in seen.items() if p in io),
            "activations": sum(n for p, n in seen.items() if p not in io)}


def test_saved_activation_memory():
    """What is asserted, with T = 4096, k = 64, B = 2, I = 4, H = 32, float32:

    1. Same "io" bytes in both modes (x and y are saved in both; they are O(T) but they are the
       call's own input and output).
    2. Checkpointed activations < 1/8 of the full mode's (the saved gates and cell states of
       every step are replaced by one (h, c) pair per chunk: expected ratio about 2/(5k), here
       with the O(1) parameters still about 1/100).
    3. Doubling T doubles the full mode's activations (within 5%): they are O(T).
    4. Doubling T adds to the checkpointed activations less than 1/16 of what it adds in the
       full mode: they grow only by the T/k extra checkpoints (O(T/k)), not by O(T).
    5. The checkpointed activations fit a budget of (T/k) checkpoints of (h, c) plus the
       parameters, each at most twice: nothing else of size O(T) or O(T * H) is kept. (The O(k)
       work buffers of the chunk being recomputed live only inside the backward kernel.)
    """
    k, B, T = 64, 2, 4096
    model = fastlstm.LSTM(4, 32)
    H = model.hidden_size
    full = saved_bytes(model, T, B)
    ckpt = saved_bytes(model, T, B, checkpoint_every=k)
    full2 = saved_bytes(model, 2 * T, B)
    ckpt2 = saved_bytes(model, 2 * T, B, checkpoint_every=k)
    print(f"\nsaved bytes  T={T}: full {full}  checkpointed {ckpt}\n"
          f"             T={2 * T}: full {full2}  checkpointed {ckpt2}")

    assert ckpt["io"] == full["io"] and ckpt2["io"] == full2["io"]                      # 1
    assert ckpt["activations"] < full["activations"] / 8                                # 2
    assert 1.95 < full2["activations"] / full["activations"] < 2.05                     # 3
    full_growth = full2["activations"] - full["activations"]
    assert ckpt2["activations"] - ckpt["activations"] < full_growth / 16                  # 4
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = 2 * ((2 * T // k) * B * 2 * H * 4 + params)
    assert ckpt2["activations"] <= budget                                                # 5


def test_saved_activation_memory_bidirectional_packed():
    # The same bound per layer and direction, with packed input and a projection.
    k, B, T = 32, 2, 1024
    model = fastlstm.LSTM(4, 32, 2, bidirectional=True, proj_size=8)
    lengths = torch.tensor([T, T - 5])

    def saved(every):
        x = torch.randn(T, B, 4)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        return sum(saved_storages(lambda: model(packed, checkpoint_every=every))[0].values())

    full, ckpt = saved(None), saved(k)
    # Full mode keeps 4H gates + H cell (+ K state for packed) per step per layer and direction;
    # checkpointing only the per-layer outputs (O(T * K), needed by the next layer and dW) and
    # one (h, c) pair per chunk.
    assert ckpt < full / 8, (ckpt, full)  # measured: about 1/11
