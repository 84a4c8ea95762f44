// Stand-in for c10's CUDA error checks in the CPU harness: the same TORCH_CHECK failures.
#pragma once

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    const cudaError_t fastlstm_emu_err = (expr);                                         \
    TORCH_CHECK(fastlstm_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(fastlstm_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
