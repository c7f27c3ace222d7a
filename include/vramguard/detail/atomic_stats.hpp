// SPDX-License-Identifier: MIT
// The guard's live counters (stats.hpp): striped atomics that many threads bump without
// contending, read into a Stats snapshot.
#pragma once

#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// How many counters a for_each_counter overload visits, for the completeness checks.
template <class Counters>
constexpr std::size_t counter_count() {
    std::size_t count = 0;
    for_each_counter(Counters{}, [&count](const char*, const char*, std::uint64_t) { ++count; });
    return count;
}

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

static_assert(sizeof(Stats) == detail::counter_count<Stats>() * sizeof(std::uint64_t),
              "for_each_counter(Stats) must visit every field of Stats");

VRAMGUARD_END_NAMESPACE
