// SPDX-License-Identifier: MIT
// A writer thread that runs its owner's write pass when told there is something to write, at most
// once per interval: what many calls mark in between is written once (coalesced), off the
// callers' threads, so a slow or failing disk costs them nothing. The owner writes what is left
// itself on shutdown (stop() first, then its own final pass), so nothing is lost on a clean exit.
//
// The thread starts on the first mark() (a guard made before fork() and used only in the
// children starts one in each child), and stop() joins it, so it never outlives its owner.
#pragma once

#include <vramguard/version.hpp>

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

class WriteBehind {
   public:
    using Clock = std::chrono::steady_clock;

    // `pass` writes everything marked so far; it must not throw.
    WriteBehind(std::chrono::milliseconds interval, std::function<void()> pass)
        : interval_(interval), pass_(std::move(pass)) {}
    WriteBehind(const WriteBehind&) = delete;
    WriteBehind& operator=(const WriteBehind&) = delete;
    ~WriteBehind() { stop(); }

    // Something waits to be written: the thread runs a pass at once if the last one is an
    // interval old, else when it is. Cheap: a lock and a notify, once per pending pass.
    void mark() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (stopping_) return;
        const bool was_pending = pending_;
        pending_ = true;
        if (!started_here()) {
            start();
            return;
        }
        if (!was_pending) wake_.notify_one();
    }

    // Ends the thread after the pass in progress (if any); what is still marked is the owner's to
    // write. Idempotent.
    void stop() noexcept {
        std::unique_ptr<std::thread> thread;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
            if (!started_here()) {
                // A thread started by the parent before fork() does not exist in this child:
                // joining or detaching its copied handle is undefined, so the handle is leaked.
                (void)thread_.release();
                return;
            }
            thread = std::move(thread_);
        }
        wake_.notify_all();
        if (thread && thread->joinable()) thread->join();
    }

    // Passes run so far (for tests and the bench).
    std::uint64_t passes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return passes_;
    }
    // The writer thread's id (a default id before it started).
    std::thread::id thread_id() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return thread_ ? thread_->get_id() : std::thread::id();
    }

   private:
    // Caller holds mutex_.
    bool started_here() const noexcept { return thread_ && owner_ == ::getpid(); }

    // Caller holds mutex_. A thread that cannot be started leaves the marks to the owner's
    // flush (std::system_error swallowed: the callers' encodes must not fail over it).
    void start() noexcept {
        (void)thread_.release();  // see stop(): a parent's handle in a forked child
        try {
            thread_ = std::make_unique<std::thread>([this] { run(); });
            owner_ = ::getpid();
        } catch (...) {
            thread_.reset();
        }
    }

    void run() {
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [&] { return pending_ || stopping_; });
            // Coalescing: a pass at most once per interval; marks in between wait for it.
            if (last_pass_)
                wake_.wait_until(lock, *last_pass_ + interval_, [&] { return stopping_; });
            if (stopping_) return;
            pending_ = false;
            last_pass_ = Clock::now();
            lock.unlock();
            pass_();
            lock.lock();
            ++passes_;
        }
    }

    const std::chrono::milliseconds interval_;
    const std::function<void()> pass_;
    mutable std::mutex mutex_;
    std::condition_variable wake_;
    bool pending_ = false;
    bool stopping_ = false;
    std::optional<Clock::time_point> last_pass_;
    std::uint64_t passes_ = 0;
    std::unique_ptr<std::thread> thread_;
    pid_t owner_ = 0;  // the process that started thread_
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
