// Compile-time loop: register tiles index their accumulator arrays only with constants, so the
// compiler keeps them in registers (a runtime index forces them to the stack).
#pragma once

#include <type_traits>
#include <utility>

// In the level's namespace: inline functions compiled with that level's flags must not be
// merged with another level's copy by the linker.
namespace fastlstm::cpu::CPU_CAPABILITY {

template <int N, class F>
inline void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

}  // namespace fastlstm::cpu::CPU_CAPABILITY
