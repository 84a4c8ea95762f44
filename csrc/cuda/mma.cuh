// One warp-wide tensor-core product, D (16x8, fp32) = A (16x16) B (16x8) + C, for bf16 or fp16
// inputs: PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`.
//
// Fragments follow the PTX ISA's layout for m16n8k16 (section "Matrix fragments for mma.m16n8k16
// with floating point type"), with g = lane / 4 and q = lane % 4:
//   A (row-major 16x16), 4 registers of two elements: a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q, 2q+1],
//                                                    a[2] = A[g][2q+8, 2q+9], a[3] = A[g+8][2q+8, 2q+9]
//   B (16x8, k by n),    2 registers of two elements: b[0] = B[2q, 2q+1][g], b[1] = B[2q+8, 2q+9][g]
//   C, D (16x8),         4 floats: c[0], c[1] = C[g][2q, 2q+1], c[2], c[3] = C[g+8][2q, 2q+1]
// The lower 16 bits of a register hold the element with the smaller index.
//
// On the GPU this is the instruction itself. In the CPU execution harness (FASTLSTM_CUDA_EMU) it
// is the same definition computed as a warp collective: each lane gathers the rows of A and the
// columns of B it needs from the lanes holding them (shuffles) and accumulates in fp32; the
// harness's tests check both against a plain matrix product.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastlstm::cuda {

enum class MmaInput { BF16, F16 };

struct FragmentA {
  uint32_t reg[4];
};
struct FragmentB {
  uint32_t reg[2];
};
struct FragmentC {
  float reg[4];
};

#ifdef FASTLSTM_CUDA_EMU
namespace mma_detail {

inline float half_bits_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = mant;
    do {
      ++e;
      m <<= 1;
    } while (!(m & 0x400u));
    bits = sign | ((112 - e) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <MmaInput In>
inline float element(uint32_t reg, int half) {
  const uint32_t bits = half ? reg >> 16 : reg & 0xffffu;
  if constexpr (In == MmaInput::BF16) {
    const uint32_t wide = bits << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  } else {
    return half_bits_to_float(bits);
  }
}

}  // namespace mma_detail
#endif

// d = a b + c over the 32 lanes of the calling warp (all of them must call it, converged).
template <MmaInput In>
__device__ __forceinline__ void mma_m16n8k16(FragmentC& d, const FragmentA& a, const FragmentB& b, const FragmentC& c) {
#ifdef FASTLSTM_CUDA_EMU
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  float acc[4] = {c.reg[0], c.reg[1], c.reg[2], c.reg[3]};
  for (int k = 0; k < 16; ++k) {
    // A[row][k] lives in lane row % 8 * 4 + k % 8 / 2, register (row >= 8) + 2 (k >= 8), half k % 2;
    // B[k][n] in lane n * 4 + k % 8 / 2, register (k >= 8), half k % 2.
    const int src = k % 8 / 2, hi = k >= 8, half = k % 2;
    const float a_top = mma_detail::element<In>(__shfl_sync(0xffffffffu, a.reg[2 * hi], g * 4 + src), half);
    const float a_bottom = mma_detail::element<In>(__shfl_sync(0xffffffffu, a.reg[2 * hi + 1], g * 4 + src), half);
    const float b_left = mma_detail::element<In>(__shfl_sync(0xffffffffu, b.reg[hi], 2 * q * 4 + src), half);
    const float b_right = mma_detail::element<In>(__shfl_sync(0xffffffffu, b.reg[hi], (2 * q + 1) * 4 + src), half);
    acc[0] += a_top * b_left;
    acc[1] += a_top * b_right;
    acc[2] += a_bottom * b_left;
    acc[3] += a_bottom * b_right;
  }
  for (int i = 0; i < 4; ++i) d.reg[i] = acc[i];
#else
  if constexpr (In == MmaInput::BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])
        : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]), "f"(c.reg[0]),
          "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])
        : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]), "f"(c.reg[0]),
          "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]));
  }
#endif
}

// Fragments from 16-bit element tiles in memory (row-major A with leading dimension lda; B
// stored column by column, B[k][n] at b[n * ldb + k], as W_hh's rows are), and D back.
__device__ __forceinline__ FragmentA load_fragment_a(const uint16_t* a, int lda) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  auto pair = [&](int row, int col) { return uint32_t(a[row * lda + col]) | uint32_t(a[row * lda + col + 1]) << 16; };
  return {{pair(g, 2 * q), pair(g + 8, 2 * q), pair(g, 2 * q + 8), pair(g + 8, 2 * q + 8)}};
}

__device__ __forceinline__ FragmentB load_fragment_b(const uint16_t* b, int ldb) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  auto pair = [&](int k) { return uint32_t(b[g * ldb + k]) | uint32_t(b[g * ldb + k + 1]) << 16; };
  return {{pair(2 * q), pair(2 * q + 8)}};
}

__device__ __forceinline__ void store_fragment_c(const FragmentC& c, float* d, int ldd) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  d[g * ldd + 2 * q] = c.reg[0];
  d[g * ldd + 2 * q + 1] = c.reg[1];
  d[(g + 8) * ldd + 2 * q] = c.reg[2];
  d[(g + 8) * ldd + 2 * q + 1] = c.reg[3];
}

}  // namespace fastlstm::cuda
