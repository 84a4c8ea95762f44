// The CUDA execution harness's runtime: fibers, the block and launch schedulers, the emulated
// device. See cuda_emu/runtime.h for the model and tests/cuda_emu/README.md for its limits.
#include "cuda_emu/runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

// Context switch between fibers (System V x86-64): saves the callee-saved registers, MXCSR and the
// x87 control word on the current stack, stores the stack pointer in *save, and resumes the
// context whose stack pointer is `next`. A new fiber's stack is laid out as if it had called
// cuda_emu_switch, returning into cuda_emu_trampoline with its entry function in rbx and its
// argument in r12. (glibc's swapcontext makes a system call per switch: far too slow for a
// shuffle-heavy kernel, which switches fibers at every warp collective.)
extern "C" void cuda_emu_switch(void** save, void* next);
extern "C" void cuda_emu_trampoline();
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
  .p2align 4
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .globl cuda_emu_trampoline
  .type cuda_emu_trampoline, @function
  .p2align 4
cuda_emu_trampoline:
  movq %r12, %rdi
  callq *%rbx
  ud2
  .size cuda_emu_trampoline, .-cuda_emu_trampoline
)");

thread_local dim3 blockDim, gridDim;

namespace cuda_emu {

thread_local const Coords* current_coords = nullptr;

namespace {

// ---- configuration ----------------------------------------------------------------------------

long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtol(v, nullptr, 10) : fallback;
}

enum class Schedule { InOrder, Reverse, Random };

Schedule schedule() {
  static const Schedule s = [] {
    const char* v = std::getenv("CUDA_EMU_SCHEDULE");
    const std::string name = v ? v : "inorder";
    if (name == "inorder") return Schedule::InOrder;
    if (name == "reverse") return Schedule::Reverse;
    if (name == "random") return Schedule::Random;
    std::fprintf(stderr, "cuda_emu: CUDA_EMU_SCHEDULE must be inorder, reverse or random, got '%s'\n", name.c_str());
    std::abort();
  }();
  return s;
}

cudaDeviceProp make_device() {
  cudaDeviceProp p{};
  p.major = 9;
  p.minor = 0;
  p.multiProcessorCount = static_cast<int>(env_long("CUDA_EMU_SMS", 4));
  p.maxThreadsPerBlock = 1024;
  p.maxThreadsPerMultiProcessor = 2048;
  p.maxBlocksPerMultiProcessor = 32;
  p.warpSize = 32;
  p.sharedMemPerBlock = 48 * 1024;
  p.sharedMemPerBlockOptin = static_cast<size_t>(env_long("CUDA_EMU_SMEM_KB", 227)) * 1024;
  p.reservedSharedMemPerBlock = 1024;
  p.sharedMemPerMultiprocessor = p.sharedMemPerBlockOptin + p.reservedSharedMemPerBlock;
  p.cooperativeLaunch = 1;
  p.clusterLaunch = 1;
  std::snprintf(p.name, sizeof p.name, "cuda_emu (%d SMs, %zu KiB shared memory per block)", p.multiProcessorCount,
                p.sharedMemPerBlockOptin / 1024);
  return p;
}

// ---- fibers -----------------------------------------------------------------------------------

struct Stack {
  unsigned char* base = nullptr;  // lowest usable address (a guard page lies below)
  size_t size = 0;
};

size_t stack_bytes() {
#ifdef CUDA_EMU_ASAN
  const long kb = env_long("CUDA_EMU_STACK_KB", 512);
#else
  const long kb = env_long("CUDA_EMU_STACK_KB", 64);
#endif
  return static_cast<size_t>(kb) * 1024;
}

// Stacks are reused across launches: a launch of B blocks of N threads needs B * N of them.
class StackPool {
 public:
  Stack take() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        const Stack s = free_.back();
        free_.pop_back();
        return s;
      }
    }
    const size_t page = 4096, size = stack_bytes();
    void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a %zu-byte fiber stack", size);
    mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    return {static_cast<unsigned char*>(p) + page, size};
  }
  void give(const Stack& s) {
    const std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(s);
  }

 private:
  std::mutex mutex_;
  std::vector<Stack> free_;
};

StackPool& stacks() {
  static StackPool* pool = new StackPool;  // never destroyed: stacks may outlive static destructors
  return *pool;
}

enum class Wait { Ready, Barrier, Warp, Grid, Cluster, Exited };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::SyncWarp: return "__syncwarp";
  }
  return "?";
}

struct Block;
struct Launch;
struct Cluster;

struct Thread {
  Coords coords;
  int index = 0;  // linear index in the block (x fastest)
  Block* block = nullptr;
  Stack stack;
  void* sp = nullptr;
  Wait wait = Wait::Ready;
  const char* file = "";
  int line = 0;
  WarpOp op = WarpOp::SyncWarp;
  unsigned mask = 0;
  uint64_t bits = 0, result = 0;
  int arg = 0, width = 32;
  bool arrived = false;       // at the cluster barrier's current phase, not yet waited for
  uint64_t arrive_phase = 0;  // the cluster barrier phase it arrived at
#ifdef CUDA_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

enum class BlockStop { Exited, AtGrid, Phase };

struct Block {
  Launch* launch = nullptr;
  dim3 index;
  std::vector<Thread> threads;
  std::deque<int> ready;
  std::mt19937_64 rng;
  unsigned char* smem = nullptr;
  void* scheduler_sp = nullptr;
  int live = 0, at_barrier = 0, at_grid = 0, at_cluster = 0;
  const Thread* barrier_first = nullptr;  // the first thread waiting at the current barrier
  Cluster* cluster = nullptr;             // null outside a cluster launch
  unsigned cluster_rank = 0;
#ifdef CUDA_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

// The blocks of one cluster and its barrier: a phase completes when every thread of every block
// has arrived; arrivals and releases happen during some block's turn (one block runs at a time).
struct Cluster {
  std::vector<Block*> blocks;  // by rank
  int threads = 0;
  int arrivals = 0;
  uint64_t phase = 0;
};

struct Launch {
  LaunchConfig config;
  const std::function<void()>* body = nullptr;
  std::string kernel_name;
};

thread_local Block* tl_block = nullptr;
thread_local Thread* tl_thread = nullptr;

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "kernel %p", kernel);
  return buf;
}

std::string where(const Thread& t) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]", t.coords.block.x,
                t.coords.block.y, t.coords.block.z, t.coords.thread.x, t.coords.thread.y, t.coords.thread.z,
                t.index / 32, t.index % 32);
  return buf;
}

std::string waiting_at(const Thread& t) {
  char buf[512];
  switch (t.wait) {
    case Wait::Barrier: std::snprintf(buf, sizeof buf, "__syncthreads() at %s:%d", t.file, t.line); break;
    case Wait::Grid: std::snprintf(buf, sizeof buf, "grid.sync() at %s:%d", t.file, t.line); break;
    case Wait::Cluster: std::snprintf(buf, sizeof buf, "the cluster barrier (wait) at %s:%d", t.file, t.line); break;
    case Wait::Warp:
      std::snprintf(buf, sizeof buf, "%s(mask 0x%08x) at %s:%d", op_name(t.op), t.mask, t.file, t.line);
      break;
    case Wait::Exited: return "has exited";
    case Wait::Ready: return "is running";
  }
  return buf;
}

extern "C" void cuda_emu_fiber_main(Thread* t);

// Scheduler -> fiber.
void resume(Block& b, Thread& t) {
  tl_thread = &t;
  current_coords = &t.coords;
  blockDim = t.coords.block_dim;
  gridDim = t.coords.grid_dim;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, t.stack.base, t.stack.size);
#endif
  cuda_emu_switch(&b.scheduler_sp, t.sp);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
  tl_thread = nullptr;
  current_coords = nullptr;
}

// Fiber -> its block's scheduler; returns when the scheduler resumes the fiber.
void suspend(Thread& t) {
  Block& b = *t.block;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(t.wait == Wait::Exited ? nullptr : &t.fake_stack, b.scheduler_stack_bottom,
                    b.scheduler_stack_size);
#endif
  cuda_emu_switch(&t.sp, b.scheduler_sp);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
}

extern "C" void cuda_emu_fiber_main(Thread* t) {
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &t->block->scheduler_stack_bottom, &t->block->scheduler_stack_size);
#endif
  (*t->block->launch->body)();
  t->wait = Wait::Exited;
  suspend(*t);
  std::abort();  // an exited fiber is never resumed
}

void prepare_fiber(Thread& t) {
  t.stack = stacks().take();
  // The frame cuda_emu_switch pops: MXCSR + x87 control word, r15, r14, r13, r12, rbx, rbp, return.
  auto top = reinterpret_cast<uintptr_t>(t.stack.base + t.stack.size) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top) - 8;
  frame[0] = 0x1F80ull | (0x037Full << 32);  // the default MXCSR and x87 control word
  frame[1] = frame[2] = frame[3] = 0;
  frame[4] = reinterpret_cast<uint64_t>(&t);
  frame[5] = reinterpret_cast<uint64_t>(&cuda_emu_fiber_main);
  frame[6] = 0;
  frame[7] = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);
  t.sp = frame;
}

// ---- the block scheduler ----------------------------------------------------------------------

void make_ready(Block& b, Thread& t) {
  t.wait = Wait::Ready;
  b.ready.push_back(t.index);
}

Thread* next_ready(Block& b) {
  if (b.ready.empty()) return nullptr;
  int i;
  if (schedule() == Schedule::Random) {
    const size_t k = b.rng() % b.ready.size();
    i = b.ready[k];
    b.ready[k] = b.ready.back();
    b.ready.pop_back();
  } else {
    i = b.ready.front();
    b.ready.pop_front();
  }
  return &b.threads[i];
}

// Lanes of t's warp in lane order (reverse order for the reverse schedule).
template <class F>
void for_lanes(Block& b, const Thread& t, unsigned mask, F&& f) {
  const int warp0 = t.index / 32 * 32;
  for (int k = 0; k < 32; ++k) {
    const int lane = schedule() == Schedule::Reverse ? 31 - k : k;
    if (mask & (1u << lane)) f(lane, warp0 + lane < static_cast<int>(b.threads.size()) ? &b.threads[warp0 + lane] : nullptr);
  }
}

// t has arrived at a warp collective: when every lane of its mask has, compute each lane's result.
void try_complete_warp(Block& b, Thread& t) {
  const int lane = t.index % 32;
  if (!(t.mask & (1u << lane))) {
    fail("%s: %s calls %s with mask 0x%08x, which does not include its own lane", b.launch->kernel_name.c_str(),
         where(t).c_str(), waiting_at(t).c_str(), t.mask);
  }
  bool complete = true;
  for_lanes(b, t, t.mask, [&](int l, Thread* u) {
    if (!u) {
      fail("%s: %s waits at %s for lane %d, which does not exist (the block has %zu threads)",
           b.launch->kernel_name.c_str(), where(t).c_str(), waiting_at(t).c_str(), l, b.threads.size());
    }
    switch (u->wait) {
      case Wait::Ready: complete = false; break;
      case Wait::Warp:
        if (u->mask != t.mask || u->op != t.op) {
          fail("%s: warp collectives do not match: %s waits at %s, %s at %s", b.launch->kernel_name.c_str(),
               where(t).c_str(), waiting_at(t).c_str(), where(*u).c_str(), waiting_at(*u).c_str());
        }
        break;
      default:
        fail("%s: %s waits at %s for lane %d, which %s%s", b.launch->kernel_name.c_str(), where(t).c_str(),
             waiting_at(t).c_str(), l, u->wait == Wait::Exited ? "" : "waits at ", waiting_at(*u).c_str());
    }
  });
  if (!complete) return;
  const int warp0 = t.index / 32 * 32;
  unsigned vote = 0;
  for_lanes(b, t, t.mask, [&](int l, Thread* u) { vote |= (u->bits & 1u) << l; });
  for_lanes(b, t, t.mask, [&](int l, Thread* u) {
    const int w = u->width;
    if (w <= 0 || w > 32 || (w & (w - 1)) != 0) {
      fail("%s: %s: width %d of %s is not a power of two in [1, 32]", b.launch->kernel_name.c_str(),
           where(*u).c_str(), w, op_name(u->op));
    }
    const int base = l & ~(w - 1);
    int src = l;
    switch (u->op) {
      case WarpOp::Shfl: src = base + (u->arg % w + w) % w; break;
      case WarpOp::ShflUp: src = l - u->arg >= base ? l - u->arg : l; break;
      case WarpOp::ShflDown: src = l + u->arg < base + w ? l + u->arg : l; break;
      case WarpOp::ShflXor: src = (l ^ u->arg) < base + w && (l ^ u->arg) >= 0 ? l ^ u->arg : l; break;
      case WarpOp::Ballot: u->result = vote; break;
      case WarpOp::Any: u->result = vote != 0; break;
      case WarpOp::All: u->result = vote == t.mask; break;
      case WarpOp::SyncWarp: u->result = 0; break;
    }
    if (u->op == WarpOp::Shfl || u->op == WarpOp::ShflUp || u->op == WarpOp::ShflDown || u->op == WarpOp::ShflXor) {
      if (!(t.mask & (1u << src))) {
        fail("%s: %s reads lane %d at %s, which is not in the mask (its value is undefined)",
             b.launch->kernel_name.c_str(), where(*u).c_str(), src, waiting_at(*u).c_str());
      }
      u->result = b.threads[warp0 + src].bits;
    }
  });
  for_lanes(b, t, t.mask, [&](int, Thread* u) { make_ready(b, *u); });
}

void on_exit(Block& b, Thread& t) {
  --b.live;
  // A lane of the warp that waits for this one would wait forever.
  const int warp0 = t.index / 32 * 32;
  for (int l = 0; l < 32 && warp0 + l < static_cast<int>(b.threads.size()); ++l) {
    const Thread& u = b.threads[warp0 + l];
    if (u.wait == Wait::Warp && (u.mask & (1u << (t.index % 32)))) {
      fail("%s: %s waits at %s for lane %d, which has exited", b.launch->kernel_name.c_str(), where(u).c_str(),
           waiting_at(u).c_str(), t.index % 32);
    }
  }
}

// Runs the block's threads until every live thread waits for something outside the block (a grid
// barrier), all have exited, or (random schedule) a block barrier was released.
BlockStop run_block(Block& b) {
  for (;;) {
    if (Thread* t = next_ready(b)) {
      resume(b, *t);
      switch (t->wait) {
        case Wait::Exited: on_exit(b, *t); break;
        case Wait::Warp: try_complete_warp(b, *t); break;
        case Wait::Barrier:
          if (b.at_barrier++ == 0) {
            b.barrier_first = t;
          } else if (b.barrier_first->line != t->line || std::strcmp(b.barrier_first->file, t->file) != 0) {
            fail("%s: divergent __syncthreads(): %s waits at %s, %s at %s", b.launch->kernel_name.c_str(),
                 where(*b.barrier_first).c_str(), waiting_at(*b.barrier_first).c_str(), where(*t).c_str(),
                 waiting_at(*t).c_str());
          }
          break;
        case Wait::Grid: ++b.at_grid; break;
        case Wait::Cluster: ++b.at_cluster; break;
        case Wait::Ready: fail("internal: a fiber yielded without waiting");
      }
      continue;
    }
    if (b.live == 0) return BlockStop::Exited;
    for (const Thread& t : b.threads) {
      if (t.wait != Wait::Warp) continue;
      // Its group is incomplete and nothing can run: some lane of its mask waits elsewhere.
      for (int l = 0; l < 32; ++l) {
        const Thread& u = b.threads[t.index / 32 * 32 + l];
        if ((t.mask & (1u << l)) && u.wait != Wait::Warp && u.wait != Wait::Cluster) {
          fail("%s: deadlock: %s waits at %s for lane %d, which waits at %s", b.launch->kernel_name.c_str(),
               where(t).c_str(), waiting_at(t).c_str(), l, waiting_at(u).c_str());
        }
      }
    }
    // Threads at the cluster barrier are released by the other blocks' arrivals; the launch's
    // scheduler finds a cluster that can never complete.
    if (b.at_cluster > 0) return BlockStop::AtGrid;
    if (b.at_barrier > 0 && b.at_grid > 0) {
      const Thread* g = nullptr;
      for (const Thread& t : b.threads) g = t.wait == Wait::Grid ? &t : g;
      fail("%s: deadlock: %s waits at %s while %s waits at %s", b.launch->kernel_name.c_str(),
           where(*b.barrier_first).c_str(), waiting_at(*b.barrier_first).c_str(), where(*g).c_str(),
           waiting_at(*g).c_str());
    }
    if (b.at_barrier > 0) {  // every live thread is at the barrier (exited threads count as arrived)
      b.at_barrier = 0;
      b.barrier_first = nullptr;
      const int n = static_cast<int>(b.threads.size());
      for (int k = 0; k < n; ++k) {
        Thread& t = b.threads[schedule() == Schedule::Reverse ? n - 1 - k : k];
        if (t.wait == Wait::Barrier) make_ready(b, t);
      }
      if (schedule() == Schedule::Random) return BlockStop::Phase;
      continue;
    }
    if (b.live != static_cast<int>(b.threads.size())) {
      const Thread* g = nullptr;
      const Thread* gone = nullptr;
      for (const Thread& t : b.threads) {
        if (t.wait == Wait::Grid) g = &t;
        if (t.wait == Wait::Exited) gone = &t;
      }
      fail("%s: %s has exited while %s waits at %s (a grid barrier needs every thread of every block)",
           b.launch->kernel_name.c_str(), where(*gone).c_str(), where(*g).c_str(), waiting_at(*g).c_str());
    }
    return BlockStop::AtGrid;
  }
}

void release_grid(Block& b) {
  b.at_grid = 0;
  const int n = static_cast<int>(b.threads.size());
  for (int k = 0; k < n; ++k) make_ready(b, b.threads[schedule() == Schedule::Reverse ? n - 1 - k : k]);
}

std::unique_ptr<Block> make_block(Launch& launch, unsigned linear, uint64_t seed) {
  const LaunchConfig& c = launch.config;
  auto b = std::make_unique<Block>();
  b->launch = &launch;
  b->index = dim3(linear % c.grid.x, linear / c.grid.x % c.grid.y, linear / (c.grid.x * c.grid.y));
  b->rng.seed(seed * 0x9E3779B97F4A7C15ull + linear);
  const unsigned n = c.block.x * c.block.y * c.block.z;
  b->threads.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b->threads[i];
    t.index = static_cast<int>(i);
    t.block = b.get();
    t.coords = {dim3(i % c.block.x, i / c.block.x % c.block.y, i / (c.block.x * c.block.y)), b->index, c.block, c.grid};
    prepare_fiber(t);
  }
  b->live = static_cast<int>(n);
  for (unsigned k = 0; k < n; ++k) make_ready(*b, b->threads[schedule() == Schedule::Reverse ? n - 1 - k : k]);
  // Dynamic shared memory: exactly the launch's size, every byte 0xFF (a NaN in every float type),
  // so reads before writes show up and overruns reach the end of a heap allocation.
  b->smem = static_cast<unsigned char*>(std::malloc(c.smem ? c.smem : 1));
  std::memset(b->smem, 0xFF, c.smem);
  return b;
}

void free_block(Block& b) {
  for (Thread& t : b.threads) stacks().give(t.stack);
  std::free(b.smem);
}

// Runs a block on the calling OS thread until it stops.
BlockStop step_block(Block& b) {
  tl_block = &b;
  const BlockStop s = run_block(b);
  tl_block = nullptr;
  return s;
}

// ---- launches ---------------------------------------------------------------------------------

std::mutex attr_mutex;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::map<const void*, int> nonportable_cluster;  // cudaFuncAttributeNonPortableClusterSizeAllowed per kernel
int device_max_cluster = 16;                     // set_max_cluster_size
std::atomic<uint64_t> launch_count{0};
std::atomic<int> last_error{cudaSuccess};

int dynamic_smem_limit(const void* kernel) {
  const std::lock_guard<std::mutex> lock(attr_mutex);
  const auto it = max_dynamic_smem.find(kernel);
  return it == max_dynamic_smem.end() ? static_cast<int>(device().sharedMemPerBlock) : it->second;
}

double timeout_seconds() { return static_cast<double>(env_long("CUDA_EMU_TIMEOUT_S", 300)); }

// A turn-taking hand-off between the launch scheduler and one block's OS thread.
struct Turn {
  std::mutex mutex;
  std::condition_variable cv;
  bool block_turn = false;
  BlockStop stop = BlockStop::Phase;
};

// Blocks of an ordinary launch cannot wait for each other: they run one after another, in the
// schedule's order, on one worker thread (so a hung kernel still trips the watchdog).
void run_ordinary(Launch& launch, unsigned blocks, uint64_t seed) {
  std::vector<unsigned> order(blocks);
  for (unsigned i = 0; i < blocks; ++i) order[i] = schedule() == Schedule::Reverse ? blocks - 1 - i : i;
  if (schedule() == Schedule::Random) std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread worker([&] {
    for (unsigned linear : order) {
      std::unique_ptr<Block> b = make_block(launch, linear, seed);
      while (step_block(*b) != BlockStop::Exited) {}
      free_block(*b);
    }
    const std::lock_guard<std::mutex> lock(m);
    done = true;
    cv.notify_all();
  });
  {
    std::unique_lock<std::mutex> lock(m);
    if (!cv.wait_for(lock, std::chrono::duration<double>(timeout_seconds()), [&] { return done; })) {
      fail("%s: the launch did not finish within %.0f s (CUDA_EMU_TIMEOUT_S): a thread loops without reaching a "
           "synchronisation point",
           launch.kernel_name.c_str(), timeout_seconds());
    }
  }
  worker.join();
}

// Blocks that may wait for each other run resident at once, each on its own OS thread: every
// block of a cooperative launch, or the blocks of one cluster. The scheduler hands one block at a
// time a turn, so a schedule replays exactly. `cluster` is null for a cooperative launch.
void run_resident(Launch& launch, const std::vector<unsigned>& linear, uint64_t seed, Cluster* cluster) {
  const unsigned blocks = static_cast<unsigned>(linear.size());
  std::vector<std::unique_ptr<Block>> bs;
  std::vector<std::unique_ptr<Turn>> turns;
  for (unsigned i = 0; i < blocks; ++i) {
    bs.push_back(make_block(launch, linear[i], seed));
    turns.push_back(std::make_unique<Turn>());
    if (cluster) {
      bs[i]->cluster = cluster;
      bs[i]->cluster_rank = i;
      cluster->blocks.push_back(bs[i].get());
      cluster->threads += static_cast<int>(bs[i]->threads.size());
    }
  }
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < blocks; ++i) {
    threads.emplace_back([&, i] {
      Turn& turn = *turns[i];
      for (;;) {
        {
          std::unique_lock<std::mutex> lock(turn.mutex);
          turn.cv.wait(lock, [&] { return turn.block_turn; });
        }
        const BlockStop s = step_block(*bs[i]);
        {
          const std::lock_guard<std::mutex> lock(turn.mutex);
          turn.stop = s;
          turn.block_turn = false;
        }
        turn.cv.notify_all();
        if (s == BlockStop::Exited) return;
      }
    });
  }
  enum class State { Runnable, Waiting, Exited };
  std::vector<State> state(blocks, State::Runnable);
  std::mt19937_64 rng(seed);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_seconds());
  for (;;) {
    std::vector<unsigned> runnable;
    for (unsigned i = 0; i < blocks; ++i) {
      // A block waiting at the cluster barrier is woken by another block's arrival.
      if (state[i] == State::Waiting && !bs[i]->ready.empty()) state[i] = State::Runnable;
      if (state[i] == State::Runnable) runnable.push_back(i);
    }
    if (runnable.empty()) {
      int exited = 0, waiting = -1;
      for (unsigned i = 0; i < blocks; ++i) {
        if (state[i] == State::Exited) ++exited;
        if (state[i] == State::Waiting) waiting = static_cast<int>(i);
      }
      if (exited == static_cast<int>(blocks)) break;
      if (cluster) {
        // Nothing can run and the barrier's phase is incomplete: some thread never arrives.
        const Thread* w = nullptr;
        const Thread* gone = nullptr;
        for (auto& b : bs) {
          for (const Thread& t : b->threads) {
            if (t.wait == Wait::Cluster && !w) w = &t;
            if (t.wait == Wait::Exited && !gone) gone = &t;
          }
        }
        if (w && gone) {
          fail("%s: %s has exited while %s waits at %s (a cluster barrier needs every thread of the cluster)",
               launch.kernel_name.c_str(), where(*gone).c_str(), where(*w).c_str(), waiting_at(*w).c_str());
        }
        const Thread& t = bs[waiting]->threads[0];
        fail("%s: deadlock in a cluster: %s waits at %s, %d of the cluster's %d threads have arrived",
             launch.kernel_name.c_str(), where(w ? *w : t).c_str(), waiting_at(w ? *w : t).c_str(), cluster->arrivals,
             cluster->threads);
      }
      if (exited > 0) {
        const Thread& t = bs[waiting]->threads[0];
        fail("%s: %d of %u blocks have exited while %s waits at %s", launch.kernel_name.c_str(), exited, blocks,
             where(t).c_str(), waiting_at(t).c_str());
      }
      for (unsigned i = 0; i < blocks; ++i) {
        release_grid(*bs[i]);
        state[i] = State::Runnable;
      }
      continue;
    }
    unsigned i;
    switch (schedule()) {
      case Schedule::InOrder: i = runnable.front(); break;
      case Schedule::Reverse: i = runnable.back(); break;
      default: i = runnable[rng() % runnable.size()]; break;
    }
    Turn& turn = *turns[i];
    {
      std::unique_lock<std::mutex> lock(turn.mutex);
      turn.block_turn = true;
      turn.cv.notify_all();
      if (!turn.cv.wait_until(lock, deadline, [&] { return !turn.block_turn; })) {
        fail("%s: the launch did not finish within %.0f s (CUDA_EMU_TIMEOUT_S): block %u loops without reaching a "
             "synchronisation point",
             launch.kernel_name.c_str(), timeout_seconds(), linear[i]);
      }
      state[i] = turn.stop == BlockStop::Exited ? State::Exited
                 : turn.stop == BlockStop::AtGrid ? State::Waiting
                                                  : State::Runnable;
    }
  }
  for (std::thread& t : threads) t.join();
  for (auto& b : bs) free_block(*b);
}

void run_cooperative(Launch& launch, unsigned blocks, uint64_t seed) {
  std::vector<unsigned> linear(blocks);
  for (unsigned i = 0; i < blocks; ++i) linear[i] = i;
  run_resident(launch, linear, seed, nullptr);
}

// Clusters cannot wait for each other: they run one after another in the schedule's order, the
// blocks of each resident together. A cluster's blocks are those whose indices differ only below
// the cluster dimensions; the rank runs x fastest.
void run_clustered(Launch& launch, uint64_t seed) {
  const dim3 g = launch.config.grid, c = launch.config.cluster;
  const dim3 n(g.x / c.x, g.y / c.y, g.z / c.z);
  const unsigned clusters = n.x * n.y * n.z;
  std::vector<unsigned> order(clusters);
  for (unsigned i = 0; i < clusters; ++i) order[i] = schedule() == Schedule::Reverse ? clusters - 1 - i : i;
  if (schedule() == Schedule::Random) std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  for (unsigned k : order) {
    const dim3 ci(k % n.x, k / n.x % n.y, k / (n.x * n.y));
    std::vector<unsigned> linear;
    for (unsigned z = 0; z < c.z; ++z) {
      for (unsigned y = 0; y < c.y; ++y) {
        for (unsigned x = 0; x < c.x; ++x) {
          const unsigned bx = ci.x * c.x + x, by = ci.y * c.y + y, bz = ci.z * c.z + z;
          linear.push_back(bx + g.x * (by + g.y * bz));
        }
      }
    }
    Cluster cluster;
    run_resident(launch, linear, seed + k, &cluster);
  }
}

}  // namespace

// ---- the interface of runtime.h ---------------------------------------------------------------

void fail(const char* fmt, ...) {
  std::fprintf(stderr, "cuda_emu: error: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

namespace {
cudaDeviceProp& device_state() {
  static cudaDeviceProp p = make_device();
  return p;
}
}  // namespace

const cudaDeviceProp& device() { return device_state(); }

void set_device_limits(int sms, size_t smem_per_block_optin) {
  cudaDeviceProp& p = device_state();
  p.multiProcessorCount = sms;
  p.sharedMemPerBlockOptin = smem_per_block_optin;
  p.sharedMemPerMultiprocessor = smem_per_block_optin + p.reservedSharedMemPerBlock;
}

void syncthreads(const char* file, int line) {
  Thread* t = tl_thread;
  if (!t) fail("__syncthreads() at %s:%d called outside a kernel", file, line);
  t->wait = Wait::Barrier;
  t->file = file;
  t->line = line;
  suspend(*t);
}

void grid_sync(const char* file, int line) {
  Thread* t = tl_thread;
  if (!t) fail("grid.sync() at %s:%d called outside a kernel", file, line);
  if (!t->block->launch->config.cooperative) {
    fail("%s: %s calls grid.sync() at %s:%d in a launch that is not cooperative (use cudaLaunchCooperativeKernel)",
         t->block->launch->kernel_name.c_str(), where(*t).c_str(), file, line);
  }
  t->wait = Wait::Grid;
  t->file = file;
  t->line = line;
  suspend(*t);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Thread* t = tl_thread;
  if (!t) fail("%s at %s:%d called outside a kernel", op_name(op), file, line);
  t->wait = Wait::Warp;
  t->op = op;
  t->mask = mask;
  t->bits = bits;
  t->arg = arg;
  t->width = width;
  t->file = file;
  t->line = line;
  suspend(*t);
  return t->result;
}

namespace {
Cluster& current_cluster(const char* what, const char* file, int line) {
  Thread* t = tl_thread;
  if (!t) fail("%s at %s:%d called outside a kernel", what, file, line);
  if (!t->block->cluster) {
    fail("%s: %s calls %s at %s:%d in a launch without clusters (launch with cudaLaunchKernelEx and "
         "cudaLaunchAttributeClusterDimension)",
         t->block->launch->kernel_name.c_str(), where(*t).c_str(), what, file, line);
  }
  return *t->block->cluster;
}
}  // namespace

void cluster_arrive(const char* file, int line) {
  Cluster& c = current_cluster("the cluster barrier's arrive", file, line);
  Thread& t = *tl_thread;
  if (t.arrived) {
    fail("%s: %s arrives at the cluster barrier at %s:%d twice without waiting (barrier_wait must follow each "
         "barrier_arrive)",
         t.block->launch->kernel_name.c_str(), where(t).c_str(), file, line);
  }
  t.arrived = true;
  t.arrive_phase = c.phase;
  if (++c.arrivals < c.threads) return;
  // The phase is complete: release every thread of the cluster that waits for it.
  c.arrivals = 0;
  ++c.phase;
  for (Block* b : c.blocks) {
    const int n = static_cast<int>(b->threads.size());
    for (int k = 0; k < n; ++k) {
      Thread& u = b->threads[schedule() == Schedule::Reverse ? n - 1 - k : k];
      if (u.wait == Wait::Cluster) {
        --b->at_cluster;
        make_ready(*b, u);
      }
    }
  }
}

void cluster_wait(const char* file, int line) {
  Cluster& c = current_cluster("the cluster barrier's wait", file, line);
  Thread& t = *tl_thread;
  if (!t.arrived) {
    fail("%s: %s waits at the cluster barrier at %s:%d without having arrived (barrier_arrive must precede "
         "barrier_wait)",
         t.block->launch->kernel_name.c_str(), where(t).c_str(), file, line);
  }
  if (c.phase == t.arrive_phase) {
    t.wait = Wait::Cluster;
    t.file = file;
    t.line = line;
    suspend(t);
  }
  t.arrived = false;
}

unsigned cluster_rank(const char* file, int line) { return current_cluster("block_rank()", file, line), tl_block->cluster_rank; }

dim3 cluster_dims(const char* file, int line) {
  current_cluster("dim_blocks()", file, line);
  return tl_block->launch->config.cluster;
}

void* map_shared(void* addr, unsigned rank, const char* file, int line) {
  Cluster& c = current_cluster("map_shared_rank()", file, line);
  Block& b = *tl_block;
  if (rank >= c.blocks.size()) {
    fail("%s: %s maps shared memory of rank %u at %s:%d; the cluster has %zu blocks", b.launch->kernel_name.c_str(),
         where(*tl_thread).c_str(), rank, file, line, c.blocks.size());
  }
  const auto* p = static_cast<unsigned char*>(addr);
  const size_t bytes = b.launch->config.smem;
  if (p < b.smem || p >= b.smem + bytes) {
    fail("%s: %s maps %p at %s:%d, which is not in the block's dynamic shared memory (the harness maps only dynamic "
         "shared memory; static __shared__ variables are not supported)",
         b.launch->kernel_name.c_str(), where(*tl_thread).c_str(), addr, file, line);
  }
  return c.blocks[rank]->smem + (p - b.smem);
}

unsigned char* dynamic_shared_memory() {
  if (!tl_block) fail("dynamic shared memory used outside a kernel");
  return tl_block->smem;
}

cudaError_t set_nonportable_cluster(const void* kernel, int allowed) {
  if (allowed != 0 && allowed != 1) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(attr_mutex);
  nonportable_cluster[kernel] = allowed;
  return cudaSuccess;
}

void set_max_cluster_size(int blocks) {
  const std::lock_guard<std::mutex> lock(attr_mutex);
  device_max_cluster = blocks;
}

int max_cluster_blocks(const void* kernel) {
  const std::lock_guard<std::mutex> lock(attr_mutex);
  const auto it = nonportable_cluster.find(kernel);
  return it != nonportable_cluster.end() && it->second ? device_max_cluster : std::min(device_max_cluster, 8);
}

int max_active_clusters(const void* kernel, int threads, size_t smem, dim3 cluster) {
  const uint64_t size = 1ull * cluster.x * cluster.y * cluster.z;
  if (size == 0 || size > static_cast<uint64_t>(max_cluster_blocks(kernel))) return 0;
  return static_cast<int>(1ull * max_active_blocks(kernel, threads, smem) * device().multiProcessorCount / size);
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > device().sharedMemPerBlockOptin) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(attr_mutex);
  max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

int max_active_blocks(const void* kernel, int threads, size_t smem) {
  const cudaDeviceProp& d = device();
  if (threads <= 0 || threads > d.maxThreadsPerBlock) return 0;
  if (smem > static_cast<size_t>(std::max<int>(dynamic_smem_limit(kernel), 0))) return 0;
  const int by_threads = d.maxThreadsPerMultiProcessor / ((threads + 31) / 32 * 32);
  const int by_smem = static_cast<int>(d.sharedMemPerMultiprocessor / (smem + d.reservedSharedMemPerBlock));
  return std::min({by_threads, by_smem, d.maxBlocksPerMultiProcessor});
}

void set_last_error(cudaError_t e) { last_error = e; }

cudaError_t launch(const LaunchConfig& config, const std::function<void()>& body) {
  const cudaDeviceProp& d = device();
  const dim3 g = config.grid, bl = config.block;
  const uint64_t threads = 1ull * bl.x * bl.y * bl.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || bl.x == 0 || bl.y == 0 || bl.z == 0 ||
      bl.z > 64 || threads > static_cast<uint64_t>(d.maxThreadsPerBlock)) {
    return cudaErrorInvalidConfiguration;
  }
  if (config.smem > static_cast<size_t>(dynamic_smem_limit(config.kernel))) return cudaErrorInvalidValue;
  const uint64_t blocks = 1ull * g.x * g.y * g.z;
  const dim3 c = config.cluster;
  const bool clustered = 1ull * c.x * c.y * c.z > 1;
  if (clustered) {
    if (config.cooperative) return cudaErrorInvalidValue;  // not modelled together
    if (g.x % c.x || g.y % c.y || g.z % c.z) return cudaErrorInvalidClusterSize;
    if (1ull * c.x * c.y * c.z > static_cast<uint64_t>(max_cluster_blocks(config.kernel))) {
      return cudaErrorInvalidClusterSize;
    }
    if (max_active_clusters(config.kernel, static_cast<int>(threads), config.smem, c) == 0) {
      return cudaErrorLaunchOutOfResources;
    }
  }
  if (config.cooperative &&
      blocks > static_cast<uint64_t>(max_active_blocks(config.kernel, static_cast<int>(threads), config.smem)) *
                   static_cast<uint64_t>(d.multiProcessorCount)) {
    return cudaErrorCooperativeLaunchTooLarge;
  }
  if (tl_thread) fail("a kernel launch from device code is not supported");
  Launch l;
  l.config = config;
  l.body = &body;
  l.kernel_name = kernel_name(config.kernel);
  const uint64_t seed = static_cast<uint64_t>(env_long("CUDA_EMU_SEED", 1)) * 1000003ull + launch_count++;
  if (config.cooperative) {
    run_cooperative(l, static_cast<unsigned>(blocks), seed);
  } else if (clustered) {
    run_clustered(l, seed);
  } else {
    run_ordinary(l, static_cast<unsigned>(blocks), seed);
  }
  return cudaSuccess;
}

}  // namespace cuda_emu

// ---- runtime API ------------------------------------------------------------------------------

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(cuda_emu::last_error.exchange(cudaSuccess)); }
cudaError_t cudaPeekAtLastError() { return static_cast<cudaError_t>(cuda_emu::last_error.load()); }

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  *prop = cuda_emu::device();
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

cudaError_t cudaMallocManaged(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
