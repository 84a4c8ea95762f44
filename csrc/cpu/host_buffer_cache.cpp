// A cache of large host buffers for the CPU kernels' activations and workspaces.
//
// Why: a fresh multi-megabyte allocation is handed out by the kernel page by page on first touch,
// and those page faults cost more than the LSTM step that fills the memory (measured on the dev box:
// allocating and filling 32 MiB takes 15 ms, refilling a reused buffer 0.9 ms). Buffers of 1 MiB
// and more are therefore 2 MiB-aligned, advised as transparent huge pages, and returned here when
// their tensor dies, to serve the next call of a similar size. The cache holds at most
// FASTLSTM_CPU_CACHE_MB megabytes (default 1024) of idle buffers; fastlstm.empty_cache() frees them.
#include "host_buffer_cache.h"

#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastlstm::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kAlign = size_t(2) << 20;

size_t limit_from_environment() {
  const char* value = std::getenv("FASTLSTM_CPU_CACHE_MB");
  return (value ? std::strtoull(value, nullptr, 10) : 1024) << 20;
}

class Cache {
 public:
  // A buffer of at least `bytes`; its capacity goes to `capacity`.
  void* take(size_t bytes, size_t& capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest idle buffer that fits, unless it would waste more than half of itself.
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= 2 * bytes) {
        void* ptr = it->second;
        capacity = it->first;
        idle_bytes_ -= it->first;
        idle_.erase(it);
        return ptr;
      }
    }
    capacity = (bytes + kAlign - 1) / kAlign * kAlign;
    void* ptr = std::aligned_alloc(kAlign, capacity);
    TORCH_CHECK(ptr != nullptr, "fastlstm: out of host memory allocating ", capacity, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, capacity, MADV_HUGEPAGE);  // advice only: ignored where huge pages are off
#endif
    return ptr;
  }

  void give_back(void* ptr, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Over the limit: drop the largest idle buffers first (they are the least likely to be reused).
    while (idle_bytes_ + capacity > limit_ && !idle_.empty()) {
      auto largest = std::prev(idle_.end());
      idle_bytes_ -= largest->first;
      std::free(largest->second);
      idle_.erase(largest);
    }
    if (idle_bytes_ + capacity > limit_) {
      std::free(ptr);
      return;
    }
    idle_.emplace(capacity, ptr);
    idle_bytes_ += capacity;
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [capacity, ptr] : idle_) std::free(ptr);
    idle_.clear();
    idle_bytes_ = 0;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;
  size_t idle_bytes_ = 0;
  const size_t limit_ = limit_from_environment();
};

// Never destroyed: tensors may still return buffers while the process exits.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinBytes) return at::empty(sizes, options);
  size_t capacity = 0;
  void* ptr = cache().take(bytes, capacity);
  return at::from_blob(
      ptr, sizes, [capacity](void* p) { cache().give_back(p, capacity); }, options.device(at::kCPU));
}

void release_cached_buffers() { cache().release(); }

int64_t cached_bytes() { return cache().idle_bytes(); }

}  // namespace fastlstm::cpu
