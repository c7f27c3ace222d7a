// SPDX-License-Identifier: MIT
// End to end: /encode through the server's vramguard::Batcher (--batching batcher, the default)
// and through the old per-request path (--batching per-request). Checks that both give the same
// embeddings, that concurrent clients each get their own, that a full queue (--max-queued-items)
// and a passed deadline (--encode-deadline-seconds) are 503 with Retry-After, that /status and
// /metrics show the batcher's counters, and that the simulated device charges each batch for its
// padded tokens (--simulate-bytes-per-token) and gets every byte back. Batches are held running
// with --hold-encodes-while-file-exists where a test needs the queue in a known state; every wait
// has a deadline and no test bounds how long anything took.
//
// The test does not use LibTorch itself (the server does); it is built where the server is.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "server_process.hpp"
#include "temp_dir.hpp"

#include "../../examples/torch_server/shared_device.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;
using vramguard_test::embeddings_of;
using vramguard_test::encode;
using vramguard_test::get;
using vramguard_test::max_difference;
using vramguard_test::Reply;
using vramguard_test::RunningServer;
using vramguard_test::ServerProcess;

constexpr float tolerance = 1e-5f;

// A text of `words` words that no other call of this function with another `id` makes.
std::string unique_text(const std::string& id, int words) {
    std::string text = id;
    for (int w = 0; w < words; ++w) text += " w" + std::to_string((w * 37 + words) % 101);
    return text;
}

json batcher_stats(httplib::Client& client) {
    return get(client, "/status").body.at("batching").at("stats");
}

// Polls /status until `ready` says yes (at most 30 s); false when it never did.
bool wait_for_status(httplib::Client& client, const std::function<bool(const json&)>& ready) {
    const auto deadline = Clock::now() + 30s;
    while (Clock::now() < deadline) {
        if (ready(get(client, "/status").body)) return true;
        std::this_thread::sleep_for(5ms);
    }
    return false;
}

TEST(TorchServerBatching, BatcherAndPerRequestGiveTheSameEmbeddings) {
    RunningServer batcher;  // the default
    RunningServer per_request({"--batching", "per-request"});
    auto b = vramguard_test::client_of(batcher.port());
    auto p = vramguard_test::client_of(per_request.port());

    std::vector<std::string> texts = {"", "hello", "hello world"};
    for (int i = 0; i < 13; ++i) texts.push_back(unique_text("text" + std::to_string(i), i * 9));
    const Reply from_batcher = encode(*b, texts);
    const Reply from_per_request = encode(*p, texts);
    ASSERT_EQ(from_batcher.status, 200) << from_batcher.body.dump();
    ASSERT_EQ(from_per_request.status, 200) << from_per_request.body.dump();
    const auto got = embeddings_of(from_batcher);
    const auto want = embeddings_of(from_per_request);
    ASSERT_EQ(got.size(), texts.size());
    ASSERT_EQ(want.size(), texts.size());
    for (std::size_t i = 0; i < texts.size(); ++i)
        EXPECT_LE(max_difference(got[i], want[i]), tolerance) << "text " << i;
    EXPECT_GE(from_batcher.body["batches"].get<int>(), 1);

    const json status_b = get(*b, "/status").body;
    EXPECT_EQ(status_b["batching"]["mode"], "batcher");
    EXPECT_EQ(status_b["batching"]["max_queued_items"].get<int>(), 4096) << "the default";
    const json& stats = status_b["batching"]["stats"];
    EXPECT_EQ(stats["calls"].get<int>(), 1);
    EXPECT_EQ(stats["items"].get<std::size_t>(), texts.size());
    EXPECT_EQ(stats["batched_items"].get<std::size_t>(), texts.size());
    EXPECT_GE(stats["gatherings"].get<int>(), 1);
    EXPECT_GE(stats["batches"].get<int>(), 1);
    EXPECT_EQ(stats["overloaded"].get<int>(), 0);
    for (const char* field : {"deadlines_passed", "queue_wait_us", "queue_wait_max_us"})
        EXPECT_TRUE(stats.contains(field)) << field;

    const json status_p = get(*p, "/status").body;
    EXPECT_EQ(status_p["batching"]["mode"], "per-request");
    EXPECT_FALSE(status_p["batching"].contains("stats")) << "no batcher, no counters";
    EXPECT_EQ(status_p["requests"]["texts"].get<std::size_t>(), texts.size());
}

TEST(TorchServerBatching, ThePerRequestPathIsChosenFromTheEnvironmentToo) {
    vramguard_test::TempDir profiles{"torch-server-batching-"};
    ServerProcess process({"--profile-dir", profiles.path()},
                          {{"VRAMGUARD_SERVER_BATCHING", "per-request"}});
    ASSERT_GT(process.port(), 0) << process.first_line();
    auto client = vramguard_test::client_of(process.port());
    ASSERT_EQ(encode(*client, {"one", "two"}).status, 200);
    EXPECT_EQ(get(*client, "/status").body["batching"]["mode"], "per-request");
}

TEST(TorchServerBatching, ConcurrentClientsEachGetTheirOwnEmbeddings) {
    RunningServer batcher;
    RunningServer reference_server({"--batching", "per-request"});
    constexpr int clients = 8;
    constexpr int requests_per_client = 4;

    // Every text is unique to its client and request; the reference is each text alone.
    auto text_of = [](int c, int r, int i) {
        return unique_text(
            "c" + std::to_string(c) + "r" + std::to_string(r) + "t" + std::to_string(i),
            (c * 7 + r * 5 + i * 3) % 40);
    };
    auto count_of = [](int c, int r) { return 1 + (c * 3 + r * 5) % 9; };
    std::map<std::string, std::vector<float>> reference;
    {
        auto client = vramguard_test::client_of(reference_server.port());
        for (int c = 0; c < clients; ++c)
            for (int r = 0; r < requests_per_client; ++r)
                for (int i = 0; i < count_of(c, r); ++i) {
                    const std::string text = text_of(c, r, i);
                    const Reply reply = encode(*client, {text});
                    ASSERT_EQ(reply.status, 200) << reply.body.dump();
                    reference[text] = embeddings_of(reply).at(0);
                }
    }

    std::vector<std::string> failures(clients);
    std::vector<std::thread> threads;
    std::size_t texts_sent = 0;
    for (int c = 0; c < clients; ++c)
        for (int r = 0; r < requests_per_client; ++r) texts_sent += count_of(c, r);
    for (int c = 0; c < clients; ++c)
        threads.emplace_back([&, c] {
            try {
                auto client = vramguard_test::client_of(batcher.port());
                for (int r = 0; r < requests_per_client; ++r) {
                    std::vector<std::string> texts;
                    for (int i = 0; i < count_of(c, r); ++i) texts.push_back(text_of(c, r, i));
                    const Reply reply = encode(*client, texts);
                    if (reply.status != 200)
                        throw std::runtime_error("status " + std::to_string(reply.status) + ": " +
                                                 reply.body.dump());
                    const auto got = embeddings_of(reply);
                    if (got.size() != texts.size())
                        throw std::runtime_error(std::to_string(got.size()) + " embeddings for " +
                                                 std::to_string(texts.size()) + " texts");
                    for (std::size_t i = 0; i < texts.size(); ++i)
                        if (!(max_difference(got[i], reference.at(texts[i])) <= tolerance))
                            throw std::runtime_error("\"" + texts[i] + "\" got another embedding");
                }
            } catch (const std::exception& e) {
                failures[static_cast<std::size_t>(c)] = e.what();
            }
        });
    for (std::thread& t : threads) t.join();
    for (int c = 0; c < clients; ++c)
        EXPECT_EQ(failures[static_cast<std::size_t>(c)], "") << "client " << c;

    auto client = vramguard_test::client_of(batcher.port());
    const json stats = batcher_stats(*client);
    EXPECT_EQ(stats["calls"].get<int>(), clients * requests_per_client);
    EXPECT_EQ(stats["items"].get<std::size_t>(), texts_sent);
    EXPECT_EQ(stats["batched_items"].get<std::size_t>(), texts_sent) << "each text ran once";
    EXPECT_LE(stats["gatherings"].get<int>(), clients * requests_per_client);
    EXPECT_EQ(get(*client, "/status").body["model"]["leases"].get<int>(), 0);
}

// A batch held running (the hold file): the next request is queued (a request alone always is),
// the one after it finds the queue full.
TEST(TorchServerBatching, AFullQueueIs503WithRetryAfter) {
    vramguard_test::TempDir dir{"torch-server-batching-"};
    const std::string hold = dir.file("hold");
    RunningServer server({"--max-queued-items", "1", "--hold-encodes-while-file-exists", hold});
    auto client = vramguard_test::client_of(server.port());
    ASSERT_EQ(encode(*client, {"loads the model"}).status, 200);

    { std::ofstream(hold) << "hold"; }
    Reply running, queued;
    std::thread a([&] { running = encode(*vramguard_test::client_of(server.port()), {"a"}); });
    ASSERT_TRUE(wait_for_status(*client, [](const json& s) {
        return s["batching"]["stats"]["gatherings"].get<int>() == 2;  // a's batch is running
    }));
    std::thread b([&] {
        queued = encode(*vramguard_test::client_of(server.port()), {"b one", "b two"});
    });
    ASSERT_TRUE(wait_for_status(*client, [](const json& s) {
        return s["batching"]["stats"]["calls"].get<int>() == 3;  // b is queued
    }));
    const Reply refused = encode(*client, {"c"});
    std::remove(hold.c_str());
    a.join();
    b.join();

    EXPECT_EQ(refused.status, 503) << refused.body.dump();
    ASSERT_FALSE(refused.retry_after.empty());
    EXPECT_GE(std::stoi(refused.retry_after), 1);
    EXPECT_EQ(refused.body["retry_after_seconds"].get<int>(), std::stoi(refused.retry_after));
    EXPECT_TRUE(refused.body["queue_full"].get<bool>());
    EXPECT_NE(refused.body["error"].get<std::string>().find("queued"), std::string::npos);
    EXPECT_EQ(running.status, 200) << running.body.dump();
    EXPECT_EQ(queued.status, 200) << queued.body.dump();
    EXPECT_EQ(embeddings_of(queued).size(), 2u);

    const json status = get(*client, "/status").body;
    EXPECT_EQ(status["batching"]["stats"]["overloaded"].get<int>(), 1);
    EXPECT_EQ(status["batching"]["max_queued_items"].get<int>(), 1);
    EXPECT_EQ(status["requests"]["rejected_503"].get<int>(), 1);
    EXPECT_EQ(status["model"]["leases"].get<int>(), 0);
}

// A request queued behind a held batch for longer than --encode-deadline-seconds gives up.
TEST(TorchServerBatching, ARequestPastItsDeadlineIs503WithRetryAfter) {
    vramguard_test::TempDir dir{"torch-server-batching-"};
    const std::string hold = dir.file("hold");
    RunningServer server(
        {"--encode-deadline-seconds", "1", "--hold-encodes-while-file-exists", hold});
    auto client = vramguard_test::client_of(server.port());
    ASSERT_EQ(encode(*client, {"loads the model"}).status, 200);

    { std::ofstream(hold) << "hold"; }
    Reply running;
    std::thread a([&] { running = encode(*vramguard_test::client_of(server.port()), {"a"}); });
    ASSERT_TRUE(wait_for_status(*client, [](const json& s) {
        return s["batching"]["stats"]["gatherings"].get<int>() == 2;
    }));
    const Reply late = encode(*client, {"waits behind a"});  // the hold outlasts its 1 s
    std::remove(hold.c_str());
    a.join();

    EXPECT_EQ(late.status, 503) << late.body.dump();
    ASSERT_FALSE(late.retry_after.empty());
    EXPECT_GE(std::stoi(late.retry_after), 1);
    EXPECT_TRUE(late.body["deadline_passed"].get<bool>());
    EXPECT_EQ(running.status, 200) << running.body.dump();
    const json status = get(*client, "/status").body;
    EXPECT_EQ(status["batching"]["stats"]["deadlines_passed"].get<int>(), 1);
    EXPECT_EQ(status["model"]["leases"].get<int>(), 0) << "the queued texts left with the lease";
}

TEST(TorchServerBatching, MetricsShowTheBatcherCounters) {
    RunningServer server;
    auto client = vramguard_test::client_of(server.port());
    ASSERT_EQ(encode(*client, {"one", "two", "three"}).status, 200);
    auto res = client->Get("/metrics");
    ASSERT_TRUE(res);
#if !TORCH_SERVER_HAS_PROMETHEUS
    GTEST_SKIP() << "built without prometheus-cpp: /metrics answers 404";
#endif
    ASSERT_EQ(res->status, 200);
    const json stats = batcher_stats(*client);
    auto sample = [&](const std::string& name) {
        const std::string line = "\n" + name + " ";
        const auto at = res->body.find(line);
        if (at == std::string::npos) return std::string("(none)");
        const auto start = at + line.size();
        return res->body.substr(start, res->body.find('\n', start) - start);
    };
    EXPECT_EQ(sample("torch_server_batcher_calls_total"), "1");
    EXPECT_EQ(sample("torch_server_batcher_items_total"), "3");
    EXPECT_EQ(sample("torch_server_batcher_batched_items_total"), "3");
    EXPECT_EQ(sample("torch_server_batcher_overloaded_total"), "0");
    EXPECT_EQ(sample("torch_server_batcher_queue_wait_max_us"),
              std::to_string(stats["queue_wait_max_us"].get<std::uint64_t>()));
    EXPECT_NE(res->body.find("# TYPE torch_server_batcher_queue_wait_max_us gauge"),
              std::string::npos);
}

// Each batch takes 64 KiB + 16 KiB per padded token from a simulated 4 MB device while it runs:
// the model (2.29 MiB) leaves room for about 60 padded tokens, so 40 texts of 4 tokens cannot run
// as one batch. The guard learns that from what the probe shows, every text is answered, and the
// device gets every activation byte back.
TEST(TorchServerBatching, BatchesTakeSimulatedMemoryPerPaddedToken) {
    for (const char* mode : {"batcher", "per-request"}) {
        SCOPED_TRACE(mode);
        vramguard_test::TempDir dir{"torch-server-batching-"};
        const std::string device_file = dir.file("device");
        RunningServer server({"--batching", mode, "--simulate-shared-device", device_file,
                              "--simulated-device-bytes", "4000000", "--simulate-bytes-per-token",
                              "16384", "--simulate-bytes-per-batch", "65536",
                              "--idle-unload-seconds", "0"});
        torch_server::SharedDevice device(device_file, 0);
        auto client = vramguard_test::client_of(server.port());
        ASSERT_EQ(encode(*client, {"loads the model"}).status, 200);
        const std::uint64_t model_bytes = device.used();
        EXPECT_GT(model_bytes, 0u);

        std::vector<std::string> texts;
        for (int i = 0; i < 40; ++i) texts.push_back(unique_text("t" + std::to_string(i), 2));
        for (int round = 0; round < 3; ++round) {
            const Reply reply = encode(*client, texts);
            ASSERT_EQ(reply.status, 200) << reply.body.dump();
            EXPECT_EQ(embeddings_of(reply).size(), texts.size());
            EXPECT_GT(reply.body["batches"].get<int>(), 1) << "160 padded tokens do not fit";
            EXPECT_EQ(device.used(), model_bytes) << "every batch gave its bytes back";
        }
        const json status = get(*client, "/status").body;
        EXPECT_GT(status["encode"]["learned_weight_budget"].get<std::uint64_t>(), 0u);
        EXPECT_LE(status["encode"]["learned_weight_budget"].get<std::uint64_t>(), 160u);
    }
}

}  // namespace
