// SPDX-License-Identifier: MIT
// A registry's events (registry_events.hpp) counted, worded and published: counted always,
// formatted and logged only past the sink's level.
#pragma once

#include <vramguard/detail/emit.hpp>
#include <vramguard/detail/numbers.hpp>
#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/registry_events.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <cstdint>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// Relaxed atomics: counters are for reading, not for synchronising.
struct AtomicRegistryStats {
    std::atomic<std::uint64_t> loads{0}, load_failures{0}, evictions{0}, recoveries_seen{0},
        recoveries_trusted{0}, idle_unloads{0}, requested_unloads{0}, pressure_cache_releases{0},
        pressure_unloads{0}, rejections{0}, waits{0}, peer_requests{0}, peer_reliefs{0};

    RegistryStats snapshot() const noexcept {
        const auto r = std::memory_order_relaxed;
        RegistryStats s;
        s.loads = loads.load(r);
        s.load_failures = load_failures.load(r);
        s.evictions = evictions.load(r);
        s.recoveries_seen = recoveries_seen.load(r);
        s.recoveries_trusted = recoveries_trusted.load(r);
        s.idle_unloads = idle_unloads.load(r);
        s.requested_unloads = requested_unloads.load(r);
        s.pressure_cache_releases = pressure_cache_releases.load(r);
        s.pressure_unloads = pressure_unloads.load(r);
        s.rejections = rejections.load(r);
        s.waits = waits.load(r);
        s.peer_requests = peer_requests.load(r);
        s.peer_reliefs = peer_reliefs.load(r);
        return s;
    }
};

// The counter an event bumps, and by how much (peers_asked counts every peer asked).
inline void count(AtomicRegistryStats& stats, const RegistryEvent& event) noexcept {
    std::atomic<std::uint64_t>* counter = nullptr;
    switch (event.kind) {
        case RegistryEventKind::loaded: counter = &stats.loads; break;
        case RegistryEventKind::load_failed: counter = &stats.load_failures; break;
        case RegistryEventKind::load_waits: counter = &stats.waits; break;
        case RegistryEventKind::rejected: counter = &stats.rejections; break;
        case RegistryEventKind::evicted: counter = &stats.evictions; break;
        case RegistryEventKind::recovery_seen: counter = &stats.recoveries_seen; break;
        case RegistryEventKind::recovery_trusted: counter = &stats.recoveries_trusted; break;
        case RegistryEventKind::idle_unloaded: counter = &stats.idle_unloads; break;
        case RegistryEventKind::requested_unloaded: counter = &stats.requested_unloads; break;
        case RegistryEventKind::pressure_cache_released:
            counter = &stats.pressure_cache_releases;
            break;
        case RegistryEventKind::pressure_unloaded: counter = &stats.pressure_unloads; break;
        case RegistryEventKind::peers_asked:
            stats.peer_requests.fetch_add(event.count, std::memory_order_relaxed);
            return;
        case RegistryEventKind::peer_relief: counter = &stats.peer_reliefs; break;
        default: return;
    }
    counter->fetch_add(1, std::memory_order_relaxed);
}

inline std::string format_unload(const RegistryEvent& e) {
    const std::string model = "model '" + std::string(e.model) + "' (" + format_bytes(e.bytes);
    switch (e.kind) {
        case RegistryEventKind::idle_unloaded:
            return "unloaded " + model + ") after " + seconds_text(e.idle_seconds) +
                   " idle (idle_timeout " + ms_text(e.limit) + ")";
        case RegistryEventKind::requested_unloaded:
            return "unloaded " + model + ") on request, idle " + seconds_text(e.idle_seconds);
        case RegistryEventKind::pressure_unloaded:
            return "memory pressure: still " + percent(e.usage) + " in use (aggressive_threshold " +
                   percent(e.threshold) + "); unloaded idle " + model + ", idle " +
                   seconds_text(e.idle_seconds) + ")";
        default:  // evicted
            return "evicted idle " + model + ", idle " + seconds_text(e.idle_seconds) +
                   ", least recently used) to make room for '" + std::string(e.for_model) + "'" +
                   (e.at_cap ? " (max_loaded_models " + std::to_string(e.count) + " reached)" : "");
    }
}

inline std::string format_load(const RegistryEvent& e) {
    const std::string model = "'" + std::string(e.model) + "'";
    switch (e.kind) {
        case RegistryEventKind::loaded:
            return "loaded model " + model + " (" + format_bytes(e.bytes) + ") in " +
                   ms_text(e.took);
        case RegistryEventKind::load_waits:
            return "load of model " + model + " waits up to " + ms_text(e.limit) +
                   " for a lease to end or memory to free (" +
                   (e.at_cap ? "max_loaded_models reached" : "not enough free memory") +
                   ", no idle model to evict)";
        case RegistryEventKind::recovery_seen:
            return "memory freed by unloading " + model + " reported after " + ms_text(e.took);
        case RegistryEventKind::recovery_trusted:
            return "the device did not report " + percent(e.threshold) + " of the " +
                   format_bytes(e.bytes) + " freed by unloading " + model + " within " +
                   ms_text(e.took) + "; trusting the estimate";
        default:  // peers_asked
            return "load of model " + model + " is " + format_bytes(e.bytes) +
                   " short after local eviction; peers: " + std::string(e.text);
    }
}

}  // namespace detail

namespace detail {

// Counts the event and, when the sink wants its level, formats and sends it.
inline void publish(AtomicRegistryStats& stats, const LogSink& sink, Level least,
                    const RegistryEvent& event) {
    count(stats, event);
    const Level level = level_of(event.kind);
    if (!sink || level < least) return;
    const std::string message = format_registry_event(event);
    if (!message.empty()) emit(sink, level, message);
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
