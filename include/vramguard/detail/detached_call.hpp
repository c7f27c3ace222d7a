// SPDX-License-Identifier: MIT
// A call that may hang (a peer's relieve(), a DNS lookup) run on a thread of its own, detached:
// the caller waits for it as long as its own deadline allows and then leaves it to finish alone.
// The thread owns what it uses (the call's captures and the shared result), so a call that ends
// after its caller gave up touches nothing the caller still holds.
#pragma once

#include <vramguard/version.hpp>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

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
