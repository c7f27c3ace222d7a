// SPDX-License-Identifier: MIT
// The decisions of the load and encode runs (policy.hpp, "What a load run does after an OOM" and
// "What an encode run does next"), table by table: the runs only gather facts and act on these.
#include <vramguard/policy.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

OomReport report(std::uint64_t requested, std::optional<std::uint64_t> free = std::nullopt) {
    OomReport r;
    r.requested_bytes = requested;
    r.free_bytes = free;
    return r;
}

TEST(RunPolicyReadingToDistrust, TheReadingUnlessTheFailureWasTransient) {
    struct Row {
        std::optional<OomReport> report;
        std::optional<std::uint64_t> expected;
    };
    const std::vector<Row> rows = {
        {std::nullopt, 5_GiB},                 // no numbers: the reading was wrong
        {report(1_GiB), 5_GiB},                // no free in the message
        {report(1_GiB, 512_MiB), 5_GiB},       // asked more than was free: real shortage
        {report(1_GiB, 1_GiB), std::nullopt},  // asked exactly what was free: transient
        {report(1_GiB, 2_GiB), std::nullopt},  // fitted what was free: transient
        {report(0, 2_GiB), 5_GiB},             // no request size: not known to be transient
    };
    for (const Row& row : rows)
        EXPECT_EQ(policy::reading_to_distrust(row.report, 5_GiB), row.expected)
            << (row.report ? row.report->requested_bytes : 0);
}

TEST(RunPolicyAsksMoreThanTheDevice, OnlyAReportedRequestAboveTheTotal) {
    EXPECT_FALSE(policy::asks_more_than_the_device(std::nullopt, 16_GiB));
    EXPECT_FALSE(policy::asks_more_than_the_device(report(16_GiB), 16_GiB));
    EXPECT_TRUE(policy::asks_more_than_the_device(report(16_GiB + 1), 16_GiB));
    EXPECT_FALSE(policy::asks_more_than_the_device(report(kMax), 0));  // no total known
}

TEST(RunPolicyLoadGivesUp, OnTheLastAttemptOrWhenHopeless) {
    EXPECT_FALSE(policy::load_gives_up(1, 2, false));
    EXPECT_TRUE(policy::load_gives_up(2, 2, false));
    EXPECT_TRUE(policy::load_gives_up(3, 2, false));
    EXPECT_TRUE(policy::load_gives_up(1, 2, true));
}

TEST(RunPolicyEncodeReserve, AFractionOfWhatIsFreeNotOfTheDevice) {
    EXPECT_EQ(policy::encode_reserve_bytes(10_GiB, 0.02), policy::scale_bytes(10_GiB, 0.02));
    EXPECT_EQ(policy::encode_reserve_bytes(0, 0.02), 0u);
    EXPECT_EQ(policy::encode_reserve_bytes(1_GiB, 0.0), 0u);
}

TEST(RunPolicyLearningPhase, HalfAWindowOfMeasurements) {
    EXPECT_TRUE(policy::in_learning_phase(0));
    EXPECT_TRUE(policy::in_learning_phase(policy::cost_window / 2 - 1));
    EXPECT_FALSE(policy::in_learning_phase(policy::cost_window / 2));
}

TEST(RunPolicyDecideChunk, LimitTurnsAndMeasurement) {
    struct Row {
        const char* what;
        policy::ChunkFacts facts;
        std::uint64_t limit;
        bool taught_by_oom, measure, exclusively;
    };
    policy::ChunkPlan model_plan;
    model_plan.limit = 40;
    model_plan.from_model = true;
    policy::ChunkPlan bounded = model_plan;
    bounded.bounded_by_failure = true;
    policy::ChunkPlan ceiling_plan;  // no model: the OOM-learned ceiling
    ceiling_plan.limit = 16;
    auto facts = [](policy::ChunkPlan plan, std::uint64_t retry, bool peaks, bool learning,
                    unsigned number, unsigned spoiled, bool exclusive, bool nested = false) {
        policy::ChunkFacts f;
        f.plan = plan;
        f.retry_limit = retry;
        f.measures_peaks = peaks;
        f.learning = learning;
        f.chunk_number = number;
        f.spoiled = spoiled;
        f.exclusive_held = exclusive;
        f.inside_another_run = nested;
        return f;
    };
    const std::vector<Row> rows = {
        {"model plan, learning", facts(model_plan, 0, true, true, 0, 0, false), 40, false, true,
         false},
        {"after an OOM the retry size wins", facts(model_plan, 7, true, true, 0, 0, false), 7, true,
         true, false},
        {"a failure bounded the plan", facts(bounded, 0, true, true, 0, 0, false), 40, true, true,
         false},
        {"the ceiling is taught by OOMs", facts(ceiling_plan, 0, false, true, 0, 0, false), 16,
         true, false, false},
        {"no peaks: never measured", facts(model_plan, 0, false, true, 0, 0, false), 40, false,
         false, false},
        {"past learning: one in measure_every",
         facts(model_plan, 0, true, false, policy::measure_every, 0, false), 40, false, true,
         false},
        {"past learning: the others not", facts(model_plan, 0, true, false, 1, 0, false), 40, false,
         false, false},
        {"spoiled twice: measured exclusively",
         facts(model_plan, 0, true, true, 0, policy::spoiled_before_exclusive, false), 40, false,
         true, true},
        {"spoiled once: not yet",
         facts(model_plan, 0, true, true, 0, policy::spoiled_before_exclusive - 1, false), 40,
         false, true, false},
        {"already exclusive for an item",
         facts(model_plan, 0, true, true, 0, policy::spoiled_before_exclusive, true), 40, false,
         true, false},
        {"inside another run of the guard: not measured",
         facts(model_plan, 0, true, true, 0, policy::spoiled_before_exclusive, false, true), 40,
         false, false, false},
        {"not measured: never exclusive",
         facts(model_plan, 0, true, false, 3, policy::spoiled_before_exclusive, false), 40, false,
         false, false},
    };
    for (const Row& row : rows) {
        const policy::ChunkDecision got = policy::decide_chunk(row.facts);
        EXPECT_EQ(got.limit, row.limit) << row.what;
        EXPECT_EQ(got.taught_by_oom, row.taught_by_oom) << row.what;
        EXPECT_EQ(got.measure, row.measure) << row.what;
        EXPECT_EQ(got.measure_exclusively, row.exclusively) << row.what;
    }
}

TEST(RunPolicyTakesTurns, OnlyALoneItemWhoseLimitOomsTaught) {
    policy::ChunkDecision taught;
    taught.taught_by_oom = true;
    const policy::ChunkDecision model_only;
    EXPECT_TRUE(policy::takes_turns(true, taught));
    EXPECT_FALSE(policy::takes_turns(false, taught));
    EXPECT_FALSE(policy::takes_turns(true, model_only));
}

TEST(RunPolicyOomLowerBound, TheLargerOfTheFailedRequestAndTheReadingUnlessTransient) {
    struct Row {
        std::optional<OomReport> report;
        bool planned_with_reading;
        std::uint64_t planned_free;
        std::uint64_t expected;
    };
    const std::vector<Row> rows = {
        {std::nullopt, false, 0, 0},             // nothing known
        {std::nullopt, true, 3_GiB, 3_GiB + 1},  // more than was free
        {report(4_GiB), true, 3_GiB, 4_GiB},     // the request is larger
        {report(1_GiB), false, 3_GiB, 1_GiB},    // no reading: the request
        {report(1_GiB, 2_GiB), true, 3_GiB, 0},  // transient: no lesson
        {report(2_GiB, 2_GiB), true, 3_GiB, 0},  // requested == free: transient
        {std::nullopt, true, kMax, kMax},        // saturates
    };
    for (const Row& row : rows)
        EXPECT_EQ(policy::oom_lower_bound(row.report, row.planned_with_reading, row.planned_free),
                  row.expected)
            << row.planned_free;
}

TEST(RunPolicyOomLowerBound, BesideOtherRunsOnlyTheFailedRequestBoundsTheCost) {
    // Other chunks of the guard took part of what was free: "more than was free" is no lesson
    // about this chunk's cost (issue 23: a fixed part and a costliest unit 5-10x too large).
    EXPECT_EQ(policy::oom_lower_bound(std::nullopt, true, 3_GiB, true), 0u);
    EXPECT_EQ(policy::oom_lower_bound(report(1_GiB), true, 3_GiB, true), 1_GiB);
    EXPECT_EQ(policy::oom_lower_bound(report(1_GiB), true, 3_GiB, false), 3_GiB + 1);
    EXPECT_EQ(policy::oom_lower_bound(report(1_GiB, 2_GiB), true, 3_GiB, true), 0u);
}

TEST(RunPolicyFreeForPlan, CountsTheClaimsTheReadingDoesNotShowYet) {
    struct Row {
        std::uint64_t free_now, anchor, claimed, expected;
        const char* why;
    };
    const std::vector<Row> rows = {
        {10_GiB, 10_GiB, 0, 10_GiB, "no claims: the reading as it is"},
        {10_GiB, 10_GiB, 4_GiB, 6_GiB, "claimed, nothing allocated yet"},
        {7_GiB, 10_GiB, 4_GiB, 6_GiB, "3 of the 4 GiB allocated"},
        {6_GiB, 10_GiB, 4_GiB, 6_GiB, "all allocated: the reading shows it"},
        {5_GiB, 10_GiB, 4_GiB, 5_GiB, "more went than was claimed: the reading"},
        {12_GiB, 10_GiB, 4_GiB, 8_GiB, "memory came back: not counted on"},
        {3_GiB, 10_GiB, kMax, 0, "saturates at zero"},
        {1_GiB, 0, 4_GiB, 0, "an anchor below the reading shows nothing"},
    };
    for (const Row& row : rows)
        EXPECT_EQ(policy::free_for_plan(row.free_now, row.anchor, row.claimed), row.expected)
            << row.why;
}

TEST(RunPolicyFreeForPlan, WithoutClaimsIsTheReadingAndWhatItShowsOfThem) {
    EXPECT_EQ(policy::free_without_claims(10_GiB, 10_GiB, 4_GiB), 10_GiB);  // nothing shown
    EXPECT_EQ(policy::free_without_claims(7_GiB, 10_GiB, 4_GiB), 10_GiB);   // 3 GiB shown
    EXPECT_EQ(policy::free_without_claims(5_GiB, 10_GiB, 4_GiB), 9_GiB);    // only 4 are ours
    // A claim of the whole device (a key not measured yet) adds nothing it does not show.
    EXPECT_EQ(policy::free_without_claims(8_GiB, 10_GiB, kMax / 4), 10_GiB);
    EXPECT_EQ(policy::free_without_claims(kMax, kMax, kMax), kMax);
}

TEST(RunPolicyRunOrWait, WaitsWhenTheClaimsLeaveTooLittleAndWaitingHelps) {
    using policy::ShareStep;
    struct Row {
        std::uint64_t size_now, size_freed;
        bool fits_now, fits_freed, others_claim, may_wait;
        ShareStep expected;
        const char* why;
    };
    const ShareStep run = ShareStep::run_now, wait = ShareStep::wait_for_a_claim;
    const std::vector<Row> rows = {
        {10, 100, true, true, false, true, run, "no claims: nothing to wait for"},
        {10, 100, true, true, true, false, run, "may not wait (nested, turn held, budget)"},
        {50, 100, true, true, true, true, run, "half: at most one batch more"},
        {49, 100, true, true, true, true, wait, "under half: wait"},
        {1, 3, true, true, true, true, wait, "one item of three"},
        {64, 64, true, true, true, true, run, "the rest of the call fits now"},
        {400, 400, false, true, true, true, wait, "its one item is more than the claims leave"},
        {400, 400, false, true, true, false, run, "... but the wait is spent"},
        {400, 400, false, false, true, true, run, "not even the freed memory holds it"},
        {kMax, kMax, true, true, true, true, run, "saturates"},
    };
    for (const Row& row : rows) {
        policy::ShareFacts facts;
        facts.size_now = row.size_now;
        facts.size_freed = row.size_freed;
        facts.fits_now = row.fits_now;
        facts.fits_freed = row.fits_freed;
        facts.others_claim = row.others_claim;
        facts.may_wait = row.may_wait;
        EXPECT_EQ(policy::run_or_wait(facts), row.expected) << row.why;
    }
}

TEST(RunPolicyRetryExclusively, OnceAndOnlyWhileOthersRun) {
    struct Row {
        bool exclusive_held, inside_another_run, others_running, expected;
    };
    const std::vector<Row> rows = {
        {false, false, true, true},    // others held memory: the failure says nothing
        {false, false, false, false},  // really alone: the failure counts
        {true, false, true, false},    // once per item
        {false, true, true, false},    // inside the caller's own run: would wait for itself
    };
    for (const Row& row : rows)
        EXPECT_EQ(policy::retry_exclusively(row.exclusive_held, row.inside_another_run,
                                            row.others_running),
                  row.expected)
            << row.exclusive_held << row.inside_another_run << row.others_running;
}

TEST(RunPolicyAfterItemOom, ExclusiveThenGiveUpThenWaitOrPause) {
    using Step = policy::ItemOomStep;
    struct Row {
        const char* what;
        bool exclusive_held, others_running;
        unsigned failures, attempts;
        bool hopeless;
        std::uint64_t requested;
        Step expected;
    };
    const std::vector<Row> rows = {
        {"others held memory: retry exclusively", false, true, 1, 3, false, 1_GiB,
         Step::retry_exclusively},
        {"others held memory, even on the last count", false, true, 3, 3, true, 1_GiB,
         Step::retry_exclusively},
        {"alone, first failure: wait for its bytes", false, false, 1, 3, false, 1_GiB,
         Step::wait_for_memory},
        {"exclusive already, others running: counted", true, true, 1, 3, false, 1_GiB,
         Step::wait_for_memory},
        {"no numbers: pause one poll", false, false, 2, 3, false, 0, Step::pause},
        {"the last attempt", false, false, 3, 3, false, 1_GiB, Step::give_up},
        {"more than the device: at once", false, false, 1, 3, true, 1_GiB, Step::give_up},
    };
    for (const Row& row : rows) {
        policy::ItemOomFacts facts;
        facts.exclusive_held = row.exclusive_held;
        facts.others_running = row.others_running;
        facts.item_failures = row.failures;
        facts.attempts = row.attempts;
        facts.hopeless = row.hopeless;
        facts.requested_bytes = row.requested;
        EXPECT_EQ(policy::after_item_oom(facts), row.expected) << row.what;
    }
}

TEST(RunPolicySuccessTeaches, WhatASuccessfulChunkTeachesTheKey) {
    policy::PlanInputs no_model;
    no_model.ceiling = 0;
    no_model.largest_success = 10;
    policy::PlanInputs with_ceiling = no_model;
    with_ceiling.ceiling = 16;
    policy::PlanInputs model;
    model.model.samples = 4;
    model.model.bytes_per_unit = 1_MiB;
    model.evidence.ran_size = 20;
    model.evidence.ran_free = 4_GiB;
    policy::PlanInputs model_failed = model;
    model_failed.evidence.failed_size = 30;
    model_failed.evidence.failed_free = 4_GiB;
    auto ran = [](std::uint64_t size, std::uint64_t free, bool at_limit, std::uint64_t limit,
                  bool peak) {
        policy::ChunkRan r;
        r.size = size;
        r.free_bytes = free;
        r.at_limit = at_limit;
        r.limit = limit;
        r.measured_peak = peak;
        return r;
    };
    struct Row {
        const char* what;
        policy::PlanInputs known;
        std::uint64_t known_limit;
        policy::ChunkRan ran;
        bool teaches;
    };
    const std::vector<Row> rows = {
        {"a measured peak is a sample", model, 0, ran(5, 4_GiB, false, 0, true), true},
        {"a limit that moved", model, 20, ran(10, 4_GiB, true, 25, false), true},
        {"the same limit again teaches nothing", model, 20, ran(10, 5_GiB, true, 20, false), false},
        {"larger than any that ran", model, 0, ran(21, 5_GiB, false, 0, false), true},
        {"as large with less memory", model, 0, ran(20, 3_GiB, false, 0, false), true},
        {"as large with more memory: nothing", model, 0, ran(20, 5_GiB, false, 0, false), false},
        {"smaller: nothing", model, 0, ran(19, 1_GiB, false, 0, false), false},
        {"at the limit under a failure", model_failed, 0, ran(10, 5_GiB, true, 0, false), true},
        {"at the failed size", model_failed, 0, ran(30, 5_GiB, false, 0, false), true},
        {"under a failure, not at the limit", model_failed, 0, ran(10, 5_GiB, false, 0, false),
         false},
        {"no model, at the ceiling", with_ceiling, 16, ran(16, 0, true, 16, false), true},
        {"no model, no ceiling, at a limit", no_model, 16, ran(16, 0, true, 16, false), false},
        {"no model, above the largest success", no_model, 0, ran(11, 0, false, 0, false), true},
        {"no model, not above it", no_model, 0, ran(10, 0, false, 0, false), false},
    };
    for (const Row& row : rows)
        EXPECT_EQ(policy::success_teaches(row.known, row.known_limit, row.ran), row.teaches)
            << row.what;
}

TEST(RunPolicyCappedByDevice, AnEstimateOfWhatRanHereNeverExceedsTheEmptyDevice) {
    // 16 GiB, a 10 % margin: the empty device admits 16 GiB - 1.6 GiB.
    const std::uint64_t admissible = 16_GiB - policy::margin_bytes(16_GiB, 0.1);
    EXPECT_EQ(policy::capped_by_device(20_GiB, true, 16_GiB, 0.1), admissible);
    EXPECT_EQ(policy::capped_by_device(1_GiB, true, 16_GiB, 0.1), 1_GiB);
    EXPECT_EQ(policy::capped_by_device(20_GiB, false, 16_GiB, 0.1), 20_GiB);  // never ran here
    EXPECT_EQ(policy::capped_by_device(kMax, true, 0, 0.1), 0u);
}

TEST(RunPolicyLimitGrew, AModelLimitMoreThanAnEighthUp) {
    EXPECT_TRUE(policy::limit_grew(true, 80, 91));
    EXPECT_FALSE(policy::limit_grew(true, 80, 90));    // exactly an eighth: jitter
    EXPECT_FALSE(policy::limit_grew(false, 80, 200));  // the ceiling's growth has its own event
    EXPECT_FALSE(policy::limit_grew(true, 0, 200));    // nothing before
    EXPECT_FALSE(policy::limit_grew(true, kMax, kMax));
}

}  // namespace
