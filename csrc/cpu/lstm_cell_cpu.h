// The per-step pointwise kernels on the CPU (float and double; half types run as float), one
// table per SIMD level (kernels/cell_kernels.cpp); the functions below call the running level's.
#pragma once

#include "../fastlstm/step_args.h"
#include "kernel_table.h"

namespace fastlstm::cpu {

template <class T>
struct CellKernels {
  void (*forward)(const ForwardCellArgs<T, T>&);
  void (*backward)(const BackwardCellArgs<T, T>&);
  void (*proj_backward)(const BackwardProjArgs<T, T>&);
  void (*state_select)(const StateSelectArgs<T>&);
};

FASTLSTM_DECLARE_KERNEL_TABLES(CellKernels, cell_kernel_table)

template <class T>
const CellKernels<T>& cell_kernels() {
  static const CellKernels<T>& table = FASTLSTM_RUNNING_TABLE(CellKernels<T>, cell_kernel_table<T>);
  return table;
}

template <class T>
void cell_forward(const ForwardCellArgs<T, T>& a) { cell_kernels<T>().forward(a); }
template <class T>
void cell_backward(const BackwardCellArgs<T, T>& a) { cell_kernels<T>().backward(a); }
template <class T>
void proj_backward(const BackwardProjArgs<T, T>& a) { cell_kernels<T>().proj_backward(a); }
template <class T>
void state_select(const StateSelectArgs<T>& a) { cell_kernels<T>().state_select(a); }

}  // namespace fastlstm::cpu
