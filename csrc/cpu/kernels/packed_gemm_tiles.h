// The order in which PackedMatrix's products visit their register tiles, shared by the
// float/double kernel (packed_gemm_kernels.cpp) and the bfloat16 one (avx512_bf16/bf16_kernels.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "static_for.h"

namespace fastlstm::cpu::CPU_CAPABILITY {

struct NoThreadState {
  int operator()() const { return 0; }
};

// Calls tile(std::integral_constant<int, R>, row0, panel, state) for every tile of kRows rows (R
// live rows, fewer in a short last row block) x one panel of kWidth columns of C[M, cols], on the
// threads of one parallel region; state = make_state() once per thread's run of tiles. Tiles run
// in (row chunk, panel, row block) order: a panel stays in cache across the row blocks of a
// chunk, and a chunk of A stays in cache across the panels.
template <int kRows, int kWidth, class Tile, class MakeState = NoThreadState>
void for_each_tile(int64_t M, int64_t depth, int64_t cols, const Tile& tile, const MakeState& make_state = {}) {
  const int64_t panels = (cols + kWidth - 1) / kWidth;
  constexpr int64_t kChunkBlocks = 16;
  const int64_t row_blocks = (M + kRows - 1) / kRows;
  const int64_t chunks = (row_blocks + kChunkBlocks - 1) / kChunkBlocks;
  const int64_t tiles = chunks * panels * kChunkBlocks;
  // Below ~100k multiply-adds the work is shorter than waking a second thread.
  const int64_t grain = M * cols * depth < (1 << 17) ? tiles : 1;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    auto state = make_state();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = (t / (panels * kChunkBlocks)) * kChunkBlocks + t % kChunkBlocks;
      const int64_t p = (t / kChunkBlocks) % panels;
      if (rb >= row_blocks) continue;
      const int64_t row0 = rb * kRows, live = std::min<int64_t>(kRows, M - row0);
      static_for<kRows>([&](auto r) {
        if (live == r + 1) tile(std::integral_constant<int, r + 1>{}, row0, p, state);
      });
    }
  });
}

}  // namespace fastlstm::cpu::CPU_CAPABILITY
