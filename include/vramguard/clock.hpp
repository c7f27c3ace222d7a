// SPDX-License-Identifier: MIT
// Injected time. Every wait in vramguard reads `ClockFn` and waits through `SleepFn`, so a 30 s
// retry delay or a 5 min idle timeout is tested in microseconds with a ManualClock.
#pragma once

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

using SteadyClock = std::chrono::steady_clock;
using TimePoint = SteadyClock::time_point;
using Duration = SteadyClock::duration;
using ClockFn = std::function<TimePoint()>;
using SleepFn = std::function<void(Duration)>;

inline ClockFn system_clock() {
    return [] { return SteadyClock::now(); };
}
inline SleepFn system_sleep() {
    return [](Duration d) { std::this_thread::sleep_for(d); };
}

inline double to_seconds(Duration d) noexcept { return std::chrono::duration<double>(d).count(); }

// Time that moves only when told to. `sleep` advances it (and yields, so other threads progress);
// actions scheduled with `at`/`after` run when time passes them, which is how a test makes external
// memory usage drop "30 seconds into" a wait. Thread-safe.
class ManualClock {
   public:
    explicit ManualClock(TimePoint start = TimePoint{} + std::chrono::hours(1)) : now_(start) {}
    ManualClock(const ManualClock&) = delete;
    ManualClock& operator=(const ManualClock&) = delete;

    TimePoint now() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return now_;
    }

    // Moves time forward by `d`, running due actions in time order (outside the lock, so an action
    // may use the clock).
    void advance(Duration d) {
        if (d < Duration::zero()) d = Duration::zero();
        TimePoint target;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            target = now_ + d;
            slept_ += d;
        }
        for (;;) {
            std::function<void()> action;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                auto due = actions_.begin();
                if (due == actions_.end() || due->first > target) {
                    now_ = std::max(now_, target);
                    break;
                }
                now_ = std::max(now_, due->first);
                action = std::move(due->second);
                actions_.erase(due);
            }
            action();
        }
        std::this_thread::yield();
    }
    void sleep(Duration d) { advance(d); }

    void at(TimePoint when, std::function<void()> action) {
        std::lock_guard<std::mutex> lock(mutex_);
        actions_.emplace(when, std::move(action));
    }
    void after(Duration delay, std::function<void()> action) {
        at(now() + delay, std::move(action));
    }

    // Total time slept through this clock: a test's proof that a wait polled instead of blocking.
    Duration slept() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return slept_;
    }

    ClockFn clock_fn() {
        return [this] { return now(); };
    }
    SleepFn sleep_fn() {
        return [this](Duration d) { sleep(d); };
    }

   private:
    mutable std::mutex mutex_;
    TimePoint now_;
    Duration slept_{Duration::zero()};
    std::multimap<TimePoint, std::function<void()>> actions_;
};

VRAMGUARD_END_NAMESPACE

// Internals that need the types above.
#include <vramguard/detail/deadline.hpp>
