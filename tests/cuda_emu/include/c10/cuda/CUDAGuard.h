// Stand-in for c10's CUDA device guard in the CPU harness (one emulated device).
#pragma once

#include <c10/cuda/CUDAFunctions.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

}  // namespace c10::cuda
