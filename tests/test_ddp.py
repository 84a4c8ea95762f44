"""fastlstm.LSTM under DistributedDataParallel (gloo, CPU, 2 processes): gradients are all-reduced correctly."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastlstm
from reference import assert_close

F64 = torch.float64
WORLD = 2
T, B_PER_RANK, I, H = 5, 3, 3, 4


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastlstm.LSTM(I, H, num_layers=2, bidirectional=True, dtype=F64)
        self.head = nn.Linear(2 * H, 1, dtype=F64)

    def forward(self, x):
        y, (h, _) = self.lstm(x)
        return self.head(y).squeeze(-1), h


def _model():
    torch.manual_seed(17)
    return Model()


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, B_PER_RANK, I, generator=g, dtype=F64), torch.randn(T, B_PER_RANK, generator=g, dtype=F64)


def _loss(model, x, target):
    out, h = model(x)
    return (out - target).square().mean() + h.square().mean()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    fastlstm._extension._C.set_poison_buffers(True)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if rank == 1:  # DDP must broadcast rank 0's parameters
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        ddp = nn.parallel.DistributedDataParallel(model)
        _loss(ddp, *_data(rank)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # Single process: the mean over ranks of each rank's loss (equal batch sizes = the mean loss of all data).
    model = _model()
    loss = sum(_loss(model, *_data(r)) for r in range(WORLD)) / WORLD
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert set(results[0]["grads"]) == set(expected)
    assert any(n.startswith("lstm.") for n in expected)
    for n, e in expected.items():
        assert e.abs().max() > 0, n
        for r in range(WORLD):
            assert torch.equal(results[r]["params"][n], model.get_parameter(n).detach()), (r, n)
            assert_close(results[r]["grads"][n], e, F64, f"rank {r} grad {n}")
        assert torch.equal(results[0]["grads"][n], results[1]["grads"][n]), n
