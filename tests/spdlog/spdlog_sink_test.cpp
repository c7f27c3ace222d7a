// SPDX-License-Identifier: MIT
// The spdlog adapter the README shows (examples/spdlog_sink.hpp): vramguard's log reaches a real
// spdlog::logger, level for level and text unchanged, and a logger that throws stays contained.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "spdlog_sink.hpp"

#include <atomic>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

// A real spdlog logger writing "<level>|<text>" lines into a string stream.
class LoggedLines {
   public:
    explicit LoggedLines(spdlog::level::level_enum level = spdlog::level::trace)
        : logger_(std::make_shared<spdlog::logger>(
              "vramguard", std::make_shared<spdlog::sinks::ostream_sink_mt>(stream_))) {
        logger_->set_pattern("%l|%v");
        logger_->set_level(level);
    }
    const std::shared_ptr<spdlog::logger>& logger() const { return logger_; }

    // Each line as (spdlog's level name, text).
    std::vector<std::pair<std::string, std::string>> lines() const {
        std::vector<std::pair<std::string, std::string>> out;
        std::istringstream in(stream_.str());
        for (std::string line; std::getline(in, line);) {
            const auto bar = line.find('|');
            out.emplace_back(line.substr(0, bar),
                             bar == std::string::npos ? "" : line.substr(bar + 1));
        }
        return out;
    }

   private:
    std::ostringstream stream_;
    std::shared_ptr<spdlog::logger> logger_;
};

std::vector<int> iota(int n) {
    std::vector<int> items(static_cast<std::size_t>(n));
    std::iota(items.begin(), items.end(), 0);
    return items;
}

// A guard on a simulated 8 GiB GPU, on simulated time, logging through `sink`.
struct SimulatedServer {
    SimulatedDevice gpu{8_GiB};
    ManualClock clock;
    Guard<SimulatedDevice> guard;

    explicit SimulatedServer(LogSink sink) : guard(gpu, options_with(std::move(sink))) {}

    Options options_with(LogSink sink) {
        Options options;
        options.clock = clock.clock_fn();
        options.sleep = clock.sleep_fn();
        options.persist = false;
        options.log = std::move(sink);
        return options;
    }

    // 64 items of 256 MiB of activations each (16 GiB at once): the first chunk runs out of
    // memory, and the guard logs a WARN and retries it smaller. Returns the results in order.
    std::vector<int> encode_with_one_oom() {
        const std::vector<int> items = iota(64);
        return guard.encode(Key::of("e5-large/encode"), items,
                            [&](const BatchView<std::vector<int>::const_iterator>& batch) {
                                auto activations = gpu.allocate(256_MiB * batch.size());
                                return std::vector<int>(batch.begin(), batch.end());
                            });
    }
};

// An spdlog sink that fails on every line, as a full disk or a dropped socket does.
class ThrowingSink : public spdlog::sinks::base_sink<std::mutex> {
   protected:
    void sink_it_(const spdlog::details::log_msg&) override {
        throw std::runtime_error("log backend down");
    }
    void flush_() override {}
};

}  // namespace

TEST(SpdlogSink, EachLevelArrivesAtTheSameSpdlogLevelWithTheTextUnchanged) {
    LoggedLines log;
    const LogSink sink = spdlog_sink(log.logger());
    sink(Level::debug, "a debug line");
    sink(Level::info, "an info line");
    sink(Level::warn, "a warn line");
    sink(Level::error, "an error line");
    // Braces are text, not a format string.
    sink(Level::warn, "key {model=e5-large} needs {} 5.0 GiB, 100% of it");

    const std::vector<std::pair<std::string, std::string>> expected = {
        {"debug", "a debug line"},
        {"info", "an info line"},
        {"warning", "a warn line"},
        {"error", "an error line"},
        {"warning", "key {model=e5-large} needs {} 5.0 GiB, 100% of it"},
    };
    EXPECT_EQ(log.lines(), expected);
}

TEST(SpdlogSink, TheLoggersOwnLevelStillFilters) {
    LoggedLines log(spdlog::level::warn);
    const LogSink sink = spdlog_sink(log.logger());
    sink(Level::debug, "dropped");
    sink(Level::info, "dropped");
    sink(Level::warn, "kept");
    sink(Level::error, "kept too");
    const std::vector<std::pair<std::string, std::string>> expected = {{"warning", "kept"},
                                                                       {"error", "kept too"}};
    EXPECT_EQ(log.lines(), expected);
}

TEST(SpdlogSink, AHandledOomReachesTheLoggerAsAWarningWithItsNumbers) {
    LoggedLines log;
    SimulatedServer server(spdlog_sink(log.logger()));
    EXPECT_EQ(server.encode_with_one_oom(), iota(64));
    ASSERT_GT(server.guard.stats().ooms, 0u);

    bool found = false;
    for (const auto& [level, text] : log.lines()) {
        EXPECT_NE(level, "error") << "nothing the library handles is an ERROR: " << text;
        if (level == "warning" && text.find("encode") != std::string::npos &&
            text.find("e5-large/encode") != std::string::npos &&
            text.find("out of memory on a batch of 64 items") != std::string::npos)
            found = true;
    }
    EXPECT_TRUE(found) << "no WARN for the handled OOM among:\n"
                       << [&] {
                              std::string all;
                              for (const auto& [level, text] : log.lines())
                                  all += level + "|" + text + "\n";
                              return all;
                          }();
}

TEST(SpdlogSink, ASinkThatThrowsIsContainedBySpdlog) {
    // spdlog's own error handler catches what its sinks throw: the guard never sees it.
    auto logger = std::make_shared<spdlog::logger>("failing", std::make_shared<ThrowingSink>());
    std::atomic<int> handled{0};
    logger->set_error_handler([&](const std::string&) { ++handled; });
    SimulatedServer server(spdlog_sink(logger));
    EXPECT_EQ(server.encode_with_one_oom(), iota(64));
    EXPECT_GT(server.guard.stats().ooms, 0u);
    EXPECT_GT(handled.load(), 0);
}

TEST(SpdlogSink, AnErrorHandlerThatRethrowsIsContainedByVramguard) {
    // A logger whose error handler rethrows: the exception leaves the adapter, and vramguard's
    // sink call contains it (one line to stderr, rate-limited) as it does for any sink.
    auto logger = std::make_shared<spdlog::logger>("rethrowing", std::make_shared<ThrowingSink>());
    std::atomic<int> rethrown{0};
    logger->set_error_handler([&](const std::string& message) {
        ++rethrown;
        throw std::runtime_error(message);
    });
    EXPECT_THROW(spdlog_sink(logger)(Level::warn, "escapes the adapter"), std::runtime_error);

    SimulatedServer server(spdlog_sink(logger));
    EXPECT_EQ(server.encode_with_one_oom(), iota(64));
    EXPECT_GT(server.guard.stats().ooms, 0u);
    EXPECT_GT(rethrown.load(), 1);
}
