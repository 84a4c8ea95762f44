// The per-step pointwise kernels on the CPU (lstm_cell_cpu.h), compiled once per SIMD level: one
// pass over a row's gates, vectorised with at::vec (SLEEF exp/tanh from AVX2 up), rows split
// across threads.
#include "../lstm_cell_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "vec_math.h"

namespace fastlstm::cpu::CPU_CAPABILITY {
namespace {

// Rows per task: enough elements that a thread's share outweighs the cost of waking it.
int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

template <class T>
T lane_sum(const at::vec::Vectorized<T>& v) {
  T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (T x : buf) s += x;
  return s;
}

template <class T>
void cell_forward(const ForwardCellArgs<T, T>& a) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = a.H;
  at::parallel_for(0, a.B, row_grain(4 * H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* g = a.gates + b * 4 * H;
      const T* cp = a.c_prev + b * H;
      T* cn = a.c_next + b * H;
      T* ho = a.h_out + b * H;
      T* hs = a.h_state ? a.h_state + b * H : nullptr;
      if (!row_live(a.lengths, b, a.t)) {
        std::fill(g, g + 4 * H, T(0));
        std::copy(cp, cp + H, cn);
        std::fill(ho, ho + H, T(0));
        if (hs) std::copy(a.h_prev + b * H, a.h_prev + (b + 1) * H, hs);
        continue;
      }
      const int64_t n_b = row_length(a.lengths, b, a.T);
      const bool zero_in = state_zeroed_before(a.reset, a.B, b, a.t, n_b, a.reverse);
      const bool zero_out = state_zeroed_after(a.reset, a.B, b, a.t, n_b, a.reverse);
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        V pre[4];
        for (int q = 0; q < 4; ++q) {
          pre[q] = V::loadu(g + q * H + j, n);
          if (a.bias) pre[q] = pre[q] + V::loadu(a.bias + q * H + j, n);
        }
        V i, f, gg, o, c, h;
        fastlstm::cell_forward(pre[0], pre[1], pre[2], pre[3], zero_in ? V(T(0)) : V::loadu(cp + j, n), i, f, gg, o,
                               c, h);
        i.store(g + j, n);
        f.store(g + H + j, n);
        gg.store(g + 2 * H + j, n);
        o.store(g + 3 * H + j, n);
        c.store(cn + j, n);
        h.store(ho + j, n);
        if (hs) (zero_out ? V(T(0)) : h).store(hs + j, n);
      }
    }
  });
}

template <class T>
void cell_backward(const BackwardCellArgs<T, T>& a) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = a.H, B = a.B;
  at::parallel_for(0, B, row_grain(8 * H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n_b = row_length(a.lengths, b, a.T);
      T* dg = a.dgates + b * 4 * H;
      T* dc = a.dc + b * H;
      if (a.t >= n_b) {
        // Padding: no gradient to the gates; the carries pass through the step untouched.
        std::fill(dg, dg + 4 * H, T(0));
        if (a.dh_pass && a.dh_pass != a.dh_in) std::copy(a.dh_in + b * H, a.dh_in + (b + 1) * H, a.dh_pass + b * H);
        if (a.norm_partial) a.norm_partial[b] = a.norm_partial[B + b] = T(0);
        continue;
      }
      const int kind = carry_kind(step_of_time(a.t, n_b, a.reverse), n_b, a.tbptt_chunk,
                                  state_zeroed_after(a.reset, B, b, a.t, n_b, a.reverse));
      const bool zero_in = state_zeroed_before(a.reset, B, b, a.t, n_b, a.reverse);
      const T* g = a.gates + b * 4 * H;
      const T* c = a.c + b * H;
      const T* cp = a.c_prev + b * H;
      const T* dy = a.dy ? a.dy + b * H : nullptr;
      const T* dh_in = a.dh_in + b * H;
      V sum_h(0), sum_c(0);
      for (int64_t j = 0; j < H; j += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), H - j);
        V dh;
        if (a.dh_pass) {
          dh = receive_carry(V::loadu(dh_in + j, n), kind, a.clip_recurrent);
          if (dy) dh = dh + V::loadu(dy + j, n);
        } else {
          dh = V::loadu(dh_in + j, n);
        }
        const V dc_in = receive_carry(V::loadu(dc + j, n), kind, a.clip_recurrent);
        V dgi, dgf, dgg, dgo, dct, dcp;
        fastlstm::cell_backward(V::loadu(g + j, n), V::loadu(g + H + j, n), V::loadu(g + 2 * H + j, n),
                                V::loadu(g + 3 * H + j, n), V::loadu(c + j, n),
                                zero_in ? V(T(0)) : V::loadu(cp + j, n), dh, dc_in,
                                dgi, dgf, dgg, dgo, dct, dcp);
        clip_gate_grad(dgi, a.clip_gates).store(dg + j, n);
        clip_gate_grad(dgf, a.clip_gates).store(dg + H + j, n);
        clip_gate_grad(dgg, a.clip_gates).store(dg + 2 * H + j, n);
        clip_gate_grad(dgo, a.clip_gates).store(dg + 3 * H + j, n);
        dcp.store(dc + j, n);
        if (a.dh_pass) V(0).store(a.dh_pass + b * H + j, n);
        sum_h = sum_h + dh * dh;
        sum_c = sum_c + dct * dct;
      }
      if (a.norm_partial) {
        a.norm_partial[b] = lane_sum(sum_h);
        a.norm_partial[B + b] = lane_sum(sum_c);
      }
    }
  });
}

template <class T>
void proj_backward(const BackwardProjArgs<T, T>& a) {
  const int64_t P = a.P;
  at::parallel_for(0, a.B, row_grain(P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n_b = row_length(a.lengths, b, a.T);
      T* total = a.dr_total + b * P;
      T* carry = a.dr_carry + b * P;
      if (a.t >= n_b) {
        std::fill(total, total + P, T(0));
        continue;
      }
      const int kind = carry_kind(step_of_time(a.t, n_b, a.reverse), n_b, a.tbptt_chunk,
                                  state_zeroed_after(a.reset, a.B, b, a.t, n_b, a.reverse));
      for (int64_t j = 0; j < P; ++j) {
        total[j] = receive_carry(carry[j], kind, a.clip_recurrent) + (a.dy ? a.dy[b * P + j] : T(0));
        carry[j] = T(0);
      }
    }
  });
}

template <class T>
void state_select(const StateSelectArgs<T>& a) {
  for (int64_t b = 0; b < a.B; ++b) {
    T* dst = a.r_next + b * a.P;
    if (state_zeroed_after(a.reset, a.B, b, a.t, row_length(a.lengths, b, a.T), a.reverse)) {
      std::fill(dst, dst + a.P, T(0));
      continue;
    }
    const T* src = row_live(a.lengths, b, a.t) ? a.y + b * a.P : a.r_prev + b * a.P;
    std::copy(src, src + a.P, dst);
  }
}

}  // namespace

template <class T>
const CellKernels<T>& cell_kernel_table() {
  static constexpr CellKernels<T> table{&cell_forward<T>, &cell_backward<T>, &proj_backward<T>, &state_select<T>};
  return table;
}

template const CellKernels<float>& cell_kernel_table<float>();
template const CellKernels<double>& cell_kernel_table<double>();

}  // namespace fastlstm::cpu::CPU_CAPABILITY
