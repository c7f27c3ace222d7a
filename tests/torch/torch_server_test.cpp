// SPDX-License-Identifier: MIT
// End to end: the examples/torch_server binary, started on 127.0.0.1 with a port the kernel picks,
// driven over HTTP by cpp-httplib's client from several threads at once. Checks what a user of the
// server relies on: embeddings (count, unit norm, the same text gives the same vector whatever its
// batch, request, or load), 400 on bad input, /status, /request-unload's three answers, 503 with
// Retry-After when admission says no for now, 507 without it for a model larger than the device,
// 413 naming the item that cannot fit even alone, and a clean exit on SIGTERM. Then the seeds'
// protocol (/request-unload's fields and 30 s default, /status's), who may call /request-unload,
// large JSON bodies sent as a form (curl -d's default), GET /metrics parsed back, and two servers
// on one simulated device asking each other for memory (--peer). Every wait has a deadline; every
// server started is killed when its test ends.
//
// The test does not use LibTorch itself (the server does); it is built where the server is.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "server_process.hpp"
#include "temp_dir.hpp"

// The server's own pieces that need neither LibTorch nor HTTP: the access rule and the simulated
// device file both servers and this test map.
#include "../../examples/torch_server/shared_device.hpp"
#include "../../examples/torch_server/unload_access.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <memory>
#include <optional>
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
using vramguard_test::post;
using vramguard_test::Reply;
using vramguard_test::ServerProcess;

// One started server (8 threads) with a profile directory of its own and a client for it.
struct Running : vramguard_test::RunningServer {
    explicit Running(std::vector<std::string> args = {})
        : RunningServer(with_threads(std::move(args))) {}
    static std::vector<std::string> with_threads(std::vector<std::string> args) {
        args.insert(args.begin(), {"--threads", "8"});
        return args;
    }
    std::unique_ptr<httplib::Client> client() const { return vramguard_test::client_of(port()); }
};

double norm(const std::vector<float>& v) {
    double sum = 0;
    for (float x : v) sum += static_cast<double>(x) * x;
    return std::sqrt(sum);
}

// Texts of very different lengths, so batches are padded.
std::vector<std::string> text_pool() {
    std::vector<std::string> pool = {"", "hello", "hello world",
                                     "The quick brown fox jumps over the lazy dog"};
    for (int i = 0; i < 12; ++i) {
        std::string text = "text " + std::to_string(i) + ":";
        for (int w = 0; w < (i * 7) % 40; ++w) text += " word" + std::to_string((w * 31 + i) % 97);
        pool.push_back(text);
    }
    return pool;
}

constexpr float tolerance = 1e-5f;

TEST(TorchServer, ConcurrentEncodesGiveUnitVectorsThatDoNotDependOnTheBatch) {
    Running server;
    const std::vector<std::string> pool = text_pool();

    // The reference: each text alone, in a batch of one (no padding at all).
    std::map<std::string, std::vector<float>> reference;
    {
        auto client = server.client();
        for (const std::string& text : pool) {
            const Reply reply = encode(*client, {text});
            ASSERT_EQ(reply.status, 200) << reply.body.dump();
            ASSERT_EQ(reply.body.at("dim").get<int>(), 64);
            reference[text] = embeddings_of(reply).at(0);
            EXPECT_NEAR(norm(reference[text]), 1.0, 1e-5) << "text \"" << text << "\"";
        }
    }
    EXPECT_GT(max_difference(reference["hello"], reference["hello world"]), 1e-3f)
        << "different texts should not share an embedding";

    constexpr int threads = 6;
    constexpr int requests_per_thread = 8;
    std::atomic<int> checked{0};
    std::vector<std::string> failures(threads);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            try {
                auto client = server.client();
                for (int r = 0; r < requests_per_thread; ++r) {
                    // A different mix and order of texts in every request (repeats included).
                    std::vector<std::string> texts;
                    const std::size_t count = 1 + static_cast<std::size_t>((t * 5 + r * 3) % 24);
                    for (std::size_t i = 0; i < count; ++i)
                        texts.push_back(
                            pool[(static_cast<std::size_t>(t) * 7 + r * 11 + i * 5) % pool.size()]);
                    const Reply reply = encode(*client, texts);
                    if (reply.status != 200)
                        throw std::runtime_error("status " + std::to_string(reply.status) + ": " +
                                                 reply.body.dump());
                    const auto got = embeddings_of(reply);
                    if (got.size() != texts.size())
                        throw std::runtime_error(std::to_string(got.size()) + " embeddings for " +
                                                 std::to_string(texts.size()) + " texts");
                    if (reply.body.at("batches").get<int>() < 1)
                        throw std::runtime_error("no batch reported");
                    for (std::size_t i = 0; i < texts.size(); ++i) {
                        if (std::fabs(norm(got[i]) - 1.0) > 1e-5)
                            throw std::runtime_error("not unit norm: \"" + texts[i] + "\"");
                        const float diff = max_difference(got[i], reference.at(texts[i]));
                        if (!(diff <= tolerance))
                            throw std::runtime_error("text \"" + texts[i] + "\" in a batch of " +
                                                     std::to_string(texts.size()) +
                                                     " differs from its embedding alone by " +
                                                     std::to_string(diff));
                        ++checked;
                    }
                }
            } catch (const std::exception& e) {
                failures[static_cast<std::size_t>(t)] = e.what();
            }
        });
    }
    for (auto& worker : workers) worker.join();
    for (int t = 0; t < threads; ++t)
        EXPECT_EQ(failures[static_cast<std::size_t>(t)], "") << "thread " << t;
    EXPECT_GT(checked.load(), threads * requests_per_thread);

    auto client = server.client();
    const Reply status = get(*client, "/status");
    ASSERT_EQ(status.status, 200);
    EXPECT_EQ(status.body["registry"]["loads"].get<int>(), 1) << "one load served every request";
    EXPECT_EQ(status.body["requests"]["encode"].get<int>(),
              static_cast<int>(pool.size()) + threads * requests_per_thread);
    EXPECT_EQ(status.body["model"]["leases"].get<int>(), 0);
}

TEST(TorchServer, EmptyListIsOkAndBadInputIs400) {
    Running server;
    auto client = server.client();

    const Reply empty = encode(*client, {});
    EXPECT_EQ(empty.status, 200);
    EXPECT_EQ(empty.body["embeddings"], json::array());
    EXPECT_EQ(empty.body["dim"].get<int>(), 64);

    for (const std::string body :
         {"{\"texts\": [\"a\"", "not json", "[\"a\"]", "{\"text\": [\"a\"]}", "{\"texts\": \"a\"}",
          "{\"texts\": [\"a\", 3]}", "{\"texts\": [null]}"}) {
        const Reply reply = post(*client, "/encode", body);
        EXPECT_EQ(reply.status, 400) << body;
        EXPECT_TRUE(reply.body.contains("error")) << body;
        EXPECT_FALSE(reply.body["error"].get<std::string>().empty()) << body;
    }
    const Reply non_string = post(*client, "/encode", "{\"texts\": [\"a\", 3]}");
    EXPECT_NE(non_string.body["error"].get<std::string>().find("texts[1]"), std::string::npos)
        << non_string.body.dump();

    // Nothing above needed the model.
    const Reply status = get(*client, "/status");
    EXPECT_FALSE(status.body["model"]["loaded"].get<bool>());
    EXPECT_EQ(status.body["registry"]["loads"].get<int>(), 0);
    EXPECT_EQ(status.body["requests"]["bad_request_400"].get<int>(), 8);
}

TEST(TorchServer, StatusReportsModelDeviceLearningAndCounters) {
    Running server;
    auto client = server.client();

    Reply status = get(*client, "/status");
    ASSERT_EQ(status.status, 200);
    const json& before = status.body;
    EXPECT_EQ(before["model"]["name"], "encoder");
    // The seeds' /status fields.
    EXPECT_FALSE(before["model_loaded"].get<bool>());
    EXPECT_TRUE(before["auto_unload_enabled"].get<bool>());
    EXPECT_EQ(before["auto_unload_minutes"].get<double>(), 5.0) << "--idle-unload-seconds 300";
    EXPECT_FALSE(before["model"]["loaded"].get<bool>());
    EXPECT_EQ(before["model"]["state"], "unloaded");
    EXPECT_EQ(before["model"]["bytes"].get<std::uint64_t>(), 0u);
    EXPECT_GT(before["model"]["declared_bytes"].get<std::uint64_t>(), 0u);
    EXPECT_EQ(before["device"]["name"], "cpu");
    const auto total = before["device"]["memory"]["total_bytes"].get<std::uint64_t>();
    EXPECT_GT(total, 0u);
    EXPECT_LE(before["device"]["memory"]["free_bytes"].get<std::uint64_t>(), total);
    EXPECT_EQ(before["encode"]["key"].get<std::string>().size(), 16u);
    EXPECT_TRUE(before["encode"].contains("learned_batch_ceiling"));
    EXPECT_TRUE(before["encode"].contains("learned_weight_budget"));
    for (const char* counter :
         {"calls", "ooms", "retries", "halvings", "single_item_calls", "rejections", "waits"})
        EXPECT_TRUE(before["guard"].contains(counter)) << counter;
    EXPECT_EQ(before["guard"]["calls"].get<int>(), 0);

    ASSERT_EQ(encode(*client, {"one", "two words", "three words here"}).status, 200);
    status = get(*client, "/status");
    const json& after = status.body;
    EXPECT_TRUE(after["model"]["loaded"].get<bool>());
    EXPECT_TRUE(after["model_loaded"].get<bool>());
    EXPECT_EQ(after["model"]["state"], "loaded");
    // What the unload would free: the load's measured peak (HostProbe: resident growth) when
    // one was measured, else the declared size (unit test: CallWaits, UnloadResult::bytes).
    EXPECT_GT(after["model"]["bytes"].get<std::uint64_t>(), 0u);
    EXPECT_EQ(after["model"]["leases"].get<int>(), 0);
    EXPECT_GE(after["model"]["idle_seconds"].get<double>(), 0.0);
    EXPECT_EQ(after["registry"]["loads"].get<int>(), 1);
    EXPECT_EQ(after["guard"]["calls"].get<int>(), 2) << "one load and one encode";
    EXPECT_EQ(after["guard"]["rejections"].get<int>(), 0);
    EXPECT_EQ(after["requests"]["texts"].get<int>(), 3);
}

TEST(TorchServer, RequestUnloadAnswersBusyThenUnloadedThenNotLoaded) {
    Running server({"--idle-unload-seconds", "0"});
    auto client = server.client();

    Reply unload = post(*client, "/request-unload", "");
    EXPECT_EQ(unload.status, 200);
    EXPECT_EQ(unload.body["result"], "not_loaded") << unload.body.dump();
    // The seeds' fields: nothing to unload is "ok", not unloaded.
    EXPECT_EQ(unload.body["status"], "ok") << unload.body.dump();
    EXPECT_FALSE(unload.body["unloaded"].get<bool>());
    EXPECT_EQ(unload.body["message"], "no model loaded");
    EXPECT_FALSE(unload.body.contains("idle_seconds")) << "the reference leaves it out";

    const Reply first = encode(*client, {"the same text twice", "and another"});
    ASSERT_EQ(first.status, 200);

    // A bare request (a peer's) asks for 30 s of idleness, the protocol's default: a model used
    // a moment ago stays.
    unload = post(*client, "/request-unload", "");
    EXPECT_EQ(unload.body["result"], "busy") << unload.body.dump();
    EXPECT_EQ(unload.body["status"], "busy");
    EXPECT_FALSE(unload.body["unloaded"].get<bool>());
    EXPECT_EQ(unload.body["min_idle_seconds"].get<double>(), 30.0);
    EXPECT_LT(unload.body["idle_seconds"].get<double>(), 30.0);
    EXPECT_NE(unload.body["message"].get<std::string>().find("less than the 30 s"),
              std::string::npos)
        << unload.body.dump();
    // The same in a JSON body.
    unload = post(*client, "/request-unload", "{\"min_idle_seconds\": 3600}");
    EXPECT_EQ(unload.body["status"], "busy") << unload.body.dump();
    EXPECT_EQ(unload.body["min_idle_seconds"].get<double>(), 3600.0);

    unload = post(*client, "/request-unload?min_idle_seconds=3600", "");
    EXPECT_EQ(unload.status, 200);
    EXPECT_EQ(unload.body["result"], "busy") << unload.body.dump();
    EXPECT_GE(unload.body["idle_seconds"].get<double>(), 0.0);
    EXPECT_LT(unload.body["idle_seconds"].get<double>(), 3600.0);
    EXPECT_EQ(unload.body["leases"].get<int>(), 0);
    EXPECT_TRUE(get(*client, "/status").body["model"]["loaded"].get<bool>());

    unload = post(*client, "/request-unload?min_idle_seconds=0", "");
    EXPECT_EQ(unload.body["result"], "unloaded") << unload.body.dump();
    EXPECT_EQ(unload.body["status"], "ok");
    EXPECT_TRUE(unload.body["unloaded"].get<bool>());
    EXPECT_GE(unload.body["idle_seconds"].get<double>(), 0.0);
    EXPECT_NE(unload.body["message"].get<std::string>().find("unloaded model 'encoder'"),
              std::string::npos);
    EXPECT_GT(unload.body["freed_bytes"].get<std::uint64_t>(), 0u);

    unload = post(*client, "/request-unload?min_idle_seconds=0", "");
    EXPECT_EQ(unload.body["result"], "not_loaded") << unload.body.dump();

    Reply status = get(*client, "/status");
    EXPECT_FALSE(status.body["model"]["loaded"].get<bool>());
    EXPECT_EQ(status.body["registry"]["requested_unloads"].get<int>(), 1);

    // The next request loads it again, with the same weights.
    const Reply again = encode(*client, {"the same text twice", "and another"});
    ASSERT_EQ(again.status, 200);
    const auto a = embeddings_of(first), b = embeddings_of(again);
    for (std::size_t i = 0; i < a.size(); ++i) EXPECT_LE(max_difference(a[i], b[i]), tolerance);
    status = get(*client, "/status");
    EXPECT_EQ(status.body["registry"]["loads"].get<int>(), 2);

    EXPECT_EQ(post(*client, "/request-unload?min_idle_seconds=soon", "").status, 400);
    EXPECT_EQ(post(*client, "/request-unload?min_idle_seconds=-1", "").status, 400);
    EXPECT_EQ(post(*client, "/request-unload", "{\"min_idle_seconds\": \"soon\"}").status, 400);
    EXPECT_EQ(post(*client, "/request-unload", "[1]").status, 400);
    EXPECT_EQ(post(*client, "/request-unload?wanted_bytes=lots", "").status, 400);
}

TEST(TorchServer, IdleModelIsUnloadedByTheReaper) {
    Running server({"--idle-unload-seconds", "1"});
    auto client = server.client();
    ASSERT_EQ(encode(*client, {"warm"}).status, 200);
    const auto deadline = Clock::now() + 15s;
    json status;
    do {
        std::this_thread::sleep_for(100ms);
        status = get(*client, "/status").body;
    } while (status["model"]["loaded"].get<bool>() && Clock::now() < deadline);
    EXPECT_FALSE(status["model"]["loaded"].get<bool>()) << status.dump();
    EXPECT_EQ(status["registry"]["idle_unloads"].get<int>(), 1);
}

TEST(TorchServer, ModelLargerThanTheDeviceIs507WithoutRetryAfter) {
    // A 1 MB "device": the 2.3 MiB encoder can never be admitted, so coming back will not help.
    Running server({"--memory-limit-bytes", "1000000"});
    auto client = server.client();

    for (int attempt = 0; attempt < 2; ++attempt) {
        const Reply reply = encode(*client, {"no room for me"});
        EXPECT_EQ(reply.status, 507) << reply.body.dump();
        EXPECT_EQ(reply.retry_after, "") << "a retry would get the same answer";
        EXPECT_FALSE(reply.body.contains("retry_after_seconds")) << reply.body.dump();
        EXPECT_TRUE(reply.body["can_never_fit"].get<bool>()) << reply.body.dump();
        EXPECT_EQ(reply.body["total_bytes"].get<std::uint64_t>(), 1000000u);
        EXPECT_GT(reply.body["required_bytes"].get<std::uint64_t>(),
                  reply.body["total_bytes"].get<std::uint64_t>());
        EXPECT_NE(reply.body["error"].get<std::string>().find("can never fit"), std::string::npos)
            << reply.body.dump();
    }
    EXPECT_EQ(encode(*client, {}).status, 200) << "an empty request needs no model";

    const json status = get(*client, "/status").body;
    EXPECT_FALSE(status["model"]["loaded"].get<bool>());
    EXPECT_EQ(status["device"]["limit_bytes"].get<std::uint64_t>(), 1000000u);
    EXPECT_EQ(status["device"]["memory"]["total_bytes"].get<std::uint64_t>(), 1000000u);
    EXPECT_EQ(status["guard"]["rejections"].get<int>(), 2);
    EXPECT_EQ(status["requests"]["never_fits_507"].get<int>(), 2);
    EXPECT_EQ(status["requests"]["rejected_503"].get<int>(), 0);
    EXPECT_EQ(status["requests"]["failed_500"].get<int>(), 0);
}

TEST(TorchServer, AdmissionRefusalIs503WithRetryAfter) {
    // A 64 MB "device" the 2.3 MiB encoder and its 6.4 MB margin fit, of which another process
    // holds 63 MB: at most 1 MB is free (less as this process grows), so the load waits its turn.
    Running server(
        {"--memory-limit-bytes", "64000000", "--simulate-other-process-bytes", "63000000"});
    auto client = server.client();

    for (int attempt = 0; attempt < 2; ++attempt) {
        const Reply reply = encode(*client, {"no room for me yet"});
        EXPECT_EQ(reply.status, 503) << reply.body.dump();
        ASSERT_FALSE(reply.retry_after.empty()) << "a 503 must say when to come back";
        EXPECT_GE(std::stoi(reply.retry_after), 1);
        EXPECT_EQ(reply.body["retry_after_seconds"].get<int>(), std::stoi(reply.retry_after));
        EXPECT_FALSE(reply.body["can_never_fit"].get<bool>()) << reply.body.dump();
        EXPECT_EQ(reply.body["total_bytes"].get<std::uint64_t>(), 64000000u);
        EXPECT_LE(reply.body["available_bytes"].get<std::uint64_t>(), 1000000u);
        EXPECT_LT(reply.body["required_bytes"].get<std::uint64_t>(),
                  reply.body["total_bytes"].get<std::uint64_t>());
        EXPECT_NE(reply.body["error"].get<std::string>().find("cannot load model 'encoder'"),
                  std::string::npos)
            << reply.body.dump();
    }

    const json status = get(*client, "/status").body;
    EXPECT_FALSE(status["model"]["loaded"].get<bool>());
    EXPECT_EQ(status["device"]["simulated_other_process_bytes"].get<std::uint64_t>(), 63000000u);
    EXPECT_LE(status["device"]["memory"]["free_bytes"].get<std::uint64_t>(), 1000000u);
    EXPECT_EQ(status["registry"]["rejections"].get<int>(), 2);
    EXPECT_EQ(status["requests"]["rejected_503"].get<int>(), 2);
    EXPECT_EQ(status["requests"]["never_fits_507"].get<int>(), 0);
    EXPECT_EQ(status["requests"]["failed_500"].get<int>(), 0);
}

TEST(TorchServer, BatchesShrinkOnOomAndAnItemTooLargeAloneIs413) {
    // Fault injection: batches over 24 padded tokens fail as if out of memory.
    Running server({"--simulate-oom-above-tokens", "24"});
    auto client = server.client();

    // 12 texts of 3 tokens (the start token and two words): 36 padded tokens in one batch.
    std::vector<std::string> texts;
    for (int i = 0; i < 12; ++i)
        texts.push_back("word" + std::to_string(i) + " other" + std::to_string(i));
    const Reply batched = encode(*client, texts);
    ASSERT_EQ(batched.status, 200) << batched.body.dump();
    EXPECT_GT(batched.body["batches"].get<int>(), 1);
    const auto got = embeddings_of(batched);
    ASSERT_EQ(got.size(), texts.size());
    for (std::size_t i = 0; i < texts.size(); ++i) {
        const auto alone = embeddings_of(encode(*client, {texts[i]})).at(0);
        EXPECT_LE(max_difference(got[i], alone), tolerance) << texts[i];
    }
    json status = get(*client, "/status").body;
    EXPECT_GE(status["guard"]["halvings"].get<int>(), 1);
    const auto budget = status["encode"]["learned_weight_budget"].get<std::uint64_t>();
    EXPECT_GT(budget, 0u);
    EXPECT_LE(budget, 24u) << "the learned budget counts padded tokens";

    // Item 2 has 30 tokens: more than 24 even alone.
    std::string long_text;
    for (int w = 0; w < 29; ++w) long_text += "w" + std::to_string(w) + " ";
    const Reply too_large = encode(*client, {"short", "also short", long_text, "never reached"});
    EXPECT_EQ(too_large.status, 413) << too_large.body.dump();
    EXPECT_EQ(too_large.body["item_index"].get<int>(), 2) << too_large.body.dump();
    status = get(*client, "/status").body;
    EXPECT_EQ(status["requests"]["oom_413"].get<int>(), 1);
    EXPECT_EQ(status["model"]["leases"].get<int>(), 0) << "the failed request's lease ended";
}

TEST(TorchServer, ExitsCleanlyOnSigterm) {
    Running server;
    auto client = server.client();
    ASSERT_EQ(encode(*client, {"loaded before the signal"}).status, 200);
    const int status = server.process->stop();
    ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status;
    EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(TorchServer, CudaDeviceWithoutCudaExitsWithAMessage) {
    vramguard_test::TempDir profiles{"torch-server-test-"};
    ServerProcess process({"--device", "cuda:0", "--profile-dir", profiles.path()});
    if (process.port() > 0) GTEST_SKIP() << "this machine has CUDA: the server started on cuda:0";
    const int status = process.stop();
    ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status;
    EXPECT_EQ(WEXITSTATUS(status), 1);
}

TEST(TorchServer, BadFlagsExitWithUsage) {
    for (const std::vector<std::string>& args :
         std::vector<std::vector<std::string>>{{"--no-such-flag", "1"},
                                               {"--simulate-other-process-bytes", "lots"},
                                               {"--simulate-other-process-bytes", "-1"},
                                               {"--simulate-other-process-bytes"},
                                               {"--batching", "sometimes"},
                                               {"--max-queued-items", "-1"},
                                               // needs --simulate-shared-device
                                               {"--simulate-bytes-per-token", "1000"}}) {
        ServerProcess process(args);
        EXPECT_LT(process.port(), 0) << args.front();
        const int status = process.stop();
        ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status;
        EXPECT_EQ(WEXITSTATUS(status), 2) << args.front() << " " << args.back();
    }
}

// --- who may call /request-unload ---------------------------------------------------------------

TEST(TorchServerUnloadAccess, LoopbackOrTheTokenFromAnywhere) {
    using torch_server::decide_unload_access;
    struct Case {
        const char* address;
        const char* token;
        const char* authorization;
        bool allowed;
        int status;
    };
    const Case cases[] = {
        // No token configured: loopback only.
        {"127.0.0.1", "", "", true, 200},
        {"127.10.20.30", "", "", true, 200},
        {"::1", "", "", true, 200},
        {"::ffff:127.0.0.1", "", "", true, 200},
        {"::ffff:127.0.0.1", "", "Bearer anything", true, 200},
        {"10.0.0.5", "", "", false, 403},
        {"10.0.0.5", "", "Bearer s3cret", false, 403},
        {"192.168.1.2", "", "", false, 403},
        {"::ffff:10.0.0.5", "", "", false, 403},
        {"2001:db8::1", "", "", false, 403},
        {"128.0.0.1", "", "", false, 403},
        {"", "", "", false, 403},
        {"localhost", "", "", false, 403},  // an address, never a name
        // A token configured: it opens the endpoint to remote callers that send it.
        {"10.0.0.5", "s3cret", "Bearer s3cret", true, 200},
        {"2001:db8::1", "s3cret", "Bearer s3cret", true, 200},
        {"10.0.0.5", "s3cret", "", false, 401},
        {"10.0.0.5", "s3cret", "Bearer wrong", false, 401},
        {"10.0.0.5", "s3cret", "Bearer s3cre", false, 401},
        {"10.0.0.5", "s3cret", "Bearer s3cret2", false, 401},
        {"10.0.0.5", "s3cret", "bearer s3cret", true, 200},  // the scheme in any case (RFC 9110)
        {"10.0.0.5", "s3cret", "Basic s3cret", false, 401},
        {"10.0.0.5", "s3cret", "s3cret", false, 401},
        {"10.0.0.5", "s3cret", "Bearer ", false, 401},
        // Loopback needs no token, but a wrong one is refused (a misconfigured client).
        {"127.0.0.1", "s3cret", "", true, 200},
        {"127.0.0.1", "s3cret", "Bearer s3cret", true, 200},
        {"127.0.0.1", "s3cret", "Bearer wrong", false, 401},
    };
    for (const Case& c : cases) {
        const auto access = decide_unload_access(c.address, c.token, c.authorization);
        EXPECT_EQ(access.allowed, c.allowed)
            << c.address << " token \"" << c.token << "\" header \"" << c.authorization << "\"";
        EXPECT_EQ(access.status, c.status) << c.address << " \"" << c.authorization << "\"";
        EXPECT_EQ(access.reason.empty(), c.allowed) << access.reason;
    }
    EXPECT_NE(decide_unload_access("10.0.0.5", "", "").reason.find("--unload-token"),
              std::string::npos);
}

TEST(TorchServer, UnloadTokenEndToEndOnLoopback) {
    Running server({"--unload-token", "s3cret", "--idle-unload-seconds", "0"});
    auto client = server.client();
    ASSERT_EQ(encode(*client, {"loaded"}).status, 200);

    const Reply wrong = post(*client, "/request-unload?min_idle_seconds=0", "",
                             {{"Authorization", "Bearer wrong"}});
    EXPECT_EQ(wrong.status, 401) << wrong.body.dump();
    EXPECT_FALSE(wrong.body["unloaded"].get<bool>());
    EXPECT_NE(wrong.body["error"].get<std::string>().find("--unload-token"), std::string::npos);
    EXPECT_TRUE(get(*client, "/status").body["model_loaded"].get<bool>()) << "refused: still there";

    const Reply right = post(*client, "/request-unload?min_idle_seconds=0", "",
                             {{"Authorization", "Bearer s3cret"}});
    EXPECT_EQ(right.status, 200) << right.body.dump();
    EXPECT_TRUE(right.body["unloaded"].get<bool>()) << right.body.dump();

    ASSERT_EQ(encode(*client, {"loaded again"}).status, 200);
    const Reply loopback = post(*client, "/request-unload?min_idle_seconds=0", "");
    EXPECT_EQ(loopback.status, 200) << "loopback needs no token";
    EXPECT_TRUE(loopback.body["unloaded"].get<bool>()) << loopback.body.dump();
    EXPECT_EQ(get(*client, "/status").body["unload_requests"]["refused"].get<int>(), 1);
}

// --- bodies as curl -d and Python's urllib send them -------------------------------------------

TEST(TorchServer, LargeJsonSentAsAFormIsAccepted) {
    // 20 texts of 120 words: about 18 KB, over cpp-httplib 0.11's 8 KB cap on form bodies.
    std::vector<std::string> texts;
    for (int t = 0; t < 20; ++t) {
        std::string text;
        for (int w = 0; w < 120; ++w) text += (w ? " word" : "word") + std::to_string(t * 131 + w);
        texts.push_back(text);
    }
    const std::string body = json{{"texts", texts}}.dump();
    ASSERT_GT(body.size(), 8192u);

    Running server;
    auto client = server.client();
    for (const char* content_type :
         {"application/x-www-form-urlencoded", "application/json", "text/plain"}) {
        const Reply reply = post(*client, "/encode", body, {}, content_type);
        EXPECT_EQ(reply.status, 200) << content_type << ": " << reply.body.dump().substr(0, 300);
        EXPECT_EQ(reply.body["embeddings"].size(), texts.size()) << content_type;
    }

    // cpp-httplib's own errors come back as JSON saying what to send.
    auto res = client->Get("/no-such-endpoint");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 404);
    const json not_found = json::parse(res->body);
    EXPECT_NE(not_found["error"].get<std::string>().find("POST /encode"), std::string::npos);
}

// --- GET /metrics
// ----------------------------------------------------------------------------------

struct Sample {
    std::string name;
    std::map<std::string, std::string> labels;
    double value = 0;
};

// The Prometheus text format, as far as /metrics uses it: "# HELP"/"# TYPE" lines, and
// name{label="value",...} number. Throws on a line it cannot read.
std::vector<Sample> parse_metrics(const std::string& text,
                                  std::map<std::string, std::string>& types) {
    std::vector<Sample> samples;
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
        if (line.empty()) continue;
        if (line.rfind("# TYPE ", 0) == 0) {
            std::istringstream words(line.substr(7));
            std::string name, type;
            words >> name >> type;
            types[name] = type;
            continue;
        }
        if (line[0] == '#') continue;
        Sample sample;
        std::size_t i = line.find_first_of("{ ");
        if (i == std::string::npos) throw std::runtime_error("no value: " + line);
        sample.name = line.substr(0, i);
        if (line[i] == '{') {
            const std::size_t close = line.find('}', i);
            if (close == std::string::npos) throw std::runtime_error("unclosed labels: " + line);
            std::string labels = line.substr(i + 1, close - i - 1);
            while (!labels.empty()) {
                const std::size_t eq = labels.find("=\"");
                const std::size_t end = labels.find('"', eq + 2);
                if (eq == std::string::npos || end == std::string::npos)
                    throw std::runtime_error("bad label: " + line);
                sample.labels[labels.substr(0, eq)] = labels.substr(eq + 2, end - eq - 2);
                labels = labels.substr(std::min(labels.size(), end + 2));  // past '",'
            }
            i = close + 1;
        }
        sample.value = std::stod(line.substr(i + 1));
        samples.push_back(std::move(sample));
    }
    return samples;
}

TEST(TorchServer, MetricsAreScrapedAndParsedBack) {
    Running server({"--simulate-oom-above-tokens", "24"});
    auto client = server.client();
    auto res = client->Get("/metrics");
    ASSERT_TRUE(res);
#if !TORCH_SERVER_HAS_PROMETHEUS
    EXPECT_EQ(res->status, 404);
    EXPECT_NE(json::parse(res->body)["error"].get<std::string>().find("prometheus-cpp"),
              std::string::npos);
    GTEST_SKIP() << "built without prometheus-cpp: /metrics answers 404";
#endif
    ASSERT_EQ(res->status, 200);
    EXPECT_EQ(res->get_header_value("Content-Type").rfind("text/plain", 0), 0u);

    std::vector<std::string> texts;
    for (int i = 0; i < 12; ++i)
        texts.push_back("w" + std::to_string(i) + " x" + std::to_string(i));
    ASSERT_EQ(encode(*client, texts).status, 200);  // 36 padded tokens: halves once
    ASSERT_EQ(post(*client, "/encode", "not json").status, 400);
    ASSERT_EQ(post(*client, "/request-unload", "").status, 200);  // busy: used just now

    res = client->Get("/metrics");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200);
    std::map<std::string, std::string> types;
    const std::vector<Sample> samples = parse_metrics(res->body, types);
    auto value = [&](const std::string& name,
                     const std::map<std::string, std::string>& labels = {}) {
        for (const Sample& s : samples)
            if (s.name == name && s.labels == labels) return s.value;
        ADD_FAILURE() << "no sample " << name << " in\n" << res->body;
        return -1.0;
    };
    const json status = get(*client, "/status").body;

    const std::map<std::string, std::string> cpu{{"device", "cpu"}};  // on every vramguard series
    EXPECT_EQ(types["vramguard_guard_calls_total"], "counter");
    EXPECT_EQ(value("vramguard_guard_calls_total", cpu), status["guard"]["calls"].get<double>());
    EXPECT_GE(value("vramguard_guard_halvings_total", cpu), 1.0);
    EXPECT_EQ(value("vramguard_guard_ooms_total", cpu), status["guard"]["ooms"].get<double>());
    EXPECT_EQ(value("vramguard_registry_loads_total", cpu), 1.0);
    EXPECT_EQ(value("vramguard_registry_requested_unloads_total", cpu), 0.0);
    EXPECT_EQ(types["vramguard_device_free_bytes"], "gauge");
    EXPECT_GT(value("vramguard_device_total_bytes", {{"device", "cpu"}}), 0.0);
    EXPECT_LE(value("vramguard_device_free_bytes", {{"device", "cpu"}}),
              value("vramguard_device_total_bytes", {{"device", "cpu"}}));
    const std::string key = status["encode"]["key"].get<std::string>();
    EXPECT_EQ(value("vramguard_learned_weight_budget", {{"device", "cpu"}, {"key", key}}),
              status["encode"]["learned_weight_budget"].get<double>());
    EXPECT_GT(value("vramguard_learned_weight_budget", {{"device", "cpu"}, {"key", key}}), 0.0);
    EXPECT_EQ(value("vramguard_model_loaded", {{"device", "cpu"}, {"model", "encoder"}}), 1.0);
    EXPECT_EQ(value("torch_server_requests_total", {{"outcome", "ok"}}), 1.0);
    EXPECT_EQ(value("torch_server_requests_total", {{"outcome", "bad_request_400"}}), 1.0);
    EXPECT_EQ(value("torch_server_unload_requests_total", {{"answer", "busy"}}), 1.0);
}

// --- two servers on one simulated device
// -----------------------------------------------------------

// A port nobody listens on now, for a server whose peer must know its port before it starts.
int free_port() {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t size = sizeof address;
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size) != 0)
        throw std::runtime_error(std::string("free_port: ") + std::strerror(errno));
    ::close(fd);
    return ntohs(address.sin_port);
}

// Servers A and B on a simulated 4 MB device in a file: one encoder (2.29 MiB and a 0.4 MB margin)
// fits, two do not. B has A as its peer; with `mutual`, A has B too. The clock is the device
// file's: it moves when the test says (and by a poll interval when a server waits), so "idle
// 31 s" is exact.
struct TwoServers {
    static constexpr std::uint64_t device_bytes = 4000000;

    explicit TwoServers(bool mutual = false)
        : b_port(mutual ? free_port() : 0),
          a(args({"--hold-encodes-while-file-exists", hold_file()}, b_port)),
          device(device_file(), 0),
          b(args({"--port", std::to_string(b_port)}, a.process->port())) {}

    std::vector<std::string> args(std::vector<std::string> extra, int peer_port) const {
        if (peer_port > 0)
            extra.insert(extra.end(),
                         {"--peer", "vramguard=http://127.0.0.1:" + std::to_string(peer_port)});
        return args(std::move(extra));
    }
    std::vector<std::string> args(std::vector<std::string> extra) const {
        std::vector<std::string> all = {"--simulate-shared-device", device_file(),
                                        "--simulated-device-bytes", std::to_string(device_bytes),
                                        "--idle-unload-seconds",    "0"};
        all.insert(all.end(), extra.begin(), extra.end());
        return all;
    }
    std::string device_file() const { return dir.file("device"); }
    std::string hold_file() const { return dir.file("hold"); }
    void advance(std::chrono::milliseconds d) { device.advance(d); }

    vramguard_test::TempDir dir{"torch-server-peers-"};
    int b_port;
    Running a;
    torch_server::SharedDevice device;  // the test's own map of the device: its clock and ooms
    Running b;
};

TEST(TorchServerPeers, AnIdlePeerUnloadsAndTheLoadSucceeds) {
    TwoServers servers;
    auto a = servers.a.client();
    auto b = servers.b.client();

    ASSERT_EQ(encode(*a, {"A's model"}).status, 200);
    EXPECT_EQ(servers.device.used(), 2397696u) << "A's encoder holds its bytes on the device";
    servers.advance(31s);  // A idle past the protocol's 30 s

    const Reply reply = encode(*b, {"B needs the room"});
    EXPECT_EQ(reply.status, 200) << reply.body.dump();
    EXPECT_EQ(servers.device.ooms(), 0u);

    const json status_a = get(*a, "/status").body;
    EXPECT_FALSE(status_a["model_loaded"].get<bool>()) << status_a.dump();
    EXPECT_EQ(status_a["registry"]["requested_unloads"].get<int>(), 1);
    EXPECT_EQ(status_a["unload_requests"]["unloaded"].get<int>(), 1);
    const json status_b = get(*b, "/status").body;
    EXPECT_TRUE(status_b["model_loaded"].get<bool>());
    EXPECT_EQ(status_b["registry"]["peer_requests"].get<int>(), 1);
    EXPECT_EQ(status_b["registry"]["peer_reliefs"].get<int>(), 1);
    EXPECT_EQ(status_b["requests"]["rejected_503"].get<int>(), 0);
    ASSERT_EQ(status_b["peers"].size(), 1u);
    EXPECT_EQ(status_b["peers"][0]["last_answer"].get<std::string>().rfind("freed", 0), 0u)
        << status_b["peers"].dump();
    EXPECT_EQ(servers.device.used(), 2397696u) << "B's encoder now, and only it";
}

TEST(TorchServerPeers, ABusyPeerMakesA503WithRetryAfterNamingIt) {
    TwoServers servers;
    auto a = servers.a.client();
    auto b = servers.b.client();
    const std::string peer = "vramguard@127.0.0.1:" + std::to_string(servers.a.process->port());

    // Idle for less than 30 s.
    ASSERT_EQ(encode(*a, {"A's model"}).status, 200);
    servers.advance(10s);
    Reply reply = encode(*b, {"B needs the room"});
    EXPECT_EQ(reply.status, 503) << reply.body.dump();
    EXPECT_FALSE(reply.retry_after.empty());
    const std::string idle_error = reply.body["error"].get<std::string>();
    EXPECT_NE(idle_error.find(peer + " busy, idle 10 s"), std::string::npos) << idle_error;
    EXPECT_TRUE(get(*a, "/status").body["model_loaded"].get<bool>());

    // A request in flight on A, past B's cooldown for A (30 s), A idle long before it.
    servers.advance(40s);
    { std::ofstream(servers.hold_file()) << "hold"; }
    Reply in_flight;
    std::thread request([&] {
        auto own = servers.a.client();
        in_flight = encode(*own, {"held in flight"});
    });
    const auto deadline = Clock::now() + 30s;
    while (get(*a, "/status").body["model"]["leases"].get<int>() == 0 && Clock::now() < deadline)
        std::this_thread::sleep_for(5ms);
    reply = encode(*b, {"B needs the room"});
    std::remove(servers.hold_file().c_str());
    request.join();
    EXPECT_EQ(in_flight.status, 200) << in_flight.body.dump();
    EXPECT_EQ(reply.status, 503) << reply.body.dump();
    EXPECT_FALSE(reply.retry_after.empty());
    const std::string busy_error = reply.body["error"].get<std::string>();
    EXPECT_NE(busy_error.find(peer + " busy"), std::string::npos) << busy_error;
    EXPECT_NE(busy_error.find("1 request(s) in flight"), std::string::npos) << busy_error;

    const json status_b = get(*b, "/status").body;
    EXPECT_EQ(status_b["requests"]["rejected_503"].get<int>(), 2);
    EXPECT_EQ(status_b["registry"]["peer_requests"].get<int>(), 2);
    EXPECT_EQ(get(*a, "/status").body["registry"]["requested_unloads"].get<int>(), 0);
    EXPECT_EQ(servers.device.ooms(), 0u);
}

TEST(TorchServerPeers, AlternatingRequestsDoNotPingPong) {
    TwoServers servers(/*mutual=*/true);  // each is the other's peer
    auto a = servers.a.client();
    auto b = servers.b.client();

    ASSERT_EQ(encode(*a, {"A first"}).status, 200);
    servers.advance(31s);
    Reply reply = encode(*b, {"B takes over"});
    ASSERT_EQ(reply.status, 200) << "A idle 31 s gives way: " << reply.body.dump();

    // 60 simulated seconds of A and B taking turns, a request a second.
    std::map<int, int> a_answers, b_answers;
    for (int second = 1; second <= 60; ++second) {
        servers.advance(1s);
        const bool a_turn = second % 2 == 1;
        reply = encode(a_turn ? *a : *b, {"turn " + std::to_string(second)});
        ASSERT_TRUE(reply.status == 200 || reply.status == 503) << reply.body.dump();
        if (reply.status == 503) {
            EXPECT_FALSE(reply.retry_after.empty());
        }
        ++(a_turn ? a_answers : b_answers)[reply.status];
    }
    const json status_a = get(*a, "/status").body, status_b = get(*b, "/status").body;
    const int unloads = status_a["registry"]["requested_unloads"].get<int>() +
                        status_b["registry"]["requested_unloads"].get<int>();
    // A gave way once, before the 60 s; in them, at most once per 30 s cooldown.
    EXPECT_LE(unloads, 1 + 60 / 30) << status_a.dump() << "\n" << status_b.dump();
    EXPECT_LE(status_a["peers"][0]["asked"].get<int>(), 60 / 30) << status_a["peers"].dump();
    EXPECT_LE(status_b["peers"][0]["asked"].get<int>(), 1) << status_b["peers"].dump();
    EXPECT_EQ(status_a["requests"]["failed_500"].get<int>(), 0);
    EXPECT_EQ(status_b["requests"]["failed_500"].get<int>(), 0);
    // B uses the device every 2 s, never idle 30 s: it keeps it, and A is told so.
    EXPECT_EQ(b_answers[200], 30);
    EXPECT_EQ(a_answers[503], 30);
    EXPECT_EQ(servers.device.ooms(), 0u);
}

}  // namespace
