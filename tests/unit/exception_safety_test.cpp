// SPDX-License-Identifier: MIT
// The exception-safety guarantees of docs/robustness.md, tested: whatever a callable throws, the
// guard releases what it held (the device's single-item semaphore, host-wide reservations and
// locks, its measurement and in-flight counts), keeps its counters consistent, and stays usable.
// Injected time only.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"
#include "temp_dir.hpp"

#include <atomic>
#include <functional>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::CapturedLog;
using vramguard_test::TempDir;
using vramguard_test::test_options;

namespace {

using View = BatchView<std::vector<int>::const_iterator>;

std::vector<int> sequence(int n, int from = 0) {
    std::vector<int> items(static_cast<std::size_t>(n));
    std::iota(items.begin(), items.end(), from);
    return items;
}

using vramguard_test::CountingCoordinator;

// Every OOM is accounted for exactly once: halved, retried, or given up on.
void expect_consistent(const Stats& stats, std::uint64_t exhausted) {
    EXPECT_EQ(stats.ooms, stats.halvings + stats.retries + exhausted)
        << "ooms " << stats.ooms << " halvings " << stats.halvings << " retries " << stats.retries;
}

class ExceptionSafety : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    CapturedLog log;
    Options options = test_options(clock, log);
    Key key = Key::of("exception-safety");
    std::shared_ptr<CountingCoordinator> coordinator = std::make_shared<CountingCoordinator>();

    // The semaphore the guard uses for single items (shared per device in this process).
    std::shared_ptr<Semaphore> device_semaphore() {
        return shared_device_semaphore(
            detail::device_identity(device),
            static_cast<std::ptrdiff_t>(options.single_item_concurrency));
    }
    // True when every permit is free: take them all without waiting, then give them back.
    bool semaphore_fully_released() {
        auto semaphore = device_semaphore();
        std::size_t taken = 0;
        while (taken < options.single_item_concurrency && semaphore->try_acquire()) ++taken;
        for (std::size_t i = 0; i < taken; ++i) semaphore->release();
        return taken == options.single_item_concurrency;
    }
    // Drives the key's learned limit down to one item, and keeps the device squeezed (1.5 GiB
    // free), so that it stays one: the guard grows batches back as soon as memory returns.
    void learn_single_items(Guard<SimulatedDevice>& guard) {
        device.set_external_usage(8_GiB + 512_MiB);
        guard.encode(key, sequence(8), [&](const View& b) {
            std::vector<SimulatedDevice::Allocation> held;
            for (std::size_t i = 0; i < b.size(); ++i) held.push_back(device.allocate(1_GiB));
            return std::vector<int>(b.begin(), b.end());
        });
        device.release_cached();
        ASSERT_EQ(guard.learned_batch_ceiling(key), 1u);
    }
};

// ---- load: strong guarantee for the guard's learned state ----------------------------------

TEST_F(ExceptionSafety, LoadNonOomThrowReleasesTheReservationAndTheMeasurement) {
    options.coordinator = coordinator;
    Guard<SimulatedDevice> guard(device, options);
    EXPECT_THROW(guard.load(key,
                            [&]() -> int {
                                auto partial = device.allocate(3_GiB);
                                throw std::runtime_error("bad checkpoint");
                            }),
                 std::runtime_error);
    EXPECT_EQ(coordinator->live_reservations.load(), 0);
    EXPECT_EQ(guard.profiles().find(key), std::nullopt);  // a failed load teaches nothing
    const Stats after_throw = guard.stats();
    EXPECT_EQ(after_throw.calls, 1u);
    EXPECT_EQ(after_throw.ooms, 0u);
    // The measurement slot was given back: the next load is measured again.
    device.release_cached();
    guard.load(key, [&] { auto weights = device.allocate(1_GiB); });
    EXPECT_EQ(guard.profiles().get(key).peak_bytes, 1_GiB);
    EXPECT_EQ(coordinator->live_reservations.load(), 0);
    EXPECT_EQ(device.live_allocations(), 0u);
}

TEST_F(ExceptionSafety, LoadOomExhaustedReleasesEveryReservation) {
    options.coordinator = coordinator;
    Guard<SimulatedDevice> guard(device, options);
    device.fail_next_allocations(1000);
    EXPECT_THROW(guard.load(key, 1_GiB, [&] { return device.allocate(1_GiB); }), OomExhausted);
    device.fail_next_allocations(0);
    EXPECT_EQ(coordinator->reservations.load(), static_cast<int>(options.load_attempts));
    EXPECT_EQ(coordinator->live_reservations.load(), 0);
    expect_consistent(guard.stats(), 1);
    auto model = guard.load(key, 1_GiB, [&] { return device.allocate(1_GiB); });
    EXPECT_EQ(model.bytes(), 1_GiB);
}

// ---- encode: basic guarantee (what was learned stays learned), nothing held ----------------

TEST_F(ExceptionSafety, EncodeThrowOnTheSingleItemPathReleasesTheSemaphoreAndTheHostLock) {
    options.coordinator = coordinator;
    Guard<SimulatedDevice> guard(device, options);
    learn_single_items(guard);
    ASSERT_TRUE(semaphore_fully_released());
    const int locks_before = coordinator->single_item_locks.load();
    int calls = 0;
    EXPECT_THROW(guard.encode(key, sequence(10),
                              [&](const View& b) {
                                  if (++calls == 4)
                                      throw std::runtime_error("tokenizer failed on item 3");
                                  return std::vector<int>(b.begin(), b.end());
                              }),
                 std::runtime_error);
    EXPECT_EQ(calls, 4);
    EXPECT_GT(coordinator->single_item_locks.load(), locks_before);
    EXPECT_EQ(coordinator->live_locks.load(), 0);
    EXPECT_EQ(coordinator->live_reservations.load(), 0);
    EXPECT_TRUE(semaphore_fully_released()) << "the single-item permit leaked";
    // Another thread gets through the single-item path (a leaked permit would deadlock it).
    std::vector<int> result;
    std::thread other([&] {
        result = guard.encode(key, sequence(5),
                              [](const View& b) { return std::vector<int>(b.begin(), b.end()); });
    });
    other.join();
    EXPECT_EQ(result, sequence(5));
    EXPECT_EQ(guard.learned_batch_ceiling(key), 1u);
}

TEST_F(ExceptionSafety, EncodeThrowAfterHalvingKeepsWhatWasLearnedAndTheCountersAgree) {
    Guard<SimulatedDevice> guard(device, options);
    int chunk = 0;
    EXPECT_THROW(guard.encode(key, sequence(64),
                              [&](const View& b) {
                                  ++chunk;
                                  if (chunk <= 2)
                                      device.fail_next_allocations(1);  // 64 -> 32 -> 16
                                  auto activations = device.allocate(1_MiB * b.size());
                                  if (chunk == 4) throw std::logic_error("bug in the model code");
                                  return std::vector<int>(b.begin(), b.end());
                              }),
                 std::logic_error);
    const Stats stats = guard.stats();
    EXPECT_EQ(stats.ooms, 2u);
    EXPECT_EQ(stats.halvings, 2u);
    expect_consistent(stats, 0);
    EXPECT_EQ(guard.learned_batch_ceiling(key), 16u);  // learned before the throw: kept
    EXPECT_EQ(device.live_allocations(), 0u);          // the chunk's activations were freed
    EXPECT_EQ(guard.encode(key, sequence(40),
                           [](const View& b) { return std::vector<int>(b.begin(), b.end()); }),
              sequence(40));
}

TEST_F(ExceptionSafety, AThrowingWeightFunctionChangesNothing) {
    Guard<SimulatedDevice> guard(device, options);
    int batch_calls = 0;
    EXPECT_THROW(guard.encode(
                     key, sequence(10),
                     [&](const View& b) {
                         ++batch_calls;
                         return std::vector<int>(b.begin(), b.end());
                     },
                     [](int item) -> std::uint64_t {
                         if (item == 6) throw std::domain_error("no tokens");
                         return 1;
                     }),
                 std::domain_error);
    EXPECT_EQ(batch_calls, 0);
    EXPECT_EQ(guard.stats().calls, 0u);  // strong: as if never called
    EXPECT_EQ(guard.learned_weight_budget(key), 0u);
}

TEST_F(ExceptionSafety, AWrongResultCountLeavesTheGuardUsable) {
    options.coordinator = coordinator;
    Guard<SimulatedDevice> guard(device, options);
    learn_single_items(guard);
    EXPECT_THROW(guard.encode(key, sequence(3), [](const View&) { return std::vector<int>{}; }),
                 std::length_error);
    EXPECT_TRUE(semaphore_fully_released());
    EXPECT_EQ(coordinator->live_locks.load(), 0);
    EXPECT_EQ(guard.encode(key, sequence(3),
                           [](const View& b) { return std::vector<int>(b.begin(), b.end()); }),
              sequence(3));
}

TEST_F(ExceptionSafety, OomExhaustedKeepsFinishedResultsAndReleasesEverything) {
    options.coordinator = coordinator;
    Guard<SimulatedDevice> guard(device, options);
    learn_single_items(guard);
    // Item 4 can never fit, even alone.
    try {
        guard.encode(key, sequence(6), [&](const View& b) {
            auto activations = device.allocate(b.offset() == 4 ? 20_GiB : 1_MiB);
            return std::vector<int>(b.begin(), b.end());
        });
        FAIL();
    } catch (const OomExhausted& e) {
        EXPECT_EQ(e.item_index(), std::optional<std::size_t>(4));
        EXPECT_EQ(e.finished_results<int>(), sequence(4));
    }
    EXPECT_TRUE(semaphore_fully_released());
    EXPECT_EQ(coordinator->live_locks.load(), 0);
    EXPECT_EQ(device.live_allocations(), 0u);
    expect_consistent(guard.stats(), 1);
}

// ---- threads: one caller's exception is its own ----------------------------------------------

TEST_F(ExceptionSafety, ACallerThatThrowsDoesNotDisturbConcurrentCallers) {
    options.coordinator = coordinator;
    Guard<SimulatedDevice> guard(device, options);
    constexpr int threads = 4, calls = 20;
    std::atomic<int> wrong{0}, thrown{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            for (int c = 0; c < calls; ++c) {
                const auto items = sequence(30, (t * calls + c) * 30);
                const bool poisoned = (c + t) % 3 == 0;
                try {
                    auto out = guard.encode(key, items, [&](const View& b) {
                        auto activations = device.allocate(256_MiB * b.size());
                        if (poisoned && b.offset() + b.size() == items.size())
                            throw std::runtime_error("poisoned");
                        return std::vector<int>(b.begin(), b.end());
                    });
                    if (poisoned || out != items) ++wrong;
                } catch (const std::runtime_error& e) {
                    if (!poisoned || std::string(e.what()) != "poisoned") ++wrong;
                    ++thrown;
                } catch (...) {
                    ++wrong;
                }
            }
        });
    }
    for (auto& worker : workers) worker.join();
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_GT(thrown.load(), 0);
    EXPECT_TRUE(semaphore_fully_released());
    EXPECT_EQ(coordinator->live_locks.load(), 0);
    EXPECT_EQ(coordinator->live_reservations.load(), 0);
    EXPECT_EQ(device.live_allocations(), 0u);
    EXPECT_EQ(guard.stats().calls, static_cast<std::uint64_t>(threads * calls));
    expect_consistent(guard.stats(), 0);
}

// ---- ProfileCache: never throws over the disk, keeps what it learned ------------------------

TEST(ExceptionSafetyProfileCache, ADirectoryRemovedUnderneathDegradesWithoutLosingRecords) {
    TempDir temp;
    const std::string dir = temp.file("profiles");
    CapturedLog log;
    ProfileCache cache(dir, true, log.sink());
    ASSERT_TRUE(cache.persistent());
    TempDir::remove_tree(dir);
    const Key key = Key::of("removed");
    EXPECT_NO_THROW(cache.record_peak(key, 3_GiB, 3));
    EXPECT_NO_THROW(cache.record_batch_ceiling(key, 12));
    EXPECT_FALSE(cache.persistent());
    const Profile kept = cache.get(key);
    EXPECT_EQ(kept.peak_bytes, 3_GiB);
    EXPECT_EQ(kept.peak_bytes_per_item, 1_GiB);
    EXPECT_EQ(kept.batch_ceiling, 12u);
    ASSERT_EQ(kept.item_samples.size(), 1u);
    EXPECT_EQ(kept.item_samples[0].size, 3u);
    EXPECT_EQ(log.count(Level::warn), 1u);
}

TEST(ExceptionSafetyKey, ARejectedKeyLeavesNothingBehind) {
    // Key::of validates before it builds anything: the strong guarantee, trivially.
    EXPECT_THROW(Key::of("m", {{"a", "1"}, {"a", "2"}}), std::invalid_argument);
    EXPECT_EQ(Key::of("m", {{"a", "1"}}).label(), "m{a=1}");
}

}  // namespace
