import pytest
import torch

import fastlstm
from fastlstm import _extension


@pytest.fixture(autouse=True)
def poisoned_buffers():
    """Every kernel buffer starts as NaN, so an element a kernel forgets to write fails a test."""
    _extension._C.set_poison_buffers(True)
    yield
    _extension._C.set_poison_buffers(False)


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available() and fastlstm.cuda_compiled()
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a build with the CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not gpu:
            item.add_marker(skip)
