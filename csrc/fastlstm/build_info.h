// What this build of the extension contains and runs (exposed to Python for clear errors and reports).
#pragma once

#include <string>

#include "../cpu/cpu_capability.h"

namespace fastlstm {

inline bool cuda_compiled() {
#ifdef FASTLSTM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The SIMD level the CPU kernels run at in this process (chosen when first asked, see
// csrc/cpu/cpu_capability.h), "AVX512_BF16" when bfloat16 layers also run the AVX512-BF16 kernels.
inline std::string cpu_capability() { return cpu::capability_report(); }

}  // namespace fastlstm
