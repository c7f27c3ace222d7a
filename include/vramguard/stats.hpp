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

namespace detail {
// How many counters a for_each_counter overload visits, for the completeness checks.
template <class Counters>
constexpr std::size_t counter_count() {
    std::size_t count = 0;
    for_each_counter(Counters{}, [&count](const char*, const char*, std::uint64_t) { ++count; });
    return count;
}
}  // namespace detail

static_assert(sizeof(Stats) == detail::counter_count<Stats>() * sizeof(std::uint64_t),
              "for_each_counter(Stats) must visit every field of Stats");

namespace detail {

// A counter that many threads bump on every call without sharing a cache line: each thread adds
// to its own stripe, a reader sums them. Two cores bumping one atomic pay a cache-line transfer
// per call (100+ ns); on the fast path that would cost more than everything else together.
//
// Each stripe counts what was added and what was taken away separately, and sum() reads every
// "taken" before any "added". A unit taken away was added before it was taken, so the sum never
// reads below the least the true count held while sum() ran: a count that stays >= 1 throughout
// (one call hands over to the next) never reads 0. It can read above the truth (adds that land
// during the read), which for "is anyone else in flight?" is the careful side.
class StripedCounter {
   public:
    void add(std::int64_t n) noexcept {
        Stripe& mine = stripes_[stripe()];
        if (n >= 0)
            mine.added.fetch_add(static_cast<std::uint64_t>(n), std::memory_order_seq_cst);
        else
            mine.taken.fetch_add(static_cast<std::uint64_t>(-(n + 1)) + 1,
                                 std::memory_order_seq_cst);
    }
    // What was ever added, for a counter that only grows (half the loads of sum()).
    std::uint64_t added() const noexcept {
        std::uint64_t added = 0;
        for (const Stripe& stripe : stripes_) added += stripe.added.load(std::memory_order_seq_cst);
        return added;
    }
    std::int64_t sum() const noexcept {
        std::uint64_t taken = 0, added = 0;
        for (const Stripe& stripe : stripes_) taken += stripe.taken.load(std::memory_order_seq_cst);
        for (const Stripe& stripe : stripes_) added += stripe.added.load(std::memory_order_seq_cst);
        return static_cast<std::int64_t>(added - taken);
    }

   private:
    static constexpr std::size_t stripe_count = 16;
    struct alignas(64) Stripe {
        std::atomic<std::uint64_t> added{0};
        std::atomic<std::uint64_t> taken{0};
    };
    static std::size_t stripe() noexcept {
        static std::atomic<std::size_t> next{0};
        thread_local const std::size_t mine =
            next.fetch_add(1, std::memory_order_relaxed) % stripe_count;
        return mine;
    }
    Stripe stripes_[stripe_count];
};

// Relaxed atomics: counters are for reading, not for synchronising. `calls` is bumped on every
// call, so it is striped; the others count rare events.
struct AtomicStats {
    StripedCounter calls;
    std::atomic<std::uint64_t> ooms{0}, retries{0}, halvings{0}, single_item_calls{0},
        rejections{0}, waits{0}, grow_backs{0};

    static void bump(std::atomic<std::uint64_t>& counter) noexcept {
        counter.fetch_add(1, std::memory_order_relaxed);
    }
    Stats snapshot() const noexcept {
        const auto r = std::memory_order_relaxed;
        return Stats{static_cast<std::uint64_t>(calls.sum()),
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
