// SPDX-License-Identifier: MIT
// One load through a ModelRegistry, in the registry's turn: make room (evict idle models, least
// recently used first, as eviction::plan says; wait for their memory with the recovery rule), ask
// the peers when that is not enough (detail/registry_relief.hpp), then load once admitted, or wait
// up to load_wait and refuse with InsufficientMemory naming who holds the memory.
#pragma once

#include <vramguard/admission.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/detail/registry_core.hpp>
#include <vramguard/detail/registry_relief.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/eviction.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/model_slot.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/registry_events.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

template <class Probe>
class RegistryLoad {
   public:
    RegistryLoad(RegistryCore<Probe>& core, RegistryRelief<Probe>& relief)
        : core_(core), relief_(relief) {}

    // Loads the model of `slot` and publishes it in the slot before the turn ends. Returns the
    // model, leased. A failure is counted and propagates.
    void* run(SlotBase& slot) {
        try {
            return load_with_room(slot);
        } catch (...) {
            core_.publish(RegistryEvent(RegistryEventKind::load_failed, slot.name()));
            throw;
        }
    }

   private:
    using Look = typename RegistryCore<Probe>::Look;

    // What one look at the device decided.
    struct Room {
        bool ready = false;
        std::uint64_t trusted_bytes = 0;  // freed by evictions, not yet reported: trusted
        Admission admission;
        std::size_t loaded = 0;
        eviction::Plan plan;
        std::uint64_t reachable = 0;  // free once every idle model went (with trusted bytes)
        std::string peers;            // what the peers were asked and answered, for the refusal
    };

    // Free bytes the load needs: its requirement plus the safety margin.
    static std::uint64_t needed(const Admission& admission) noexcept {
        return policy::saturating_add(admission.requirement.bytes, admission.margin_bytes);
    }

    void* load_with_room(SlotBase& slot) {
        const TimePoint start = core_.now();
        const TimePoint deadline = deadline_after(start, core_.options().load_wait);
        bool waited = false;
        for (;;) {
            Room room;
            if (void* model = load_in_turn(slot, room)) return model;
            const TimePoint now = core_.now();
            if (now >= deadline) {
                core_.publish(RegistryEvent(RegistryEventKind::rejected, slot.name()));
                throw_insufficient(slot, room, now - start);
            }
            if (!waited) {
                waited = true;
                RegistryEvent event(RegistryEventKind::load_waits, slot.name());
                event.limit = core_.options().load_wait;
                event.at_cap = room.plan.at_cap;
                core_.publish(event);
            }
            core_.sleep()(
                std::min<Duration>(core_.guard().options().poll_interval, deadline - now));
        }
    }

    // One turn: make room, ask peers when that is not enough, then load once admitted. Returns the
    // model (published, leased), or nullptr when there is no room (`room` says why).
    void* load_in_turn(SlotBase& slot, Room& room) {
        const typename RegistryCore<Probe>::Turn turn(core_);
        room = make_room(slot);
        if (!room.ready && relief_.relieve(slot.name(), room.plan, needed(room.admission),
                                           room.reachable, room.peers)) {
            std::string asked = std::move(room.peers);
            room = make_room(slot);  // admit once more: only the probe's reading counts
            room.peers = std::move(asked);
            if (room.ready)
                core_.publish(RegistryEvent(RegistryEventKind::peer_relief, slot.name()));
        }
        if (!room.ready) return nullptr;
        LoadedModel loaded = run_loader(slot, room.trusted_bytes);
        // Published before the turn ends: the next load counts it against the cap.
        return SlotAccess::commit_load(slot, std::move(loaded), core_.now());
    }

    // Evicts idle models, least recently used first, until the load is admitted and under the cap
    // (eviction::plan decides). Ready also when the model could never fit: then Guard::load says so
    // with its own numbers, and nothing was evicted for nothing.
    Room make_room(SlotBase& slot) {
        Room room;
        for (;;) {
            room.admission = core_.guard().admission(slot.key(), slot.declared_bytes());
            if (room.admission.admitted) room.trusted_bytes = 0;
            const Look seen = core_.look();
            const std::size_t self = seen.index_of(&slot);
            const std::vector<std::size_t> idle = eviction::idle_lru(seen.seen, self);
            eviction::Situation situation;
            situation.required = room.admission.requirement.bytes;
            situation.memory = room.admission.memory;
            situation.safety_margin = core_.guard().options().safety_margin;
            situation.trusted = room.trusted_bytes;
            situation.loaded = room.loaded = eviction::loaded_count(seen.seen, self);
            situation.max_loaded = core_.options().max_loaded_models;
            for (const std::size_t i : idle) situation.idle_bytes.push_back(seen.seen[i].bytes);
            room.plan = eviction::plan(situation);
            room.reachable = eviction::reachable(situation.memory.free_bytes, situation.trusted,
                                                 situation.idle_bytes);
            if (room.plan.never_fits) room.trusted_bytes = 0;
            if (room.plan.step != eviction::Step::evict) {
                room.ready = room.plan.step == eviction::Step::load;
                return room;
            }
            evict(slot, *seen.slots[idle.front()], seen.seen[idle.front()].uses, room);
        }
    }

    void evict(SlotBase& for_slot, SlotBase& victim, std::uint64_t seen_uses, Room& room) {
        const std::uint64_t free_before = core_.probe().memory().free_bytes;
        bool still_referenced = false;
        const UnloadResult result = SlotAccess::try_unload(victim, core_.now(), Duration::zero(),
                                                           seen_uses, &still_referenced);
        if (!result.unloaded()) return;  // a lease came first: decide again
        core_.probe().release_cached();
        RegistryEvent event = core_.unload_event(RegistryEventKind::evicted, victim, result);
        event.for_model = for_slot.name();
        event.at_cap = room.plan.at_cap;
        event.count = core_.options().max_loaded_models;
        core_.publish(event);
        core_.warn_if_referenced(victim, still_referenced);
        if (room.plan.fits || result.bytes == 0)
            return;  // only the cap was in the way: nothing to wait for
        wait_for_eviction(victim, result.bytes, free_before, room);
    }

    // The driver reports freed memory late: wait until it shows (or enough is free), else trust
    // the estimate, as Ollama does.
    void wait_for_eviction(const SlotBase& victim, std::uint64_t freed, std::uint64_t free_before,
                           Room& room) {
        const TimePoint start = core_.now();
        if (core_.guard().wait_for_freed_memory(freed, free_before, needed(room.admission))) {
            RegistryEvent event(RegistryEventKind::recovery_seen, victim.name());
            event.took = std::chrono::duration_cast<std::chrono::milliseconds>(core_.now() - start);
            core_.publish(event);
        } else {
            room.trusted_bytes = policy::saturating_add(room.trusted_bytes, freed);
            RegistryEvent event(RegistryEventKind::recovery_trusted, victim.name());
            event.took = std::chrono::duration_cast<std::chrono::milliseconds>(core_.now() - start);
            event.bytes = freed;
            event.threshold = core_.guard().options().recovery_fraction;
            core_.publish(event);
        }
    }

    LoadedModel run_loader(SlotBase& slot, std::uint64_t trusted_bytes) {
        const auto& loader = SlotAccess::loader(slot);
        const std::optional<std::uint64_t>& declared = slot.declared_bytes();
        const std::uint64_t free_before = core_.probe().memory().free_bytes;
        const TimePoint start = core_.now();
        LoadedModel loaded;
        if (trusted_bytes > 0) {
            // Memory an eviction freed but the driver does not report yet: the guard's admission
            // only sees the report, so the requirement it checks is lowered by what is trusted.
            const std::uint64_t required =
                core_.guard().admission(slot.key(), declared).requirement.bytes;
            loaded.model = core_.guard().load(
                slot.key(), required > trusted_bytes ? required - trusted_bytes : 1, loader);
        } else if (declared) {
            loaded.model = core_.guard().load(slot.key(), *declared, loader);
        } else {
            loaded.model = core_.guard().load(slot.key(), loader);
        }
        if (!loaded.model)
            throw std::runtime_error("vramguard::ModelRegistry: the loader of model '" +
                                     slot.name() + "' returned no model (a null pointer)");
        // What the model holds: the guard's measured peak (a declaration is an estimate made
        // before loading; what was measured is what an unload frees), else declared, else what
        // free memory dropped by (blurred by anything else running, so it comes last).
        if (const std::uint64_t peak = core_.guard().profiles().get(slot.key()).peak_bytes;
            peak > 0) {
            loaded.bytes = peak;
        } else if (declared) {
            loaded.bytes = *declared;
        } else {
            const std::uint64_t free_after = core_.probe().memory().free_bytes;
            loaded.bytes = free_before > free_after ? free_before - free_after : 0;
        }
        RegistryEvent event(RegistryEventKind::loaded, slot.name());
        event.bytes = loaded.bytes;
        event.took = std::chrono::duration_cast<std::chrono::milliseconds>(core_.now() - start);
        core_.publish(event);
        return loaded;
    }

    [[noreturn]] void throw_insufficient(SlotBase& slot, const Room& room, Duration waited) {
        const Admission& admission = room.admission;
        const MemoryInfo& memory = admission.memory;
        const std::string message =
            "vramguard: cannot load model '" + slot.name() + "' (" + slot.key().describe() +
            "): " + refusal_reason(room) + ". Holding memory: " + holders_text(memory) +
            (room.peers.empty() ? "" : ". Peers asked: " + room.peers) + ". Waited " +
            ms_text(waited) + " (load_wait " + ms_text(core_.options().load_wait) + "); retry " +
            (room.loaded == 0 ? "when the other use shrinks." : "when a lease ends.");
        // Never a "can never fit": make_room calls such a load ready, and Guard::load rejects it.
        throw InsufficientMemory(admission.requirement.bytes, memory.free_bytes, memory.total_bytes,
                                 slot.key().describe(), core_.guard().options().retry_delay,
                                 message, false);
    }

    std::string refusal_reason(const Room& room) const {
        const Admission& admission = room.admission;
        const std::string cap = std::to_string(core_.options().max_loaded_models);
        if (room.plan.at_cap && admission.admitted)
            return std::to_string(room.loaded) + " models are loaded (max_loaded_models " + cap +
                   ") and none of them is idle";
        return "it needs " + format_bytes(admission.requirement.bytes) + " (" +
               policy::to_string(admission.requirement.source) + ") plus a safety margin of " +
               format_bytes(admission.margin_bytes) + ", but only " +
               format_bytes(admission.memory.free_bytes) + " of " +
               format_bytes(admission.memory.total_bytes) + " is free, and " +
               (room.plan.evicting_cannot_help ? "unloading every idle model would not free enough"
                : room.loaded == 0             ? "no other model is loaded to unload"
                                               : "no loaded model is idle") +
               (room.plan.at_cap ? " (max_loaded_models " + cap + " reached)" : "");
    }

    // Every loaded model with its bytes and whether it is busy, then what the registry does not
    // hold: "'a' 4.00 GiB (busy, 1 lease), other use (...) 512.00 MiB".
    std::string holders_text(const MemoryInfo& memory) const {
        std::string text;
        const TimePoint now = core_.now();
        std::uint64_t held = 0;
        for (const auto& other : core_.slots()) {
            const ModelStatus status = SlotAccess::status_at(*other, now);
            if (!status.loaded) continue;
            held = policy::saturating_add(held, status.bytes);
            text += "'" + status.name + "' " + format_bytes(status.bytes) + " (" +
                    (status.leases > 0 ? "busy, " + std::to_string(status.leases) +
                                             (status.leases == 1 ? " lease" : " leases")
                                       : "idle " + seconds_text(status.idle_seconds)) +
                    "), ";
        }
        const std::uint64_t used = memory.used_bytes();
        return text + "other use (other processes, work outside the registry) " +
               format_bytes(used > held ? used - held : 0);
    }

    RegistryCore<Probe>& core_;
    RegistryRelief<Probe>& relief_;
};

}  // namespace detail

VRAMGUARD_END_NAMESPACE
