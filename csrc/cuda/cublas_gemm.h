// Row-major GEMMs on cuBLAS for the step loop: A and B in the tensor dtype, C in the tensor dtype
// or in the accumulation type (fp32 for half types), fp32 (fp64) accumulation, current stream.
#pragma once

#include <cstdint>

namespace fastlstm::cuda {

// C[M, N] (+)= A[M, K] B[N, K]^T
template <class S, class C>
void gemm_nt(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate);

// C[M, N] (+)= A[M, K] B[K, N]
template <class S, class C>
void gemm_nn(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate);

// The (S, C) pairs the step loop uses; every implementation of these products instantiates them.
#define FASTLSTM_FOR_EACH_GEMM_TYPE(X) \
  X(float, float)                      \
  X(double, double)                    \
  X(c10::Half, float)                  \
  X(c10::Half, c10::Half)              \
  X(c10::BFloat16, float)              \
  X(c10::BFloat16, c10::BFloat16)

}  // namespace fastlstm::cuda
