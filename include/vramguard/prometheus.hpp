// SPDX-License-Identifier: MIT
// PrometheusExporter: a guard's and a model registry's counters and gauges in a user's
// prometheus::Registry (prometheus-cpp's core library; CMake target vramguard::prometheus). Never
// part of the core or of the single header.
//
// The counters come from for_each_counter() (stats.hpp, models.hpp), so a new counter shows up
// here without an edit. prometheus-cpp keeps values in its own objects; update() copies the current
// ones in (counters by the difference since the previous update, as prometheus-cpp counters only
// grow), so call it before each scrape, or from a timer where prometheus::Exposer serves the
// registry.
#pragma once

#include <vramguard/detail/prometheus_feed.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/models.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/labels.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

class PrometheusExporter {
   public:
    // Metrics go to `registry`, which must outlive the exporter, as must everything added.
    explicit PrometheusExporter(::prometheus::Registry& registry) : registry_(registry) {}
    PrometheusExporter(const PrometheusExporter&) = delete;
    PrometheusExporter& operator=(const PrometheusExporter&) = delete;

    // vramguard_guard_<counter>_total (for_each_counter(Stats)) and
    // vramguard_device_{free,total}_bytes, each series labelled with `labels`. Two guards in one
    // registry need labels that tell them apart ({{"device", "cuda:0"}}): a series fed twice
    // throws std::invalid_argument.
    template <class Probe>
    void add_guard(Guard<Probe>& guard, const ::prometheus::Labels& labels = {}) {
        auto counters = counter_feeds<Stats>("vramguard_guard_", labels);
        ::prometheus::Gauge& free =
            gauge("vramguard_device_free_bytes",
                  "free bytes on the device, as the guard's probe reads them", labels);
        ::prometheus::Gauge& total =
            gauge("vramguard_device_total_bytes", "bytes on the device", labels);
        add_update([&guard, counters, &free, &total]() mutable {
            feed(counters, guard.stats());
            const MemoryInfo memory = guard.probe().memory();
            free.Set(static_cast<double>(memory.free_bytes));
            total.Set(static_cast<double>(memory.total_bytes));
        });
    }

    // vramguard_learned_batch_ceiling and vramguard_learned_weight_budget of one key (0: nothing
    // learned yet), labelled with `labels` and key="<Key::hex()>".
    template <class Probe>
    void add_key(Guard<Probe>& guard, const Key& key, const ::prometheus::Labels& labels = {}) {
        const ::prometheus::Labels keyed = detail::with_label(labels, "key", key.hex());
        ::prometheus::Gauge& ceiling =
            gauge("vramguard_learned_batch_ceiling",
                  "learned encode batch ceiling of a key, in items (0: none yet)", keyed);
        ::prometheus::Gauge& budget =
            gauge("vramguard_learned_weight_budget",
                  "learned encode budget of a key, in weight units such as padded tokens (0: none "
                  "yet)",
                  keyed);
        add_update([&guard, key, &ceiling, &budget] {
            ceiling.Set(static_cast<double>(guard.learned_batch_ceiling(key)));
            budget.Set(static_cast<double>(guard.learned_weight_budget(key)));
        });
    }

    // vramguard_registry_<counter>_total (for_each_counter(RegistryStats)),
    // vramguard_registry_{loaded,max_loaded}_models, per model (label model)
    // vramguard_model_{loaded,bytes,leases,idle_seconds}, and per peer (label peer)
    // vramguard_peer_asked_total, vramguard_peer_cooldown_seconds and vramguard_peer_last_answer
    // (1, labelled with the answer's kind). The device's memory comes with add_guard().
    template <class Probe>
    void add_registry(const ModelRegistry<Probe>& registry,
                      const ::prometheus::Labels& labels = {}) {
        auto counters = counter_feeds<RegistryStats>("vramguard_registry_", labels);
        ::prometheus::Gauge& loaded =
            gauge("vramguard_registry_loaded_models", "models loaded now", labels);
        ::prometheus::Gauge& cap = gauge("vramguard_registry_max_loaded_models",
                                         "models that may be loaded at once", labels);
        auto series = std::make_shared<Series>();
        add_update([this, &registry, labels, counters, &loaded, &cap, series]() mutable {
            const RegistryStatus status = registry.status();
            feed(counters, status.stats);
            loaded.Set(static_cast<double>(status.loaded_models));
            cap.Set(static_cast<double>(status.max_loaded_models));
            for (const ModelStatus& model : status.models) update_model(model, labels, *series);
            for (const PeerStatus& peer : status.peers) update_peer(peer, labels, *series);
        });
    }

    // Copies every added guard's, key's and registry's current values into the registry. Call it
    // before each scrape. Thread-safe; throws what a probe's memory() or a registry's status()
    // throws.
    void update() {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto& update : updates_) update();
    }

   private:
    struct ModelSeries {
        ::prometheus::Gauge *loaded, *bytes, *leases, *idle_seconds;
    };
    struct PeerSeries {
        detail::CounterFeed asked;
        ::prometheus::Gauge* cooldown = nullptr;
        ::prometheus::Gauge* last_answer = nullptr;  // labelled with last_kind
        std::string last_kind;
    };
    // The series of models and peers, made the first time update() sees them.
    struct Series {
        std::map<std::string, ModelSeries> models;
        std::map<std::string, PeerSeries> peers;
    };

    template <class Counters>
    std::vector<detail::CounterFeed> counter_feeds(const std::string& prefix,
                                                   const ::prometheus::Labels& labels) {
        std::vector<detail::CounterFeed> feeds;
        for_each_counter(Counters{}, [&](const char* name, const char* help, std::uint64_t) {
            feeds.push_back({&counter(prefix + name + "_total", help, labels)});
        });
        return feeds;
    }
    template <class Counters>
    static void feed(std::vector<detail::CounterFeed>& feeds, const Counters& counters) {
        std::size_t i = 0;
        for_each_counter(counters, [&](const char*, const char*, std::uint64_t value) {
            feeds[i++].set(value);
        });
    }

    void update_model(const ModelStatus& model, const ::prometheus::Labels& labels,
                      Series& series) {
        auto found = series.models.find(model.name);
        if (found == series.models.end()) {
            const auto named = detail::with_label(labels, "model", model.name);
            ModelSeries made{
                &gauge_family("vramguard_model_loaded", "1 when the model is loaded").Add(named),
                &gauge_family("vramguard_model_bytes", "bytes the model is counted as holding")
                     .Add(named),
                &gauge_family("vramguard_model_leases", "requests using the model now").Add(named),
                &gauge_family("vramguard_model_idle_seconds",
                              "seconds since the model's last lease ended (0 while leased)")
                     .Add(named)};
            found = series.models.emplace(model.name, made).first;
        }
        found->second.loaded->Set(model.loaded ? 1 : 0);
        found->second.bytes->Set(static_cast<double>(model.bytes));
        found->second.leases->Set(model.leases);
        found->second.idle_seconds->Set(model.idle_seconds);
    }

    void update_peer(const PeerStatus& peer, const ::prometheus::Labels& labels, Series& series) {
        const auto named = detail::with_label(labels, "peer", peer.name);
        auto found = series.peers.find(peer.name);
        if (found == series.peers.end()) {
            PeerSeries made;
            made.asked.counter = &counter_family("vramguard_peer_asked_total",
                                                 "times the peer was asked to free memory")
                                      .Add(named);
            made.cooldown = &gauge_family("vramguard_peer_cooldown_seconds",
                                          "seconds until the peer may be asked again")
                                 .Add(named);
            found = series.peers.emplace(peer.name, std::move(made)).first;
        }
        PeerSeries& mine = found->second;
        mine.asked.set(peer.asked);
        mine.cooldown->Set(peer.cooldown_left_seconds);
        const std::string kind = detail::answer_kind(peer.last_answer);
        if (kind == mine.last_kind) return;
        auto& answers = gauge_family("vramguard_peer_last_answer",
                                     "1 for the kind of the peer's last answer (busy, freed, ...)");
        if (mine.last_answer) answers.Remove(mine.last_answer);
        mine.last_answer = nullptr;
        if (!kind.empty()) {
            mine.last_answer = &answers.Add(detail::with_label(named, "answer", kind));
            mine.last_answer->Set(1);
        }
        mine.last_kind = kind;
    }

    ::prometheus::Family<::prometheus::Counter>& counter_family(const std::string& name,
                                                                const std::string& help) {
        return ::prometheus::BuildCounter().Name(name).Help(help).Register(registry_);
    }
    ::prometheus::Family<::prometheus::Gauge>& gauge_family(const std::string& name,
                                                            const std::string& help) {
        return ::prometheus::BuildGauge().Name(name).Help(help).Register(registry_);
    }
    // A series added by add_*(), which this exporter must feed only once.
    ::prometheus::Counter& counter(const std::string& name, const std::string& help,
                                   const ::prometheus::Labels& labels) {
        return claim(counter_family(name, help).Add(labels), name);
    }
    ::prometheus::Gauge& gauge(const std::string& name, const std::string& help,
                               const ::prometheus::Labels& labels) {
        return claim(gauge_family(name, help).Add(labels), name);
    }
    template <class Metric>
    Metric& claim(Metric& metric, const std::string& name) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!claimed_.insert(&metric).second)
            throw std::invalid_argument("vramguard::PrometheusExporter: " + name +
                                        " with these labels is fed already; give each guard or "
                                        "registry labels that tell it apart");
        return metric;
    }
    void add_update(std::function<void()> update) {
        std::lock_guard<std::mutex> lock(mutex_);
        updates_.push_back(std::move(update));
    }

    ::prometheus::Registry& registry_;
    std::mutex mutex_;
    std::set<const void*> claimed_;
    std::vector<std::function<void()>> updates_;
};

VRAMGUARD_END_NAMESPACE
