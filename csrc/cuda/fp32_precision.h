// Whether float32 products may use TF32 tensor cores: PyTorch's own matmul setting decides, for
// cuBLAS and the cluster kernels alike.
#pragma once

namespace fastlstm::cuda {

// torch.backends.cuda.matmul.fp32_precision == "tf32" (allow_tf32 = True in the legacy API).
bool matmul_allows_tf32();

}  // namespace fastlstm::cuda
