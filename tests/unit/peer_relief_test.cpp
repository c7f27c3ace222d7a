// SPDX-License-Identifier: MIT
// Peer relief: a registry asks other services on its device to free memory when a load still does
// not fit after its own idle models went. The peers here are in-process: another ModelRegistry on
// the same SimulatedDevice behind a small adapter, and callables that lie, throw or hang. Time is
// a ManualClock; the only real-time wait is for a hung peer, bounded by its timeout.
#include <vramguard/peer.hpp>
#include <vramguard/relief.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

struct Weights {
    SimulatedDevice::Allocation allocation;
};

bool has(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

// Another registry as a peer: what a vramguard server's /request-unload does, in-process. It
// finds the registry when asked, so that two registries can be each other's peer.
class RegistryPeer : public Peer {
   public:
    using Registry = std::unique_ptr<ModelRegistry<SimulatedDevice>>;
    RegistryPeer(std::string name, const Registry& registry, Duration min_idle)
        : name_(std::move(name)), registry_(registry), min_idle_(min_idle) {}
    std::string name() const override { return name_; }
    PeerReply relieve(const ReliefRequest& request) override {
        return relief::reply_from(registry_->request_unload(min_idle_, request.shortfall));
    }

   private:
    std::string name_;
    const Registry& registry_;
    Duration min_idle_;
};

class PeerReliefTest : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};  // 1 GiB safety margin
    ManualClock clock;
    CapturedLog log;
    Guard<SimulatedDevice> guard_a{device, test_options(clock, log)};
    Guard<SimulatedDevice> guard_b{device, test_options(clock, log)};
    std::unique_ptr<ModelRegistry<SimulatedDevice>> a, b;  // b is declared last: destroyed first

    void make(std::vector<std::shared_ptr<Peer>> peers_of_a,
              RegistryOptions options_of_a = RegistryOptions{}) {
        options_of_a.peers = std::move(peers_of_a);
        a = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_a, options_of_a);
    }
    std::shared_ptr<ModelSlot<Weights>> add(ModelRegistry<SimulatedDevice>& registry,
                                            const std::string& name, std::uint64_t bytes) {
        return registry.add<Weights>(
            name, Key::of(name),
            [this, bytes] { return std::make_shared<Weights>(Weights{device.allocate(bytes)}); },
            bytes);
    }
    std::string refusal(ModelSlot<Weights>& slot) {
        try {
            slot.acquire();
        } catch (const InsufficientMemory& e) {
            EXPECT_FALSE(e.can_never_fit());
            return e.what();
        }
        ADD_FAILURE() << "admitted";
        return "";
    }
    void TearDown() override { EXPECT_EQ(log.count(Level::error), 0u); }
};

TEST_F(PeerReliefTest, APeerFreesAndTheLoadIsAdmittedWithoutAnOom) {
    b = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_b);
    auto reranker = add(*b, "reranker", 6_GiB);
    reranker->acquire().release();
    make({std::make_shared<RegistryPeer>("reranker@:8081", b, 0s)});
    auto embedder = add(*a, "embedder", 4_GiB);  // 4 GiB free, 5 GiB needed
    Lease<Weights> lease = embedder->acquire();
    EXPECT_TRUE(embedder->loaded());
    EXPECT_FALSE(reranker->loaded());
    EXPECT_EQ(guard_a.stats().ooms, 0u);
    EXPECT_EQ(a->stats().peer_requests, 1u);
    EXPECT_EQ(a->stats().peer_reliefs, 1u);
    EXPECT_EQ(b->stats().requested_unloads, 1u);
    EXPECT_EQ(clock.slept(), Duration::zero()) << "the memory showed at once";
    const RegistryStatus status = a->status();
    ASSERT_EQ(status.peers.size(), 1u);
    EXPECT_EQ(status.peers[0].name, "reranker@:8081");
    EXPECT_EQ(status.peers[0].last_answer, "freed 6.00 GiB (claimed)");
    EXPECT_EQ(status.peers[0].asked, 1u);
    EXPECT_DOUBLE_EQ(status.peers[0].cooldown_left_seconds, 30.0);
}

TEST_F(PeerReliefTest, ABusyPeerIsNamedInTheRefusalAndInStatus) {
    b = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_b);
    auto reranker = add(*b, "reranker", 6_GiB);
    reranker->acquire().release();
    clock.advance(3s);
    make({std::make_shared<RegistryPeer>("reranker@:8081", b, 10s)});
    auto embedder = add(*a, "embedder", 4_GiB);
    const std::string what = refusal(*embedder);
    EXPECT_TRUE(has(what, "Peers asked: reranker@:8081 busy, idle 3 s")) << what;
    EXPECT_TRUE(reranker->loaded());
    EXPECT_EQ(a->status().peers[0].last_answer, "busy, idle 3 s");
    EXPECT_EQ(clock.slept(), 3s) << "nothing claimed: nothing to wait for";
}

// Two servers on one device, each the other's peer, each needing the memory the other holds, asked
// in turn every second for 60 s: each peer is asked at most once per 30 s cooldown.
TEST_F(PeerReliefTest, TheCooldownStopsTwoRegistriesPingPongingTheirModels) {
    RegistryOptions options_b;
    options_b.peers = {std::make_shared<RegistryPeer>("a", a, 0s)};
    b = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_b, options_b);
    make({std::make_shared<RegistryPeer>("b", b, 0s)});
    auto model_a = add(*a, "model-a", 6_GiB), model_b = add(*b, "model-b", 6_GiB);
    int served = 0, refused = 0;
    for (int second = 0; second < 60; ++second) {
        auto& slot = second % 2 == 0 ? *model_a : *model_b;
        try {
            slot.acquire().release();
            ++served;
        } catch (const InsufficientMemory& e) {
            ++refused;
            if (refused == 1) {
                EXPECT_TRUE(has(e.what(), "not asked (cooling down")) << e.what();
            }
        }
        clock.advance(1s);
    }
    EXPECT_LE(a->stats().peer_requests, 2u);
    EXPECT_LE(b->stats().peer_requests, 2u);
    EXPECT_LE(a->stats().requested_unloads + b->stats().requested_unloads, 4u)
        << "without the cooldown every request would unload the other's model";
    EXPECT_GE(refused, 25) << "the model that stays loaded serves its own requests";
    EXPECT_EQ(served + refused, 60);
    EXPECT_EQ(guard_a.stats().ooms + guard_b.stats().ooms, 0u);
}

TEST_F(PeerReliefTest, AClaimIsNeverTrusted) {
    std::atomic<int> asked{0};
    make({make_peer("liar", [&](const ReliefRequest& request) {
        ++asked;
        EXPECT_EQ(request.shortfall, 3_GiB);
        EXPECT_EQ(request.timeout, 2s);
        return PeerReply::freed(8_GiB);
    })});
    device.set_external_usage(8_GiB);  // 2 GiB free, 5 GiB needed, nothing of its own to evict
    auto embedder = add(*a, "embedder", 4_GiB);
    const std::string what = refusal(*embedder);
    EXPECT_EQ(asked.load(), 1);
    EXPECT_TRUE(has(what,
                    "liar freed 8.00 GiB (claimed); the claimed memory did not show "
                    "within 5000 ms"))
        << what;
    EXPECT_EQ(clock.slept(), 5s) << "the recovery wait, bounded; then only the reading counts";
    EXPECT_EQ(device.allocated_bytes(), 0u) << "never loaded on the claim";
    EXPECT_EQ(guard_a.stats().ooms, 0u);
    EXPECT_EQ(a->stats().peer_reliefs, 0u);
}

TEST_F(PeerReliefTest, APeerThatThrowsIsAnErrorAnswerAndTheNextPeerIsAsked) {
    make({make_peer("thrower",
                    [](const ReliefRequest&) -> PeerReply { throw std::runtime_error("boom"); }),
          make_peer("nobody", [](const ReliefRequest&) { return PeerReply::nothing(); })});
    device.set_external_usage(8_GiB);
    auto embedder = add(*a, "embedder", 4_GiB);
    const std::string what = refusal(*embedder);
    EXPECT_TRUE(has(what, "Peers asked: thrower error: threw: boom; nobody nothing to free"))
        << what;
    EXPECT_EQ(a->stats().peer_requests, 2u);
}

// A peer that never answers costs the load its timeout, no more; the next peer is then asked.
TEST_F(PeerReliefTest, AHungPeerCostsItsTimeoutAndTheNextPeerStillHelps) {
    auto release = std::make_shared<std::promise<void>>();
    auto returned = std::make_shared<std::atomic<bool>>(false);
    std::shared_future<void> released = release->get_future().share();
    b = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_b);
    auto reranker = add(*b, "reranker", 6_GiB);
    reranker->acquire().release();
    RegistryOptions options;
    options.peer_timeout = 500ms;
    make({make_peer("hung",
                    [released, returned](const ReliefRequest&) {
                        released.wait();
                        *returned = true;
                        return PeerReply::freed(64_GiB);
                    }),
          std::make_shared<RegistryPeer>("reranker@:8081", b, 0s)},
         options);
    auto embedder = add(*a, "embedder", 4_GiB);
    Lease<Weights> lease = embedder->acquire();
    EXPECT_TRUE(embedder->loaded());
    EXPECT_GE(clock.slept(), 500ms);
    EXPECT_LE(clock.slept(), 500ms + guard_a.options().poll_interval);
    EXPECT_TRUE(log.contains("hung error: no answer within 500 ms; reranker@:8081 freed 6.00 GiB"));
    release->set_value();
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (!*returned && std::chrono::steady_clock::now() < give_up)
        std::this_thread::sleep_for(1ms);
    EXPECT_TRUE(*returned);
}

// Two registries on one device (two servers' worth in one process): while one of them is asking
// its peers, a load of the other does not ask its own at the same time (both would free memory for
// one shortfall); it is refused and says why.
TEST_F(PeerReliefTest, OneReliefPerDeviceAcrossRegistries) {
    std::mutex mutex;
    std::condition_variable changed;
    bool inside = false, released = false;
    std::atomic<int> asked_by_b{0};
    RegistryOptions options_a;
    options_a.peer_timeout = std::chrono::hours(1);  // never the reason the first relief ends
    make({make_peer("slow",
                    [&](const ReliefRequest&) {
                        std::unique_lock<std::mutex> lock(mutex);
                        inside = true;
                        changed.notify_all();
                        changed.wait_for(lock, 60s, [&] { return released; });  // safety net
                        return PeerReply::nothing();
                    })},
         options_a);
    RegistryOptions options_b;
    options_b.peers = {make_peer("counter", [&](const ReliefRequest&) {
        ++asked_by_b;
        return PeerReply::nothing();
    })};
    b = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_b, options_b);
    device.set_external_usage(8_GiB);  // 2 GiB free; each load needs 4 GiB + the 1 GiB margin
    auto first = add(*a, "first", 4_GiB), second = add(*b, "second", 4_GiB);
    std::string first_refusal;
    std::thread asking([&] { first_refusal = refusal(*first); });
    {
        std::unique_lock<std::mutex> lock(mutex);
        ASSERT_TRUE(changed.wait_for(lock, 60s, [&] { return inside; }))
            << "the first load never asked its peer";
    }
    const std::string what = refusal(*second);
    {
        std::lock_guard<std::mutex> lock(mutex);
        released = true;
    }
    changed.notify_all();
    asking.join();
    EXPECT_TRUE(has(what, "Peers asked: none (another load on this device is asking them)"))
        << what;
    EXPECT_EQ(asked_by_b.load(), 0) << "two reliefs at once on one device";
    EXPECT_EQ(b->stats().peer_requests, 0u);
    EXPECT_TRUE(has(first_refusal, "Peers asked: slow nothing to free")) << first_refusal;
    // Once the first relief is over, the device's turn is free again.
    refusal(*second);
    EXPECT_EQ(asked_by_b.load(), 1);
}

TEST_F(PeerReliefTest, ALoadThatCanNeverFitNeverAsksPeers) {
    std::atomic<int> asked{0};
    make({make_peer("counter", [&](const ReliefRequest&) {
        ++asked;
        return PeerReply::nothing();
    })});
    auto huge = add(*a, "huge", 20_GiB);
    try {
        huge->acquire();
        FAIL();
    } catch (const InsufficientMemory& e) {
        EXPECT_TRUE(e.can_never_fit());
    }
    EXPECT_EQ(asked.load(), 0);
}

TEST_F(PeerReliefTest, AFullCapOfBusyModelsDoesNotAskPeers) {
    std::atomic<int> asked{0};
    RegistryOptions options;
    options.max_loaded_models = 1;
    make({make_peer("counter",
                    [&](const ReliefRequest&) {
                        ++asked;
                        return PeerReply::nothing();
                    })},
         options);
    auto first = add(*a, "first", 1_GiB), second = add(*a, "second", 1_GiB);
    Lease<Weights> held = first->acquire();
    refusal(*second);
    EXPECT_EQ(asked.load(), 0) << "peers free memory, not slots under the cap";
}

TEST_F(PeerReliefTest, WhileARegistryLoadsItsRequestUnloadAnswersBusy) {
    make({});
    auto idle = add(*a, "idle", 1_GiB);
    idle->acquire().release();
    std::optional<UnloadResult> inside, by_name;
    auto loading = a->add<Weights>(
        "loading", Key::of("loading"),
        [&] {
            std::thread([&] {
                inside = a->request_unload(0s);
                by_name = a->request_unload("idle");
            }).join();
            return std::make_shared<Weights>(Weights{device.allocate(1_GiB)});
        },
        1_GiB);
    loading->acquire().release();
    ASSERT_TRUE(inside && by_name);
    EXPECT_TRUE(inside->busy());
    EXPECT_TRUE(inside->loading);
    EXPECT_TRUE(by_name->busy());
    EXPECT_EQ(describe(relief::reply_from(*inside)), "busy (loading a model)");
    EXPECT_TRUE(idle->loaded());
    const UnloadResult after = a->request_unload(0s, 1_GiB);
    EXPECT_TRUE(after.unloaded());
    EXPECT_EQ(after.bytes, 1_GiB) << "least recently used first, until the bytes wanted";
    EXPECT_FALSE(idle->loaded());
    EXPECT_TRUE(loading->loaded());
}

// ---- pure decisions --------------------------------------------------------------------------

// PeerRelief alone (what an external manager uses, without a registry): asked in order, each for
// what is still short, until the claims cover the shortfall; a peer asked within its cooldown is
// named but not asked; status() says when each was asked and its last answer.
TEST(PeerReliefRound, AsksInOrderUntilTheClaimsCoverTheShortfall) {
    ManualClock clock;
    std::vector<std::uint64_t> asked_for;
    auto peer = [&asked_for](const std::string& name, PeerReply reply) {
        return make_peer(name, [&asked_for, reply](const ReliefRequest& request) {
            asked_for.push_back(request.shortfall);
            return reply;
        });
    };
    PeerRelief relief({peer("busy", PeerReply::busy(3.0)), peer("small", PeerReply::freed(1_GiB)),
                       peer("big", PeerReply::freed(4_GiB)), peer("never", PeerReply::nothing())},
                      2s, 30s);
    const ReliefOutcome first =
        relief.ask(3_GiB, "model", clock.clock_fn(), clock.sleep_fn(), 10ms);
    EXPECT_EQ(first.claimed, 5_GiB);
    EXPECT_EQ(first.asked, 3u) << "covered after 'big': 'never' is not asked";
    EXPECT_EQ(asked_for, (std::vector<std::uint64_t>{3_GiB, 3_GiB, 2_GiB}));
    ASSERT_EQ(first.answers.size(), 3u);
    EXPECT_EQ(first.answers[0], "busy busy, idle 3 s");
    EXPECT_EQ(first.answers[2], "big freed 4.00 GiB (claimed)");

    clock.advance(10s);
    const ReliefOutcome second =
        relief.ask(3_GiB, "model", clock.clock_fn(), clock.sleep_fn(), 10ms);
    EXPECT_EQ(second.claimed, 0u);
    EXPECT_EQ(second.asked, 1u) << "only 'never' is out of its cooldown";
    EXPECT_EQ(second.answers[0], "busy not asked (cooling down, asked 10 s ago)");
    const std::vector<PeerStatus> status = relief.status(clock.now());
    ASSERT_EQ(status.size(), 4u);
    EXPECT_EQ(status[1].last_answer, "freed 1.00 GiB (claimed)");
    EXPECT_DOUBLE_EQ(status[1].cooldown_left_seconds, 20.0);
    EXPECT_EQ(status[3].asked, 1u);
    EXPECT_TRUE(relief.wait_for_calls(1s));
}

// Without a cooldown (a manager that rate-limits whole rounds), every round asks every peer.
TEST(PeerReliefRound, ZeroCooldownAsksEveryRound) {
    ManualClock clock;
    int asked = 0;
    PeerRelief relief({make_peer("p",
                                 [&asked](const ReliefRequest&) {
                                     ++asked;
                                     return PeerReply::nothing();
                                 })},
                      2s, Duration::zero());
    for (int round = 0; round < 3; ++round)
        EXPECT_EQ(relief.ask(1_GiB, "m", clock.clock_fn(), clock.sleep_fn(), 10ms).asked, 1u);
    EXPECT_EQ(asked, 3);
}

TEST(PeerReliefDecisions, ShortfallWorthAskingCooldownClaims) {
    EXPECT_EQ(relief::shortfall(5_GiB, 2_GiB), 3_GiB);
    EXPECT_EQ(relief::shortfall(5_GiB, 6_GiB), 0u);
    // never_fits, fits, at_cap
    EXPECT_TRUE(relief::worth_asking(false, false, false));
    EXPECT_FALSE(relief::worth_asking(true, false, false));
    EXPECT_FALSE(relief::worth_asking(false, true, false));
    EXPECT_FALSE(relief::worth_asking(false, false, true));
    const TimePoint t0 = TimePoint{} + 1h;
    EXPECT_FALSE(relief::cooling_down(std::nullopt, t0, 30s));
    EXPECT_TRUE(relief::cooling_down(t0 - 29s, t0, 30s));
    EXPECT_FALSE(relief::cooling_down(t0 - 30s, t0, 30s));
    EXPECT_FALSE(relief::cooling_down(t0, t0, 0s));
    EXPECT_EQ(relief::claimed(PeerReply::freed(2_GiB)), 2_GiB);
    EXPECT_EQ(relief::claimed(PeerReply::busy(3.0)), 0u);
    EXPECT_EQ(relief::claimed(PeerReply{PeerAnswer::error, 5_GiB, std::nullopt, "garbage"}), 0u)
        << "only a freed answer claims";
    EXPECT_TRUE(relief::covered(3_GiB, 3_GiB));
    EXPECT_FALSE(relief::covered(3_GiB - 1, 3_GiB));
}

TEST(PeerReliefDecisions, DescribeReadsLikeTheStatusLine) {
    EXPECT_EQ(describe(PeerReply::freed(2_GiB)), "freed 2.00 GiB (claimed)");
    EXPECT_EQ(describe(PeerReply::busy(3.2)), "busy, idle 3 s");
    EXPECT_EQ(describe(PeerReply::busy(std::nullopt, "2 leased")), "busy (2 leased)");
    EXPECT_EQ(describe(PeerReply::nothing()), "nothing to free");
    EXPECT_EQ(describe(PeerReply::error("connection refused")), "error: connection refused");
    EXPECT_EQ(std::string(to_string(PeerAnswer::busy)), "busy");
    EXPECT_THROW(make_peer("", [](const ReliefRequest&) { return PeerReply::nothing(); }),
                 std::invalid_argument);
    EXPECT_THROW(make_peer("x", nullptr), std::invalid_argument);
}

TEST(PeerReliefDecisions, MergeUnloadsAndReplyFrom) {
    UnloadResult unloaded{UnloadOutcome::unloaded, 40, 0, 2_GiB, false};
    UnloadResult unloaded2{UnloadOutcome::unloaded, 10, 0, 1_GiB, false};
    UnloadResult busy_idle{UnloadOutcome::busy, 3, 0, 0, false};
    UnloadResult busy_leased{UnloadOutcome::busy, 0, 2, 0, false};
    UnloadResult not_loaded{UnloadOutcome::not_loaded, 0, 0, 0, false};
    const UnloadResult both = relief::merge_unloads({unloaded, busy_leased, unloaded2});
    EXPECT_TRUE(both.unloaded());
    EXPECT_EQ(both.bytes, 3_GiB);
    EXPECT_DOUBLE_EQ(both.idle_seconds, 40);
    const UnloadResult busy = relief::merge_unloads({busy_idle, not_loaded, busy_leased});
    EXPECT_TRUE(busy.busy());
    EXPECT_DOUBLE_EQ(busy.idle_seconds, 3);
    EXPECT_EQ(busy.leases, 2);
    EXPECT_EQ(relief::merge_unloads({not_loaded}).outcome, UnloadOutcome::not_loaded);
    EXPECT_EQ(relief::merge_unloads({}).outcome, UnloadOutcome::not_loaded);
    EXPECT_EQ(describe(relief::reply_from(both)), "freed 3.00 GiB (claimed)");
    EXPECT_EQ(describe(relief::reply_from(busy_idle)), "busy, idle 3 s");
    EXPECT_EQ(describe(relief::reply_from(busy_leased)), "busy (2 leased)");
    EXPECT_EQ(describe(relief::reply_from(not_loaded)), "nothing to free");
}

TEST(PeerReliefDecisions, OptionsDefaultsAndValidation) {
    const RegistryOptions defaults;
    EXPECT_EQ(defaults.peer_timeout, 2s);
    EXPECT_EQ(defaults.peer_cooldown, 30s);
    EXPECT_TRUE(defaults.peers.empty());
    RegistryOptions o;
    o.peers = {nullptr};
    EXPECT_THROW(o.validate(), std::invalid_argument);
    o = RegistryOptions{};
    o.peer_timeout = 0ms;
    EXPECT_THROW(o.validate(), std::invalid_argument);
    o = RegistryOptions{};
    o.peer_cooldown = -1ms;
    EXPECT_THROW(o.validate(), std::invalid_argument);
}

}  // namespace
