// SPDX-License-Identifier: MIT
// What a Batcher shares with its callers and their futures: the queue of calls, the turn of the
// batch leader, and one gathering's run through Guard::encode with each item's result (or its
// failure) handed back to the call it came from.
#pragma once

#include <vramguard/batch_view.hpp>
#include <vramguard/batcher_options.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/detail/chunk_cut.hpp>
#include <vramguard/detail/gathered.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/key.hpp>
#include <vramguard/options.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

struct NoWeight {};

template <class Item, class Result>
struct BatcherCall {
    std::vector<Item> items;
    std::vector<std::uint64_t> weights;  // as the learner counts them (empty: no weights)
    std::uint64_t weight = 0;            // their sum (the item count without weights)
    std::vector<std::optional<Result>> results;
    std::size_t done = 0;
    std::exception_ptr error;
    bool finished = false;  // every result is in, or `error` is set
    bool queued = true;     // not yet gathered
    SteadyClock::time_point since = SteadyClock::now();
};

template <class Item, class Probe, class F, class W>
class BatcherCore {
    using It = GatheredIterator<Item>;
    using View = BatchView<It>;
    static constexpr bool weighted = !std::is_same_v<W, NoWeight>;

   public:
    using Result = typename std::invoke_result_t<F&, View>::value_type;
    using Call = BatcherCall<Item, Result>;

    BatcherCore(Guard<Probe>& guard, Key key, F batch_fn, W weight_fn, BatcherOptions options)
        : guard_(guard),
          key_(std::move(key)),
          batch_fn_(std::move(batch_fn)),
          weight_fn_(std::move(weight_fn)),
          options_(options) {}

    // The call, queued (a call of no items is finished at once). Weights are checked first: a
    // bad one is the caller's std::invalid_argument, before anything is queued.
    std::shared_ptr<Call> enqueue(std::vector<Item> items) {
        auto call = std::make_shared<Call>();
        call->items = std::move(items);
        call->results.resize(call->items.size());
        call->weight = call->items.size();
        if constexpr (weighted) {
            call->weight = 0;
            for (const Item& item : call->items) {
                call->weights.push_back(
                    checked_weight(unpadded(weight_fn_)(item), call->weights.size()));
                call->weight = saturating_add(call->weight, call->weights.back());
            }
        }
        std::lock_guard<std::mutex> lock(mutex_);
        if (closed_) throw BatcherClosed("vramguard::Batcher " + key_.describe() + " is closed");
        if (call->items.empty()) {
            call->finished = true;
            return call;
        }
        refuse_when_full(call->items.size(), call->weight);
        queue_.push_back(call);
        queued_items_ += call->items.size();
        queued_weight_ = saturating_add(queued_weight_, call->weight);
        stats_.calls.fetch_add(1, std::memory_order_relaxed);
        stats_.items.fetch_add(call->items.size(), std::memory_order_relaxed);
        return call;
    }

    // Waits for the call's results, leading a gathering whenever none runs and items are queued.
    std::vector<Result> wait(const std::shared_ptr<Call>& call, std::optional<TimePoint> deadline) {
        std::unique_lock<std::mutex> lock(mutex_);
        while (!call->finished) {
            if (deadline && guard_.options().clock() >= *deadline) give_up(*call);
            if (!leading_ && !queue_.empty()) {
                lead(lock);
                continue;
            }
            changed_.wait_for(lock, until_next_look(deadline));
        }
        if (call->error) std::rethrow_exception(call->error);
        std::vector<Result> results;
        results.reserve(call->results.size());
        for (auto& result : call->results) results.push_back(std::move(*result));
        return results;
    }

    // Fails every queued call with BatcherClosed and waits for the running gathering.
    void close() {
        std::unique_lock<std::mutex> lock(mutex_);
        closed_ = true;
        for (auto& call : queue_) {
            call->error = std::make_exception_ptr(BatcherClosed(
                "vramguard::Batcher " + key_.describe() + " was destroyed with the call queued"));
            call->finished = true;
        }
        queue_.clear();
        changed_.notify_all();
        changed_.wait(lock, [&] { return !leading_; });
    }

    BatcherStats stats() const noexcept { return stats_.snapshot(); }
    const BatcherOptions& options() const noexcept { return options_; }

   private:
    // One gathered item: its call and its index there.
    struct Slot {
        Call* call;
        std::size_t index;
    };

    struct AtomicStats {
        std::atomic<std::uint64_t> calls{0}, items{0}, gatherings{0}, batches{0}, batched_items{0},
            overloaded{0}, deadlines_passed{0}, queue_wait_us{0}, queue_wait_max_us{0};
        BatcherStats snapshot() const noexcept {
            auto get = [](const std::atomic<std::uint64_t>& v) {
                return v.load(std::memory_order_relaxed);
            };
            return {get(calls),
                    get(items),
                    get(gatherings),
                    get(batches),
                    get(batched_items),
                    get(overloaded),
                    get(deadlines_passed),
                    get(queue_wait_us),
                    get(queue_wait_max_us)};
        }
    };

    void refuse_when_full(std::size_t items, std::uint64_t weight) {
        if (queue_.empty()) return;
        const bool too_many = queued_items_ + items > options_.max_queued_items;
        const bool too_heavy = options_.max_queued_weight != 0 &&
                               saturating_add(queued_weight_, weight) > options_.max_queued_weight;
        if (!too_many && !too_heavy) return;
        stats_.overloaded.fetch_add(1, std::memory_order_relaxed);
        const std::chrono::milliseconds after = retry_after();
        throw Overloaded("vramguard::Batcher " + key_.describe() + ": " +
                             std::to_string(queued_items_) + " items queued (bound " +
                             std::to_string(options_.max_queued_items) + "); retry after " +
                             std::to_string(after.count()) + " ms",
                         after);
    }

    // The queued weight at the rate the last gatherings ran, within [1 ms, 60 s].
    std::chrono::milliseconds retry_after() const {
        const double per_second = units_per_second_;
        const double seconds =
            per_second > 0 ? static_cast<double>(queued_weight_) / per_second : 0.1;
        return std::chrono::milliseconds(
            static_cast<std::int64_t>(std::clamp(seconds * 1e3, 1.0, 60e3)));
    }

    // How long a waiting caller sleeps before it looks again (a gathering's end wakes it sooner):
    // a poll interval, or less when its deadline comes first.
    std::chrono::milliseconds until_next_look(const std::optional<TimePoint>& deadline) const {
        const std::chrono::milliseconds poll = guard_.options().poll_interval;
        if (!deadline) return poll;
        const auto left =
            std::chrono::ceil<std::chrono::milliseconds>(*deadline - guard_.options().clock());
        return std::clamp(left, std::chrono::milliseconds(1), poll);
    }

    // The caller gives up at its deadline: its items still queued never run.
    [[noreturn]] void give_up(Call& call) {
        if (call.queued) {
            queue_.erase(std::find_if(queue_.begin(), queue_.end(),
                                      [&](const auto& queued) { return queued.get() == &call; }));
            forget_queued(call);
        }
        stats_.deadlines_passed.fetch_add(1, std::memory_order_relaxed);
        throw DeadlinePassed("vramguard::Batcher " + key_.describe() +
                             ": the call's deadline passed " +
                             (call.queued ? "with its items still queued (removed)"
                                          : "while its items ran (their results are dropped)"));
    }

    void forget_queued(Call& call) {
        call.queued = false;
        queued_items_ -= call.items.size();
        queued_weight_ -= std::min(queued_weight_, call.weight);
    }

    // Takes every queued call and runs their items (the lock released meanwhile).
    void lead(std::unique_lock<std::mutex>& lock) {
        leading_ = true;
        if (options_.max_wait.count() > 0) changed_.wait_for(lock, options_.max_wait);
        std::vector<std::shared_ptr<Call>> calls(queue_.begin(), queue_.end());
        queue_.clear();
        const auto now = SteadyClock::now();
        for (auto& call : calls) {
            forget_queued(*call);
            note_queue_wait(now - call->since);
        }
        lock.unlock();
        const auto started = SteadyClock::now();
        const std::uint64_t units = run(calls);
        const double seconds = std::chrono::duration<double>(SteadyClock::now() - started).count();
        lock.lock();
        if (seconds > 0 && units > 0) units_per_second_ = static_cast<double>(units) / seconds;
        for (auto& call : calls)
            if (call->error || call->done == call->items.size()) call->finished = true;
        leading_ = false;
        changed_.notify_all();
    }

    void note_queue_wait(SteadyClock::duration waited) {
        const auto us = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(waited).count());
        stats_.queue_wait_us.fetch_add(us, std::memory_order_relaxed);
        std::uint64_t longest = stats_.queue_wait_max_us.load(std::memory_order_relaxed);
        while (us > longest && !stats_.queue_wait_max_us.compare_exchange_weak(
                                   longest, us, std::memory_order_relaxed)) {
        }
    }

    // Runs the calls' items through the guard until each has its results or its error; returns
    // the units that ran.
    std::uint64_t run(const std::vector<std::shared_ptr<Call>>& calls) {
        stats_.gatherings.fetch_add(1, std::memory_order_relaxed);
        std::vector<Slot> slots;
        for (const auto& call : calls)
            for (std::size_t i = 0; i < call->items.size(); ++i) slots.push_back({call.get(), i});
        if (weighted && options_.group_by_weight && is_padded<W>::value)
            std::stable_sort(slots.begin(), slots.end(), [](const Slot& a, const Slot& b) {
                return a.call->weights[a.index] < b.call->weights[b.index];
            });
        std::uint64_t units = 0;
        while (!slots.empty()) {
            const std::exception_ptr failure = run_slots(slots, units);
            if (!failure) break;
            slots = blame(slots, failure);
        }
        return units;
    }

    // One Guard::encode over `slots`; the failure that ended it early, if any. `failed_chunk_`
    // says which batch a failure came from.
    std::exception_ptr run_slots(const std::vector<Slot>& slots, std::uint64_t& units) {
        std::vector<const Item*> items;
        items.reserve(slots.size());
        for (const Slot& slot : slots) items.push_back(&slot.call->items[slot.index]);
        const Gathered<Item> gathered{&items};
        failed_chunk_.reset();
        auto batch = [&](const View& view) {
            failed_chunk_ = std::make_pair(view.offset(), view.size());
            std::vector<Result> out = std::invoke(batch_fn_, view);
            if (out.size() != view.size())
                throw std::length_error("vramguard::Batcher " + key_.describe() +
                                        ": batch_fn returned " + std::to_string(out.size()) +
                                        " results for " + std::to_string(view.size()) + " items");
            for (std::size_t i = 0; i < out.size(); ++i) keep(slots[view.offset() + i], out[i]);
            stats_.batches.fetch_add(1, std::memory_order_relaxed);
            stats_.batched_items.fetch_add(view.size(), std::memory_order_relaxed);
            failed_chunk_.reset();
        };
        try {
            if constexpr (weighted)
                guard_.encode(key_, gathered, batch, weight_fn_);
            else
                guard_.encode(key_, gathered, batch);
        } catch (...) {
            return std::current_exception();
        }
        for (const Slot& slot : slots) units += weight_of(slot);
        return nullptr;
    }

    void keep(const Slot& slot, Result& result) {
        auto& kept = slot.call->results[slot.index];
        if (!kept) ++slot.call->done;
        kept = std::move(result);
    }

    std::uint64_t weight_of(const Slot& slot) const {
        if constexpr (weighted) return slot.call->weights[slot.index];
        return 1;
    }

    // Fails the calls the failure belongs to (the item that ran out of memory alone; the batch
    // batch_fn threw in; or, before any batch, all of them) and returns the slots left to run.
    std::vector<Slot> blame(const std::vector<Slot>& slots, const std::exception_ptr& failure) {
        std::optional<std::size_t> alone;
        unsigned attempts = 0;
        try {
            std::rethrow_exception(failure);
        } catch (const OomExhausted& exhausted) {
            alone = exhausted.item_index();
            attempts = exhausted.attempts();
        } catch (...) {
        }
        if (alone && *alone < slots.size()) {
            fail_item(slots[*alone], failure, attempts);
        } else if (failed_chunk_) {
            const auto [offset, size] = *failed_chunk_;
            for (std::size_t i = offset; i < offset + size && i < slots.size(); ++i)
                if (!slots[i].call->error) slots[i].call->error = failure;
        } else {
            for (const Slot& slot : slots)
                if (!slot.call->error) slot.call->error = failure;
        }
        std::vector<Slot> left;
        for (const Slot& slot : slots)
            if (!slot.call->error && !slot.call->results[slot.index]) left.push_back(slot);
        return left;
    }

    // An item that ran out of memory even alone: its call fails, naming the item in the call.
    void fail_item(const Slot& slot, const std::exception_ptr& failure, unsigned attempts) {
        Call& call = *slot.call;
        try {
            throw_with_cause(failure, [&] {
                std::string what = "?";
                try {
                    std::rethrow_exception(failure);
                } catch (const std::exception& e) {
                    what = e.what();
                }
                OomExhausted exhausted("vramguard::Batcher " + key_.describe() + ": item " +
                                           std::to_string(slot.index) +
                                           " of this call ran out of memory even alone (" + what +
                                           ")",
                                       key_.describe(), slot.index, attempts);
                std::vector<Result> finished;
                for (std::size_t i = 0; i < slot.index && call.results[i]; ++i)
                    finished.push_back(std::move(*call.results[i]));
                exhausted.keep_finished_results(std::move(finished));
                return exhausted;
            });
        } catch (...) {
            call.error = std::current_exception();
        }
    }

    Guard<Probe>& guard_;
    const Key key_;
    F batch_fn_;
    W weight_fn_;
    const BatcherOptions options_;
    std::mutex mutex_;
    std::condition_variable changed_;
    std::deque<std::shared_ptr<Call>> queue_;
    std::size_t queued_items_ = 0;
    std::uint64_t queued_weight_ = 0;
    double units_per_second_ = 0;
    bool leading_ = false;
    bool closed_ = false;
    std::optional<std::pair<std::size_t, std::size_t>> failed_chunk_;  // leader only
    AtomicStats stats_;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
