// SPDX-License-Identifier: MIT
// How a relief round calls one peer: on a thread of its own, abandoned at its deadline, and one
// relief at a time per device, process-wide.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/detail/detached_call.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// One relief at a time per device, process-wide (two registries on one device share it).
inline std::shared_ptr<std::mutex> device_relief_mutex(const std::string& device) {
    static std::mutex mutex;
    static std::map<std::string, std::weak_ptr<std::mutex>> locks;
    std::lock_guard<std::mutex> lock(mutex);
    std::shared_ptr<std::mutex> existing = locks[device].lock();
    if (!existing) locks[device] = existing = std::make_shared<std::mutex>();
    return existing;
}

inline PeerReply call_peer(Peer& peer, const ReliefRequest& request) noexcept {
    try {
        return peer.relieve(request);
    } catch (...) {
        return PeerReply::error("threw: " + describe(std::current_exception()));
    }
}

// Runs the call on its own thread and waits for it until request.deadline on the injected clock
// (real-time waits of `slice` on a condition variable; the injected sleep when the clock did not
// move meanwhile, as a ManualClock does not): a peer that ignores its deadline costs the load no
// more than it. Such a call is left to finish on its own; it owns what it uses, and `running`
// (moved into it) counts it until it has returned and let go of the peer.
inline PeerReply call_with_deadline(std::shared_ptr<Peer> peer, const ReliefRequest& request,
                                    const ClockFn& clock, const SleepFn& sleep, Duration slice,
                                    CallCount::Token running) {
    std::optional<DetachedCall<PeerReply>> call;
    try {
        call.emplace([peer, request, running = std::move(running)]() mutable {
            PeerReply reply = call_peer(*peer, request);
            peer.reset();  // before `running` ends: the peer's destructor is the peer's code too
            return reply;
        });
    } catch (...) {
        return PeerReply::error("could not start the call: " + describe(std::current_exception()));
    }
    for (;;) {
        const TimePoint before = clock();
        if (std::optional<PeerReply> reply = call->wait_for(slice)) return std::move(*reply);
        const TimePoint now = clock();
        if (now >= request.deadline)
            return PeerReply::error(
                "no answer within " +
                std::to_string(
                    std::chrono::duration_cast<std::chrono::milliseconds>(request.timeout)
                        .count()) +
                " ms");
        if (now == before) sleep(std::min<Duration>(slice, request.deadline - now));
    }
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
