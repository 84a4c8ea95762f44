// A reusable barrier for the threads of one at::parallel_for region.
//
// Parties arrive with a weight (the number of work slices they own), so the barrier completes
// whatever number of threads the runtime actually gave the region, including one.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// In the level's namespace: inline functions compiled with that level's flags must not be
// merged with another level's copy by the linker.
namespace fastlstm::cpu::CPU_CAPABILITY {

class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t total_weight) : total_(total_weight) {}

  // arrive() then wait(): work between the two overlaps the others' arrival. arrive returns the
  // token that wait needs.
  int64_t arrive(int64_t weight) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(weight, std::memory_order_acq_rel) + weight == total_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    return generation;
  }

  void wait(int64_t token) const {
    for (int spins = 0; generation_.load(std::memory_order_acquire) == token; ++spins) {
      if (spins < 4096) {
        relax();
      } else {
        std::this_thread::yield();  // oversubscribed: let the late thread run
      }
    }
  }

  void arrive_and_wait(int64_t weight) { wait(arrive(weight)); }

 private:
  static void relax() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  }

  const int64_t total_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

}  // namespace fastlstm::cpu::CPU_CAPABILITY
