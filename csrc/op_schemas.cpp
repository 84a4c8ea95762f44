// The fastlstm operator library's schemas, in one place. Device kernels register themselves:
// csrc/cpu/lstm_layer_cpu.cpp, csrc/cuda/lstm_layer_cuda.cpp. A file of its own so programs
// without Python (the CUDA execution harness, tests/cuda_emu) can link the same schemas.
#include <torch/library.h>

TORCH_LIBRARY(fastlstm, m) {
  // One layer and direction over a whole (padded) sequence. Returns
  // (y, h_n, c_n, saved_gates, saved_c, saved_r); the saved tensors feed layer_backward.
  // reset: (T, B) bool per-sample state resets, or None (csrc/fastlstm/cell_math.h).
  // checkpoint_every: 0 saves every step, k > 0 the state every k steps, -1 nothing (no backward).
  // tbptt_chunk, grad_clip, grad_clip_mode only affect the backward; norm_probe is an input whose
  // "gradient" is the per-step gradient norms (2, T) when record_norms is on.
  m.def(
      "layer_forward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? w_hr, Tensor h0, Tensor c0, "
      "Tensor? lengths, Tensor? reset, Tensor? norm_probe, bool reverse, int checkpoint_every, int tbptt_chunk, float grad_clip, "
      "str grad_clip_mode, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (dx, dw_ih, dw_hh, dbias, dw_hr, dh0, dc0, norms); dx, dbias, dw_hr, norms are empty
  // when input_grad is false, the layer has no bias, no projection, or records no norms.
  m.def(
      "layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, Tensor w_hh, "
      "Tensor? bias, Tensor? w_hr, Tensor h0, Tensor c0, Tensor? lengths, Tensor? reset, Tensor y, Tensor saved_gates, "
      "Tensor saved_c, Tensor saved_r, bool reverse, int checkpoint_every, int tbptt_chunk, float grad_clip, "
      "str grad_clip_mode, bool record_norms, bool input_grad, str backend) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}
