// SPDX-License-Identifier: MIT
// How /encode runs its texts (--batching): through one vramguard::Batcher for the encode key (the
// default), which coalesces the texts of every request in flight into shared batches sized by what
// the guard learned, or with one Guard::encode per request ("per-request", the path before the
// Batcher). Here: the flag's values, what the batcher queues for each text, and the batcher's
// counters as /status and /metrics list them.
#pragma once

#include "embedding_model.hpp"

#include <vramguard/vramguard.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace torch_server {

enum class Batching { batcher, per_request };

inline const char* to_string(Batching batching) {
    return batching == Batching::batcher ? "batcher" : "per-request";
}
inline std::optional<Batching> parse_batching(const std::string& name) {
    if (name == "batcher") return Batching::batcher;
    if (name == "per-request") return Batching::per_request;
    return std::nullopt;
}

// What the texts of one request share in the batcher: the request's lease on the model, and how
// many batches its texts ran in (the answer's "batches"). The queued texts hold it, not the
// request: a request that stops waiting leaves the model loaded until its texts have run, so a
// batch never runs on a model that was unloaded under it.
struct QueuedRequest {
    explicit QueuedRequest(vramguard::Lease<HeldEncoder> lease) : model(std::move(lease)) {}
    vramguard::Lease<HeldEncoder> model;
    std::atomic<unsigned> batches{0};
};

// One text in the batcher's queue.
struct QueuedText {
    Tokens tokens;
    std::shared_ptr<QueuedRequest> request;
};

// The learner's weight of a queued text: its tokens (batches are padded: vramguard::padded).
struct TokensOfQueued {
    std::uint64_t operator()(const QueuedText& text) const noexcept { return text.tokens.size(); }
};

// One of vramguard::BatcherStats's fields, named once for /status and /metrics.
struct BatcherCounter {
    const char* name;
    const char* help;
    std::uint64_t value;
    bool gauge;  // a highest-so-far, not a total
};

// Every field of BatcherStats, from vramguard's one list of them (for_each_counter); the longest
// queue wait is a highest-so-far (a gauge), the rest are totals.
inline std::vector<BatcherCounter> batcher_counters(const vramguard::BatcherStats& stats) {
    std::vector<BatcherCounter> counters;
    vramguard::for_each_counter(
        stats, [&](const char* name, const char* help, std::uint64_t value) {
            counters.push_back({name, help, value, std::string_view(name) == "queue_wait_max_us"});
        });
    return counters;
}

}  // namespace torch_server
