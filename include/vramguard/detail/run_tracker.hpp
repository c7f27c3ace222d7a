// SPDX-License-Identifier: MIT
// Who else is running on this guard: every load and every encode chunk registers while its work
// runs, so that
//  - a measured peak counts for a key only when no other run overlapped the measurement (a peak
//    two runs share is neither's);
//  - an item that ran out of memory alone while other runs held memory can take the guard for
//    itself (new runs wait, running ones finish) and retry really alone, instead of being given
//    up on because the guard's own batches were in the way.
// Registration is two increments of this thread's stripe (no cache line shared on the fast path);
// only a measurement or the rare exclusive turn reads the sums.
#pragma once

#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

class RunTracker {
   public:
    // `counts_starts`: whether any run may be measured (the probe measures peaks).
    explicit RunTracker(bool counts_starts) noexcept : counts_starts_(counts_starts) {}

    // One run in progress. `measured`: whether overlap is to be checked for it.
    //
    // A run started inside another run of this tracker on the same thread (a loader that warms
    // up through encode, a batch_fn that encodes) is part of that run: its memory is the outer
    // run's, so it is neither registered, measured nor a start, and it never waits for an
    // exclusive turn, which would wait for the outer run, i.e. for itself (repro_warmup_hang).
    class Run {
       public:
        Run(RunTracker& tracker, bool measured, bool exclusive = false)
            : tracker_(tracker), nested_(tracker.running_here()) {
            if (nested_) return;
            measured_ = measured;
            // Registered first, then the turn checked: an exclusive turn sets its flag first,
            // then reads the count, so one of the two always sees the other.
            for (;;) {
                tracker.running_.add(1);
                if (exclusive || !tracker.exclusive_wanted_.load(std::memory_order_seq_cst)) break;
                tracker.running_.add(-1);
                tracker.turn_changed_.notify_all();
                tracker.wait_for_turn();
            }
            outer_ = innermost();
            innermost() = this;
            // Every run counts as a start, measured or not: a run that starts and ends inside a
            // measurement leaves no other trace, and its peak would be booked as ours. (Not
            // counted where nothing is ever measured: a probe without peaks.)
            if (tracker.counts_starts_) tracker.starts_.add(1);
            if (!measured) return;
            starts_seen_ = tracker.starts_.added();
            solo_ = tracker.running_.sum() <= 1;
        }
        ~Run() {
            if (nested_) return;
            innermost() = outer_;
            tracker_.running_.add(-1);
            if (tracker_.exclusive_wanted_.load(std::memory_order_seq_cst))
                tracker_.turn_changed_.notify_all();
        }
        Run(const Run&) = delete;
        Run& operator=(const Run&) = delete;

        // True when this run was measured and nothing else was running when it started.
        bool started_solo() const noexcept { return measured_ && solo_; }
        // True when this run was measured and nothing else ran at any time since it started.
        bool solo_so_far() const noexcept {
            return measured_ && solo_ && tracker_.running_.sum() <= 1 &&
                   tracker_.starts_.added() == starts_seen_;
        }

       private:
        friend class RunTracker;
        RunTracker& tracker_;
        const bool nested_;
        bool measured_ = false;
        bool solo_ = false;
        std::uint64_t starts_seen_ = 0;
        Run* outer_ = nullptr;  // this thread's registered run started before this one
    };

    // Holding it, no new run of this tracker starts; the constructor returns once the runs that
    // were running have finished (they always do: they are the caller's own batches and loads).
    // Not to be taken by a thread inside a run of this tracker (running_here()): a turn wanted
    // elsewhere would wait for that run while it waits for the turn.
    class ExclusiveTurn {
       public:
        explicit ExclusiveTurn(RunTracker& tracker) : tracker_(tracker) {
            const std::int64_t own = tracker.running_here() ? 1 : 0;
            std::unique_lock<std::mutex> lock(tracker.mutex_);
            tracker.turn_changed_.wait(lock, [&] { return !tracker.exclusive_held_; });
            tracker.exclusive_held_ = true;
            tracker.exclusive_wanted_.store(true, std::memory_order_seq_cst);
            while (tracker.running_.sum() > own)
                tracker.turn_changed_.wait_for(lock, std::chrono::milliseconds(1));
        }
        ~ExclusiveTurn() {
            {
                std::lock_guard<std::mutex> lock(tracker_.mutex_);
                tracker_.exclusive_held_ = false;
                tracker_.exclusive_wanted_.store(false, std::memory_order_seq_cst);
            }
            tracker_.turn_changed_.notify_all();
        }
        ExclusiveTurn(const ExclusiveTurn&) = delete;
        ExclusiveTurn& operator=(const ExclusiveTurn&) = delete;

       private:
        RunTracker& tracker_;
    };

    // Whether any run other than the calling thread's own (when inside one) is in progress now
    // (read after one's own chunk ended).
    bool others_running() const noexcept { return running_.sum() > (running_here() ? 1 : 0); }

    // Whether the calling thread is inside a run of this tracker.
    bool running_here() const noexcept {
        for (const Run* run = innermost(); run != nullptr; run = run->outer_)
            if (&run->tracker_ == this) return true;
        return false;
    }

   private:
    // The calling thread's registered runs, innermost first (runs are scoped, so they nest).
    static Run*& innermost() noexcept {
        thread_local Run* run = nullptr;
        return run;
    }

    void wait_for_turn() {
        std::unique_lock<std::mutex> lock(mutex_);
        turn_changed_.wait(lock, [&] { return !exclusive_held_; });
    }

    const bool counts_starts_;
    StripedCounter running_;
    StripedCounter starts_;
    std::atomic<bool> exclusive_wanted_{false};
    std::mutex mutex_;
    std::condition_variable turn_changed_;
    bool exclusive_held_ = false;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
