// The per-step pointwise kernels on the CPU (float and double; half types run as float).
#pragma once

#include "../fastlstm/step_args.h"

namespace fastlstm::cpu {

template <class T>
void cell_forward(const ForwardCellArgs<T, T>& a);
template <class T>
void cell_backward(const BackwardCellArgs<T, T>& a);
template <class T>
void proj_backward(const BackwardProjArgs<T, T>& a);
template <class T>
void state_select(const StateSelectArgs<T>& a);

}  // namespace fastlstm::cpu
