// Stand-in for ATen's CUDA context in the CPU harness: one emulated device, the null stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>

namespace at::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline const cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) { return &cuda_emu::device(); }
inline const cudaDeviceProp* getCurrentDeviceProperties() { return &cuda_emu::device(); }

}  // namespace at::cuda
