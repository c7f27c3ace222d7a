// SPDX-License-Identifier: MIT
// One load call: admit, run the caller's load measured, record its peak; on OOM empty the cache,
// wait for memory and retry, or give up with OomExhausted, as policy:: says. It orchestrates with
// the guard's per-device services (GuardCore, received by reference).
#pragma once

#include <vramguard/detail/guard_core.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/events.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

template <class Probe>
class LoadRun {
    using Core = GuardCore<Probe>;

   public:
    LoadRun(Core& core, const Key& key, std::optional<std::uint64_t> declared)
        : core_(core), key_(key), declared_(declared) {}

    template <class F>
    std::invoke_result_t<F&> run(F& fn) {
        using R = std::invoke_result_t<F&>;
        core_.stats().calls.add(1);
        for (unsigned attempt = 1;; ++attempt) {
            Admitted admitted = core_.admission().admit(
                key_, "load",
                [&](std::uint64_t total_bytes) {
                    return core_.requirement_for(key_, declared_, total_bytes);
                },
                [] { return false; });
            // What the load was admitted for is claimed while it runs: encode chunks planned
            // meanwhile do not count on the memory it is about to take.
            Claims::Claim claim = core_.claims().claim_now(admitted.requirement.bytes);
            std::exception_ptr error;
            try {
                typename Core::Measurement measurement(core_, true);
                if constexpr (std::is_void_v<R>) {
                    std::invoke(fn);
                    core_.record_load_peak(key_, measurement.peak());
                    return;
                } else {
                    R result = std::invoke(fn);
                    core_.record_load_peak(key_, measurement.peak());
                    return std::forward<R>(result);
                }
            } catch (...) {
                error = std::current_exception();
            }
            admitted.hold.reset();
            claim.release();
            after_oom(error, admitted, attempt);
        }
    }

   private:
    // The load threw: not an OOM -> rethrown untouched; the last attempt -> OomExhausted; else the
    // cache is emptied and memory waited for before the next attempt.
    void after_oom(const std::exception_ptr& error, const Admitted& admitted, unsigned attempt) {
        core_.take_oom_or_rethrow(error, "load", key_);
        const Options& options = core_.options();
        const std::uint64_t required = admitted.requirement.bytes;
        const std::uint64_t total = admitted.memory.total_bytes;
        const std::optional<OomReport> report = oom_report(error);
        const bool hopeless = policy::asks_more_than_the_device(report, total);
        const bool last = policy::load_gives_up(attempt, options.load_attempts, hopeless);
        Event event(last ? EventKind::load_gave_up : EventKind::load_retry, key_, "load");
        event.attempt = attempt;
        event.attempts = options.load_attempts;
        event.bytes = required;
        event.wait = options.retry_delay;
        event.error = &error;
        core_.publish(event);
        if (last)
            throw_with_cause(error, [&] {
                return OomExhausted(
                    "vramguard: load " + key_.describe() + " ran out of memory " +
                        core_.given_up_because(hopeless, attempt, total, options.retry_delay) +
                        " It needed about " + format_bytes(required) +
                        ". Last error: " + describe(error),
                    key_.describe(), std::nullopt, attempt);
            });
        core_.admission().wait_for_memory(
            required, options.retry_delay,
            policy::reading_to_distrust(report, admitted.memory.free_bytes));
    }

    Core& core_;
    const Key& key_;
    std::optional<std::uint64_t> declared_;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
