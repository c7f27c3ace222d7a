// SPDX-License-Identifier: MIT
// Hostile peers (issue 19): a service next to us that drips its answer a byte at a time, answers
// a gigabyte or never stops, nests JSON a million deep, redirects to itself, speaks HTML or
// binary garbage, sends wrong types or absurd numbers. Every such answer is a PeerReply::error
// within the request's timeout, the process keeps its memory (RSS within 50 MB of before) and no
// thread is left reading. Real sockets on 127.0.0.1, real deadlines of a few hundred ms checked
// with generous upper bounds only.
#include <vramguard/peers_http.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"
#include "hostile_peer.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard::peers::Ask;
using vramguard::peers::HttpPeerOptions;
using vramguard_test::HostileConnection;
using vramguard_test::HostilePeer;

namespace {

const char* const all_kinds[] = {"vramguard", "ollama", "comfyui", "llamacpp", "vllm"};

bool has(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

ReliefRequest asking(Duration timeout) { return {1_GiB, timeout, TimePoint{} + timeout, "test"}; }

PeerReply ask(const char* kind, const HostilePeer& peer, Duration timeout = 2s) {
    HttpPeerOptions options;
    options.url = peer.url();
    return peers::make_http_peer(kind, options)->ask(asking(timeout), Ask::unload);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Waits up to 2 s for the thread count to come back to `before`; what it came back to.
int threads_settled_to(int before) {
    const auto until = std::chrono::steady_clock::now() + 2s;
    int now = vramguard_test::live_threads();
    while (now > before && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(10ms);
        now = vramguard_test::live_threads();
    }
    return now;
}

// An error answer that says `part`, with a detail fit for a log line.
void expect_error(const PeerReply& reply, const std::string& part, const std::string& what) {
    EXPECT_EQ(reply.answer, PeerAnswer::error) << what << ": " << describe(reply);
    EXPECT_TRUE(has(reply.detail, part)) << what << ": " << reply.detail;
    EXPECT_TRUE(protocol::is_valid_utf8(reply.detail)) << what;
    EXPECT_LE(reply.detail.size(), 1000u) << what;
}

std::string deep_json(std::size_t depth) {
    return std::string(depth, '[') + std::string(depth, ']');
}

// ---- time: a total deadline, whatever the pace ----------------------------------------------

TEST(HostilePeers, APeerDrippingItsHeadersIsCutAtTheDeadline) {
    HostilePeer peer([](HostileConnection& c) {
        if (c.send("HTTP/1.1 200 OK\r\n")) c.drip(std::string(1000, 'x'), 20ms);
    });
    const auto start = std::chrono::steady_clock::now();
    const PeerReply reply = ask("vramguard", peer, 300ms);
    const double took = seconds_since(start);
    expect_error(reply, "no answer in time", "drip");
    EXPECT_GE(took, 0.25);
    EXPECT_LT(took, 0.3 + 1.5) << "the deadline plus slack for a loaded machine";
}

TEST(HostilePeers, APeerDrippingItsBodyIsCutAtTheDeadlineForEveryKind) {
    HostilePeer peer([](HostileConnection& c) {
        const std::string body = R"({"status": "ok", "unloaded": true})" + std::string(500, ' ');
        const std::string all = HostilePeer::answer(body);
        const std::size_t head = all.find("\r\n\r\n") + 4;
        if (c.send(all.substr(0, head))) c.drip(all.substr(head), 20ms);
    });
    for (const char* kind : all_kinds) {
        const auto start = std::chrono::steady_clock::now();
        const PeerReply reply = ask(kind, peer, 300ms);
        const double took = seconds_since(start);
        expect_error(reply, "no answer in time", kind);
        EXPECT_LT(took, 0.3 + 1.5) << kind;
    }
}

TEST(HostilePeers, ARegistryGivingUpOnADrippingPeerLeavesNoThreadReading) {
    HostilePeer peer([](HostileConnection& c) {
        if (c.send("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"))
            c.drip(std::string(100000, ' '), 20ms);
    });
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    vramguard_test::CapturedLog log;
    Guard<SimulatedDevice> guard{device, vramguard_test::test_options(clock, log)};
    device.set_external_usage(8_GiB);
    const int before = vramguard_test::live_threads();
    {
        RegistryOptions options;
        HttpPeerOptions peer_options;
        peer_options.url = peer.url();
        options.peers = {peers::make_http_peer("vramguard", peer_options)};
        options.peer_timeout = 300ms;
        ModelRegistry<SimulatedDevice> registry(guard, options);
        auto slot = registry.add<int>(
            "m", Key::of("m"), [] { return std::make_shared<int>(1); }, 4_GiB);
        const auto start = std::chrono::steady_clock::now();
        EXPECT_THROW(slot->acquire(), InsufficientMemory);
        EXPECT_LT(seconds_since(start), 0.3 + 1.5);
    }
    EXPECT_EQ(threads_settled_to(before), before) << "a thread stayed behind, reading";
}

// ---- size: a cap on every answer --------------------------------------------------------------

// Runs `ask` while sampling this process's RSS; the largest growth seen, in bytes.
template <class Ask>
std::uint64_t largest_growth_while(Ask&& ask) {
    const std::uint64_t before = vramguard_test::resident_bytes();
    std::atomic<bool> done{false};
    std::atomic<std::uint64_t> peak{before};
    std::thread sampler([&] {
        while (!done) {
            const std::uint64_t now = vramguard_test::resident_bytes();
            if (now > peak) peak = now;
            std::this_thread::sleep_for(2ms);
        }
    });
    ask();
    done = true;
    sampler.join();
    const std::uint64_t most = std::max(peak.load(), vramguard_test::resident_bytes());
    return most > before ? most - before : 0;
}

TEST(HostilePeers, AGigabyteOrEndlessAnswerKeepsMemoryAndLeavesNoThread) {
    const std::string chunk(64 << 10, 'x');
    // Declared: 1 GiB of Content-Length, then streamed.
    HostilePeer declared([&](HostileConnection& c) {
        if (!c.send("HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")) return;
        for (int i = 0; i < (1 << 14) && c.send(chunk); ++i) {
        }
    });
    // Endless: chunked, never a last chunk; and close-delimited, never closed.
    HostilePeer chunked([&](HostileConnection& c) {
        if (!c.send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")) return;
        const std::string framed = "10000\r\n" + chunk + "\r\n";
        while (c.send(framed)) {
        }
    });
    HostilePeer unframed([&](HostileConnection& c) {
        if (!c.send("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")) return;
        while (c.send(chunk)) {
        }
    });
    const int before = vramguard_test::live_threads();
    for (const HostilePeer* peer : {&declared, &chunked, &unframed}) {
        for (const char* kind : all_kinds) {
            PeerReply reply;
            const auto start = std::chrono::steady_clock::now();
            const std::uint64_t growth =
                largest_growth_while([&] { reply = ask(kind, *peer, 5s); });
            expect_error(reply, "answer larger than 4194304 bytes", kind);
            EXPECT_LT(growth, 50u << 20) << kind;
            EXPECT_LT(seconds_since(start), 5.0) << kind << ": cut by size, not by the deadline";
        }
    }
    EXPECT_EQ(threads_settled_to(before), before);
}

TEST(HostilePeers, AnEndlessHeaderIsCutAtTheHeaderCapAndKeepsMemory) {
    HostilePeer line([](HostileConnection& c) {
        if (!c.send("HTTP/1.1 200 OK\r\nX-Long: ")) return;
        const std::string run(64 << 10, 'a');
        while (c.send(run)) {
        }
    });
    HostilePeer many([](HostileConnection& c) {
        if (!c.send("HTTP/1.1 200 OK\r\n")) return;
        std::string lines;
        for (int i = 0; i < 1000; ++i) lines += "X-A: b\r\n";
        while (c.send(lines)) {
        }
    });
    HostilePeer status_line([](HostileConnection& c) {
        const std::string run(64 << 10, 'H');
        while (c.send(run)) {
        }
    });
    HostilePeer continues([](HostileConnection& c) {
        std::string lines;
        for (int i = 0; i < 1000; ++i) lines += "HTTP/1.1 100 Continue\r\n\r\n";
        while (c.send(lines)) {
        }
    });
    const int before = vramguard_test::live_threads();
    for (const HostilePeer* peer : {&line, &many, &status_line, &continues}) {
        PeerReply reply;
        const auto start = std::chrono::steady_clock::now();
        const std::uint64_t growth =
            largest_growth_while([&] { reply = ask("vramguard", *peer, 5s); });
        expect_error(reply, "headers larger than 65536 bytes", peer->url());
        EXPECT_LT(growth, 50u << 20);
        EXPECT_LT(seconds_since(start), 5.0) << "cut by size, not by the deadline";
    }
    EXPECT_EQ(threads_settled_to(before), before);
}

TEST(HostilePeers, AnAbsurdTimeoutIsCappedNotOverflowed) {
    HostilePeer peer([](HostileConnection& c) {
        c.send(HostilePeer::answer(R"({"status": "ok", "unloaded": true})"));
    });
    HttpPeerOptions options;
    options.url = peer.url();
    const ReliefRequest request{1_GiB, Duration::max(), TimePoint::max(), "test"};
    const PeerReply reply = peers::make_http_peer("vramguard", options)->relieve(request);
    EXPECT_EQ(reply.answer, PeerAnswer::freed) << describe(reply);
}

TEST(HostilePeers, ABadContentLengthIsRefusedBeforeTheBody) {
    for (const char* length : {"-5", "18446744073709551616", "12abc"}) {
        HostilePeer peer([&](HostileConnection& c) {
            c.send(std::string("HTTP/1.1 200 OK\r\nContent-Length: ") + length + "\r\n\r\n{}");
        });
        expect_error(ask("vramguard", peer), "Content-Length", length);
    }
}

// ---- shape: deep, redirect, HTML, garbage -----------------------------------------------------

TEST(HostilePeers, AMillionDeepJsonAnswerIsAnErrorForEveryKindAndNeverBuilt) {
    const std::string deep = deep_json(1000000);
    HostilePeer ok_status([&](HostileConnection& c) { c.send(HostilePeer::answer(deep)); });
    HostilePeer error_status([&](HostileConnection& c) { c.send(HostilePeer::answer(deep, 503)); });
    for (const char* kind : all_kinds) {
        expect_error(ask(kind, ok_status), "", kind);
        expect_error(ask(kind, error_status), "HTTP 503", kind);
    }
    expect_error(ask("vramguard", ok_status), "nested deeper than 64", "vramguard");
    // An object one level past the limit, inside an otherwise honest answer.
    const std::string too_deep = R"({"status": "busy", "x": )" + deep_json(64) + "}";
    HostilePeer nested([&](HostileConnection& c) { c.send(HostilePeer::answer(too_deep)); });
    expect_error(ask("vramguard", nested), "nested deeper than 64", "65 deep");
}

TEST(HostilePeers, ARedirectLoopIsOneRequestAndAnError) {
    HostilePeer peer([](HostileConnection& c) {
        c.send("HTTP/1.1 302 Found\r\nLocation: /request-unload\r\nContent-Length: 0\r\n\r\n");
    });
    expect_error(ask("vramguard", peer), "HTTP 302", "redirect");
    EXPECT_EQ(peer.requests().size(), 1u) << "a redirect is never followed";
}

TEST(HostilePeers, HtmlAndBinaryGarbageAreErrorsWithPrintableReasons) {
    HostilePeer html([](HostileConnection& c) {
        c.send(HostilePeer::answer("<html><body>502 Bad Gateway</body></html>", 200, "text/html"));
    });
    std::string bytes;
    for (int i = 0; i < 4096; ++i) bytes.push_back(static_cast<char>((i * 7919) & 0xFF));
    HostilePeer not_http([&](HostileConnection& c) { c.send(bytes); });
    HostilePeer binary_body([&](HostileConnection& c) { c.send(HostilePeer::answer(bytes)); });
    const std::string bad_utf8 = "{\"status\": \"busy\", \"message\": \"\xC3\x28\xFF\"}";
    HostilePeer invalid_utf8([&](HostileConnection& c) { c.send(HostilePeer::answer(bad_utf8)); });
    for (const char* kind : all_kinds) {
        expect_error(ask(kind, html), "not JSON", kind);
        expect_error(ask(kind, not_http), "", kind);
        expect_error(ask(kind, binary_body), "not JSON", kind);
        expect_error(ask(kind, invalid_utf8), "not JSON", kind);
    }
}

// ---- content: wrong types and numbers out of range --------------------------------------------

// One answer for every path: a peer that says `body` to anything.
PeerReply answer_of(const char* kind, const std::string& body) {
    HostilePeer peer([&](HostileConnection& c) { c.send(HostilePeer::answer(body)); });
    return ask(kind, peer);
}

TEST(HostilePeers, AbsurdNumbersAreErrorsNeverBusyOrFreed) {
    const std::pair<const char*, const char*> cases[] = {
        {"vramguard", R"({"status": "busy", "leases": 1e300})"},
        {"vramguard", R"({"result": "busy", "leases": -1})"},
        {"vramguard", R"({"status": "busy", "idle_seconds": 1e300})"},
        {"vramguard", R"({"status": "busy", "idle_seconds": -5})"},
        {"vramguard", R"({"status": "ok", "unloaded": true, "freed_bytes": 1e300})"},
        {"vramguard", R"({"status": "ok", "unloaded": true, "freed_bytes": -1})"},
        {"vramguard", R"({"result": "unloaded", "freed_bytes": 18446744073709551616})"},
        {"ollama", R"({"models": [{"name": "m", "size_vram": 1e30, "expires_at": null}]})"},
        {"ollama", R"({"models": [{"name": "m", "size_vram": -4096}]})"},
        {"comfyui", R"({"queue_running": [], "queue_pending": [],
                        "devices": [{"torch_vram_total": 1e300}]})"},
    };
    for (const auto& [kind, body] : cases) {
        const PeerReply reply = answer_of(kind, body);
        EXPECT_EQ(reply.answer, PeerAnswer::error)
            << kind << " " << body << ": " << describe(reply);
        EXPECT_FALSE(has(reply.detail, "-9223372036854775808")) << body;
    }
}

TEST(HostilePeers, AbsurdVllmMetricsAreErrorsNeverBusy) {
    for (const char* value : {"1e300", "-1", "NaN", "+Inf"}) {
        HostilePeer peer([&](HostileConnection& c) {
            if (has(c.request(), "/is_sleeping"))
                c.send(HostilePeer::answer(R"({"is_sleeping": false})"));
            else
                c.send(HostilePeer::answer(
                    std::string("vllm:num_requests_running{engine=\"0\"} ") + value + "\n", 200,
                    "text/plain"));
        });
        expect_error(ask("vllm", peer), "out of range", value);
        for (const std::string& request : peer.requests())
            EXPECT_FALSE(has(request, "/sleep?")) << value << ": put to sleep";
    }
    EXPECT_EQ(peers::detail::vllm_requests_running("vllm:num_requests_running 3 1700000000000\n"),
              std::optional<double>(3))
        << "a sample with a timestamp";
}

TEST(HostilePeers, WrongTypesAreErrorsForEveryKind) {
    const std::pair<const char*, const char*> cases[] = {
        {"vramguard", R"({"status": 5})"},
        {"vramguard", R"({"status": "busy", "leases": "many"})"},
        {"vramguard", R"({"unloaded": "yes"})"},
        {"vramguard", R"(["status", "ok"])"},
        {"vramguard", R"({"status": "maybe"})"},
        {"ollama", R"({"models": {"name": "m"}})"},
        {"ollama", R"({"models": [{"name": 7}]})"},
        {"ollama", R"({"models": [{"name": "m", "size_vram": 1, "expires_at": "soon"}]})"},
        {"comfyui", R"({"queue_running": 1, "queue_pending": []})"},
        {"llamacpp", R"({"data": "none"})"},
        {"vllm", R"({"is_sleeping": "no"})"},
        {"vllm", R"([])"},
    };
    for (const auto& [kind, body] : cases) {
        const PeerReply reply = answer_of(kind, body);
        EXPECT_EQ(reply.answer, PeerAnswer::error)
            << kind << " " << body << ": " << describe(reply);
    }
}

TEST(HostilePeers, AComfyUiQueueWithoutItsListsIsAnErrorAndNothingIsFreed) {
    for (const char* queue : {"{}", R"({"queue_running": []})", R"({"queue_pending": []})"}) {
        HostilePeer peer([&](HostileConnection& c) { c.send(HostilePeer::answer(queue)); });
        expect_error(ask("comfyui", peer), "queue_running", queue);
        for (const std::string& request : peer.requests())
            EXPECT_FALSE(has(request, "/free")) << queue << ": " << request;
    }
}

TEST(HostilePeers, ControlBytesAndLongTextFromAPeerReachTheOperatorPrintableAndShort) {
    const std::string message = "line\\none\\u0007\\u001b[31mred" + std::string(5000, 'x');
    const PeerReply reply =
        answer_of("vramguard", R"({"status": "busy", "message": ")" + message + R"("})");
    EXPECT_EQ(reply.answer, PeerAnswer::busy) << describe(reply);
    EXPECT_EQ(reply.detail.find('\n'), std::string::npos);
    EXPECT_EQ(reply.detail.find('\x1b'), std::string::npos);
    EXPECT_LE(reply.detail.size(), 200u);
    const PeerReply failed =
        answer_of("llamacpp", R"({"data": [{"id": "m\u0000\n", "status": "loaded"}]})");
    EXPECT_EQ(failed.detail.find('\n'), std::string::npos) << failed.detail;
}

}  // namespace
