// SPDX-License-Identifier: MIT
// The registry's housekeeping thread: calls a tick every interval until destroyed. It waits in real
// time on a condition variable (so destruction stops it at once, however long the interval); what
// it calls reads the injected clock. A tick that throws is logged and the thread goes on.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

class Reaper {
   public:
    using Warn = std::function<void(const std::string&)>;

    Reaper(Duration interval, std::function<void()> tick, Warn warn)
        : interval_(std::min<Duration>(interval, max_interval)),
          tick_(std::move(tick)),
          warn_(std::move(warn)) {
        thread_ = std::thread([this] { run(); });
    }
    Reaper(const Reaper&) = delete;
    Reaper& operator=(const Reaper&) = delete;

    // Stops the thread at once (a tick in progress finishes first).
    ~Reaper() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }

   private:
    void run() {
        std::unique_lock<std::mutex> lock(mutex_);
        while (!cv_.wait_for(lock, interval_, [this] { return stop_; })) {
            lock.unlock();
            tick_once();
            lock.lock();
        }
    }

    void tick_once() noexcept {
        try {
            tick_();
        } catch (...) {
            warn("model reaper: tick failed: " + describe(std::current_exception()));
        }
    }
    void warn(const std::string& message) noexcept {
        try {
            warn_(message);
        } catch (...) {
        }
    }

    // condition_variable::wait_for adds the interval to now: Duration::max() ("never") would
    // overflow into the past and spin. A year is "never" for a housekeeping tick.
    static constexpr Duration max_interval = std::chrono::hours(24 * 365);
    const Duration interval_;
    const std::function<void()> tick_;
    const Warn warn_;
    std::mutex mutex_;
    std::condition_variable cv_;
    bool stop_ = false;
    std::thread thread_;  // last: started once everything above exists
};

}  // namespace detail

VRAMGUARD_END_NAMESPACE
