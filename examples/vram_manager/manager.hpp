// SPDX-License-Identifier: MIT
// The external VRAM manager: watches one device and the services on it (HTTP peers). Above 75 %
// in use it asks them for idle models and caches; above 85 %, for unloads; at most once per 30 s
// (freed memory shows late, and acting again on a stale reading would empty the device); it logs
// what it did and why. Built only from the library's pieces: a probe, the pressure rule
// (pressure::decide), the peers (peers_http.hpp) and the recovery rule (Guard's wait for freed
// memory). decide() is the whole policy, a pure function; Manager::step() only asks and acts.
#pragma once

#include <vramguard/peers_http.hpp>
#include <vramguard/vramguard.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace vram_manager {

using vramguard::Duration;
using vramguard::TimePoint;

struct Config {
    double relieve_threshold =
        0.75;  // above it: idle models and caches (Ollama's rule, pressure.hpp)
    double unload_threshold = 0.85;                   // above it: unloads
    Duration rate_limit = std::chrono::seconds(30);   // at most one round of asks per window
    Duration interval = std::chrono::seconds(5);      // between readings
    Duration peer_timeout = std::chrono::seconds(2);  // per peer asked

    void validate() const {
        auto fail = [](const char* field, const std::string& why) {
            throw std::invalid_argument(std::string("vram_manager::Config::") + field + " " + why);
        };
        if (!(relieve_threshold > 0 && relieve_threshold < 1))
            fail("relieve_threshold", "must be in (0, 1)");
        if (!(unload_threshold >= relieve_threshold && unload_threshold < 1))
            fail("unload_threshold", "must be in [relieve_threshold, 1)");
        if (rate_limit.count() < 0) fail("rate_limit", "must not be negative");
        if (interval.count() < 0) fail("interval", "must not be negative");
        if (peer_timeout.count() <= 0) fail("peer_timeout", "must be positive");
    }
};

enum class Stage {
    none,          // at or under the relieve threshold
    rate_limited,  // above it, but the manager acted less than rate_limit ago
    idle,          // above relieve_threshold: ask for idle models and caches
    unload,        // above unload_threshold: ask for unloads
};

inline const char* to_string(Stage stage) {
    switch (stage) {
        case Stage::none: return "none";
        case Stage::rate_limited: return "rate limited";
        case Stage::idle: return "idle";
        case Stage::unload: return "unload";
    }
    return "?";
}

struct Decision {
    Stage stage = Stage::none;
    double usage = 0;           // fraction of the device in use
    std::uint64_t to_free = 0;  // bytes that would bring use back to the stage's threshold
    std::string why;            // for the log
};

inline std::string percent(double fraction) {
    char text[32];
    std::snprintf(text, sizeof text, "%.1f %%", fraction * 100);
    return text;
}

// The policy: which stage, how much to free, and why. Pure.
inline Decision decide(const vramguard::MemoryInfo& memory, std::optional<TimePoint> last_acted,
                       TimePoint now, const Config& config) {
    Decision decision;
    decision.usage = memory.usage();
    const std::uint64_t used = memory.used_bytes();
    const auto relieve = vramguard::pressure::decide(decision.usage, config.relieve_threshold,
                                                     last_acted, now, config.rate_limit);
    if (relieve == vramguard::pressure::Action::none) {
        decision.why =
            percent(decision.usage) + " in use, at or under " + percent(config.relieve_threshold);
        return decision;
    }
    const bool unload = decision.usage > config.unload_threshold;
    const double threshold = unload ? config.unload_threshold : config.relieve_threshold;
    const std::uint64_t target = vramguard::pressure::unload_target(memory.total_bytes, threshold);
    decision.to_free = used > target ? used - target : 0;
    decision.why = percent(decision.usage) + " in use, above " +
                   (unload ? "the unload threshold " : "the relieve threshold ") +
                   percent(threshold);
    if (relieve == vramguard::pressure::Action::rate_limited) {
        decision.stage = Stage::rate_limited;
        decision.why +=
            "; acted " +
            std::to_string(static_cast<long long>(vramguard::to_seconds(now - *last_acted))) +
            " s ago, at most once per " +
            std::to_string(static_cast<long long>(vramguard::to_seconds(config.rate_limit))) + " s";
        return decision;
    }
    decision.stage = unload ? Stage::unload : Stage::idle;
    return decision;
}

// One watched device and its peers. Probe: memory() and release_cached(), as a Guard's.
template <class Probe>
class Manager {
   public:
    // `options` supplies the clock, sleep and log (and the recovery rule's poll and timeout).
    Manager(Probe& probe, std::vector<std::shared_ptr<vramguard::peers::HttpPeer>> peers,
            Config config, vramguard::Options options)
        : config_((config.validate(), config)),
          peers_(std::move(peers)),
          guard_(probe, with_memory_only(std::move(options))) {}

    // One reading, one decision, at most one round of asks (in the peers' order, until their
    // claims cover what is to free), then the recovery wait for what they claimed.
    Decision step() {
        const TimePoint now = guard_.options().clock();
        const vramguard::MemoryInfo memory = guard_.probe().memory();
        Decision decision = decide(memory, last_acted_, now, config_);
        if (decision.stage == Stage::none) {
            log(vramguard::Level::debug, decision.why);
            return decision;
        }
        if (decision.stage == Stage::rate_limited) {
            log(vramguard::Level::info, decision.why + ": not asking");
            return decision;
        }
        last_acted_ = now;
        const vramguard::peers::Ask ask = decision.stage == Stage::unload
                                              ? vramguard::peers::Ask::unload
                                              : vramguard::peers::Ask::idle;
        log(vramguard::Level::info, decision.why + ": asking peers for " +
                                        vramguard::peers::to_string(ask) + " (" +
                                        vramguard::format_bytes(decision.to_free) + " to free)");
        std::uint64_t claimed = 0;
        for (const auto& peer : peers_) {
            if (vramguard::relief::covered(claimed, decision.to_free)) break;
            const TimePoint asked_at = guard_.options().clock();
            const vramguard::ReliefRequest request{decision.to_free - claimed, config_.peer_timeout,
                                                   asked_at + config_.peer_timeout, "vram_manager"};
            const vramguard::PeerReply reply = peer->ask(request, ask);
            claimed = vramguard::policy::saturating_add(claimed, vramguard::relief::claimed(reply));
            log(vramguard::Level::info, "  " + peer->name() + ": " + vramguard::describe(reply));
        }
        if (claimed == 0) {
            log(vramguard::Level::info, "nothing freed; next round in " +
                                            std::to_string(static_cast<long long>(
                                                vramguard::to_seconds(config_.rate_limit))) +
                                            " s at the earliest");
            return decision;
        }
        const TimePoint wait_start = guard_.options().clock();
        const bool seen = guard_.wait_for_freed_memory(claimed, memory.free_bytes);
        const vramguard::MemoryInfo after = guard_.probe().memory();
        log(vramguard::Level::info,
            std::string(seen ? "the freed memory showed" : "the claimed memory did not show") +
                " after " +
                std::to_string(
                    static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                               guard_.options().clock() - wait_start)
                                               .count())) +
                " ms: " + percent(after.usage()) + " in use now");
        return decision;
    }

    // Steps every interval, `steps` times (0: until stop()).
    void run(std::size_t steps = 0) {
        for (std::size_t done = 0; !stopped_ && (steps == 0 || done < steps); ++done) {
            if (done > 0) guard_.options().sleep(config_.interval);
            step();
        }
    }
    void stop() noexcept { stopped_ = true; }

    const Config& config() const noexcept { return config_; }

   private:
    static vramguard::Options with_memory_only(vramguard::Options options) {
        options.persist = false;  // the manager learns nothing; it only reads and waits
        return options;
    }
    void log(vramguard::Level level, const std::string& message) const {
        const vramguard::LogSink& sink = guard_.options().log;
        if (sink) sink(level, "vram_manager: " + message);
    }

    const Config config_;
    const std::vector<std::shared_ptr<vramguard::peers::HttpPeer>> peers_;
    vramguard::Guard<Probe> guard_;
    std::optional<TimePoint> last_acted_;
    std::atomic<bool> stopped_{false};
};

}  // namespace vram_manager
