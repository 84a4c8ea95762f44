// What this build of the extension contains (exposed to Python for clear errors and reports).
#pragma once

#include <string>

namespace fastlstm {

inline bool cuda_compiled() {
#ifdef FASTLSTM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

inline std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace fastlstm
