// SPDX-License-Identifier: MIT
// The external VRAM manager: watches one device and the services on it (HTTP peers). Above 75 %
// in use it asks them for idle models and caches; above 85 %, for unloads; at most once per 30 s
// (freed memory shows late, and acting again on a stale reading would empty the device); it logs
// what it did and why. Built only from the library's pieces: a probe, the pressure rule
// (pressure::decide), the peers (peers_http.hpp) asked through PeerRelief (relief.hpp) and the
// recovery wait (recovery.hpp). decide() is the whole policy, a pure function; Manager::step()
// only asks and acts.
#pragma once

#include <vramguard/peers_http.hpp>
#include <vramguard/vramguard.hpp>

#include <atomic>
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

// One watched device and its peers. Probe: memory(), as a Guard's.
template <class Probe>
class Manager {
   public:
    // `options` supplies the clock, sleep and log, and the recovery wait's poll interval,
    // fraction and timeout.
    Manager(Probe& probe, const std::vector<std::shared_ptr<vramguard::peers::HttpPeer>>& peers,
            Config config, vramguard::Options options)
        : probe_(probe),
          config_((config.validate(), config)),
          options_((options.validate(), std::move(options))),
          idle_(asking(peers, vramguard::peers::Ask::idle), config_.peer_timeout, Duration::zero()),
          unload_(asking(peers, vramguard::peers::Ask::unload), config_.peer_timeout,
                  Duration::zero()) {}

    // One reading, one decision, at most one round of asks (in the peers' order, until their
    // claims cover what is to free), then the recovery wait for what they claimed.
    Decision step() {
        const TimePoint now = options_.clock();
        const vramguard::MemoryInfo memory = probe_.memory();
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
        const bool unload = decision.stage == Stage::unload;
        log(vramguard::Level::info,
            decision.why + ": asking peers for " +
                vramguard::peers::to_string(unload ? vramguard::peers::Ask::unload
                                                   : vramguard::peers::Ask::idle) +
                " (" + vramguard::format_bytes(decision.to_free) + " to free)");
        // The manager rate-limits whole rounds (config_.rate_limit), so no peer has a cooldown.
        const vramguard::ReliefOutcome asked =
            (unload ? unload_ : idle_)
                .ask(decision.to_free, "vram_manager", options_.clock, options_.sleep,
                     options_.poll_interval);
        for (const std::string& answer : asked.answers) log(vramguard::Level::info, "  " + answer);
        if (asked.claimed == 0) {
            log(vramguard::Level::info,
                "nothing freed; next round in " + seconds(config_.rate_limit) + " at the earliest");
            return decision;
        }
        const TimePoint wait_start = options_.clock();
        const bool seen =
            vramguard::wait_for_freed_memory(probe_, options_, asked.claimed, memory.free_bytes);
        log(vramguard::Level::info,
            std::string(seen ? "the freed memory showed" : "the claimed memory did not show") +
                " after " + milliseconds(options_.clock() - wait_start) + ": " +
                percent(probe_.memory().usage()) + " in use now");
        return decision;
    }

    // Steps every interval, `steps` times (0: until stop()).
    void run(std::size_t steps = 0) {
        for (std::size_t done = 0; !stopped_ && (steps == 0 || done < steps); ++done) {
            if (done > 0) options_.sleep(config_.interval);
            step();
        }
    }
    void stop() noexcept { stopped_ = true; }

    const Config& config() const noexcept { return config_; }

    // Waits (real time, at most `timeout`) for peer calls abandoned at their deadline.
    bool wait_for_peer_calls(Duration timeout) {
        return idle_.wait_for_calls(timeout) && unload_.wait_for_calls(timeout);
    }

   private:
    static std::vector<std::shared_ptr<vramguard::Peer>> asking(
        const std::vector<std::shared_ptr<vramguard::peers::HttpPeer>>& peers,
        vramguard::peers::Ask how) {
        std::vector<std::shared_ptr<vramguard::Peer>> result;
        for (const auto& peer : peers) result.push_back(vramguard::peers::asking(peer, how));
        return result;
    }
    static std::string seconds(Duration d) {
        return std::to_string(static_cast<long long>(vramguard::to_seconds(d))) + " s";
    }
    static std::string milliseconds(Duration d) {
        return std::to_string(static_cast<long long>(
                   std::chrono::duration_cast<std::chrono::milliseconds>(d).count())) +
               " ms";
    }
    void log(vramguard::Level level, const std::string& message) const {
        if (options_.log) options_.log(level, "vram_manager: " + message);
    }

    Probe& probe_;
    const Config config_;
    const vramguard::Options options_;
    vramguard::PeerRelief idle_;    // asks for idle models and caches
    vramguard::PeerRelief unload_;  // asks for unloads
    std::optional<TimePoint> last_acted_;
    std::atomic<bool> stopped_{false};
};

}  // namespace vram_manager
