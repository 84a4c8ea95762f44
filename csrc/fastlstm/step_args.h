// Arguments of the per-step pointwise kernels: raw row-major pointers, one struct per kernel.
//
// scalar_t is the tensor dtype (inputs, weights, outputs, gate gradients); acc_t is the type the
// cell works in (float for float/half/bfloat16, double for double): gates, cell state and the
// gradient carries. `lengths` is null for unpacked input; otherwise a row b is padded at time t
// when t >= lengths[b] and its state passes through the step unchanged. `reset` (T, B) is null,
// or the per-sample state resets of cell_math.h.
#pragma once

#include <cstdint>

namespace fastlstm {

template <class scalar_t, class acc_t>
struct ForwardCellArgs {
  acc_t* gates;             // (B, 4H) x W_ih^T + h W_hh^T in, activations i, f, g, o out
  const scalar_t* bias;     // (4H) b_ih + b_hh, added to the gates, or null
  const acc_t* c_prev;      // (B, H)
  acc_t* c_next;            // (B, H) may not alias c_prev
  const scalar_t* h_prev;   // (B, H) state before the step; read only when h_state is set
  scalar_t* h_out;          // (B, H) h_t: the layer output y_t, or the projection's input
  scalar_t* h_state;        // (B, H) carried state when it differs from h_out (padding, resets), or null
  const int64_t* lengths;   // (B) or null
  const bool* reset;        // (T, B) or null; zeroes h_state (the caller sets it) and c_prev
  int64_t t, T, B, H;
  bool reverse;
};

template <class scalar_t, class acc_t>
struct BackwardCellArgs {
  const acc_t* gates;       // (B, 4H) activations saved by the forward
  const acc_t* c;           // (B, H) c_t
  const acc_t* c_prev;      // (B, H) c_{t-1}
  const scalar_t* dy;       // (B, H) dL/dy_t, or null (no output gradient, or projection layer)
  // Without projection: the raw carry from step t+1 in; out: what skips this step (the carry of
  // padded rows, zero for the others), to which the caller adds dG_t W_hh. With projection: the
  // total dL/dh_t, read only (dh_pass is then null).
  const acc_t* dh_in;
  acc_t* dh_pass;
  acc_t* dc;                // (B, H) raw carry of dL/dc from step t+1 in, raw carry to step t-1 out
  scalar_t* dgates;         // (B, 4H) dL/dG_t out
  acc_t* norm_partial;      // (2, B, tiles) squared norms of dL/dh_t and dL/dc_t, or null
  const int64_t* lengths;   // (B) or null
  const bool* reset;        // (T, B) or null
  int64_t t, T, B, H;
  bool reverse;
  int64_t tbptt_chunk;      // 0: off
  acc_t clip_recurrent;     // 0: off
  acc_t clip_gates;         // 0: off
};

// Projection layers, step 1 of the backward: dL/dr_t = dL/dy_t + received carry.
template <class scalar_t, class acc_t>
struct BackwardProjArgs {
  const scalar_t* dy;       // (B, P) or null
  acc_t* dr_carry;          // (B, P) raw carry in; out: what skips this step (padded rows)
  scalar_t* dr_total;       // (B, P) dL/dr_t out (zero on padded rows)
  const int64_t* lengths;
  const bool* reset;
  int64_t t, T, B, P;
  bool reverse;
  int64_t tbptt_chunk;
  acc_t clip_recurrent;
};

// Projection layers with padded rows or resets: the state r_t = y_t on live rows, r_{t-1} on
// padded ones, zero where the next step starts a new segment.
template <class scalar_t>
struct StateSelectArgs {
  const scalar_t* y;        // (B, P) this step's output (already zero on padded rows)
  const scalar_t* r_prev;   // (B, P)
  scalar_t* r_next;         // (B, P)
  const int64_t* lengths;
  const bool* reset;
  int64_t t, T, B, P;
  bool reverse;
};

struct BackwardOptions {
  int64_t tbptt_chunk = 0;   // 0: full BPTT
  double clip_recurrent = 0; // 0: off
  double clip_gates = 0;     // 0: off
  bool record_norms = false;
  bool input_grad = true;    // false: dL/dx is not needed and not computed
};

// Arguments of a policy's fused whole-chunk recurrence (persistent CUDA kernels, fused CPU
// recurrence): slot(t) = base + (t - tlo).
template <class scalar_t, class acc_t>
struct ChunkRecurrenceArgs {
  acc_t* gates;             // forward: x W_ih^T in, activations out; backward: read
  const scalar_t* bias;     // (4H) or null, added by the forward
  acc_t* c;                 // cell state after each step
  scalar_t* r;              // hidden state after each step (aliases y without padding)
  scalar_t* y;              // layer output
  const scalar_t* w_hh;     // (4H, H)
  const scalar_t* r_init;   // state before the chunk's first step
  const acc_t* c_init;
  const int64_t* lengths;
  const bool* reset;        // (T, B) or null; r then does not alias y
  int64_t s0, n, tlo, T, B, H;
  bool reverse;
  // forward, where the policy's kernel computes x W_ih^T itself (Recurrent::projects_input; else
  // null, and gates holds it on entry): the layer input (T, B, I) and W_ih (4H, I)
  const scalar_t* x;
  const scalar_t* w_ih;
  int64_t I;
  // backward only
  const scalar_t* dy;       // full (T, B, H) or null
  scalar_t* dgates;         // slot-indexed like gates
  acc_t* carry_h;           // (B, H) raw carries, in and out
  acc_t* carry_c;
  acc_t* norm_partial;      // (T, 2, Policy::norm_rows, tiles) or null
  BackwardOptions opts;
};

}  // namespace fastlstm
