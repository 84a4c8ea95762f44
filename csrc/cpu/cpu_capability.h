// The SIMD level the CPU kernels run at, chosen once per process from the running CPU.
//
// The vectorised kernels (csrc/cpu/kernels/) are compiled once per level into namespaces
// fastlstm::cpu::DEFAULT, ::AVX2 and ::AVX512, as ATen does with CPU_CAPABILITY; each kernel
// family has a table per level, and the dispatchers (kernel_dispatch.cpp) call the running level's.
#pragma once

namespace fastlstm::cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
inline constexpr int kCapabilities = 3;

// The widest level that this build compiled and the CPU supports, lowered to ATEN_CPU_CAPABILITY
// (default, avx2 or avx512) when that is set: the same variable forces torch's own kernels.
Capability capability();

// "DEFAULT", "AVX2" or "AVX512", as torch.backends.cpu.get_cpu_capability() spells them.
const char* capability_name(Capability level);

}  // namespace fastlstm::cpu
