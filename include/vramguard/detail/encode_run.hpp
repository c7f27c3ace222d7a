// SPDX-License-Identifier: MIT
// One encode call: its state (where it is in the input, the results so far, the retry in hand) in
// one object, and a loop that only orchestrates: it gathers facts, asks policy:: what to do
// (policy::decide_chunk, after_item_oom, success_teaches, ...), runs the chunk with the guard's
// per-device services (GuardCore, received by reference) and records what happened in the key's
// learner.
#pragma once

#include <vramguard/batch_view.hpp>
#include <vramguard/detail/chunk_cut.hpp>
#include <vramguard/detail/claims.hpp>
#include <vramguard/detail/guard_core.hpp>
#include <vramguard/detail/key_memory.hpp>
#include <vramguard/detail/run_tracker.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/events.hpp>
#include <vramguard/key.hpp>
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

template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

template <class Probe, class It, class F>
class EncodeRun {
    using Core = GuardCore<Probe>;
    using View = BatchView<It>;
    using Out = std::invoke_result_t<F&, View>;
    static_assert(std::is_void_v<Out> || is_std_vector<Out>::value,
                  "vramguard::Guard::encode: batch_fn must return void or std::vector<R>, one "
                  "result per item of the view it was given");
    using Results = std::conditional_t<std::is_void_v<Out>, std::vector<char>, Out>;
    using Produced = std::conditional_t<std::is_void_v<Out>, char, Out>;

    // One chunk as planned.
    struct Chunk : ChunkCut {
        std::uint64_t limit = 0;   // the limit that cut it (0 = none)
        std::uint64_t budget = 0;  // the limit were the others' claims back: what is learned
        MemoryInfo seen;           // the reading it was planned with, claims counted (zero: none)
        bool takes_turns = false;  // a lone item OOMs taught: through the single-item semaphore
        bool from_model = false;
        bool beside_others = false;  // other chunks of the guard claimed memory when it was planned
        policy::ChunkDecision decision;
        PlanInputs inputs;
        Claims::Claim claim;  // what its model predicts, until it ends
    };

   public:
    EncodeRun(Core& core, const Key& key, It first, std::size_t n, F& batch_fn,
              const EncodeOptions& call, const std::vector<std::uint64_t>* weights, bool padded)
        : core_(core),
          key_(key),
          memory_(core.key_memory(key)),
          learner_(weights ? memory_.weight : memory_.items),
          batch_fn_(batch_fn),
          call_(call),
          weights_(weights, padded, n),
          n_(n),
          cursor_(first) {}

    EncodeRun(const EncodeRun&) = delete;
    EncodeRun& operator=(const EncodeRun&) = delete;
    // What the call learned goes to the profile however the call ends, outside every chunk.
    ~EncodeRun() {
        if (learned_) core_.persist_learned(key_, memory_);
    }

    Out run() {
        admit_call();
        while (pos_ < n_) {
            Chunk chunk = plan();
            run_chunk(chunk);
        }
        if constexpr (!std::is_void_v<Out>) return std::move(results_);
    }

   private:
    // Refuse (or wait) only when not even this call's lightest item fits, estimated from the
    // cheapest unit measured for the key: a lower bound, so without history_headroom (that is for
    // planning). An item no heavier than one that ran, estimated within the device, is never "can
    // never fit": its estimate is capped at what the empty device admits, or one heavy item would
    // refuse every later call of the key for ever, persisted (repro_cheapest_brick). Memory held
    // by this guard's own calls comes back when they finish: a refusal is decided against a
    // reading that two "only call in flight" checks bracket, and otherwise the call goes ahead and
    // takes turns.
    void admit_call() {
        const std::uint64_t cheapest = learner_.published.cheapest.load(std::memory_order_acquire);
        if (cheapest == 0 || n_ == 0) return;
        const std::uint64_t smallest = weights_.lightest();
        const bool ran_before =
            smallest <= learner_.published.ran_size.load(std::memory_order_acquire);
        const std::uint64_t estimate = policy::scale_bytes(cheapest, static_cast<double>(smallest));
        const double margin = options().safety_margin;
        auto one_item = [estimate, ran_before, margin](std::uint64_t total) {
            return policy::capped_by_device(estimate, ran_before && estimate <= total, total,
                                            margin);
        };
        const MemoryInfo seen = core_.probe().memory();
        if (policy::admits(one_item(seen.total_bytes), seen, margin) ||
            !core_.only_call_in_flight())
            return;
        hold_ = core_.admission()
                    .admit(
                        key_, "encode",
                        [one_item](std::uint64_t total) {
                            return policy::Requirement{one_item(total),
                                                       policy::RequirementSource::measured};
                        },
                        [this] { return !core_.only_call_in_flight(); }, call_.deadline)
                    .hold;
    }

    // The next chunk: planned from the key's model against the reading less what the guard's other
    // chunks in flight claim, in turn with the guard's other planners (detail/claims.hpp), then
    // claimed. When the claims leave little, it may wait for one to end (policy::run_or_wait). A
    // chunk of a key not yet measured claims the whole device: its cost is unknown, and the first
    // chunks of a key planned at once would all run whole and all run out of memory.
    Chunk plan() {
        Chunk chunk;
        chunk.inputs = learner_.read();
        policy::ChunkFacts facts = chunk_facts();
        // Without a model there is nothing to claim: the OOM-learned ceiling plans (or nothing),
        // unless nothing of the key was measured yet (then the whole device is claimed).
        if (!chunk.inputs.model.known() &&
            (!Core::measures_peaks ||
             learner_.published.measured.load(std::memory_order_relaxed) != 0)) {
            decide(chunk, facts);
            retry_limit_ = 0;
            return chunk;
        }
        plan_with_claims(chunk, facts);
        retry_limit_ = 0;
        return chunk;
    }

    // The plan in turn with the guard's other planners, against what their claims leave.
    void plan_with_claims(Chunk& chunk, policy::ChunkFacts& facts) {
        const bool may_queue = !facts.inside_another_run && !facts.exclusive_held;
        Claims::Turn turn(core_.claims(), may_queue);
        // Waiting for claims is bounded like an item's retry: item_retry_delay, the call's
        // deadline.
        const auto wait_until = std::chrono::steady_clock::now() + wait_allowed();
        bool known = false;
        for (bool first = true;; first = false) {
            if (!first) chunk.inputs = learner_.read();  // what the chunks waited for taught
            known = chunk.inputs.model.known();
            const std::uint64_t free_now = known ? read_available(chunk, turn) : 0;
            decide(chunk, facts);
            const bool may_wait = may_queue && std::chrono::steady_clock::now() < wait_until;
            policy::ShareFacts share;
            if (known) {
                share = share_facts(chunk, turn.without_claims(free_now), turn.claimed() != 0,
                                    may_wait);
            } else {
                share.others_claim = share.may_wait = turn.claimed() != 0 && may_wait;
                share.fits_now = false;  // its cost is unknown: it waits for the device
            }
            if (policy::run_or_wait(share) == policy::ShareStep::run_now) break;
            turn.wait_for_release(wait_until);
        }
        chunk.beside_others = turn.claimed() != 0;
        if (!known)
            chunk.claim = turn.claim(Claims::whole_device);
        else if (chunk.from_model)
            chunk.claim = turn.claim(chunk.inputs.model.peak_for(chunk.tried));
    }

    // The reading, with what the claims leave as its free memory; returns the reading's own.
    std::uint64_t read_available(Chunk& chunk, Claims::Turn& turn) {
        chunk.seen = core_.probe().memory();
        const std::uint64_t free_now = chunk.seen.free_bytes;
        chunk.seen.free_bytes = turn.available(free_now);
        return free_now;
    }

    // What a plan reads besides the reading: the retry in hand, the learning phase, the turns.
    policy::ChunkFacts chunk_facts() {
        policy::ChunkFacts facts;
        facts.retry_limit = retry_limit_;
        facts.measures_peaks = Core::measures_peaks;
        facts.inside_another_run = core_.runs().running_here();
        auto& published = learner_.published;
        facts.learning =
            policy::in_learning_phase(published.measured.load(std::memory_order_relaxed));
        if (facts.measures_peaks && !facts.inside_another_run && !facts.learning)
            facts.chunk_number = published.chunks.fetch_add(1, std::memory_order_relaxed);
        facts.spoiled = published.spoiled.load(std::memory_order_relaxed);
        facts.exclusive_held = exclusive_.has_value();
        facts.first_chunk_hint = call_.first_chunk_limit;
        return facts;
    }

    // The chunk's limit (policy::decide_chunk over the plan for its reading) and its cut.
    void decide(Chunk& chunk, policy::ChunkFacts& facts) const {
        facts.plan = plan_for(chunk.inputs, chunk.seen);
        chunk.decision = policy::decide_chunk(facts);
        chunk.from_model = facts.plan.from_model;
        chunk.limit = chunk.budget = chunk.decision.limit;
        static_cast<ChunkCut&>(chunk) = weights_.cut(pos_, chunk.limit);
        // A hint is no learned limit: not at_limit (nothing stores it), and it makes no lone item.
        if (chunk.decision.hinted) chunk.at_limit = chunk.lone_item = false;
        chunk.takes_turns = policy::takes_turns(chunk.lone_item, chunk.decision);
    }

    // The chunk planned beside others' claims against the one their memory back (`freed` free)
    // would give; that limit is the chunk's budget, what the key learns.
    policy::ShareFacts share_facts(Chunk& chunk, std::uint64_t freed, bool others_claim,
                                   bool may_wait) const {
        policy::ShareFacts share;
        share.others_claim = others_claim;
        if (!others_claim || chunk.decision.hinted) return share;
        share.may_wait = may_wait;
        share.size_now = share.size_freed = chunk.tried;
        share.fits_now = chunk.limit == 0 || chunk.tried <= chunk.limit;
        MemoryInfo seen = chunk.seen;
        seen.free_bytes = freed;
        const std::uint64_t freed_limit = plan_for(chunk.inputs, seen).limit;
        share.fits_freed = freed_limit == 0 || chunk.tried <= freed_limit;
        if (retry_limit_ != 0) return share;  // a retry keeps the size its OOM chose
        chunk.budget = freed_limit;
        share.size_freed = weights_.cut(pos_, chunk.budget).tried;
        return share;
    }

    policy::ChunkPlan plan_for(const PlanInputs& inputs, const MemoryInfo& seen) const {
        const std::uint64_t reserve =
            policy::encode_reserve_bytes(seen.free_bytes, options().encode_reserve);
        return policy::plan_chunk(inputs.model, inputs.evidence, seen.free_bytes, reserve,
                                  inputs.ceiling);
    }

    void run_chunk(Chunk& chunk) {
        It chunk_end = std::next(
            cursor_, static_cast<typename std::iterator_traits<It>::difference_type>(chunk.size));
        Produced produced{};
        std::optional<std::uint64_t> peak;
        // Only batch_fn's own exceptions meet the OOM classifier: the bookkeeping around it (a
        // bad_alloc in a log line, a contract error) is never mistaken for a device OOM.
        std::exception_ptr error;
        {
            std::optional<RunTracker::ExclusiveTurn> measuring_exclusively;
            if (chunk.decision.measure_exclusively) measuring_exclusively.emplace(core_.runs());
            typename Core::Measurement run(core_, chunk.decision.measure,
                                           exclusive_.has_value() || measuring_exclusively);
            Semaphore::Permit permit;
            std::unique_ptr<Hold> host_lock;
            if (chunk.takes_turns) {
                core_.publish(Event(EventKind::single_item, key_, "encode"));
                permit = Semaphore::Permit(core_.single_item());
                if (options().coordinator) host_lock = options().coordinator->lock_single_item();
            }
            try {
                if constexpr (std::is_void_v<Out>)
                    std::invoke(batch_fn_, View(cursor_, chunk_end, chunk.size, pos_));
                else
                    produced = std::invoke(batch_fn_, View(cursor_, chunk_end, chunk.size, pos_));
                peak = run.peak();
            } catch (...) {
                error = std::current_exception();
                // Read only on failure: the sum over the tracker's stripes is not free.
                chunk.beside_others = chunk.beside_others || core_.runs().others_running();
            }
        }
        chunk.claim.release();  // ended: what it took is in the reading, or given back
        if (chunk.decision.measure) note_measurement(peak.has_value());
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
        if (policy::in_learning_phase(published.measured.load(std::memory_order_relaxed)))
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
        item_failures_ = 0;
        exclusive_.reset();
    }

    void record_success(const Chunk& chunk, std::optional<std::uint64_t> peak) {
        policy::ChunkRan ran;
        ran.size = chunk.tried;
        ran.free_bytes = chunk.seen.free_bytes;
        ran.at_limit = chunk.at_limit;
        ran.limit = chunk.budget;
        ran.measured_peak = peak && *peak > 0;
        if (!policy::success_teaches(chunk.inputs,
                                     learner_.published.limit.load(std::memory_order_relaxed), ran))
            return;
        bool grew = false;
        learned_ = true;
        {
            std::unique_lock<std::mutex> lock(memory_.mutex);
            if (ran.measured_peak) learner_.add_sample({chunk.tried, *peak}, next_sample_stamp());
            if (chunk.at_limit) {
                grew = policy::limit_grew(chunk.from_model, learner_.limit, chunk.budget);
                learner_.limit = chunk.budget;
            }
            policy::on_chunk_ran(learner_.evidence, chunk.tried, ran.free_bytes, chunk.at_limit,
                                 options().forget_failure_after * policy::model_relax_factor,
                                 policy::model_fits_failure(learner_.model, learner_.evidence,
                                                            options().encode_reserve));
            grew = on_ceiling_success(chunk, lock) || grew;
            learner_.publish();
        }
        if (grew) {
            Event event(EventKind::grew, key_, "encode");
            event.next = learner_.published.limit.load(std::memory_order_relaxed);
            event.weight = weights_.weighted() ? 1 : 0;
            core_.publish(event);
        }
    }

    // The OOM-learned ceiling, for probes that measure no peaks (caller holds the key's mutex).
    bool on_ceiling_success(const Chunk& chunk, std::unique_lock<std::mutex>& lock) {
        policy::CeilingState& state = learner_.ceiling;
        const policy::GrowthRule rule{options().grow_after_successes,
                                      options().forget_failure_after};
        const bool at_ceiling = chunk.at_limit && !chunk.from_model;
        std::uint64_t free_now = 0;
        if (at_ceiling && policy::wants_memory_reading(state, rule)) {
            lock.unlock();
            free_now = core_.probe().memory().free_bytes;
            lock.lock();
        }
        const bool grew = policy::on_success(state, at_ceiling, chunk.tried, rule, free_now);
        if (grew && !learner_.model.known()) learner_.limit = policy::learned(state);
        return grew;
    }

    void on_failure(const Chunk& chunk, const std::exception_ptr& error) {
        core_.take_oom_or_rethrow(error, "encode", key_);
        // The message's "free" is what was left beside the chunk's own earlier allocations when
        // it failed (the allocator had already emptied its cache to retry), which is what the
        // rest of the chunk had to fit in: the part that fits is estimated from it. Without it,
        // the probe's reading now, with the cache emptied, stands in.
        const MemoryInfo after = core_.probe().memory();
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
            const std::uint64_t at_least = policy::oom_lower_bound(
                report, chunk.seen.total_bytes != 0, free, chunk.beside_others);
            if (Core::measures_peaks && at_least > 0)
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
        event.weight = weights_.weighted() ? chunk.tried : 0;
        event.next = retry_limit_;
        event.error = &error;
        core_.publish(event);
    }

    // An item that ran out of memory alone: retried really alone, given up on, or retried after
    // waiting for memory, as policy::after_item_oom says.
    void on_item_oom(const Chunk& chunk, const std::exception_ptr& error,
                     const std::optional<OomReport>& report, const MemoryInfo& after) {
        retry_limit_ = 1;
        policy::ItemOomFacts facts;
        facts.exclusive_held = exclusive_.has_value();
        facts.inside_another_run = core_.runs().running_here();
        facts.others_running = core_.runs().others_running();
        facts.item_failures = item_failures_ + 1;
        facts.attempts = options().single_item_attempts;
        facts.hopeless = policy::asks_more_than_the_device(report, after.total_bytes);
        facts.requested_bytes = report ? report->requested_bytes : 0;
        facts.past_deadline = past_deadline();
        const policy::ItemOomStep step = policy::after_item_oom(facts);
        if (step == policy::ItemOomStep::retry_exclusively) {
            Event event(EventKind::item_exclusive, key_, "encode");
            event.item = pos_;
            event.error = &error;
            core_.publish(event);
            exclusive_.emplace(core_.runs());
            return;
        }
        item_failures_ = facts.item_failures;
        if (step == policy::ItemOomStep::give_up) give_up(error, facts.hopeless, after.total_bytes);
        Event event(EventKind::item_retry, key_, "encode");
        event.item = pos_;
        event.attempt = item_failures_;
        event.attempts = options().single_item_attempts;
        event.error = &error;
        core_.publish(event);
        const std::chrono::milliseconds wait = wait_allowed();
        if (step == policy::ItemOomStep::wait_for_memory)
            core_.admission().wait_for_memory(
                facts.requested_bytes, wait,
                policy::reading_to_distrust(report, planned_or(chunk, after)));
        else
            options().sleep(std::min<Duration>(options().poll_interval, wait));
    }

    // The longest wait before an item's retry: item_retry_delay, cut at the call's deadline.
    std::chrono::milliseconds wait_allowed() const {
        const std::chrono::milliseconds bound = options().item_retry_delay;
        if (!call_.deadline) return bound;
        const TimePoint now = options().clock();
        if (*call_.deadline <= now) return std::chrono::milliseconds::zero();
        return std::min(
            bound, std::chrono::duration_cast<std::chrono::milliseconds>(*call_.deadline - now));
    }
    bool past_deadline() const { return call_.deadline && options().clock() >= *call_.deadline; }

    // The free memory the chunk was planned with, or when none was read, the reading after.
    static std::uint64_t planned_or(const Chunk& chunk, const MemoryInfo& after) noexcept {
        return chunk.seen.total_bytes != 0 ? chunk.seen.free_bytes : after.free_bytes;
    }

    [[noreturn]] void give_up(const std::exception_ptr& error, bool hopeless, std::uint64_t total) {
        Event event(EventKind::item_gave_up, key_, "encode");
        event.item = pos_;
        event.attempt = item_failures_;
        core_.publish(event);
        throw_with_cause(error, [&] {
            OomExhausted exhausted(
                "vramguard: encode " + key_.describe() + ": item " + std::to_string(pos_) +
                    " ran out of memory even alone " +
                    core_.given_up_because(hopeless, item_failures_, total,
                                           options().item_retry_delay) +
                    (past_deadline() ? " The call's deadline has passed." : "") + " The " +
                    std::to_string(pos_) +
                    " results before it are kept in OomExhausted::finished_results(). Last "
                    "error: " +
                    describe(error),
                key_.describe(), pos_, item_failures_);
            if constexpr (!std::is_void_v<Out>)
                exhausted.keep_finished_results(std::move(results_));
            return exhausted;
        });
    }

    const Options& options() const noexcept { return core_.options(); }

    Core& core_;
    const Key& key_;
    KeyMemory& memory_;
    SizeLearner& learner_;
    F& batch_fn_;
    const EncodeOptions& call_;
    ChunkWeights weights_;
    std::size_t n_;
    std::size_t pos_ = 0;
    It cursor_;
    Results results_{};
    std::uint64_t retry_limit_ = 0;  // the next chunk's limit right after an OOM (0 = plan it)
    unsigned item_failures_ = 0;
    bool learned_ = false;  // something for the profile: persisted when the call ends
    std::optional<RunTracker::ExclusiveTurn> exclusive_;
    std::unique_ptr<Hold> hold_;  // the call's host-wide reservation, when admission made one
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
