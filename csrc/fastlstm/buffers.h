// Buffer allocation for the kernels, with a test hook that poisons new buffers.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "../cpu/host_buffer_cache.h"

namespace fastlstm {

// Test hook: when set, every buffer the driver allocates starts as NaN, so an element a kernel
// fails to write shows up in the results instead of passing by luck.
inline bool& poison_buffers() {
  static bool enabled = false;
  return enabled;
}

// Kernel buffers: CUDA ones from PyTorch's caching allocator, CPU ones from fastlstm's cache of
// large host buffers (cpu/host_buffer_cache.cpp).
inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = options.device().is_cpu() ? cpu::cached_empty(sizes, options) : at::empty(sizes, options);
  if (poison_buffers() && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace fastlstm
