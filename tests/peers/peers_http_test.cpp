// SPDX-License-Identifier: MIT
// The HTTP peers (peers_http.hpp) against fake services on loopback that hold bytes of a
// SimulatedDevice: each adapter frees them, a registry's load then fits without an OOM; a busy
// ComfyUI queue is not asked; a peer that is down, slow or speaks garbage costs at most its
// timeout and is an error answer, never an exception out of acquire() but InsufficientMemory.
#include <vramguard/peers_http.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "fake_services.hpp"
#include "guard_fixture.hpp"

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard::peers::Ask;
using vramguard::peers::HttpPeerOptions;
using vramguard_test::CapturedLog;
using vramguard_test::FakeComfyUi;
using vramguard_test::FakeLlamaRouter;
using vramguard_test::FakeOllama;
using vramguard_test::FakeVllm;
using vramguard_test::FakeVramguard;
using vramguard_test::test_options;

namespace {

bool has(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

HttpPeerOptions at(const std::string& url) {
    HttpPeerOptions options;
    options.url = url;
    return options;
}

ReliefRequest asking(std::uint64_t shortfall, Duration timeout = 2s) {
    return {shortfall, timeout, TimePoint{} + timeout, "embedder"};
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct Weights {
    SimulatedDevice::Allocation allocation;
};

// A registry on a 10 GiB simulated device (1 GiB safety margin) whose one model needs 4 GiB, with
// the given peers: what a vramguard server next to the fakes does.
class PeersHttpTest : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    CapturedLog log;
    Guard<SimulatedDevice> guard{device, test_options(clock, log)};
    std::unique_ptr<ModelRegistry<SimulatedDevice>> registry;

    std::shared_ptr<ModelSlot<Weights>> registry_with(std::vector<std::shared_ptr<Peer>> peers,
                                                      Duration timeout = 2s) {
        RegistryOptions options;
        options.peers = std::move(peers);
        options.peer_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(timeout);
        registry = std::make_unique<ModelRegistry<SimulatedDevice>>(guard, options);
        return registry->add<Weights>(
            "embedder", Key::of("embedder"),
            [this] { return std::make_shared<Weights>(Weights{device.allocate(4_GiB)}); }, 4_GiB);
    }
    void expect_loaded_without_oom(ModelSlot<Weights>& slot) {
        Lease<Weights> lease = slot.acquire();
        EXPECT_TRUE(slot.loaded());
        EXPECT_EQ(guard.stats().ooms, 0u);
        EXPECT_EQ(registry->stats().peer_reliefs, 1u);
    }
    void TearDown() override {
        registry.reset();
        EXPECT_EQ(log.count(Level::error), 0u);
    }
};

// ---- each adapter frees the fake's bytes, and the registry's load fits -----------------------

TEST_F(PeersHttpTest, OllamaUnloadsItsIdleModelAndTheLoadFits) {
    FakeOllama ollama(device);
    ollama.load("llama3:8b", 6_GiB, 120);  // last used 3 min ago, 2 min of keep_alive left
    ollama.start();
    auto embedder = registry_with({peers::make_http_peer("ollama", at(ollama.url()))});
    expect_loaded_without_oom(*embedder);
    EXPECT_FALSE(ollama.loaded("llama3:8b"));
    EXPECT_EQ(ollama.count("POST", "/api/generate"), 1u);
    const std::string answer = registry->status().peers.at(0).last_answer;
    EXPECT_TRUE(has(answer, "freed 6.00 GiB (claimed)")) << answer;
    EXPECT_TRUE(has(answer, "unloaded llama3:8b")) << answer;
}

TEST_F(PeersHttpTest, ComfyUiFreesWithBothFlagsAndTheLoadFits) {
    FakeComfyUi comfy(device);
    comfy.hold(6_GiB);
    comfy.start();
    auto embedder = registry_with({peers::make_http_peer("comfyui", at(comfy.url()))});
    expect_loaded_without_oom(*embedder);
    EXPECT_EQ(comfy.held(), 0u);
    const vramguard_test::json sent = comfy.last_free();
    ASSERT_TRUE(sent.contains("unload_models") && sent.contains("free_memory")) << sent.dump();
    EXPECT_EQ(sent["unload_models"], true);
    EXPECT_EQ(sent["free_memory"], true) << "the registry's relief unloads";
    EXPECT_EQ(registry->status().peers.at(0).last_answer,
              "freed 6.00 GiB (claimed) (models and node cache)");
}

TEST_F(PeersHttpTest, AVramguardServerUnloadsOnRequestAndTheLoadFits) {
    FakeVramguard server(device);
    server.hold(6_GiB, 42);
    server.start();
    auto embedder = registry_with({peers::make_http_peer("vramguard", at(server.url()))});
    expect_loaded_without_oom(*embedder);
    EXPECT_FALSE(server.loaded());
    EXPECT_DOUBLE_EQ(server.last_min_idle(), 30)
        << "the registry's relief asks for what the protocol gives up: idle 30 s";
}

TEST_F(PeersHttpTest, AVramguardServerKeepsAModelUsedWithinTheProtocolsThirtySeconds) {
    FakeVramguard server(device);
    server.hold(6_GiB, 10);  // used 10 s ago
    server.start();
    auto peer = peers::make_http_peer("vramguard", at(server.url()));
    EXPECT_EQ(describe(peer->ask(asking(1_GiB), Ask::unload)),
              "busy, idle 10 s (idle for less than asked)");
    EXPECT_TRUE(server.loaded());
}

TEST_F(PeersHttpTest, TodaysVramguardServerAnswerIsUnderstood) {
    FakeVramguard server(device);
    server.answer_like_today();
    server.hold(6_GiB, 42);
    server.start();
    auto peer = peers::make_http_peer("vramguard", at(server.url()));
    const PeerReply idle_ask = peer->ask(asking(1_GiB), Ask::idle);  // min idle 60 s > 42 s
    EXPECT_EQ(describe(idle_ask), "busy, idle 42 s");
    EXPECT_DOUBLE_EQ(server.last_min_idle(), 60);
    auto embedder = registry_with({peer});
    expect_loaded_without_oom(*embedder);
    EXPECT_EQ(registry->status().peers.at(0).last_answer, "freed 6.00 GiB (claimed)");
    EXPECT_EQ(describe(peer->ask(asking(1_GiB), Ask::unload)), "nothing to free");
}

TEST_F(PeersHttpTest, ANewVramguardServerSaysBusyWithItsIdleSeconds) {
    FakeVramguard server(device);
    server.hold(6_GiB, 12);
    server.start();
    auto peer = peers::make_http_peer("vramguard", at(server.url()));
    EXPECT_EQ(describe(peer->ask(asking(1_GiB), Ask::idle)),
              "busy, idle 12 s (idle for less than asked)");
    const peers::Holding held = peer->holding();
    ASSERT_TRUE(held.bytes);
    EXPECT_EQ(*held.bytes, 6_GiB);
}

TEST_F(PeersHttpTest, TheLlamaCppRouterUnloadsItsLoadedModelsOnly) {
    FakeLlamaRouter router(device);
    router.load("qwen2.5-7b", 6_GiB);
    router.list_unloaded("gemma-2b");
    router.start();
    auto embedder = registry_with({peers::make_http_peer("llamacpp", at(router.url()))});
    expect_loaded_without_oom(*embedder);
    EXPECT_FALSE(router.loaded("qwen2.5-7b"));
    EXPECT_EQ(router.count("POST", "/models/unload"), 1u) << "gemma-2b is not loaded: not asked";
    const std::string answer = registry->status().peers.at(0).last_answer;
    EXPECT_TRUE(has(answer, "unloaded qwen2.5-7b")) << answer;
    auto peer = peers::make_http_peer("llamacpp", at(router.url()));
    EXPECT_EQ(peer->ask(asking(1_GiB), Ask::idle).answer, PeerAnswer::nothing)
        << "an unload stops generation: never for idle models only";
}

TEST_F(PeersHttpTest, VllmSleepsWhenNoRequestRunsAndTheLoadFits) {
    FakeVllm vllm(device);
    vllm.hold(6_GiB);
    vllm.start();
    HttpPeerOptions options = at(vllm.url());
    options.unknown_freed_bytes = 6_GiB;
    auto embedder = registry_with({peers::make_http_peer("vllm", options)});
    expect_loaded_without_oom(*embedder);
    EXPECT_TRUE(vllm.asleep());
    EXPECT_EQ(vllm.level(), 1);
}

TEST_F(PeersHttpTest, VllmWithRequestsRunningIsBusyAndNotPutToSleep) {
    FakeVllm vllm(device);
    vllm.hold(6_GiB);
    vllm.set_running(2);
    vllm.start();
    auto peer = peers::make_http_peer("vllm", at(vllm.url()));
    EXPECT_EQ(describe(peer->ask(asking(1_GiB), Ask::unload)), "busy (2 request(s) running)");
    EXPECT_FALSE(vllm.asleep());
    EXPECT_EQ(vllm.count("POST", "/sleep"), 0u);
}

// ---- ComfyUI: a busy queue is not asked ---------------------------------------------------------

TEST_F(PeersHttpTest, ABusyComfyUiQueueIsNotAskedToFree) {
    FakeComfyUi comfy(device);
    comfy.hold(6_GiB);
    comfy.set_running(1);
    comfy.start();
    auto embedder = registry_with({peers::make_http_peer("comfyui", at(comfy.url()))});
    try {
        embedder->acquire();
        FAIL() << "admitted";
    } catch (const InsufficientMemory& e) {
        EXPECT_TRUE(has(e.what(), "busy (1 running, 0 pending)")) << e.what();
    }
    EXPECT_EQ(comfy.count("POST", "/free"), 0u);
    EXPECT_EQ(comfy.held(), 6_GiB);
    EXPECT_EQ(guard.stats().ooms, 0u);
}

// Prompts waiting in the queue need their models as soon as the running one ends: busy too.
TEST_F(PeersHttpTest, AComfyUiWithOnlyPendingPromptsIsBusyAndNotAskedToFree) {
    FakeComfyUi comfy(device);
    comfy.hold(6_GiB);
    comfy.set_pending(2);
    comfy.start();
    auto peer = peers::make_http_peer("comfyui", at(comfy.url()));
    EXPECT_EQ(describe(peer->ask(asking(1_GiB), Ask::unload)), "busy (0 running, 2 pending)");
    EXPECT_EQ(comfy.count("POST", "/free"), 0u);
    EXPECT_EQ(comfy.held(), 6_GiB);
}

// ---- Ollama: a pinned model stays ---------------------------------------------------------------

TEST_F(PeersHttpTest, AnOllamaModelPinnedForeverIsSkipped) {
    FakeOllama ollama(device);
    ollama.load("pinned:70b", 5_GiB, 293.0 * 365 * 86400);  // keep_alive -1: about 2318
    ollama.load("idle:1b", 1_GiB, 30);
    ollama.start();
    auto peer = peers::make_http_peer("ollama", at(ollama.url()));
    const PeerReply reply = peer->ask(asking(6_GiB), Ask::unload);
    EXPECT_EQ(reply.answer, PeerAnswer::freed);
    EXPECT_EQ(reply.claimed_bytes, 1_GiB);
    EXPECT_TRUE(has(reply.detail, "kept pinned:70b pinned")) << reply.detail;
    EXPECT_TRUE(ollama.loaded("pinned:70b"));
    EXPECT_FALSE(ollama.loaded("idle:1b"));
    EXPECT_EQ(ollama.count("POST", "/api/generate"), 1u);
    const PeerReply again = peer->ask(asking(6_GiB), Ask::unload);
    EXPECT_EQ(describe(again), "busy (pinned:70b pinned)");
}

TEST_F(PeersHttpTest, OllamaAskedForIdleModelsKeepsOneUsedAMomentAgo) {
    FakeOllama ollama(device);
    ollama.load("recent", 2_GiB, 290);  // used 10 s ago with the default keep_alive of 5 min
    ollama.load("old", 3_GiB, 100);     // used 200 s ago
    ollama.start();
    auto peer = peers::make_http_peer("ollama", at(ollama.url()));
    const PeerReply reply = peer->ask(asking(10_GiB), Ask::idle);
    EXPECT_EQ(describe(reply), "freed 3.00 GiB (claimed) (unloaded old; kept recent in use)");
    EXPECT_TRUE(ollama.loaded("recent"));
    const peers::Holding held = peer->holding();
    ASSERT_TRUE(held.bytes);
    EXPECT_EQ(*held.bytes, 2_GiB);
}

// ---- down, slow, garbage: errors within the timeout, never exceptions ---------------------------

TEST_F(PeersHttpTest, APeerThatIsDownIsAnErrorWithinItsTimeout) {
    const int port = vramguard_test::closed_port();
    auto peer = peers::make_http_peer("ollama", at("http://127.0.0.1:" + std::to_string(port)));
    // A refused connection is an answer at once: the call must not sit out (or retry until) its
    // timeout. The timeout is long, so a loaded machine's slowness cannot reach it.
    const auto start = std::chrono::steady_clock::now();
    const PeerReply reply = peer->ask(asking(1_GiB, 10s), Ask::unload);
    EXPECT_LT(seconds_since(start), 10.0) << "sat out its timeout";
    EXPECT_EQ(reply.answer, PeerAnswer::error);
    EXPECT_TRUE(has(reply.detail, "cannot connect")) << reply.detail;
}

TEST_F(PeersHttpTest, ASlowPeerIsAnErrorWithinItsTimeoutPlusSlack) {
    FakeComfyUi comfy(device);
    comfy.hold(6_GiB);
    comfy.make_slow();
    comfy.start();
    auto peer = peers::make_http_peer("comfyui", at(comfy.url()));
    const auto start = std::chrono::steady_clock::now();
    const PeerReply reply = peer->ask(asking(1_GiB, 300ms), Ask::unload);
    const double took = seconds_since(start);
    EXPECT_GE(took, 0.25);
    // The fake holds its answer for 10 s (or until released): ending at half of that is the
    // timeout's doing, whatever the load on the machine.
    EXPECT_LT(took, 5.0) << "waited for the slow peer instead of its 300 ms timeout";
    EXPECT_EQ(reply.answer, PeerAnswer::error);
    EXPECT_TRUE(has(reply.detail, "no answer in time")) << reply.detail;
    comfy.release();
}

TEST_F(PeersHttpTest, ARegistryWithDownSlowAndGarbagePeersRefusesWithInsufficientMemoryOnly) {
    FakeOllama slow(device), garbage(device);
    slow.make_slow();
    garbage.speak_garbage();
    slow.start();
    garbage.start();
    device.set_external_usage(7_GiB);  // 3 GiB free, 5 GiB needed, nobody frees anything
    auto embedder = registry_with(
        {peers::make_http_peer(
             "ollama", at("http://127.0.0.1:" + std::to_string(vramguard_test::closed_port()))),
         peers::make_http_peer("ollama", at(slow.url())),
         peers::make_http_peer("comfyui", at(garbage.url()))},
        300ms);
    const auto start = std::chrono::steady_clock::now();
    try {
        embedder->acquire();
        FAIL() << "admitted";
    } catch (const InsufficientMemory& e) {
        EXPECT_TRUE(has(e.what(), "cannot connect")) << e.what();
        EXPECT_TRUE(has(e.what(), "no answer")) << e.what();
        EXPECT_TRUE(has(e.what(), "not JSON")) << e.what();
    }
    // The slow peer holds its answer for 10 s: under half of that, its 300 ms timeout ended it.
    EXPECT_LT(seconds_since(start), 5.0) << "a peer cost more than its timeout";
    EXPECT_EQ(guard.stats().ooms, 0u);
    slow.release();
}

TEST_F(PeersHttpTest, GarbageAndWrongTypesAreErrors) {
    FakeOllama garbage(device), wrong(device);
    garbage.speak_garbage();
    wrong.load("m", 1_GiB, 10);
    wrong.wrong_types();
    garbage.start();
    wrong.start();
    for (const char* kind : {"vramguard", "ollama", "comfyui", "llamacpp", "vllm"}) {
        const PeerReply reply =
            peers::make_http_peer(kind, at(garbage.url()))->ask(asking(1_GiB), Ask::unload);
        EXPECT_EQ(reply.answer, PeerAnswer::error) << kind << ": " << describe(reply);
    }
    const PeerReply typed =
        peers::make_http_peer("ollama", at(wrong.url()))->ask(asking(1_GiB), Ask::unload);
    EXPECT_EQ(describe(typed), "error: garbage answer: \"size_vram\" is not a number");
    EXPECT_TRUE(wrong.loaded("m"));
}

TEST_F(PeersHttpTest, TheBearerTokenIsSentWhenConfigured) {
    FakeVramguard server(device);
    server.hold(2_GiB, 100);
    server.require_token("s3cret");
    server.start();
    const PeerReply refused =
        peers::make_http_peer("vramguard", at(server.url()))->ask(asking(1_GiB), Ask::unload);
    EXPECT_EQ(describe(refused),
              "error: POST /request-unload?min_idle_seconds=30: HTTP 401: unauthorized");
    EXPECT_TRUE(server.loaded());
    HttpPeerOptions options = at(server.url());
    options.bearer_token = "s3cret";
    const PeerReply reply =
        peers::make_http_peer("vramguard", options)->ask(asking(1_GiB), Ask::unload);
    EXPECT_EQ(reply.answer, PeerAnswer::freed) << describe(reply);
    EXPECT_FALSE(server.loaded());
    const std::vector<FakeVramguard::Seen> seen = server.seen();
    ASSERT_EQ(seen.size(), 2u);
    EXPECT_EQ(seen[0].authorization, "");
    EXPECT_EQ(seen[1].authorization, "Bearer s3cret");
}

// ---- host names: resolved within the request's time ------------------------------------------

TEST_F(PeersHttpTest, AHostNameIsResolvedAndTheCallReachesTheService) {
    FakeVramguard server(device);
    server.hold(2_GiB, 100);
    server.start();
    // The system's resolver: "localhost" is in every /etc/hosts, as 127.0.0.1 (and maybe ::1
    // first).
    const PeerReply by_system =
        peers::make_http_peer("vramguard", at("http://localhost:" + std::to_string(server.port())))
            ->ask(asking(1_GiB), Ask::unload);
    EXPECT_EQ(by_system.answer, PeerAnswer::freed) << describe(by_system);
    // A resolver of one's own (service discovery): the name it is given is the URL's.
    server.hold(2_GiB, 100);
    HttpPeerOptions options = at("http://gpu-peer.test:" + std::to_string(server.port()));
    std::vector<std::string> asked;
    options.resolve = [&asked](const std::string& host) {
        asked.push_back(host);
        return std::string("127.0.0.1");
    };
    const PeerReply by_hook =
        peers::make_http_peer("vramguard", options)->ask(asking(1_GiB), Ask::unload);
    EXPECT_EQ(by_hook.answer, PeerAnswer::freed) << describe(by_hook);
    EXPECT_EQ(asked, std::vector<std::string>{"gpu-peer.test"});
}

TEST_F(PeersHttpTest, AResolverThatHangsCostsTheRequestItsTimeoutNotTheResolvers) {
    // A DNS server that does not answer holds getaddrinfo for its own timeout (5 s per attempt by
    // default): here a resolver that waits until the test lets it go.
    struct Gate {
        std::mutex mutex;
        std::condition_variable opened;
        bool open = false;
    };
    auto gate = std::make_shared<Gate>();
    HttpPeerOptions options = at("http://stuck-dns.test:9");
    options.resolve = [gate](const std::string&) {
        std::unique_lock<std::mutex> lock(gate->mutex);
        gate->opened.wait(lock, [&] { return gate->open; });
        return std::string("127.0.0.1");
    };
    const auto start = std::chrono::steady_clock::now();
    const PeerReply reply =
        peers::make_http_peer("ollama", options)->ask(asking(1_GiB, 300ms), Ask::unload);
    const double took = seconds_since(start);
    {
        std::lock_guard<std::mutex> lock(gate->mutex);
        gate->open = true;
    }
    gate->opened.notify_all();
    // The resolver answers only once the call has returned, so returning at all proves that the
    // request's timeout, not the resolver, ended it: no upper bound on how fast.
    EXPECT_GE(took, 0.25);
    EXPECT_EQ(reply.answer, PeerAnswer::error);
    EXPECT_TRUE(has(reply.detail, "resolving \"stuck-dns.test\" took over")) << reply.detail;
}

TEST_F(PeersHttpTest, ANameThatDoesNotResolveIsAnErrorThatSaysSo) {
    HttpPeerOptions options = at("http://nowhere.test:9");
    options.resolve = [](const std::string&) { return std::string(); };
    EXPECT_EQ(describe(peers::make_http_peer("ollama", options)->ask(asking(1_GiB), Ask::unload)),
              "error: GET /api/ps: \"nowhere.test\" does not resolve");
    options.resolve = [](const std::string&) -> std::string {
        throw std::runtime_error("no route to the DNS server");
    };
    EXPECT_EQ(describe(peers::make_http_peer("ollama", options)->ask(asking(1_GiB), Ask::unload)),
              "error: GET /api/ps: resolving \"nowhere.test\" failed: no route to the DNS server");
}

// ---- configuration and parsing -----------------------------------------------------------------

TEST(PeersHttpConfig, NamesUrlsAndSpecs) {
    auto peer = peers::parse_http_peer("ollama=http://127.0.0.1:11434");
    EXPECT_EQ(peer->name(), "ollama@127.0.0.1:11434");
    EXPECT_EQ(peer->kind(), "ollama");
    HttpPeerOptions named = at("http://localhost:8188/comfy/");
    named.name = "comfy";
    EXPECT_EQ(peers::make_http_peer("comfyui", named)->name(), "comfy");
    EXPECT_THROW(peers::parse_http_peer("ollama"), std::invalid_argument);
    EXPECT_THROW(peers::parse_http_peer("=http://x:1"), std::invalid_argument);
    EXPECT_THROW(peers::parse_http_peer("tgi=http://x:1"), std::invalid_argument);
    EXPECT_THROW(peers::parse_http_peer("ollama=ftp://x:1"), std::invalid_argument);
    EXPECT_THROW(peers::parse_http_peer("ollama=http://x:99999"), std::invalid_argument);
    EXPECT_THROW(peers::parse_http_peer("ollama=http://:80"), std::invalid_argument);
    HttpPeerOptions bad = at("http://x:1");
    bad.connect_timeout = 0ms;
    EXPECT_THROW(peers::make_http_peer("ollama", bad), std::invalid_argument);
    bad = at("http://x:1");
    bad.vllm_sleep_level = 3;
    EXPECT_THROW(peers::make_http_peer("vllm", bad), std::invalid_argument);
}

TEST(PeersHttpConfig, Rfc3339AsGoWritesIt) {
    using peers::detail::parse_rfc3339;
    EXPECT_EQ(parse_rfc3339("1970-01-01T00:00:00Z"), 0.0);
    EXPECT_EQ(parse_rfc3339("2000-03-01T00:00:00Z"), 951868800.0);
    EXPECT_EQ(parse_rfc3339("2024-06-04T14:38:31-07:00"), 1717537111.0);
    const std::optional<double> fraction = parse_rfc3339("2024-06-04T21:38:31.5+00:00");
    ASSERT_TRUE(fraction);
    EXPECT_DOUBLE_EQ(*fraction, 1717537111.5);
    const std::optional<double> pinned = parse_rfc3339("2318-09-26T12:00:00.123456789Z");
    ASSERT_TRUE(pinned);
    EXPECT_GT(*pinned, 1.0e10) << "beyond what a nanosecond system_clock holds";
    for (const char* bad :
         {"", "2024-06-04", "2024-06-04T14:38:31", "2024-13-04T14:38:31Z", "2024-06-04T14:38:31.Z",
          "2024-06-04T14:38:31+0700", "2024-06-04T14:38:31Zjunk", "yesterday"})
        EXPECT_FALSE(parse_rfc3339(bad)) << bad;
}

}  // namespace
