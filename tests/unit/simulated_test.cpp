// SPDX-License-Identifier: MIT
#include <vramguard/simulated.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using namespace vramguard::literals;
using vramguard::MemoryInfo;
using vramguard::OutOfMemory;
using vramguard::SimulatedDevice;

// Runs `fn`, which must throw OutOfMemory, and returns the exception.
template <class F>
std::exception_ptr expect_oom(F&& fn) {
    try {
        fn();
    } catch (const OutOfMemory&) {
        return std::current_exception();
    }
    ADD_FAILURE() << "expected OutOfMemory";
    return nullptr;
}

TEST(SimulatedDevice, RejectsZeroTotal) { EXPECT_THROW(SimulatedDevice(0), std::invalid_argument); }

TEST(SimulatedDevice, BasicAccounting) {
    SimulatedDevice device(8_GiB);
    EXPECT_EQ(device.total_bytes(), 8_GiB);
    EXPECT_EQ(device.memory(), (MemoryInfo{8_GiB, 8_GiB}));
    EXPECT_EQ(device.driver_memory(), (MemoryInfo{8_GiB, 8_GiB}));
    {
        auto a = device.allocate(1_GiB);
        auto b = device.allocate(2_GiB);
        EXPECT_TRUE(a);
        EXPECT_EQ(a.bytes(), 1_GiB);
        EXPECT_EQ(a.block_bytes(), 1_GiB);
        EXPECT_EQ(device.allocated_bytes(), 3_GiB);
        EXPECT_EQ(device.cached_bytes(), 0u);
        EXPECT_EQ(device.reserved_bytes(), 3_GiB);
        EXPECT_EQ(device.memory().free_bytes, 5_GiB);
        EXPECT_EQ(device.driver_memory().free_bytes, 5_GiB);
        EXPECT_EQ(device.allocation_count(), 2u);
        EXPECT_EQ(device.live_allocations(), 2u);
    }
    EXPECT_EQ(device.allocated_bytes(), 0u);
    EXPECT_EQ(device.cached_bytes(), 3_GiB);
    EXPECT_EQ(device.live_allocations(), 0u);
}

TEST(SimulatedDevice, AllocationIsMoveOnlyAndReleasesOnce) {
    SimulatedDevice device(1_GiB);
    auto a = device.allocate(100_MiB);
    SimulatedDevice::Allocation b = std::move(a);
    EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): moved-from is documented as empty
    EXPECT_TRUE(b);
    EXPECT_EQ(a.bytes(), 0u);
    a.release();  // releasing an empty allocation does nothing
    EXPECT_EQ(device.allocated_bytes(), 100_MiB);

    SimulatedDevice::Allocation c = device.allocate(200_MiB);
    c = std::move(b);  // c's own block goes back first
    EXPECT_EQ(device.allocated_bytes(), 100_MiB);
    EXPECT_EQ(device.cached_bytes(), 200_MiB);
    c.release();
    c.release();
    EXPECT_FALSE(c);
    EXPECT_EQ(device.allocated_bytes(), 0u);
    EXPECT_EQ(device.cached_bytes(), 300_MiB);
}

TEST(SimulatedDevice, CachedBytesAreFreeForThisProcessButUsedForTheDriver) {
    SimulatedDevice device(8_GiB);
    device.allocate(3_GiB).release();
    EXPECT_EQ(device.cached_bytes(), 3_GiB);
    EXPECT_EQ(device.memory().free_bytes, 8_GiB);
    EXPECT_EQ(device.driver_memory().free_bytes, 5_GiB);

    // A request that fits the cached block is cut from it (the rest stays cached): reserved does
    // not grow, and free memory drops by the request only.
    auto reused = device.allocate(2_GiB);
    EXPECT_EQ(reused.bytes(), 2_GiB);
    EXPECT_EQ(reused.block_bytes(), 2_GiB);
    EXPECT_EQ(device.allocated_bytes(), 2_GiB);
    EXPECT_EQ(device.cached_bytes(), 1_GiB);
    EXPECT_EQ(device.reserved_bytes(), 3_GiB);
    EXPECT_EQ(device.memory().free_bytes, 6_GiB);

    reused.release();
    device.release_cached();
    EXPECT_EQ(device.release_cached_calls(), 1u);
    EXPECT_EQ(device.cached_bytes(), 0u);
    EXPECT_EQ(device.driver_memory().free_bytes, 8_GiB);
}

TEST(SimulatedDevice, BestFitPicksTheSmallestCachedBlockThatFits) {
    SimulatedDevice device(8_GiB);
    {
        auto a = device.allocate(1_GiB);
        auto b = device.allocate(512_MiB);
        auto c = device.allocate(2_GiB);
    }
    auto x = device.allocate(600_MiB);  // cut from the 1 GiB block, not the 2 GiB one
    EXPECT_EQ(x.block_bytes(), 600_MiB);
    auto y = device.allocate(100_MiB);  // cut from the 512 MiB block, the smallest that fits
    EXPECT_EQ(y.block_bytes(), 100_MiB);
    EXPECT_EQ(device.cached_bytes(), 2_GiB + 424_MiB + 412_MiB);
    auto z = device.allocate(2_GiB);  // the 2 GiB block was left whole for it
    EXPECT_EQ(device.reserved_bytes(), 1_GiB + 512_MiB + 2_GiB);
}

TEST(SimulatedDevice, StrictFragmentedCacheFailsABigAllocationUntilReleased) {
    SimulatedDevice device(8_GiB);
    device.set_flush_cache_before_oom(false);  // strict: no allocator-side flush
    {
        std::vector<SimulatedDevice::Allocation> small;
        for (int i = 0; i < 64; ++i) small.push_back(device.allocate(100_MiB));
    }
    EXPECT_EQ(device.cached_bytes(), 6400_MiB);
    // This process's view says 4 GiB fits...
    EXPECT_GE(device.memory().free_bytes, 4_GiB);
    // ...but no cached block is big enough and the driver has only 1.75 GiB left.
    const auto error = expect_oom([&] { device.allocate(4_GiB); });
    EXPECT_EQ(device.oom_count(), 1u);
    EXPECT_EQ(device.cached_bytes(), 6400_MiB);         // the OOM did not flush the cache by itself
    EXPECT_THROW(device.allocate(4_GiB), OutOfMemory);  // nor does trying again
    device.release_cached();
    auto big = device.allocate(4_GiB);
    EXPECT_EQ(device.allocated_bytes(), 4_GiB);
    (void)error;
}

TEST(SimulatedDevice, OomCarriesItsReportAndAParseableMessage) {
    SimulatedDevice device(8_GiB);
    device.set_flush_cache_before_oom(false);  // strict, so that the cache stays to be reported
    auto held = device.allocate(4_GiB);
    {
        // 3 GiB cached in blocks too small for the request, 1 GiB free for the driver.
        auto a = device.allocate(1_GiB);
        auto b = device.allocate(1_GiB);
        auto c = device.allocate(1_GiB);
    }
    const auto error = expect_oom([&] { device.allocate(2_GiB); });
    ASSERT_TRUE(error);
    EXPECT_TRUE(vramguard::is_oom(error));
    EXPECT_EQ(vramguard::classify_oom(error), vramguard::OomKind::allocator);
    try {
        std::rethrow_exception(error);
    } catch (const OutOfMemory& oom) {
        EXPECT_TRUE(vramguard::is_oom(std::current_exception()));
        EXPECT_EQ(oom.kind(), vramguard::OomKind::allocator);
        ASSERT_TRUE(oom.report());
        EXPECT_EQ(oom.report()->requested_bytes, 2_GiB);
        EXPECT_EQ(oom.report()->free_bytes, 1_GiB);
        EXPECT_EQ(oom.report()->total_bytes, 8_GiB);
        EXPECT_EQ(std::string(oom.what()),
                  "simulated out of memory. Tried to allocate 2.00 GiB. Device has a total "
                  "capacity of 8.00 GiB of which 1.00 GiB is free. 3.00 GiB is reserved by this "
                  "process but unallocated.");
        const auto parsed = vramguard::parse_oom_message(oom.what());
        ASSERT_TRUE(parsed);
        EXPECT_EQ(parsed->requested_bytes, 2_GiB);
        EXPECT_EQ(parsed->free_bytes, 1_GiB);
        EXPECT_EQ(parsed->total_bytes, 8_GiB);
        // The message alone is recognised too, as a c10::Error carrying it would be.
        EXPECT_EQ(vramguard::classify_oom_message(oom.what()), vramguard::OomKind::allocator);
    }
}

TEST(SimulatedDevice, ExternalUsage) {
    SimulatedDevice device(8_GiB);
    device.set_external_usage(6_GiB);
    EXPECT_EQ(device.external_usage(), 6_GiB);
    EXPECT_EQ(device.memory().free_bytes, 2_GiB);
    EXPECT_EQ(device.driver_memory().free_bytes, 2_GiB);
    EXPECT_THROW(device.allocate(3_GiB), OutOfMemory);
    auto a = device.allocate(2_GiB);
    EXPECT_EQ(device.memory().free_bytes, 0u);

    // Another process may take more than is free: free clamps at 0 and allocations just fail.
    device.set_external_usage(7_GiB);
    EXPECT_EQ(device.memory().free_bytes, 0u);
    EXPECT_EQ(device.driver_memory().free_bytes, 0u);
    EXPECT_THROW(device.allocate(1), OutOfMemory);
    device.set_external_usage(std::numeric_limits<std::uint64_t>::max());
    EXPECT_EQ(device.memory().free_bytes, 0u);
    EXPECT_EQ(device.driver_memory().free_bytes, 0u);

    device.set_external_usage(0);
    EXPECT_EQ(device.memory().free_bytes, 6_GiB);
}

TEST(SimulatedDevice, PeakIsTheGrowthOfReservedOrAllocatedSinceReset) {
    SimulatedDevice device(8_GiB);
    {
        auto a = device.allocate(2_GiB);
        auto b = device.allocate(1_GiB);
    }
    EXPECT_EQ(device.peak_bytes(), 3_GiB);
    device.release_cached();
    EXPECT_EQ(device.peak_bytes(), 3_GiB);  // a peak is not lowered by freeing

    device.reset_peak();
    EXPECT_EQ(device.peak_bytes(), 0u);
    {
        auto a = device.allocate(1_GiB);
        a.release();                        // cached: reserved stays 1 GiB
        auto b = device.allocate(512_MiB);  // reuses the cached 1 GiB block
        EXPECT_EQ(device.peak_bytes(), 1_GiB);
        auto c = device.allocate(1_GiB);
        EXPECT_EQ(device.peak_bytes(), 2_GiB);
    }
    // After a reset the peak starts from what is reserved now (cached blocks included).
    device.reset_peak();
    EXPECT_EQ(device.peak_bytes(), 2_GiB);
    {
        // Work inside the cache moves no reserved byte; its allocated growth still counts, so a
        // guard measuring peak - baseline sees the 1 GiB it used.
        auto inside = device.allocate(1_GiB);
        EXPECT_EQ(device.reserved_bytes(), 2_GiB);
        EXPECT_EQ(device.peak_bytes() - 2_GiB, 1_GiB);
    }
    device.release_cached();
    device.reset_peak();
    EXPECT_EQ(device.peak_bytes(), 0u);
}

TEST(SimulatedDevice, FailNextAllocations) {
    SimulatedDevice device(8_GiB);
    device.fail_next_allocations(2);
    EXPECT_FALSE(device.allocate(0));  // an empty request neither fails nor uses up an injection
    const auto first = expect_oom([&] { device.allocate(1_MiB); });
    EXPECT_TRUE(vramguard::is_oom(first));
    EXPECT_THROW(device.allocate(1_MiB), OutOfMemory);
    auto ok = device.allocate(1_MiB);
    EXPECT_TRUE(ok);
    EXPECT_EQ(device.oom_count(), 2u);
    EXPECT_EQ(device.allocation_count(), 1u);
    EXPECT_EQ(device.allocated_bytes(), 1_MiB);

    device.fail_next_allocations(5);
    device.fail_next_allocations(0);  // cancels
    EXPECT_TRUE(device.allocate(1_MiB));
}

TEST(SimulatedDevice, ReportLagShowsTheOldStateUntilTheLagHasPassed) {
    using std::chrono::milliseconds;
    vramguard::ManualClock clock;
    SimulatedDevice device(8_GiB);
    auto held = device.allocate(4_GiB);
    device.release_cached();
    device.set_report_lag(milliseconds(500), clock.clock_fn());
    EXPECT_EQ(device.report_lag(), milliseconds(500));
    EXPECT_EQ(device.memory().free_bytes, 4_GiB);

    held.release();
    device.release_cached();
    // The books changed at once...
    EXPECT_EQ(device.allocated_bytes(), 0u);
    EXPECT_EQ(device.driver_memory().total_bytes, 8_GiB);
    // ...the reports did not.
    EXPECT_EQ(device.memory().free_bytes, 4_GiB);
    EXPECT_EQ(device.driver_memory().free_bytes, 4_GiB);
    clock.advance(milliseconds(499));
    EXPECT_EQ(device.memory().free_bytes, 4_GiB);
    clock.advance(milliseconds(1));
    EXPECT_EQ(device.memory().free_bytes, 8_GiB);
    EXPECT_EQ(device.driver_memory().free_bytes, 8_GiB);

    // Allocation is never lagged: the reading overstates free memory for a while, and a guard
    // that trusts it OOMs.
    auto a = device.allocate(6_GiB);
    clock.advance(milliseconds(100));
    EXPECT_EQ(device.memory().free_bytes, 8_GiB);
    EXPECT_THROW(device.allocate(6_GiB), OutOfMemory);
    clock.advance(milliseconds(400));
    EXPECT_EQ(device.memory().free_bytes, 2_GiB);

    // Each step shows in turn.
    a.release();  // t = 0: cached 6
    clock.advance(milliseconds(100));
    device.release_cached();  // t = 100: free
    clock.advance(milliseconds(100));
    device.set_external_usage(1_GiB);  // t = 200
    clock.advance(milliseconds(300));  // now 500
    EXPECT_EQ(device.memory().free_bytes, 8_GiB);
    EXPECT_EQ(device.driver_memory().free_bytes, 2_GiB);
    clock.advance(milliseconds(100));  // now 600
    EXPECT_EQ(device.driver_memory().free_bytes, 8_GiB);
    clock.advance(milliseconds(100));  // now 700
    EXPECT_EQ(device.memory().free_bytes, 7_GiB);

    device.set_report_lag(vramguard::Duration::zero(), nullptr);
    device.set_external_usage(0);
    EXPECT_EQ(device.memory().free_bytes, 8_GiB);
}

TEST(SimulatedDevice, ReportLagHistoryStaysBounded) {
    using std::chrono::milliseconds;
    vramguard::ManualClock clock;
    SimulatedDevice device(8_GiB);
    device.set_report_lag(milliseconds(10), clock.clock_fn());
    for (int i = 0; i < 50000; ++i) {
        device.allocate(1_MiB).release();
        clock.advance(std::chrono::microseconds(1));
    }
    // 10 ms of changes at one per microsecond: within the bound, and readings still work.
    clock.advance(milliseconds(10));
    EXPECT_EQ(device.memory().free_bytes, 8_GiB);
    EXPECT_EQ(device.driver_memory().free_bytes, 8_GiB - 1_MiB);
}

TEST(SimulatedDevice, ReportLagRejectsNonsense) {
    SimulatedDevice device(1_GiB);
    EXPECT_THROW(device.set_report_lag(std::chrono::milliseconds(-1), vramguard::system_clock()),
                 std::invalid_argument);
    EXPECT_THROW(device.set_report_lag(std::chrono::milliseconds(1), nullptr),
                 std::invalid_argument);
    EXPECT_EQ(device.report_lag(), vramguard::Duration::zero());
}

#if GTEST_HAS_DEATH_TEST && !defined(NDEBUG)
TEST(SimulatedDeviceDeathTest, AssertsWhenDestroyedBeforeItsAllocations) {
    EXPECT_DEATH(
        {
            auto device = std::make_unique<SimulatedDevice>(1_GiB);
            auto allocation = device->allocate(1_MiB);
            device.reset();
        },
        "destroyed before its allocations");
}
#endif

TEST(SimulatedDevice, ZeroAndAbsurdSizes) {
    SimulatedDevice device(1_GiB);
    auto empty = device.allocate(0);
    EXPECT_FALSE(empty);
    EXPECT_EQ(empty.bytes(), 0u);
    EXPECT_EQ(device.allocation_count(), 0u);
    EXPECT_EQ(device.allocated_bytes(), 0u);

    EXPECT_THROW(device.allocate(1_GiB + 1), OutOfMemory);
    const auto error =
        expect_oom([&] { device.allocate(std::numeric_limits<std::uint64_t>::max()); });
    EXPECT_TRUE(vramguard::is_oom(error));
    EXPECT_EQ(device.oom_count(), 2u);
    EXPECT_EQ(device.allocated_bytes(), 0u);

    auto whole = device.allocate(1_GiB);
    EXPECT_EQ(device.memory().free_bytes, 0u);
    EXPECT_THROW(device.allocate(1), OutOfMemory);

    SimulatedDevice huge(std::numeric_limits<std::uint64_t>::max());
    auto most = huge.allocate(std::numeric_limits<std::uint64_t>::max() - 1);
    huge.set_external_usage(std::numeric_limits<std::uint64_t>::max());
    EXPECT_EQ(huge.memory().free_bytes, 0u);
    EXPECT_EQ(huge.driver_memory().free_bytes, 0u);
}

TEST(SimulatedDevice, ConcurrentAllocationsKeepTheBooksBalanced) {
    SimulatedDevice device(1_GiB);
    device.set_external_usage(100_MiB);
    constexpr int threads = 8;
    constexpr int iterations = 20000;
    std::atomic<bool> balanced{true};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            std::uint64_t state = 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(t + 1);
            auto next = [&state] {  // xorshift: deterministic per thread
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                return state;
            };
            std::vector<SimulatedDevice::Allocation> held;
            for (int i = 0; i < iterations; ++i) {
                const std::uint64_t r = next();
                switch (r % 8) {
                    case 0: device.release_cached(); break;
                    case 1: {
                        const MemoryInfo info = device.memory();
                        if (info.total_bytes != 1_GiB || info.free_bytes > 924_MiB)
                            balanced = false;
                        break;
                    }
                    case 2:
                    case 3:
                        if (!held.empty()) {
                            held[(r >> 8) % held.size()] = std::move(held.back());
                            held.pop_back();
                        }
                        break;
                    default: try { held.push_back(device.allocate(1 + (r >> 16) % 16_MiB));
                        } catch (const OutOfMemory&) {
                            if (!held.empty()) held.pop_back();
                        }
                }
                if (held.size() > 16) held.erase(held.begin());
            }
        });
    }
    for (auto& worker : workers) worker.join();
    EXPECT_TRUE(balanced);
    EXPECT_EQ(device.allocated_bytes(), 0u);
    EXPECT_EQ(device.live_allocations(), 0u);
    EXPECT_EQ(device.cached_bytes() + device.driver_memory().free_bytes, 1_GiB - 100_MiB);
    EXPECT_EQ(device.memory().free_bytes, 1_GiB - 100_MiB);
    EXPECT_LE(device.peak_bytes(), 1_GiB - 100_MiB);
    device.release_cached();
    EXPECT_EQ(device.cached_bytes(), 0u);
    EXPECT_EQ(device.driver_memory().free_bytes, 1_GiB - 100_MiB);
}

TEST(SimulatedDevice, ConcurrentReadersWithReportLag) {
    SimulatedDevice device(1_GiB);
    device.set_report_lag(std::chrono::microseconds(50), vramguard::system_clock());
    std::atomic<bool> stop{false};
    std::thread reader([&] {
        while (!stop) {
            const MemoryInfo info = device.memory();
            EXPECT_LE(info.free_bytes, 1_GiB);
            (void)device.driver_memory();
        }
    });
    std::vector<std::thread> writers;
    for (int t = 0; t < 4; ++t) {
        writers.emplace_back([&] {
            for (int i = 0; i < 5000; ++i) {
                auto a = device.allocate(1_MiB);
                if (i % 100 == 0) device.release_cached();
            }
        });
    }
    for (auto& writer : writers) writer.join();
    stop = true;
    reader.join();
    EXPECT_EQ(device.allocated_bytes(), 0u);
}

}  // namespace

TEST(SimulatedDevice, PyTorchModeFlushesTheCacheBeforeRaising) {
    using namespace vramguard::literals;
    vramguard::SimulatedDevice strict(10_GiB), pytorch(10_GiB);  // PyTorch's way is the default
    strict.set_flush_cache_before_oom(false);
    for (vramguard::SimulatedDevice* device : {&strict, &pytorch}) {
        std::vector<vramguard::SimulatedDevice::Allocation> blocks;
        for (int i = 0; i < 32; ++i) blocks.push_back(device->allocate(256_MiB));
    }  // 8 GiB cached in small blocks: 2 GiB left for the driver
    EXPECT_THROW(strict.allocate(4_GiB), vramguard::OutOfMemory);
    const auto big = pytorch.allocate(4_GiB);
    EXPECT_EQ(big.bytes(), 4_GiB);
    EXPECT_EQ(pytorch.cached_bytes(), 0u);
    EXPECT_EQ(pytorch.release_cached_calls(), 0u);  // the allocator's own flush, not the caller's
    EXPECT_THROW(pytorch.allocate(11_GiB), vramguard::OutOfMemory);  // a real shortage still fails
}
