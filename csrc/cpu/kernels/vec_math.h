// cell_math.h's elementwise functions for at::vec::Vectorized.
//
// double uses SLEEF's 1-ulp exp and tanh. float uses ATen's exp_u20 (at most 20 ulp, about
// 2.4e-6 relative) for exp, sigmoid and tanh: at small batch the five transcendental functions
// of a cell cost more than the recurrent GEMM with the 1-ulp versions, and a few ulp of float32
// is far inside what an LSTM's float32 results can be trusted to (the tests hold float32 to 1e-5
// of a float64 reference). NaN propagates as in torch.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../../fastlstm/cell_math.h"

namespace fastlstm {

template <class T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V clamp(const V& x, const V& c) { return at::vec::clamp(x, V(0) - c, c); }
};

template <>
struct Math<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;

  // where(m, a, b) = a where m, else b. On AVX-512 a comparison yields a mask register; ATen's
  // operator< and blendv turn it into a vector and back (two more instructions per selection, on
  // the two vector ports the cell's arithmetic needs), so the AVX-512 kernels select on the mask
  // directly. Same results. (Nested: V, and so this type, differs per SIMD level.)
  struct S {
#if defined(CPU_CAPABILITY_AVX512)
    using Mask = __mmask16;
    static Mask is_nan(const V& x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
    static Mask less(const V& x, const V& y) { return _mm512_cmp_ps_mask(x, y, _CMP_LT_OQ); }
    static V where(Mask m, const V& a, const V& b) { return _mm512_mask_blend_ps(m, b, a); }
#else
    using Mask = V;
    static Mask is_nan(const V& x) { return x.isnan(); }
    static Mask less(const V& x, const V& y) { return x < y; }
    static V where(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
#endif
  };

  static V exp(const V& x) { return S::where(S::is_nan(x), x, x.exp_u20()); }

  static V tanh(const V& x) {
    // |x| >= 0.3: 1 - 2 / (exp(2|x|) + 1), with the sign of x. Below, that difference cancels, so
    // the Taylor series to x^9 (truncation error under 2e-8 relative at 0.3).
    const V ax = x.abs();
    const V tail = V(1.f) - V(2.f) / ((ax + ax).exp_u20() + V(1.f));
    const V large = S::where(S::less(x, V(0.f)), V(0.f) - tail, tail);
    const V x2 = x * x;
    const V poly = V(-1.f / 3) + x2 * (V(2.f / 15) + x2 * (V(-17.f / 315) + x2 * V(62.f / 2835)));
    const V small = x + x * x2 * poly;
    const V r = S::where(S::less(ax, V(0.3f)), small, large);
    return S::where(S::is_nan(x), x, r);
  }

  static V clamp(const V& x, const V& c) { return at::vec::clamp(x, V(0.f) - c, c); }
};

}  // namespace fastlstm
