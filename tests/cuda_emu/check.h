// A minimal test runner for the harness's C++ tests (no dependency, so the emulator's own tests
// also build with nvcc for a real GPU). `prog [filter]` runs the tests whose name contains
// filter and ends with "N passed, M failed". Death tests run in a child process (the program
// itself, with --death NAME) and pass when it aborts with the expected message.
#pragma once

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

extern char** environ;

namespace check {

struct Test {
  std::string name;
  std::function<void()> body;
  const char* expected_abort;  // death tests: a substring of the abort message; else null
};

inline std::vector<Test>& registry() {
  static std::vector<Test> tests;
  return tests;
}

inline int& current_failures() {
  static int n = 0;
  return n;
}

inline bool add(const char* name, std::function<void()> body, const char* expected_abort = nullptr) {
  registry().push_back({name, std::move(body), expected_abort});
  return true;
}

inline void report(const char* file, int line, const std::string& what) {
  ++current_failures();
  std::fprintf(stderr, "  FAIL %s:%d: %s\n", file, line, what.c_str());
}

// Runs `prog --death name`; true when it died of a signal and its stderr holds `expected`.
inline bool run_death_test(const char* prog, const Test& t, std::string& log) {
  int out[2];
  if (pipe(out) != 0) return false;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 2);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  const char* argv[] = {prog, "--death", t.name.c_str(), nullptr};
  pid_t pid;
  const int rc = posix_spawn(&pid, prog, &actions, nullptr, const_cast<char**>(argv), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);
  if (rc != 0) {
    close(out[0]);
    log = "cannot start the child process";
    return false;
  }
  char buf[4096];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof buf)) > 0) log.append(buf, static_cast<size_t>(n));
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status) && log.find(t.expected_abort) != std::string::npos;
}

inline int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--death") == 0) {
    for (const Test& t : registry()) {
      if (t.name == argv[2]) {
        t.body();
        std::fprintf(stderr, "death test %s: the body returned without aborting\n", argv[2]);
        return 0;
      }
    }
    return 2;
  }
  const char* filter = argc > 1 ? argv[1] : "";
  // CUDA_EMU_SHARD=i/n: only the tests at positions i, i + n, ... of the registry (run.py runs a
  // build's tests in n processes side by side).
  int shard = 0, shards = 1;
  if (const char* s = std::getenv("CUDA_EMU_SHARD"); s != nullptr && std::sscanf(s, "%d/%d", &shard, &shards) != 2) {
    std::fprintf(stderr, "CUDA_EMU_SHARD must be i/n, got '%s'\n", s);
    return 2;
  }
  int passed = 0, failed = 0, position = -1;
  for (const Test& t : registry()) {
    ++position;
    if (t.name.find(filter) == std::string::npos || position % shards != shard) continue;
    const auto start = std::chrono::steady_clock::now();
    current_failures() = 0;
    if (t.expected_abort) {
      std::string log;
      if (!run_death_test(argv[0], t, log)) {
        report(__FILE__, __LINE__, "expected an abort with \"" + std::string(t.expected_abort) + "\"; the child printed:\n" + log);
      }
    } else {
      try {
        t.body();
      } catch (const std::exception& e) {
        // The first line: c10::Error appends a C++ backtrace.
        const std::string what = e.what();
        report(__FILE__, __LINE__, "exception: " + what.substr(0, what.find('\n')));
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const bool ok = current_failures() == 0;
    std::printf("%s %s (%.2f s)\n", ok ? "PASS" : "FAIL", t.name.c_str(), s);
    std::fflush(stdout);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 && (passed > 0 || *filter) ? 0 : 1;
}

}  // namespace check

#define CHECK_CONCAT2(a, b) a##b
#define CHECK_CONCAT(a, b) CHECK_CONCAT2(a, b)
// TEST(name) { body }
#define TEST(name)                                                          \
  static void name();                                                       \
  static const bool CHECK_CONCAT(name, _registered) = check::add(#name, name); \
  static void name()
// DEATH_TEST(name, "substring of the abort message") { body }
#define DEATH_TEST(name, expected)                                                    \
  static void name();                                                                 \
  static const bool CHECK_CONCAT(name, _registered) = check::add(#name, name, expected); \
  static void name()
#define EXPECT(cond, ...)                                                          \
  do {                                                                             \
    if (!(cond)) check::report(__FILE__, __LINE__, std::string(#cond) + " " + std::string(__VA_ARGS__)); \
  } while (0)
