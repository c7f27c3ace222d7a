// SPDX-License-Identifier: MIT
#include <vramguard/semaphore.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

using namespace vramguard;

namespace {

TEST(Semaphore, CountsPermitsAndTryAcquireNeverBlocks) {
    Semaphore semaphore(2);
    EXPECT_TRUE(semaphore.try_acquire());
    EXPECT_TRUE(semaphore.try_acquire());
    EXPECT_FALSE(semaphore.try_acquire());
    EXPECT_FALSE(semaphore.try_acquire_for(std::chrono::milliseconds(0)));
    semaphore.release();
    EXPECT_TRUE(semaphore.try_acquire());
    semaphore.release();
    semaphore.release();
}

TEST(Semaphore, RejectsANonPositiveCount) {
    EXPECT_THROW(Semaphore(0), std::invalid_argument);
    EXPECT_THROW(Semaphore(-3), std::invalid_argument);
}

TEST(Semaphore, PermitReleasesOnScopeExitAndMoves) {
    Semaphore semaphore(1);
    {
        Semaphore::Permit permit(semaphore);
        EXPECT_TRUE(permit);
        EXPECT_FALSE(semaphore.try_acquire());
        Semaphore::Permit moved(std::move(permit));
        EXPECT_FALSE(permit);
        EXPECT_FALSE(semaphore.try_acquire());
    }
    EXPECT_TRUE(semaphore.try_acquire());
    semaphore.release();
}

TEST(Semaphore, NeverMoreHoldersThanPermitsUnderContention) {
    Semaphore semaphore(3);
    std::atomic<int> inside{0}, most{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 500; ++i) {
                Semaphore::Permit permit(semaphore);
                const int now = ++inside;
                int seen = most.load();
                while (now > seen && !most.compare_exchange_weak(seen, now)) {
                }
                std::this_thread::yield();
                --inside;
            }
        });
    }
    for (auto& thread : threads) thread.join();
    EXPECT_LE(most.load(), 3);
    EXPECT_GE(most.load(), 1);
}

TEST(SharedDeviceSemaphore, OnePerDeviceWhileAnyHolderLives) {
    auto a = shared_device_semaphore("test-device-a", 1);
    auto b = shared_device_semaphore("test-device-a", 5);  // the first count wins
    auto other = shared_device_semaphore("test-device-b", 1);
    EXPECT_EQ(a.get(), b.get());
    EXPECT_NE(a.get(), other.get());
    EXPECT_TRUE(a->try_acquire());
    EXPECT_FALSE(b->try_acquire());
    a->release();
}

}  // namespace
