// SPDX-License-Identifier: MIT
// Claims (issue 23): chunks of one guard planned at once count what the others planned and the
// reading does not show yet, so they do not plan for the same free bytes; and what other callers'
// memory does to a chunk is not read as evidence about the key's own cost. The unit part tests
// detail::Claims itself (turns in arrival order, waits that end with a claim); the rest runs many
// real threads on one guard and one key, as a server's request threads do.
#include <vramguard/detail/claims.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

TEST(Claims, APlanCountsWhatOthersClaimedUntilTheyEnd) {
    detail::Claims claims;
    detail::Claims::Claim first;
    {
        detail::Claims::Turn turn(claims, true);
        EXPECT_EQ(turn.available(10_GiB), 10_GiB);
        first = turn.claim(4_GiB);
    }
    {
        detail::Claims::Turn turn(claims, true);
        EXPECT_EQ(turn.claimed(), 4_GiB);
        EXPECT_EQ(turn.available(10_GiB), 6_GiB);  // nothing allocated yet
        EXPECT_EQ(turn.available(7_GiB), 6_GiB);   // 3 GiB of it allocated
    }
    first.release();
    detail::Claims::Turn turn(claims, true);
    EXPECT_EQ(turn.claimed(), 0u);
    EXPECT_EQ(turn.available(9_GiB), 9_GiB);
    EXPECT_EQ(turn.claim(0).bytes(), 0u);  // nothing to claim: no claim
}

TEST(Claims, AWaitingPlannerWakesWhenAClaimEnds) {
    detail::Claims claims;
    detail::Claims::Claim held;
    {
        detail::Claims::Turn turn(claims, true);
        held = turn.claim(1_GiB);
    }
    std::atomic<bool> released{false};
    std::thread other([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        released = true;
        held.release();
    });
    detail::Claims::Turn turn(claims, true);
    // Bounded by an hour: returns because the claim ended, not because the bound passed.
    EXPECT_TRUE(turn.wait_for_release(std::chrono::steady_clock::now() + std::chrono::hours(1)));
    EXPECT_TRUE(released.load());
    EXPECT_EQ(turn.claimed(), 0u);
    other.join();
}

TEST(Claims, APlannerInsideAnotherRunNeverWaits) {
    // Inside another run (or holding the guard for itself) what it would wait for may be its own
    // run: it plans at once, and its wait returns at once.
    detail::Claims claims;
    detail::Claims::Claim held;
    {
        detail::Claims::Turn turn(claims, true);
        held = turn.claim(1_GiB);
    }
    detail::Claims::Turn nested(claims, false);
    EXPECT_FALSE(nested.wait_for_release(std::chrono::steady_clock::now() + std::chrono::hours(1)));
    EXPECT_EQ(nested.available(4_GiB), 3_GiB);
}

// The server, small: one 24 GiB device holding a 4 GiB model; each padded batch needs
// 256 MiB + 2 MiB per token and holds it while it runs; texts 90 % 16-64 tokens, 10 % 256-512;
// every request thread makes `calls` calls of 64 texts on one guard and one key.
struct ServedRun {
    std::uint64_t items = 0, wrong = 0, failed_calls = 0, ooms = 0;
    policy::CostModel model;
    std::uint64_t budget = 0;
};

constexpr std::uint64_t kFixed = 256_MiB;
constexpr std::uint64_t kPerToken = 2_MiB;

ServedRun serve(int threads, int calls) {
    SimulatedDevice device(24_GiB);
    auto model_weights = device.allocate(4_GiB);
    Options options;
    options.persist = false;
    options.log = nullptr;
    options.poll_interval = std::chrono::milliseconds(1);
    options.item_retry_delay = std::chrono::milliseconds(200);
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("claims-served");
    std::atomic<std::uint64_t> items{0}, wrong{0}, failed{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            std::mt19937 random(static_cast<unsigned>(7 + t));
            for (int c = 0; c < calls; ++c) {
                std::vector<std::uint32_t> tokens(64);
                for (auto& n : tokens)
                    n = random() % 10 == 0 ? 256 + random() % 257 : 16 + random() % 49;
                std::vector<std::uint32_t> ids(tokens.size());
                for (std::size_t i = 0; i < ids.size(); ++i)
                    ids[i] = static_cast<std::uint32_t>(i) ^ (static_cast<std::uint32_t>(t) << 24);
                auto batch_fn =
                    [&](const BatchView<std::vector<std::uint32_t>::const_iterator>& batch) {
                        std::uint32_t longest = 0;
                        for (std::uint32_t id : batch)
                            longest = std::max(longest, tokens[id & 0xffffff]);
                        const std::uint64_t padded_tokens = std::uint64_t{longest} * batch.size();
                        auto activations = device.allocate(kFixed + kPerToken * padded_tokens);
                        std::this_thread::sleep_for(
                            std::chrono::microseconds(50 + padded_tokens / 64));
                        return std::vector<std::uint32_t>(batch.begin(), batch.end());
                    };
                auto tokens_of = [&](std::uint32_t id) { return tokens[id & 0xffffff]; };
                try {
                    if (guard.encode(key, ids, batch_fn, padded(tokens_of)) != ids) ++wrong;
                    items += ids.size();
                } catch (const std::exception&) {
                    ++failed;
                }
            }
        });
    }
    for (auto& worker : workers) worker.join();
    ServedRun run;
    run.items = items;
    run.wrong = wrong;
    run.failed_calls = failed;
    run.ooms = guard.stats().ooms;
    run.model = guard.cost_model(key, true);
    run.budget = guard.learned_weight_budget(key);
    return run;
}

void expect_true_cost(const ServedRun& run, int threads) {
    EXPECT_EQ(run.wrong, 0u);
    EXPECT_EQ(run.failed_calls, 0u);
    // Learning the key costs a few OOMs (its first chunks, before anything is measured); plans
    // that collided cost 25 (8 threads) and 250 (32 threads) here before claims.
    EXPECT_LE(run.ooms, 12u) << threads << " threads";
    ASSERT_TRUE(run.model.known());
    EXPECT_NEAR(run.model.bytes_per_unit, static_cast<double>(kPerToken), 0.05 * kPerToken)
        << threads << " threads";
    EXPECT_NEAR(static_cast<double>(run.model.fixed_bytes), static_cast<double>(kFixed),
                0.05 * kFixed)
        << threads << " threads";
    std::printf(
        "%d threads: %llu items, %llu OOMs, model %.3f MiB/token + %.1f MiB, costliest "
        "%.3f MiB/token, budget %llu tokens\n",
        threads, static_cast<unsigned long long>(run.items),
        static_cast<unsigned long long>(run.ooms), run.model.bytes_per_unit / 1_MiB,
        static_cast<double>(run.model.fixed_bytes) / 1_MiB, run.model.costliest_unit / 1_MiB,
        static_cast<unsigned long long>(run.budget));
}

int served_calls() {
    const char* text = std::getenv("VRAMGUARD_CLAIMS_CALLS");
    return text ? std::max(1, std::atoi(text)) : 12;
}

TEST(ClaimsServed, EightAndThirtyTwoCallersLearnTheTrueCost) {
    for (int threads : {8, 32}) expect_true_cost(serve(threads, served_calls()), threads);
}

TEST(ClaimsServed, TheLearnedBudgetIsTheSameFromRunToRun) {
    const ServedRun first = serve(8, served_calls());
    const ServedRun second = serve(8, served_calls());
    ASSERT_NE(first.budget, 0u);
    EXPECT_NEAR(static_cast<double>(second.budget), static_cast<double>(first.budget),
                0.05 * static_cast<double>(first.budget));
}

// A probe that measures no peaks plans from the OOM-learned ceiling and claims nothing; the size
// an OOM chose lasts one chunk there too, so the ceiling grows back within the same call.
struct NoPeaks {
    SimulatedDevice& device;
    MemoryInfo memory() const { return device.memory(); }
    void release_cached() { device.release_cached(); }
};

TEST(ClaimsFastPath, ARetrySizeLastsOneChunkWithoutPeakMeasurements) {
    SimulatedDevice device(64_GiB);
    NoPeaks probe{device};
    Options options;
    options.persist = false;
    options.log = nullptr;
    options.grow_after_successes = 2;
    Guard<NoPeaks> guard(probe, options);
    std::vector<int> items(8192, 1);
    std::vector<std::size_t> sizes;
    device.fail_next_allocations(1);  // the first chunk fails once, though it fits
    guard.encode(
        Key::of("no-peaks"), items,
        [&](const BatchView<std::vector<int>::const_iterator>& view) {
            auto activations = device.allocate(view.size() * 1_MiB);
            sizes.push_back(view.size());
        },
        EncodeOptions{}.with_first_chunk_limit(1024));
    ASSERT_GE(sizes.size(), 4u);
    EXPECT_EQ(sizes[0], 512u);  // halved after the injected OOM
    EXPECT_GT(*std::max_element(sizes.begin(), sizes.end()), 512u)
        << "the ceiling grew back within the call";
}

// A load claims what it was admitted for while it runs: an encode planned meanwhile does not
// count on the memory the load is about to take.
TEST(ClaimsLoad, AnEncodePlannedDuringALoadLeavesItsBytes) {
    SimulatedDevice device(32_GiB);
    Options options;
    options.persist = false;
    options.log = nullptr;
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("claims-load-encode");
    std::vector<std::size_t> sizes;
    auto encode = [&](std::size_t n) {
        std::vector<int> items(n, 1);
        guard.encode(key, items, [&](const BatchView<std::vector<int>::const_iterator>& view) {
            auto activations = device.allocate(view.size() * 1_MiB);
            sizes.push_back(view.size());
        });
    };
    for (int i = 0; i < 4; ++i) encode(2000 + 500 * i);  // the key learns 1 MiB per item
    ASSERT_TRUE(guard.cost_model(key).known());
    std::mutex mutex;
    std::condition_variable changed;
    bool loading = false, go = false;
    std::thread loader([&] {
        auto weights = guard.load(Key::of("claims-load"), 16_GiB, [&] {
            std::unique_lock<std::mutex> lock(mutex);
            loading = true;
            changed.notify_all();
            changed.wait(lock, [&] { return go; });
            return device.allocate(16_GiB);
        });
    });
    {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return loading; });
    }
    sizes.clear();
    encode(30000);
    {
        std::lock_guard<std::mutex> lock(mutex);
        go = true;
    }
    changed.notify_all();
    loader.join();
    ASSERT_FALSE(sizes.empty());
    // 32 GiB free, 16 of it claimed by the load: the chunk fits in the other 16 (items of 1 MiB).
    EXPECT_LE(sizes.front(), 16u * 1024u);
    EXPECT_GT(sizes.front(), 8u * 1024u);
}

// Fairness: a call that needs most of the device, among a stream of smaller calls that keep the
// device busy, waits at the head of the planners' queue: the memory that comes back is its first,
// so it runs in large chunks instead of the crumbs the others leave (and instead of starving).
TEST(ClaimsFairness, ALargeCallIsNotStarvedByAStreamOfSmallOnes) {
    SimulatedDevice device(10_GiB);
    Options options;
    options.persist = false;
    options.log = nullptr;
    options.item_retry_delay = std::chrono::seconds(30);  // the bound on a wait: never reached here
    Guard<SimulatedDevice> guard(device, options);
    const Key key = Key::of("claims-fairness");
    using View = BatchView<std::vector<int>::const_iterator>;
    auto run = [&](const View& view) {
        auto activations = device.allocate(view.size() * 1_MiB);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    };
    for (int i = 0; i < 4; ++i) {  // the key learns 1 MiB per item, measured alone
        std::vector<int> warm(1000 + 500 * i, 1);
        guard.encode(key, warm, run);
    }
    ASSERT_TRUE(guard.cost_model(key).known());
    std::atomic<bool> done{false};
    std::atomic<int> small_chunks{0};
    std::vector<std::thread> stream;
    for (int t = 0; t < 4; ++t) {
        stream.emplace_back([&] {
            const std::vector<int> items(3000, 1);  // 3 of these fit at once
            while (!done)
                guard.encode(key, items, [&](const View& view) {
                    run(view);
                    ++small_chunks;
                });
        });
    }
    while (small_chunks < 20) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::vector<std::size_t> sizes;
    const std::vector<int> large(9000, 1);
    guard.encode(key, large, [&](const View& view) {
        run(view);
        sizes.push_back(view.size());
    });
    done = true;
    for (auto& thread : stream) thread.join();
    // Its first chunk is at least half of it (policy::run_or_wait: half is at most one batch
    // more than waiting), never the crumbs the stream leaves, and the call completes.
    ASSERT_FALSE(sizes.empty());
    EXPECT_GE(sizes.front(), 4500u);
    EXPECT_EQ(std::accumulate(sizes.begin(), sizes.end(), std::size_t{0}), 9000u);
}

}  // namespace
