// SPDX-License-Identifier: MIT
// vramguard::Batcher (issue 23): callers' items coalesced into batches planned by the guard; each
// caller gets its own results in its order; failures go only to the calls they belong to; bounded
// queue, deadlines, destruction. submit() queues without running, which makes coalescing
// deterministic here: the first get() leads one gathering of everything queued.
#include <vramguard/batcher.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

Options quiet_options() {
    Options options;
    options.persist = false;
    options.log = nullptr;
    options.poll_interval = std::chrono::milliseconds(1);
    options.item_retry_delay = std::chrono::milliseconds(1);
    return options;
}

// Items are token counts; a batch allocates 1 MiB per padded token and records what it saw.
struct Recorder {
    explicit Recorder(SimulatedDevice& on) : device(on) {}
    SimulatedDevice& device;
    std::mutex mutex;
    std::vector<std::vector<int>> batches;
    std::vector<int> poison;  // items that run out of memory even alone

    template <class View>
    std::vector<int> run(const View& view) {
        std::vector<int> seen(view.begin(), view.end());
        int longest = 0;
        for (int item : seen) longest = std::max(longest, item);
        for (int item : seen)
            if (std::find(poison.begin(), poison.end(), item) != poison.end())
                throw OutOfMemory("CUDA out of memory. Tried to allocate 20.00 GiB (poison)");
        auto activations =
            device.allocate(static_cast<std::uint64_t>(longest) * seen.size() * 1_MiB);
        std::lock_guard<std::mutex> lock(mutex);
        batches.push_back(seen);
        std::vector<int> results;
        for (int item : seen) results.push_back(item * 10);
        return results;
    }
};

auto tokens_of = [](int item) { return item; };

std::vector<int> times_ten(const std::vector<int>& items) {
    std::vector<int> out;
    for (int item : items) out.push_back(item * 10);
    return out;
}

TEST(Batcher, ALoneCallerGetsItsResultsInOrder) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    Recorder recorder(device);
    auto batcher = make_batcher<int>(
        guard, Key::of("lone"), [&](const auto& view) { return recorder.run(view); },
        padded(tokens_of));
    const std::vector<int> items = {5, 1, 9, 3};
    EXPECT_EQ(batcher.encode(items), times_ten(items));
    EXPECT_TRUE(batcher.encode({}).empty());
    const BatcherStats stats = batcher.stats();
    EXPECT_EQ(stats.calls, 1u);  // the empty call is answered without queueing
    EXPECT_EQ(stats.gatherings, 1u);
    EXPECT_EQ(stats.batched_items, 4u);
}

TEST(Batcher, EveryCounterIsEnumeratedOnce) {
    BatcherStats stats{1, 2, 3, 4, 5, 6, 7, 8, 9};
    std::uint64_t sum = 0, count = 0;
    for_each_counter(stats, [&](const char*, const char*, std::uint64_t value) {
        sum += value;
        ++count;
    });
    EXPECT_EQ(count * sizeof(std::uint64_t), sizeof(BatcherStats));
    EXPECT_EQ(sum, 45u);
}

TEST(Batcher, QueuedCallsFormOneGatheringGroupedByWeightEachInItsOrder) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    Recorder recorder(device);
    auto batcher = make_batcher<int>(
        guard, Key::of("grouped"), [&](const auto& view) { return recorder.run(view); },
        padded(tokens_of));
    const std::vector<int> a = {300, 2, 7}, b = {1, 500, 4};
    auto first = batcher.submit(a);
    auto second = batcher.submit(b);
    EXPECT_EQ(second.get(), times_ten(b));  // leads: runs both calls' items
    EXPECT_EQ(first.get(), times_ten(a));
    EXPECT_EQ(batcher.stats().gatherings, 1u);
    // The key learned nothing yet: one batch of all six, lightest first.
    ASSERT_EQ(recorder.batches.size(), 1u);
    EXPECT_EQ(recorder.batches[0], (std::vector<int>{1, 2, 4, 7, 300, 500}));
}

TEST(Batcher, AnItemThatFailsEvenAloneFailsOnlyItsOwnCall) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    Recorder recorder(device);
    recorder.poison = {13};
    auto batcher = make_batcher<int>(guard, Key::of("poison"),
                                     [&](const auto& view) { return recorder.run(view); });
    const std::vector<int> good = {1, 2, 3, 4}, bad = {5, 6, 13, 7};
    auto ok = batcher.submit(good);
    auto failing = batcher.submit(bad);
    try {
        failing.get();
        FAIL() << "the call with the poisoned item must fail";
    } catch (const OomExhausted& error) {
        ASSERT_TRUE(error.item_index().has_value());
        EXPECT_EQ(*error.item_index(), 2u);  // its index in this call
        EXPECT_GE(error.attempts(), 1u);     // as the guard counted them
        EXPECT_NE(std::string(error.what()).find("item 2 of this call"), std::string::npos);
        // Items before it that ran are not lost.
        EXPECT_EQ(error.finished_results<int>(), (std::vector<int>{50, 60}));
    }
    EXPECT_EQ(ok.get(), times_ten(good));
}

TEST(Batcher, ANonOomErrorReachesTheCallsInItsBatchUntouched) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    struct Broken : std::runtime_error {
        using std::runtime_error::runtime_error;
    };
    auto batcher = make_batcher<int>(guard, Key::of("broken"), [&](const auto& view) {
        for (int item : view)
            if (item < 0) throw Broken("negative item");
        return std::vector<int>(view.begin(), view.end());
    });
    auto a = batcher.submit({1, -1});
    auto b = batcher.submit({2, 3});
    EXPECT_THROW(a.get(), Broken);  // one batch held both calls: both get batch_fn's error
    EXPECT_THROW(b.get(), Broken);
    EXPECT_EQ(batcher.encode({4, 5}), (std::vector<int>{4, 5}));  // the batcher goes on
}

TEST(Batcher, AFullQueueRefusesWithRetryAfter) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    BatcherOptions options;
    options.max_queued_items = 3;
    auto batcher = make_batcher<int>(
        guard, Key::of("full"),
        [](const auto& view) { return std::vector<int>(view.begin(), view.end()); }, options);
    auto queued = batcher.submit({1, 2});
    try {
        batcher.submit({3, 4});
        FAIL() << "the queue holds 3 items at most";
    } catch (const Overloaded& error) {
        EXPECT_GE(error.retry_after().count(), 1);
    }
    EXPECT_EQ(queued.get(), (std::vector<int>{1, 2}));
    EXPECT_EQ(batcher.encode({5, 6, 7, 8}), (std::vector<int>{5, 6, 7, 8}));  // alone: queued
    EXPECT_EQ(batcher.stats().overloaded, 1u);
}

TEST(Batcher, ACallPastItsDeadlineIsRemovedBeforeItsItemsRun) {
    SimulatedDevice device(8_GiB);
    ManualClock clock;
    Options options = quiet_options();
    options.clock = clock.clock_fn();
    options.sleep = clock.sleep_fn();
    Guard<SimulatedDevice> guard(device, options);
    std::vector<int> ran;
    auto batcher = make_batcher<int>(guard, Key::of("deadline"), [&](const auto& view) {
        ran.insert(ran.end(), view.begin(), view.end());
        return std::vector<int>(view.begin(), view.end());
    });
    auto kept = batcher.submit({1, 2});
    EncodeOptions late;
    late.deadline = clock.now();  // already passed
    EXPECT_THROW(batcher.encode({7, 8}, late), DeadlinePassed);
    EXPECT_EQ(kept.get(), (std::vector<int>{1, 2}));
    EXPECT_EQ(ran, (std::vector<int>{1, 2}));  // 7 and 8 never ran
    EXPECT_EQ(batcher.stats().deadlines_passed, 1u);
}

TEST(Batcher, DestructionFailsQueuedCallsWithBatcherClosed) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    std::future<std::vector<int>> pending;
    {
        auto batcher = make_batcher<int>(guard, Key::of("closed"), [](const auto& view) {
            return std::vector<int>(view.begin(), view.end());
        });
        pending = batcher.submit({1, 2, 3});
    }
    EXPECT_THROW(pending.get(), BatcherClosed);
}

TEST(Batcher, ABadWeightIsTheCallersErrorBeforeAnythingIsQueued) {
    SimulatedDevice device(8_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    auto batcher = make_batcher<int>(
        guard, Key::of("weights"),
        [](const auto& view) { return std::vector<int>(view.begin(), view.end()); },
        [](int item) { return item; });
    EXPECT_THROW(batcher.encode({1, -2}), std::invalid_argument);
    EXPECT_EQ(batcher.stats().calls, 0u);
    EXPECT_EQ(batcher.encode({1, 2}), (std::vector<int>{1, 2}));
}

// 16 threads, random deadlines (some passed already, some generous), injected OOMs, one shared
// batcher: every call either gets exactly its own results in order or one of the documented
// errors; nothing hangs; under the sanitizers in CI.
TEST(BatcherStress, SixteenThreadsDeadlinesAndInjectedOoms) {
    SimulatedDevice device(4_GiB);
    Guard<SimulatedDevice> guard(device, quiet_options());
    std::atomic<int> injected{0};
    auto batcher = make_batcher<int>(
        guard, Key::of("stress"),
        [&](const auto& view) {
            if (injected.fetch_add(1) % 7 == 3) device.fail_next_allocations(1);
            auto activations = device.allocate(view.size() * 16_MiB);
            return std::vector<int>(view.begin(), view.end());
        },
        [](int) { return 1; });
    std::atomic<int> answered{0}, refused{0}, wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 16; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937 random(static_cast<unsigned>(t));
            for (int c = 0; c < 20; ++c) {
                std::vector<int> items(1 + random() % 40);
                for (std::size_t i = 0; i < items.size(); ++i)
                    items[i] = t * 100000 + c * 100 + static_cast<int>(i);
                EncodeOptions call;
                if (random() % 4 == 0) call.deadline = guard.options().clock();
                try {
                    if (batcher.encode(items, call) != items) ++wrong;
                    ++answered;
                } catch (const DeadlinePassed&) {
                    ++refused;
                } catch (const OomExhausted&) {
                    ++refused;
                }
            }
        });
    }
    for (auto& thread : threads) thread.join();
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(answered.load() + refused.load(), 16 * 20);
    EXPECT_GT(answered.load(), 0);
    EXPECT_EQ(device.live_allocations(), 0u);
}

}  // namespace
