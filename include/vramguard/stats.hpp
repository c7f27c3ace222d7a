// SPDX-License-Identifier: MIT
// What a guard has done, as plain counters.
#pragma once

#include <vramguard/version.hpp>

#include <atomic>
#include <cstdint>

VRAMGUARD_BEGIN_NAMESPACE

struct Stats {
    std::uint64_t calls = 0;              // load and encode calls
    std::uint64_t ooms = 0;               // OOMs caught (each is also logged at WARN)
    std::uint64_t retries = 0;            // load attempts after an OOM, single items retried
    std::uint64_t halvings = 0;           // encode chunks shrunk after an OOM
    std::uint64_t single_item_calls = 0;  // batches of one run through the device semaphore
    std::uint64_t rejections = 0;         // admissions refused (InsufficientMemory thrown)
    std::uint64_t waits = 0;              // admissions or retries that waited for memory
    std::uint64_t grow_backs = 0;         // learned ceilings probed back up after successes
};

namespace detail {

// Relaxed atomics: counters are for reading, not for synchronising.
struct AtomicStats {
    std::atomic<std::uint64_t> calls{0}, ooms{0}, retries{0}, halvings{0}, single_item_calls{0},
        rejections{0}, waits{0}, grow_backs{0};

    static void bump(std::atomic<std::uint64_t>& counter) noexcept {
        counter.fetch_add(1, std::memory_order_relaxed);
    }
    Stats snapshot() const noexcept {
        const auto r = std::memory_order_relaxed;
        return Stats{calls.load(r),
                     ooms.load(r),
                     retries.load(r),
                     halvings.load(r),
                     single_item_calls.load(r),
                     rejections.load(r),
                     waits.load(r),
                     grow_backs.load(r)};
    }
};

}  // namespace detail

VRAMGUARD_END_NAMESPACE
