// SPDX-License-Identifier: MIT
// Library defects found by the hostile review (issue 19), one test each, every one failing before
// its fix: a heavy item that made its key refuse everything for ever, a loader whose warm-up
// through the guard deadlocked, "for ever" durations that overflowed into "at once", and a
// registry that went while a peer it had given up on still used it. (The full host ledger is in
// host_test.cpp, fit_cost's saturation in cost_model_test.cpp.) Time is a ManualClock; the real
// waits are bounded: a deadlock shows as a failed wait, never a hung test.
#include <vramguard/detail/run_tracker.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"
#include "temp_dir.hpp"

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::GuardScene;
using vramguard_test::Scene;
using vramguard_test::TempDir;

namespace {

// Items are their cost in MiB; each chunk holds its items' memory while it runs.
struct MiBItems {
    SimulatedDevice& device;
    std::vector<int> operator()(const BatchView<std::vector<int>::const_iterator>& batch) const {
        std::vector<SimulatedDevice::Allocation> held;
        for (int mib : batch) held.push_back(device.allocate(std::uint64_t(mib) << 20));
        return std::vector<int>(batch.begin(), batch.end());
    }
};

// Runs `work` on a thread of its own and waits up to `limit` (real time) for it: a deadlock
// fails the test instead of hanging it. The thread owns `state`, so one left behind stays valid.
template <class State, class Work>
bool finishes_within(std::shared_ptr<State> state, Work work, std::chrono::seconds limit) {
    auto done = std::make_shared<std::promise<void>>();
    std::future<void> finished = done->get_future();
    std::thread([state, work, done] {
        work(*state);
        done->set_value();
    }).detach();
    return finished.wait_for(limit) == std::future_status::ready;
}

// ---- one heavy item must not refuse its key for ever (repro_cheapest_brick) ---------------------

// A 13 GiB item runs on a 16 GiB device. It was the cheapest unit measured, and x 1.2 headroom +
// 10 % margin it "could never fit": the same item, 100 MiB items and, the sample persisted, a
// 1 MiB item after a restart were all refused as can_never_fit.
TEST(HostileInput, OneHeavyItemThatRanDoesNotRefuseLaterCallsOfItsKey) {
    TempDir profiles("vramguard-hostile-");
    Scene s(16_GiB);
    s.options.persist = true;
    s.options.profile_dir = profiles.path();
    const Key key = Key::of("brick", {});
    const std::vector<int> heavy{13 * 1024};
    {
        Guard<SimulatedDevice> guard(s.device, s.options);
        EXPECT_EQ(guard.encode(key, heavy, MiBItems{s.device}), heavy);
        EXPECT_EQ(guard.encode(key, heavy, MiBItems{s.device}), heavy) << "the same item again";
        const std::vector<int> light{100, 100, 100};
        EXPECT_EQ(guard.encode(key, light, MiBItems{s.device}), light);
    }
    Guard<SimulatedDevice> restarted(s.device, s.options);
    const std::vector<int> tiny{1};
    EXPECT_EQ(restarted.encode(key, tiny, MiBItems{s.device}), tiny) << "after a restart";
}

// While another process holds the memory, the same call waits or is refused for now (retry
// later), never as "can never fit": that item ran on this device.
TEST(HostileInput, AnEncodeRefusedUnderPressureIsRefusedForNowNotForEver) {
    GuardScene s(16_GiB);
    const Key key = Key::of("brick", {});
    const std::vector<int> heavy{15 * 1024};  // inside the 10 % margin: ran all the same
    ASSERT_EQ(s.guard.encode(key, heavy, MiBItems{s.device}), heavy);
    s.device.set_external_usage(8_GiB);
    try {
        s.guard.encode(key, std::vector<int>{1}, MiBItems{s.device});
        ADD_FAILURE() << "admitted although the cheapest item measured (15 GiB) cannot fit in 8";
    } catch (const InsufficientMemory& error) {
        EXPECT_FALSE(error.can_never_fit()) << error.what();
    }
    s.device.set_external_usage(0);
    EXPECT_EQ(s.guard.encode(key, heavy, MiBItems{s.device}), heavy);
}

// A weighted call whose lightest item is heavier than anything that ran, and estimated (without
// headroom: a lower bound) at more than the device, is still refused at once as can_never_fit;
// one no heavier than what ran is not.
TEST(HostileInput, AWeightedItemHeavierThanAnythingThatRanCanStillNeverFit) {
    GuardScene s(16_GiB);
    const Key key = Key::of("weighted", {});
    auto weight = [](int mib) { return mib / 1024; };  // GiB
    const std::vector<int> learned{2048, 2048};        // 2 x 2 GiB: about 1 GiB a unit
    ASSERT_EQ(s.guard.encode(key, learned, MiBItems{s.device}, weight), learned);
    int ran = 0;
    try {
        s.guard.encode(
            key, std::vector<int>{40 * 1024},
            [&](const BatchView<std::vector<int>::const_iterator>& batch) {
                ++ran;
                return std::vector<int>(batch.begin(), batch.end());
            },
            weight);
        ADD_FAILURE() << "a 40-unit item estimated at 40 GiB was started on a 16 GiB device";
    } catch (const InsufficientMemory& error) {
        EXPECT_TRUE(error.can_never_fit()) << error.what();
        EXPECT_GE(error.required(), 40_GiB);
    }
    EXPECT_EQ(ran, 0);
    const std::vector<int> same{2048};
    EXPECT_EQ(s.guard.encode(key, same, MiBItems{s.device}, weight), same);
}

// The same for a load: a 15 GiB model loaded on a 16 GiB device; its peak x 1.2 headroom + 10 %
// margin "could never fit", so the model could never be loaded again (the peak is persisted). A
// peak measured above the whole device (another, larger device's profile) still never fits.
TEST(HostileInput, OneLoadThatUsedMostOfTheDeviceDoesNotMakeItsKeyNeverFit) {
    GuardScene s(16_GiB);
    const Key key = Key::of("big-model", {});
    for (int load = 0; load < 2; ++load) {
        std::optional<SimulatedDevice::Allocation> weights;
        EXPECT_NO_THROW(s.guard.load(key, [&] { weights = s.device.allocate(15_GiB); }))
            << "load " << load;
        EXPECT_TRUE(weights);
    }
    const Key larger = Key::of("from-a-larger-device", {});
    s.guard.profiles().record_peak(larger, 20_GiB);
    try {
        s.guard.load(larger, [] {});
        ADD_FAILURE() << "a load measured at 20 GiB was started on a 16 GiB device";
    } catch (const InsufficientMemory& error) {
        EXPECT_TRUE(error.can_never_fit()) << error.what();
    }
}

// ---- a loader that warms up through guard.encode (repro_warmup_hang) ----------------------------

struct WarmUpScene : GuardScene {
    WarmUpScene() : GuardScene(16_GiB) {}
    std::atomic<int> loads{0};
};

// The load's own run counted as overlap for its warm-up's measurement; after two such spoiled
// measurements the warm-up took an exclusive turn, which waited for the load, i.e. for itself:
// the third load hung. A warm-up is part of its load: it measures nothing of its own, and the
// load's peak (weights and warm-up together) is recorded.
TEST(HostileInput, ALoaderThatWarmsUpThroughEncodeDoesNotHang) {
    auto scene = std::make_shared<WarmUpScene>();
    const bool finished = finishes_within(
        scene,
        [](WarmUpScene& s) {
            const std::vector<int> warmup{64, 64, 64, 64};
            for (int i = 0; i < 5; ++i) {
                s.guard.load(Key::of("encoder", {}), 2_GiB, [&s, &warmup] {
                    auto weights = s.device.allocate(2_GiB);
                    s.guard.encode(Key::of("encoder/encode", {}), warmup, MiBItems{s.device});
                    return weights;
                });
                ++s.loads;
            }
        },
        60s);
    ASSERT_TRUE(finished) << "deadlocked after " << scene->loads << " of 5 loads";
    const std::uint64_t load_peak = scene->guard.profiles().get(Key::of("encoder", {})).peak_bytes;
    EXPECT_GE(load_peak, 2_GiB + 64_MiB) << "the load's peak includes its warm-up";
    EXPECT_LE(load_peak, 2_GiB + 256_MiB);
    EXPECT_EQ(scene->guard.cost_model(Key::of("encoder/encode", {})).samples, 0u)
        << "a warm-up inside a load is no sample of its own";
}

struct TrackerScene {
    detail::RunTracker tracker{true};
    std::promise<void> outer_started;
    std::atomic<bool> inner_ran{false};
    std::atomic<bool> turn_taken{false};
    std::atomic<bool> turn_before_outer_ended{false};
    std::atomic<bool> outer_ended{false};
};

// Another thread wants the guard for itself while a load runs; the load's warm-up then starts a
// run. The turn waits for the load; the warm-up must not wait for the turn (it did: deadlock).
TEST(HostileInput, ANestedRunNeverWaitsForATurnThatWaitsForItsOuterRun) {
    auto scene = std::make_shared<TrackerScene>();
    std::shared_future<void> outer_started = scene->outer_started.get_future().share();
    std::thread turn_taker([scene, outer_started] {
        outer_started.wait();
        detail::RunTracker::ExclusiveTurn turn(scene->tracker);
        scene->turn_before_outer_ended = !scene->outer_ended;
        scene->turn_taken = true;
    });
    const bool finished = finishes_within(
        scene,
        [](TrackerScene& s) {
            detail::RunTracker::Run outer(s.tracker, true);
            EXPECT_TRUE(s.tracker.running_here());
            s.outer_started.set_value();
            // Give the other thread time to want its turn (the test passes either way; it
            // deadlocked before the fix only when the turn came first, which this makes likely).
            std::this_thread::sleep_for(100ms);
            {
                detail::RunTracker::Run inner(s.tracker, true);
                EXPECT_FALSE(inner.started_solo()) << "a nested run measures nothing";
                s.inner_ran = true;
            }
            EXPECT_FALSE(s.tracker.others_running()) << "only this thread's own outer run";
            s.outer_ended = true;
        },
        30s);
    ASSERT_TRUE(finished) << "the nested run waited for the exclusive turn";
    turn_taker.join();
    EXPECT_TRUE(scene->inner_ran);
    EXPECT_TRUE(scene->turn_taken);
    EXPECT_FALSE(scene->turn_before_outer_ended) << "the turn still waited for the outer run";
    EXPECT_FALSE(scene->tracker.running_here());
}

// ---- RegistryOptions durations of milliseconds::max() (repro_peer_ms_max) -----------------------

struct Weights {
    SimulatedDevice::Allocation allocation;
};

std::shared_ptr<ModelSlot<Weights>> add_model(ModelRegistry<SimulatedDevice>& registry,
                                              SimulatedDevice& device, std::uint64_t bytes) {
    return registry.add<Weights>(
        "m", Key::of("m", {}),
        [&device, bytes] { return std::make_shared<Weights>(Weights{device.allocate(bytes)}); },
        bytes);
}

constexpr auto for_ever = std::chrono::milliseconds::max();
constexpr Duration a_year = std::chrono::hours(24 * 365);

// "For ever" converted to the clock's nanoseconds overflowed to -1 ms: idle unload at once.
TEST(HostileInput, AnIdleTimeoutOfMillisecondsMaxNeverUnloads) {
    GuardScene s(10_GiB);
    RegistryOptions options;
    options.idle_timeout = for_ever;
    ModelRegistry<SimulatedDevice> registry(s.guard, options);
    auto model = add_model(registry, s.device, 1_GiB);
    model->acquire().release();
    s.clock.advance(a_year);
    registry.tick();
    EXPECT_TRUE(model->loaded());
    EXPECT_EQ(registry.stats().idle_unloads, 0u);
}

// ... a pressure rate limit of "for ever" acted on every tick ...
TEST(HostileInput, APressureRateLimitOfMillisecondsMaxActsOnce) {
    GuardScene s(10_GiB);
    s.device.set_external_usage(9_GiB);  // 90 % in use: above the default threshold
    RegistryOptions options;
    options.pressure_rate_limit = for_ever;
    ModelRegistry<SimulatedDevice> registry(s.guard, options);
    EXPECT_TRUE(registry.relieve_pressure(s.clock.now()).acted);
    s.clock.advance(a_year);
    const PressureRelief again = registry.relieve_pressure(s.clock.now());
    EXPECT_FALSE(again.acted);
    EXPECT_TRUE(again.rate_limited);
}

// ... a reaper interval of "for ever" ticked without pause (the wait's deadline was in the past)
TEST(HostileInput, AReaperIntervalOfMillisecondsMaxDoesNotTick) {
    GuardScene s(10_GiB);
    RegistryOptions options;
    options.idle_timeout = 1ms;
    options.reaper = true;
    options.reaper_interval = for_ever;
    ModelRegistry<SimulatedDevice> registry(s.guard, options);
    auto model = add_model(registry, s.device, 1_GiB);
    model->acquire().release();
    s.clock.advance(std::chrono::hours(1));  // idle long enough for any tick to unload it
    std::this_thread::sleep_for(200ms);      // real time for a spinning reaper to tick
    EXPECT_TRUE(model->loaded());
    EXPECT_EQ(registry.stats().idle_unloads, 0u);
}

// ... a peer timeout of "for ever" became a deadline of now, a cooldown of "for ever" none.
TEST(HostileInput, PeerTimeoutAndCooldownOfMillisecondsMaxMeanForEver) {
    GuardScene s(10_GiB);
    s.device.set_external_usage(8_GiB);
    std::vector<ReliefRequest> requests;
    RegistryOptions options;
    options.idle_timeout = 0ms;
    options.peer_timeout = for_ever;
    options.peer_cooldown = for_ever;
    options.peers = {make_peer("other@:8081", [&](const ReliefRequest& request) {
        requests.push_back(request);
        s.device.set_external_usage(0);
        return PeerReply::freed(8_GiB);
    })};
    ModelRegistry<SimulatedDevice> registry(s.guard, options);
    auto model = add_model(registry, s.device, 4_GiB);
    model->acquire().release();
    ASSERT_EQ(requests.size(), 1u);
    EXPECT_EQ(requests[0].timeout, Duration::max());
    EXPECT_EQ(requests[0].deadline, TimePoint::max());
    model->unload();
    s.device.set_external_usage(8_GiB);
    s.clock.advance(a_year);
    EXPECT_THROW(model->acquire(), InsufficientMemory);
    EXPECT_EQ(requests.size(), 1u) << "asked again within its cooldown of for ever";
    const auto status = registry.status().peers;
    ASSERT_EQ(status.size(), 1u);
    EXPECT_GT(status[0].cooldown_left_seconds, 1e6);
}

// ---- a peer the registry gave up on, still running when the registry goes ----------------------

struct AbandonedPeer {
    std::promise<void> entered;
    std::promise<void> release;
    std::shared_future<void> released{release.get_future().share()};
    std::atomic<bool> finished{false};
};

// A Peer that uses what lives as long as the registry (here `scratch`, beside it) was left
// running on its thread at its deadline; the registry's destructor returned at once and the
// peer then wrote to freed memory. The destructor now waits for it (at most peer_timeout, real
// time), and wait_for_peer_calls() says whether any still runs.
TEST(HostileInput, ARegistryWaitsForItsAbandonedPeerCallsBeforeItGoes) {
    Scene s(10_GiB);
    s.device.set_external_usage(8_GiB);
    s.options.poll_interval = 10ms;
    Guard<SimulatedDevice> guard(s.device, s.options);
    auto peer_state = std::make_shared<AbandonedPeer>();
    std::future<void> entered = peer_state->entered.get_future();
    // Once the peer is called, its deadline (5 s on the manual clock) passes at once.
    std::thread deadline_passer([&s, &entered] {
        if (entered.wait_for(30s) == std::future_status::ready) s.clock.advance(10s);
    });
    std::thread releaser;
    {
        std::vector<int> scratch;  // lives exactly as long as the registry
        RegistryOptions options;
        options.peer_timeout = 5s;
        options.peers = {make_peer("slow@:8081", [peer_state, &scratch](const ReliefRequest&) {
            peer_state->entered.set_value();
            peer_state->released.wait();
            scratch.push_back(1);
            peer_state->finished = true;
            return PeerReply::nothing();
        })};
        ModelRegistry<SimulatedDevice> registry(guard, options);
        auto model = add_model(registry, s.device, 4_GiB);
        EXPECT_THROW(model->acquire(), InsufficientMemory);
        EXPECT_TRUE(s.log.contains("no answer within 5000 ms"));
        EXPECT_FALSE(registry.wait_for_peer_calls(0ms)) << "the abandoned call still runs";
        releaser = std::thread([peer_state] {
            std::this_thread::sleep_for(100ms);  // after the registry's destructor has begun
            peer_state->release.set_value();
        });
    }
    EXPECT_TRUE(peer_state->finished) << "the registry went before its peer call ended";
    releaser.join();
    deadline_passer.join();
}

}  // namespace
