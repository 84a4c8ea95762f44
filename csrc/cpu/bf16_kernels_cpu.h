// The bfloat16 kernels of CPUs with AVX512-BF16 (kernels/avx512_bf16/bf16_kernels.cpp, compiled
// once, with -mavx512bf16 and AMX, into namespace fastlstm::cpu::AVX512_BF16): products of
// bfloat16 operands with vdpbf16ps or, where the CPU has AMX-BF16, on AMX tiles (tdpbf16ps); both
// multiply pairs of bfloat16 exactly and accumulate in float32. They serve bfloat16 layers without a projection when bf16_kernels_enabled(); other
// CPUs (and ATEN_CPU_CAPABILITY=avx2 / default) compute bfloat16 layers in float32.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "../fastlstm/step_args.h"
#include "cpu_capability.h"

namespace fastlstm::cpu {

struct Bf16Kernels {
  using BF = c10::BFloat16;
  // PackedMatrix's kernel for bfloat16 A and weight, float32 C: pairs of rows (the reduction)
  // interleaved as vdpbf16ps reads them. dst (panels, ceil(rows / 2), panel width, 2), zeroed.
  int64_t (*panel_width)();
  void (*pack)(const BF* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col, BF* dst);
  // C[M, cols] (+)= A[M, rows] * the packed (rows x cols) matrix, accumulated in float32.
  void (*multiply)(int64_t M, const BF* A, const BF* packed, int64_t rows, int64_t cols, float* C, bool accumulate);
  // The fused forward (lstm_recurrence_cpu.h's, for a bfloat16 state): gates and c in float32,
  // h_{t-1} W_hh^T from the bfloat16 h_{t-1} and W_hh, h_t rounded to bfloat16 (as the layer
  // outputs it and the next step reads it). W_hh packed once per layer call by pack_forward.
  at::Tensor (*pack_forward)(const BF* w_hh, int64_t H);
  // W_ih (4H, I) the same way, for a forward that computes x W_ih^T itself (null where the
  // kernels do not: the AMX ones take the layer's projection).
  at::Tensor (*pack_projection)(const BF* w_ih, int64_t H, int64_t I);
  // packed_ih: null when a.gates holds x W_ih^T on entry (a.x null), else W_ih's panels.
  void (*forward)(const ChunkRecurrenceArgs<BF, float>& a, const BF* packed, const BF* packed_ih);
};

namespace AVX512_BF16 {
const Bf16Kernels& bf16_kernel_table();      // products with vdpbf16ps
const Bf16Kernels& bf16_amx_kernel_table();  // products on AMX tiles (same packed layouts)
}

// The table, or null where bf16_kernels_enabled() is false: a CPU without AVX512_BF16 never
// reaches code compiled with -mavx512bf16 (nor one without AMX the tile kernels).
inline const Bf16Kernels* bf16_kernels() {
#ifdef FASTLSTM_CPU_AVX512_BF16
  if (!bf16_kernels_enabled()) return nullptr;
  return amx_enabled() ? &AVX512_BF16::bf16_amx_kernel_table() : &AVX512_BF16::bf16_kernel_table();
#else
  return nullptr;
#endif
}

}  // namespace fastlstm::cpu
