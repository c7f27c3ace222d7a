// SPDX-License-Identifier: MIT
// The recovery wait after an unload, for anyone who frees memory (a guard after an eviction, a
// registry after peers answered, an external manager): the driver reports freed VRAM late, so
// poll until recovery_fraction (75 %) of the expected bytes show, at most recovery_timeout (5 s),
// then trust the estimate (Ollama's rule). Done at once when what is needed is already free: users
// of Ollama report the full timeout being waited for memory that was there.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <cstdint>

VRAMGUARD_BEGIN_NAMESPACE

// After an unload of `expected_freed` bytes (free was `free_before`): polls the probe every
// Options::poll_interval until it reports Options::recovery_fraction of them, or `needed_free`
// (when > 0) is free, at most Options::recovery_timeout, on Options::clock and Options::sleep.
// Returns whether the memory was seen (true) or only trusted (false).
template <class Probe>
bool wait_for_freed_memory(Probe& probe, const Options& options, std::uint64_t expected_freed,
                           std::uint64_t free_before, std::uint64_t needed_free = 0) {
    const TimePoint deadline = detail::deadline_after(options.clock(), options.recovery_timeout);
    return detail::poll_until(options.clock, options.sleep, options.poll_interval, deadline, [&] {
        const std::uint64_t free_now = probe.memory().free_bytes;
        return (needed_free > 0 && free_now >= needed_free) ||
               policy::recovered(free_before, free_now, expected_freed, options.recovery_fraction);
    });
}

VRAMGUARD_END_NAMESPACE
