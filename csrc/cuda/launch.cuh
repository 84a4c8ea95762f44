// The two macros that let the CPU execution harness (tests/cuda_emu) run these kernels unchanged:
// the harness defines them itself (cuda_emu/runtime.h, force-included); nvcc gets plain CUDA.
#pragma once

#ifndef FASTLSTM_CUDA_EMU
// The kernel's dynamic shared memory, 16-byte aligned.
#define FASTLSTM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// kernel<<<grid, block, smem, stream>>>(args...); `kernel` is a typed function pointer or name.
#define FASTLSTM_LAUNCH(kernel, grid, block, smem, stream, ...) (kernel)<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
