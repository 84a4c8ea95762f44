// One warp-wide tensor-core product, D (16x8, fp32) = A (16xK) B (Kx8) + C: K = 16 for bf16 or
// fp16 inputs, PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`; K = 8 for
// tf32 inputs (float32 rounded to a 10-bit mantissa), `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`.
//
// Fragments follow the PTX ISA's layout for m16n8k16 (section "Matrix fragments for mma.m16n8k16
// with floating point type"), with g = lane / 4 and q = lane % 4:
//   A (row-major 16x16), 4 registers of two elements: a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q, 2q+1],
//                                                    a[2] = A[g][2q+8, 2q+9], a[3] = A[g+8][2q+8, 2q+9]
//   B (16x8, k by n),    2 registers of two elements: b[0] = B[2q, 2q+1][g], b[1] = B[2q+8, 2q+9][g]
//   C, D (16x8),         4 floats: c[0], c[1] = C[g][2q, 2q+1], c[2], c[3] = C[g+8][2q, 2q+1]
// The lower 16 bits of a register hold the element with the smaller index. For m16n8k8 tf32 (section
// "Matrix fragments for mma.m16n8k8"), one element per register:
//   A (row-major 16x8): a[0] = A[g][q], a[1] = A[g+8][q], a[2] = A[g][q+4], a[3] = A[g+8][q+4]
//   B (8x8, k by n):    b[0] = B[q][g], b[1] = B[q+4][g];  C, D as above.
//
// On the GPU this is the instruction itself. In the CPU execution harness (FASTLSTM_CUDA_EMU) it
// is the same definition computed as a warp collective: each lane gathers the rows of A and the
// columns of B it needs from the lanes holding them (shuffles) and accumulates in fp32; the
// harness's tests check both against a plain matrix product.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastlstm::cuda {

enum class MmaInput { BF16, F16, TF32 };

// 16-byte aligned: a packed tile (below) gives each lane its fragment in one 16-byte load.
struct alignas(16) FragmentA {
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

// d = a b + c as the warp collective the instruction is, for K = 8 E (E elements per register:
// 2 for bf16/fp16, 1 for tf32). Element k of A's row `row` lives in lane row % 8 * 4 + k % 4E / E,
// register (row >= 8) + 2 (k >= 4E), part k % E; element k of B's column n in lane n * 4 + k % 4E / E,
// register (k >= 4E), part k % E. value(reg, part) decodes one element to float.
template <int E, class Value>
inline void warp_product(FragmentC& d, const FragmentA& a, const FragmentB& b, const FragmentC& c, Value value) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  float acc[4] = {c.reg[0], c.reg[1], c.reg[2], c.reg[3]};
  for (int k = 0; k < 8 * E; ++k) {
    const int src = k % (4 * E) / E, hi = k >= 4 * E, part = k % E;
    const float a_top = value(__shfl_sync(0xffffffffu, a.reg[2 * hi], g * 4 + src), part);
    const float a_bottom = value(__shfl_sync(0xffffffffu, a.reg[2 * hi + 1], g * 4 + src), part);
    const float b_left = value(__shfl_sync(0xffffffffu, b.reg[hi], 2 * q * 4 + src), part);
    const float b_right = value(__shfl_sync(0xffffffffu, b.reg[hi], (2 * q + 1) * 4 + src), part);
    acc[0] += a_top * b_left;
    acc[1] += a_top * b_right;
    acc[2] += a_bottom * b_left;
    acc[3] += a_bottom * b_right;
  }
  for (int i = 0; i < 4; ++i) d.reg[i] = acc[i];
}

}  // namespace mma_detail
#endif

// d = a b + c over the 32 lanes of the calling warp (all of them must call it, converged).
template <MmaInput In>
__device__ __forceinline__ void mma_m16n8k16(FragmentC& d, const FragmentA& a, const FragmentB& b, const FragmentC& c) {
#ifdef FASTLSTM_CUDA_EMU
  mma_detail::warp_product<2>(d, a, b, c, [](uint32_t reg, int half) { return mma_detail::element<In>(reg, half); });
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

// A operands are kept packed: a 16 x K tile stored as the 32 lanes' four fragment registers,
// lane after lane (TensorCore<In>::packed_a_index says where element (i, c) goes), so a lane
// loads its fragment in one 16-byte access, without bank conflicts. B operands stay plain: B
// stored column by column, B[k][n] at b[n * ldb + k] (as h rows and gate-gradient rows are),
// read as 32-bit pairs (b 4-byte aligned, ldb and k even); and D back.
__device__ __forceinline__ FragmentA load_packed_a(const void* tile) {
  return reinterpret_cast<const FragmentA*>(tile)[threadIdx.x % 32];
}

__device__ __forceinline__ FragmentB load_fragment_b(const uint16_t* b, int ldb) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  const uint32_t* col = reinterpret_cast<const uint32_t*>(b + g * ldb);
  return {{col[q], col[q + 4]}};
}

// float32 rounded to tf32 (nearest, ties away from zero: PTX cvt.rna.tf32.f32), as its bits.
__device__ __forceinline__ uint32_t to_tf32(float v) {
#ifdef FASTLSTM_CUDA_EMU
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // inf and NaN pass through
  return (bits + 0x1000u) & 0xffffe000u;
#else
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(v));
  return bits;
#endif
}

// d = a b + c for tf32 inputs, K = 8 (all 32 lanes of the warp, converged).
__device__ __forceinline__ void mma_m16n8k8_tf32(FragmentC& d, const FragmentA& a, const FragmentB& b,
                                                 const FragmentC& c) {
#ifdef FASTLSTM_CUDA_EMU
  mma_detail::warp_product<1>(d, a, b, c, [](uint32_t bits, int) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  });
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])
      : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]), "f"(c.reg[0]),
        "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]));
#endif
}

// The same for 32-bit (tf32) B tiles.
__device__ __forceinline__ FragmentB load_fragment_b(const uint32_t* b, int ldb) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  return {{b[g * ldb + q], b[g * ldb + q + 4]}};
}

// One k tile of a product for each input type: its element (the bits in memory), its K, the
// packed A tile's size and layout, A fragments gathered from any layout, the B fragment loader, and
// d += A[16 x K] B[K x 8] (fragments: A held in registers or loaded from a packed tile, B loaded
// once for every A it multiplies).
template <MmaInput In>
struct TensorCore {
  using Elem = uint16_t;
  static constexpr int kK = 16;
  static constexpr int kTileElems = 16 * kK;
  // Element (i, c) of the tile: lane (i % 8) * 4 + (c % 8) / 2, register (i >= 8) + 2 (c >= 8), half c % 2.
  __host__ __device__ static constexpr int packed_a_index(int i, int c) {
    return ((i % 8 * 4 + c % 8 / 2) * 4 + (i >= 8) + 2 * (c >= 8)) * 2 + c % 2;
  }
  // This lane's fragment of a tile whose element (i, c) is elem(i, c) (an Elem): the inverse of
  // packed_a_index, for tiles gathered straight from global memory into registers.
  template <class F>
  __device__ __forceinline__ static FragmentA gather_a(F elem) {
    const int lane = static_cast<int>(threadIdx.x % 32), i = lane / 4, c = lane % 4 * 2;
    FragmentA a;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int ri = i + 8 * (r & 1), rc = c + 8 * (r >> 1);
      a.reg[r] = uint32_t(elem(ri, rc)) | uint32_t(elem(ri, rc + 1)) << 16;
    }
    return a;
  }
  __device__ __forceinline__ static FragmentB load_b(const Elem* b, int ldb) { return load_fragment_b(b, ldb); }
  __device__ __forceinline__ static void multiply_add(FragmentC& d, const FragmentA& a, const FragmentB& b) {
    mma_m16n8k16<In>(d, a, b, d);
  }
};

template <>
struct TensorCore<MmaInput::TF32> {
  using Elem = uint32_t;
  static constexpr int kK = 8;
  static constexpr int kTileElems = 16 * kK;
  // Element (i, c): lane (i % 8) * 4 + c % 4, register (i >= 8) + 2 (c >= 4).
  __host__ __device__ static constexpr int packed_a_index(int i, int c) {
    return (i % 8 * 4 + c % 4) * 4 + (i >= 8) + 2 * (c >= 4);
  }
  template <class F>
  __device__ __forceinline__ static FragmentA gather_a(F elem) {
    const int lane = static_cast<int>(threadIdx.x % 32), i = lane / 4, c = lane % 4;
    FragmentA a;
#pragma unroll
    for (int r = 0; r < 4; ++r) a.reg[r] = elem(i + 8 * (r & 1), c + 4 * (r >> 1));
    return a;
  }
  __device__ __forceinline__ static FragmentB load_b(const Elem* b, int ldb) { return load_fragment_b(b, ldb); }
  __device__ __forceinline__ static void multiply_add(FragmentC& d, const FragmentA& a, const FragmentB& b) {
    mma_m16n8k8_tf32(d, a, b, d);
  }
};

__device__ __forceinline__ void store_fragment_c(const FragmentC& c, float* d, int ldd) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, q = lane % 4;
  d[g * ldd + 2 * q] = c.reg[0];
  d[g * ldd + 2 * q + 1] = c.reg[1];
  d[(g + 8) * ldd + 2 * q] = c.reg[2];
  d[(g + 8) * ldd + 2 * q + 1] = c.reg[3];
}

}  // namespace fastlstm::cuda
