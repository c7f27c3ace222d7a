// SPDX-License-Identifier: MIT
// Many threads, one guard, the real clock, no injected faults: every item fits the device alone,
// so no call may end in InsufficientMemory or OomExhausted however the threads interleave (the
// guard's own batches in the way are not a reason to refuse or to give up), and every item comes
// back exactly once. CI runs it for a second; by hand, longer:
//   VRAMGUARD_CONCURRENCY_SECONDS=15 ./concurrency_test
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

using View = BatchView<std::vector<std::uint32_t>::const_iterator>;

double seconds_to_run() {
    const char* text = std::getenv("VRAMGUARD_CONCURRENCY_SECONDS");
    const double seconds = text ? std::atof(text) : 1.0;
    return seconds > 0 ? seconds : 1.0;
}

struct Tally {
    std::atomic<std::uint64_t> calls{0}, items{0}, insufficient{0}, exhausted{0}, wrong{0};
};

TEST(Concurrency, EightThreadsRealClockNoFaultsNeitherRefuseNorGiveUp) {
    SimulatedDevice device(10_GiB);
    Options options;
    options.persist = false;
    options.log = nullptr;
    options.poll_interval = std::chrono::milliseconds(1);  // real waits, kept short
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("concurrency");
    constexpr int threads = 8;
    const auto end = std::chrono::steady_clock::now() +
                     std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(seconds_to_run()));
    Tally tally;
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            std::mt19937 random(static_cast<unsigned>(1000 + t));
            std::uint32_t next_id = static_cast<std::uint32_t>(t) << 24;
            while (std::chrono::steady_clock::now() < end) {
                std::vector<std::uint32_t> ids(8 + random() % 57);
                std::iota(ids.begin(), ids.end(), next_id);
                next_id += static_cast<std::uint32_t>(ids.size());
                std::vector<std::uint32_t> seen;  // what this call's batches were given
                auto encoder = [&](const View& batch) {
                    auto activations = device.allocate(256_MiB * batch.size());  // 40 fit, 1 does
                    std::this_thread::yield();
                    seen.insert(seen.end(), batch.begin(), batch.end());
                    return std::vector<std::uint32_t>(batch.begin(), batch.end());
                };
                ++tally.calls;
                try {
                    if (guard.encode(key, ids, encoder) != ids || seen != ids) ++tally.wrong;
                    tally.items += ids.size();
                } catch (const InsufficientMemory&) {
                    ++tally.insufficient;
                } catch (const OomExhausted&) {
                    ++tally.exhausted;
                }
            }
        });
    }
    for (auto& worker : workers) worker.join();
    const Stats stats = guard.stats();
    std::printf(
        "concurrency: %d threads, %.1f s: %llu calls, %llu items, %llu OOMs, %llu "
        "single-item batches, %llu insufficient, %llu exhausted\n",
        threads, seconds_to_run(), static_cast<unsigned long long>(tally.calls.load()),
        static_cast<unsigned long long>(tally.items.load()),
        static_cast<unsigned long long>(stats.ooms),
        static_cast<unsigned long long>(stats.single_item_calls),
        static_cast<unsigned long long>(tally.insufficient.load()),
        static_cast<unsigned long long>(tally.exhausted.load()));
    EXPECT_GT(tally.calls.load(), 0u);
    EXPECT_EQ(tally.insufficient.load(), 0u);
    EXPECT_EQ(tally.exhausted.load(), 0u);
    EXPECT_EQ(tally.wrong.load(), 0u) << "an item lost, duplicated or out of order";
    EXPECT_EQ(device.live_allocations(), 0u);
}

}  // namespace
