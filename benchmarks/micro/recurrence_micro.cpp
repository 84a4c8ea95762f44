// Microbenchmark of the fused CPU recurrence alone (no input projection, no Python): the time per
// step of csrc/cpu/lstm_recurrence_cpu.cpp's forward or backward, float32.
//   benchmarks/micro/build.sh && benchmarks/micro/recurrence_micro fwd 2 16 128
// arguments: fwd|bwd, threads, batch, hidden [, repeats (default 5), steps (default 1000)]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cpu/lstm_recurrence_cpu.h"

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s fwd|bwd threads batch hidden [repeats] [steps]\n", argv[0]);
    return 2;
  }
  const bool backward = std::strcmp(argv[1], "bwd") == 0;
  at::set_num_threads(std::atoi(argv[2]));
  const int64_t B = std::atoll(argv[3]), H = std::atoll(argv[4]);
  const int repeats = argc > 5 ? std::atoi(argv[5]) : 5;
  const int64_t T = argc > 6 ? std::atoll(argv[6]) : 1000;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::manual_seed(0);
  at::Tensor gates = at::rand({T, B, 4 * H}, f32), c = at::randn({T, B, H}, f32), y = at::randn({T, B, H}, f32);
  at::Tensor dy = at::randn({T, B, H}, f32), dgates = at::empty({T, B, 4 * H}, f32);
  at::Tensor w = at::randn({4 * H, H}, f32) * 0.05, h0 = at::zeros({B, H}, f32), c0 = at::zeros({B, H}, f32);
  at::Tensor carry_h = at::zeros({B, H}, f32), carry_c = at::zeros({B, H}, f32);
  const at::Tensor gates_in = gates.clone();
  const at::Tensor packed = backward ? fastlstm::cpu::pack_fused_backward<float>(w.data_ptr<float>(), H)
                                     : fastlstm::cpu::pack_fused_forward<float>(w.data_ptr<float>(), H);
  fastlstm::ChunkRecurrenceArgs<float, float> a{};
  a.gates = gates.data_ptr<float>();
  a.c = c.data_ptr<float>();
  a.r = a.y = y.data_ptr<float>();
  a.w_hh = w.data_ptr<float>();
  a.r_init = h0.data_ptr<float>();
  a.c_init = c0.data_ptr<float>();
  a.n = a.T = T;
  a.B = B;
  a.H = H;
  a.dy = dy.data_ptr<float>();
  a.dgates = dgates.data_ptr<float>();
  a.carry_h = carry_h.data_ptr<float>();
  a.carry_c = carry_c.data_ptr<float>();
  for (int rep = 0; rep < repeats; ++rep) {
    if (!backward) gates.copy_(gates_in);  // the forward overwrites its input with the activations
    const auto start = std::chrono::steady_clock::now();
    if (backward) {
      fastlstm::cpu::fused_backward<float>(a, packed.data_ptr<float>());
    } else {
      fastlstm::cpu::fused_forward<float>(a, packed.data_ptr<float>(), nullptr);  // the recurrence alone
    }
    const auto stop = std::chrono::steady_clock::now();
    std::printf("%s B=%lld H=%lld threads=%d: %.2f us/step\n", backward ? "backward" : "forward", (long long)B,
                (long long)H, at::get_num_threads(),
                std::chrono::duration<double, std::micro>(stop - start).count() / T);
  }
  return 0;
}
