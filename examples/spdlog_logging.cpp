// SPDX-License-Identifier: MIT
// A server that logs through spdlog: vramguard's log sink is a std::function, and the three-line
// adapter in spdlog_sink.hpp hands every line to an spdlog::logger at the same level. On a
// simulated 8 GiB GPU a model load is admitted, an encode runs out of memory once and is retried
// smaller (vramguard's WARN, with the numbers, in the server's logger and pattern), and the guard
// ends with its learned batch size. Runs in simulated time (instantly).
//
//   ./spdlog_logging
#include <vramguard/vramguard.hpp>

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <numeric>
#include <vector>

#include "spdlog_sink.hpp"

using namespace vramguard;
using namespace vramguard::literals;

int main() {
    // The server's logger, as a server sets it up: a name, a pattern, a level.
    auto logger = spdlog::stdout_logger_mt("gpu");
    logger->set_pattern("[%n] [%l] %v");
    logger->set_level(spdlog::level::info);

    SimulatedDevice gpu(8_GiB);
    ManualClock clock;  // simulated time: the demo runs instantly
    Options options;
    options.clock = clock.clock_fn();
    options.sleep = clock.sleep_fn();
    options.persist = false;  // a real server keeps the default: learned sizes survive restarts
    options.log = spdlog_sink(logger);  // every vramguard line goes to `logger`, level for level
    Guard<SimulatedDevice> guard(gpu, options);

    const Key model_key = Key::of("text-encoder", {{"model", "e5-large"}, {"dtype", "fp16"}});
    auto weights = guard.load(model_key, 3_GiB, [&] { return gpu.allocate(2_GiB); });
    logger->info("loaded {} ({} of the device's {})", model_key.describe(),
                 format_bytes(weights.bytes()), format_bytes(gpu.total_bytes()));

    // 256 items of 64 MiB of activations each: the first chunk does not fit, the guard halves it.
    std::vector<int> items(256);
    std::iota(items.begin(), items.end(), 0);
    const Key encode_key = Key::of("text-encoder/encode", {{"model", "e5-large"}});
    const auto results = guard.encode(
        encode_key, items, [&](const BatchView<std::vector<int>::const_iterator>& batch) {
            auto activations = gpu.allocate(64_MiB * batch.size());
            return std::vector<int>(batch.begin(), batch.end());
        });

    const Stats stats = guard.stats();
    logger->info("encoded {} items: {} OOM(s) handled, learned batch size {}", results.size(),
                 stats.ooms, guard.learned_batch_ceiling(encode_key));
    return results.size() == items.size() ? 0 : 1;
}
