// SPDX-License-Identifier: MIT
// The waits a request thread can meet, bounded (issue 24 item 3), and what one encode call may be
// told (EncodeOptions: a first-chunk hint, a deadline), and what an unload reports it freed. All
// against SimulatedDevice with a ManualClock: 30 s delays run in microseconds.
#include <vramguard/models.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"

#include <chrono>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::CapturedLog;
using vramguard_test::ForgetfulProbe;
using vramguard_test::test_options;

namespace {

using Items = std::vector<int>;
using View = BatchView<Items::const_iterator>;

Items numbered(int n) {
    Items items(static_cast<std::size_t>(n));
    std::iota(items.begin(), items.end(), 0);
    return items;
}

// A chunk takes `bytes_per_item` per item in one allocation; `huge_item` (when >= 0) takes
// `huge_bytes` on its own. Records the size of every chunk it is given.
struct Encoder {
    SimulatedDevice& device;
    std::uint64_t bytes_per_item;
    int huge_item = -1;
    std::uint64_t huge_bytes = 0;
    std::vector<std::size_t> sizes;

    Items operator()(const View& batch) {
        sizes.push_back(batch.size());
        std::uint64_t bytes = 0;
        for (int item : batch) bytes += item == huge_item ? huge_bytes : bytes_per_item;
        auto activations = device.allocate(bytes);
        return Items(batch.begin(), batch.end());
    }
};

class CallWaits : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    CapturedLog log;
    Options options = test_options(clock, log);  // every wait at its default
    Key key = Key::of("encoder", {{"dim", "768"}});
};

// ---- the bounds and their defaults -----------------------------------------------------------

TEST_F(CallWaits, AnItemRetryHasItsOwnBoundFarBelowTheLoadsRetryDelay) {
    const Options defaults;
    EXPECT_EQ(defaults.item_retry_delay, 2s);
    EXPECT_EQ(defaults.retry_delay, 30s);
    EXPECT_LT(defaults.item_retry_delay * (defaults.single_item_attempts - 1), 5s);
    options.item_retry_delay = -1ms;
    try {
        Guard<SimulatedDevice> guard(device, options);
        FAIL() << "a negative item_retry_delay is accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("item_retry_delay"), std::string::npos) << e.what();
    }
}

// An item that needs 8 GiB of the 7 GiB left, for good: each retry waits item_retry_delay (2 s),
// not retry_delay (30 s), and the message names the bound that was waited.
TEST_F(CallWaits, AnItemThatOomsAloneWaitsItemRetryDelayBeforeEachRetry) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(3_GiB);
    Encoder encoder{device, 100_MiB, 5, 8_GiB, {}};
    try {
        guard.encode(key, numbered(8), std::ref(encoder));
        FAIL() << "item 5 can never fit";
    } catch (const OomExhausted& e) {
        ASSERT_TRUE(e.item_index().has_value());
        EXPECT_EQ(*e.item_index(), 5u);
        EXPECT_EQ(e.attempts(), options.single_item_attempts);
        EXPECT_NE(std::string(e.what()).find("up to 2000 ms"), std::string::npos) << e.what();
    }
    EXPECT_EQ(clock.slept(), (options.single_item_attempts - 1) * options.item_retry_delay);
}

// A load whose OOM carries no numbers, on a device where nothing is short: the reading never
// moves, so nothing will come back. It waits recovery_timeout (how late a driver reports), not
// the whole retry_delay, before each retry: 10 s before OomExhausted instead of 60 s.
TEST_F(CallWaits, ALoadOomWithoutNumbersOnAnIdleDeviceDoesNotWaitTheWholeRetryDelay) {
    Guard<SimulatedDevice> guard(device, options);
    int calls = 0;
    EXPECT_THROW(guard.load(key, 2_GiB,
                            [&]() -> int {
                                ++calls;
                                throw OutOfMemory("CUDA out of memory.");
                            }),
                 OomExhausted);
    EXPECT_EQ(calls, static_cast<int>(options.load_attempts));
    EXPECT_EQ(clock.slept(), (options.load_attempts - 1) * options.recovery_timeout);
}

// The same OOM while memory really is short (the reading does not admit the load): waited for
// up to retry_delay, and retried within one poll of it coming back.
TEST_F(CallWaits, ALoadOomWhileMemoryIsShortStillWaitsForItToComeBack) {
    Guard<SimulatedDevice> guard(device, options);
    int calls = 0;
    auto weights = guard.load(key, 2_GiB, [&] {
        if (++calls == 1) {
            device.set_external_usage(9_GiB);
            clock.after(12s, [&] { device.set_external_usage(0); });
            throw OutOfMemory("CUDA out of memory.");
        }
        return device.allocate(2_GiB);
    });
    EXPECT_EQ(calls, 2);
    EXPECT_GE(clock.slept(), 12s);
    EXPECT_LE(clock.slept(), 12s + options.poll_interval);
}

// ---- EncodeOptions::deadline -------------------------------------------------------------------

TEST_F(CallWaits, NoItemRetryWaitGoesPastTheCallsDeadline) {
    Guard<SimulatedDevice> guard(device, options);
    device.set_external_usage(3_GiB);
    Encoder encoder{device, 100_MiB, 2, 8_GiB, {}};
    const TimePoint deadline = clock.now() + 1500ms;
    try {
        guard.encode(key, numbered(4), std::ref(encoder), EncodeOptions().with_deadline(deadline));
        FAIL() << "item 2 can never fit";
    } catch (const OomExhausted& e) {
        ASSERT_TRUE(e.item_index().has_value());
        EXPECT_EQ(*e.item_index(), 2u);
        EXPECT_EQ(e.attempts(), 2u) << "given up once the deadline passed, not 3 attempts";
        EXPECT_NE(std::string(e.what()).find("deadline"), std::string::npos) << e.what();
    }
    EXPECT_EQ(clock.now(), deadline);
}

TEST_F(CallWaits, AnEncodeAdmissionWaitEndsAtTheCallsDeadline) {
    options.admission_wait = 60s;
    Guard<SimulatedDevice> guard(device, options);
    Encoder encoder{device, 1_GiB, -1, 0, {}};
    guard.encode(key, numbered(2), std::ref(encoder));  // learns what one item costs
    device.set_external_usage(9_GiB + 512_MiB);         // not even one item fits now
    const TimePoint start = clock.now();
    EXPECT_THROW(guard.encode(key, numbered(2), std::ref(encoder),
                              EncodeOptions().with_deadline(start + 3s)),
                 InsufficientMemory);
    EXPECT_EQ(clock.now() - start, 3s) << "not admission_wait's 60 s";
    EXPECT_TRUE(log.contains("waiting up to 3000 ms")) << "the wait logged is the one waited";
}

// ---- EncodeOptions::first_chunk_limit --------------------------------------------------------

// The newcomer's case: 49 items of 1 GiB on a 10 GiB device, nothing known. Without a hint the
// first chunk is the whole batch (an OOM); with one, the first chunk is the hint, it is measured,
// and the model plans the rest.
TEST_F(CallWaits, AFirstChunkHintCutsTheFirstChunkOfANewKey) {
    Guard<SimulatedDevice> unhinted(device, options);
    Encoder plain{device, 1_GiB, -1, 0, {}};
    EXPECT_EQ(unhinted.encode(key, numbered(49), std::ref(plain)), numbered(49));
    EXPECT_EQ(plain.sizes.front(), 49u);
    EXPECT_GE(unhinted.stats().ooms, 1u);

    Guard<SimulatedDevice> guard(device, options);
    Encoder encoder{device, 1_GiB, -1, 0, {}};
    const Key fresh = Key::of("encoder", {{"dim", "1024"}});
    EXPECT_EQ(guard.encode(fresh, numbered(49), std::ref(encoder),
                           EncodeOptions().with_first_chunk_limit(4)),
              numbered(49));
    EXPECT_EQ(encoder.sizes.front(), 4u);
    EXPECT_EQ(guard.stats().ooms, 0u);
    EXPECT_GT(encoder.sizes.at(1), 4u) << "then planned from what the first chunk cost";
}

// Weighted: the hint is a weight, and the first chunk stops where the next item would exceed it.
TEST_F(CallWaits, AFirstChunkHintIsAWeightForAWeightedEncode) {
    Guard<SimulatedDevice> guard(device, options);
    Encoder encoder{device, 256_MiB, -1, 0, {}};
    const Items items = numbered(20);
    guard.encode(
        key, items, std::ref(encoder), [](int) { return 100; },
        EncodeOptions().with_first_chunk_limit(350));
    EXPECT_EQ(encoder.sizes.front(), 3u);
    EXPECT_EQ(guard.stats().ooms, 0u);
}

// A probe that measures nothing learns no model: the hint cuts every chunk of each call that
// passes it, and it is never stored as a learned limit.
TEST_F(CallWaits, AFirstChunkHintIsNeverStoredAsLearned) {
    ForgetfulProbe probe(device);
    Guard<ForgetfulProbe> guard(probe, options);
    Encoder encoder{device, 1_GiB, -1, 0, {}};
    guard.encode(key, numbered(10), std::ref(encoder), EncodeOptions().with_first_chunk_limit(4));
    EXPECT_EQ(encoder.sizes, (std::vector<std::size_t>{4, 4, 2}));
    EXPECT_EQ(guard.learned_batch_ceiling(key), 0u);
    EXPECT_EQ(guard.profiles().get(key).batch_ceiling, 0u);
}

// What the README shows, run: a hint and a deadline on one call.
TEST_F(CallWaits, TheReadmesEncodeOptionsSnippetRuns) {
    Guard<SimulatedDevice> guard(device, options);
    Encoder encoder{device, 128_MiB, -1, 0, {}};
    auto run_batch = std::ref(encoder);
    const Items texts = numbered(40);
    // [README: encode options]
    vramguard::EncodeOptions call;
    call.first_chunk_limit = 32;  // a key that learned nothing starts at 32, not the whole batch
    call.deadline = guard.options().clock() + std::chrono::seconds(2);  // the request's budget
    auto embeddings = guard.encode(key, texts, run_batch, call);
    // [README: encode options]
    EXPECT_EQ(embeddings, texts);
    EXPECT_EQ(encoder.sizes.front(), 32u);
}

// ---- UnloadResult::bytes ---------------------------------------------------------------------

struct Weights {
    explicit Weights(SimulatedDevice::Allocation held) : allocation(std::move(held)) {}
    SimulatedDevice::Allocation allocation;
};

// Declared 1.5 GiB, measured 1 GiB: what the unload frees is the measured peak.
TEST_F(CallWaits, AnUnloadReportsTheMeasuredPeakOverTheDeclaredSize) {
    Guard<SimulatedDevice> guard(device, options);
    ModelRegistry<SimulatedDevice> registry(guard);
    auto slot = registry.add<Weights>(
        "m", Key::of("m"), [this] { return std::make_shared<Weights>(device.allocate(1_GiB)); },
        1536_MiB);
    slot->acquire().release();
    EXPECT_EQ(slot->bytes(), 1_GiB);
    const UnloadResult result = slot->unload();
    EXPECT_TRUE(result.unloaded());
    EXPECT_EQ(result.bytes, 1_GiB);
}

// Nothing measured (a probe without peaks): the declared size is what is counted.
TEST_F(CallWaits, AnUnloadReportsTheDeclaredSizeWhenNothingWasMeasured) {
    ForgetfulProbe probe(device);
    Guard<ForgetfulProbe> guard(probe, options);
    ModelRegistry<ForgetfulProbe> registry(guard);
    auto slot = registry.add<Weights>(
        "m", Key::of("m"), [this] { return std::make_shared<Weights>(device.allocate(1_GiB)); },
        1536_MiB);
    slot->acquire().release();
    EXPECT_EQ(slot->unload().bytes, 1536_MiB);
}

}  // namespace
