// SPDX-License-Identifier: MIT
// The recovery wait end to end (Ollama's rule: after an unload, poll every 250 ms until 75 % of
// the freed bytes show, at most 5 s, then trust the estimate; done at once when the memory is
// already free), through Guard::wait_for_freed_memory and through a registry's eviction. Default
// Options throughout: a changed default, or another fraction passed where the wait is made, fails
// here. Peer relief stands on this wait (peer_relief_test.cpp).
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

class RecoveryWaitTest : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    CapturedLog log;
    Guard<SimulatedDevice> guard{device, test_options(clock, log)};

    // The driver reports 4 GiB freed at time 0 in steps: 2 GiB (50 %) after 1 s, 3 GiB (75 %)
    // after 2 s, all of it after 3 s. Before the unload 8 GiB are used: 2 GiB free.
    void drip_four_gib_from(std::uint64_t external_before) {
        device.set_external_usage(external_before + 4_GiB);
        clock.after(
            1s, [this, external_before] { device.set_external_usage(external_before + 2_GiB); });
        clock.after(
            2s, [this, external_before] { device.set_external_usage(external_before + 1_GiB); });
        clock.after(3s, [this, external_before] { device.set_external_usage(external_before); });
    }
};

TEST_F(RecoveryWaitTest, DefaultsAreOllamas) {
    const Options defaults;
    EXPECT_DOUBLE_EQ(defaults.recovery_fraction, 0.75);
    EXPECT_EQ(defaults.recovery_timeout, 5s);
    EXPECT_EQ(defaults.poll_interval, 250ms);
}

TEST_F(RecoveryWaitTest, PollsUntilThreeQuartersOfTheFreedBytesShow) {
    drip_four_gib_from(4_GiB);
    EXPECT_TRUE(guard.wait_for_freed_memory(4_GiB, 2_GiB));
    EXPECT_EQ(clock.slept(), 2s) << "not at 50 % (1 s), not waiting for 100 % (3 s)";
    EXPECT_EQ(device.memory().free_bytes, 5_GiB);
}

TEST_F(RecoveryWaitTest, EndsWhenTheLoadsNeedsAreFreeBeforeThreeQuartersShow) {
    drip_four_gib_from(4_GiB);
    EXPECT_TRUE(guard.wait_for_freed_memory(4_GiB, 2_GiB, 4_GiB));
    EXPECT_EQ(clock.slept(), 1s) << "4 GiB needed: free after 1 s";
}

TEST_F(RecoveryWaitTest, DoneAtOnceWhenTheMemoryIsAlreadyFree) {
    device.set_external_usage(4_GiB);
    EXPECT_TRUE(guard.wait_for_freed_memory(4_GiB, 2_GiB)) << "all 4 GiB already show";
    EXPECT_TRUE(guard.wait_for_freed_memory(4_GiB, 6_GiB, 5_GiB)) << "what is needed is free";
    EXPECT_EQ(clock.slept(), Duration::zero());
}

TEST_F(RecoveryWaitTest, TrustsTheEstimateAfterFiveSeconds) {
    device.set_external_usage(8_GiB);  // the 4 GiB never show
    EXPECT_FALSE(guard.wait_for_freed_memory(4_GiB, 2_GiB));
    EXPECT_EQ(clock.slept(), 5s);
}

// The same wait without a guard (recovery.hpp): what an external manager calls with its probe and
// Options. Another fraction and timeout in Options are the ones it uses.
TEST_F(RecoveryWaitTest, TheFreeFunctionWaitsOnAnyProbeWithTheOptionsRule) {
    drip_four_gib_from(4_GiB);
    const Options options = test_options(clock, log);
    EXPECT_TRUE(wait_for_freed_memory(device, options, 4_GiB, 2_GiB));
    EXPECT_EQ(clock.slept(), 2s) << "75 % of 4 GiB show after 2 s";

    drip_four_gib_from(4_GiB);
    Options half = options;
    half.recovery_fraction = 0.5;
    const Duration before = clock.slept();
    EXPECT_TRUE(wait_for_freed_memory(device, half, 4_GiB, 2_GiB));
    EXPECT_EQ(clock.slept() - before, 1s) << "50 % show after 1 s";

    device.set_external_usage(8_GiB);  // never shows
    Options short_wait = options;
    short_wait.recovery_timeout = 750ms;
    EXPECT_FALSE(wait_for_freed_memory(device, short_wait, 4_GiB, 2_GiB));
    EXPECT_EQ(clock.slept() - before - 1s, 750ms) << "trusted at recovery_timeout";
    EXPECT_TRUE(wait_for_freed_memory(device, short_wait, 4_GiB, 2_GiB, 2_GiB))
        << "what is needed is free: at once";
    EXPECT_EQ(clock.slept() - before - 1s, 750ms);
}

// Weights that, when destroyed, make the device report their release late: the drip above.
struct DrippingModel {
    explicit DrippingModel(SimulatedDevice::Allocation model_weights,
                           std::function<void()> unload_hook = nullptr)
        : weights(std::move(model_weights)), on_unload(std::move(unload_hook)) {}
    DrippingModel(const DrippingModel&) = delete;
    DrippingModel& operator=(const DrippingModel&) = delete;
    SimulatedDevice::Allocation weights;
    std::function<void()> on_unload;
    ~DrippingModel() {
        if (on_unload) on_unload();
    }
};

// Through a registry's eviction: a (4 GiB, least recently used) is evicted for c while b is
// leased; the wait ends when 75 % of a's bytes show (2 s), then c's load waits (load_wait) for the
// rest.
TEST_F(RecoveryWaitTest, AnEvictionWaitsUntilThreeQuartersOfTheModelShow) {
    RegistryOptions registry_options;
    registry_options.load_wait = 10s;
    ModelRegistry<SimulatedDevice> registry(guard, registry_options);
    auto add = [&](const std::string& name, std::function<void()> on_unload) {
        return registry.add<DrippingModel>(
            name, Key::of(name),
            [this, on_unload] {
                return std::make_shared<DrippingModel>(device.allocate(4_GiB), on_unload);
            },
            4_GiB);
    };
    auto a = add("a", [this] { drip_four_gib_from(512_MiB); });
    auto b = add("b", nullptr);
    auto c = registry.add<DrippingModel>(
        "c", Key::of("c"),
        [this] { return std::make_shared<DrippingModel>(device.allocate(4_GiB)); },
        4500_MiB);  // with the 1 GiB margin: 5.5 GiB free needed, more than 75 % of a gives
    a->acquire().release();
    clock.advance(1s);
    Lease<DrippingModel> held = b->acquire();
    device.set_external_usage(512_MiB);  // 1.5 GiB free: with a, just enough
    const Duration slept_before = clock.slept();
    Lease<DrippingModel> lease = c->acquire();
    EXPECT_FALSE(a->loaded());
    EXPECT_TRUE(log.contains("memory freed by unloading 'a' reported after 2000 ms"));
    EXPECT_EQ(registry.stats().recoveries_seen, 1u);
    EXPECT_EQ(registry.stats().recoveries_trusted, 0u);
    EXPECT_EQ(clock.slept() - slept_before, 3s) << "then polled (load_wait) until all of it showed";
}

TEST_F(RecoveryWaitTest, AnEvictionWhoseMemoryShowsAtOnceDoesNotWait) {
    ModelRegistry<SimulatedDevice> registry(guard);
    auto make = [&](const std::string& name) {
        return registry.add<DrippingModel>(
            name, Key::of(name),
            [this] { return std::make_shared<DrippingModel>(device.allocate(4_GiB)); }, 4_GiB);
    };
    auto a = make("a"), b = make("b"), c = make("c");
    a->acquire().release();
    b->acquire().release();
    const Duration slept_before = clock.slept();
    Lease<DrippingModel> lease = c->acquire();
    EXPECT_EQ(clock.slept(), slept_before);
    EXPECT_TRUE(log.contains("memory freed by unloading 'a' reported after 0 ms"));
}

}  // namespace
