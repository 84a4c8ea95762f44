// The LSTM cell, one element at a time: the math shared by the CPU and CUDA kernels.
//
// Everything here is a pure function of its arguments, generic over the value type V so the CPU
// kernel can instantiate it with at::vec::Vectorized and the CUDA kernels with float or double.
// Gate order and formulas follow torch.nn.LSTM exactly (i, f, g, o), see DESIGN.md section 1.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTLSTM_HD __host__ __device__ __forceinline__
#else
#define FASTLSTM_HD inline
#endif

namespace fastlstm {

// The few elementwise functions the cell needs. The CPU kernel adds a specialisation for its
// vector type; a traits struct (not overloads) so it can be declared after these templates.
template <class V>
struct Math;

template <>
struct Math<float> {
  static FASTLSTM_HD float exp(float x) { return ::expf(x); }
  static FASTLSTM_HD float tanh(float x) { return ::tanhf(x); }
  // NaN passes through (comparisons with NaN are false), as torch.clamp does.
  static FASTLSTM_HD float clamp(float x, float c) { return x < -c ? -c : (x > c ? c : x); }
};

template <>
struct Math<double> {
  static FASTLSTM_HD double exp(double x) { return ::exp(x); }
  static FASTLSTM_HD double tanh(double x) { return ::tanh(x); }
  static FASTLSTM_HD double clamp(double x, double c) { return x < -c ? -c : (x > c ? c : x); }
};

template <class V>
FASTLSTM_HD V sigmoid(V x) {
  return V(1) / (V(1) + Math<V>::exp(V(0) - x));
}

// Forward of one cell element. g_* are the gate pre-activations
// G = x W_ih^T + b_ih + r_{t-1} W_hh^T + b_hh; the activated gates are returned for the backward.
template <class V>
FASTLSTM_HD void cell_forward(V g_i, V g_f, V g_g, V g_o, V c_prev, V& i, V& f, V& g, V& o, V& c,
                              V& h) {
  i = sigmoid(g_i);
  f = sigmoid(g_f);
  g = Math<V>::tanh(g_g);
  o = sigmoid(g_o);
  c = f * c_prev + i * g;
  h = o * Math<V>::tanh(c);
}

// Backward of one cell element.
//   dh       total gradient reaching h_t (layer output + recurrent carry)
//   dc_carry gradient reaching c_t from step t+1, already truncated/clipped by the caller
// Returns the gate pre-activation gradients, the total gradient reaching c_t (for diagnostics)
// and the raw gradient c_t sends to c_{t-1}.
template <class V>
FASTLSTM_HD void cell_backward(V i, V f, V g, V o, V c, V c_prev, V dh, V dc_carry, V& dg_i,
                               V& dg_f, V& dg_g, V& dg_o, V& dc_total, V& dc_prev) {
  const V one(1);
  const V tc = Math<V>::tanh(c);
  dc_total = dc_carry + dh * o * (one - tc * tc);
  dg_i = dc_total * g * i * (one - i);
  dg_f = dc_total * c_prev * f * (one - f);
  dg_g = dc_total * i * (one - g * g);
  dg_o = dh * tc * o * (one - o);
  dc_prev = dc_total * f;
}

// ---- What happens to the gradient a step receives through the state (DESIGN.md sections 4-5) ----
//
// Steps are counted per sequence in processing order: s = t for the forward direction and
// s = n - 1 - t for the reverse direction, where n is the sequence's length. Step s receives the
// carry sent back by step s + 1, except the last step (s = n - 1), which receives dL/dh_n and
// dL/dc_n unchanged. With truncated BPTT of chunk k the carry into step s is zero when s + 1 is a
// multiple of k (the gradient is cut between s + 1 and s). Otherwise it is clamped to
// [-clip, clip] when recurrent clipping is on.
// segment_end: step s + 1 starts a new segment (a per-sample reset, below), so no gradient
// crosses from it to step s.
enum CarryKind : int { kCarryFinal = 0, kCarryCut = 1, kCarryStep = 2 };

FASTLSTM_HD int carry_kind(int64_t s, int64_t n, int64_t tbptt_chunk, bool segment_end = false) {
  if (s == n - 1) return kCarryFinal;
  if (segment_end || (tbptt_chunk > 0 && (s + 1) % tbptt_chunk == 0)) return kCarryCut;
  return kCarryStep;
}

// ---- Per-sample state resets ----
//
// reset is a (T, B) row-major bool array, or null. reset[t][b] starts a new segment of row b at
// time t: the forward direction's state entering time t is zero, and so is the reverse
// direction's state entering time t - 1 (the step it processes after t). The first segment in
// processing order starts from the given initial state, so reset[0][b] changes nothing, and
// neither does a reset on padding (t >= n, the row's length). The consumer zeroes the cell state
// it reads; the hidden state is zeroed by its producer (the step before), so the products with
// W_hh (step GEMMs included) read zeros.

// Whether the state entering the step at time t of row b (length n) is zero.
FASTLSTM_HD bool state_zeroed_before(const bool* reset, int64_t B, int64_t b, int64_t t, int64_t n, bool reverse) {
  const int64_t at = reverse ? t + 1 : t;  // the time whose reset cuts the state entering t
  return reset != nullptr && at > 0 && at < n && reset[at * B + b];
}

// Whether the state the step at time t hands on is zeroed before the next step reads it.
FASTLSTM_HD bool state_zeroed_after(const bool* reset, int64_t B, int64_t b, int64_t t, int64_t n, bool reverse) {
  return state_zeroed_before(reset, B, b, reverse ? t - 1 : t + 1, n, reverse);
}

// Whether row b holds a real element at time t (false on the padding of a packed batch).
FASTLSTM_HD bool row_live(const int64_t* lengths, int64_t b, int64_t t) { return lengths == nullptr || t < lengths[b]; }

// The length of row b: lengths[b], or T without padding.
FASTLSTM_HD int64_t row_length(const int64_t* lengths, int64_t b, int64_t T) { return lengths ? lengths[b] : T; }

// Step index of time t in a sequence of length n, in the direction's processing order.
FASTLSTM_HD int64_t step_of_time(int64_t t, int64_t n, bool reverse) { return reverse ? n - 1 - t : t; }

// clip <= 0 means no clipping.
template <class V, class S>
FASTLSTM_HD V receive_carry(V raw, int kind, S clip_recurrent) {
  if (kind == kCarryCut) return V(0);
  if (kind == kCarryStep && clip_recurrent > S(0)) return Math<V>::clamp(raw, V(clip_recurrent));
  return raw;
}

template <class V, class S>
FASTLSTM_HD V clip_gate_grad(V dg, S clip_gates) {
  return clip_gates > S(0) ? Math<V>::clamp(dg, V(clip_gates)) : dg;
}

}  // namespace fastlstm
