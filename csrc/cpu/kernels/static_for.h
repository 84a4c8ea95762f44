// Compile-time loop: register tiles index their accumulator arrays only with constants, so the
// compiler keeps them in registers (a runtime index forces them to the stack).
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>
#include <utility>

// In the level's namespace: inline functions compiled with that level's flags must not be
// merged with another level's copy by the linker.
namespace fastlstm::cpu::CPU_CAPABILITY {

// Always inlined, with its expansion: left to GCC, a 6-step loop around a large body was
// outlined and called once per iteration of the reduction around it (the bfloat16 6-row tiles).
template <int N, class F>
C10_ALWAYS_INLINE void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) C10_ALWAYS_INLINE_ATTRIBUTE {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

}  // namespace fastlstm::cpu::CPU_CAPABILITY
