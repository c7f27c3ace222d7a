// SPDX-License-Identifier: MIT
// GET /metrics in the Prometheus text format, rendered with prometheus-cpp's core library (its
// Registry, Counter and Gauge families and TextSerializer) from the same snapshot /status shows.
// Each scrape builds a fresh registry from the snapshot: the counters vramguard keeps are already
// totals, so nothing here has to remember the previous scrape. Only built where prometheus-cpp was
// found (TORCH_SERVER_HAS_PROMETHEUS); elsewhere /metrics answers 404 saying why.
#pragma once

#if TORCH_SERVER_HAS_PROMETHEUS

#include <vramguard/vramguard.hpp>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace torch_server {

// What /metrics shows besides the registry's status and the guard's counters.
struct MetricsSnapshot {
    vramguard::RegistryStatus registry;
    vramguard::Stats guard;
    std::string device;  // "cpu", "cuda:0"
    std::string encode_key;
    std::uint64_t learned_weight_budget = 0;
    std::uint64_t learned_batch_ceiling = 0;
    std::vector<std::pair<std::string, std::uint64_t>> requests;        // outcome -> count
    std::vector<std::pair<std::string, std::uint64_t>> unload_answers;  // answer -> count
};

// "busy, idle 3 s (…)" -> "busy": the kind of a peer's last answer (describe()'s first word).
inline std::string answer_kind(const std::string& described) {
    const std::size_t end = described.find_first_of(" ,:");
    return described.substr(0, end);
}

inline std::string render_metrics(const MetricsSnapshot& s) {
    prometheus::Registry registry;
    auto counter = [&](const std::string& name, const std::string& help, double value,
                       const prometheus::Labels& labels = {}) {
        prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add(labels).Increment(
            value);
    };
    auto gauge = [&](const std::string& name, const std::string& help, double value,
                     const prometheus::Labels& labels = {}) {
        prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add(labels).Set(value);
    };
    auto d = [](std::uint64_t v) { return static_cast<double>(v); };

    const vramguard::Stats& g = s.guard;
    for (const auto& [name, value, help] :
         std::vector<std::tuple<const char*, std::uint64_t, const char*>>{
             {"calls", g.calls, "Guard::load and Guard::encode calls"},
             {"ooms", g.ooms, "out-of-memory errors the guard handled"},
             {"retries", g.retries, "retries after an out-of-memory error"},
             {"halvings", g.halvings, "batch budgets halved after an out-of-memory error"},
             {"single_item_calls", g.single_item_calls, "items run alone"},
             {"rejections", g.rejections, "calls refused by admission"},
             {"waits", g.waits, "calls that waited for memory"},
             {"grow_backs", g.grow_backs, "batch budgets grown back"}})
        counter(std::string("vramguard_guard_") + name + "_total", help, d(value));

    const vramguard::RegistryStats& r = s.registry.stats;
    for (const auto& [name, value, help] :
         std::vector<std::tuple<const char*, std::uint64_t, const char*>>{
             {"loads", r.loads, "models loaded"},
             {"load_failures", r.load_failures, "loads that threw"},
             {"evictions", r.evictions, "idle models unloaded to make room for a load"},
             {"idle_unloads", r.idle_unloads, "models unloaded after the idle timeout"},
             {"requested_unloads", r.requested_unloads, "models unloaded on /request-unload"},
             {"pressure_cache_releases", r.pressure_cache_releases,
              "allocator cache releases under memory pressure"},
             {"pressure_unloads", r.pressure_unloads, "idle models unloaded under memory pressure"},
             {"rejections", r.rejections, "loads refused for lack of memory"},
             {"waits", r.waits, "loads that waited for room"},
             {"peer_requests", r.peer_requests, "peers asked to free memory"},
             {"peer_reliefs", r.peer_reliefs, "loads admitted after peers freed memory"}})
        counter(std::string("vramguard_registry_") + name + "_total", help, d(value));

    const prometheus::Labels device{{"device", s.device}};
    gauge("vramguard_device_free_bytes", "free bytes on the device, as the probe reads them",
          d(s.registry.memory.free_bytes), device);
    gauge("vramguard_device_total_bytes", "bytes on the device", d(s.registry.memory.total_bytes),
          device);

    const prometheus::Labels key{{"key", s.encode_key}};
    gauge("vramguard_learned_weight_budget", "learned encode budget (padded tokens; 0 = none yet)",
          d(s.learned_weight_budget), key);
    gauge("vramguard_learned_batch_ceiling", "learned encode batch ceiling (items; 0 = none yet)",
          d(s.learned_batch_ceiling), key);

    for (const vramguard::ModelStatus& m : s.registry.models) {
        const prometheus::Labels model{{"model", m.name}};
        gauge("vramguard_model_loaded", "1 when the model is loaded", m.loaded ? 1 : 0, model);
        gauge("vramguard_model_bytes", "bytes the model is counted as holding", d(m.bytes), model);
        gauge("vramguard_model_leases", "requests using the model now", m.leases, model);
        gauge("vramguard_model_idle_seconds", "seconds since the model's last request ended",
              m.idle_seconds, model);
    }

    for (const vramguard::PeerStatus& p : s.registry.peers) {
        counter("vramguard_peer_asked_total", "times this peer was asked to free memory",
                d(p.asked), {{"peer", p.name}});
        if (!p.last_answer.empty())
            gauge("vramguard_peer_last_answer", "1 for the kind of the peer's last answer", 1,
                  {{"peer", p.name}, {"answer", answer_kind(p.last_answer)}});
        gauge("vramguard_peer_cooldown_seconds", "seconds until the peer may be asked again",
              p.cooldown_left_seconds, {{"peer", p.name}});
    }

    for (const auto& [outcome, value] : s.requests)
        counter("torch_server_requests_total", "HTTP requests to /encode by outcome", d(value),
                {{"outcome", outcome}});
    for (const auto& [answer, value] : s.unload_answers)
        counter("torch_server_unload_requests_total",
                "POST /request-unload answers this server gave (to peers and operators)", d(value),
                {{"answer", answer}});

    return prometheus::TextSerializer().Serialize(registry.Collect());
}

}  // namespace torch_server

#endif  // TORCH_SERVER_HAS_PROMETHEUS
