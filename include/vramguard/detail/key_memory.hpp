// SPDX-License-Identifier: MIT
// What a guard has learned about one key, shared by every thread using the key: for encodes, per
// sizing mode (items, or weight units), the recent measured chunks and the cost model fitted to
// them, the evidence of what ran and what failed, and (for probes that measure no peaks) the
// ceiling learned from OOMs; for loads, the recent peaks. Changes happen under one mutex and are
// published to atomics, which the fast path reads without the lock (a plan may then mix two
// consecutive states, each field of which was true a moment ago).
#pragma once

#include <vramguard/policy.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

using policy::PlanInputs;

// One sizing mode's learning. Every member but `published` is guarded by KeyMemory::mutex.
struct SizeLearner {
    std::vector<policy::CostSample> samples;  // oldest first, at most cost_window
    std::vector<ProfileSample> unsaved;       // measured here, not yet in the profile
    policy::CostModel model;
    policy::Evidence evidence;
    policy::CeilingState ceiling;
    std::uint64_t cheapest_unit_bytes = 0;  // the lowest peak per unit in the window
    std::uint64_t limit = 0;                // the latest limit that cut a chunk
    std::uint64_t persisted_limit = 0;

    struct Published {
        std::atomic<std::uint64_t> fixed{0}, slope_bits{0}, costliest_bits{0}, samples{0},
            upper_bound{0};
        std::atomic<std::uint64_t> failed_size{0}, failed_free{0}, ran_size{0}, ran_free{0};
        std::atomic<std::uint64_t> ceiling{0}, largest_success{0}, cheapest{0}, limit{0};
        std::atomic<unsigned> spoiled{0};   // measurements in a row that another run overlapped
        std::atomic<unsigned> measured{0};  // measurements taken, counted up to half a window
        std::atomic<unsigned> chunks{0};    // chunks planned since, for one in measure_every
    } published;

    // `measured`: the chunk ran and its peak was read (else a lower bound from an OOM, which the
    // model uses while it lasts but the profile does not keep: it is no size that ran).
    void add_sample(const policy::CostSample& sample, std::uint64_t stamp, bool measured = true) {
        if (samples.size() >= policy::cost_window) samples.erase(samples.begin());
        samples.push_back(sample);
        if (measured) unsaved.push_back(ProfileSample{stamp, sample.size, sample.peak_bytes});
        refit();
    }

    // Samples from a profile (oldest first). Each is also evidence: that size ran with at least
    // its peak free, so the largest one is not planned below when that much is free again.
    void seed(const std::vector<ProfileSample>& saved) {
        for (const ProfileSample& s : saved) {
            if (s.size == 0 || s.peak_bytes == 0) continue;
            if (samples.size() >= policy::cost_window) samples.erase(samples.begin());
            samples.push_back(policy::CostSample{s.size, s.peak_bytes});
            if (s.size > evidence.ran_size)
                evidence.ran_size = s.size, evidence.ran_free = s.peak_bytes;
        }
        refit();
    }

    // The latest limit learned: the model's last plan that cut a chunk, or without a model the
    // ceiling that ran (caller holds KeyMemory::mutex).
    std::uint64_t learned_limit() const noexcept {
        return model.known() ? limit : policy::learned(ceiling);
    }

    void refit() noexcept {
        model = policy::fit_cost(samples, limit);
        cheapest_unit_bytes = 0;
        for (const policy::CostSample& s : samples) {
            const std::uint64_t per_unit = s.peak_bytes / s.size + (s.peak_bytes % s.size != 0);
            if (cheapest_unit_bytes == 0 || per_unit < cheapest_unit_bytes)
                cheapest_unit_bytes = per_unit;
        }
    }

    static std::uint64_t bits_of(double value) noexcept {
        std::uint64_t bits = 0;
        std::memcpy(&bits, &value, sizeof bits);
        return bits;
    }

    void publish() noexcept {
        const auto order = std::memory_order_release;
        published.fixed.store(model.fixed_bytes, order);
        published.slope_bits.store(bits_of(model.bytes_per_unit), order);
        published.costliest_bits.store(bits_of(model.costliest_unit), order);
        published.upper_bound.store(model.slope_is_upper_bound ? 1 : 0, order);
        published.samples.store(model.samples, order);
        published.failed_size.store(evidence.failed_size, order);
        published.failed_free.store(evidence.failed_free, order);
        published.ran_size.store(evidence.ran_size, order);
        published.ran_free.store(evidence.ran_free, order);
        published.ceiling.store(ceiling.ceiling, order);
        published.largest_success.store(ceiling.largest_success, order);
        published.cheapest.store(cheapest_unit_bytes, order);
        published.limit.store(limit, order);
    }

    PlanInputs read() const noexcept {
        const auto order = std::memory_order_acquire;
        PlanInputs in;
        in.model.samples = static_cast<std::size_t>(published.samples.load(order));
        in.model.fixed_bytes = published.fixed.load(order);
        const std::uint64_t slope_bits = published.slope_bits.load(order);
        std::memcpy(&in.model.bytes_per_unit, &slope_bits, sizeof slope_bits);
        in.model.slope_is_upper_bound = published.upper_bound.load(order) != 0;
        const std::uint64_t costliest_bits = published.costliest_bits.load(order);
        std::memcpy(&in.model.costliest_unit, &costliest_bits, sizeof costliest_bits);
        in.evidence.failed_size = published.failed_size.load(order);
        in.evidence.failed_free = published.failed_free.load(order);
        in.evidence.ran_size = published.ran_size.load(order);
        in.evidence.ran_free = published.ran_free.load(order);
        in.ceiling = published.ceiling.load(order);
        in.largest_success = published.largest_success.load(order);
        return in;
    }

    // The learned limit when it changed since it was last persisted (else 0), marked persisted
    // (caller holds KeyMemory::mutex).
    std::uint64_t take_changed_limit() noexcept {
        const std::uint64_t now = learned_limit();
        if (now == 0 || now == persisted_limit) return 0;
        persisted_limit = now;
        return now;
    }
};

struct KeyMemory {
    std::mutex mutex;
    SizeLearner items;
    SizeLearner weight;
    std::atomic<std::uint64_t> load_peak{0};  // highest recent peak of a load of this key

    // Starts from the profile: its samples, or (a version 1 file) its highest peak per item as
    // one sample of one item, an upper bound.
    void seed(const Profile& profile) {
        std::lock_guard<std::mutex> lock(mutex);
        items.seed(profile.item_samples);
        if (profile.item_samples.empty() && profile.peak_bytes_per_item > 0)
            items.seed({ProfileSample{0, 1, profile.peak_bytes_per_item}});
        weight.seed(profile.weight_samples);
        seed_ceiling(items, profile.batch_ceiling);
        seed_ceiling(weight, profile.weight_budget);
        for (SizeLearner* learner : {&items, &weight}) {
            learner->publish();
            learner->published.measured.store(
                static_cast<unsigned>(std::min(learner->samples.size(), policy::cost_window / 2)),
                std::memory_order_relaxed);
        }
        load_peak.store(profile.peak_bytes, std::memory_order_relaxed);
    }

    // The latest limit learned, for learned_batch_ceiling() and learned_weight_budget().
    std::uint64_t learned(bool weighted) {
        std::lock_guard<std::mutex> lock(mutex);
        return (weighted ? weight : items).learned_limit();
    }

   private:
    // A ceiling saved by a previous run came from halving: twice it is assumed to have failed, so
    // growth probes halfway there first instead of doubling straight into the same OOM.
    static void seed_ceiling(SizeLearner& learner, std::uint64_t saved) {
        learner.ceiling.ceiling = saved;
        learner.ceiling.failed_at = saved == 0 ? 0 : policy::saturating_add(saved, saved);
        learner.limit = learner.persisted_limit = saved;
    }
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
