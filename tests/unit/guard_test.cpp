// SPDX-License-Identifier: MIT
// Guard's two loops against SimulatedDevice, with injected time: no test here sleeps for real.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"
#include "temp_dir.hpp"

#include <atomic>
#include <list>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

std::vector<int> iota_items(int n) {
    std::vector<int> items(static_cast<std::size_t>(n));
    std::iota(items.begin(), items.end(), 0);
    return items;
}

// An encoder whose chunk takes `bytes_per_item` per item, allocated item by item (as a model that
// grows activations while it runs): the failing allocation asks for one item's bytes, so the OOM
// report leads to plain halving. Records every chunk size it was given.
struct ItemByItemEncoder {
    SimulatedDevice& device;
    std::uint64_t bytes_per_item;
    std::vector<std::size_t> sizes;

    std::vector<int> operator()(const BatchView<std::vector<int>::const_iterator>& batch) {
        sizes.push_back(batch.size());
        std::vector<SimulatedDevice::Allocation> held;
        std::vector<int> out;
        for (int item : batch) {
            held.push_back(device.allocate(bytes_per_item));
            out.push_back(item * 10);
        }
        return out;
    }
};

// An encoder whose chunk is one tensor of size x bytes_per_item (one allocation per chunk).
struct TensorEncoder {
    SimulatedDevice& device;
    std::uint64_t bytes_per_item;
    std::vector<std::size_t> sizes;

    std::vector<int> operator()(const BatchView<std::vector<int>::const_iterator>& batch) {
        sizes.push_back(batch.size());
        auto activations = device.allocate(bytes_per_item * batch.size());
        std::vector<int> out;
        for (int item : batch) out.push_back(item * 10);
        return out;
    }
};

std::vector<int> times_ten(const std::vector<int>& items) {
    std::vector<int> out;
    for (int item : items) out.push_back(item * 10);
    return out;
}

class GuardTest : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    CapturedLog log;
    Options options = test_options(clock, log);
    Key key = Key::of("encoder", {{"dim", "768"}});
};

// ---- admission -----------------------------------------------------------------------------

TEST_F(GuardTest, LoadAdmittedRunsOnceReturnsTheResultAndRecordsThePeak) {
    Guard<SimulatedDevice> guard(device, options);
    int calls = 0;
    auto model = guard.load(key, 2_GiB, [&] {
        ++calls;
        auto scratch = device.allocate(1_GiB);  // freed before returning: counts in the peak
        return device.allocate(1_GiB + 512_MiB);
    });
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(model.bytes(), 1_GiB + 512_MiB);
    EXPECT_EQ(guard.profiles().get(key).peak_bytes, 2_GiB + 512_MiB);
    EXPECT_EQ(guard.stats().calls, 1u);
    EXPECT_EQ(guard.stats().ooms, 0u);
}

TEST_F(GuardTest, FirstRunIsConservativeThenTheMeasuredPeakTimesHeadroomIsUsed) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(2_GiB);  // 8 GiB free: 80 % of 10 GiB + a 1 GiB margin does not fit
    try {
        guard.load(key, [&] { return 0; });
        FAIL() << "an unknown load must be admitted conservatively";
    } catch (const InsufficientMemory& e) {
        EXPECT_EQ(e.required(), 8_GiB);
        EXPECT_EQ(e.available(), 8_GiB);
        EXPECT_EQ(e.total(), 10_GiB);
        EXPECT_EQ(e.key(), key.describe());
        EXPECT_NE(std::string(e.what()).find("first-run estimate"), std::string::npos) << e.what();
    }
    EXPECT_EQ(guard.stats().rejections, 1u);

    device.set_external_usage(0);
    guard.load(key, [&] { auto weights = device.allocate(1_GiB); });
    const Admission next = guard.admission(key);
    EXPECT_EQ(next.requirement.source, policy::RequirementSource::measured);
    EXPECT_EQ(next.requirement.bytes, policy::scale_bytes(1_GiB, 1.2));

    device.set_external_usage(7_GiB);  // 3 GiB free: 1.2 GiB + 1 GiB margin now fits
    EXPECT_TRUE(guard.admission(key).admitted);
    EXPECT_NO_THROW(guard.load(key, [&] { return 1; }));
}

TEST_F(GuardTest, RejectionExplainsTheNumbersAndSuggestsWhatToDo) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(6_GiB);
    try {
        guard.load(key, 4_GiB, [] { return 0; });
        FAIL();
    } catch (const InsufficientMemory& e) {
        const std::string what = e.what();
        EXPECT_EQ(e.required(), 4_GiB);
        EXPECT_EQ(e.available(), 4_GiB);
        EXPECT_EQ(e.retry_after(), options.retry_delay);  // nothing observed yet
        EXPECT_FALSE(e.can_never_fit()) << "it fits once the other 6 GiB are freed";
        for (const char* part :
             {"encoder{dim=768}", "4.00 GiB (declared)", "safety margin of 1.00 GiB",
              "10% of 10.00 GiB", "only 4.00 GiB is free"})
            EXPECT_NE(what.find(part), std::string::npos)
                << "missing '" << part << "' in: " << what;
    }
}

TEST_F(GuardTest, WorkThatCanNeverFitFailsAtOnceEvenWhenWaitingIsAllowed) {
    options.admission_wait = 60s;
    Guard<SimulatedDevice> guard(device, options);
    EXPECT_THROW(guard.load(key, 20_GiB, [] { return 0; }), InsufficientMemory);
    EXPECT_EQ(clock.slept(), Duration::zero());
    try {
        guard.load(key, 20_GiB, [] { return 0; });
        FAIL();
    } catch (const InsufficientMemory& e) {
        EXPECT_NE(std::string(e.what()).find("can never fit"), std::string::npos) << e.what();
        EXPECT_TRUE(e.can_never_fit());
        EXPECT_EQ(e.total(), 10_GiB);
    }
}

TEST_F(GuardTest, LoadThatFitsTheDeviceOnlyWithItsMarginCanNeverFitEither) {
    Guard<SimulatedDevice> guard(device, options);
    try {
        guard.load(key, 9_GiB + 1, [] { return 0; });  // 9 GiB + 1 byte + a 1 GiB margin > 10 GiB
        FAIL();
    } catch (const InsufficientMemory& e) {
        EXPECT_TRUE(e.can_never_fit()) << e.what();
    }
    device.set_external_usage(1_GiB);
    try {
        guard.load(key, 9_GiB, [] { return 0; });  // exactly the device: fits once it is empty
        FAIL();
    } catch (const InsufficientMemory& e) {
        EXPECT_FALSE(e.can_never_fit()) << e.what();
    }
}

TEST_F(GuardTest, EncodeAdmissionSaysWhetherTheCheapestItemCouldEverFit) {
    Guard<SimulatedDevice> guard(device, options);
    // One measured item of 1 GiB: refused while only 1 GiB is free (a 1 GiB margin is kept).
    ItemByItemEncoder small{device, 1_GiB, {}};
    guard.encode(key, iota_items(1), std::ref(small));
    device.set_external_usage(9_GiB);
    try {
        guard.encode(key, iota_items(4), std::ref(small));
        FAIL() << "only 1 GiB is free";
    } catch (const InsufficientMemory& e) {
        EXPECT_NE(std::string(e.what()).find("cannot start encode"), std::string::npos) << e.what();
        EXPECT_FALSE(e.can_never_fit()) << e.what();
    }
    device.set_external_usage(0);

    // One measured item of 8 GiB ran; x 1.2 headroom plus a 1 GiB margin it is more than the
    // device, which once refused it again as "can never fit", for ever (repro_cheapest_brick):
    // the check is a lower bound now, and an item that ran here is "not now" at worst.
    const Key big = Key::of("encoder", {{"dim", "65536"}});
    ItemByItemEncoder huge{device, 8_GiB, {}};
    guard.encode(big, iota_items(1), std::ref(huge));
    EXPECT_NO_THROW(guard.encode(big, iota_items(1), std::ref(huge)));
    EXPECT_EQ(huge.sizes.size(), 2u) << "the item that ran runs again";
    EXPECT_EQ(guard.stats().rejections, 1u);
    // (An item estimated above the whole device is still refused at once as can_never_fit:
    // HostileInput.AWeightedItemHeavierThanAnythingThatRanCanStillNeverFit.)
}

TEST_F(GuardTest, AdmissionWaitsForMemoryAndIsAdmittedWithinOnePollOfItComingBack) {
    options.admission_wait = 60s;
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(9_GiB);
    clock.after(3s, [&] { device.set_external_usage(0); });
    int ran = 0;
    guard.load(key, 2_GiB, [&] { ++ran; });
    EXPECT_EQ(ran, 1);
    EXPECT_GE(clock.slept(), 3s);
    EXPECT_LE(clock.slept(), 3s + options.poll_interval);  // polled, not a blind sleep
    EXPECT_EQ(guard.stats().waits, 1u);
    // The next rejection's hint is what recovery took this time: memory that never comes back is
    // waited for the whole admission_wait, then refused with the 3 s it took before as the hint.
    device.set_external_usage(9_GiB);
    const Duration slept_before = clock.slept();
    try {
        guard.load(Key::of("other"), 2_GiB, [&] { ++ran; });
        FAIL() << "expected InsufficientMemory: only 1 GiB is free";
    } catch (const InsufficientMemory& e) {
        EXPECT_GE(e.retry_after(), 3s);
        EXPECT_LE(e.retry_after(), 3s + options.poll_interval);
        EXPECT_FALSE(e.can_never_fit()) << e.what();
    }
    EXPECT_EQ(clock.slept() - slept_before, options.admission_wait);
    EXPECT_EQ(guard.stats().rejections, 1u);
    // A guard that has seen no memory come back refuses at once, hinting its retry_delay.
    options.admission_wait = 0ms;
    Guard<SimulatedDevice> impatient(device, options);
    const Duration slept_impatient = clock.slept();
    try {
        impatient.load(Key::of("other"), 2_GiB, [&] { ++ran; });
        FAIL() << "expected InsufficientMemory: only 1 GiB is free";
    } catch (const InsufficientMemory& e) {
        EXPECT_EQ(e.retry_after(), options.retry_delay) << "nothing observed by this guard yet";
    }
    EXPECT_EQ(clock.slept(), slept_impatient) << "admission_wait 0: no wait";
    EXPECT_EQ(impatient.stats().rejections, 1u);
    EXPECT_EQ(ran, 1);
}

TEST_F(GuardTest, AdmissionWaitGivesUpAtItsDeadline) {
    options.admission_wait = 10s;
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(9_GiB);
    EXPECT_THROW(guard.load(key, 2_GiB, [] {}), InsufficientMemory);
    EXPECT_EQ(clock.slept(), 10s);
}

// ---- load: OOM retry -----------------------------------------------------------------------

TEST_F(GuardTest, LoadOomIsRetriedAsSoonAsExternalUsageDropsMidWait) {
    Guard<SimulatedDevice> guard(device, options);
    int attempts = 0;
    auto model = guard.load(key, 6_GiB, [&] {
        if (++attempts == 1) {
            // Another process grabs memory between admission and allocation, and leaves 10 s later.
            device.set_external_usage(5_GiB);
            clock.after(10s, [&] { device.set_external_usage(0); });
        }
        return device.allocate(6_GiB);
    });
    EXPECT_EQ(attempts, 2);
    EXPECT_EQ(model.bytes(), 6_GiB);
    EXPECT_GE(clock.slept(), 10s);
    EXPECT_LE(clock.slept(), 10s + options.poll_interval);  // not the whole 30 s retry_delay
    const Stats stats = guard.stats();
    EXPECT_EQ(stats.ooms, 1u);
    EXPECT_EQ(stats.retries, 1u);
    EXPECT_EQ(device.release_cached_calls(), 1u);
    EXPECT_GE(log.count(Level::warn), 1u);
    EXPECT_EQ(log.count(Level::error), 0u);
}

TEST_F(GuardTest, LoadGivesUpAfterItsAttemptsWithTheLastOomNested) {
    Guard<SimulatedDevice> guard(device, options);
    int attempts = 0;
    try {
        guard.load(key, 1_GiB, [&] {
            ++attempts;
            device.set_external_usage(5_GiB);  // someone else keeps taking what the load needs
            return device.allocate(6_GiB);
        });
        FAIL();
    } catch (const OomExhausted& e) {
        EXPECT_EQ(e.attempts(), 3u);
        EXPECT_FALSE(e.item_index().has_value());
        EXPECT_THROW(e.rethrow_nested(), OutOfMemory);
    }
    EXPECT_EQ(attempts, 3);
    EXPECT_EQ(device.release_cached_calls(), 3u);
    EXPECT_EQ(guard.stats().ooms, 3u);
    EXPECT_EQ(guard.stats().retries, 2u);
    EXPECT_LE(clock.slept(), 2 * options.retry_delay);
}

TEST_F(GuardTest, AnAllocationLargerThanTheWholeDeviceIsNotRetried) {
    Guard<SimulatedDevice> guard(device, options);
    int attempts = 0;
    try {
        guard.load(key, 1_GiB, [&] {
            ++attempts;
            return device.allocate(11_GiB);
        });
        FAIL();
    } catch (const OomExhausted& e) {
        EXPECT_EQ(e.attempts(), 1u);
    }
    EXPECT_EQ(attempts, 1);
    EXPECT_EQ(clock.slept(), Duration::zero());
}

TEST_F(GuardTest, AfterAnOomAStaleReadingIsNotTakenForMemoryComingBack) {
    // The driver reports 2 s late. Another process takes 6 GiB just before the load; the stale
    // reading still says 10 GiB free. Retrying on that reading would fail again at once.
    Guard<SimulatedDevice> guard(device, options);
    device.set_report_lag(2s, clock.clock_fn());
    clock.advance(3s);
    device.set_external_usage(6_GiB);
    clock.after(10s, [&] { device.set_external_usage(0); });
    int attempts = 0;
    auto model = guard.load(key, 5_GiB, [&] {
        ++attempts;
        return device.allocate(5_GiB);
    });
    EXPECT_EQ(attempts, 2);  // one failure, then the retry after the memory really came back
    EXPECT_GE(clock.slept(), 3s + 10s);
    EXPECT_LE(clock.slept(), 3s + 10s + 2s + options.poll_interval);
}

struct NotAStdException {
    int code;
};

TEST_F(GuardTest, NonOomExceptionsPassThroughUntouchedAndAreNeverRetried) {
    Guard<SimulatedDevice> guard(device, options);
    int calls = 0;
    EXPECT_THROW(guard.load(key, 1_GiB,
                            [&]() -> int {
                                ++calls;
                                throw std::runtime_error("bad checkpoint");
                            }),
                 std::runtime_error);
    try {
        guard.load(key, 1_GiB, [&]() -> int { throw NotAStdException{42}; });
        FAIL() << "expected NotAStdException";
    } catch (const NotAStdException& e) {
        EXPECT_EQ(e.code, 42);
    }
    const auto items = iota_items(10);
    int encode_calls = 0;
    try {
        guard.encode(key, items, [&](auto) -> std::vector<int> {
            ++encode_calls;
            throw std::invalid_argument("tokenizer failed");
        });
        FAIL();
    } catch (const std::invalid_argument& e) {
        EXPECT_STREQ(e.what(), "tokenizer failed");
    }
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(encode_calls, 1);
    EXPECT_EQ(guard.stats().ooms, 0u);
    EXPECT_EQ(device.release_cached_calls(), 0u);
}

TEST_F(GuardTest, DriverLevelOomIsReportedNotRetried) {
    Guard<SimulatedDevice> guard(device, options);
    int calls = 0;
    try {
        guard.load(key, 1_GiB, [&]() -> int {
            ++calls;
            throw OutOfMemory("CUDA error: out of memory", OomKind::driver);
        });
        FAIL();
    } catch (const OutOfMemory& e) {
        EXPECT_EQ(e.kind(), OomKind::driver);
    }
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(guard.stats().ooms, 1u);
    EXPECT_TRUE(log.contains("not retried"));
}

TEST_F(GuardTest, ZeroDeclaredBytesIsRejectedWithAClearMessage) {
    Guard<SimulatedDevice> guard(device, options);
    try {
        guard.load(key, 0, [] {});
        FAIL();
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("declared_bytes"), std::string::npos);
    }
}

// ---- encode --------------------------------------------------------------------------------

TEST_F(GuardTest, EncodeHalvesSixtyFourDownToOneThenRunsSingleItemsThroughTheSemaphore) {
    options.forget_failure_after = 1000;  // no probing back up within this call
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(8_GiB + 512_MiB);  // 1.5 GiB free: one 1 GiB item at a time
    const auto items = iota_items(64);
    ItemByItemEncoder encoder{device, 1_GiB, {}};
    const std::vector<int> results = guard.encode(key, items, std::ref(encoder));

    EXPECT_EQ(results, times_ten(items));
    const std::vector<std::size_t> halving(encoder.sizes.begin(), encoder.sizes.begin() + 7);
    EXPECT_EQ(halving, (std::vector<std::size_t>{64, 32, 16, 8, 4, 2, 1}));
    for (std::size_t i = 6; i < encoder.sizes.size(); ++i) EXPECT_EQ(encoder.sizes[i], 1u);
    const Stats stats = guard.stats();
    EXPECT_EQ(stats.halvings, 6u);
    EXPECT_EQ(stats.ooms, 6u);
    EXPECT_EQ(stats.single_item_calls, 64u);
    EXPECT_EQ(device.release_cached_calls(), 6u);  // once per OOM
    EXPECT_EQ(guard.learned_batch_ceiling(key), 1u);
    EXPECT_EQ(log.count(Level::error), 0u);
    EXPECT_GE(log.count(Level::warn), 6u);
}

TEST_F(GuardTest, EncodeUsesTheOomReportToJumpStraightToWhatFits) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(1_GiB);  // 9 GiB free
    const auto items = iota_items(64);
    TensorEncoder encoder{device, 1_GiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(encoder)), times_ten(items));
    // 64 GiB asked with 9 GiB free: 64 x 9/64 = 9 items, not 32 then 16 then 8.
    EXPECT_EQ(encoder.sizes.front(), 64u);
    EXPECT_EQ(encoder.sizes[1], 9u);
    EXPECT_EQ(guard.stats().ooms, 1u);
}

TEST_F(GuardTest, ResultsComeBackExactlyOnceInInputOrderUnderInjectedOoms) {
    Guard<SimulatedDevice> guard(device, options);
    const auto items = iota_items(200);
    std::vector<int> completions(items.size(), 0);
    int chunk = 0;
    auto encoder = [&](const BatchView<std::vector<int>::const_iterator>& batch) {
        if (++chunk % 3 == 0) device.fail_next_allocations(1);  // every third chunk OOMs
        auto activations = device.allocate(64_MiB * batch.size());
        std::vector<int> out;
        for (int item : batch) out.push_back(item * 10);
        for (std::size_t i = 0; i < batch.size(); ++i) ++completions[batch.offset() + i];
        return out;
    };
    EXPECT_EQ(guard.encode(key, items, encoder), times_ten(items));
    for (std::size_t i = 0; i < items.size(); ++i) EXPECT_EQ(completions[i], 1) << "item " << i;
    EXPECT_GT(guard.stats().ooms, 0u);
}

TEST_F(GuardTest, AnItemThatOomsAloneIsNamedAndFinishedResultsAreKept) {
    Guard<SimulatedDevice> guard(device, options);
    const auto items = iota_items(12);
    auto encoder = [&](const BatchView<std::vector<int>::const_iterator>& batch) {
        std::vector<SimulatedDevice::Allocation> held;
        std::vector<int> out;
        for (int item : batch) {
            held.push_back(device.allocate(item == 7 ? 8_GiB : 100_MiB));
            out.push_back(item * 10);
        }
        return out;
    };
    device.set_external_usage(3_GiB);  // item 7 needs 8 GiB of the 7 GiB left, for good
    try {
        guard.encode(key, items, encoder);
        FAIL() << "item 7 can never fit";
    } catch (const OomExhausted& e) {
        ASSERT_TRUE(e.item_index().has_value());
        EXPECT_EQ(*e.item_index(), 7u);
        EXPECT_EQ(e.attempts(), options.single_item_attempts);
        EXPECT_EQ(e.finished_results<int>(), (std::vector<int>{0, 10, 20, 30, 40, 50, 60}));
        EXPECT_THROW(e.finished_results<double>(), std::bad_cast);
        EXPECT_THROW(e.rethrow_nested(), OutOfMemory);
        EXPECT_NE(std::string(e.what()).find("item 7"), std::string::npos) << e.what();
    }
    EXPECT_EQ(clock.slept(), 2 * options.item_retry_delay);  // waited between its attempts
    // The guard stays usable.
    const auto small = iota_items(5);
    EXPECT_EQ(guard.encode(key, small, encoder), times_ten(small));
}

TEST_F(GuardTest, AGuardThatForgetsToEmptyTheCacheFailsWhereTheRealOneRecovers) {
    // 8 GiB cached in 256 MiB blocks (fragmented), 0.5 GiB used elsewhere: the driver has 1.5 GiB,
    // and every item needs one 2 GiB block.
    auto fragment = [](SimulatedDevice& device) {
        std::vector<SimulatedDevice::Allocation> blocks;
        for (int i = 0; i < 32; ++i) blocks.push_back(device.allocate(256_MiB));
        device.set_external_usage(512_MiB);
    };
    const auto items = iota_items(4);
    auto encoder_for = [](SimulatedDevice& device) {
        return [&device](const BatchView<std::vector<int>::const_iterator>& batch) {
            auto activations = device.allocate(2_GiB * batch.size());
            std::vector<int> out;
            for (int item : batch) out.push_back(item * 10);
            return out;
        };
    };

    device.set_flush_cache_before_oom(false);  // strict: only release_cached() recovers
    fragment(device);
    Guard<SimulatedDevice> guard(device, options);
    EXPECT_EQ(guard.encode(key, items, encoder_for(device)), times_ten(items));

    SimulatedDevice other(10_GiB);
    other.set_flush_cache_before_oom(false);
    fragment(other);
    vramguard_test::ForgetfulProbe forgetful(other);
    Guard<vramguard_test::ForgetfulProbe> careless(forgetful, options);
    EXPECT_THROW(careless.encode(key, items, encoder_for(other)), OomExhausted);
}

TEST_F(GuardTest, LearnedCeilingIsReusedByTheNextCallAndByANewGuardOnTheSameProfileDir) {
    vramguard_test::TempDir dir;
    options.persist = true;
    options.profile_dir = dir.path();
    options.grow_after_successes = 1000;
    device.set_external_usage(1_GiB);
    const auto items = iota_items(64);
    {
        Guard<SimulatedDevice> guard(device, options);
        TensorEncoder first{device, 1_GiB, {}};
        guard.encode(key, items, std::ref(first));
        EXPECT_EQ(guard.learned_batch_ceiling(key), 9u);
        TensorEncoder second{device, 1_GiB, {}};
        EXPECT_EQ(guard.encode(key, items, std::ref(second)), times_ten(items));
        EXPECT_EQ(second.sizes.front(), 9u);
        EXPECT_EQ(guard.stats().ooms, 1u);  // only the first call paid
    }
    SimulatedDevice restarted(10_GiB);
    restarted.set_external_usage(1_GiB);
    Guard<SimulatedDevice> fresh(restarted, options);
    EXPECT_EQ(fresh.learned_batch_ceiling(key), 9u);
    TensorEncoder third{restarted, 1_GiB, {}};
    EXPECT_EQ(fresh.encode(key, items, std::ref(third)), times_ten(items));
    EXPECT_EQ(third.sizes.front(), 9u);
    EXPECT_EQ(fresh.stats().ooms, 0u);
}

TEST_F(GuardTest, CeilingGrowsBackOnceTheSqueezeIsOver) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(6_GiB);  // 4 GiB free: batches of 4
    const auto items = iota_items(64);
    TensorEncoder squeezed{device, 1_GiB, {}};
    guard.encode(key, items, std::ref(squeezed));
    EXPECT_EQ(guard.learned_batch_ceiling(key), 4u);

    device.set_external_usage(0);  // the other process left
    TensorEncoder relieved{device, 1_GiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(relieved)), times_ten(items));
    EXPECT_GT(guard.learned_batch_ceiling(key), 4u);
    EXPECT_GE(guard.stats().grow_backs, 1u);
    EXPECT_GT(*std::max_element(relieved.sizes.begin(), relieved.sizes.end()), 4u);
}

TEST_F(GuardTest, WeightedEncodeLearnsATokenBudgetAndHeavyItemsGoAlone) {
    options.grow_after_successes = 1000;  // no probing back up: the second pass must not OOM
    Guard<SimulatedDevice> guard(device, options);
    // 16 MiB per token: 10 GiB holds 640 tokens. Mostly 8-token items, every tenth 256 tokens.
    std::vector<int> tokens;
    for (int i = 0; i < 300; ++i) tokens.push_back(i % 10 == 9 ? 256 : 8);
    std::vector<std::uint64_t> batch_weights;
    auto encoder = [&](const BatchView<std::vector<int>::const_iterator>& batch) {
        std::uint64_t weight = 0;
        for (int t : batch) weight += static_cast<std::uint64_t>(t);
        batch_weights.push_back(weight);
        auto activations = device.allocate(16_MiB * weight);
        return std::vector<int>(batch.begin(), batch.end());
    };
    EXPECT_EQ(guard.encode(key, tokens, encoder, [](int t) { return t; }), tokens);
    const std::uint64_t budget = guard.learned_weight_budget(key);
    EXPECT_GT(budget, 0u);
    EXPECT_LE(budget, 640u);
    EXPECT_EQ(guard.learned_batch_ceiling(key), 0u);  // the count was never the limit

    // A second pass runs with the learned budget: no OOM, every batch within it.
    batch_weights.clear();
    const std::uint64_t ooms_before = guard.stats().ooms;
    EXPECT_EQ(guard.encode(key, tokens, encoder, [](int t) { return t; }), tokens);
    EXPECT_EQ(guard.stats().ooms, ooms_before);
    for (std::uint64_t weight : batch_weights) EXPECT_LE(weight, 640u);
}

TEST_F(GuardTest, PaddedWeightsBudgetBatchSizeTimesTheLongestItem) {
    options.grow_after_successes = 1000;
    Guard<SimulatedDevice> guard(device, options);
    // 16 MiB per padded token: 640 padded tokens fit.
    std::vector<int> tokens;
    for (int i = 0; i < 200; ++i) tokens.push_back(i % 10 == 9 ? 200 : 10);
    std::vector<std::uint64_t> padded_costs;
    auto encoder = [&](const BatchView<std::vector<int>::const_iterator>& batch) {
        const std::uint64_t longest =
            static_cast<std::uint64_t>(*std::max_element(batch.begin(), batch.end()));
        padded_costs.push_back(longest * batch.size());
        auto activations = device.allocate(16_MiB * longest * batch.size());
        return std::vector<int>(batch.begin(), batch.end());
    };
    auto tokens_of = [](int t) { return t; };
    EXPECT_EQ(guard.encode(key, tokens, encoder, padded(tokens_of)), tokens);
    const std::uint64_t budget = guard.learned_weight_budget(key);
    EXPECT_GT(budget, 0u);
    EXPECT_LE(budget, 640u);
    padded_costs.clear();
    const std::uint64_t ooms = guard.stats().ooms;
    EXPECT_EQ(guard.encode(key, tokens, encoder, padded(tokens_of)), tokens);
    EXPECT_EQ(guard.stats().ooms, ooms);  // the learned padded budget holds
    for (std::uint64_t cost : padded_costs) EXPECT_LE(cost, budget);
}

TEST_F(GuardTest, EmptyInputReturnsNothingAndNeverCallsTheBatchFunction) {
    Guard<SimulatedDevice> guard(device, options);
    const std::vector<int> none;
    int calls = 0;
    const auto results = guard.encode(key, none, [&](auto batch) {
        ++calls;
        return std::vector<int>(batch.size());
    });
    EXPECT_TRUE(results.empty());
    EXPECT_EQ(calls, 0);
}

TEST_F(GuardTest, ABatchFunctionReturningTheWrongCountIsAClearError) {
    Guard<SimulatedDevice> guard(device, options);
    const auto items = iota_items(4);
    try {
        guard.encode(key, items, [](auto) { return std::vector<int>{1}; });
        FAIL();
    } catch (const std::length_error& e) {
        EXPECT_NE(std::string(e.what()).find("returned 1 results for 4 items"), std::string::npos)
            << e.what();
    }
}

TEST_F(GuardTest, EncodeWorksOnIteratorPairsNonRandomAccessRangesAndVoidBatches) {
    Guard<SimulatedDevice> guard(device, options);
    const std::list<int> items = {1, 2, 3, 4, 5};
    int seen = 0;
    guard.encode(key, items.begin(), items.end(), [&](const auto& batch) {
        for (std::size_t i = 0; i < batch.size(); ++i) seen += batch[i];
    });
    EXPECT_EQ(seen, 15);
    const auto doubled = guard.encode(key, items, [](const auto& batch) {
        std::vector<long> out;
        for (int item : batch) out.push_back(item * 2L);
        return out;
    });
    EXPECT_EQ(doubled, (std::vector<long>{2, 4, 6, 8, 10}));
}

TEST_F(GuardTest, ALogSinkThatThrowsNeverBreaksTheGuard) {
    options.log = [](Level, std::string_view) { throw std::runtime_error("log backend down"); };
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(8_GiB);
    const auto items = iota_items(16);
    ItemByItemEncoder encoder{device, 1_GiB, {}};
    EXPECT_EQ(guard.encode(key, items, std::ref(encoder)), times_ten(items));
    EXPECT_GT(guard.stats().ooms, 0u);
}

TEST(GuardOptions, ValidationNamesTheFieldThatMakesNoSense) {
    SimulatedDevice device(1_GiB);
    auto expect_rejected = [&](Options options, const char* field) {
        options.persist = false;
        try {
            Guard<SimulatedDevice> guard(device, options);
            FAIL() << field << " should have been rejected";
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
        }
    };
    Options o;
    o.safety_margin = -0.1;
    expect_rejected(o, "safety_margin");
    o = {};
    o.safety_margin = std::nan("");
    expect_rejected(o, "safety_margin");
    o = {};
    o.history_headroom = 0.5;
    expect_rejected(o, "history_headroom");
    o = {};
    o.first_run_fraction = 0;
    expect_rejected(o, "first_run_fraction");
    o = {};
    o.load_attempts = 0;
    expect_rejected(o, "load_attempts");
    o = {};
    o.poll_interval = 0ms;
    expect_rejected(o, "poll_interval");
    o = {};
    o.single_item_attempts = 0;
    expect_rejected(o, "single_item_attempts");
    o = {};
    o.retry_delay = -1ms;
    expect_rejected(o, "retry_delay");
    o = {};
    o.clock = nullptr;
    expect_rejected(o, "clock");
}

// ---- recovery wait -------------------------------------------------------------------------

TEST_F(GuardTest, WaitForFreedMemoryReturnsWhenTheLaggyDriverCatchesUp) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_report_lag(1s, clock.clock_fn());
    auto model = device.allocate(4_GiB);
    clock.advance(2s);
    const std::uint64_t before = device.memory().free_bytes;
    model.release();
    device.release_cached();
    EXPECT_TRUE(guard.wait_for_freed_memory(4_GiB, before));
    EXPECT_GE(clock.slept(), 2s + 1s);
    EXPECT_LE(clock.slept(), 2s + 1s + options.poll_interval);
}

TEST_F(GuardTest, WaitForFreedMemoryTrustsTheEstimateAfterItsTimeout) {
    Guard<SimulatedDevice> guard(device, options);
    const std::uint64_t before = device.memory().free_bytes;
    EXPECT_FALSE(guard.wait_for_freed_memory(4_GiB, before));  // nothing is ever freed
    EXPECT_EQ(clock.slept(), options.recovery_timeout);
    // Enough already free: done at once.
    EXPECT_TRUE(guard.wait_for_freed_memory(4_GiB, before, 1_GiB));
    EXPECT_EQ(clock.slept(), options.recovery_timeout);
}

// ---- threads -------------------------------------------------------------------------------

TEST_F(GuardTest, ManyThreadsShareOneGuardWithoutLosingOrDuplicatingAnItem) {
    Guard<SimulatedDevice> guard(device, options);
    constexpr int threads = 8, calls = 25, per_call = 37;
    std::vector<std::atomic<int>> completions(threads * calls * per_call);
    std::atomic<int> wrong{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            for (int c = 0; c < calls; ++c) {
                std::vector<int> items(per_call);
                std::iota(items.begin(), items.end(), (t * calls + c) * per_call);
                auto encoder = [&](const BatchView<std::vector<int>::const_iterator>& batch) {
                    auto activations = device.allocate(512_MiB * batch.size());
                    std::vector<int> out;
                    for (int item : batch) {
                        out.push_back(item * 10);
                        completions[static_cast<std::size_t>(item)].fetch_add(1);
                    }
                    return out;
                };
                try {
                    if (guard.encode(Key::of("shared"), items, encoder) != times_ten(items))
                        ++wrong;
                } catch (const OomExhausted&) {
                    ++wrong;  // 512 MiB always fits alone: must not happen
                }
            }
        });
    }
    for (auto& worker : workers) worker.join();
    EXPECT_EQ(wrong.load(), 0);
    for (std::size_t i = 0; i < completions.size(); ++i)
        ASSERT_EQ(completions[i].load(), 1) << "item " << i;
    EXPECT_GT(guard.stats().ooms, 0u);  // 8 threads x 37 x 512 MiB cannot all fit on 10 GiB
    EXPECT_EQ(guard.stats().calls, static_cast<std::uint64_t>(threads * calls));
}

TEST_F(GuardTest, AtSizeOneConcurrentCallersTakeTurnsThroughTheDeviceSemaphore) {
    options.forget_failure_after = 1000000;
    options.safety_margin = 0;  // 1.5 GiB free must admit one measured 1.2 GiB item
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(8_GiB + 512_MiB);  // one 1 GiB item at a time
    ItemByItemEncoder warmup{device, 1_GiB, {}};
    guard.encode(key, iota_items(8), std::ref(warmup));
    ASSERT_EQ(guard.learned_batch_ceiling(key), 1u);

    std::atomic<int> inside{0}, most{0}, failures{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < 6; ++t) {
        workers.emplace_back([&] {
            const auto items = iota_items(20);
            auto encoder = [&](const BatchView<std::vector<int>::const_iterator>& batch) {
                const int now = ++inside;
                int seen = most.load();
                while (now > seen && !most.compare_exchange_weak(seen, now)) {
                }
                std::this_thread::yield();
                auto activations = device.allocate(1_GiB * batch.size());
                --inside;
                return std::vector<int>(batch.begin(), batch.end());
            };
            try {
                if (guard.encode(key, items, encoder) != items) ++failures;
            } catch (...) {
                ++failures;
            }
        });
    }
    for (auto& worker : workers) worker.join();
    EXPECT_EQ(failures.load(), 0);
    EXPECT_EQ(most.load(), 1);
    EXPECT_EQ(guard.stats().ooms, 3u);  // only the warm-up's halvings: 8 -> 4 -> 2 -> 1
}

}  // namespace
