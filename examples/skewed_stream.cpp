// SPDX-License-Identifier: MIT
// A server-like loop on a simulated 16 GiB GPU: a model load is admitted, then requests of skewed
// text lengths are encoded. Watch the guard learn what a token costs from its first OOM, plan
// every batch from that cost and the free memory, shrink before another process's squeeze can
// cost an OOM, and grow back when it leaves. Runs in simulated time (instantly).
//
//   ./skewed_stream            # weighted (token budget)
//   ./skewed_stream --count    # count-based batches, for comparison
#include <vramguard/vramguard.hpp>

#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

constexpr std::uint64_t kBytesPerToken = 12_MiB;  // activations of a padded transformer encoder

struct Text {
    int id;
    std::uint64_t tokens;
};

// Most requests are short; one text in twelve is ten times longer.
std::vector<Text> make_request(std::mt19937& random, int first_id, int size) {
    std::vector<Text> texts;
    for (int i = 0; i < size; ++i)
        texts.push_back(
            {first_id + i, random() % 12 == 0 ? 160u + random() % 96 : 16u + random() % 16});
    return texts;
}

}  // namespace

int main(int argc, char** argv) {
    const bool weighted = !(argc > 1 && std::strcmp(argv[1], "--count") == 0);

    SimulatedDevice gpu(16_GiB);
    ManualClock clock;  // simulated time: the demo runs instantly but waits "for real"
    Options options;
    options.clock = clock.clock_fn();
    options.sleep = clock.sleep_fn();
    options.persist = false;  // a real server keeps the default: learned sizes survive restarts
    options.log = [](Level level, std::string_view message) {
        if (level >= Level::warn)
            std::printf("    [%s] %.*s\n", to_string(level), static_cast<int>(message.size()),
                        message.data());
    };
    Guard<SimulatedDevice> guard(gpu, options);

    // 1. Admission before the load: 5 GiB declared, the weights take 4 GiB.
    const Key model_key = Key::of("text-encoder", {{"model", "e5-large"}, {"dtype", "fp16"}});
    auto weights = guard.load(model_key, 5_GiB, [&] { return gpu.allocate(4_GiB); });
    std::printf("loaded %s: %s on a %s device\n\n", model_key.describe().c_str(),
                format_bytes(weights.bytes()).c_str(), format_bytes(gpu.total_bytes()).c_str());

    const Key encode_key =
        Key::of("text-encoder/encode", {{"model", "e5-large"}, {"max_len", "256"}});
    std::mt19937 random(7);
    std::uint64_t items_done = 0, batches = 0;
    for (int request = 0; request < 36; ++request) {
        if (request == 12) {
            std::printf("\n>>> another process takes 6 GiB of the device\n");
            gpu.set_external_usage(6_GiB);
        }
        if (request == 24) {
            std::printf("\n>>> the other process exits\n");
            gpu.set_external_usage(0);
        }
        const auto texts = make_request(random, request * 64, 64);
        std::uint64_t request_batches = 0;
        // The batch function sees a no-copy view of the caller's texts; one result per text.
        auto encode_batch = [&](const BatchView<std::vector<Text>::const_iterator>& batch) {
            ++request_batches;
            std::uint64_t padded = 0;  // weighted: tokens; count: batch x longest (padding)
            std::uint64_t longest = 0;
            for (const Text& text : batch) {
                padded += text.tokens;
                longest = std::max(longest, text.tokens);
            }
            if (!weighted) padded = longest * batch.size();
            auto activations = gpu.allocate(padded * kBytesPerToken);
            clock.advance(std::chrono::microseconds(200 + 5 * padded));  // the "GPU" time
            std::vector<int> ids;
            for (const Text& text : batch) ids.push_back(text.id);
            return ids;
        };
        const std::vector<int> ids = weighted ? guard.encode(encode_key, texts, encode_batch,
                                                             [](const Text& t) { return t.tokens; })
                                              : guard.encode(encode_key, texts, encode_batch);
        items_done += ids.size();
        batches += request_batches;
        const Stats stats = guard.stats();
        std::printf(
            "request %2d: %zu texts in %2llu batches | learned %s %5llu | ooms %llu, grow-backs "
            "%llu\n",
            request, ids.size(), static_cast<unsigned long long>(request_batches),
            weighted ? "token budget" : "batch size  ",
            static_cast<unsigned long long>(weighted ? guard.learned_weight_budget(encode_key)
                                                     : guard.learned_batch_ceiling(encode_key)),
            static_cast<unsigned long long>(stats.ooms),
            static_cast<unsigned long long>(stats.grow_backs));
    }
    const Stats stats = guard.stats();
    std::printf(
        "\n%llu texts in %llu batches, %llu OOMs handled (%llu halvings, %llu single-item "
        "batches), %.2f s of simulated GPU time\n",
        static_cast<unsigned long long>(items_done), static_cast<unsigned long long>(batches),
        static_cast<unsigned long long>(stats.ooms),
        static_cast<unsigned long long>(stats.halvings),
        static_cast<unsigned long long>(stats.single_item_calls), to_seconds(clock.slept()));
    return 0;
}
