// The C++ unit tests' harness (torch ships no test framework and nothing is fetched at build time):
//   DITO_TEST(group, name) { ... }   registers the test "group.name" (the vector tests, compiled once
//                                    per instruction set, register "vec.<CAPABILITY>.name");
//   EXPECT(cond) << "context";       fails the test, with the context, when cond is false;
//   throw dito_test::Skipped("why");  skips it.
// main.cpp runs the tests whose names start with any of its arguments (all without arguments) and
// exits non-zero when one fails or when none matched; a test of an instruction set this CPU lacks
// is skipped there, before any of its code runs.
//
// The per-instruction-set units run their registration before main on any CPU, so it passes only
// pointers (no std::string built with, say, AVX-512 code on a CPU without it). Templates that those
// units and others both instantiate (std::vector, <random>) are kept once by the linker, the first
// object's copy: CMakeLists.txt puts the DEFAULT unit first, as for the kernels.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dito_test {

using TestFn = void (*)();

// Registers group.name (group.capability.name when capability is not null); returns true.
bool add(const char* group, const char* capability, const char* name, TestFn fn);

// Whether this CPU runs code built with the flags of CMakeLists.txt's instruction set cap ("AVX512",
// "AVX2", "DEFAULT"; "" for any).
bool cpu_runs(const std::string& cap);

struct Skipped : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Collects the message of a failed EXPECT and throws it as a Failure at the end of the statement.
class Fail {
 public:
  Fail(const char* file, int line, const char* cond) { msg_ << file << ":" << line << ": EXPECT(" << cond << ") failed: "; }
  template <typename T>
  Fail& operator<<(const T& v) {
    msg_ << v;
    return *this;
  }
  ~Fail() noexcept(false) { throw Failure(msg_.str()); }

 private:
  std::ostringstream msg_;
};

}  // namespace dito_test

#define DITO_TEST_CAT2(a, b) a##b
#define DITO_TEST_CAT(a, b) DITO_TEST_CAT2(a, b)
#define DITO_TEST_STR2(x) #x
#define DITO_TEST_STR(x) DITO_TEST_STR2(x)

#define DITO_TEST_IMPL(group, capability, name)                                                      \
  static void DITO_TEST_CAT(dito_test_, name)();                                                       \
  [[maybe_unused]] static const bool DITO_TEST_CAT(dito_test_registered_, name) =                     \
      ::dito_test::add(group, capability, #name, &DITO_TEST_CAT(dito_test_, name));                   \
  static void DITO_TEST_CAT(dito_test_, name)()

#define DITO_TEST(group, name) DITO_TEST_IMPL(group, nullptr, name)

#define EXPECT(cond) \
  if (cond) {        \
  } else             \
    ::dito_test::Fail(__FILE__, __LINE__, #cond)
