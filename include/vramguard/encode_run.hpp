// SPDX-License-Identifier: MIT
// One encode call: its state (where it is in the input, the results so far, the retry in hand) in
// one object, and a loop that only orchestrates: plan the chunk (policy::plan_chunk), run it,
// record what happened (the key's learner), and on OOM ask policy:: for the retry.
#pragma once

#include <vramguard/batch_view.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/detail/run_tracker.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/events.hpp>
#include <vramguard/key.hpp>
#include <vramguard/key_memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/semaphore.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <limits>
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

// A weight as the learner counts it: a whole number of units, at least 1 (an item of weight 0
// still takes memory, and a budget of zero-weight items would never shrink); a fraction rounds
// up, and anything past 2^64 saturates. NaN and negative weights are the caller's bug, named with
// the item, before any batch runs.
template <class W>
std::uint64_t checked_weight(W weight, std::size_t index) {
    auto refuse = [index](const std::string& value) {
        return std::invalid_argument("vramguard::Guard::encode: weight_fn returned " + value +
                                     " for item " + std::to_string(index) +
                                     "; a weight must be >= 0");
    };
    if constexpr (std::is_floating_point_v<W>) {
        if (!(weight >= 0)) throw refuse(std::to_string(weight));
        if (!(weight < 1.8e19)) return std::numeric_limits<std::uint64_t>::max();
        return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::ceil(weight)));
    } else {
        if constexpr (std::is_signed_v<W>) {
            if (weight < 0) throw refuse(std::to_string(weight));
        }
        return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(weight));
    }
}

template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

template <class Guard, class It, class F>
class EncodeRun {
    using View = BatchView<It>;
    using Out = std::invoke_result_t<F&, View>;
    static_assert(std::is_void_v<Out> || is_std_vector<Out>::value,
                  "vramguard::Guard::encode: batch_fn must return void or std::vector<R>, one "
                  "result per item of the view it was given");
    using Results = std::conditional_t<std::is_void_v<Out>, std::vector<char>, Out>;
    using Produced = std::conditional_t<std::is_void_v<Out>, char, Out>;

    // One chunk as planned.
    struct Chunk {
        std::size_t size = 0;
        std::uint64_t tried = 0;   // its size as the learner counts it (items or weight)
        std::uint64_t limit = 0;   // the limit that cut it (0 = none)
        MemoryInfo seen;           // the reading it was planned with (zero: none taken)
        bool at_limit = false;     // cut by the limit (not by the end of the input)
        bool alone = false;        // one item that the limit allows no company
        bool takes_turns = false;  // ... and OOMs taught it: through the single-item semaphore
        bool from_model = false;
        bool measured = false;
        PlanInputs inputs;
    };

   public:
    EncodeRun(Guard& guard, const Key& key, It first, std::size_t n, F& batch_fn,
              const EncodeOptions& call, const std::vector<std::uint64_t>* weights, bool padded)
        : guard_(guard),
          key_(key),
          memory_(guard.key_memory(key)),
          learner_(weights ? memory_.weight : memory_.items),
          batch_fn_(batch_fn),
          call_(call),
          weights_(weights),
          padded_(padded),
          n_(n),
          cursor_(first) {}

    EncodeRun(const EncodeRun&) = delete;
    EncodeRun& operator=(const EncodeRun&) = delete;
    // What the call learned goes to the profile however the call ends, outside every chunk.
    ~EncodeRun() {
        if (learned_) guard_.persist_learned(key_, memory_);
    }

    Out run() {
        admit_call();
        while (pos_ < n_) {
            const Chunk chunk = plan();
            run_chunk(chunk);
        }
        if constexpr (!std::is_void_v<Out>) return std::move(results_);
    }

   private:
    std::uint64_t weight_at(std::size_t i) const { return (*weights_)[i]; }

    // A batch's weight: the sum of its items', or with padding its size x its heaviest.
    std::uint64_t batch_weight(std::size_t begin, std::size_t count) const {
        std::uint64_t total = 0, heaviest = 0;
        for (std::size_t i = begin; i < begin + count; ++i) {
            total = policy::saturating_add(total, weight_at(i));
            heaviest = std::max(heaviest, weight_at(i));
        }
        return padded_ ? policy::scale_bytes(heaviest, static_cast<double>(count)) : total;
    }

    // Refuse (or wait) only when not even the cheapest item seen so far fits: items differ and
    // an encode adapts its batches, so only "nothing can run" is a reason to say no. Memory held
    // by this guard's own calls comes back when they finish: a refusal is decided against a
    // reading that two "alone" checks bracket, and otherwise the call goes ahead and takes turns.
    void admit_call() {
        const std::uint64_t cheapest = learner_.published.cheapest.load(std::memory_order_acquire);
        if (cheapest == 0 || n_ == 0) return;
        const std::uint64_t smallest =
            weights_ ? *std::min_element(weights_->begin(), weights_->end()) : 1;
        const std::uint64_t one_item =
            policy::scale_bytes(policy::scale_bytes(cheapest, static_cast<double>(smallest)),
                                guard_.options_.history_headroom);
        const MemoryInfo seen = guard_.probe_.memory();
        if (policy::admits(one_item, seen, guard_.options_.safety_margin) || !guard_.alone())
            return;
        hold_ =
            guard_.admission_
                .admit(
                    key_, "encode",
                    [one_item](std::uint64_t) {
                        return policy::Requirement{one_item, policy::RequirementSource::measured};
                    },
                    [this] { return !guard_.alone(); }, call_.deadline)
                .hold;
    }

    Chunk plan() {
        Chunk chunk;
        chunk.inputs = learner_.read();
        if (chunk.inputs.model.known()) chunk.seen = guard_.probe_.memory();
        const policy::ChunkPlan plan = plan_for(chunk.inputs, chunk.seen);
        chunk.from_model = plan.from_model;
        chunk.limit = plan.limit;
        // Single items take turns (the device's semaphore) once OOMs taught that only one fits;
        // a plan of one item from the model alone runs beside the guard's other chunks.
        const bool taught_by_oom = !plan.from_model || plan.bounded_by_failure || retry_limit_ != 0;
        if (retry_limit_ != 0) chunk.limit = retry_limit_;  // decided when the OOM was handled
        // The caller's hint stands in for what a key that learned nothing would run: the whole
        // batch. It cuts the chunk but is not a learned limit (not at_limit: nothing stores it).
        const bool hinted = chunk.limit == 0 && call_.first_chunk_limit != 0;
        if (hinted) chunk.limit = call_.first_chunk_limit;
        retry_limit_ = 0;
        cut(chunk);
        if (hinted) chunk.at_limit = chunk.alone = false;
        chunk.takes_turns = chunk.alone && taught_by_oom;
        // Every chunk is measured until half a window of measurements was taken (a chunk that
        // ran inside the cache measures 0 and is no sample, but counts here), then one in
        // measure_every.
        chunk.measured = Guard::measures_peaks &&
                         (learner_.published.measured.load(std::memory_order_relaxed) <
                              policy::cost_window / 2 ||
                          learner_.published.chunks.fetch_add(1, std::memory_order_relaxed) %
                                  policy::measure_every ==
                              0);
        return chunk;
    }

    policy::ChunkPlan plan_for(const PlanInputs& inputs, const MemoryInfo& seen) const {
        const std::uint64_t reserve =
            policy::scale_bytes(seen.free_bytes, guard_.options_.encode_reserve);
        return policy::plan_chunk(inputs.model, inputs.evidence, seen.free_bytes, reserve,
                                  inputs.ceiling);
    }

    void cut(Chunk& chunk) const {
        const std::uint64_t limit = chunk.limit;
        if (weights_) {
            auto weight_at = [this](std::size_t i) { return (*weights_)[i]; };
            chunk.size = padded_ ? policy::cut_by_padded_weight(pos_, n_, limit, weight_at)
                                 : policy::cut_by_weight(pos_, n_, limit, weight_at);
            // Alone when not even two such items fit the limit.
            chunk.alone =
                chunk.size == 1 && limit != 0 &&
                (pos_ + 1 < n_ ? batch_weight(pos_, 2)
                               : policy::saturating_add(weight_at(pos_), weight_at(pos_))) > limit;
            chunk.tried = batch_weight(pos_, chunk.size);
            chunk.at_limit = limit != 0 && (pos_ + chunk.size < n_ || chunk.alone);
        } else {
            chunk.size = limit == 0
                             ? n_ - pos_
                             : static_cast<std::size_t>(std::min<std::uint64_t>(limit, n_ - pos_));
            chunk.alone = limit == 1;
            chunk.tried = chunk.size;
            chunk.at_limit = limit != 0 && chunk.size == limit;
        }
    }

    void run_chunk(const Chunk& chunk) {
        It chunk_end = std::next(
            cursor_, static_cast<typename std::iterator_traits<It>::difference_type>(chunk.size));
        Produced produced{};
        std::optional<std::uint64_t> peak;
        // Only batch_fn's own exceptions meet the OOM classifier: the bookkeeping around it (a
        // bad_alloc in a log line, a contract error) is never mistaken for a device OOM.
        std::exception_ptr error;
        {
            // Chunks that always overlap would never be measured alone: after a few spoiled
            // measurements, the next measured chunk of the key takes the guard for itself.
            std::optional<RunTracker::ExclusiveTurn> measuring_alone;
            if (chunk.measured && !exclusive_ &&
                learner_.published.spoiled.load(std::memory_order_relaxed) >=
                    policy::spoiled_before_exclusive)
                measuring_alone.emplace(guard_.runs_);
            typename Guard::Measurement run(guard_, chunk.measured,
                                            exclusive_.has_value() || measuring_alone.has_value());
            Semaphore::Permit permit;
            std::unique_ptr<Hold> host_lock;
            if (chunk.takes_turns) {
                guard_.publish(Event(EventKind::single_item, key_, "encode"));
                permit = Semaphore::Permit(*guard_.single_item_);
                if (guard_.options_.coordinator)
                    host_lock = guard_.options_.coordinator->lock_single_item();
            }
            try {
                if constexpr (std::is_void_v<Out>)
                    std::invoke(batch_fn_, View(cursor_, chunk_end, chunk.size, pos_));
                else
                    produced = std::invoke(batch_fn_, View(cursor_, chunk_end, chunk.size, pos_));
                peak = run.peak();
            } catch (...) {
                error = std::current_exception();
            }
        }
        if (chunk.measured) note_measurement(peak.has_value());
        if (error) return on_failure(chunk, error);
        check_count(chunk, produced);
        keep(chunk, std::move(produced));
        cursor_ = chunk_end;
        record_success(chunk, peak);
    }

    // A measurement spoiled by another run of the guard, or one taken (it counts towards the
    // learning phase whether or not it found a peak).
    void note_measurement(bool taken) noexcept {
        auto& published = learner_.published;
        if (!taken) {
            published.spoiled.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        if (published.spoiled.load(std::memory_order_relaxed) != 0)
            published.spoiled.store(0, std::memory_order_relaxed);
        if (published.measured.load(std::memory_order_relaxed) < policy::cost_window / 2)
            published.measured.fetch_add(1, std::memory_order_relaxed);
    }

    void check_count(const Chunk& chunk, const Produced& produced) const {
        if constexpr (!std::is_void_v<Out>) {
            if (produced.size() == chunk.size) return;
            throw std::length_error(
                "vramguard::Guard::encode " + key_.describe() + ": batch_fn returned " +
                std::to_string(produced.size()) + " results for " + std::to_string(chunk.size) +
                " items (items " + std::to_string(pos_) + ".." +
                std::to_string(pos_ + chunk.size - 1) + "); it must return exactly one per item");
        }
    }

    void keep(const Chunk& chunk, Produced&& produced) {
        if constexpr (!std::is_void_v<Out>) {
            if (results_.empty() && chunk.size == n_) {
                results_ = std::move(produced);  // one chunk: its vector is the answer
            } else {
                if (results_.empty()) results_.reserve(n_);
                std::move(produced.begin(), produced.end(), std::back_inserter(results_));
            }
        }
        pos_ += chunk.size;
        alone_failures_ = 0;
        exclusive_.reset();
    }

    void record_success(const Chunk& chunk, std::optional<std::uint64_t> peak) {
        const bool sample = peak && *peak > 0;
        const std::uint64_t free = chunk.seen.free_bytes;
        const bool limit_moved = chunk.at_limit && chunk.limit != learner_.published.limit.load(
                                                                      std::memory_order_relaxed);
        if (!sample && !limit_moved &&
            !SizeLearner::success_teaches(chunk.inputs, chunk.tried, free, chunk.at_limit))
            return;
        bool grew = false;
        learned_ = true;
        {
            std::unique_lock<std::mutex> lock(memory_.mutex);
            if (sample) learner_.add_sample({chunk.tried, *peak}, next_sample_stamp());
            if (chunk.at_limit) {
                // Memory came back (or the model learned better): worth saying when it is more
                // than the jitter of a fit, an eighth.
                grew = chunk.from_model && learner_.limit != 0 &&
                       chunk.limit > learner_.limit + learner_.limit / 8;
                learner_.limit = chunk.limit;
            }
            policy::on_chunk_ran(learner_.evidence, chunk.tried, free, chunk.at_limit,
                                 guard_.options_.forget_failure_after * policy::model_relax_factor,
                                 policy::model_fits_failure(learner_.model, learner_.evidence,
                                                            guard_.options_.encode_reserve));
            grew = on_ceiling_success(chunk, lock) || grew;
            learner_.publish();
        }
        if (grew) {
            Event event(EventKind::grew, key_, "encode");
            event.next = learner_.published.limit.load(std::memory_order_relaxed);
            event.weight = weights_ ? 1 : 0;
            guard_.publish(event);
        }
    }

    // The OOM-learned ceiling, for probes that measure no peaks (caller holds the key's mutex).
    bool on_ceiling_success(const Chunk& chunk, std::unique_lock<std::mutex>& lock) {
        policy::CeilingState& state = learner_.ceiling;
        const policy::GrowthRule rule{guard_.options_.grow_after_successes,
                                      guard_.options_.forget_failure_after};
        const bool at_ceiling = chunk.at_limit && !chunk.from_model;
        std::uint64_t free_now = 0;
        if (at_ceiling && policy::wants_memory_reading(state, rule)) {
            lock.unlock();
            free_now = guard_.probe_.memory().free_bytes;
            lock.lock();
        }
        const bool grew = policy::on_success(state, at_ceiling, chunk.tried, rule, free_now);
        if (grew && !learner_.model.known()) learner_.limit = policy::learned(state);
        return grew;
    }

    void on_failure(const Chunk& chunk, const std::exception_ptr& error) {
        guard_.take_oom_or_rethrow(error, "encode", key_);
        // The message's "free" is what was left beside the chunk's own earlier allocations when
        // it failed (the allocator had already emptied its cache to retry), which is what the
        // rest of the chunk had to fit in: the part that fits is estimated from it. Without it,
        // the probe's reading now, with the cache emptied, stands in.
        const MemoryInfo after = guard_.probe_.memory();
        std::optional<OomReport> report = oom_report(error);
        if (report && !report->free_bytes) report->free_bytes = after.free_bytes;
        if (chunk.size > 1) return shrink_after_oom(chunk, error, report, after);
        on_item_oom(chunk, error, report, after);
    }

    void shrink_after_oom(const Chunk& chunk, const std::exception_ptr& error,
                          const std::optional<OomReport>& report, const MemoryInfo& after) {
        const std::uint64_t backstop = policy::size_after_oom(chunk.tried, report);
        learned_ = true;
        {
            std::lock_guard<std::mutex> lock(memory_.mutex);
            const std::uint64_t free = planned_or(chunk, after);
            policy::on_chunk_failed(learner_.evidence, chunk.tried, free);
            // A chunk that did not fit cost at least the allocation that failed and, planned
            // against a reading, more than was free then: a lower bound, kept as a sample.
            const std::uint64_t at_least = std::max(chunk.seen.total_bytes != 0 ? free + 1 : 0,
                                                    report ? report->requested_bytes : 0);
            if (Guard::measures_peaks && at_least > 0 && !policy::failure_was_transient(report))
                learner_.add_sample({chunk.tried, at_least}, next_sample_stamp(), false);
            policy::on_oom(learner_.ceiling, chunk.tried, backstop, after.free_bytes);
            learner_.publish();
        }
        // A chunk the model did not plan (nothing was known) retries at what the OOM's numbers
        // say fits, not at a model made of that one failure: what then runs is measured.
        retry_limit_ = chunk.from_model ? policy::retry_size(plan_for(learner_.read(), after),
                                                             chunk.tried, report)
                                        : backstop;
        Event event(EventKind::chunk_shrunk, key_, "encode");
        event.size = chunk.size;
        event.weight = weights_ ? chunk.tried : 0;
        event.next = retry_limit_;
        event.error = &error;
        guard_.publish(event);
    }

    // An item that ran out of memory alone. While other runs of this guard held memory the
    // failure says nothing about the item: it takes the guard for itself (new runs wait, the
    // running ones finish) and retries really alone, without counting the failure.
    void on_item_oom(const Chunk& chunk, const std::exception_ptr& error,
                     const std::optional<OomReport>& report, const MemoryInfo& after) {
        retry_limit_ = 1;
        if (!exclusive_ && guard_.runs_.others_running()) {
            Event event(EventKind::item_exclusive, key_, "encode");
            event.item = pos_;
            event.error = &error;
            guard_.publish(event);
            exclusive_.emplace(guard_.runs_);
            return;
        }
        ++alone_failures_;
        const bool hopeless = Guard::asked_for_more_than_the_device(report, after.total_bytes);
        if (alone_failures_ >= guard_.options_.single_item_attempts || hopeless || past_deadline())
            give_up(error, hopeless, after.total_bytes);
        const std::chrono::milliseconds wait = wait_allowed();
        Event event(EventKind::item_retry, key_, "encode");
        event.item = pos_;
        event.attempt = alone_failures_;
        event.attempts = guard_.options_.single_item_attempts;
        event.error = &error;
        guard_.publish(event);
        if (report && report->requested_bytes > 0) {
            const std::optional<std::uint64_t> distrusted =
                policy::failure_was_transient(report)
                    ? std::nullopt
                    : std::optional<std::uint64_t>(planned_or(chunk, after));
            guard_.admission_.wait_for_memory(report->requested_bytes, wait, distrusted);
        } else {
            guard_.options_.sleep(std::min<Duration>(guard_.options_.poll_interval, wait));
        }
    }

    // The longest wait before an item's retry: item_retry_delay, cut at the call's deadline.
    std::chrono::milliseconds wait_allowed() const {
        const std::chrono::milliseconds bound = guard_.options_.item_retry_delay;
        if (!call_.deadline) return bound;
        const TimePoint now = guard_.options_.clock();
        if (*call_.deadline <= now) return std::chrono::milliseconds::zero();
        return std::min(
            bound, std::chrono::duration_cast<std::chrono::milliseconds>(*call_.deadline - now));
    }
    bool past_deadline() const {
        return call_.deadline && guard_.options_.clock() >= *call_.deadline;
    }

    // The free memory the chunk was planned with, or when none was read, the reading after.
    static std::uint64_t planned_or(const Chunk& chunk, const MemoryInfo& after) noexcept {
        return chunk.seen.total_bytes != 0 ? chunk.seen.free_bytes : after.free_bytes;
    }

    [[noreturn]] void give_up(const std::exception_ptr& error, bool hopeless, std::uint64_t total) {
        Event event(EventKind::item_gave_up, key_, "encode");
        event.item = pos_;
        event.attempt = alone_failures_;
        guard_.publish(event);
        throw_with_cause(error, [&] {
            OomExhausted exhausted(
                "vramguard: encode " + key_.describe() + ": item " + std::to_string(pos_) +
                    " ran out of memory even alone " +
                    guard_.given_up_because(hopeless, alone_failures_, total,
                                            guard_.options_.item_retry_delay) +
                    (past_deadline() ? " The call's deadline has passed." : "") + " The " +
                    std::to_string(pos_) +
                    " results before it are kept in OomExhausted::finished_results(). Last "
                    "error: " +
                    describe(error),
                key_.describe(), pos_, alone_failures_);
            if constexpr (!std::is_void_v<Out>)
                exhausted.keep_finished_results(std::move(results_));
            return exhausted;
        });
    }

    Guard& guard_;
    const Key& key_;
    KeyMemory& memory_;
    SizeLearner& learner_;
    F& batch_fn_;
    const EncodeOptions& call_;
    const std::vector<std::uint64_t>* weights_;
    bool padded_;
    std::size_t n_;
    std::size_t pos_ = 0;
    It cursor_;
    Results results_{};
    std::uint64_t retry_limit_ = 0;  // the next chunk's limit right after an OOM (0 = plan it)
    unsigned alone_failures_ = 0;
    bool learned_ = false;  // something for the profile: persisted when the call ends
    std::optional<RunTracker::ExclusiveTurn> exclusive_;
    std::unique_ptr<Hold> hold_;  // the call's host-wide reservation, when admission made one
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
