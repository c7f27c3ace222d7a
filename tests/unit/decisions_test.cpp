// SPDX-License-Identifier: MIT
// What an encode run decides, seen from outside: which chunks are measured, when a measurement
// takes the guard for itself, what an OOM teaches and what its retry waits for, and when an item
// that ran out of memory beside other runs retries alone. Guard::encode against SimulatedDevice;
// where threads are needed, they go step by step on a Board (no sleeps, no timing).
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "board.hpp"
#include "guard_fixture.hpp"

#include <atomic>
#include <cstdint>
#include <exception>
#include <numeric>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using vramguard_test::Board;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

using View = BatchView<std::vector<int>::const_iterator>;

std::vector<int> numbered(int n) {
    std::vector<int> items(static_cast<std::size_t>(n));
    std::iota(items.begin(), items.end(), 0);
    return items;
}

// A chunk that takes `per_item` bytes an item, as one tensor, for as long as it runs.
auto costing(SimulatedDevice& device, std::uint64_t per_item) {
    return [&device, per_item](const View& batch) {
        auto activations = device.allocate(per_item * batch.size());
        return std::vector<int>(batch.begin(), batch.end());
    };
}

class Decisions : public ::testing::Test {
   protected:
    ManualClock clock;
    CapturedLog log;
    Options options = test_options(clock, log);
};

// The learning phase: every chunk is measured until half a window of measurements was taken, then
// one chunk in measure_every. Each measured chunk here is one sample of the model.
TEST_F(Decisions, EveryChunkIsMeasuredForHalfAWindowThenOneInMeasureEvery) {
    SimulatedDevice device(64_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("schedule");
    const auto items = numbered(10);
    const std::size_t half = policy::cost_window / 2;
    std::size_t expected = 0;
    for (std::size_t call = 1; call <= half + 3 * policy::measure_every; ++call) {
        ASSERT_EQ(guard.encode(key, items, costing(device, 100_MiB)), items);
        if (call <= half || (call - half - 1) % policy::measure_every == 0) ++expected;
        ASSERT_EQ(guard.cost_model(key).samples, expected) << "after call " << call;
    }
    EXPECT_EQ(expected, half + 3);
}

// The encode reserve is a share of what is free when the chunk is planned, not of the device: with
// 15 GiB of 100 free, 2 % of 15 GiB stays free beside the chunk (2 % of the device would leave 133
// items of 100 MiB instead of 150; no reserve, 153). The first call runs 2 items with no reading,
// the second 10 with one, so that no evidence of what ran raises the plan over the reserve.
TEST_F(Decisions, TheEncodeReserveIsAShareOfWhatIsFree) {
    SimulatedDevice device(100_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("reserve");
    ASSERT_EQ(guard.encode(key, numbered(2), costing(device, 100_MiB)), numbered(2));
    ASSERT_EQ(guard.encode(key, numbered(10), costing(device, 100_MiB)), numbered(10));
    device.set_external_usage(85_GiB);
    std::vector<std::size_t> sizes;
    const auto items = numbered(300);
    ASSERT_EQ(guard.encode(key, items,
                           [&](const View& batch) {
                               sizes.push_back(batch.size());
                               return costing(device, 100_MiB)(batch);
                           }),
              items);
    const auto fits = static_cast<std::size_t>(15_GiB * (1 - options.encode_reserve) / 100_MiB);
    EXPECT_EQ(fits, 150u);
    EXPECT_EQ(sizes, (std::vector<std::size_t>{fits, fits}));
    EXPECT_EQ(guard.stats().ooms, 0u);
}

// A key whose measurements another run of the guard keeps spoiling: after
// spoiled_before_exclusive of them, its next measured chunk waits for the running ones to finish
// (and keeps new ones out) so that it is measured alone.
TEST_F(Decisions, AfterSpoiledMeasurementsTheNextMeasuredChunkRunsAlone) {
#if !defined(__linux__)
    GTEST_SKIP() << "sees the waiting thread through /proc";
#else
    static_assert(policy::spoiled_before_exclusive == 2, "the scenario spoils exactly two");
    SimulatedDevice device(64_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key other = Key::of("holds the device"), key = Key::of("always overlapped");
    const auto items = numbered(10);
    Board board;
    // The other key was measured once (it allocates nothing): its chunk claims nothing, so only
    // the exclusive turn, not a claim, can keep the third call's measured chunk from running
    // beside it.
    guard.encode(other, items,
                 [](const View& batch) { return std::vector<int>(batch.begin(), batch.end()); });
    std::thread holder([&] {
        guard.encode(other, items, [&](const View& batch) {
            auto held = device.allocate(1_GiB);
            board.mark("other inside");
            board.wait_for("release other");
            board.mark("other returns");
            return std::vector<int>(batch.begin(), batch.end());
        });
    });
    ASSERT_TRUE(board.wait_for("other inside"));
    for (int spoiled = 0; spoiled < 2; ++spoiled)  // beside the other run: no sample
        ASSERT_EQ(guard.encode(key, items, costing(device, 100_MiB)), items);
    EXPECT_FALSE(guard.cost_model(key).known());

    std::atomic<long> third_tid{0};
    std::atomic<bool> other_had_returned{false};
    std::thread third([&] {
        third_tid = vramguard_test::this_thread_id();
        guard.encode(key, items, [&](const View& batch) {
            other_had_returned = board.marked("other returns");
            board.mark("third inside");
            return costing(device, 100_MiB)(batch);
        });
    });
    // The third call either runs at once (wrong) or waits for the other run to finish: release
    // the other run once the third is inside its chunk or blocked waiting for its turn.
    const auto give_up = std::chrono::steady_clock::now() + Board::safety_net;
    while (!board.marked("third inside") &&
           !(third_tid != 0 && vramguard_test::thread_is_blocked(third_tid)) &&
           std::chrono::steady_clock::now() < give_up)
        std::this_thread::yield();
    board.mark("release other");
    third.join();
    holder.join();
    EXPECT_TRUE(other_had_returned) << "the measured chunk ran beside the other run";
    const policy::CostModel model = guard.cost_model(key);
    EXPECT_EQ(model.samples, 1u) << "measured alone";
    EXPECT_NEAR(model.costliest_unit, static_cast<double>(100_MiB), 1.0);
#endif
}

// An item that runs out of memory with the memory still there (the OOM's own numbers say it
// fitted: fragmentation, a race) is retried without waiting for the reading to change.
TEST_F(Decisions, AnItemsTransientOomIsRetriedWithoutWaitingForTheReadingToMove) {
    SimulatedDevice device(16_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("transient");
    device.fail_next_allocations(1);  // 1 GiB asked with 16 GiB free
    EXPECT_EQ(guard.encode(key, numbered(1), costing(device, 1_GiB)), numbered(1));
    EXPECT_EQ(guard.stats().ooms, 1u);
    EXPECT_EQ(guard.stats().retries, 1u);
    EXPECT_EQ(guard.stats().waits, 0u);
    EXPECT_EQ(clock.slept(), Duration::zero()) << "waited for a reading that had no reason to move";
}

// ... while after a real one (more asked than was free) the reading the item was planned with is
// distrusted: here it is stale (the driver reports 3 s late, within recovery_timeout), still shows
// the memory free, and the retry waits until the reading moves and then shows the memory back.
TEST_F(Decisions, AnItemsRealOomDistrustsTheReadingItWasPlannedWith) {
    SimulatedDevice device(16_GiB);
    options.item_retry_delay = std::chrono::seconds(60);  // an item's wait, long enough to see
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("real");
    device.set_report_lag(std::chrono::seconds(3), clock.clock_fn());
    device.set_external_usage(12_GiB);  // 4 GiB free, shown from 3 s on
    clock.after(std::chrono::seconds(20), [&] { device.set_external_usage(0); });  // shown at 23 s
    EXPECT_EQ(guard.encode(key, numbered(1), costing(device, 6_GiB)), numbered(1));
    EXPECT_EQ(guard.stats().ooms, 1u) << "retried on the stale reading";
    EXPECT_GE(clock.slept(), std::chrono::seconds(23));
    EXPECT_LE(clock.slept(), std::chrono::seconds(23) + options.poll_interval);
}

// A chunk that failed although its allocation fitted (transient) says nothing about its cost: no
// lower bound from it. (A real OOM's lower bound is free + 1 at the plan: here that would be about
// 6 GiB an item for a key that costs 100 MiB.)
TEST_F(Decisions, ATransientChunkOomTeachesNoLowerBound) {
    SimulatedDevice device(64_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("no bound");
    const auto items = numbered(10);
    for (int call = 0; call < 2; ++call)
        ASSERT_EQ(guard.encode(key, items, costing(device, 100_MiB)), items);
    ASSERT_TRUE(guard.cost_model(key).known());
    device.fail_next_allocations(1);
    ASSERT_EQ(guard.encode(key, items, costing(device, 100_MiB)), items);
    EXPECT_EQ(guard.stats().ooms, 1u);
    const policy::CostModel model = guard.cost_model(key);
    EXPECT_NEAR(model.costliest_unit, static_cast<double>(100_MiB), 1.0);
    EXPECT_LE(model.peak_for(10), 1000_MiB);
}

// An item that runs out of memory while another run of the guard holds memory is not counted as a
// failure: it waits for the other runs to finish and retries alone (even with one attempt).
TEST_F(Decisions, AnItemThatOomsBesideAnotherRunRetriesAloneOnceItFinishes) {
    SimulatedDevice device(10_GiB);
    options.single_item_attempts = 1;
    Board board;
    const LogSink captured = log.sink();
    options.log = [&](Level level, std::string_view message) {
        captured(level, message);
        if (message.find("while other batches of this guard held memory") != std::string::npos)
            board.mark("item waits for its turn");
    };
    Guard<SimulatedDevice> guard(device, options);
    const Key other = Key::of("other"), key = Key::of("big item");
    std::thread holder([&] {
        guard.encode(other, numbered(1), [&](const View& batch) {
            auto held = device.allocate(6_GiB);
            board.mark("other inside");
            board.wait_for_either("item waits for its turn", "item call ended");
            return std::vector<int>(batch.begin(), batch.end());
        });
    });
    ASSERT_TRUE(board.wait_for("other inside"));
    std::exception_ptr failed;
    std::vector<int> result;
    try {
        result = guard.encode(key, numbered(1), costing(device, 6_GiB));  // 4 GiB free now
    } catch (...) {
        failed = std::current_exception();
    }
    board.mark("item call ended");
    holder.join();
    EXPECT_FALSE(failed) << "given up although the memory was the guard's own: "
                         << (failed ? describe(failed) : "");
    EXPECT_EQ(result, numbered(1));
    EXPECT_TRUE(board.marked("item waits for its turn"));
    EXPECT_EQ(guard.stats().ooms, 1u);
    EXPECT_EQ(clock.slept(), Duration::zero()) << "no wait for memory: the turn is the wait";
}

}  // namespace
