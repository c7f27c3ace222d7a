// SPDX-License-Identifier: MIT
// ChunkPlanner: how an encode call is admitted and how its next chunk is planned: the key's model
// against the reading less what the guard's other chunks in flight claim (detail/claims.hpp),
// decided by policy::decide_chunk and policy::run_or_wait, cut by the call's weights, and claimed.
// EncodeRun (encode_run.hpp) runs what it plans.
#pragma once

#include <vramguard/coordinator.hpp>
#include <vramguard/detail/chunk_cut.hpp>
#include <vramguard/detail/claims.hpp>
#include <vramguard/detail/key_memory.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

// One chunk as planned.
struct PlannedChunk : ChunkCut {
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

// The longest wait inside an encode call (an item's retry, a planner's wait for a claim):
// item_retry_delay, cut at the call's deadline.
inline std::chrono::milliseconds wait_allowed(const Options& options, const EncodeOptions& call) {
    const std::chrono::milliseconds bound = options.item_retry_delay;
    if (!call.deadline) return bound;
    const TimePoint now = options.clock();
    if (*call.deadline <= now) return std::chrono::milliseconds::zero();
    return std::min(bound,
                    std::chrono::duration_cast<std::chrono::milliseconds>(*call.deadline - now));
}

template <class Core>
class ChunkPlanner {
   public:
    ChunkPlanner(Core& core, SizeLearner& learner, const ChunkWeights& weights,
                 const EncodeOptions& call) noexcept
        : core_(core), learner_(learner), weights_(weights), call_(call) {}

    // Refuse (or wait) only when not even this call's lightest item fits, estimated from the
    // cheapest unit measured for the key: a lower bound, so without history_headroom (that is for
    // planning). An item no heavier than one that ran, estimated within the device, is never "can
    // never fit": its estimate is capped at what the empty device admits, or one heavy item would
    // refuse every later call of the key for ever, persisted (repro_cheapest_brick). Memory held
    // by this guard's own calls comes back when they finish: a refusal is decided against a
    // reading that two "only call in flight" checks bracket, and otherwise the call goes ahead and
    // takes turns.
    // The call's admission; the host-wide hold it made, if any.
    std::unique_ptr<Hold> admit_call(const Key& key, std::size_t n) {
        const std::uint64_t cheapest = learner_.published.cheapest.load(std::memory_order_acquire);
        if (cheapest == 0 || n == 0) return nullptr;  // nothing measured: nothing to refuse
        return admit_measured(key, cheapest);
    }

   private:
    VRAMGUARD_NOINLINE std::unique_ptr<Hold> admit_measured(const Key& key,
                                                            std::uint64_t cheapest) {
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
            return nullptr;
        return core_.admission()
            .admit(
                key, "encode",
                [one_item](std::uint64_t total) {
                    return policy::Requirement{one_item(total),
                                               policy::RequirementSource::measured};
                },
                [this] { return !core_.only_call_in_flight(); }, call_.deadline)
            .hold;
    }

   public:
    // The next chunk: planned from the key's model against the reading less what the guard's other
    // chunks in flight claim, in turn with the guard's other planners (detail/claims.hpp), then
    // claimed. When the claims leave little, it may wait for one to end (policy::run_or_wait). A
    // chunk of a key not yet measured claims the whole device: its cost is unknown, and the first
    // chunks of a key planned at once would all run whole and all run out of memory.
    PlannedChunk plan(std::size_t pos, std::uint64_t retry_limit, bool exclusive_held) {
        pos_ = pos;
        retry_limit_ = retry_limit;
        exclusive_held_ = exclusive_held;
        PlannedChunk chunk;
        chunk.inputs = learner_.read();
        policy::ChunkFacts facts = chunk_facts();
        // Without a model there is nothing to claim: the OOM-learned ceiling plans (or nothing),
        // unless nothing of the key was measured yet (then the whole device is claimed).
        const bool known = chunk.inputs.model.known();
        if (!known && (!Core::measures_peaks ||
                       learner_.published.measured.load(std::memory_order_relaxed) != 0)) {
            decide(chunk, facts);
            return chunk;
        }
        // A chunk inside another run of the guard on this thread (a loader's warm-up through
        // encode) is that run's: its memory is in the outer run's claim, so it plans from the
        // reading as it is, claims nothing, and never waits.
        if (facts.inside_another_run) {
            if (known) chunk.seen = core_.probe().memory();
            decide(chunk, facts);
            return chunk;
        }
        plan_with_claims(chunk, facts);
        return chunk;
    }

    // The plan for a reading: the model less the encode reserve, bounded by evidence.
    policy::ChunkPlan plan_for(const PlanInputs& inputs, const MemoryInfo& seen) const {
        const std::uint64_t reserve =
            policy::encode_reserve_bytes(seen.free_bytes, options().encode_reserve);
        return policy::plan_chunk(inputs.model, inputs.evidence, seen.free_bytes, reserve,
                                  inputs.ceiling);
    }

   private:
    // The plan in turn with the guard's other planners, against what their claims leave.
    VRAMGUARD_NOINLINE void plan_with_claims(PlannedChunk& chunk, policy::ChunkFacts& facts) {
        const bool may_queue = !facts.exclusive_held;
        Claims::Turn turn(core_.claims(), may_queue);
        // Waiting for claims is bounded like an item's retry: item_retry_delay, the call's
        // deadline.
        const auto wait_until = std::chrono::steady_clock::now() + wait_allowed(options(), call_);
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
    std::uint64_t read_available(PlannedChunk& chunk, Claims::Turn& turn) {
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
        facts.exclusive_held = exclusive_held_;
        facts.first_chunk_hint = call_.first_chunk_limit;
        return facts;
    }

    // The chunk's limit (policy::decide_chunk over the plan for its reading) and its cut.
    void decide(PlannedChunk& chunk, policy::ChunkFacts& facts) const {
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
    policy::ShareFacts share_facts(PlannedChunk& chunk, std::uint64_t freed, bool others_claim,
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

    const Options& options() const noexcept { return core_.options(); }

    Core& core_;
    SizeLearner& learner_;
    const ChunkWeights& weights_;
    const EncodeOptions& call_;
    std::size_t pos_ = 0;
    std::uint64_t retry_limit_ = 0;  // the size the last OOM chose (0: plan it)
    bool exclusive_held_ = false;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
