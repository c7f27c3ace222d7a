// SPDX-License-Identifier: MIT
// A call that may hang (a peer's relieve(), a DNS lookup) run on a thread of its own, detached:
// the caller waits for it as long as its own deadline allows and then leaves it to finish alone.
// The thread owns what it uses (the call's captures and the shared result), so a call that ends
// after its caller gave up touches nothing the caller still holds.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

// The calls of one owner still running on their threads, so that the owner can wait for them
// before it goes (a call that uses the owner must not outlive it). Thread-safe.
class CallCount {
   public:
    // One call running, from its creation to its destruction; move it into the call's capture.
    class Token {
       public:
        explicit Token(std::shared_ptr<CallCount> count) : count_(std::move(count)) {
            std::lock_guard<std::mutex> lock(count_->mutex_);
            ++count_->running_;
        }
        Token(Token&&) noexcept = default;
        Token& operator=(Token&&) = delete;
        Token(const Token&) = delete;
        Token& operator=(const Token&) = delete;
        ~Token() {
            if (!count_) return;
            std::lock_guard<std::mutex> lock(count_->mutex_);
            if (--count_->running_ == 0) count_->finished_.notify_all();
        }

       private:
        std::shared_ptr<CallCount> count_;
    };

    // Waits in real time until no call runs, at most `timeout`; true when none runs.
    bool wait_idle(Duration timeout) {
        const TimePoint deadline = deadline_after(SteadyClock::now(), timeout);
        std::unique_lock<std::mutex> lock(mutex_);
        while (running_ > 0) {
            const TimePoint now = SteadyClock::now();
            if (now >= deadline) return false;
            // In slices: wait_for adds its argument to now, and "for ever" would overflow.
            finished_.wait_for(lock, std::min<Duration>(deadline - now, std::chrono::hours(1)));
        }
        return true;
    }

    std::size_t running() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return running_;
    }

   private:
    mutable std::mutex mutex_;
    std::condition_variable finished_;
    std::size_t running_ = 0;
};

template <class Result>
class DetachedCall {
   public:
    // Starts `call` (no arguments, returns Result, must not throw) on its own thread. Throws
    // std::system_error when no thread can be started.
    template <class Call>
    explicit DetachedCall(Call call) : state_(std::make_shared<State>()) {
        std::thread([state = state_, call = std::move(call)]() mutable {
            Result result = call();
            std::lock_guard<std::mutex> lock(state->mutex);
            state->result = std::move(result);
            state->done = true;
            state->finished.notify_all();
        }).detach();
    }

    // The result when the call has finished within `wait` (real time), else nothing.
    template <class Rep, class Period>
    std::optional<Result> wait_for(std::chrono::duration<Rep, Period> wait) const {
        std::unique_lock<std::mutex> lock(state_->mutex);
        if (!state_->finished.wait_for(lock, wait, [this] { return state_->done; }))
            return std::nullopt;
        return state_->result;
    }

   private:
    struct State {
        std::mutex mutex;
        std::condition_variable finished;
        bool done = false;
        Result result{};
    };
    std::shared_ptr<State> state_;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
