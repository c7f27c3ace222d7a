// SPDX-License-Identifier: MIT
// GET /metrics in the Prometheus text format: the guard's, the encode key's and the registry's
// metrics come from vramguard::PrometheusExporter (vramguard/prometheus.hpp, which lists every
// counter through vramguard::for_each_counter, as /status does), the server's own request counters
// are added here. Only built where prometheus-cpp was found (TORCH_SERVER_HAS_PROMETHEUS);
// elsewhere /metrics answers 404 saying why.
#pragma once

#if TORCH_SERVER_HAS_PROMETHEUS

#include "batching.hpp"

#include <vramguard/prometheus.hpp>
#include <vramguard/vramguard.hpp>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torch_server {

using Counts = std::vector<std::pair<std::string, std::uint64_t>>;  // label value -> count

class Metrics {
   public:
    // Every series is labelled with the device ("cpu", "cuda:0"): the guard, the registry and the
    // encode key must outlive this object.
    template <class Probe>
    Metrics(vramguard::Guard<Probe>& guard, const vramguard::ModelRegistry<Probe>& registry,
            const vramguard::Key& encode_key, const std::string& device)
        : exporter_(registry_) {
        const prometheus::Labels labels{{"device", device}};
        exporter_.add_guard(guard, labels);
        exporter_.add_key(guard, encode_key, labels);
        exporter_.add_registry(registry, labels);
    }
    Metrics(const Metrics&) = delete;
    Metrics& operator=(const Metrics&) = delete;

    // requests: /encode outcome -> count; unload_answers: /request-unload answer -> count;
    // batcher: the batcher's counters (none with --batching per-request), as
    // torch_server_batcher_<name>_total, or torch_server_batcher_<name> for a highest-so-far.
    // The server keeps those totals itself, so each scrape writes them into a fresh registry.
    std::string render(const Counts& requests, const Counts& unload_answers,
                       const std::vector<BatcherCounter>& batcher) {
        exporter_.update();
        prometheus::Registry own;
        auto& by_outcome = prometheus::BuildCounter()
                               .Name("torch_server_requests_total")
                               .Help("HTTP requests to /encode by outcome")
                               .Register(own);
        for (const auto& [outcome, count] : requests)
            by_outcome.Add({{"outcome", outcome}}).Increment(static_cast<double>(count));
        auto& by_answer =
            prometheus::BuildCounter()
                .Name("torch_server_unload_requests_total")
                .Help("POST /request-unload answers this server gave (to peers and operators)")
                .Register(own);
        for (const auto& [answer, count] : unload_answers)
            by_answer.Add({{"answer", answer}}).Increment(static_cast<double>(count));
        for (const BatcherCounter& counter : batcher) {
            const std::string name = std::string("torch_server_batcher_") + counter.name;
            const auto value = static_cast<double>(counter.value);
            if (counter.gauge)
                prometheus::BuildGauge()
                    .Name(name)
                    .Help(counter.help)
                    .Register(own)
                    .Add({})
                    .Set(value);
            else
                prometheus::BuildCounter()
                    .Name(name + "_total")
                    .Help(counter.help)
                    .Register(own)
                    .Add({})
                    .Increment(value);
        }
        const prometheus::TextSerializer text;
        return text.Serialize(registry_.Collect()) + text.Serialize(own.Collect());
    }

   private:
    prometheus::Registry registry_;  // before the exporter, which holds a reference to it
    vramguard::PrometheusExporter exporter_;
};

}  // namespace torch_server

#endif  // TORCH_SERVER_HAS_PROMETHEUS
