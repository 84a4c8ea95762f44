// Choosing the kernels' SIMD level: what the CPU supports (cpuid, and the OS saving the wide
// registers: __builtin_cpu_supports checks both), capped by the levels compiled and by
// ATEN_CPU_CAPABILITY. Unlike ATen, a requested level the CPU lacks is lowered, not trusted.
#include "cpu_capability.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastlstm::cpu {
namespace {

Capability supported_by_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool fma = __builtin_cpu_supports("fma");
  if (fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Capability::AVX512;
  }
  if (fma && __builtin_cpu_supports("avx2")) return Capability::AVX2;
#endif
  return Capability::DEFAULT;
}

// setup.py defines FASTLSTM_CPU_AVX2 / FASTLSTM_CPU_AVX512 for the levels it compiled.
Capability compiled() {
#if defined(FASTLSTM_CPU_AVX512)
  return Capability::AVX512;
#elif defined(FASTLSTM_CPU_AVX2)
  return Capability::AVX2;
#else
  return Capability::DEFAULT;
#endif
}

Capability requested() {
  const char* value = std::getenv("ATEN_CPU_CAPABILITY");
  if (value == nullptr || *value == '\0') return Capability::AVX512;
  const std::string level(value);
  if (level == "default") return Capability::DEFAULT;
  if (level == "avx2") return Capability::AVX2;
  if (level == "avx512") return Capability::AVX512;
  TORCH_WARN("fastlstm: ignoring ATEN_CPU_CAPABILITY=", level, " (fastlstm's levels are default, avx2, avx512)");
  return Capability::AVX512;
}

}  // namespace

Capability capability() {
  static const Capability level = std::min({supported_by_cpu(), compiled(), requested()});
  return level;
}

bool bf16_kernels_enabled() {
  static const bool enabled = [] {
#if defined(FASTLSTM_CPU_AVX512_BF16) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return capability() == Capability::AVX512 && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return enabled;
}

bool amx_enabled() {
  static const bool enabled = [] {
#if defined(FASTLSTM_CPU_AVX512_BF16) && defined(__linux__) && defined(__x86_64__)
    if (!bf16_kernels_enabled() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) {
      return false;
    }
    const char* env = std::getenv("FASTLSTM_CPU_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    // Linux hands out the 8 KiB tile state only on request (once per process; oneDNN asks too).
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return enabled;
}

const char* capability_report() {
  if (!bf16_kernels_enabled()) return capability_name(capability());
  return amx_enabled() ? "AMX_BF16" : "AVX512_BF16";
}

bool packed_products_only() {
  static const bool packed = [] {
    const char* env = std::getenv("FASTLSTM_CPU_GEMM");
    const std::string choice = env ? env : "auto";
    if (choice == "packed") return true;
    if (choice == "blas") return false;
    if (choice != "auto") TORCH_WARN("fastlstm: ignoring FASTLSTM_CPU_GEMM=", choice, " (expected auto, packed or blas)");
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return at::hasMKL() && !__builtin_cpu_is("intel");
#else
    return false;
#endif
  }();
  return packed;
}

const char* capability_name(Capability level) {
  switch (level) {
    case Capability::AVX512:
      return "AVX512";
    case Capability::AVX2:
      return "AVX2";
    case Capability::DEFAULT:
      break;
  }
  return "DEFAULT";
}

}  // namespace fastlstm::cpu
