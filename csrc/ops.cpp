// The Python module of the extension: loading it registers the ops (schemas in op_schemas.cpp,
// kernels in csrc/cpu/lstm_layer_cpu.cpp and csrc/cuda/lstm_layer_cuda.cpp) and a few helpers.
#include <torch/extension.h>
#include <torch/library.h>

#include <map>
#include <optional>
#include <string>
#include <tuple>

#include "fastlstm/buffers.h"
#include "fastlstm/build_info.h"
#ifdef FASTLSTM_WITH_CUDA
#include "cuda/persistent_support.h"
#endif

namespace {

#ifdef FASTLSTM_WITH_CUDA
// The dtype names fastlstm.dispatch passes (str(torch.dtype) without "torch."), or nullopt.
std::optional<c10::ScalarType> scalar_type_of(const std::string& name) {
  static const std::map<std::string, c10::ScalarType> types = {
      {"float32", c10::kFloat}, {"float64", c10::kDouble}, {"float16", c10::kHalf}, {"bfloat16", c10::kBFloat16}};
  const auto it = types.find(name);
  return it == types.end() ? std::nullopt : std::optional<c10::ScalarType>(it->second);
}
#endif

// For fastlstm.explain: whether the persistent CUDA kernels (cluster: backend 'cluster') can run a
// layer, and why (not).
std::tuple<bool, std::string> kernel_support(int64_t hidden_size, int64_t batch, const std::string& dtype,
                                             int64_t device, bool cluster) {
#ifdef FASTLSTM_WITH_CUDA
  const std::optional<c10::ScalarType> type = scalar_type_of(dtype);
  if (!type) return {false, "unsupported dtype " + dtype};
  return cluster ? fastlstm::cuda::cluster_support(hidden_size, batch, *type, 0, device)
                 : fastlstm::cuda::persistent_support(hidden_size, batch, *type, 0, device);
#else
  (void)hidden_size, (void)batch, (void)dtype, (void)device, (void)cluster;
  return {false, "this build has no CUDA kernels"};
#endif
}

std::tuple<bool, std::string> persistent_support(int64_t hidden_size, int64_t batch, const std::string& dtype,
                                                 int64_t device) {
  return kernel_support(hidden_size, batch, dtype, device, false);
}

std::tuple<bool, std::string> cluster_support(int64_t hidden_size, int64_t batch, const std::string& dtype,
                                              int64_t device) {
  return kernel_support(hidden_size, batch, dtype, device, true);
}

// Why backend 'cluster' runs a layer on the persistent kernel, or "" where it does not.
std::string cluster_fallback(int64_t hidden_size, int64_t batch, const std::string& dtype, int64_t device) {
#ifdef FASTLSTM_WITH_CUDA
  if (const std::optional<c10::ScalarType> type = scalar_type_of(dtype)) {
    return fastlstm::cuda::cluster_fallback(hidden_size, batch, *type, device);
  }
#endif
  (void)hidden_size, (void)batch, (void)dtype, (void)device;
  return "";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlstm compiled kernels (ops are registered under torch.ops.fastlstm)";
  m.def("cuda_compiled", &fastlstm::cuda_compiled, "Whether the CUDA kernels were built into this extension");
  m.def(
      "set_poison_buffers", [](bool on) { fastlstm::poison_buffers() = on; },
      "Test hook: fill every buffer the kernels allocate with NaN before use");
  m.def("empty_cache", &fastlstm::cpu::release_cached_buffers, "Free the idle host buffers fastlstm keeps for reuse");
  m.def("cached_bytes", &fastlstm::cpu::cached_bytes, "Bytes of idle host buffers fastlstm keeps for reuse");
  m.def("persistent_support", &persistent_support, "Whether the persistent CUDA kernels can run a layer, and why");
  m.def("cluster_support", &cluster_support, "Whether backend 'cluster' can run a layer, and why");
  m.def("cluster_fallback", &cluster_fallback,
        "Why backend 'cluster' runs a layer on the persistent kernel ('' where it does not)");
  m.def("cpu_capability", &fastlstm::cpu_capability, "The SIMD level the CPU kernels run at (see ATEN_CPU_CAPABILITY)");
}
