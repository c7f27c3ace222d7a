// SPDX-License-Identifier: MIT
// Peer relief, the stage after local eviction: when a load still does not fit, ask the configured
// peers in order, each at most once per cooldown (two servers must not ping-pong each other's
// models), until their claims cover the shortfall; then the registry waits for the memory with the
// recovery rule (recovery.hpp) and admits once more. Decisions are pure functions (relief::);
// PeerRelief asks and remembers the answers for refusals and status(); a registry's relief stage
// (detail/registry_relief.hpp) orchestrates, and an external manager can use PeerRelief alone.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/detail/peer_call.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/model_slot.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

// One peer as status() saw it.
struct PeerStatus {
    std::string name;
    std::uint64_t asked = 0;           // times asked
    std::string last_answer;           // describe(reply), "" when never asked
    std::optional<double> asked_ago;   // seconds since last asked
    double cooldown_left_seconds = 0;  // until it may be asked again
};

namespace relief {

// Bytes the load lacks beyond what the registry reaches by itself (free, trusted, its idle models).
inline std::uint64_t shortfall(std::uint64_t needed, std::uint64_t reachable) noexcept {
    return needed > reachable ? needed - reachable : 0;
}

// Peers help only with memory: not with the cap, not with a load that can never fit.
inline bool worth_asking(bool never_fits, bool fits, bool at_cap) noexcept {
    return !never_fits && !fits && !at_cap;
}

inline bool cooling_down(std::optional<TimePoint> last_asked, TimePoint now,
                         Duration cooldown) noexcept {
    return last_asked && now - *last_asked < cooldown;
}

// A claim counts toward the shortfall (to stop asking) and the wait's expectation, nothing more.
inline std::uint64_t claimed(const PeerReply& reply) noexcept {
    return reply.answer == PeerAnswer::freed ? reply.claimed_bytes : 0;
}

inline bool covered(std::uint64_t claimed_so_far, std::uint64_t shortfall) noexcept {
    return claimed_so_far >= shortfall;
}

// A registry's answer to a peer, from its models' answers: unloaded when any went (bytes summed),
// else busy when any is loaded (idle seconds the longest, leases summed), else not loaded.
inline UnloadResult merge_unloads(const std::vector<UnloadResult>& results) {
    UnloadResult merged;
    bool any_unloaded = false, any_busy = false;
    for (const UnloadResult& r : results) any_unloaded = any_unloaded || r.unloaded();
    for (const UnloadResult& r : results) {
        if (any_unloaded && !r.unloaded()) continue;
        any_busy = any_busy || r.busy();
        merged.bytes = policy::saturating_add(merged.bytes, r.bytes);
        merged.idle_seconds = std::max(merged.idle_seconds, r.idle_seconds);
        merged.leases += r.leases;
        merged.loading = merged.loading || r.loading;
    }
    merged.outcome = any_unloaded ? UnloadOutcome::unloaded
                     : any_busy   ? UnloadOutcome::busy
                                  : UnloadOutcome::not_loaded;
    return merged;
}

// What a peer that is a registry (in-process, or a vramguard server's /request-unload) answers.
inline PeerReply reply_from(const UnloadResult& result) {
    switch (result.outcome) {
        case UnloadOutcome::unloaded: return PeerReply::freed(result.bytes);
        case UnloadOutcome::busy:
            if (result.loading) return PeerReply::busy(std::nullopt, "loading a model");
            return PeerReply::busy(
                result.idle_seconds > 0 || result.leases == 0
                    ? std::optional<double>(result.idle_seconds)
                    : std::nullopt,
                result.leases > 0 ? std::to_string(result.leases) + " leased" : std::string());
        case UnloadOutcome::not_loaded: return PeerReply::nothing();
    }
    return PeerReply::error("unknown unload outcome");
}

}  // namespace relief

// What one relief asked and heard.
struct ReliefOutcome {
    std::uint64_t claimed = 0;         // the claims added up (never trusted)
    std::size_t asked = 0;             // peers actually asked (not cooling down)
    std::vector<std::string> answers;  // "name answer", in order, cooling down ones too
};

// The configured peers, their cooldowns and their last answers: one relief round asks them in
// order until their claims cover a shortfall. A registry asks through it after local eviction; an
// external manager (examples/vram_manager) asks through it too, then waits with
// wait_for_freed_memory (recovery.hpp). Thread-safe. A call still running on its thread owns
// the peer (shared), so the peers may outlive this object; wait_for_calls() waits for them.
class PeerRelief {
   public:
    PeerRelief(const std::vector<std::shared_ptr<Peer>>& peers, Duration timeout, Duration cooldown)
        : timeout_(timeout), cooldown_(cooldown) {
        for (const auto& peer : peers) entries_.push_back({peer, peer->name(), {}, {}, 0});
    }

    bool empty() const noexcept { return entries_.empty(); }

    // Waits (real time, at most `timeout`) for the peer calls still running on their threads,
    // those abandoned at their deadline included; true when none runs any more.
    bool wait_for_calls(Duration timeout) { return calls_->wait_idle(timeout); }
    std::size_t calls_running() const { return calls_->running(); }

    // Asks the peers in order, skipping those cooling down, until the claims cover `shortfall`.
    // Each call runs on its own thread and is abandoned at its deadline (now + timeout on
    // `clock`), waited for in real-time slices of `slice` (the injected `sleep` when the clock
    // did not move meanwhile).
    ReliefOutcome ask(std::uint64_t shortfall, const std::string& requester, const ClockFn& clock,
                      const SleepFn& sleep, Duration slice) {
        ReliefOutcome outcome;
        for (Entry& entry : entries_) {
            if (relief::covered(outcome.claimed, shortfall)) break;
            const TimePoint now = clock();
            if (!claim_turn(entry, now, outcome)) continue;
            const ReliefRequest request{shortfall - outcome.claimed, timeout_,
                                        detail::deadline_after(now, timeout_), requester};
            const PeerReply reply = detail::call_with_deadline(
                entry.peer, request, clock, sleep, slice, detail::CallCount::Token(calls_));
            const std::string answer = describe(reply);
            {
                std::lock_guard<std::mutex> lock(mutex_);
                entry.last_answer = answer;
            }
            outcome.claimed = policy::saturating_add(outcome.claimed, relief::claimed(reply));
            outcome.answers.push_back(entry.name + " " + answer);
            ++outcome.asked;
        }
        return outcome;
    }

    std::vector<PeerStatus> status(TimePoint now) const {
        std::vector<PeerStatus> result;
        std::lock_guard<std::mutex> lock(mutex_);
        for (const Entry& entry : entries_) {
            PeerStatus s{entry.name, entry.asked, entry.last_answer, std::nullopt, 0};
            if (entry.last_asked) {
                s.asked_ago = to_seconds(now - *entry.last_asked);
                if (relief::cooling_down(entry.last_asked, now, cooldown_))
                    s.cooldown_left_seconds = to_seconds(cooldown_ - (now - *entry.last_asked));
            }
            result.push_back(std::move(s));
        }
        return result;
    }

   private:
    struct Entry {
        std::shared_ptr<Peer> peer;
        std::string name;
        std::optional<TimePoint> last_asked;
        std::string last_answer;
        std::uint64_t asked;
    };

    // Starts the peer's cooldown now, or says it is cooling down.
    bool claim_turn(Entry& entry, TimePoint now, ReliefOutcome& outcome) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (relief::cooling_down(entry.last_asked, now, cooldown_)) {
            char text[96];
            std::snprintf(text, sizeof text, " not asked (cooling down, asked %.0f s ago)",
                          to_seconds(now - *entry.last_asked));
            outcome.answers.push_back(entry.name + text);
            return false;
        }
        entry.last_asked = now;
        ++entry.asked;
        return true;
    }

    const Duration timeout_;
    const Duration cooldown_;
    const std::shared_ptr<detail::CallCount> calls_ = std::make_shared<detail::CallCount>();
    mutable std::mutex mutex_;  // the entries' state; never held while a peer is asked
    std::vector<Entry> entries_;
};

VRAMGUARD_END_NAMESPACE
