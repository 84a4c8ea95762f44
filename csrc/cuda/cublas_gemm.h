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

}  // namespace fastlstm::cuda
