// Runs the C++ unit tests (harness.h): `dito_fast_cpp_tests [PREFIX ...]`. Exit status 0 when every
// selected test passed or was skipped, 1 when one failed or none matched.
#include "harness.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace dito_test {
namespace {

struct Case {
  std::string name;
  std::string capability;  // empty: any CPU
  TestFn fn;
};

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

}  // namespace

// Checked here, in code built for any x86-64, before a test of instruction set `cap` runs (the
// test's own code may use the set's instructions before its first statement).
bool cpu_runs(const std::string& cap) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cap == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  }
  if (cap == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return cap.empty() || cap == "DEFAULT";
}

bool add(const char* group, const char* capability, const char* name, TestFn fn) {
  std::string full = std::string(group) + ".";
  if (capability != nullptr) full += std::string(capability) + ".";
  registry().push_back({full + name, capability != nullptr ? capability : "", fn});
  return true;
}

}  // namespace dito_test

int main(int argc, char** argv) {
  auto& cases = dito_test::registry();
  std::sort(cases.begin(), cases.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  int passed = 0, skipped = 0, failed = 0;
  for (const auto& c : cases) {
    bool selected = argc < 2;
    for (int i = 1; i < argc; ++i) selected = selected || c.name.rfind(argv[i], 0) == 0;
    if (!selected) continue;
    if (!dito_test::cpu_runs(c.capability)) {
      ++skipped;
      std::printf("SKIP %s: this CPU lacks %s\n", c.name.c_str(), c.capability.c_str());
      continue;
    }
    try {
      c.fn();
      ++passed;
      std::printf("PASS %s\n", c.name.c_str());
    } catch (const dito_test::Skipped& e) {
      ++skipped;
      std::printf("SKIP %s: %s\n", c.name.c_str(), e.what());
    } catch (const dito_test::Failure& e) {
      ++failed;
      std::printf("FAIL %s\n  %s\n", c.name.c_str(), e.what());
    } catch (const std::exception& e) {
      ++failed;
      const auto* error = dynamic_cast<const c10::Error*>(&e);  // its message without torch's backtrace
      std::printf("FAIL %s\n  unexpected exception: %s\n", c.name.c_str(), error ? error->what_without_backtrace() : e.what());
    }
    std::fflush(stdout);
  }
  std::printf("%d passed, %d skipped, %d failed\n", passed, skipped, failed);
  if (passed + skipped + failed == 0) {
    std::printf("no test matched\n");
    return 1;
  }
  return failed == 0 ? 0 : 1;
}
