#include "fp32_precision.h"

#include <ATen/Context.h>
#include <torch/version.h>

namespace fastlstm::cuda {

// Read through the fp32-precision API where the headers have it (checked in torch 2.11's, the
// oldest torch the Makefile installs: `make torch-2.11-headers`), as ATen's cuBLAS calls do: the
// legacy allowTF32CuBLAS() throws once the torch.backends.*.fp32_precision setters have been
// used. Older headers only have the legacy query, which is then the only setting there is.
bool matmul_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

}  // namespace fastlstm::cuda
