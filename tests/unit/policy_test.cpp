// SPDX-License-Identifier: MIT
// The pure policies, table by table.
#include <vramguard/policy.hpp>

#include <gtest/gtest.h>

#include <limits>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using policy::RequirementSource;

namespace {

constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

TEST(RequiredBytes, PrecedenceDeclaredThenMeasuredThenConservative) {
    struct Row {
        std::optional<std::uint64_t> declared;
        std::uint64_t measured;
        std::uint64_t expected;
        RequirementSource source;
    };
    const std::uint64_t total = 10_GiB;
    const std::vector<Row> rows = {
        {std::nullopt, 0, 8_GiB, RequirementSource::conservative},       // 0.8 x total
        {std::nullopt, 1_GiB, 1288490189, RequirementSource::measured},  // ceil(1 GiB x 1.2)
        {std::nullopt, 5_GiB, 6442450944, RequirementSource::measured},  // 5 x 1.2 = 6 GiB
        {2_GiB, 0, 2_GiB, RequirementSource::declared},                  // declared wins ...
        {2_GiB, 5_GiB, 2_GiB, RequirementSource::declared},              // ... over a measurement
        {1, 5_GiB, 1, RequirementSource::declared},
        {std::nullopt, kMax, kMax, RequirementSource::measured},  // saturates, no overflow
    };
    for (const Row& row : rows) {
        const auto got = policy::required_bytes(row.declared, row.measured, total, 1.2, 0.8);
        EXPECT_EQ(got.bytes, row.expected) << "measured " << row.measured;
        EXPECT_EQ(got.source, row.source) << "measured " << row.measured;
    }
}

TEST(Admits, RequiredPlusMarginMustFitInFree) {
    struct Row {
        std::uint64_t required, free, total;
        double margin;
        bool admitted;
    };
    const std::vector<Row> rows = {
        {6_GiB, 7_GiB, 10_GiB, 0.10, true},       // 6 + 1 <= 7: exactly at the edge
        {6_GiB + 1, 7_GiB, 10_GiB, 0.10, false},  // one byte over
        {6_GiB, 6_GiB, 10_GiB, 0.0, true},        // no margin
        {0, 1_GiB, 10_GiB, 0.10, true},           // margin alone fits
        {0, 1_GiB - 1, 10_GiB, 0.10, false},      // margin alone does not
        {kMax, kMax, kMax, 0.10, false},          // saturating sum, no wrap-around
        {1, 0, 0, 0.0, false},                    // an empty report admits nothing real
    };
    for (const Row& row : rows) {
        EXPECT_EQ(policy::admits(row.required, MemoryInfo{row.free, row.total}, row.margin),
                  row.admitted)
            << format_bytes(row.required) << " in " << format_bytes(row.free);
    }
}

TEST(CanEverFit, ComparesWithTheWholeDevice) {
    EXPECT_TRUE(policy::can_ever_fit(9_GiB, 10_GiB, 0.10));
    EXPECT_FALSE(policy::can_ever_fit(9_GiB + 1, 10_GiB, 0.10));
    EXPECT_FALSE(policy::can_ever_fit(kMax, 10_GiB, 0.0));
}

TEST(SizeAfterOom, HalvesWithoutAReportAndNeverGoesBelowOne) {
    const std::vector<std::pair<std::uint64_t, std::uint64_t>> rows = {
        {64, 32}, {33, 16}, {3, 1}, {2, 1}, {1, 1}, {0, 1}, {kMax, kMax / 2}};
    for (const auto& [tried, next] : rows)
        EXPECT_EQ(policy::size_after_oom(tried, std::nullopt), next) << tried;
}

TEST(SizeAfterOom, UsesTheReportButNeverAboveHalf) {
    struct Row {
        std::uint64_t tried, requested;
        std::optional<std::uint64_t> free;
        std::uint64_t next;
    };
    const std::vector<Row> rows = {
        {64, 64_GiB, 8_GiB, 8},         // 64 x 8/64: the estimate is below half
        {64, 64_GiB, 48_GiB, 32},       // 48 would be above half: capped at 32
        {64, 64_GiB, 0, 1},             // nothing free: straight to one
        {64, 1_GiB, std::nullopt, 32},  // no free figure: plain halving
        {64, 0, 1_GiB, 32},             // nonsense request: plain halving
        {100, 10_GiB, 3_GiB, 30},
        {1, 10_GiB, 3_GiB, 1},
    };
    for (const Row& row : rows) {
        OomReport report{row.requested, row.free, std::nullopt};
        EXPECT_EQ(policy::size_after_oom(row.tried, report), row.next) << row.tried;
    }
}

TEST(Ceiling, OomSetsCeilingAndRemembersTheSmallestFailure) {
    policy::CeilingState state;
    policy::on_oom(state, 64, 32, 1_GiB);
    EXPECT_EQ(state.ceiling, 32u);
    EXPECT_EQ(state.failed_at, 64u);
    policy::on_oom(state, 32, 16, 1_GiB);
    EXPECT_EQ(state.ceiling, 16u);
    EXPECT_EQ(state.failed_at, 32u);
    policy::on_oom(state, 64, 32, 1_GiB);  // a stale, larger failure never raises the ceiling
    EXPECT_EQ(state.ceiling, 16u);
    EXPECT_EQ(state.failed_at, 32u);
}

TEST(Ceiling, GrowsHalfwayToTheFailureAfterEnoughSuccessesThenConverges) {
    const policy::GrowthRule rule{4, 1000};
    policy::CeilingState state;
    policy::on_oom(state, 64, 32, 0);
    std::vector<std::uint64_t> ceilings;
    for (int i = 0; i < 40; ++i) {
        if (policy::on_success(state, true, state.ceiling, rule)) ceilings.push_back(state.ceiling);
    }
    // 32 -> 48 -> 56 -> 60 -> 62 -> 63, then 63 = failed_at - 1: no further growth.
    EXPECT_EQ(ceilings, (std::vector<std::uint64_t>{48, 56, 60, 62, 63}));
}

TEST(Ceiling, SuccessesBelowTheCeilingTeachNothing) {
    const policy::GrowthRule rule{2, 1000};
    policy::CeilingState state;
    policy::on_oom(state, 64, 32, 0);
    for (int i = 0; i < 10; ++i)
        EXPECT_FALSE(policy::on_success(state, false, state.ceiling, rule));
    EXPECT_EQ(state.ceiling, 32u);
    EXPECT_EQ(state.streak, 0u);
}

TEST(Ceiling, UnknownCeilingNeverGrows) {
    policy::CeilingState state;
    EXPECT_FALSE(policy::on_success(state, true, 1, policy::GrowthRule{1, 1}));
    EXPECT_EQ(state.ceiling, 0u);
}

TEST(Ceiling, AfterALongRunTheKnownFailureIsRelaxedByAQuarterAndProbedOnce) {
    const policy::GrowthRule rule{4, 8};
    policy::CeilingState state;
    policy::on_oom(state, 101, 100, 0);  // converged: 100 works, 101 failed
    for (int i = 0; i < 7; ++i) EXPECT_FALSE(policy::on_success(state, true, state.ceiling, rule));
    EXPECT_TRUE(policy::on_success(state, true, state.ceiling,
                                   rule));  // 8 since the failure: 125 is assumed to fail
    EXPECT_EQ(state.failed_at, 125u);
    EXPECT_EQ(state.ceiling, 112u);           // halfway to it: one probe
    EXPECT_EQ(policy::learned(state), 100u);  // not yet tried: not learned
    policy::on_oom(state, 112, 56, 0);        // the probe fails: back to what worked, not to half
    EXPECT_EQ(state.ceiling, 100u);
    EXPECT_EQ(state.failed_at, 112u);
    EXPECT_EQ(policy::learned(state), 100u);
}

TEST(Ceiling, AFailedProbeFallsBackToTheProvenSizeButAFailureAtItHalves) {
    const policy::GrowthRule rule{1, 1000};
    policy::CeilingState state;
    policy::on_oom(state, 64, 32, 0);
    EXPECT_TRUE(policy::on_success(state, true, state.ceiling, rule));  // probes 48
    EXPECT_EQ(state.ceiling, 48u);
    policy::on_oom(state, 48, 24, 0);
    EXPECT_EQ(state.ceiling, 32u);     // 32 worked a moment ago
    policy::on_oom(state, 32, 16, 0);  // now 32 itself fails: memory shrank, halve
    EXPECT_EQ(state.ceiling, 16u);
}

TEST(Ceiling, AWeightedProbeFallsBackToTheHeaviestBatchThatRanNotToItsBudget) {
    const policy::GrowthRule rule{1, 1000};
    policy::CeilingState state;
    policy::on_oom(state, 1000, 500, 0);                      // budget 500
    EXPECT_TRUE(policy::on_success(state, true, 490, rule));  // a 490-token batch ran: probe 750
    EXPECT_EQ(state.ceiling, 750u);
    // A 505-token batch ran at the probe: the probe worked, so it grows again, halfway to the
    // 1000 that failed, and 505 is the heaviest batch that ran.
    EXPECT_TRUE(policy::on_success(state, true, 505, rule));
    EXPECT_EQ(state.ceiling, 875u);
    EXPECT_EQ(state.probing_from, 750u);
    EXPECT_EQ(state.largest_success, 505u);
    EXPECT_EQ(state.failed_probes, 0u);
    policy::on_oom(state, 700, 350, 0);  // 700 fails: back to 505, the most that ran
    EXPECT_EQ(state.ceiling, 505u);
    EXPECT_EQ(state.failed_at, 700u);
    EXPECT_EQ(state.probing_from, 0u);
}

TEST(Ceiling, ConvergenceStopsWithinOneThirtySecondOfTheFailure) {
    const policy::GrowthRule rule{1, 1000000};
    policy::CeilingState state;
    policy::on_oom(state, 2000, 1000, 0);
    int probes = 0;
    for (int i = 0; i < 100; ++i) {
        if (policy::on_success(state, true, state.ceiling, rule)) {
            ++probes;
            if (state.ceiling > 1100) policy::on_oom(state, state.ceiling, state.ceiling / 2, 0);
        }
    }
    EXPECT_LE(state.failed_at - policy::learned(state), policy::learned(state) / 32);
    EXPECT_LE(probes, 12);
}

TEST(Ceiling, FailureIsForgottenAtOnceWhenMemoryCameBack) {
    const policy::GrowthRule rule{2, 1000};
    policy::CeilingState state;
    policy::on_oom(state, 2, 1, 4_GiB);
    EXPECT_TRUE(policy::wants_memory_reading(state, rule) == false);
    EXPECT_FALSE(policy::on_success(state, true, state.ceiling, rule, 0));
    EXPECT_TRUE(policy::wants_memory_reading(state, rule));
    EXPECT_TRUE(policy::on_success(state, true, state.ceiling, rule,
                                   6_GiB));  // 6 > 4 x 1.25: the squeeze is over
    EXPECT_EQ(state.ceiling, 2u);
    EXPECT_EQ(state.failed_at, 0u);

    policy::CeilingState same;
    policy::on_oom(same, 2, 1, 4_GiB);
    policy::on_success(same, true, same.ceiling, rule, 0);
    EXPECT_FALSE(policy::on_success(same, true, same.ceiling, rule,
                                    5_GiB - 1));  // not clearly more: stays at 1
    EXPECT_EQ(same.ceiling, 1u);
}

TEST(CutByWeight, CutsWhereTheNextItemWouldExceedTheBudget) {
    const std::vector<std::uint64_t> weights = {10, 10, 10, 100, 10, 5, 5};
    auto at = [&](std::size_t i) { return weights[i]; };
    struct Row {
        std::size_t begin;
        std::uint64_t budget;
        std::size_t count;
    };
    const std::vector<Row> rows = {
        {0, 30, 3},  // 10+10+10 = 30 fits exactly
        {0, 29, 2},  // the third would exceed
        {3, 50, 1},  // heavier than the budget: alone
        {4, 20, 3},  // 10+5+5 to the end
        {0, 0, 7},   // no budget: everything
        {6, 1, 1},   // last item, heavier than the budget
        {7, 10, 0},  // nothing left
    };
    for (const Row& row : rows)
        EXPECT_EQ(policy::cut_by_weight(row.begin, weights.size(), row.budget, at), row.count)
            << "begin " << row.begin << " budget " << row.budget;
}

TEST(CutByPaddedWeight, CutsWhereSizeTimesTheHeaviestWouldExceedTheBudget) {
    const std::vector<std::uint64_t> weights = {10, 10, 10, 100, 10, 5, 5};
    auto at = [&](std::size_t i) { return weights[i]; };
    EXPECT_EQ(policy::cut_by_padded_weight(0, weights.size(), 30, at), 3u);   // 3 x 10
    EXPECT_EQ(policy::cut_by_padded_weight(0, weights.size(), 399, at), 3u);  // 4 x 100 > 399
    EXPECT_EQ(policy::cut_by_padded_weight(0, weights.size(), 400, at), 4u);
    EXPECT_EQ(policy::cut_by_padded_weight(3, weights.size(), 50, at), 1u);  // alone
    EXPECT_EQ(policy::cut_by_padded_weight(4, weights.size(), 30, at), 3u);
    EXPECT_EQ(policy::cut_by_padded_weight(0, weights.size(), 0, at), 7u);
}

TEST(Ceiling, ProbesThatKeepFailingBackOffExponentially) {
    const policy::GrowthRule rule{1, 4};
    policy::CeilingState state;
    policy::on_oom(state, 101, 100, 0);
    EXPECT_EQ(policy::relax_interval(state, rule), 4u);
    for (int round = 0; round < 3; ++round) {
        while (!policy::on_success(state, true, state.ceiling, rule)) {
        }
        policy::on_oom(state, state.ceiling, state.ceiling / 2, 0);  // the relaxed probe fails
    }
    EXPECT_EQ(state.failed_probes, 3u);
    EXPECT_EQ(policy::relax_interval(state, rule), 32u);
    EXPECT_EQ(policy::learned(state), 100u);
}

TEST(Recovered, SeventyFivePercentOfTheExpectedBytes) {
    EXPECT_TRUE(policy::recovered(1_GiB, 4_GiB, 4_GiB, 0.75));  // +3 of 4 = 75 %
    EXPECT_FALSE(policy::recovered(1_GiB, 4_GiB - 1, 4_GiB, 0.75));
    EXPECT_TRUE(policy::recovered(1_GiB, 1_GiB, 0, 0.75));            // nothing expected: done
    EXPECT_FALSE(policy::recovered(kMax - 1, kMax - 1, kMax, 0.75));  // saturates
}

}  // namespace
