// SPDX-License-Identifier: MIT
// The decisions, as pure functions: no I/O, no clock, no locks. Guard and ModelRegistry do the
// waiting and the measuring; these say what the numbers mean. Every rule is table-tested.
#pragma once

#include <vramguard/errors.hpp>
#include <vramguard/detail/theil_sen.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

VRAMGUARD_BEGIN_NAMESPACE

namespace policy {

// ---- Admission -------------------------------------------------------------------------------

enum class RequirementSource {
    declared,      // the caller said how much
    measured,      // a peak measured before, times history_headroom
    conservative,  // never seen: first_run_fraction of the device
};

inline const char* to_string(RequirementSource source) noexcept {
    switch (source) {
        case RequirementSource::declared: return "declared";
        case RequirementSource::measured: return "measured";
        case RequirementSource::conservative: return "first-run estimate";
    }
    return "?";
}

struct Requirement {
    std::uint64_t bytes = 0;
    RequirementSource source = RequirementSource::conservative;
};

inline std::uint64_t scale_bytes(std::uint64_t bytes, double factor) noexcept {
    const double scaled = std::ceil(static_cast<double>(bytes) * factor);
    if (!(scaled < 1.8e19)) return std::numeric_limits<std::uint64_t>::max();
    return scaled <= 0 ? 0 : static_cast<std::uint64_t>(scaled);
}

using detail::saturating_add;  // models.hpp, host.hpp and callers say policy::
using detail::saturating_sub;

// Declared bytes beat a measured peak (the caller knows about this run), which beats the
// conservative first-run guess (a fraction of the whole device: an unknown load is assumed big).
inline Requirement required_bytes(std::optional<std::uint64_t> declared,
                                  std::uint64_t measured_peak, std::uint64_t total_bytes,
                                  double history_headroom, double first_run_fraction) noexcept {
    if (declared) return {*declared, RequirementSource::declared};
    if (measured_peak > 0)
        return {scale_bytes(measured_peak, history_headroom), RequirementSource::measured};
    return {scale_bytes(total_bytes, first_run_fraction), RequirementSource::conservative};
}

// The slice of the device kept free beyond the requirement.
inline std::uint64_t margin_bytes(std::uint64_t total_bytes, double safety_margin) noexcept {
    return scale_bytes(total_bytes, safety_margin);
}

// Admitted when required + safety_margin x total <= free.
// Written as a subtraction so huge requests can never wrap around into "fits".
inline bool admits(std::uint64_t required, const MemoryInfo& memory,
                   double safety_margin) noexcept {
    return required <= memory.free_bytes &&
           memory.free_bytes - required >= margin_bytes(memory.total_bytes, safety_margin);
}

// A cost measured on this device ran on it: an estimate derived from it (x history_headroom, x an
// item count) is capped at what the empty device admits, so one run that used most of the device
// never makes its key "never fit" for ever, persisted (repro_cheapest_brick). An estimate of
// something that did not run here stays as it is.
inline std::uint64_t capped_by_device(std::uint64_t estimate, bool ran_on_device,
                                      std::uint64_t total_bytes, double safety_margin) noexcept {
    if (!ran_on_device) return estimate;
    const std::uint64_t kept = margin_bytes(total_bytes, safety_margin);
    return std::min(estimate, total_bytes > kept ? total_bytes - kept : 0);
}

// Work that would not fit on an empty device is refused at once instead of waited for.
inline bool can_ever_fit(std::uint64_t required, std::uint64_t total_bytes,
                         double safety_margin) noexcept {
    return admits(required, MemoryInfo{total_bytes, total_bytes}, safety_margin);
}

// ---- Batch sizing without peak measurements: the ceiling learned from OOMs -------------------
//
// (With a probe that measures peaks, the cost model below plans every chunk and this ceiling is
// only its fallback before anything is measured.) One rule serves item counts and item weights
// (tokens, pixels, seconds of audio): a "size" is either. On OOM the size halves (or drops to what
// the OOM's numbers say fits, never above half); a failed growth probe instead falls back to the
// size that last worked. After `grow_after_successes` successes at the ceiling it probes back up:
// halfway to the smallest size known to fail (stopping within 1/32 of it), or double when none is
// known. The known failure is dropped when the device has clearly more free memory than when it
// failed (a squeeze ended), and relaxed by a quarter after `forget_failure_after` successes, so a
// limit that moved is found again at the cost of one probe, not a new search.

struct GrowthRule {
    unsigned grow_after_successes = 8;
    unsigned forget_failure_after = 64;
};

struct CeilingState {
    std::uint64_t ceiling = 0;          // largest size to try; 0 = no limit known
    std::uint64_t failed_at = 0;        // smallest size seen failing since it was last forgotten
    std::uint64_t free_at_failure = 0;  // what the probe said just after that failure
    unsigned streak = 0;                // successes at the ceiling since the last change
    unsigned since_failure = 0;         // successes at the ceiling since failed_at was set
    std::uint64_t probing_from = 0;     // the proven ceiling while a grown one is still untried
    std::uint64_t largest_success =
        0;                       // largest size that ran since the last failure at or below it
    unsigned failed_probes = 0;  // growth probes in a row that ran out of memory
};

// Successes before a known failure is relaxed: doubles with every probe that failed in a row
// (the limit has not moved, so probing it again only costs OOMs), up to 64 times the rule's.
inline std::uint64_t relax_interval(const CeilingState& state, const GrowthRule& rule) noexcept {
    return static_cast<std::uint64_t>(rule.forget_failure_after)
           << std::min(state.failed_probes, 6u);
}

// What is known to work: a ceiling grown but not yet tried is a guess, not something learned.
inline std::uint64_t learned(const CeilingState& state) noexcept {
    return state.probing_from != 0 ? state.probing_from : state.ceiling;
}

// The next size to try after `tried` ran out of memory. With the OOM's own numbers ("tried to
// allocate R, F free"), the part that fits is estimated as tried x F / R (an underestimate: the
// chunk's earlier allocations were not counted), but never above half, never below 1.
inline std::uint64_t size_after_oom(std::uint64_t tried,
                                    const std::optional<OomReport>& report) noexcept {
    const std::uint64_t half = std::max<std::uint64_t>(1, tried / 2);
    if (!report || !report->free_bytes || report->requested_bytes == 0) return half;
    const double fits = static_cast<double>(tried) * static_cast<double>(*report->free_bytes) /
                        static_cast<double>(report->requested_bytes);
    // Clamped while still a double: converting an out-of-range double is undefined.
    if (!(fits < static_cast<double>(half))) return half;
    return fits < 1.0 ? 1 : static_cast<std::uint64_t>(fits);
}

inline void on_oom(CeilingState& state, std::uint64_t tried, std::uint64_t next,
                   std::uint64_t free_after_release) noexcept {
    // Above what just worked, the failure only says the limit is lower than `tried`: go back to
    // what worked. At or below it, memory shrank: halve, and what worked is no longer known.
    if (state.probing_from != 0 && state.failed_probes < 64) ++state.failed_probes;
    if (state.largest_success != 0 && tried > state.largest_success)
        next = std::max(next, state.largest_success);
    else
        state.largest_success = 0;
    state.ceiling = state.ceiling == 0 ? next : std::min(state.ceiling, next);
    if (state.ceiling == 0) state.ceiling = 1;
    if (state.failed_at == 0 || tried < state.failed_at) state.failed_at = tried;
    state.free_at_failure = free_after_release;
    state.probing_from = 0;
    state.streak = 0;
    state.since_failure = 0;
}

// Whether it is time to look at free memory before deciding to grow (the caller reads the probe
// only then, keeping the fast path free of extra readings).
inline bool wants_memory_reading(const CeilingState& state, const GrowthRule& rule) noexcept {
    return state.ceiling != 0 && state.failed_at != 0 &&
           state.streak + 1 >= rule.grow_after_successes;
}

// Records a success of size `tried`. Only a batch limited by the ceiling counts towards growing (a
// short tail chunk, or a weighted batch that ended with the input, does not). `free_now` is a fresh
// probe reading or 0 when none was taken. Returns true when the ceiling grew.
inline bool on_success(CeilingState& state, bool at_ceiling, std::uint64_t tried,
                       const GrowthRule& rule, std::uint64_t free_now = 0) noexcept {
    state.largest_success = std::max(state.largest_success, tried);
    if (state.ceiling == 0 || !at_ceiling) return false;
    if (state.probing_from != 0) state.failed_probes = 0;  // a probe worked: the limit moved
    state.probing_from = 0;                                // the ceiling itself just worked
    ++state.streak;
    if (state.failed_at != 0) ++state.since_failure;
    if (state.streak < rule.grow_after_successes) return false;
    state.streak = 0;
    if (state.failed_at != 0) {
        const bool memory_came_back =
            free_now > 0 && free_now > state.free_at_failure + state.free_at_failure / 4;
        const bool relax = state.since_failure >= relax_interval(state, rule);
        if (memory_came_back) {
            state.failed_at = 0;
            state.failed_probes = 0;
        } else if (relax) {
            state.failed_at = std::max(
                state.failed_at,
                saturating_add(state.ceiling, std::max<std::uint64_t>(2, state.ceiling / 4)));
        }
        if (memory_came_back || relax) state.since_failure = 0;
    }
    const std::uint64_t before = state.ceiling;
    if (state.failed_at == 0) {
        state.ceiling =
            before > std::numeric_limits<std::uint64_t>::max() / 2 ? before : before * 2;
    } else if (state.failed_at - before > std::max<std::uint64_t>(1, before / 32)) {
        state.ceiling = before + std::max<std::uint64_t>(1, (state.failed_at - before) / 2);
    }
    if (state.ceiling == before) return false;
    state.probing_from = before;
    return true;
}

// How many items from `begin` form the next weighted batch: add items while the total stays within
// `budget`; the first item always goes, alone if it is heavier than the budget. budget 0 = no
// limit.
template <class WeightAt>
std::size_t cut_by_weight(std::size_t begin, std::size_t end, std::uint64_t budget,
                          WeightAt&& weight_at) {
    if (begin >= end) return 0;
    if (budget == 0) return end - begin;
    std::uint64_t total = weight_at(begin);
    std::size_t count = 1;
    while (begin + count < end) {
        const std::uint64_t next = saturating_add(total, weight_at(begin + count));
        if (next > budget) break;
        total = next;
        ++count;
    }
    return count;
}

// The same for batches padded to their heaviest item: a batch of n costs n x its heaviest weight,
// which is what a padded encoder allocates (and what a padded token budget counts).
template <class WeightAt>
std::size_t cut_by_padded_weight(std::size_t begin, std::size_t end, std::uint64_t budget,
                                 WeightAt&& weight_at) {
    if (begin >= end) return 0;
    if (budget == 0) return end - begin;
    std::uint64_t heaviest = weight_at(begin);
    std::size_t count = 1;
    while (begin + count < end) {
        const std::uint64_t next_heaviest =
            std::max<std::uint64_t>(heaviest, weight_at(begin + count));
        if (next_heaviest > budget / (count + 1))
            break;  // (count + 1) x heaviest > budget, without overflow
        heaviest = next_heaviest;
        ++count;
    }
    return count;
}

// ---- The cost model ------------------------------------------------------------------------
//
// With a probe that measures peaks, batches are planned from what a chunk of a key costs, fitted
// from the key's recent measured chunks (size = items, or weight units):
//  - the line peak ~= fixed + per_unit x size: the slope is the Theil-Sen estimate (the median of
//    the slopes between every two samples of different sizes), which one wrong reading cannot
//    move; the fixed part is the upper envelope (the largest residual), so every sample lies on
//    or under the line;
//  - the costliest unit: the largest peak / size among the samples at least half as large as the
//    chunks planned now (or the largest measured). A chunk's cost is not always a line plus
//    noise: in a padded batch, or a count of items of mixed lengths, one long item multiplies the
//    whole chunk, and only a per-unit bound taken where the chunks are planned sees that.
// A chunk is predicted at the larger of the two, so the plan is as careful as the worst recent
// chunk near its size, and a wrong reading ages out with the window. With one size seen, nothing
// separates the fixed part from the slope: the whole cost is charged per unit (an upper bound,
// and the model says so).

struct CostSample {
    std::uint64_t size = 0;        // items, or weight units, of a chunk that ran
    std::uint64_t peak_bytes = 0;  // what it took at its peak, measured alone
};

struct CostModel {
    std::uint64_t fixed_bytes = 0;
    double bytes_per_unit = 0;          // the line's slope
    double costliest_unit = 0;          // the per-unit bound near the planned sizes
    bool slope_is_upper_bound = false;  // one size seen: fixed is folded into the slope
    std::size_t samples = 0;

    bool known() const noexcept { return samples > 0 && bytes_per_unit > 0; }

    std::uint64_t peak_for(std::uint64_t size) const noexcept {
        const double units = static_cast<double>(size);
        const double peak = std::max(static_cast<double>(fixed_bytes) + bytes_per_unit * units,
                                     costliest_unit * units);
        return peak < 1.8e19 ? static_cast<std::uint64_t>(std::ceil(peak))
                             : std::numeric_limits<std::uint64_t>::max();
    }

    // The largest size whose predicted peak fits in `bytes`; 0 when not even one unit does.
    std::uint64_t largest_within(std::uint64_t bytes) const noexcept {
        if (!known() || bytes <= fixed_bytes) return 0;
        double units = static_cast<double>(bytes - fixed_bytes) / bytes_per_unit;
        if (costliest_unit > 0)
            units = std::min(units, static_cast<double>(bytes) / costliest_unit);
        return units < 1.8e19 ? static_cast<std::uint64_t>(units)
                              : std::numeric_limits<std::uint64_t>::max();
    }
};

// Samples kept per key and mode: enough for a robust fit, few enough that a reading from before a
// change (a new driver, another model version, a squeeze that ended) is gone after a few dozen.
inline constexpr std::size_t cost_window = 32;
// Once half a window is measured, one chunk in this many is: a measurement costs three more probe
// calls, and a cost moves slowly once known.
inline constexpr unsigned measure_every = 8;
// Measurements in a row spoiled by another run of the guard before the next one takes the guard
// for itself (waits for the running chunks, holds new ones back): keys that always overlap are
// still learned, at the cost of one chunk in measure_every x (this + 1) run alone.
inline constexpr unsigned spoiled_before_exclusive = 2;

inline double per_unit_bytes(const CostSample& s) noexcept {
    return static_cast<double>(s.peak_bytes) / static_cast<double>(s.size);
}

// Fits the model to the newest cost_window of `samples` (oldest first; zero sizes are not read).
// `planned_size`: the size chunks were planned at last (0: unknown), where the costliest unit is
// looked for.
template <class Samples>
CostModel fit_cost(const Samples& samples, std::uint64_t planned_size = 0) noexcept {
    CostSample kept[cost_window];
    std::size_t count = 0;
    for (const CostSample& s : samples) {
        if (s.size == 0) continue;
        if (count == cost_window) std::move(kept + 1, kept + cost_window, kept), --count;
        kept[count++] = s;
    }
    CostModel model;
    model.samples = count;
    if (count == 0) return model;
    // "Near the planned sizes": at least half the size planned last (when given), else half
    // the largest measured.
    std::uint64_t largest = 0;
    for (std::size_t i = 0; i < count; ++i) largest = std::max(largest, kept[i].size);
    if (planned_size != 0) largest = std::min(largest, planned_size);
    for (std::size_t i = 0; i < count; ++i) {
        // Saturating: a size past 2^63 (weights saturate at 2^64 - 1) must not wrap to "small".
        if (saturating_add(kept[i].size, kept[i].size) >= largest)
            model.costliest_unit = std::max(model.costliest_unit, per_unit_bytes(kept[i]));
    }
    const double slope = detail::theil_sen_slope<cost_window>(kept, count);
    // One size, or sizes that disagree about the direction: charge everything per unit.
    model.slope_is_upper_bound = !(slope > 0);
    if (model.slope_is_upper_bound) {
        for (std::size_t i = 0; i < count; ++i)
            model.bytes_per_unit = std::max(model.bytes_per_unit, per_unit_bytes(kept[i]));
        return model;
    }
    model.bytes_per_unit = slope;
    // A fixed cost is part of every chunk's peak, so it is never above the smallest one: a larger
    // envelope says the cost is not a line plus noise (a long item multiplies a padded chunk), and
    // the costliest unit, not the line, then carries the prediction.
    double envelope = 0, smallest_peak = 1.8e19;
    for (std::size_t i = 0; i < count; ++i) {
        envelope = std::max(envelope, static_cast<double>(kept[i].peak_bytes) -
                                          slope * static_cast<double>(kept[i].size));
        smallest_peak = std::min(smallest_peak, static_cast<double>(kept[i].peak_bytes));
    }
    model.fixed_bytes = static_cast<std::uint64_t>(std::ceil(std::min(envelope, smallest_peak)));
    return model;
}

// ---- Evidence: what ran and what failed, at how much free memory -----------------------------
//
// The model predicts; evidence bounds the prediction. A size that failed with as much or more
// free memory than now is not tried again; a size that ran with as little or less free memory is
// not planned below. When the two disagree (a chunk's cost varies with its items), the newer one
// wins and the older is dropped. A failure is relaxed (probed once more) only when the model,
// refitted since, says the failed size now fits where it failed (the work got cheaper), and then
// only after `relax_after` successes just under it, an interval that doubles with every failure
// in a row there: a limit that moved is found again, one that did not costs ever fewer probes.

struct Evidence {
    std::uint64_t failed_size = 0;  // smallest size that failed (0 = none known)
    std::uint64_t failed_free = 0;  // the free memory it failed with
    std::uint64_t ran_size = 0;     // largest size that ran (0 = none known)
    std::uint64_t ran_free = 0;     // the free memory it ran with
    unsigned successes_under_failure = 0;
    unsigned failures_in_a_row = 0;
};

// With a model, a failure is probed again only once the samples that made the model plan it have
// been replaced: a window of cost_window samples, measured one chunk in eight, is 256 chunks, four
// times the ceiling path's default relax_after (64).
inline constexpr unsigned model_relax_factor = 4;

inline std::uint64_t relax_interval(const Evidence& evidence, unsigned relax_after) noexcept {
    return static_cast<std::uint64_t>(relax_after) << std::min(evidence.failures_in_a_row, 10u);
}

inline void on_chunk_failed(Evidence& evidence, std::uint64_t size, std::uint64_t free) noexcept {
    if (evidence.failed_size == 0 || size <= evidence.failed_size) {
        evidence.failed_size = size;
        evidence.failed_free = free;
    }
    if (evidence.ran_size >= size) evidence.ran_size = evidence.ran_free = 0;  // newer wins
    evidence.successes_under_failure = 0;
    if (evidence.failures_in_a_row < 64) ++evidence.failures_in_a_row;
}

// Returns true when the evidence changed (the caller persists nothing else).
inline bool on_chunk_ran(Evidence& evidence, std::uint64_t size, std::uint64_t free, bool at_limit,
                         unsigned relax_after, bool model_fits_failure) noexcept {
    bool changed = false;
    if (size > evidence.ran_size || (size == evidence.ran_size && free < evidence.ran_free)) {
        evidence.ran_size = size;
        evidence.ran_free = free;
        changed = true;
    }
    if (evidence.failed_size == 0) return changed;
    if (size >= evidence.failed_size) {  // newer wins: the failure no longer says anything
        evidence.failed_size = evidence.failed_free = 0;
        evidence.failures_in_a_row = 0;
        return true;
    }
    if (at_limit && model_fits_failure &&
        ++evidence.successes_under_failure >= relax_interval(evidence, relax_after)) {
        evidence.failed_size = evidence.failed_free = 0;  // probe the limit once more
        evidence.successes_under_failure = 0;
        return true;
    }
    return changed;
}

// Whether the model says the failed size fits, with the reserve, in what was free when it failed.
inline bool model_fits_failure(const CostModel& model, const Evidence& evidence,
                               double reserve_fraction) noexcept {
    if (!model.known() || evidence.failed_size == 0) return false;
    const std::uint64_t reserve = scale_bytes(evidence.failed_free, reserve_fraction);
    return evidence.failed_free > reserve &&
           model.peak_for(evidence.failed_size) <= evidence.failed_free - reserve;
}

// ---- Planning a chunk ------------------------------------------------------------------------

struct ChunkPlan {
    std::uint64_t limit = 0;          // largest size to run now; 0 = no limit known
    bool from_model = false;          // the cost model set it (else evidence or the ceiling)
    bool bounded_by_failure = false;  // a size that failed with as much memory lowered it
};

// The largest chunk to run with `free_bytes` free now: what the model says fits in free memory
// less the encode reserve (`reserve_bytes`, see Options::encode_reserve), raised to what ran with
// as little memory, lowered under what failed with as much (within the reserve). Without a
// model, the ceiling learned
// from OOMs (0 = none) is the limit.
inline ChunkPlan plan_chunk(const CostModel& model, const Evidence& evidence,
                            std::uint64_t free_bytes, std::uint64_t reserve_bytes,
                            std::uint64_t ceiling) noexcept {
    ChunkPlan plan;
    if (!model.known()) {
        plan.limit = ceiling;
        return plan;
    }
    plan.from_model = true;
    const std::uint64_t usable = free_bytes > reserve_bytes ? free_bytes - reserve_bytes : 0;
    plan.limit = std::max<std::uint64_t>(1, model.largest_within(usable));
    // What ran is raised to only as far as the model allows without the reserve: the reserve is
    // for sizes never measured, but a size the model itself says does not fit (its items vary)
    // is not made safe by having once run.
    if (evidence.ran_size != 0 && free_bytes >= evidence.ran_free)
        plan.limit =
            std::max(plan.limit, std::min(evidence.ran_size, model.largest_within(free_bytes)));
    // "As much" within the reserve: readings of a device that did not change wander by a few MiB.
    if (evidence.failed_size != 0 &&
        free_bytes <= saturating_add(evidence.failed_free, reserve_bytes)) {
        const std::uint64_t under = std::max<std::uint64_t>(1, evidence.failed_size - 1);
        plan.bounded_by_failure = under <= plan.limit;
        plan.limit = std::min(plan.limit, under);
    }
    return plan;
}

// The size of the retry right after `tried` ran out of memory: the plan with the failure now in
// the evidence and the samples, and never above what the OOM's own numbers (or halving) allow.
// Halving stays the backstop even when the model plans only a little less: the retry holds the
// same items, and when one of them made the chunk fail, only a split leaves it behind.
inline std::uint64_t retry_size(const ChunkPlan& plan, std::uint64_t tried,
                                const std::optional<OomReport>& report) noexcept {
    const std::uint64_t backstop = size_after_oom(tried, report);
    return plan.limit == 0 ? backstop : std::min(plan.limit, backstop);
}

// ---- Waiting for memory after an OOM ---------------------------------------------------------
//
// The reading that let the failed work start was wrong (stale: drivers report late) or the
// memory was taken since; an unchanged reading is no evidence that it came back. Unless the OOM's
// own numbers say the request fitted what was free when it failed: then the failure was
// transient (fragmentation, a race with a freeing thread), and the same reading is to be trusted.
inline bool failure_was_transient(const std::optional<OomReport>& report) noexcept {
    return report && report->free_bytes && report->requested_bytes > 0 &&
           report->requested_bytes <= *report->free_bytes;
}

// The reading to distrust while waiting after an OOM: the one the failed work was planned or
// admitted with, unless the failure was transient (then the same reading is to be trusted).
inline std::optional<std::uint64_t> reading_to_distrust(const std::optional<OomReport>& report,
                                                        std::uint64_t reading) noexcept {
    if (failure_was_transient(report)) return std::nullopt;
    return reading;
}

// An allocation larger than the whole device never succeeds: retrying it only wastes time.
inline bool asks_more_than_the_device(const std::optional<OomReport>& report,
                                      std::uint64_t total_bytes) noexcept {
    return report && total_bytes > 0 && report->requested_bytes > total_bytes;
}

// ---- What a load run does after an OOM -------------------------------------------------------

// The last attempt: out of attempts, or an allocation that can never succeed.
inline bool load_gives_up(unsigned attempt, unsigned attempts, bool hopeless) noexcept {
    return attempt >= attempts || hopeless;
}

// ---- What an encode run does next ------------------------------------------------------------
//
// The encode loop (detail/encode_run.hpp) only orchestrates: each chunk, each OOM and each
// success is decided here, from plain facts it gathers.

// The reserve an encode chunk leaves free: a fraction of what is free now (Options::
// encode_reserve). Readings of a device that did not change wander by about as much, so the same
// bytes are also the tolerance of "as much free memory" in plan_chunk.
inline std::uint64_t encode_reserve_bytes(std::uint64_t free_bytes,
                                          double reserve_fraction) noexcept {
    return scale_bytes(free_bytes, reserve_fraction);
}

// Half a window of measurements teaches a key's model; after that one chunk in measure_every
// keeps it fresh.
inline bool in_learning_phase(unsigned measurements_taken) noexcept {
    return measurements_taken < cost_window / 2;
}

struct ChunkFacts {
    ChunkPlan plan;                   // plan_chunk's answer for the reading now
    std::uint64_t retry_limit = 0;    // the size decided when the previous chunk ran out of memory
    bool measures_peaks = false;      // the probe can measure a chunk
    bool inside_another_run = false;  // called inside another run of the guard on this thread
    bool learning = false;            // in_learning_phase(measurements taken of the key)
    unsigned chunk_number = 0;        // chunks planned since the learning phase ended
    unsigned spoiled = 0;             // measurements of the key in a row that other runs overlapped
    bool exclusive_held = false;      // this call holds the guard for an item retried alone
    std::uint64_t first_chunk_hint = 0;  // EncodeOptions::first_chunk_limit (0: none)
};

struct ChunkDecision {
    std::uint64_t limit = 0;           // the limit that cuts the chunk (0 = none)
    bool taught_by_oom = false;        // the limit comes from failures, not from the model alone
    bool measure = false;              // read the chunk's peak (counted when it ran alone)
    bool measure_exclusively = false;  // ... taking the guard for itself so that it runs alone
    bool hinted = false;  // the caller's first-chunk hint cuts it: nothing learned, nothing stored
};

inline ChunkDecision decide_chunk(const ChunkFacts& facts) noexcept {
    ChunkDecision decision;
    decision.limit = facts.retry_limit != 0 ? facts.retry_limit : facts.plan.limit;
    // The caller's hint stands in for what a key that learned nothing would run: the whole batch.
    decision.hinted = decision.limit == 0 && facts.first_chunk_hint != 0;
    if (decision.hinted) decision.limit = facts.first_chunk_hint;
    decision.taught_by_oom =
        !facts.plan.from_model || facts.plan.bounded_by_failure || facts.retry_limit != 0;
    // A call made inside another run of the guard on this thread (a loader's warm-up through
    // encode) is part of that run: nothing of it is measured, nor counted as spoiled.
    decision.measure = !facts.inside_another_run && facts.measures_peaks &&
                       (facts.learning || facts.chunk_number % measure_every == 0);
    // Chunks that always overlap others would never be measured alone: after a few spoiled
    // measurements, the next measured chunk takes the guard for itself.
    decision.measure_exclusively =
        decision.measure && !facts.exclusive_held && facts.spoiled >= spoiled_before_exclusive;
    return decision;
}

// Single items take turns (the device's single-item semaphore) only once OOMs taught that no two
// fit: a plan of one item from the model alone runs beside the guard's other chunks.
inline bool takes_turns(bool chunk_is_one_alone, const ChunkDecision& decision) noexcept {
    return chunk_is_one_alone && decision.taught_by_oom;
}

// A chunk that ran out of memory cost at least the allocation that failed and, when it was
// planned against a reading and nothing else of the guard ran beside it, more than was free then:
// a lower bound the model may use (0: none). Beside other runs, what was free then is no bound on
// the chunk's own cost (the others took part of it), so only the failed allocation is. A transient
// failure says nothing about the cost.
inline std::uint64_t oom_lower_bound(const std::optional<OomReport>& report,
                                     bool planned_with_reading, std::uint64_t planned_free,
                                     bool beside_others = false) noexcept {
    if (failure_was_transient(report)) return 0;
    const bool free_bounds_it = planned_with_reading && !beside_others;
    return std::max(free_bounds_it ? saturating_add(planned_free, 1) : 0,
                    report ? report->requested_bytes : 0);
}

// ---- Concurrent chunks: claims -----------------------------------------------------------------
//
// Chunks of one guard that run at once would each plan from the same reading, i.e. for the same
// free bytes. So every planned chunk claims the bytes its model predicts until it ends, and a new
// plan counts the claims the reading does not show yet. What the reading shows of them is
// estimated against the anchor, the reading taken when no claim was in flight: memory that went
// since is taken to be the claimed chunks' (when another process took it, this plans as much as
// without claims; memory that came back is not counted, which plans less, never more).
inline std::uint64_t claims_shown(std::uint64_t free_now, std::uint64_t anchor,
                                  std::uint64_t claimed) noexcept {
    return std::min(saturating_sub(anchor, free_now), claimed);
}
inline std::uint64_t free_for_plan(std::uint64_t free_now, std::uint64_t anchor,
                                   std::uint64_t claimed) noexcept {
    return saturating_sub(free_now, claimed - claims_shown(free_now, anchor, claimed));
}
// What would be free were the claims back: the reading and what it shows of them.
inline std::uint64_t free_without_claims(std::uint64_t free_now, std::uint64_t anchor,
                                         std::uint64_t claimed) noexcept {
    return saturating_add(free_now, claims_shown(free_now, anchor, claimed));
}

struct ShareFacts {
    std::uint64_t size_now = 0;    // the chunk the plan cuts with the claims counted
    std::uint64_t size_freed = 0;  // ... and were the claims back (same units)
    bool fits_now = true;          // its predicted peak fits what the claims leave (its first
                                   // item may be heavier than the limit: a cut always takes one)
    bool fits_freed = true;        // ... fits were the claims back
    bool others_claim = false;     // other chunks of the guard hold claims now
    bool may_wait = false;         // a planner that may wait: not inside another run, not holding
                                   // the guard, its wait budget and deadline not spent
};

enum class ShareStep { run_now, wait_for_a_claim };

// When the claims leave little, run a smaller chunk now or wait for a claim to end? A chunk that
// does not fit what is left waits, unless even the freed memory would not hold it (its own OOM
// path decides then). One at least half the size the freed memory would give costs at most one
// more batch (its fixed memory and launch) than waiting; a smaller one multiplies batches while
// the memory it needs comes back as soon as a running chunk ends, which is bounded. Planners take
// turns in arrival order, so the one that waits is served first: nobody starves behind others.
inline ShareStep run_or_wait(const ShareFacts& facts) noexcept {
    if (!facts.others_claim || !facts.may_wait || !facts.fits_freed) return ShareStep::run_now;
    if (!facts.fits_now) return ShareStep::wait_for_a_claim;
    return saturating_add(facts.size_now, facts.size_now) >= facts.size_freed
               ? ShareStep::run_now
               : ShareStep::wait_for_a_claim;
}

// When an item that ran out of memory alone is retried really alone: while other runs of the
// guard held memory, the failure says nothing about the item, so it takes the guard for itself
// (new runs wait, running ones finish) and is retried without counting the failure. Once; and not
// from inside another run of the guard on this thread, whose turn would wait for that run.
inline bool retry_exclusively(bool exclusive_held, bool inside_another_run,
                              bool others_running) noexcept {
    return !exclusive_held && !inside_another_run && others_running;
}

enum class ItemOomStep {
    retry_exclusively,  // take the guard for itself, retry at once, the failure not counted
    give_up,            // OomExhausted naming the item
    wait_for_memory,    // wait (bounded) for the failed request's bytes, then retry
    pause,              // no numbers to wait for: one poll interval, then retry
};

struct ItemOomFacts {
    bool exclusive_held = false;        // this call already holds the guard for the item
    bool inside_another_run = false;    // called inside another run of the guard on this thread
    bool others_running = false;        // other runs of the guard hold memory now
    unsigned item_failures = 0;         // counted failures of the item by itself, this one included
    unsigned attempts = 0;              // Options::single_item_attempts
    bool hopeless = false;              // asks_more_than_the_device
    bool past_deadline = false;         // the call's EncodeOptions::deadline has passed
    std::uint64_t requested_bytes = 0;  // what the failed allocation asked for (0: unknown)
};

inline ItemOomStep after_item_oom(const ItemOomFacts& facts) noexcept {
    if (retry_exclusively(facts.exclusive_held, facts.inside_another_run, facts.others_running))
        return ItemOomStep::retry_exclusively;
    if (facts.item_failures >= facts.attempts || facts.hopeless || facts.past_deadline)
        return ItemOomStep::give_up;
    return facts.requested_bytes > 0 ? ItemOomStep::wait_for_memory : ItemOomStep::pause;
}

// What the fast path reads of a key to plan a chunk and to judge a success.
struct PlanInputs {
    CostModel model;
    Evidence evidence;
    std::uint64_t ceiling = 0;          // the OOM-learned ceiling (no model)
    std::uint64_t largest_success = 0;  // the largest chunk that ran since the last failure
};

// A chunk that ran: its size as the learner counts it, the free memory it was planned with, and
// whether the limit cut it.
struct ChunkRan {
    std::uint64_t size = 0;
    std::uint64_t free_bytes = 0;
    bool at_limit = false;
    std::uint64_t limit = 0;     // the limit that cut it
    bool measured_peak = false;  // its peak was measured (a sample)
};

// Whether a success teaches the key anything (else it is not recorded and takes no lock): a
// sample, a limit that moved, a size larger (or as large with less memory) than any that ran, a
// success at or above a known failure; without a model, a success at the OOM-learned ceiling or
// above the largest success.
inline bool success_teaches(const PlanInputs& known, std::uint64_t known_limit,
                            const ChunkRan& ran) noexcept {
    if (ran.measured_peak || (ran.at_limit && ran.limit != known_limit)) return true;
    if (!known.model.known())
        return ran.at_limit ? known.ceiling != 0 : ran.size > known.largest_success;
    const Evidence& evidence = known.evidence;
    return ran.size > evidence.ran_size ||
           (ran.size == evidence.ran_size && ran.free_bytes < evidence.ran_free) ||
           (evidence.failed_size != 0 && (ran.at_limit || ran.size >= evidence.failed_size));
}

// Growth worth an event: a model-planned limit more than an eighth above the last (less is the
// jitter of a fit).
inline bool limit_grew(bool from_model, std::uint64_t previous, std::uint64_t now) noexcept {
    return from_model && previous != 0 && now > saturating_add(previous, previous / 8);
}

// ---- Recovery after an unload ----------------------------------------------------------------
//
// Freed VRAM shows up in the driver's report late. Ollama's rule: poll every 250 ms until 75 % of
// the expected bytes appear, at most 5 s, then trust the estimate.

inline bool recovered(std::uint64_t free_before, std::uint64_t free_now,
                      std::uint64_t expected_freed, double fraction) noexcept {
    return free_now >= saturating_add(free_before, scale_bytes(expected_freed, fraction));
}

}  // namespace policy

VRAMGUARD_END_NAMESPACE
