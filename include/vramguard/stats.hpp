// SPDX-License-Identifier: MIT
// What a guard has done, as plain counters.
#pragma once

#include <vramguard/version.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>

VRAMGUARD_BEGIN_NAMESPACE

// Every field counts since the guard was made and only grows. for_each_counter() below lists them
// with a one-line help: /status pages and the Prometheus exporter (prometheus.hpp) read them there.
struct Stats {
    std::uint64_t calls = 0;                   // load() and encode() calls
    std::uint64_t ooms = 0;                    // OOMs caught (each is also logged at WARN)
    std::uint64_t retries = 0;                 // load attempts after an OOM, single items retried
    std::uint64_t halvings = 0;                // encode chunks shrunk after an OOM
    std::uint64_t single_item_calls = 0;       // batches of one run through the device semaphore
    std::uint64_t rejections = 0;              // admissions refused (InsufficientMemory thrown)
    std::uint64_t waits = 0;                   // admissions or retries that waited for memory
    std::uint64_t grow_backs = 0;              // times a key's learned batch limit was raised again
    std::uint64_t profile_writes = 0;          // profile files written (by the background writer)
    std::uint64_t profile_write_failures = 0;  // profile writes that failed or were put off
};

// Calls visit(name, help, value) once per counter of `stats`, in declaration order. The one list
// of the counters: a new counter is a field above and a line here (the static_assert below fails
// when a field is missing). Names are snake_case, fit for JSON keys and Prometheus names.
template <class Visitor>
constexpr void for_each_counter(const Stats& stats, Visitor&& visit) {
    visit("calls", "Guard::load and Guard::encode calls", stats.calls);
    visit("ooms", "out-of-memory errors the guard caught and handled", stats.ooms);
    visit("retries", "load attempts after an out-of-memory error, and single items retried",
          stats.retries);
    visit("halvings", "encode chunks shrunk after an out-of-memory error", stats.halvings);
    visit("single_item_calls", "batches of one item run through the device's single-item turn",
          stats.single_item_calls);
    visit("rejections", "admissions refused with InsufficientMemory", stats.rejections);
    visit("waits", "admissions or retries that waited for memory", stats.waits);
    visit("grow_backs",
          "times a key's learned batch limit was raised again (successes at the ceiling, or "
          "memory came back)",
          stats.grow_backs);
    visit("profile_writes", "profile files written by the background writer", stats.profile_writes);
    visit("profile_write_failures", "profile writes that failed or were put off",
          stats.profile_write_failures);
}

VRAMGUARD_END_NAMESPACE

// Internals that need the types above.
#include <vramguard/detail/atomic_stats.hpp>
