// Whether the persistent kernels can run a layer on a device (for the op and fastlstm.explain).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace fastlstm::cuda {

std::tuple<bool, std::string> persistent_support(int64_t hidden_size, int64_t batch, c10::ScalarType dtype,
                                                 int64_t proj_size, int64_t device);

// The same for backend "cluster": whether it can run the layer; the reason says which kernels run
// the forward and the backward (the cluster kernels, else the persistent ones).
std::tuple<bool, std::string> cluster_support(int64_t hidden_size, int64_t batch, c10::ScalarType dtype,
                                              int64_t proj_size, int64_t device);

// Why backend "cluster" runs a layer on the persistent kernel instead (float64; float32 where
// PyTorch's matmul precision does not allow TF32; a layer the cluster forward cannot take, e.g.
// W_hh beyond 16 blocks' shared memory), or empty where the cluster kernels run it.
std::string cluster_fallback(int64_t hidden_size, int64_t batch, c10::ScalarType dtype, int64_t device);

}  // namespace fastlstm::cuda
