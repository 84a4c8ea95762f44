"""Small CUDA cases for compute-sanitizer (memcheck, racecheck), run by gpu_check.py.

Each case runs forward and backward of a fastlstm layer on both CUDA backends with sizes chosen to
hit the edges of the kernels' tiling: H not a multiple of 32, B=1, batches wider than one
persistent batch tile, packed (padded) batches, checkpointing and the reverse direction.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python3 benchmarks/sanitizer_cases.py

(Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past
a tensor's end instead of landing in a neighbour inside one cached block.)
"""

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm.dispatch import persistent_support

CASES = [  # (T, B, input_size, hidden_size, extra module options); the slowest under a sanitizer last
    (4, 1, 3, 33, {}),
    (6, 5, 8, 40, {"bidirectional": True, "checkpoint_every": 2, "tbptt_chunk": 3, "grad_clip": 0.5,
                   "record_grad_norms": True}),
    (5, 7, 9, 257, {"bidirectional": True}),
    (3, 70, 16, 1024, {}),
]


def run(T: int, B: int, I: int, H: int, options: dict, backend: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = fastlstm.LSTM(I, H, device="cuda", dtype=dtype, backend=backend, **options)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    y, (h, c) = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
    (y.data.float().square().sum() + h.float().sum() + c.float().sum()).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all(), (T, B, I, H, options, backend, dtype)


def main() -> None:
    for T, B, I, H, options in CASES:
        for backend in ["stepwise", "persistent"]:
            for dtype in [torch.float32, torch.bfloat16]:
                ok, why = persistent_support(H, B, dtype, torch.device("cuda"))
                if backend == "persistent" and not ok:
                    print(f"skip persistent T={T} B={B} H={H} {dtype}: {why}")
                    continue
                run(T, B, I, H, options, backend, dtype)
                print(f"ok {backend} T={T} B={B} I={I} H={H} {dtype} {options}", flush=True)


if __name__ == "__main__":
    main()
