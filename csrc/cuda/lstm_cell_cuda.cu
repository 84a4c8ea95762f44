// The per-step pointwise kernels on CUDA: one thread per (batch row, hidden unit), the cell math
// from cell_math.h, all four gates of a unit handled by the same thread.
#include "lstm_cell_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "../fastlstm/cell_math.h"
#include "block_reduce.cuh"
#include "launch.cuh"

namespace fastlstm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// One thread per column, a grid row per batch row (rows beyond kMaxGridY loop inside the kernel).
template <class Args>
void launch_pointwise(void (*kernel)(Args), const Args& a, int64_t cols, int64_t rows) {
  if (cols == 0 || rows == 0) return;
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min(rows, kMaxGridY)));
  FASTLSTM_LAUNCH(kernel, grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class scalar_t, class acc_t>
__global__ void cell_forward_kernel(const ForwardCellArgs<scalar_t, acc_t> a) {
  const int64_t H = a.H, j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    acc_t* g = a.gates + b * 4 * H;
    const int64_t e = b * H + j;
    if (!row_live(a.lengths, b, a.t)) {
      g[j] = g[H + j] = g[2 * H + j] = g[3 * H + j] = acc_t(0);
      a.c_next[e] = a.c_prev[e];
      a.h_out[e] = scalar_t(0);
      if (a.h_state) a.h_state[e] = a.h_prev[e];
      continue;
    }
    const int64_t n_b = row_length(a.lengths, b, a.T);
    acc_t pre[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      pre[q] = g[q * H + j];
      if (a.bias) pre[q] += static_cast<acc_t>(a.bias[q * H + j]);
    }
    acc_t i, f, gg, o, c, h;
    const acc_t c_in = state_zeroed_before(a.reset, a.B, b, a.t, n_b, a.reverse) ? acc_t(0) : a.c_prev[e];
    fastlstm::cell_forward<acc_t>(pre[0], pre[1], pre[2], pre[3], c_in, i, f, gg, o, c, h);
    g[j] = i;
    g[H + j] = f;
    g[2 * H + j] = gg;
    g[3 * H + j] = o;
    a.c_next[e] = c;
    a.h_out[e] = static_cast<scalar_t>(h);
    if (a.h_state) {
      a.h_state[e] = state_zeroed_after(a.reset, a.B, b, a.t, n_b, a.reverse) ? scalar_t(0) : static_cast<scalar_t>(h);
    }
  }
}

template <class scalar_t, class acc_t>
__global__ void cell_backward_kernel(const BackwardCellArgs<scalar_t, acc_t> a) {
  const int64_t H = a.H, j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool in_range = j < H;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const int64_t n_b = row_length(a.lengths, b, a.T);
    const bool live = a.t < n_b;
    const int64_t e = b * H + j;
    acc_t sum_h = 0, sum_c = 0;
    if (in_range && !live) {
      scalar_t* dg = a.dgates + b * 4 * H;
      dg[j] = dg[H + j] = dg[2 * H + j] = dg[3 * H + j] = scalar_t(0);
      if (a.dh_pass && a.dh_pass != a.dh_in) a.dh_pass[e] = a.dh_in[e];
    } else if (in_range) {
      const int kind = carry_kind(step_of_time(a.t, n_b, a.reverse), n_b, a.tbptt_chunk,
                                  state_zeroed_after(a.reset, a.B, b, a.t, n_b, a.reverse));
      const acc_t c_prev = state_zeroed_before(a.reset, a.B, b, a.t, n_b, a.reverse) ? acc_t(0) : a.c_prev[e];
      const acc_t* g = a.gates + b * 4 * H;
      acc_t dh;
      if (a.dh_pass) {
        dh = receive_carry(a.dh_in[e], kind, a.clip_recurrent);
        if (a.dy) dh += static_cast<acc_t>(a.dy[e]);
      } else {
        dh = a.dh_in[e];
      }
      const acc_t dc_in = receive_carry(a.dc[e], kind, a.clip_recurrent);
      acc_t dgi, dgf, dgg, dgo, dct, dcp;
      fastlstm::cell_backward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], a.c[e], c_prev, dh, dc_in, dgi, dgf,
                                     dgg, dgo, dct, dcp);
      scalar_t* dg = a.dgates + b * 4 * H;
      dg[j] = static_cast<scalar_t>(clip_gate_grad(dgi, a.clip_gates));
      dg[H + j] = static_cast<scalar_t>(clip_gate_grad(dgf, a.clip_gates));
      dg[2 * H + j] = static_cast<scalar_t>(clip_gate_grad(dgg, a.clip_gates));
      dg[3 * H + j] = static_cast<scalar_t>(clip_gate_grad(dgo, a.clip_gates));
      a.dc[e] = dcp;
      if (a.dh_pass) a.dh_pass[e] = acc_t(0);
      sum_h = dh * dh;
      sum_c = dct * dct;
    }
    if (a.norm_partial) {  // uniform across the block: every thread reaches the reduction
      block_sum2(sum_h, sum_c);
      if (threadIdx.x == 0) {
        const int64_t tiles = gridDim.x;
        a.norm_partial[b * tiles + blockIdx.x] = sum_h;
        a.norm_partial[(a.B + b) * tiles + blockIdx.x] = sum_c;
      }
      __syncthreads();  // the reduction's shared memory is reused for the next row
    }
  }
}

template <class scalar_t, class acc_t>
__global__ void proj_backward_kernel(const BackwardProjArgs<scalar_t, acc_t> a) {
  const int64_t P = a.P, j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= P) return;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const int64_t n_b = row_length(a.lengths, b, a.T);
    const int64_t e = b * P + j;
    if (a.t >= n_b) {
      a.dr_total[e] = scalar_t(0);
      continue;
    }
    const int kind = carry_kind(step_of_time(a.t, n_b, a.reverse), n_b, a.tbptt_chunk,
                                state_zeroed_after(a.reset, a.B, b, a.t, n_b, a.reverse));
    acc_t total = receive_carry(a.dr_carry[e], kind, a.clip_recurrent);
    if (a.dy) total += static_cast<acc_t>(a.dy[e]);
    a.dr_total[e] = static_cast<scalar_t>(total);
    a.dr_carry[e] = acc_t(0);
  }
}

template <class scalar_t>
__global__ void state_select_kernel(const StateSelectArgs<scalar_t> a) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.P) return;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const int64_t e = b * a.P + j;
    if (state_zeroed_after(a.reset, a.B, b, a.t, row_length(a.lengths, b, a.T), a.reverse)) {
      a.r_next[e] = scalar_t(0);
    } else {
      a.r_next[e] = row_live(a.lengths, b, a.t) ? a.y[e] : a.r_prev[e];
    }
  }
}

}  // namespace

int64_t cell_norm_tiles(int64_t H) { return std::max<int64_t>(1, (H + kThreads - 1) / kThreads); }

template <class scalar_t, class acc_t>
void cell_forward(const ForwardCellArgs<scalar_t, acc_t>& a) {
  launch_pointwise(&cell_forward_kernel<scalar_t, acc_t>, a, a.H, a.B);
}

template <class scalar_t, class acc_t>
void cell_backward(const BackwardCellArgs<scalar_t, acc_t>& a) {
  launch_pointwise(&cell_backward_kernel<scalar_t, acc_t>, a, a.H, a.B);
}

template <class scalar_t, class acc_t>
void proj_backward(const BackwardProjArgs<scalar_t, acc_t>& a) {
  launch_pointwise(&proj_backward_kernel<scalar_t, acc_t>, a, a.P, a.B);
}

template <class scalar_t>
void state_select(const StateSelectArgs<scalar_t>& a) {
  launch_pointwise(&state_select_kernel<scalar_t>, a, a.P, a.B);
}

#define FASTLSTM_INSTANTIATE(S, A)                                       \
  template void cell_forward<S, A>(const ForwardCellArgs<S, A>&);       \
  template void cell_backward<S, A>(const BackwardCellArgs<S, A>&);     \
  template void proj_backward<S, A>(const BackwardProjArgs<S, A>&);     \
  template void state_select<S>(const StateSelectArgs<S>&);
FASTLSTM_INSTANTIATE(float, float)
FASTLSTM_INSTANTIATE(double, double)
FASTLSTM_INSTANTIATE(c10::Half, float)
FASTLSTM_INSTANTIATE(c10::BFloat16, float)
#undef FASTLSTM_INSTANTIATE

}  // namespace fastlstm::cuda
