// SPDX-License-Identifier: MIT
// Admission control: whether work may start now (check, and reserve host-wide with a coordinator,
// in one step), waiting for memory when allowed, refusing with InsufficientMemory otherwise; and
// the waits for memory after an OOM or an unload. Every wait polls through the injected clock and
// has a deadline.
#pragma once

#include <vramguard/admission.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/coordinator.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/events.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/recovery.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// What admit() hands back: the hold (host-wide reservation) to keep while the work runs.
struct Admitted {
    std::unique_ptr<Hold> hold;
    policy::Requirement requirement;
    MemoryInfo memory;
    std::string refused_because;  // the coordinator's reason beyond the numbers, or ""
};

template <class Probe>
class AdmissionControl {
   public:
    AdmissionControl(Probe& probe, const Options& options, AtomicStats& stats)
        : probe_(probe), options_(options), stats_(stats) {}

    // Check (and reserve host-wide) in one step; wait up to admission_wait; then, unless
    // `go_ahead()` says the memory missing is this guard's own and comes back, throw
    // InsufficientMemory with the numbers. `requirement_of(total_bytes)` turns the device size
    // into the requirement: the first reading serves both, so the fast path reads the probe once.
    // With a coordinator the reading compared is the coordinator's, taken under its lock. The wait
    // ends at `deadline` too (an encode call's own, EncodeOptions::deadline).
    template <class RequirementOf, class GoAhead>
    Admitted admit(const Key& key, const char* what, RequirementOf&& requirement_of,
                   GoAhead&& go_ahead, std::optional<TimePoint> deadline = std::nullopt) {
        Admitted admitted;
        std::uint64_t available = 0;
        bool first = true;
        auto try_once = [&] {
            if (first || !options_.coordinator) admitted.memory = probe_.memory();
            if (first) admitted.requirement = requirement_of(admitted.memory.total_bytes);
            first = false;
            return check(admitted, available);
        };
        if (try_once()) return admitted;
        const std::uint64_t total = admitted.memory.total_bytes;
        if (!policy::can_ever_fit(admitted.requirement.bytes, total, options_.safety_margin))
            reject(key, what, admitted.requirement, available, total, true);
        if (options_.admission_wait.count() > 0 &&
            wait_to_be_admitted(key, what, admitted, try_once, deadline))
            return admitted;
        if (go_ahead()) return admitted;  // refused, but the memory missing is the guard's own
        reject(key, what, admitted.requirement, available, total, false, admitted.refused_because);
    }

    // One reading, reserving nothing: would work needing `requirement` start now?
    Admission peek(const policy::Requirement& requirement, const MemoryInfo& memory) const {
        Admission result;
        result.memory = memory;
        result.requirement = requirement;
        result.margin_bytes = policy::margin_bytes(memory.total_bytes, options_.safety_margin);
        result.admitted = policy::admits(requirement.bytes, memory, options_.safety_margin);
        return result;
    }

    // After an OOM: polls until `required` bytes (plus the margin) are free, or `max_wait`
    // passes. `distrusted_free`, when given, is the reading that let the failed work start: it
    // was stale or the memory was taken since, so only a reading that differs from it counts,
    // for at most recovery_timeout (how late a driver reports): a reading that stayed the same
    // that long and admits `required` is not stale. Nothing the probe sees is short (an idle
    // device, an OOM from a limit the probe does not read), and waiting on would change nothing.
    // Returns whether the memory was seen coming back.
    bool wait_for_memory(std::uint64_t required, std::chrono::milliseconds max_wait,
                         std::optional<std::uint64_t> distrusted_free) {
        const TimePoint start = options_.clock();
        const TimePoint settled = deadline_after(start, options_.recovery_timeout);
        bool reading_moved = !distrusted_free;
        bool nothing_short = false;
        const bool ended =
            poll_until(options_.clock, options_.sleep, options_.poll_interval,
                       deadline_after(start, max_wait), [&] {
                           const MemoryInfo now = probe_.memory();
                           reading_moved = reading_moved || now.free_bytes != *distrusted_free;
                           const bool fits = policy::admits(required, now, options_.safety_margin);
                           nothing_short = !reading_moved && fits && options_.clock() >= settled;
                           return (reading_moved && fits) || nothing_short;
                       });
        const bool came_back = ended && !nothing_short;
        if (options_.clock() > start) AtomicStats::bump(stats_.waits);
        if (came_back) remember_recovery(options_.clock() - start);
        return came_back;
    }

    // The recovery wait (recovery.hpp) on this guard's probe and options.
    bool wait_for_freed_memory(std::uint64_t expected_freed, std::uint64_t free_before,
                               std::uint64_t needed_free) {
        return vramguard::wait_for_freed_memory(probe_, options_, expected_freed, free_before,
                                                needed_free);
    }

   private:
    bool check(Admitted& admitted, std::uint64_t& available) {
        const std::uint64_t margin =
            policy::margin_bytes(admitted.memory.total_bytes, options_.safety_margin);
        if (options_.coordinator) {
            auto decision = options_.coordinator->try_reserve(admitted.requirement.bytes, margin,
                                                              [this] { return probe_.memory(); });
            admitted.memory = decision.seen;
            available = decision.available;
            admitted.hold = std::move(decision.hold);
            admitted.refused_because = std::move(decision.refused_because);
            return admitted.hold != nullptr;
        }
        available = admitted.memory.free_bytes;
        return policy::admits(admitted.requirement.bytes, admitted.memory, options_.safety_margin);
    }

    template <class TryOnce>
    bool wait_to_be_admitted(const Key& key, const char* what, const Admitted& admitted,
                             TryOnce& try_once, std::optional<TimePoint> call_deadline) {
        const TimePoint start = options_.clock();
        TimePoint deadline = deadline_after(start, options_.admission_wait);
        if (call_deadline) deadline = std::min(deadline, *call_deadline);
        if (deadline <= start) return false;
        Event event(EventKind::admission_wait, key, what);
        event.wait =
            call_deadline
                ? std::min(options_.admission_wait,
                           std::chrono::ceil<std::chrono::milliseconds>(*call_deadline - start))
                : options_.admission_wait;
        event.bytes = admitted.requirement.bytes;
        publish(stats_, options_.log, options_.log_level, event);
        if (!poll_until(options_.clock, options_.sleep, options_.poll_interval, deadline, try_once))
            return false;
        remember_recovery(options_.clock() - start);
        return true;
    }

    [[noreturn]] void reject(const Key& key, const char* what,
                             const policy::Requirement& requirement, std::uint64_t available,
                             std::uint64_t total, bool never_fits,
                             const std::string& because = {}) {
        publish(stats_, options_.log, options_.log_level, Event(EventKind::rejected, key, what));
        const std::uint64_t margin = policy::margin_bytes(total, options_.safety_margin);
        std::string message =
            "vramguard: cannot start " + std::string(what) + " " + key.describe() + ": it needs " +
            format_bytes(requirement.bytes) + " (" + policy::to_string(requirement.source) +
            ") plus a safety margin of " + format_bytes(margin) + " (" +
            percent(options_.safety_margin) + " of " + format_bytes(total) + "), ";
        if (never_fits) {
            message +=
                "more than the whole device: it can never fit here. Declare a smaller size, "
                "lower safety_margin or use a larger device.";
        } else if (!because.empty()) {
            message += "and " + format_bytes(available) + " is free for this process, but " +
                       because + ". Release leaked holds or retry later.";
        } else {
            message += "but only " + format_bytes(available) + " is free for this process" +
                       (options_.coordinator ? " after other processes' reservations" : "") +
                       ". Free memory (unload idle models), lower the load, or retry later.";
        }
        throw InsufficientMemory(requirement.bytes, available, total, key.describe(), retry_after(),
                                 message, never_fits);
    }

    std::chrono::milliseconds retry_after() const noexcept {
        const std::int64_t observed = last_recovery_ms_.load(std::memory_order_relaxed);
        return observed >= 0 ? std::chrono::milliseconds(std::max<std::int64_t>(observed, 1))
                             : options_.retry_delay;
    }
    void remember_recovery(Duration took) noexcept {
        last_recovery_ms_.store(std::chrono::duration_cast<std::chrono::milliseconds>(took).count(),
                                std::memory_order_relaxed);
    }

    Probe& probe_;
    const Options& options_;
    AtomicStats& stats_;
    std::atomic<std::int64_t> last_recovery_ms_{-1};
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
