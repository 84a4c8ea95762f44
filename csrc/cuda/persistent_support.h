// Whether the persistent kernels can run a layer on a device (for the op and fastlstm.explain).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace fastlstm::cuda {

std::tuple<bool, std::string> persistent_support(int64_t hidden_size, int64_t batch, c10::ScalarType dtype,
                                                 int64_t proj_size, int64_t device);

// The same for backend "cluster": whether the cluster forward runs; the reason also says which
// kernel runs the backward (the cluster backward, else the persistent one, else none).
std::tuple<bool, std::string> cluster_support(int64_t hidden_size, int64_t batch, c10::ScalarType dtype,
                                              int64_t proj_size, int64_t device);

// Why backend "cluster" runs `dtype` on the persistent kernel instead (float64; float32 where
// PyTorch's matmul precision does not allow TF32), or empty where the cluster kernels run it.
std::string cluster_dtype_fallback(c10::ScalarType dtype);

}  // namespace fastlstm::cuda
