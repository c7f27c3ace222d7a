// SPDX-License-Identifier: MIT
// examples/vram_manager: its decision as a table, its loop against fake ComfyUI and Ollama servers
// holding bytes of a simulated device (on a ManualClock: the rate limit is tested without
// waiting), and the program itself run against a fake.
#include <vram_manager/manager.hpp>

#include <gtest/gtest.h>

#include "fake_services.hpp"
#include "guard_fixture.hpp"

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <sys/wait.h>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vram_manager::Config;
using vram_manager::decide;
using vram_manager::Stage;
using vramguard_test::CapturedLog;
using vramguard_test::FakeComfyUi;
using vramguard_test::FakeOllama;

namespace {

bool has(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

TEST(VramManagerDecision, ThresholdsAndRateLimit) {
    const Config config;  // 75 %, 85 %, 30 s
    const TimePoint now = TimePoint{} + 1h;
    const std::uint64_t at85 = policy::scale_bytes(16_GiB, 0.85);  // 13.6 GiB
    struct Row {
        std::uint64_t used;  // of 16 GiB
        std::optional<Duration> acted_ago;
        Stage stage;
        std::uint64_t to_free;
        const char* why;
    };
    const std::vector<Row> table = {
        {0, std::nullopt, Stage::none, 0, "0.0 % in use, at or under 75.0 %"},
        {12_GiB, std::nullopt, Stage::none, 0, "75.0 % in use, at or under 75.0 %"},
        {12_GiB + 1, std::nullopt, Stage::idle, 1, "above the relieve threshold 75.0 %"},
        {13_GiB, std::nullopt, Stage::idle, 1_GiB, "81.2 % in use, above the relieve threshold"},
        {13_GiB, 29s, Stage::rate_limited, 1_GiB, "acted 29 s ago, at most once per 30 s"},
        {13_GiB, 30s, Stage::idle, 1_GiB, "above the relieve threshold"},
        {14_GiB, std::nullopt, Stage::unload, 14_GiB - at85,
         "87.5 % in use, above the unload threshold 85.0 %"},
        {14_GiB, 1s, Stage::rate_limited, 14_GiB - at85, "acted 1 s ago"},
        {16_GiB, std::nullopt, Stage::unload, 16_GiB - at85, "100.0 % in use"},
    };
    for (const Row& row : table) {
        const MemoryInfo memory{16_GiB - row.used, 16_GiB};
        std::optional<TimePoint> last;
        if (row.acted_ago) last = now - *row.acted_ago;
        const vram_manager::Decision d = decide(memory, last, now, config);
        EXPECT_EQ(d.stage, row.stage) << row.used << ": " << d.why;
        EXPECT_EQ(d.to_free, row.to_free) << row.used << ": " << d.why;
        EXPECT_TRUE(has(d.why, row.why)) << d.why;
    }
    Config bad;
    bad.unload_threshold = 0.7;
    EXPECT_THROW(bad.validate(), std::invalid_argument);
    bad = Config{};
    bad.relieve_threshold = 1.0;
    EXPECT_THROW(bad.validate(), std::invalid_argument);
    bad = Config{};
    bad.peer_timeout = 0ms;
    EXPECT_THROW(bad.validate(), std::invalid_argument);
}

// The loop on a 16 GiB device: ComfyUI holds 6 GiB, Ollama 4 GiB ("old", unused for 4 min) and
// 3 GiB ("fresh", used a moment ago). 81 % in use: ComfyUI is asked for its models only and that
// covers it, Ollama is not asked. Then another process takes 7 GiB (87.5 %): within the rate
// limit nothing is asked; after it, unloads: ComfyUI holds nothing, Ollama's least recently used
// model goes, and that covers it.
TEST(VramManagerLoop, AsksThePeersAndLogsWhy) {
    SimulatedDevice device{16_GiB};
    FakeComfyUi comfy(device);
    FakeOllama ollama(device);
    comfy.hold(6_GiB);
    ollama.load("old", 4_GiB, 60);
    ollama.load("fresh", 3_GiB, 290);
    comfy.start();
    ollama.start();
    ManualClock clock;
    CapturedLog log;
    vram_manager::Manager<SimulatedDevice> manager(
        device,
        {vramguard::peers::parse_http_peer("comfyui=" + comfy.url()),
         vramguard::peers::parse_http_peer("ollama=" + ollama.url())},
        Config{}, test_options(clock, log));

    EXPECT_EQ(manager.step().stage, Stage::idle);
    EXPECT_EQ(comfy.held(), 0u);
    EXPECT_EQ(comfy.last_free()["free_memory"], false) << "idle stage: models, not the node cache";
    EXPECT_EQ(comfy.last_free()["unload_models"], true);
    EXPECT_EQ(ollama.count("GET", "/api/ps"), 0u) << "ComfyUI's claim covered it";
    EXPECT_TRUE(log.contains(
        "81.2 % in use, above the relieve threshold 75.0 %: asking peers for idle models and "
        "caches (1.00 GiB to free)"));
    EXPECT_TRUE(log.contains("comfyui@127.0.0.1:" + std::to_string(comfy.port()) +
                             " freed 6.00 GiB (claimed) (models)"));
    EXPECT_TRUE(log.contains("the freed memory showed after 0 ms: 43.8 % in use now"));

    device.set_external_usage(7_GiB);  // 14 GiB in use
    clock.advance(10s);
    EXPECT_EQ(manager.step().stage, Stage::rate_limited);
    EXPECT_TRUE(
        log.contains("87.5 % in use, above the unload threshold 85.0 %; acted 10 s ago, "
                     "at most once per 30 s: not asking"));
    EXPECT_EQ(ollama.count("GET", "/api/ps"), 0u);

    clock.advance(25s);
    EXPECT_EQ(manager.step().stage, Stage::unload);
    EXPECT_FALSE(ollama.loaded("old"));
    EXPECT_TRUE(ollama.loaded("fresh")) << "the old model's 4 GiB covered the 0.4 GiB to free";
    EXPECT_TRUE(log.contains("above the unload threshold 85.0 %: asking peers for unload"));
    EXPECT_TRUE(log.contains("nothing to free (its allocator holds nothing)"));
    EXPECT_TRUE(log.contains("freed 4.00 GiB (claimed) (unloaded old)"));
    EXPECT_EQ(log.count(Level::error), 0u);
    EXPECT_EQ(log.count(Level::warn), 0u);
}

#ifdef VRAMGUARD_VRAM_MANAGER_PATH
// The program: flags, one reading of a simulated device at 81 %, one ask, and the log on stdout.
TEST(VramManagerProgram, RunsAgainstAFakeAndLogsWhatItAsked) {
    SimulatedDevice device{16_GiB};
    FakeOllama ollama(device);
    ollama.load("old", 4_GiB, 60);
    ollama.start();
    const std::string command =
        std::string(VRAMGUARD_VRAM_MANAGER_PATH) +
        " --device simulated:16:13 --steps 1 --timeout 1000 --peer ollama=" + ollama.url() +
        " --token t0ken 2>&1";
    FILE* pipe = ::popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    std::string output;
    char buffer[512];
    while (std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
    EXPECT_EQ(::pclose(pipe), 0) << output;
    EXPECT_TRUE(has(output, "watching a simulated 16.00 GiB device with 1 peer(s)")) << output;
    EXPECT_TRUE(has(output, "holds 4.00 GiB (1 model(s) loaded)")) << output;
    EXPECT_TRUE(has(output,
                    "81.2 % in use, above the relieve threshold 75.0 %: asking peers for "
                    "idle models and caches"))
        << output;
    EXPECT_TRUE(has(output, "freed 4.00 GiB (claimed) (unloaded old)")) << output;
    EXPECT_FALSE(ollama.loaded("old"));
    for (const auto& seen : ollama.seen()) EXPECT_EQ(seen.authorization, "Bearer t0ken");
    EXPECT_NE(
        std::system((std::string(VRAMGUARD_VRAM_MANAGER_PATH) + " --peer nonsense >/dev/null 2>&1")
                        .c_str()),
        0);
}

// The same run with every flag from the environment (VRAMGUARD_MANAGER_*), the token too, so
// nothing secret is on the command line; a bad value there names the flag; --help lists them.
TEST(VramManagerProgram, TakesEveryFlagFromTheEnvironment) {
    SimulatedDevice device{16_GiB};
    FakeOllama ollama(device);
    ollama.load("old", 4_GiB, 60);
    ollama.start();
    auto run = [](const std::string& command) {
        FILE* pipe = ::popen(command.c_str(), "r");
        std::string output;
        char buffer[512];
        while (pipe && std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
        const int status = pipe ? ::pclose(pipe) : -1;
        return std::make_pair(status, output);
    };
    const std::string program = VRAMGUARD_VRAM_MANAGER_PATH;
    const auto [status, output] =
        run("VRAMGUARD_MANAGER_DEVICE=simulated:16:13 VRAMGUARD_MANAGER_STEPS=1 "
            "VRAMGUARD_MANAGER_TIMEOUT=1000 VRAMGUARD_MANAGER_PEER=ollama=" +
            ollama.url() + " VRAMGUARD_MANAGER_TOKEN=t0ken " + program + " 2>&1");
    EXPECT_EQ(status, 0) << output;
    EXPECT_TRUE(has(output, "watching a simulated 16.00 GiB device with 1 peer(s)")) << output;
    EXPECT_TRUE(has(output, "freed 4.00 GiB (claimed) (unloaded old)")) << output;
    EXPECT_FALSE(ollama.loaded("old"));
    ASSERT_FALSE(ollama.seen().empty());
    for (const auto& seen : ollama.seen()) EXPECT_EQ(seen.authorization, "Bearer t0ken");

    const auto [bad_status, bad] = run("VRAMGUARD_MANAGER_UNLOAD_AT=lots " + program + " 2>&1");
    EXPECT_TRUE(WIFEXITED(bad_status) && WEXITSTATUS(bad_status) == 2) << bad;
    EXPECT_TRUE(has(bad, "--unload-at")) << bad;
    const auto [order_status, order] =
        run(program + " --token t --peer ollama=" + ollama.url() + " 2>&1");
    EXPECT_TRUE(WIFEXITED(order_status) && WEXITSTATUS(order_status) == 2) << order;
    EXPECT_TRUE(has(order, "--token comes after the --peer it is for")) << order;
    const auto [help_status, help] = run(program + " --help");
    EXPECT_EQ(help_status, 0);
    for (const char* flag :
         {"--relieve-at", "VRAMGUARD_MANAGER_RELIEVE_AT", "VRAMGUARD_MANAGER_TOKEN"})
        EXPECT_TRUE(has(help, flag)) << flag << "\n" << help;
}
#endif

}  // namespace
