// SPDX-License-Identifier: MIT
// What a Batcher (batcher.hpp) is told, what it counts, and the errors its callers may get.
#pragma once

#include <vramguard/version.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

struct BatcherOptions {
    // Backpressure: a call that would queue more than this many items (or this much weight; 0:
    // no bound) beside the queued ones is refused with Overloaded. A call alone is always queued.
    std::size_t max_queued_items = 65536;
    std::uint64_t max_queued_weight = 0;
    // How long a leader holds a gathering open for more callers before it runs (0: at once, so a
    // lone caller waits for nothing).
    std::chrono::milliseconds max_wait{0};
    // With padded weights, run the gathered items in order of weight, so that short items are not
    // padded to long ones (each caller still gets its results in its own order).
    bool group_by_weight = true;
};

struct BatcherStats {
    std::uint64_t calls = 0;              // encode() and submit() calls queued
    std::uint64_t items = 0;              // items queued
    std::uint64_t gatherings = 0;         // runs of the queued items through Guard::encode
    std::uint64_t batches = 0;            // batches that ran (batch_fn returned)
    std::uint64_t batched_items = 0;      // items in them (batched_items / batches: the fill)
    std::uint64_t overloaded = 0;         // calls refused with Overloaded
    std::uint64_t deadlines_passed = 0;   // calls that gave up at their deadline
    std::uint64_t queue_wait_us = 0;      // time items' calls waited in the queue, summed
    std::uint64_t queue_wait_max_us = 0;  // ... the longest
};

// Calls visit(name, help, value) once per counter of `stats`, in declaration order (as for Stats
// in stats.hpp): the one list a server's /status and /metrics enumerate.
template <class Visitor>
constexpr void for_each_counter(const BatcherStats& stats, Visitor&& visit) {
    visit("calls", "Batcher::encode and submit calls queued", stats.calls);
    visit("items", "items queued", stats.items);
    visit("gatherings", "runs of the queued items of every caller through Guard::encode",
          stats.gatherings);
    visit("batches", "batches that ran", stats.batches);
    visit("batched_items", "items in the batches that ran (batched_items / batches: the fill)",
          stats.batched_items);
    visit("overloaded", "calls refused with Overloaded (the queue was full)", stats.overloaded);
    visit("deadlines_passed", "calls that gave up at their deadline", stats.deadlines_passed);
    visit("queue_wait_us", "microseconds calls waited in the queue, summed", stats.queue_wait_us);
    visit("queue_wait_max_us", "the longest wait in the queue, microseconds",
          stats.queue_wait_max_us);
}

// The queue is full: the server's 503, with the time after which a retry likely finds room (the
// queued work at the rate the last gatherings ran).
class Overloaded : public std::runtime_error {
   public:
    Overloaded(const std::string& message, std::chrono::milliseconds retry_after)
        : std::runtime_error(message), retry_after_(retry_after) {}
    std::chrono::milliseconds retry_after() const noexcept { return retry_after_; }

   private:
    std::chrono::milliseconds retry_after_;
};

// The call's deadline passed before its results were ready.
class DeadlinePassed : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The batcher was destroyed while the call was queued.
class BatcherClosed : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

VRAMGUARD_END_NAMESPACE
