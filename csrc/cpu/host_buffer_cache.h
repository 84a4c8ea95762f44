// Large host buffers kept for reuse between calls.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastlstm::cpu {

// An uninitialised CPU tensor; from the cache when it is large (see host_buffer_cache.cpp).
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer (buffers in use return to the cache when their tensors die).
void release_cached_buffers();

// Bytes currently held by the cache, not counting buffers in use.
int64_t cached_bytes();

}  // namespace fastlstm::cpu
