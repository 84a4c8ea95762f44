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

// Whether bfloat16 layers run the bfloat16 kernels (kernels/avx512_bf16/): the AVX512 level, a
// CPU with AVX512_BF16 and a build that compiled them (FASTLSTM_CPU_AVX512_BF16). Otherwise
// bfloat16 computes in float32. ATEN_CPU_CAPABILITY=avx2 or default turns them off.
bool bf16_kernels_enabled();

// Whether those kernels use AMX tiles for their products (else vdpbf16ps): the CPU has AMX-BF16,
// the kernel grants this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), and
// FASTLSTM_CPU_AMX is not 0.
bool amx_enabled();

// What fastlstm.cpu_capability() reports: capability_name(capability()), or "AVX512_BF16" /
// "AMX_BF16" when the AVX512 level also runs the bfloat16 kernels (with vdpbf16ps / AMX tiles).
const char* capability_report();

// Whether every product with a weight, and the weight gradients, run on fastlstm's own kernels
// (packed_gemm_cpu.h) instead of ATen's mm where that measured faster on an Intel CPU. By default
// (FASTLSTM_CPU_GEMM unset or "auto"): when ATen's mm is MKL and the CPU is not Intel's, where MKL
// takes its non-Intel code path: on an AMD EPYC (Zen 5) VM fastlstm's kernels beat it on the products
// this moves off mm (dL/dx over many rows, the weight gradients, depths past 512), 1.7-2.6x at
// the AVX-512 level and 0.94-1.40x at AVX2 (all but one row >= 1.06x; benchmarks/NOTES.md).
// FASTLSTM_CPU_GEMM=packed forces it, =blas forces the Intel rule (the tests run both).
bool packed_products_only();

}  // namespace fastlstm::cpu
