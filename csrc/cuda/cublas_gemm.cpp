// cuBLAS calls of the step loop. A row-major (M, N) matrix is a column-major (N, M) one, so each
// row-major product is issued as its transpose: C^T = B^T A^T.
#include "cublas_gemm.h"

#include "fp32_precision.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cublas_v2.h>

#include <limits>
#include <type_traits>

namespace fastlstm::cuda {
namespace {

template <class T>
cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<T, c10::Half>) return CUDA_R_16F;
  if constexpr (std::is_same_v<T, c10::BFloat16>) return CUDA_R_16BF;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, c10::Half> ||
                    std::is_same_v<T, c10::BFloat16>,
                "fastlstm: no cuBLAS data type for this element type");
}

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "fastlstm: ", what, " = ", v, " is too large for cuBLAS");
  return static_cast<int>(v);
}

// op_b/op_a: cuBLAS operations applied to the column-major views of B and A.
template <class S, class C>
void gemm(cublasOperation_t op_b, cublasOperation_t op_a, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda,
          const S* B, int64_t ldb, C* out, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      C10_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(C) * M * N, at::cuda::getCurrentCUDAStream()));
    }
    return;
  }
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const int m = checked_int(N, "N"), n = checked_int(M, "M"), k = checked_int(K, "K");
  if constexpr (std::is_same_v<S, double>) {
    const double alpha = 1, beta = accumulate ? 1 : 0;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, op_b, op_a, m, n, k, &alpha, B, data_type<S>(), checked_int(ldb, "ldb"),
                                      A, data_type<S>(), checked_int(lda, "lda"), &beta, out, data_type<C>(), m,
                                      CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT));
  } else {
    const float alpha = 1, beta = accumulate ? 1 : 0;
    const cublasComputeType_t compute =
        std::is_same_v<S, float> && matmul_allows_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, op_b, op_a, m, n, k, &alpha, B, data_type<S>(), checked_int(ldb, "ldb"),
                                      A, data_type<S>(), checked_int(lda, "lda"), &beta, out, data_type<C>(), m,
                                      compute, CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace

template <class S, class C>
void gemm_nt(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate) {
  // Column-major: C^T (N, M) = B (N, K) [stored as (K, N), transposed] * A^T (K, M).
  gemm<S, C>(CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, A, K, B, K, out, accumulate);
}

template <class S, class C>
void gemm_nn(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate) {
  // Column-major: C^T (N, M) = B^T (N, K) * A^T (K, M), both views without transposition.
  gemm<S, C>(CUBLAS_OP_N, CUBLAS_OP_N, M, N, K, A, K, B, N, out, accumulate);
}

#define FASTLSTM_INSTANTIATE(S, C)                                                                \
  template void gemm_nt<S, C>(int64_t, int64_t, int64_t, const S*, const S*, C*, bool);           \
  template void gemm_nn<S, C>(int64_t, int64_t, int64_t, const S*, const S*, C*, bool);
FASTLSTM_FOR_EACH_GEMM_TYPE(FASTLSTM_INSTANTIATE)
#undef FASTLSTM_INSTANTIATE

}  // namespace fastlstm::cuda
