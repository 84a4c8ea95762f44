// cell_math.h's elementwise functions for at::vec::Vectorized (SLEEF exp/tanh under AVX2/AVX-512).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../fastlstm/cell_math.h"

namespace fastlstm {

template <class T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V clamp(const V& x, const V& c) { return at::vec::clamp(x, V(0) - c, c); }
};

}  // namespace fastlstm
