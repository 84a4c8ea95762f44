// Per-level kernel tables and the pick of the running level's (the dispatch stub).
//
// A kernel family (cell kernels, packed GEMM, fused recurrence) is a struct of function pointers;
// its source in csrc/cpu/kernels/ is compiled once per SIMD level (setup.py), each compilation
// defining the table getter of its own namespace fastlstm::cpu::<CPU_CAPABILITY>. The family's
// header declares the getters of all levels and a dispatcher returning the running level's table.
#pragma once

#include "cpu_capability.h"

// Declares `template <class T> const Table<T>& getter();` in the namespace of every level.
#define FASTLSTM_DECLARE_KERNEL_TABLES(Table, getter) \
  namespace DEFAULT {                                 \
  template <class T>                                  \
  const Table<T>& getter();                           \
  }                                                   \
  namespace AVX2 {                                    \
  template <class T>                                  \
  const Table<T>& getter();                           \
  }                                                   \
  namespace AVX512 {                                  \
  template <class T>                                  \
  const Table<T>& getter();                           \
  }

// setup.py defines FASTLSTM_CPU_AVX2 / FASTLSTM_CPU_AVX512 for the levels it compiled; the
// others have no table (capability() never picks them).
#ifdef FASTLSTM_CPU_AVX2
#define FASTLSTM_IF_AVX2(getter) &AVX2::getter
#else
#define FASTLSTM_IF_AVX2(getter) nullptr
#endif
#ifdef FASTLSTM_CPU_AVX512
#define FASTLSTM_IF_AVX512(getter) &AVX512::getter
#else
#define FASTLSTM_IF_AVX512(getter) nullptr
#endif

// The running level's table of a family: FASTLSTM_RUNNING_TABLE(CellKernels<T>, cell_kernel_table<T>).
#define FASTLSTM_RUNNING_TABLE(Table, getter) \
  ::fastlstm::cpu::running_table<Table>({&DEFAULT::getter, FASTLSTM_IF_AVX2(getter), FASTLSTM_IF_AVX512(getter)})

namespace fastlstm::cpu {

template <class Table>
const Table& running_table(const Table& (*const (&per_level)[kCapabilities])()) {
  return per_level[static_cast<int>(capability())]();
}

}  // namespace fastlstm::cpu
