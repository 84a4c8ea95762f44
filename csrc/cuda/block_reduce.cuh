// Deterministic sums across a thread block (fixed reduction order, no atomics).
#pragma once

namespace fastlstm::cuda {

// Sum over the warp, valid in lane 0.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the warp, valid in every lane.
template <class T>
__device__ __forceinline__ T warp_allsum(T v) {
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// Sums a and b over the block; the totals are valid in thread 0. blockDim.x must be a multiple
// of 32 and at most 1024; every thread of the block must call it.
template <class T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T partial[2][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? partial[0][lane] : T(0);
    b = lane < warps ? partial[1][lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

}  // namespace fastlstm::cuda
