// SPDX-License-Identifier: MIT
// Deadlines and polling on the injected clock (clock.hpp): every wait in vramguard goes through
// poll_until, and no deadline overflows.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// now + wait, saturating: a wait of milliseconds::max() ("for ever") ends at the end of time,
// not (overflowed) in the past.
template <class Rep, class Period>
TimePoint deadline_after(TimePoint now, std::chrono::duration<Rep, Period> wait) noexcept {
    if (wait <= wait.zero()) return now;
    const auto room = TimePoint::max() - now;
    if (std::chrono::duration_cast<std::chrono::duration<double>>(wait) >=
        std::chrono::duration_cast<std::chrono::duration<double>>(room))
        return TimePoint::max();
    return now + std::chrono::duration_cast<Duration>(wait);
}

// A duration in the clock's unit, saturating: milliseconds::max() ("for ever") becomes
// Duration::max(), not (overflowed) -1 ms; a negative one saturates at Duration::min().
template <class Rep, class Period>
constexpr Duration saturating_duration(std::chrono::duration<Rep, Period> d) noexcept {
    using Seconds = std::chrono::duration<double>;
    const double seconds = std::chrono::duration_cast<Seconds>(d).count();
    if (seconds >= std::chrono::duration_cast<Seconds>(Duration::max()).count())
        return Duration::max();
    if (seconds <= std::chrono::duration_cast<Seconds>(Duration::min()).count())
        return Duration::min();
    return std::chrono::duration_cast<Duration>(d);
}

// Polls `ready` every `interval` until it holds or `deadline` passes; never sleeps past the
// deadline. Returns whether `ready` held.
template <class Ready>
bool poll_until(const ClockFn& clock, const SleepFn& sleep, Duration interval, TimePoint deadline,
                Ready&& ready) {
    for (;;) {
        if (ready()) return true;
        const TimePoint now = clock();
        if (now >= deadline) return false;
        sleep(std::min<Duration>(interval, deadline - now));
    }
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
