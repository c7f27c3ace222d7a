// SPDX-License-Identifier: MIT
// The learner end to end: Guard::encode against SimulatedDevice (PyTorch's allocator behaviour),
// with measured peaks, planning every chunk from the cost model and a fresh reading. The numbers
// in the test names are the acceptance criteria.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "board.hpp"
#include "guard_fixture.hpp"
#include "temp_dir.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <future>
#include <numeric>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

using View = BatchView<std::vector<int>::const_iterator>;

std::vector<int> iota_items(int n) {
    std::vector<int> items(static_cast<std::size_t>(n));
    std::iota(items.begin(), items.end(), 0);
    return items;
}

// A chunk costs fixed + per_item x size, as one tensor (an encoder's activations), and records the
// sizes it was given.
struct LinearEncoder {
    SimulatedDevice& device;
    std::uint64_t fixed;
    std::uint64_t per_item;
    std::vector<std::size_t> sizes;

    std::vector<int> operator()(const View& batch) {
        sizes.push_back(batch.size());
        auto workspace = device.allocate(fixed);
        auto activations = device.allocate(per_item * batch.size());
        return std::vector<int>(batch.begin(), batch.end());
    }
};

std::size_t fewest_batches(std::size_t items, std::uint64_t usable, std::uint64_t fixed,
                           std::uint64_t per_item) {
    const std::size_t per_batch = static_cast<std::size_t>((usable - fixed) / per_item);
    return (items + per_batch - 1) / per_batch;
}

class Learner : public ::testing::Test {
   protected:
    ManualClock clock;
    CapturedLog log;
    Options options = test_options(clock, log);
};

// 100 calls of `items` items on a steady 16 GiB device: at most one OOM over all of them, and
// from the second call on, never more than one batch over the fewest that fit.
void expect_one_oom_and_the_fewest_batches(Guard<SimulatedDevice>& guard, SimulatedDevice& device,
                                           const Key& key, int items, std::uint64_t fixed,
                                           std::uint64_t per_item) {
    const auto input = iota_items(items);
    const std::size_t fewest =
        fewest_batches(static_cast<std::size_t>(items), device.total_bytes(), fixed, per_item);
    for (int call = 0; call < 100; ++call) {
        LinearEncoder encoder{device, fixed, per_item, {}};
        ASSERT_EQ(guard.encode(key, input, std::ref(encoder)), input);
        if (call > 0) {
            EXPECT_LE(encoder.sizes.size(), fewest + 1) << "call " << call;
        }
    }
    EXPECT_LE(guard.stats().ooms, 1u);
    EXPECT_EQ(guard.stats().ooms, device.oom_count());
}

TEST_F(Learner, SteadyUniformLinearCostOneOomPerKeyAndTheFewestBatchesThatFit) {
    SimulatedDevice device(16_GiB);
    Guard<SimulatedDevice> guard(device, options);
    expect_one_oom_and_the_fewest_batches(guard, device, Key::of("uniform"), 100, 0, 1_GiB);
}

TEST_F(Learner, FixedPlusPerItemCostOneOomPerKeyAndTheFewestBatchesThatFit) {
    SimulatedDevice device(16_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("fixed-plus-linear");
    expect_one_oom_and_the_fewest_batches(guard, device, key, 200, 2_GiB, 200_MiB);
    EXPECT_NEAR(guard.cost_model(key).bytes_per_unit, static_cast<double>(200_MiB), 0.05 * 200_MiB);
}

// The third case: 3 GiB + 180 MiB per item on 24 GiB fits 100 items in one batch; once
// measured, every later call must still run them in one batch (the old prediction cut them to
// 87 + 13 for good).
TEST_F(Learner, RoomProvenUsableIsNotLeftUnused) {
    SimulatedDevice device(24_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("room");
    const auto items = iota_items(100);
    for (int call = 0; call < 20; ++call) {
        LinearEncoder encoder{device, 3_GiB, 180_MiB, {}};
        ASSERT_EQ(guard.encode(key, items, std::ref(encoder)), items);
        EXPECT_EQ(encoder.sizes, std::vector<std::size_t>{100}) << "call " << call;
    }
    EXPECT_EQ(guard.stats().ooms, 0u);
}

TEST_F(Learner, ASqueezeShrinksTheNextChunkBeforeItRunsAndMemoryComingBackGrowsItAtOnce) {
    SimulatedDevice device(16_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("squeeze");
    const auto items = iota_items(64);
    for (int call = 0; call < 3; ++call) {
        LinearEncoder encoder{device, 0, 256_MiB, {}};
        guard.encode(key, items, std::ref(encoder));
    }
    const std::uint64_t ooms = guard.stats().ooms;
    device.set_external_usage(10_GiB);  // another process arrives between two calls
    LinearEncoder squeezed{device, 0, 256_MiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(squeezed)), items);
    EXPECT_EQ(guard.stats().ooms, ooms) << "the reading shows the squeeze before the chunk runs";
    EXPECT_LE(*std::max_element(squeezed.sizes.begin(), squeezed.sizes.end()), 24u);

    device.set_external_usage(0);  // it leaves: the very next chunk is large again
    LinearEncoder relieved{device, 0, 256_MiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(relieved)), items);
    EXPECT_EQ(relieved.sizes, std::vector<std::size_t>{64});
    EXPECT_EQ(guard.stats().ooms, ooms);
    EXPECT_GE(guard.stats().grow_backs, 1u);
}

// Measure only what is yours: two threads on two keys of one guard, their chunks overlapping in
// the two ways that could book one key's memory against the other (each step waits for the one
// before: no timing). A peak shared by both would be booked against one of them (4 GiB against a
// key whose chunks take 100 MiB); only chunks that ran alone count, so both learned costs stay
// true.
//  - "started beside": the large chunk runs; the small one starts; then the large one takes its
//    memory and ends, and the small one ends last (nothing else ran after it started, but something
//    was running when it did);
//  - "started inside": the small chunk runs alone; the large one starts, takes its memory and ends;
//    the small one ends last (nothing else is running at its end, but something started since).
// Between them each key runs alone once, so no key is spoiled twice in a row (which would make its
// next measured chunk wait for the other's: a turn this interleaving must not take).
TEST_F(Learner, TwoThreadsTwoKeysEachLearnTheirOwnPerItemCost) {
    SimulatedDevice device(64_GiB);
    options.clock = system_clock();  // real threads: real time, no waits happen here
    options.sleep = system_sleep();
    Guard<SimulatedDevice> guard(device, options);
    const Key small = Key::of("small"), large = Key::of("large");
    const auto items = iota_items(10);
    auto chunk = [&](std::uint64_t per_item, const View& batch) {
        auto held = device.allocate(per_item * batch.size());
        return std::vector<int>(batch.begin(), batch.end());
    };
    auto small_chunk = [&](const View& batch) { return chunk(10_MiB, batch); };   // 100 MiB
    auto large_chunk = [&](const View& batch) { return chunk(410_MiB, batch); };  // ~4 GiB
    for (int round = 0; round < 4; ++round) {
        vramguard_test::Board board;
        const bool started_beside = round % 2 == 0;
        std::future<std::vector<int>> first, second;
        if (started_beside) {
            first = std::async(std::launch::async, [&] {
                return guard.encode(large, items, [&](const View& batch) {
                    board.mark("large inside");
                    board.wait_for("small inside");
                    return large_chunk(batch);
                });
            });
            ASSERT_TRUE(board.wait_for("large inside"));
            second = std::async(std::launch::async, [&] {
                return guard.encode(small, items, [&](const View& batch) {
                    auto held = device.allocate(10_MiB * batch.size());
                    board.mark("small inside");
                    board.wait_for("large returned");
                    return std::vector<int>(batch.begin(), batch.end());
                });
            });
            EXPECT_EQ(first.get(), items);
            board.mark("large returned");
        } else {
            first = std::async(std::launch::async, [&] {
                return guard.encode(small, items, [&](const View& batch) {
                    auto held = device.allocate(10_MiB * batch.size());
                    board.mark("small inside");
                    board.wait_for("large returned");
                    return std::vector<int>(batch.begin(), batch.end());
                });
            });
            ASSERT_TRUE(board.wait_for("small inside"));
            second = std::async(std::launch::async,
                                [&] { return guard.encode(large, items, large_chunk); });
            EXPECT_EQ(second.get(), items);
            board.mark("large returned");
            second = std::move(first);
        }
        EXPECT_EQ(second.get(), items) << "round " << round;
        EXPECT_EQ(guard.encode(small, items, small_chunk), items);  // alone: measured
        EXPECT_EQ(guard.encode(large, items, large_chunk), items);
    }
    EXPECT_EQ(guard.stats().ooms, 0u);
    const policy::CostModel small_model = guard.cost_model(small);
    const policy::CostModel large_model = guard.cost_model(large);
    ASSERT_TRUE(small_model.known());
    ASSERT_TRUE(large_model.known());
    EXPECT_EQ(small_model.samples, 4u) << "only the chunks that ran alone";
    EXPECT_EQ(large_model.samples, 4u);
    EXPECT_NEAR(small_model.bytes_per_unit, static_cast<double>(10_MiB), 0.05 * 10_MiB);
    EXPECT_NEAR(small_model.costliest_unit, static_cast<double>(10_MiB), 0.05 * 10_MiB);
    EXPECT_NEAR(large_model.bytes_per_unit, static_cast<double>(410_MiB), 0.05 * 410_MiB);
    EXPECT_NEAR(large_model.costliest_unit, static_cast<double>(410_MiB), 0.05 * 410_MiB);
    EXPECT_LE(guard.profiles().get(small).peak_bytes_per_item, 10_MiB + 10_MiB / 20);
}

// A wrong reading (another process's allocation taken for ours) is in the profile; after a window
// of newer measured chunks it is gone, from the model and from the profile on disk.
TEST_F(Learner, AWrongPeakAgesOutOfTheProfileAfterTheWindow) {
    vramguard_test::TempDir dir;
    options.persist = true;
    options.profile_dir = dir.path();
    const Key key = Key::of("aged");
    {
        ProfileCache poisoned(dir.path(), true, nullptr);
        poisoned.record_peak(key, 40_GiB, 10);  // 4 GiB "per item": wrong
    }
    SimulatedDevice device(16_GiB);
    Guard<SimulatedDevice> guard(device, options);
    const auto items = iota_items(10);
    EXPECT_GE(guard.cost_model(key).costliest_unit, static_cast<double>(4_GiB));
    // Measured: the first half window every chunk, then one chunk in measure_every.
    const int calls = static_cast<int>(policy::cost_window * policy::measure_every);
    for (int call = 0; call < calls; ++call) {
        LinearEncoder encoder{device, 0, 100_MiB, {}};
        ASSERT_EQ(guard.encode(key, items, std::ref(encoder)), items);
    }
    EXPECT_NEAR(guard.cost_model(key).costliest_unit, static_cast<double>(100_MiB), 1_MiB);
    guard.flush();  // written behind: now
    ProfileCache reread(dir.path(), true, nullptr);
    const Profile profile = reread.get(key);
    EXPECT_EQ(profile.item_samples.size(), profile_window);
    EXPECT_EQ(profile.peak_bytes_per_item, 100_MiB);
    EXPECT_LE(profile.peak_bytes, 1_GiB);
}

// Single items take turns through the device's semaphore only once OOMs taught that one item is
// all that fits. A plan of one item from the model alone (a costly key, little free) runs beside
// the guard's other chunks: here another call's chunk holds the device until this call is done,
// and waiting for a turn it holds would never end.
TEST_F(Learner, AModelPlanOfOneItemDoesNotWaitForTheSingleItemTurn) {
    SimulatedDevice device(10_GiB);
    options.clock = system_clock();
    options.sleep = system_sleep();
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("one-at-a-time");
    LinearEncoder warmup{device, 0, 6_GiB, {}};
    ASSERT_EQ(guard.encode(key, iota_items(1), std::ref(warmup)), iota_items(1));
    ASSERT_EQ(guard.stats().ooms, 0u);  // learned: 6 GiB an item, so one fits at a time

    std::promise<void> b_done;
    std::shared_future<void> b_finished = b_done.get_future().share();
    std::atomic<bool> e_inside{false};
    std::thread e([&] {
        guard.encode(key, iota_items(1), [&](const View& batch) {
            auto held = device.allocate(2_GiB);
            e_inside = true;
            b_finished.wait_for(std::chrono::seconds(10));  // held until B is answered
            return std::vector<int>(batch.begin(), batch.end());
        });
    });
    while (!e_inside) std::this_thread::yield();
    auto b = std::async(std::launch::async, [&] {
        return guard.encode(key, iota_items(1), [&](const View& batch) {
            auto held = device.allocate(2_GiB);
            return std::vector<int>(batch.begin(), batch.end());
        });
    });
    const bool answered = b.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
    b_done.set_value();
    e.join();
    ASSERT_TRUE(answered) << "B waited for a turn held by a chunk that waits for B";
    EXPECT_EQ(b.get(), iota_items(1));
    EXPECT_EQ(guard.stats().single_item_calls, 0u);
}

// A probe that measures no peaks (NullProbe-like): the OOM-learned ceiling with its growth probes
// still works, and the model stays unknown.
TEST_F(Learner, WithoutPeaksTheCeilingLearnedFromOomsStillLimitsBatches) {
    SimulatedDevice device(10_GiB);
    vramguard_test::ForgetfulProbe blind(device);  // no reset_peak/peak_bytes
    struct Releasing {
        SimulatedDevice& device;
        MemoryInfo memory() const { return device.memory(); }
        void release_cached() { device.release_cached(); }
    } probe{device};
    Guard<Releasing> guard(probe, options);
    const Key key = Key::of("blind");
    const auto items = iota_items(64);
    LinearEncoder first{device, 0, 1_GiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(first)), items);
    EXPECT_FALSE(guard.cost_model(key).known());
    EXPECT_EQ(guard.learned_batch_ceiling(key), 10u);  // the OOM's numbers: 64 x 10 / 64
    LinearEncoder second{device, 0, 1_GiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(second)), items);
    EXPECT_EQ(second.sizes.front(), 10u);
    (void)blind;
}

}  // namespace
