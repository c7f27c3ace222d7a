// SPDX-License-Identifier: MIT
// What every part of a ModelRegistry shares: the guard, the options and the injected time, the
// slots table, the counters and event publishing, and the load turn. ModelRegistry is the facade;
// a load (detail/registry_load.hpp) and the peer relief stage (detail/registry_relief.hpp) receive
// this core by reference.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/eviction.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/model_slot.hpp>
#include <vramguard/registry_events.hpp>
#include <vramguard/registry_options.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

template <class Probe>
class RegistryCore {
   public:
    RegistryCore(Guard<Probe>& guard, RegistryOptions options)
        : guard_(guard),
          options_((options.validate(), std::move(options))),
          clock_(options_.clock ? options_.clock : guard.options().clock),
          sleep_(options_.sleep ? options_.sleep : guard.options().sleep) {}

    RegistryCore(const RegistryCore&) = delete;
    RegistryCore& operator=(const RegistryCore&) = delete;

    // The guard and its probe are shared with their owner, not part of the registry's state.
    Guard<Probe>& guard() const noexcept { return guard_; }
    Probe& probe() const noexcept { return guard_.probe(); }
    const RegistryOptions& options() const noexcept { return options_; }
    const ClockFn& clock() const noexcept { return clock_; }
    const SleepFn& sleep() const noexcept { return sleep_; }
    TimePoint now() const { return clock_(); }
    RegistryStats stats() const noexcept { return stats_.snapshot(); }

    // Counts the event and, past the guard's Options::log_level, formats and logs it.
    void publish(const RegistryEvent& event) {
        detail::publish(stats_, guard_.options().log, guard_.options().log_level, event);
    }
    // An unload's event: the model, its bytes, how long it was idle.
    static RegistryEvent unload_event(RegistryEventKind kind, const SlotBase& slot,
                                      const UnloadResult& result) noexcept {
        RegistryEvent event(kind, slot.name());
        event.bytes = result.bytes;
        event.idle_seconds = result.idle_seconds;
        return event;
    }
    void warn_if_referenced(const SlotBase& slot, bool still_referenced) {
        if (still_referenced)
            publish(RegistryEvent(RegistryEventKind::still_referenced, slot.name()));
    }

    // ---- the slots ---------------------------------------------------------------------------

    // Adds a slot; std::invalid_argument when its name is taken.
    void insert(std::shared_ptr<SlotBase> slot) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& other : slots_)
            if (other->name() == slot->name())
                throw std::invalid_argument("vramguard::ModelRegistry::add: a model named '" +
                                            slot->name() + "' is already registered");
        slots_.push_back(std::move(slot));
    }

    std::vector<std::shared_ptr<SlotBase>> slots() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return slots_;
    }

    // The slots and what each held when looked at, in the registry's order.
    struct Look {
        std::vector<std::shared_ptr<SlotBase>> slots;
        std::vector<SlotSnapshot> seen;
        std::size_t index_of(const SlotBase* slot) const {
            for (std::size_t i = 0; i < slots.size(); ++i)
                if (slots[i].get() == slot) return i;
            return eviction::no_slot;
        }
    };
    Look look() const {
        Look result;
        result.slots = slots();
        for (const auto& slot : result.slots) result.seen.push_back(SlotAccess::snapshot(*slot));
        return result;
    }

    // ---- the load turn -----------------------------------------------------------------------
    //
    // Loads take turns: two admissions reading the same free memory would both pass and one load
    // would then OOM. The turn is held while deciding, evicting, asking peers and loading.

    // Whether a load is in progress on this registry (some thread holds the turn).
    bool loading() const noexcept {
        return turn_owner_.load(std::memory_order_acquire) != std::thread::id();
    }
    bool holds_turn() const noexcept {
        return turn_owner_.load(std::memory_order_acquire) == std::this_thread::get_id();
    }

    // The turn, held while it lives.
    class Turn {
       public:
        explicit Turn(RegistryCore& core) : core_(core), lock_(core.turn_mutex_) {
            core_.turn_owner_.store(std::this_thread::get_id(), std::memory_order_release);
        }
        ~Turn() { core_.turn_owner_.store(std::thread::id(), std::memory_order_release); }
        Turn(const Turn&) = delete;
        Turn& operator=(const Turn&) = delete;

       private:
        RegistryCore& core_;
        std::lock_guard<std::mutex> lock_;
    };

   private:
    Guard<Probe>& guard_;
    const RegistryOptions options_;
    const ClockFn clock_;
    const SleepFn sleep_;

    mutable std::mutex mutex_;  // slots_; never held while loading or waiting
    std::vector<std::shared_ptr<SlotBase>> slots_;
    AtomicRegistryStats stats_;

    std::mutex turn_mutex_;  // one load (decide, evict, ask peers, load) at a time
    std::atomic<std::thread::id> turn_owner_{};
};

}  // namespace detail

VRAMGUARD_END_NAMESPACE
