// SPDX-License-Identifier: MIT
// The fuzzers' invariant check: a violated invariant aborts (libFuzzer then keeps the input as a
// crash reproducer) after naming the file, the line and the condition.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace vramguard_fuzz {

[[noreturn]] inline void violated(const char* what, const char* file, int line) {
    std::fprintf(stderr, "%s:%d: invariant violated: %s\n", file, line, what);
    std::abort();
}

}  // namespace vramguard_fuzz

#define FUZZ_FAIL(what) ::vramguard_fuzz::violated(what, __FILE__, __LINE__)
#define FUZZ_CHECK(cond)               \
    do {                               \
        if (!(cond)) FUZZ_FAIL(#cond); \
    } while (0)
