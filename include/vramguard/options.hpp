// SPDX-License-Identifier: MIT
// Everything a Guard can be told, each field with its default and the reason for it.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/coordinator.hpp>
#include <vramguard/log.hpp>
#include <vramguard/version.hpp>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

namespace defaults {
// 10 % of the device kept free: the CUDA context, cuBLAS workspaces and fragmentation grow
// outside what a measured peak saw.
inline constexpr double safety_margin = 0.10;
// A load never measured is assumed to take most of the device: admitting an unknown too eagerly
// is what causes the OOM in the first place. Declare bytes to admit a first load more tightly.
inline constexpr double first_run_fraction = 0.80;
// A measured peak moves between runs (allocator rounding, input sizes): 20 % over it.
inline constexpr double history_headroom = 1.2;
inline constexpr unsigned load_attempts = 3;
// The longest wait for memory to come back between load attempts (polled, not slept blindly).
inline constexpr std::chrono::milliseconds retry_delay{30000};
// The longest wait for memory before an encode item that ran out of memory alone is retried. An
// encode runs on a request thread, and what the item waits for is another chunk on the device
// finishing (well under a second): 2 s covers a few, and an item's waits (single_item_attempts - 1
// of them) stay at 4 s, inside any client's timeout. retry_delay's 30 s is sized for a model load.
inline constexpr std::chrono::milliseconds item_retry_delay{2000};
// How often a wait looks at the probe again; also Ollama's VRAM-recovery poll.
inline constexpr std::chrono::milliseconds poll_interval{250};
// 0: admission that says no fails at once with InsufficientMemory (a server answers 503).
inline constexpr std::chrono::milliseconds admission_wait{0};
inline constexpr unsigned single_item_attempts = 3;
inline constexpr std::size_t single_item_concurrency = 1;
inline constexpr unsigned grow_after_successes = 8;
// After an unload the driver reports freed VRAM late (Ollama: poll until 75 % of the expected
// bytes show, at most 5 s, then trust the estimate).
inline constexpr double recovery_fraction = 0.75;
inline constexpr std::chrono::milliseconds recovery_timeout{5000};
inline constexpr unsigned forget_failure_after = 64;
// Kept free beyond an encode chunk's predicted peak, as a fraction of the memory free when the
// chunk is planned. Not the load's 10 % margin of the device, which covers what grows beside a new
// model (CUDA context, cuBLAS workspaces, fragmentation around a large new allocation); a chunk
// runs beside a model already loaded and warmed up, and what its measured peak does not see grows
// with the chunk: the allocator rounding every block up (to 512 B, large blocks to 2 MiB
// segments) and the spread of its peak from run to run. 2 % of what the chunk is planned into
// covers both with room, and costs about 2 % of the largest batch (a share of the device would
// cost more, the less is free).
inline constexpr double encode_reserve = 0.02;
// How often a guard writes what it learned to the profile files, at most (a writer thread,
// off the request path). 1 s: a crash loses at most a second of learning, which the next run
// relearns in a few calls; sibling workers see each other's learning within a second; and one
// write (two fsyncs) per learning key per second is nothing a disk notices, where writing on
// every call that learned something cost 100+ us of the caller's time and queued request threads
// behind one key's file.
inline constexpr std::chrono::milliseconds persist_interval{1000};
// Profile files no process wrote or read for this long are removed when a guard opens the
// directory: a model unused for a month is likely retired, and relearning one costs a few calls.
inline constexpr std::chrono::seconds profile_max_age{30 * 24 * 3600};
// Events below this level are neither formatted nor sent to the sink.
inline constexpr Level log_level = Level::info;
// Most items allowed alone at once: far above any real device, low enough to be a semaphore count.
inline constexpr std::size_t max_single_item_concurrency = 1 << 20;
}  // namespace defaults

struct Options {
    double safety_margin = defaults::safety_margin;  // fraction of total kept free, [0, 1)
    double first_run_fraction = defaults::first_run_fraction;  // unknown load's requirement, (0, 1]
    double history_headroom = defaults::history_headroom;      // factor over a measured peak, >= 1
    unsigned load_attempts = defaults::load_attempts;          // tries of one load, >= 1
    std::chrono::milliseconds retry_delay = defaults::retry_delay;  // max wait between tries
    // Max wait for memory before an encode item that ran out of memory alone is retried.
    std::chrono::milliseconds item_retry_delay = defaults::item_retry_delay;
    std::chrono::milliseconds poll_interval = defaults::poll_interval;    // > 0
    std::chrono::milliseconds admission_wait = defaults::admission_wait;  // max wait to be admitted
    unsigned single_item_attempts =
        defaults::single_item_attempts;  // tries of one item alone, >= 1
    // Items run alone at the same time on one device (the single-item semaphore's count).
    std::size_t single_item_concurrency = defaults::single_item_concurrency;
    unsigned grow_after_successes =
        defaults::grow_after_successes;  // successes before growing back
    unsigned forget_failure_after =
        defaults::forget_failure_after;  // successes before retrying a size that failed
    // Kept free beside an encode chunk's predicted peak, fraction of what is free, [0, 1).
    double encode_reserve = defaults::encode_reserve;
    double recovery_fraction = defaults::recovery_fraction;  // of the expected freed bytes, (0, 1]
    std::chrono::milliseconds recovery_timeout =
        defaults::recovery_timeout;  // then trust the estimate
    // Where profiles live; "" = $VRAMGUARD_PROFILE_DIR, $XDG_CACHE_HOME/vramguard,
    // ~/.cache/vramguard.
    std::string profile_dir;
    bool persist = true;  // false: learn in memory only
    // Learning is written by a background writer, each key at most once per this interval (and
    // on Guard::flush() and destruction); 0 writes as soon as the writer can. >= 0.
    std::chrono::milliseconds persist_interval = defaults::persist_interval;
    // Profile files unused (neither written nor read) for longer are removed; 0 keeps them.
    std::chrono::seconds profile_max_age = defaults::profile_max_age;
    LogSink log = stderr_sink();
    Level log_level = defaults::log_level;  // the least level formatted and sent to `log`
    ClockFn clock = system_clock();         // every wait reads this clock ...
    SleepFn sleep = system_sleep();         // ... and waits through this sleep
    // Host-wide admission across processes (host.hpp); null = this process only.
    std::shared_ptr<Coordinator> coordinator;

    // Throws std::invalid_argument naming the first field that makes no sense.
    void validate() const {
        auto fail = [](const char* field, const std::string& why) {
            throw std::invalid_argument(std::string("vramguard::Options::") + field + " " + why);
        };
        auto finite = [](double v) { return std::isfinite(v); };
        if (!finite(safety_margin) || safety_margin < 0 || safety_margin >= 1)
            fail("safety_margin", "must be in [0, 1), got " + std::to_string(safety_margin));
        if (!finite(first_run_fraction) || first_run_fraction <= 0 || first_run_fraction > 1)
            fail("first_run_fraction",
                 "must be in (0, 1], got " + std::to_string(first_run_fraction));
        if (!finite(history_headroom) || history_headroom < 1 || history_headroom > 100)
            fail("history_headroom",
                 "must be in [1, 100], got " + std::to_string(history_headroom));
        if (load_attempts < 1) fail("load_attempts", "must be at least 1");
        if (retry_delay.count() < 0) fail("retry_delay", "must not be negative");
        if (item_retry_delay.count() < 0) fail("item_retry_delay", "must not be negative");
        if (poll_interval.count() <= 0) fail("poll_interval", "must be positive");
        if (admission_wait.count() < 0) fail("admission_wait", "must not be negative");
        if (single_item_attempts < 1) fail("single_item_attempts", "must be at least 1");
        if (single_item_concurrency < 1 ||
            single_item_concurrency > defaults::max_single_item_concurrency)
            fail("single_item_concurrency",
                 "must be in [1, " + std::to_string(defaults::max_single_item_concurrency) +
                     "], got " + std::to_string(single_item_concurrency));
        if (!finite(encode_reserve) || encode_reserve < 0 || encode_reserve >= 1)
            fail("encode_reserve", "must be in [0, 1), got " + std::to_string(encode_reserve));
        if (grow_after_successes < 1) fail("grow_after_successes", "must be at least 1");
        if (forget_failure_after < 1) fail("forget_failure_after", "must be at least 1");
        if (!finite(recovery_fraction) || recovery_fraction <= 0 || recovery_fraction > 1)
            fail("recovery_fraction",
                 "must be in (0, 1], got " + std::to_string(recovery_fraction));
        if (recovery_timeout.count() < 0) fail("recovery_timeout", "must not be negative");
        if (persist_interval.count() < 0) fail("persist_interval", "must not be negative");
        if (profile_max_age.count() < 0) fail("profile_max_age", "must not be negative");
        if (!clock) fail("clock", "must be set (use vramguard::system_clock())");
        if (!sleep) fail("sleep", "must be set (use vramguard::system_sleep())");
    }
};

// What one encode call may be told beyond its guard's Options (Guard::encode's last argument).
struct EncodeOptions {
    // While the key has learned nothing (no cost model, no limit), chunks are cut at this many
    // items (weighted encode: this much weight) instead of running the whole batch at once; 0 =
    // no hint. What the key learns replaces it, and it is never stored as learned.
    std::uint64_t first_chunk_limit = 0;
    // No wait inside the call (admission, the waits before an item's retries) goes past this
    // time on the guard's clock (Options::clock). An item that runs out of memory alone once it
    // has passed is given up on at once (OomExhausted); admission refuses (InsufficientMemory).
    std::optional<TimePoint> deadline;

    EncodeOptions& with_first_chunk_limit(std::uint64_t limit) {
        first_chunk_limit = limit;
        return *this;
    }
    EncodeOptions& with_deadline(TimePoint when) {
        deadline = when;
        return *this;
    }
};

VRAMGUARD_END_NAMESPACE
