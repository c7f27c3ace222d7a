// SPDX-License-Identifier: MIT
// Two-stage pressure relief, as pure decisions: act above pressure_threshold of the device in use,
// at most once per rate-limit window (the driver reports freed memory late, and acting again on
// the same stale reading would unload model after model); unload idle models only while use stays
// above aggressive_threshold. ModelRegistry::relieve_pressure does what they say.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>

VRAMGUARD_BEGIN_NAMESPACE

// What one pressure-relief pass did.
struct PressureRelief {
    bool acted = false;         // usage was above pressure_threshold and the window was open
    bool rate_limited = false;  // usage was above it, but relief acted less than a window ago
    std::size_t unloaded = 0;   // idle models unloaded (only above aggressive_threshold)
    double usage_before = 0;
    double usage_after = 0;
};

namespace pressure {

enum class Action {
    none,          // usage at or under the threshold: nothing to relieve
    rate_limited,  // above it, but relief acted less than a window ago
    act,           // above it and the window is open: empty the cache, maybe unload
};

inline Action decide(double usage, double threshold, std::optional<TimePoint> last_acted,
                     TimePoint now, Duration rate_limit) noexcept {
    if (!(usage > threshold)) return Action::none;
    if (last_acted && now - *last_acted < rate_limit) return Action::rate_limited;
    return Action::act;
}

// Bytes in use above which idle models are still unloaded.
inline std::uint64_t unload_target(std::uint64_t total_bytes,
                                   double aggressive_threshold) noexcept {
    return policy::scale_bytes(total_bytes, aggressive_threshold);
}

}  // namespace pressure

VRAMGUARD_END_NAMESPACE
