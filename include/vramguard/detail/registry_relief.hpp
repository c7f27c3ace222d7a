// SPDX-License-Identifier: MIT
// A registry's peer relief stage, after local eviction: asks the peers (PeerRelief, relief.hpp)
// for what the registry cannot reach by itself, then waits for the memory with the recovery rule
// (recovery.hpp). Claims are never trusted: the load looks at the probe again afterwards. One
// relief per device at a time; a second one does not wait for the first, it does without.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/detail/peer_call.hpp>
#include <vramguard/detail/registry_core.hpp>
#include <vramguard/eviction.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/registry_events.hpp>
#include <vramguard/relief.hpp>
#include <vramguard/version.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

template <class Probe>
class RegistryRelief {
   public:
    explicit RegistryRelief(RegistryCore<Probe>& core)
        : core_(core),
          peers_(core.options().peers, saturating_duration(core.options().peer_timeout),
                 saturating_duration(core.options().peer_cooldown)),
          relief_mutex_(device_relief_mutex(device_identity(core.probe()))) {}

    // For the load of `model`, which needs `needed` bytes free and reaches `reachable` by
    // itself (plan: what its look decided). Returns whether to look again; appends what the
    // peers were asked and answered to `heard`, for a refusal.
    bool relieve(const std::string& model, const eviction::Plan& plan, std::uint64_t needed,
                 std::uint64_t reachable, std::string& heard) {
        if (peers_.empty() || !relief::worth_asking(plan.never_fits, plan.fits, plan.at_cap))
            return false;
        const std::uint64_t shortfall = relief::shortfall(needed, reachable);
        if (shortfall == 0) return false;
        std::unique_lock<std::mutex> one_relief(*relief_mutex_, std::try_to_lock);
        if (!one_relief.owns_lock()) {
            heard = "none (another load on this device is asking them)";
            return false;
        }
        const std::uint64_t free_before = core_.probe().memory().free_bytes;
        const ReliefOutcome outcome = peers_.ask(shortfall, model, core_.clock(), core_.sleep(),
                                                 core_.guard().options().poll_interval);
        for (const std::string& answer : outcome.answers)
            heard += (heard.empty() ? "" : "; ") + answer;
        RegistryEvent asked(RegistryEventKind::peers_asked, model);
        asked.count = outcome.asked;
        asked.bytes = shortfall;
        asked.text = heard;
        core_.publish(asked);
        if (outcome.claimed == 0) return false;
        const TimePoint start = core_.now();
        const bool seen = core_.guard().wait_for_freed_memory(outcome.claimed, free_before, needed);
        heard +=
            (seen ? "; the memory showed after " : "; the claimed memory did not show within ") +
            ms_text(core_.now() - start);
        return true;
    }

    // Waits (real time, at most `timeout`) for the peer calls still running on their own
    // threads, those abandoned at their deadline too. True when none runs any more.
    bool wait_for_calls(Duration timeout) { return peers_.wait_for_calls(timeout); }
    std::size_t calls_running() const { return peers_.calls_running(); }
    std::vector<PeerStatus> status(TimePoint now) const { return peers_.status(now); }

   private:
    RegistryCore<Probe>& core_;
    PeerRelief peers_;
    const std::shared_ptr<std::mutex> relief_mutex_;  // one peer relief per device at a time
};

}  // namespace detail

VRAMGUARD_END_NAMESPACE
