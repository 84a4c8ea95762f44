"""fastlstm.LSTM against torch.nn.LSTM on the CPU: outputs, final states and every gradient."""

import itertools

import pytest
import torch

from reference import Case, compare_with_torch

FLAGS = list(itertools.product([1, 2, 3], [True, False], [False, True], [False, True], [0, 4], [False, True],
                               ["batched", "unbatched", "noncontiguous", "packed"]))


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(map(str, f)))
def test_float64_every_flag_combination(flags):
    compare_with_torch(Case.from_flags(flags), torch.float64)


# float32 and the half types: every input kind and feature, fewer products.
REDUCED = [f for f in FLAGS if f[0] in (1, 2) and f[2] is False]


@pytest.mark.parametrize("flags", REDUCED, ids=lambda f: "-".join(map(str, f)))
def test_float32(flags):
    compare_with_torch(Case.from_flags(flags), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", [(2, True, False, True, 4, True, "packed"), (1, True, True, False, 0, False,
                                                                              "batched")],
                         ids=lambda f: "-".join(map(str, f)) if isinstance(f, tuple) else str(f))
def test_half_types(flags, dtype):
    compare_with_torch(Case.from_flags(flags), dtype)


@pytest.mark.parametrize("checkpoint_every", [1, 2, 4, 100])
@pytest.mark.parametrize("kind", ["batched", "packed"])
def test_checkpointing_gives_the_same_results(checkpoint_every, kind):
    case = Case(num_layers=2, bidirectional=True, proj_size=3, given_state=True, input_kind=kind, T=9)
    compare_with_torch(case, torch.float64, checkpoint_every=checkpoint_every)


@pytest.mark.parametrize("size", [(1, 1, 1, 1), (17, 1, 3, 33), (5, 8, 16, 64), (3, 2, 9, 130)])
def test_odd_sizes(size):
    T, B, I, H = size
    compare_with_torch(Case(T=T, B=B, input_size=I, hidden_size=H, given_state=True), torch.float64)
    compare_with_torch(Case(T=T, B=B, input_size=I, hidden_size=H, bidirectional=True), torch.float32)


@pytest.mark.parametrize("size", [(70, 9, 19, 37), (40, 16, 48, 32)])
def test_weight_gradients_over_many_rows(size):
    """630 and 640 rows: the weight gradients' reduction runs over several chunks of the CPU's
    in-place kernel (256 rows each, where it runs), 4H with and without a partial vector."""
    T, B, I, H = size
    compare_with_torch(Case(T=T, B=B, input_size=I, hidden_size=H, given_state=True), torch.float64)
    compare_with_torch(Case(T=T, B=B, input_size=I, hidden_size=H), torch.float32)
