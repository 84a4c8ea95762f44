// The fastlstm operator library: schemas (one place), and the Python module that loads them.
// Device kernels register themselves: csrc/cpu/lstm_layer_cpu.cpp, csrc/cuda/lstm_layer_cuda.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include <map>
#include <string>
#include <tuple>

#include "fastlstm/buffers.h"
#include "fastlstm/build_info.h"
#ifdef FASTLSTM_WITH_CUDA
#include "cuda/persistent_support.h"
#endif

namespace {

// For fastlstm.explain: whether the persistent CUDA kernels can run a layer, and why (not).
std::tuple<bool, std::string> persistent_support(int64_t hidden_size, int64_t batch, const std::string& dtype,
                                                 int64_t device) {
#ifdef FASTLSTM_WITH_CUDA
  static const std::map<std::string, c10::ScalarType> types = {
      {"float32", c10::kFloat}, {"float64", c10::kDouble}, {"float16", c10::kHalf}, {"bfloat16", c10::kBFloat16}};
  const auto it = types.find(dtype);
  if (it == types.end()) return {false, "unsupported dtype " + dtype};
  return fastlstm::cuda::persistent_support(hidden_size, batch, it->second, 0, device);
#else
  (void)hidden_size, (void)batch, (void)dtype, (void)device;
  return {false, "this build has no CUDA kernels"};
#endif
}

}  // namespace

TORCH_LIBRARY(fastlstm, m) {
  // One layer and direction over a whole (padded) sequence. Returns
  // (y, h_n, c_n, saved_gates, saved_c, saved_r); the saved tensors feed layer_backward.
  // checkpoint_every: 0 saves every step, k > 0 the state every k steps, -1 nothing (no backward).
  // tbptt_chunk, grad_clip, grad_clip_mode only affect the backward; norm_probe is an input whose
  // "gradient" is the per-step gradient norms (2, T) when record_norms is on.
  m.def(
      "layer_forward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? w_hr, Tensor h0, Tensor c0, "
      "Tensor? lengths, Tensor? norm_probe, bool reverse, int checkpoint_every, int tbptt_chunk, float grad_clip, "
      "str grad_clip_mode, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (dx, dw_ih, dw_hh, dbias, dw_hr, dh0, dc0, norms); dx, dbias, dw_hr, norms are empty
  // when input_grad is false, the layer has no bias, no projection, or records no norms.
  m.def(
      "layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, Tensor w_hh, "
      "Tensor? bias, Tensor? w_hr, Tensor h0, Tensor c0, Tensor? lengths, Tensor y, Tensor saved_gates, "
      "Tensor saved_c, Tensor saved_r, bool reverse, int checkpoint_every, int tbptt_chunk, float grad_clip, "
      "str grad_clip_mode, bool record_norms, bool input_grad, str backend) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlstm compiled kernels (ops are registered under torch.ops.fastlstm)";
  m.def("cuda_compiled", &fastlstm::cuda_compiled, "Whether the CUDA kernels were built into this extension");
  m.def(
      "set_poison_buffers", [](bool on) { fastlstm::poison_buffers() = on; },
      "Test hook: fill every buffer the kernels allocate with NaN before use");
  m.def("empty_cache", &fastlstm::cpu::release_cached_buffers, "Free the idle host buffers fastlstm keeps for reuse");
  m.def("cached_bytes", &fastlstm::cpu::cached_bytes, "Bytes of idle host buffers fastlstm keeps for reuse");
  m.def("persistent_support", &persistent_support, "Whether the persistent CUDA kernels can run a layer, and why");
  m.def("cpu_capability", &fastlstm::cpu_capability, "The SIMD level the CPU kernels run at (see ATEN_CPU_CAPABILITY)");
}
