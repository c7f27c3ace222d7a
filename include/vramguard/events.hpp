// SPDX-License-Identifier: MIT
// What a guard does, as typed events: the loops say what happened (kind, key, sizes, attempt,
// error), Stats counts the events, and one formatter turns an event into the sentence the log
// gets, only when the sink wants that level (spdlog's should_log, resilience4j's lazy events).
#pragma once

#include <vramguard/errors.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

enum class EventKind {
    oom_caught,      // an allocator OOM was caught and the cache emptied (the next event says why)
    driver_oom,      // a driver-level OOM: rethrown, not retried
    chunk_shrunk,    // an encode chunk ran out of memory; the next one is smaller
    item_retry,      // an item ran out of memory alone; waiting for memory to retry it
    item_exclusive,  // an item ran out of memory beside other runs of the guard: retried alone
    item_gave_up,    // an item ran out of memory alone too often: OomExhausted
    load_retry,      // a load ran out of memory; waiting for memory to retry it
    load_gave_up,    // a load ran out of memory on its last attempt: OomExhausted
    admission_wait,  // admission said no; waiting up to admission_wait
    rejected,        // admission refused: InsufficientMemory (its message says why)
    single_item,     // a chunk of one item went through the device's single-item turn
    grew,            // the batch limit grew (a probe up after successes, or memory came back)
};

struct Event {
    Event(EventKind kind_, const Key& key_, const char* work_) noexcept
        : kind(kind_), key(key_), work(work_) {}

    EventKind kind;
    const Key& key;
    const char* work;          // "load" or "encode"
    std::uint64_t size = 0;    // the chunk's items
    std::uint64_t weight = 0;  // the chunk's weight (weighted encode), else 0
    std::uint64_t next = 0;    // the next chunk's limit (items or weight)
    std::size_t item = 0;      // an item's index in the call's input
    unsigned attempt = 0;      // this attempt (1-based)
    unsigned attempts = 0;     // of how many
    std::uint64_t bytes = 0;   // memory waited for
    std::chrono::milliseconds wait{0};
    const std::exception_ptr* error = nullptr;
};

inline Level level_of(EventKind kind) noexcept {
    switch (kind) {
        case EventKind::oom_caught:
        case EventKind::rejected:
        case EventKind::single_item: return Level::debug;
        case EventKind::admission_wait:
        case EventKind::grew: return Level::info;
        default: return Level::warn;
    }
}

// The counter an event bumps, if any.
inline std::atomic<std::uint64_t>* counter_for(detail::AtomicStats& stats,
                                               EventKind kind) noexcept {
    switch (kind) {
        case EventKind::oom_caught:
        case EventKind::driver_oom: return &stats.ooms;
        case EventKind::chunk_shrunk: return &stats.halvings;
        case EventKind::item_retry:
        case EventKind::item_exclusive:
        case EventKind::load_retry: return &stats.retries;
        case EventKind::admission_wait: return &stats.waits;
        case EventKind::rejected: return &stats.rejections;
        case EventKind::single_item: return &stats.single_item_calls;
        case EventKind::grew: return &stats.grow_backs;
        default: return nullptr;
    }
}

// The sentence for an event; empty for events that only count.
inline std::string format_event(const Event& event) {
    const std::string subject = std::string(event.work) + " " + event.key.describe() + ": ";
    const std::string attempt =
        std::to_string(event.attempt) + " of " + std::to_string(event.attempts);
    const std::string error = event.error ? " (" + describe(*event.error) + ")" : std::string();
    switch (event.kind) {
        case EventKind::driver_oom:
            return subject + "driver-level out of memory" + error +
                   "; the CUDA context may be unusable, so it is not retried";
        case EventKind::chunk_shrunk:
            return subject + "out of memory on a batch of " + std::to_string(event.size) +
                   " items" +
                   (event.weight > 0 ? " (weight " + std::to_string(event.weight) + ")" : "") +
                   "; released the allocator cache, retrying at " +
                   (event.weight > 0 ? "weight " : "") + std::to_string(event.next) + error;
        case EventKind::item_retry:
            return subject + "item " + std::to_string(event.item) +
                   " ran out of memory alone (attempt " + attempt +
                   "); released the allocator cache, waiting for memory" + error;
        case EventKind::item_exclusive:
            return subject + "item " + std::to_string(event.item) +
                   " ran out of memory while other batches of this guard held memory; released "
                   "the allocator cache, retrying it alone once they finish" +
                   error;
        case EventKind::item_gave_up:
            return subject + "item " + std::to_string(event.item) + " ran out of memory alone " +
                   std::to_string(event.attempt) + " times; giving up on it";
        case EventKind::load_retry:
            return subject + "out of memory on attempt " + attempt +
                   "; released the allocator cache, waiting up to " +
                   std::to_string(event.wait.count()) + " ms for " + format_bytes(event.bytes) +
                   " to be free" + error;
        case EventKind::load_gave_up:
            return subject + "out of memory on attempt " + std::to_string(event.attempt) +
                   ", giving up" + error;
        case EventKind::admission_wait:
            return subject + "waiting up to " + std::to_string(event.wait.count()) + " ms for " +
                   format_bytes(event.bytes) + " to be free";
        case EventKind::grew:
            return subject + "memory allows larger batches: limit " + std::to_string(event.next) +
                   (event.weight > 0 ? " (weight)" : " items");
        default: return std::string();
    }
}

VRAMGUARD_END_NAMESPACE

// Internals that need the types above.
#include <vramguard/detail/event_publish.hpp>
