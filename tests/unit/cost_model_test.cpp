// SPDX-License-Identifier: MIT
// Table tests of the learner's pure decisions (policy.hpp): the cost model fit, the evidence, the
// chunk plan, the retry after an OOM, and when a retry may trust an unchanged reading.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using policy::CostModel;
using policy::CostSample;
using policy::Evidence;

namespace {

CostModel fit(const std::vector<CostSample>& samples) { return policy::fit_cost(samples); }

TEST(FitCost, Table) {
    struct Row {
        const char* what;
        std::vector<CostSample> samples;
        std::uint64_t fixed;
        double per_unit;
        double costliest;
        bool upper_bound;
    };
    const std::vector<Row> rows = {
        {"nothing measured", {}, 0, 0, 0, false},
        {"one size: all of it per unit, an upper bound",
         {{10, 1000}, {10, 900}},
         0,
         100,
         100,
         true},
        {"an exact line through the origin",
         {{10, 1000}, {20, 2000}, {40, 4000}},
         0,
         100,
         100,
         false},
        {"a fixed part and a slope", {{10, 1500}, {20, 2500}, {40, 4500}}, 500, 100, 125, false},
        // One wrong reading moves neither the slope (a median) nor, after it ages out, the fit.
        {"an outlier moves the envelope, not the slope",
         {{10, 1000}, {20, 2000}, {30, 3000}, {40, 4000}, {50, 90000}},
         1000,
         100,
         1800,
         false},
        // A padded chunk: one long item multiplies it; the costliest unit carries the prediction
        // and the fixed part is capped at the smallest peak.
        {"multiplicative noise",
         {{10, 12800}, {10, 1200}, {9, 1080}, {10, 1300}, {5, 6400}},
         1080,
         0,
         1280,
         false},
        {"sizes that disagree about the direction: per unit, an upper bound",
         {{10, 2000}, {20, 1000}},
         0,
         200,
         200,
         true},
        {"zero sizes are not samples", {{0, 5000}, {10, 1000}}, 0, 100, 100, true},
    };
    for (const Row& row : rows) {
        const CostModel model = fit(row.samples);
        EXPECT_EQ(model.fixed_bytes, row.fixed) << row.what;
        if (row.what != std::string("multiplicative noise")) {  // a median of noise: any
            EXPECT_NEAR(model.bytes_per_unit, row.per_unit, 1e-9) << row.what;
        }
        EXPECT_NEAR(model.costliest_unit, row.costliest, 1e-9) << row.what;
        EXPECT_EQ(model.slope_is_upper_bound, row.upper_bound) << row.what;
    }
}

// The costliest unit is looked for near the sizes planned last: at least half of `planned_size`
// (when given, and below the largest measured), where small chunks that cost more per unit still
// count; without it, at least half the largest measured.
TEST(FitCost, TheCostliestUnitIsLookedForNearThePlannedSize) {
    const std::vector<CostSample> samples = {{4, 800}, {40, 4000}};  // 200 and 100 per unit
    struct Row {
        const char* what;
        std::uint64_t planned_size;
        double costliest;
    };
    const std::vector<Row> rows = {
        {"no plan: near the largest measured (40), the small chunk is too far", 0, 100},
        {"planned 8: the 4-item chunk is within half of it", 8, 200},
        {"planned 9: 4 is below half of it", 9, 100},
        {"planned above the largest measured: near the largest", 400, 100},
    };
    for (const Row& row : rows) {
        EXPECT_NEAR(policy::fit_cost(samples, row.planned_size).costliest_unit, row.costliest, 1e-9)
            << row.what;
    }
}

TEST(FitCost, OnlyTheNewestWindowIsRead) {
    std::vector<CostSample> samples(policy::cost_window, CostSample{10, 1000});
    samples.insert(samples.begin(), CostSample{10, 1000000});  // the oldest: out of the window
    EXPECT_NEAR(fit(samples).bytes_per_unit, 100, 1e-9);
    EXPECT_EQ(fit(samples).samples, policy::cost_window);
}

// "Near the planned size" is size x 2 >= largest, computed saturating: weights saturate at 2^64
// - 1, and a size past 2^63 doubled wrapped to a small number, so the very sample that set the
// largest size was not near it and the costliest unit read 0.
TEST(FitCost, SizesPastTwoToThe63AreNearThePlannedSizeNotWrapped) {
    constexpr std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    constexpr std::uint64_t half = std::uint64_t(1) << 63;
    struct Row {
        const char* what;
        std::vector<CostSample> samples;
        std::uint64_t planned;
        double costliest;
    };
    const double per_unit_at_half = static_cast<double>(max) / static_cast<double>(half);
    const std::vector<Row> rows = {
        {"2^62", {{half / 2, max}}, 0, 2 * per_unit_at_half},
        {"2^63", {{half, max}}, 0, per_unit_at_half},
        {"2^63 + 1",
         {{half + 1, max}},
         0,
         static_cast<double>(max) / static_cast<double>(half + 1)},
        {"2^64 - 1", {{max, max}}, 0, 1},
        {"2^63 and 1.5 x 2^63, both near",
         {{half, max}, {half + half / 2, max}},
         0,
         per_unit_at_half},
        {"planned 2^63: the 2^62 sample is near it too", {{half / 2, half}, {half, max}}, half, 2},
        {"small sizes unchanged: 3 is not near 8", {{3, 3000}, {8, 4000}}, 0, 500},
    };
    for (const Row& row : rows) {
        const CostModel model = policy::fit_cost(row.samples, row.planned);
        EXPECT_DOUBLE_EQ(model.costliest_unit, row.costliest) << row.what;
    }
}

TEST(CostModel, PredictsTheLargerOfTheLineAndTheCostliestUnitAndInvertsIt) {
    CostModel model;
    model.samples = 3;
    model.fixed_bytes = 1000;
    model.bytes_per_unit = 10;
    model.costliest_unit = 20;
    EXPECT_EQ(model.peak_for(50), 1500u);   // the line: 1000 + 500 > 20 x 50
    EXPECT_EQ(model.peak_for(200), 4000u);  // the costliest unit: 20 x 200 > 3000
    EXPECT_EQ(model.largest_within(1500), 50u);
    EXPECT_EQ(model.largest_within(4000), 200u);
    EXPECT_EQ(model.largest_within(1000), 0u);         // not even one unit beside the fixed part
    EXPECT_EQ(CostModel{}.largest_within(1_GiB), 0u);  // unknown
    model.costliest_unit = 1e-300;                     // absurd numbers saturate, never wrap
    model.bytes_per_unit = 1e-300;
    EXPECT_EQ(model.largest_within(std::numeric_limits<std::uint64_t>::max()),
              std::numeric_limits<std::uint64_t>::max());
}

TEST(Evidence, FailuresAndSuccessesNewerWins) {
    Evidence evidence;
    policy::on_chunk_failed(evidence, 20, 10_GiB);
    EXPECT_EQ(evidence.failed_size, 20u);
    EXPECT_EQ(evidence.failed_free, 10_GiB);
    policy::on_chunk_failed(evidence, 30, 12_GiB);  // a larger failure says less: kept as it was
    EXPECT_EQ(evidence.failed_size, 20u);
    EXPECT_TRUE(policy::on_chunk_ran(evidence, 15, 10_GiB, true, 64, false));
    EXPECT_EQ(evidence.ran_size, 15u);
    EXPECT_FALSE(policy::on_chunk_ran(evidence, 10, 10_GiB, false, 64, false));  // teaches nothing
    // A success at the failed size: the failure no longer says anything.
    EXPECT_TRUE(policy::on_chunk_ran(evidence, 20, 11_GiB, true, 64, false));
    EXPECT_EQ(evidence.failed_size, 0u);
    EXPECT_EQ(evidence.ran_size, 20u);
    // A failure at or below what ran: what ran no longer says anything.
    policy::on_chunk_failed(evidence, 18, 11_GiB);
    EXPECT_EQ(evidence.ran_size, 0u);
    EXPECT_EQ(evidence.failed_size, 18u);
}

TEST(Evidence, AFailureIsProbedAgainOnlyWhenTheModelSaysItFitsAndAfterBackingOff) {
    Evidence evidence;
    policy::on_chunk_failed(evidence, 11, 13_GiB);
    for (int i = 0; i < 1000; ++i) policy::on_chunk_ran(evidence, 10, 13_GiB, true, 4, false);
    EXPECT_EQ(evidence.failed_size, 11u) << "the model never said it fits: never relaxed";
    int successes = 0;
    while (evidence.failed_size != 0 && successes < 1000) {
        policy::on_chunk_ran(evidence, 10, 13_GiB, true, 4, true);
        ++successes;
    }
    EXPECT_EQ(successes, 8);                        // 4 x 2^1: one failure in a row
    policy::on_chunk_failed(evidence, 11, 13_GiB);  // the probe failed again: twice as long
    successes = 0;
    while (evidence.failed_size != 0 && successes < 1000) {
        policy::on_chunk_ran(evidence, 10, 13_GiB, true, 4, true);
        ++successes;
    }
    EXPECT_EQ(successes, 16);
}

TEST(ModelFitsFailure, Table) {
    CostModel model;
    model.samples = 1;
    model.bytes_per_unit = 1_GiB;
    Evidence evidence;
    EXPECT_FALSE(policy::model_fits_failure(model, evidence, 0.02));  // no failure
    evidence.failed_size = 10;
    evidence.failed_free = 12_GiB;
    EXPECT_TRUE(policy::model_fits_failure(model, evidence, 0.02));  // 10 GiB in 12 less 2 %
    evidence.failed_free = 10_GiB;
    EXPECT_FALSE(policy::model_fits_failure(model, evidence, 0.02));        // not with the reserve
    EXPECT_FALSE(policy::model_fits_failure(CostModel{}, evidence, 0.02));  // no model
}

TEST(PlanChunk, Table) {
    CostModel linear;  // 1 GiB per item
    linear.samples = 4;
    linear.bytes_per_unit = 1_GiB;
    struct Row {
        const char* what;
        Evidence evidence;
        std::uint64_t free;
        std::uint64_t reserve;
        std::uint64_t expected;
    };
    Evidence failed_at_12;
    failed_at_12.failed_size = 12;
    failed_at_12.failed_free = 16_GiB;
    Evidence ran_16;
    ran_16.ran_size = 16;
    ran_16.ran_free = 16_GiB;
    const std::vector<Row> rows = {
        {"what fits less the reserve", {}, 16_GiB, 512_MiB, 15},
        {"a squeeze shrinks it before it runs", {}, 6_GiB, 128_MiB, 5},
        {"nothing fits: still one item", {}, 512_MiB, 0, 1},
        {"under a failure at as much free memory", failed_at_12, 16_GiB, 0, 11},
        {"a failure with less free memory does not bind", failed_at_12, 20_GiB, 0, 20},
        {"within the reserve counts as as much", failed_at_12, 16_GiB + 100_MiB, 200_MiB, 11},
        {"raised to what ran with as little memory", ran_16, 16_GiB, 512_MiB, 16},
        {"not raised with less memory than it ran with", ran_16, 15_GiB, 512_MiB, 14},
    };
    for (const Row& row : rows) {
        const policy::ChunkPlan plan =
            policy::plan_chunk(linear, row.evidence, row.free, row.reserve, 0);
        EXPECT_TRUE(plan.from_model) << row.what;
        EXPECT_EQ(plan.limit, row.expected) << row.what;
    }
    // Whether a failure lowered the plan (then single items take turns): only where it did.
    EXPECT_TRUE(policy::plan_chunk(linear, failed_at_12, 16_GiB, 0, 0).bounded_by_failure);
    EXPECT_FALSE(policy::plan_chunk(linear, failed_at_12, 20_GiB, 0, 0).bounded_by_failure);
    EXPECT_FALSE(policy::plan_chunk(linear, failed_at_12, 8_GiB, 0, 0).bounded_by_failure);
    // What ran is not a floor where the model says it does not fit (its items vary).
    CostModel costly = linear;
    costly.costliest_unit = 2.0 * static_cast<double>(1_GiB);
    EXPECT_EQ(policy::plan_chunk(costly, ran_16, 16_GiB, 0, 0).limit, 8u);
    // Without a model: the ceiling learned from OOMs, 0 for none.
    EXPECT_EQ(policy::plan_chunk(CostModel{}, failed_at_12, 16_GiB, 0, 7).limit, 7u);
    EXPECT_FALSE(policy::plan_chunk(CostModel{}, {}, 16_GiB, 0, 0).from_model);
    EXPECT_EQ(policy::plan_chunk(CostModel{}, {}, 16_GiB, 0, 0).limit, 0u);
}

TEST(RetrySize, ThePlanButNeverAboveWhatTheOomAllows) {
    OomReport report{100_GiB, 16_GiB, std::nullopt};
    policy::ChunkPlan plan;
    EXPECT_EQ(policy::retry_size(plan, 100, report), 16u);        // no plan: the numbers
    EXPECT_EQ(policy::retry_size(plan, 100, std::nullopt), 50u);  // no numbers: halve
    plan.limit = 15;
    plan.from_model = true;
    EXPECT_EQ(policy::retry_size(plan, 100, report), 15u);  // the model says less
    plan.limit = 99;
    EXPECT_EQ(policy::retry_size(plan, 100, std::nullopt), 50u);  // the same items: split them
}

TEST(FailureWasTransient, TheOomsOwnNumbersSayItFitted) {
    EXPECT_FALSE(policy::failure_was_transient(std::nullopt));
    EXPECT_FALSE(policy::failure_was_transient(OomReport{2_GiB, 1_GiB, std::nullopt}));
    EXPECT_TRUE(policy::failure_was_transient(OomReport{256_MiB, 10_GiB, std::nullopt}));
    EXPECT_FALSE(policy::failure_was_transient(OomReport{256_MiB, std::nullopt, std::nullopt}));
    // Exactly as much free as requested: it fitted, so the failure was transient.
    EXPECT_TRUE(policy::failure_was_transient(OomReport{1_GiB, 1_GiB, std::nullopt}));
    EXPECT_FALSE(policy::failure_was_transient(OomReport{1_GiB + 1, 1_GiB, std::nullopt}));
    EXPECT_FALSE(policy::failure_was_transient(OomReport{0, 1_GiB, std::nullopt}));  // no request
}

TEST(DeadlineAfter, SaturatesInsteadOfWrappingIntoThePast) {
    const TimePoint now = TimePoint{} + std::chrono::hours(1);
    EXPECT_EQ(detail::deadline_after(now, std::chrono::milliseconds::max()), TimePoint::max());
    EXPECT_EQ(detail::deadline_after(now, std::chrono::milliseconds(250)),
              now + std::chrono::milliseconds(250));
    EXPECT_EQ(detail::deadline_after(now, std::chrono::milliseconds(-5)), now);
    EXPECT_EQ(
        detail::deadline_after(TimePoint::max() - std::chrono::seconds(1), std::chrono::hours(1)),
        TimePoint::max());
}

// RegistryOptions durations are milliseconds; the clock counts nanoseconds. milliseconds::max()
// ("for ever") converted plainly overflowed to -1 ms (repro_peer_ms_max).
TEST(SaturatingDuration, Table) {
    using std::chrono::milliseconds;
    EXPECT_EQ(detail::saturating_duration(milliseconds::max()), Duration::max());
    EXPECT_EQ(detail::saturating_duration(milliseconds::min()), Duration::min());
    EXPECT_EQ(detail::saturating_duration(std::chrono::hours::max()), Duration::max());
    EXPECT_EQ(detail::saturating_duration(milliseconds(250)), Duration(milliseconds(250)));
    EXPECT_EQ(detail::saturating_duration(milliseconds(-5)), Duration(milliseconds(-5)));
    EXPECT_EQ(detail::saturating_duration(milliseconds(0)), Duration::zero());
    EXPECT_EQ(detail::saturating_duration(Duration::max()), Duration::max());
    // The largest whole milliseconds that fit, and the first that does not.
    const auto fits = std::chrono::duration_cast<milliseconds>(Duration::max());
    EXPECT_EQ(detail::saturating_duration(fits), Duration(fits));
    EXPECT_EQ(detail::saturating_duration(fits + milliseconds(1)), Duration::max());
}

TEST(CheckedWeight, Table) {
    EXPECT_EQ(detail::checked_weight(0, 0), 1u);
    EXPECT_EQ(detail::checked_weight(0.25, 0), 1u);
    EXPECT_EQ(detail::checked_weight(2.5, 0), 3u);
    EXPECT_EQ(detail::checked_weight(1e30, 0), std::numeric_limits<std::uint64_t>::max());
    EXPECT_EQ(detail::checked_weight(std::numeric_limits<std::uint64_t>::max(), 0),
              std::numeric_limits<std::uint64_t>::max());
    EXPECT_THROW(detail::checked_weight(-1, 3), std::invalid_argument);
    EXPECT_THROW(detail::checked_weight(-0.5, 3), std::invalid_argument);
    EXPECT_THROW(detail::checked_weight(std::nan(""), 3), std::invalid_argument);
}

}  // namespace
