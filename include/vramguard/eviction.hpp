// SPDX-License-Identifier: MIT
// Making room for a load, as pure decisions over snapshots of a registry's slots: which models may
// go and in which order (idle ones, least recently used first), whether the load fits now, whether
// evicting every idle model could make it fit at all, and so the next step. ModelRegistry's
// load (detail/registry_load.hpp, make_room) reads the device, asks plan() and does what it says.
#pragma once

#include <vramguard/memory.hpp>
#include <vramguard/model_slot.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace eviction {

inline constexpr std::size_t no_slot = std::numeric_limits<std::size_t>::max();

// Indexes of the loaded, unleased slots other than `except`, least recently used first (ties keep
// the registry's order).
inline std::vector<std::size_t> idle_lru(const std::vector<detail::SlotSnapshot>& slots,
                                         std::size_t except = no_slot) {
    std::vector<std::size_t> idle;
    for (std::size_t i = 0; i < slots.size(); ++i)
        if (i != except && slots[i].state == ModelState::loaded && slots[i].leases == 0)
            idle.push_back(i);
    std::stable_sort(idle.begin(), idle.end(), [&](std::size_t a, std::size_t b) {
        return slots[a].last_used < slots[b].last_used;
    });
    return idle;
}

// Slots other than `except` whose model is loaded. A load publishes its model before the
// registry's turn ends, so a slot still `loading` has not taken its memory yet.
inline std::size_t loaded_count(const std::vector<detail::SlotSnapshot>& slots,
                                std::size_t except = no_slot) {
    std::size_t count = 0;
    for (std::size_t i = 0; i < slots.size(); ++i)
        if (i != except && slots[i].state == ModelState::loaded) ++count;
    return count;
}

// Free memory once every model in `idle_bytes` went, plus bytes already freed and trusted. A model
// whose size is unknown (0) might free anything.
inline std::uint64_t reachable(std::uint64_t free_bytes, std::uint64_t trusted,
                               const std::vector<std::uint64_t>& idle_bytes) noexcept {
    std::uint64_t total = policy::saturating_add(free_bytes, trusted);
    for (const std::uint64_t bytes : idle_bytes)
        total = bytes == 0 ? std::numeric_limits<std::uint64_t>::max()
                           : policy::saturating_add(total, bytes);
    return total;
}

// What one look at the device and the slots shows, for one load.
struct Situation {
    std::uint64_t required = 0;  // the load's requirement
    MemoryInfo memory;           // the probe's reading
    double safety_margin = 0;
    std::uint64_t trusted = 0;  // freed by this load's evictions, not reported yet: trusted
    std::size_t loaded = 0;     // other models loaded
    std::size_t max_loaded = 0;
    std::vector<std::uint64_t> idle_bytes;  // idle models, least recently used first
};

enum class Step {
    load,   // go: Guard::load admits it (or refuses a load that could never fit with its numbers)
    evict,  // unload the first idle model, then look again
    stuck,  // nothing here helps: wait for a lease to end, ask peers, or refuse
};

struct Plan {
    Step step = Step::stuck;
    bool never_fits = false;  // not even on the empty device: nothing is evicted for nothing
    bool fits = false;        // the memory admits it (counting trusted bytes)
    bool at_cap = false;      // max_loaded models are loaded besides it
    bool evicting_cannot_help = false;  // short of memory even if every idle model went
};

inline Plan plan(const Situation& s) {
    Plan p;
    const std::uint64_t total = s.memory.total_bytes;
    if (!policy::can_ever_fit(s.required, total, s.safety_margin)) {
        p.never_fits = true;
        p.step = Step::load;
        return p;
    }
    p.fits =
        policy::admits(s.required, s.memory, s.safety_margin) ||
        (s.trusted > 0 &&
         policy::admits(s.required, {policy::saturating_add(s.memory.free_bytes, s.trusted), total},
                        s.safety_margin));
    p.at_cap = s.loaded >= s.max_loaded;
    if (p.fits && !p.at_cap) {
        p.step = Step::load;
        return p;
    }
    if (s.idle_bytes.empty()) return p;
    // Short of memory only: keep the idle models when all of them would not do.
    if (!p.at_cap &&
        !policy::admits(s.required,
                        {reachable(s.memory.free_bytes, s.trusted, s.idle_bytes), total},
                        s.safety_margin)) {
        p.evicting_cannot_help = true;
        return p;
    }
    p.step = Step::evict;
    return p;
}

}  // namespace eviction

VRAMGUARD_END_NAMESPACE
