// The harness's stand-in for csrc/cuda/cublas_gemm.cpp: the same row-major products, computed by
// ATen on the CPU with cuBLAS's contract (inputs in S, accumulation in fp32 or fp64, the result
// rounded to C, added to `out` when accumulating). The host code above this boundary is the real
// one. TF32 is not modelled: float32 products are exact fp32 here.
#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "../../../csrc/cuda/cublas_gemm.h"

namespace fastlstm::cuda {
namespace {

template <class T>
at::Tensor view(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <class S, class C>
void store(const at::Tensor& product, C* out, int64_t M, int64_t N, bool accumulate) {
  at::Tensor c = view(out, M, N);
  c.copy_(accumulate ? c.to(product.scalar_type()) + product : product);
}

template <class S>
at::ScalarType accumulation() {
  return std::is_same_v<S, double> ? at::kDouble : at::kFloat;
}

}  // namespace

template <class S, class C>
void gemm_nt(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate) {
  if (M == 0 || N == 0) return;
  const at::Tensor product = at::mm(view(A, M, K).to(accumulation<S>()), view(B, N, K).to(accumulation<S>()).t());
  store<S, C>(product, out, M, N, accumulate);
}

template <class S, class C>
void gemm_nn(int64_t M, int64_t N, int64_t K, const S* A, const S* B, C* out, bool accumulate) {
  if (M == 0 || N == 0) return;
  const at::Tensor product = at::mm(view(A, M, K).to(accumulation<S>()), view(B, K, N).to(accumulation<S>()));
  store<S, C>(product, out, M, N, accumulate);
}

#define FASTLSTM_INSTANTIATE(S, C)                                                                \
  template void gemm_nt<S, C>(int64_t, int64_t, int64_t, const S*, const S*, C*, bool);           \
  template void gemm_nn<S, C>(int64_t, int64_t, int64_t, const S*, const S*, C*, bool);
FASTLSTM_FOR_EACH_GEMM_TYPE(FASTLSTM_INSTANTIATE)
#undef FASTLSTM_INSTANTIATE

}  // namespace fastlstm::cuda
