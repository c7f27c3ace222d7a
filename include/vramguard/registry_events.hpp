// SPDX-License-Identifier: MIT
// What a ModelRegistry does, as typed events: each is counted (RegistryStats) and, only when its
// level reaches the guard's Options::log_level, formatted into one sentence for the log sink. The
// same mechanism as the guard's events (events.hpp): nothing is formatted that nobody reads.
#pragma once

#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

VRAMGUARD_BEGIN_NAMESPACE

// What a registry has done, as plain counters.
struct RegistryStats {
    std::uint64_t loads = 0;                    // models loaded
    std::uint64_t load_failures = 0;            // acquire() calls whose load threw (any error)
    std::uint64_t evictions = 0;                // idle models unloaded to make room for a load
    std::uint64_t recoveries_seen = 0;          // eviction waits that saw the freed memory reported
    std::uint64_t recoveries_trusted = 0;       // ... that timed out and trusted the estimate
    std::uint64_t idle_unloads = 0;             // models unloaded after idle_timeout
    std::uint64_t requested_unloads = 0;        // request_unload()/unload() that unloaded
    std::uint64_t pressure_cache_releases = 0;  // release_cached() calls by pressure relief
    std::uint64_t pressure_unloads = 0;         // idle models unloaded by pressure relief
    std::uint64_t rejections = 0;               // loads refused with InsufficientMemory here
    std::uint64_t waits = 0;                    // loads that waited (load_wait) for room
    std::uint64_t peer_requests = 0;            // peers asked to free memory
    std::uint64_t peer_reliefs = 0;             // loads admitted after peers freed memory
};

// Calls visit(name, help, value) once per counter, as for_each_counter(const Stats&) does.
template <class Visitor>
constexpr void for_each_counter(const RegistryStats& s, Visitor&& visit) {
    visit("loads", "models loaded", s.loads);
    visit("load_failures", "model loads that threw (any error)", s.load_failures);
    visit("evictions", "idle models unloaded to make room for a load", s.evictions);
    visit("recoveries_seen", "eviction waits that saw the freed memory reported",
          s.recoveries_seen);
    visit("recoveries_trusted", "eviction waits that timed out and trusted the estimate",
          s.recoveries_trusted);
    visit("idle_unloads", "models unloaded after idle_timeout", s.idle_unloads);
    visit("requested_unloads", "request_unload() or unload() calls that unloaded a model",
          s.requested_unloads);
    visit("pressure_cache_releases", "allocator cache releases by pressure relief",
          s.pressure_cache_releases);
    visit("pressure_unloads", "idle models unloaded by pressure relief", s.pressure_unloads);
    visit("rejections", "model loads refused with InsufficientMemory", s.rejections);
    visit("waits", "model loads that waited (load_wait) for room", s.waits);
    visit("peer_requests", "peers asked to free memory", s.peer_requests);
    visit("peer_reliefs", "model loads admitted after peers freed memory", s.peer_reliefs);
}
static_assert(sizeof(RegistryStats) ==
                  detail::counter_count<RegistryStats>() * sizeof(std::uint64_t),
              "for_each_counter(RegistryStats) must visit every field of RegistryStats");

enum class RegistryEventKind {
    loaded,                   // a model was loaded (bytes, took)
    load_failed,              // a load threw (counted only)
    load_waits,               // a load waits up to `limit` for a lease to end or memory to free
    rejected,                 // a load was refused: InsufficientMemory (its message says why)
    evicted,                  // an idle model was unloaded to make room for `for_model`
    recovery_seen,            // the memory an eviction freed was reported after `took`
    recovery_trusted,         // ... was not reported within `took`: the estimate is trusted
    idle_unloaded,            // unloaded after idle_timeout (`limit`)
    requested_unloaded,       // unloaded on request
    pressure_cache_released,  // pressure relief emptied the allocator cache
    pressure_unloaded,        // pressure relief unloaded an idle model
    peers_asked,              // `count` peers were asked to free `bytes` (`text`: their answers)
    peer_relief,              // a load was admitted after peers freed memory
    still_referenced,         // an unloaded model is still held elsewhere: its memory is not free
    housekeeping_failed,      // the reaper's tick threw (`text`)
    peer_calls_left,          // `count` peer calls still ran when the registry went
};

struct RegistryEvent {
    explicit RegistryEvent(RegistryEventKind kind_, std::string_view model_ = {}) noexcept
        : kind(kind_), model(model_) {}

    RegistryEventKind kind;
    std::string_view model;              // the model concerned
    std::string_view for_model;          // evicted: the model the room was made for
    std::uint64_t bytes = 0;             // the model's bytes, or what was short (peers_asked)
    double idle_seconds = 0;             // how long the model was idle
    std::chrono::milliseconds took{0};   // how long it took
    std::chrono::milliseconds limit{0};  // the option that bounded it (idle_timeout, load_wait)
    double usage = 0, usage_after = 0, threshold = 0;  // pressure relief: fractions of the device
    std::uint64_t total_bytes = 0;
    std::size_t count = 0;  // peers asked, peer calls left, max_loaded_models (at_cap)
    bool at_cap = false;    // max_loaded_models was reached
    std::string_view text;  // the peers' answers, an error
};

inline Level level_of(RegistryEventKind kind) noexcept {
    switch (kind) {
        case RegistryEventKind::load_failed:
        case RegistryEventKind::rejected:
        case RegistryEventKind::peer_relief: return Level::debug;
        case RegistryEventKind::recovery_trusted:
        case RegistryEventKind::pressure_unloaded:
        case RegistryEventKind::still_referenced:
        case RegistryEventKind::housekeeping_failed:
        case RegistryEventKind::peer_calls_left: return Level::warn;
        default: return Level::info;
    }
}

// The sentence for an event; empty for events that only count. Defined at the end, after the
// internals it uses.
inline std::string format_registry_event(const RegistryEvent& e);

VRAMGUARD_END_NAMESPACE

// Internals that need the types above: the counters, the sentences' parts, publishing.
#include <vramguard/detail/registry_event_log.hpp>

VRAMGUARD_BEGIN_NAMESPACE

inline std::string format_registry_event(const RegistryEvent& e) {
    switch (e.kind) {
        case RegistryEventKind::idle_unloaded:
        case RegistryEventKind::requested_unloaded:
        case RegistryEventKind::pressure_unloaded:
        case RegistryEventKind::evicted: return detail::format_unload(e);
        case RegistryEventKind::loaded:
        case RegistryEventKind::load_waits:
        case RegistryEventKind::recovery_seen:
        case RegistryEventKind::recovery_trusted:
        case RegistryEventKind::peers_asked: return detail::format_load(e);
        case RegistryEventKind::pressure_cache_released:
            return "memory pressure: " + detail::percent(e.usage) + " of " +
                   format_bytes(e.total_bytes) + " in use (pressure_threshold " +
                   detail::percent(e.threshold) + "); released the allocator cache, now " +
                   detail::percent(e.usage_after);
        case RegistryEventKind::still_referenced:
            return "model '" + std::string(e.model) +
                   "' was unloaded but something else still holds a copy of it, so its memory is "
                   "not free; the loader should hand over ownership";
        case RegistryEventKind::housekeeping_failed: return std::string(e.text);
        case RegistryEventKind::peer_calls_left:
            return "model registry: " + std::to_string(e.count) +
                   " peer call(s) still running after the registry waited " +
                   detail::ms_text(e.limit) +
                   " for them on destruction; a peer must not use the registry past that";
        default: return std::string();
    }
}

VRAMGUARD_END_NAMESPACE
