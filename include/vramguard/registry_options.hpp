// SPDX-License-Identifier: MIT
// RegistryOptions: how a ModelRegistry (models.hpp) caps, unloads, relieves pressure and asks its
// peers. A plain struct: each field states its default (a named constant in defaults::) and
// validate() rejects nonsense with a message naming the field.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/version.hpp>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace defaults {
// Ollama's OLLAMA_MAX_LOADED_MODELS default (per GPU): enough for an embedder, a reranker and a
// generator side by side; more mostly means more reload churn when memory runs short.
inline constexpr std::size_t max_loaded_models = 3;
// Ollama's keep_alive default: long enough to serve a conversation, short enough that a model
// nobody uses gives its memory back within minutes.
inline constexpr std::chrono::milliseconds idle_timeout{std::chrono::minutes(5)};
// Above this fraction of the device in use, the allocator cache is emptied first: that costs only
// some re-allocation later.
inline constexpr double pressure_threshold = 0.75;
// Above this even after emptying the cache, idle models are unloaded: reloading one costs seconds.
inline constexpr double aggressive_threshold = 0.85;
// Relief acts at most once per window: the driver reports freed memory late, and acting again on
// the same stale reading would unload model after model.
inline constexpr std::chrono::milliseconds pressure_rate_limit{30000};
// 0: a load that cannot be made room for fails at once with InsufficientMemory (a server answers
// 503 with retry_after) instead of holding the request.
inline constexpr std::chrono::milliseconds load_wait{0};
inline constexpr std::chrono::milliseconds reaper_interval{1000};
// A peer that has not answered in 2 s is down or stuck: an unload it agrees to answers at once.
inline constexpr std::chrono::milliseconds peer_timeout{2000};
// The seeds' /request-unload rate limit: a peer is asked at most once per window, so two servers
// that need memory in turn cannot ping-pong each other's models.
inline constexpr std::chrono::milliseconds peer_cooldown{30000};
}  // namespace defaults

struct RegistryOptions {
    std::size_t max_loaded_models = defaults::max_loaded_models;      // models loaded at once, >= 1
    std::chrono::milliseconds idle_timeout = defaults::idle_timeout;  // unload after; 0 = never
    // Fractions of the device in use (the probe's reading): above the first the cache is
    // emptied, (0, 1]; above the second idle models are unloaded, [pressure_threshold, 1].
    double pressure_threshold = defaults::pressure_threshold;
    double aggressive_threshold = defaults::aggressive_threshold;
    std::chrono::milliseconds pressure_rate_limit = defaults::pressure_rate_limit;  // >= 0
    std::chrono::milliseconds load_wait = defaults::load_wait;  // max wait for room to load, >= 0
    // true: a library-owned thread calls tick() every reaper_interval; it stops (at once) when the
    // registry is destroyed. false: the host calls tick() from its own loop.
    bool reaper = false;
    std::chrono::milliseconds reaper_interval = defaults::reaper_interval;  // > 0, real time
    // Other services on the device, asked in this order to free memory when a load still does not
    // fit after the registry's own idle models went (peer.hpp). Empty: no peer relief.
    std::vector<std::shared_ptr<Peer>> peers;
    std::chrono::milliseconds peer_timeout = defaults::peer_timeout;    // per ask, > 0
    std::chrono::milliseconds peer_cooldown = defaults::peer_cooldown;  // per peer, >= 0
    ClockFn clock;  // empty = the guard's Options::clock
    SleepFn sleep;  // empty = the guard's Options::sleep

    // Throws std::invalid_argument naming the first field that makes no sense.
    void validate() const {
        auto fail = [](const char* field, const std::string& why) {
            throw std::invalid_argument(std::string("vramguard::RegistryOptions::") + field + " " +
                                        why);
        };
        if (max_loaded_models < 1) fail("max_loaded_models", "must be at least 1");
        if (idle_timeout.count() < 0) fail("idle_timeout", "must not be negative (0 = never)");
        if (!std::isfinite(pressure_threshold) || pressure_threshold <= 0 || pressure_threshold > 1)
            fail("pressure_threshold",
                 "must be in (0, 1], got " + std::to_string(pressure_threshold));
        if (!std::isfinite(aggressive_threshold) || aggressive_threshold < pressure_threshold ||
            aggressive_threshold > 1)
            fail("aggressive_threshold",
                 "must be in [pressure_threshold, 1], got " + std::to_string(aggressive_threshold));
        if (pressure_rate_limit.count() < 0) fail("pressure_rate_limit", "must not be negative");
        if (load_wait.count() < 0) fail("load_wait", "must not be negative");
        if (reaper_interval.count() <= 0) fail("reaper_interval", "must be positive");
        for (const auto& peer : peers)
            if (!peer) fail("peers", "must not hold a null peer");
        if (peer_timeout.count() <= 0) fail("peer_timeout", "must be positive");
        if (peer_cooldown.count() < 0) fail("peer_cooldown", "must not be negative");
    }
};

VRAMGUARD_END_NAMESPACE
