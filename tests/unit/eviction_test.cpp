// SPDX-License-Identifier: MIT
// The registry's pure decisions, table by table: eviction planning over slot snapshots
// (eviction.hpp) and two-stage pressure relief (pressure.hpp).
#include <vramguard/eviction.hpp>
#include <vramguard/pressure.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;

namespace {

const TimePoint t0 = TimePoint{} + std::chrono::hours(1);

detail::SlotSnapshot slot(ModelState state, int leases, std::uint64_t bytes, Duration used_at) {
    detail::SlotSnapshot s;
    s.state = state;
    s.leases = leases;
    s.bytes = bytes;
    s.last_used = t0 + used_at;
    return s;
}

TEST(EvictionIdleLru, LoadedUnleasedOthersLeastRecentlyUsedFirst) {
    const std::vector<detail::SlotSnapshot> slots = {
        slot(ModelState::loaded, 0, 1_GiB, 5s),     // 0: idle, used last
        slot(ModelState::loaded, 1, 1_GiB, 0s),     // 1: leased
        slot(ModelState::loading, 0, 0, 0s),        // 2: loading
        slot(ModelState::loaded, 0, 1_GiB, 1s),     // 3: idle
        slot(ModelState::unloaded, 0, 0, 0s),       // 4
        slot(ModelState::unloading, 0, 1_GiB, 0s),  // 5
        slot(ModelState::loaded, 0, 1_GiB, 1s),     // 6: idle, ties with 3
    };
    EXPECT_EQ(eviction::idle_lru(slots), (std::vector<std::size_t>{3, 6, 0}));
    EXPECT_EQ(eviction::idle_lru(slots, 3), (std::vector<std::size_t>{6, 0}));
    EXPECT_EQ(eviction::idle_lru({}), std::vector<std::size_t>{});
    EXPECT_EQ(eviction::loaded_count(slots), 4u) << "loading and unloading slots do not count";
    EXPECT_EQ(eviction::loaded_count(slots, 1), 3u);
    EXPECT_EQ(eviction::loaded_count(slots, 2), 4u);
}

TEST(EvictionReachable, AddsIdleBytesAndAnUnknownSizeReachesEverything) {
    constexpr std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    struct Row {
        std::uint64_t free, trusted;
        std::vector<std::uint64_t> idle;
        std::uint64_t expected;
    };
    const Row rows[] = {
        {2_GiB, 0, {}, 2_GiB},       {2_GiB, 1_GiB, {}, 3_GiB},  {2_GiB, 0, {1_GiB, 4_GiB}, 7_GiB},
        {2_GiB, 0, {1_GiB, 0}, max}, {max - 1, 0, {1_GiB}, max},
    };
    for (const Row& row : rows)
        EXPECT_EQ(eviction::reachable(row.free, row.trusted, row.idle), row.expected);
}

TEST(EvictionPlan, TableOfSituations) {
    using eviction::Step;
    struct Row {
        const char* what;
        std::uint64_t required, free, trusted;
        std::size_t loaded, max_loaded;
        std::vector<std::uint64_t> idle;
        Step step;
        bool fits, at_cap, cannot_help, never_fits;
    };
    // 10 GiB device, 10 % margin: a load needs required + 1 GiB free.
    const Row rows[] = {
        {"fits, under the cap", 4_GiB, 5_GiB, 0, 1, 3, {}, Step::load, true, false, false, false},
        {"short by a byte, nothing idle",
         4_GiB,
         5_GiB - 1,
         0,
         1,
         3,
         {},
         Step::stuck,
         false,
         false,
         false,
         false},
        {"short, an idle model makes room",
         4_GiB,
         2_GiB,
         0,
         2,
         3,
         {4_GiB},
         Step::evict,
         false,
         false,
         false,
         false},
        {"short, every idle model would not do",
         6_GiB,
         2_GiB,
         0,
         1,
         3,
         {4_GiB},
         Step::stuck,
         false,
         false,
         true,
         false},
        {"short, an idle model of unknown size might",
         6_GiB,
         2_GiB,
         0,
         1,
         3,
         {0},
         Step::evict,
         false,
         false,
         false,
         false},
        {"trusted bytes make it fit",
         4_GiB,
         2_GiB,
         3_GiB,
         1,
         3,
         {4_GiB},
         Step::load,
         true,
         false,
         false,
         false},
        {"at the cap, memory fits: evict for the cap",
         1_GiB,
         8_GiB,
         0,
         2,
         2,
         {1_GiB},
         Step::evict,
         true,
         true,
         false,
         false},
        {"at the cap, all busy", 1_GiB, 8_GiB, 0, 2, 2, {}, Step::stuck, true, true, false, false},
        {"at the cap and short: evicts even if all would not do",
         8_GiB,
         1_GiB,
         0,
         2,
         2,
         {1_GiB},
         Step::evict,
         false,
         true,
         false,
         false},
        {"never fits: load (Guard::load refuses), evict nothing",
         20_GiB,
         0,
         0,
         2,
         3,
         {4_GiB},
         Step::load,
         false,
         false,
         false,
         true},
    };
    for (const Row& row : rows) {
        SCOPED_TRACE(row.what);
        eviction::Situation s;
        s.required = row.required;
        s.memory = {row.free, 10_GiB};
        s.safety_margin = 0.10;
        s.trusted = row.trusted;
        s.loaded = row.loaded;
        s.max_loaded = row.max_loaded;
        s.idle_bytes = row.idle;
        const eviction::Plan plan = eviction::plan(s);
        EXPECT_EQ(plan.step, row.step);
        EXPECT_EQ(plan.fits, row.fits);
        EXPECT_EQ(plan.at_cap, row.at_cap);
        EXPECT_EQ(plan.evicting_cannot_help, row.cannot_help);
        EXPECT_EQ(plan.never_fits, row.never_fits);
    }
}

TEST(PressureDecide, ThresholdAndRateLimitWindow) {
    using pressure::Action;
    struct Row {
        double usage;
        std::optional<Duration> last_acted_ago;
        Action expected;
    };
    const Row rows[] = {
        {0.70, std::nullopt, Action::none},
        {0.75, std::nullopt, Action::none},  // at the threshold: calm
        {0.76, std::nullopt, Action::act},
        {0.90, 29s, Action::rate_limited},
        {0.90, 30s, Action::act},  // the window is 30 s
        {0.50, 1s, Action::none},  // calm readings never report the window
    };
    for (const Row& row : rows) {
        std::optional<TimePoint> last;
        if (row.last_acted_ago) last = t0 - *row.last_acted_ago;
        EXPECT_EQ(pressure::decide(row.usage, 0.75, last, t0, 30s), row.expected)
            << "usage " << row.usage;
    }
    EXPECT_EQ(pressure::decide(0.9, 0.75, t0, t0, 0s), Action::act) << "no rate limit";
    EXPECT_EQ(pressure::unload_target(10_GiB, 0.85), policy::scale_bytes(10_GiB, 0.85));
}

}  // namespace
