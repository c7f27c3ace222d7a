// SPDX-License-Identifier: MIT
// Model lifecycle: ModelSlot<T> holds at most one loaded model and lends it out through leases;
// ModelRegistry keeps many slots on one device under a cap, evicts idle models least-recently-used
// first when a load does not fit, unloads models left idle, and relieves memory pressure.
//
// Rules that hold everywhere in this file:
// - A model is never unloaded while a lease on it is alive (checked under the slot's lock).
// - No lock is held while a user's loader runs, while a model is destroyed, or while waiting.
// - Every wait reads the injected clock and sleeps through the injected sleep; the reaper thread is
//   the one exception (it waits in real time on a condition variable, so destruction stops it at
//   once) and it still passes the injected clock's time to tick().
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/eviction.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/model_slot.hpp>
#include <vramguard/options.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/pressure.hpp>
#include <vramguard/registry_events.hpp>
#include <vramguard/detail/reaper.hpp>
#include <vramguard/detail/registry_core.hpp>
#include <vramguard/detail/registry_load.hpp>
#include <vramguard/detail/registry_relief.hpp>
#include <vramguard/registry_options.hpp>
#include <vramguard/relief.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

struct RegistryStatus {
    std::vector<ModelStatus> models;  // in the order they were added
    std::size_t loaded_models = 0;
    std::size_t max_loaded_models = 0;
    MemoryInfo memory;  // the probe's reading
    RegistryStats stats;
    std::vector<PeerStatus> peers;  // in the configured order: last answer, cooldown
};

// Many model slots on one device: a cap on loaded models, least-recently-used eviction of idle
// models when a load does not fit, idle auto-unload and two-stage pressure relief (tick()), and a
// status() snapshot. Thread-safe. The guard (and its probe) must outlive the registry; slots and
// leases may outlive it.
//
// Loads on one registry take turns: two admissions reading the same free memory would both pass
// and one load would then OOM, and the device is the bottleneck of a load anyway. The turn is held
// while deciding, evicting and loading, never while waiting for a lease to end. A loader must not
// acquire() another unloaded model of the same registry (that load would wait for its own turn:
// std::logic_error), nor its own slot.
//
// A peer's relieve() runs on a thread of its own and is abandoned at its deadline. The destructor
// waits (real time, at most peer_timeout) for such calls still running, so a Peer may use what
// lives as long as the registry (the registry itself, the guard, the device); one still running
// after that is logged and left, and must own (by shared_ptr) anything it touches later.
template <class Probe>
class ModelRegistry : private detail::SlotOwner {
   public:
    explicit ModelRegistry(Guard<Probe>& guard, RegistryOptions options = {})
        : core_(guard, std::move(options)), relief_(core_) {
        if (core_.options().reaper)
            reaper_ = std::make_unique<detail::Reaper>(
                detail::saturating_duration(core_.options().reaper_interval),
                [this] { tick(core_.now()); },
                [this](const std::string& message) {
                    RegistryEvent event(RegistryEventKind::housekeeping_failed);
                    event.text = message;
                    publish(event);
                });
    }

    ModelRegistry(const ModelRegistry&) = delete;
    ModelRegistry& operator=(const ModelRegistry&) = delete;

    // Stops the reaper (at once), then unloads every idle model; a leased one goes when its last
    // lease ends. No call into the registry may still be running.
    ~ModelRegistry() {
        reaper_.reset();
        try {
            if (!wait_for_peer_calls(options().peer_timeout)) {
                RegistryEvent event(RegistryEventKind::peer_calls_left);
                event.count = relief_.calls_running();
                event.limit = options().peer_timeout;
                publish(event);
            }
        } catch (...) {
        }
        for (const auto& slot : core_.slots()) detail::SlotAccess::detach(*slot);
        try {
            core_.probe().release_cached();
        } catch (...) {
        }
    }

    // Registers a model, loaded lazily by the first acquire(). `loader` returns the model as
    // anything convertible to std::shared_ptr<T> (a std::unique_ptr<T> too); it should hand over
    // ownership, since a copy kept elsewhere keeps the memory after an unload. `declared_bytes` is
    // what the model needs to load (else the guard's measured peak, else first_run_fraction of the
    // device) and what it is counted as holding once loaded when no peak of it was measured (a
    // measured peak wins: it is what an unload frees).
    template <class T, class Loader>
    std::shared_ptr<ModelSlot<T>> add(std::string name, Key key, Loader&& loader,
                                      std::optional<std::uint64_t> declared_bytes = std::nullopt) {
        using Result = std::invoke_result_t<std::decay_t<Loader>&>;
        static_assert(
            std::is_convertible_v<Result, std::shared_ptr<T>>,
            "vramguard::ModelRegistry::add<T>: the loader must return std::shared_ptr<T>, "
            "std::unique_ptr<T> or something else convertible to std::shared_ptr<T>");
        if (name.empty())
            throw std::invalid_argument("vramguard::ModelRegistry::add: name must not be empty");
        if (declared_bytes && *declared_bytes == 0)
            throw std::invalid_argument(
                "vramguard::ModelRegistry::add: declared_bytes must be > 0 for '" + name + "'");
        // Shared, so that a move-only loader fits in std::function.
        auto held = std::make_shared<std::decay_t<Loader>>(std::forward<Loader>(loader));
        detail::ErasedLoader erased = [held]() -> std::shared_ptr<void> {
            std::shared_ptr<T> model = (*held)();
            return model;
        };
        auto slot = std::make_shared<ModelSlot<T>>(
            detail::SlotPasskey{}, std::move(name), std::move(key), declared_bytes,
            std::move(erased), static_cast<detail::SlotOwner*>(this), core_.clock());
        core_.insert(slot);
        return slot;
    }

    // request_unload() of the model registered as `name`; std::out_of_range when there is none.
    // Busy (loading) while this registry loads a model, like the registry-wide form below.
    UnloadResult request_unload(std::string_view name, Duration min_idle = Duration::zero()) {
        if (core_.loading()) return busy_loading();
        for (const auto& slot : core_.slots())
            if (slot->name() == name) return slot->request_unload(min_idle);
        throw std::out_of_range("vramguard::ModelRegistry::request_unload: no model named '" +
                                std::string(name) + "'");
    }

    // The registry as a peer's answer (relief::reply_from): unloads models idle for at least
    // `min_idle`, least recently used first, until `wanted_bytes` are freed; says busy (with the
    // longest idle time and the leases) when none could go, not loaded when none is loaded. While
    // this registry is loading a model it answers busy (loading): it needs the memory itself, and
    // two registries that ask each other must not trade models back and forth.
    UnloadResult request_unload(
        Duration min_idle, std::uint64_t wanted_bytes = std::numeric_limits<std::uint64_t>::max()) {
        if (core_.loading()) return busy_loading();
        const TimePoint now = core_.now();
        const Look seen = core_.look();
        std::vector<std::size_t> order = eviction::idle_lru(seen.seen);
        for (std::size_t i = 0; i < seen.slots.size(); ++i)
            if (std::find(order.begin(), order.end(), i) == order.end()) order.push_back(i);
        std::vector<UnloadResult> results;
        std::uint64_t freed = 0;
        for (const std::size_t i : order) {
            if (freed >= wanted_bytes) break;
            bool still_referenced = false;
            results.push_back(detail::SlotAccess::try_unload(*seen.slots[i], now, min_idle,
                                                             seen.seen[i].uses, &still_referenced));
            if (!results.back().unloaded()) continue;
            freed = policy::saturating_add(freed, results.back().bytes);
            on_requested_unload(*seen.slots[i], results.back());
            warn_if_referenced(*seen.slots[i], still_referenced);
        }
        return relief::merge_unloads(results);
    }

    // Housekeeping: unloads models idle for idle_timeout, then relieves memory pressure. The reaper
    // thread calls it; a host without one calls it from its own loop (every second or so).
    void tick() { tick(core_.now()); }
    void tick(TimePoint now) {
        unload_idle(now);
        relieve_pressure(now);
    }

    // Unloads every model idle for at least idle_timeout at `now`; returns how many.
    std::size_t unload_idle(TimePoint now) {
        if (options().idle_timeout.count() == 0) return 0;
        std::size_t count = 0;
        for (const auto& slot : core_.slots()) {
            const detail::SlotSnapshot seen = detail::SlotAccess::snapshot(*slot);
            if (seen.state != ModelState::loaded || seen.leases > 0) continue;
            bool still_referenced = false;
            const UnloadResult result = detail::SlotAccess::try_unload(
                *slot, now, detail::saturating_duration(options().idle_timeout), std::nullopt,
                &still_referenced);
            if (!result.unloaded()) continue;
            ++count;
            RegistryEvent event = unload_event(RegistryEventKind::idle_unloaded, *slot, result);
            event.limit = options().idle_timeout;
            publish(event);
            warn_if_referenced(*slot, still_referenced);
        }
        if (count > 0) core_.probe().release_cached();
        return count;
    }

    // Two stages, at most once per pressure_rate_limit: above pressure_threshold the allocator
    // cache is emptied; if usage is still above aggressive_threshold, idle models are unloaded
    // least-recently-used first until the estimate is back under aggressive_threshold (a reload
    // costs more than a little pressure). Busy models are never touched.
    PressureRelief relieve_pressure(TimePoint now) {
        PressureRelief relief;
        const MemoryInfo before = core_.probe().memory();
        relief.usage_before = relief.usage_after = before.usage();
        {
            std::lock_guard<std::mutex> lock(pressure_mutex_);
            const pressure::Action action =
                pressure::decide(relief.usage_before, options().pressure_threshold, last_relief_,
                                 now, detail::saturating_duration(options().pressure_rate_limit));
            if (action != pressure::Action::act) {
                relief.rate_limited = action == pressure::Action::rate_limited;
                return relief;
            }
            last_relief_ = now;
        }
        relief.acted = true;
        core_.probe().release_cached();
        const MemoryInfo after_cache = core_.probe().memory();
        // INFO: emptying the cache is routine and cheap; unloading a model (below) is WARN.
        RegistryEvent event(RegistryEventKind::pressure_cache_released);
        event.usage = before.usage();
        event.total_bytes = before.total_bytes;
        event.threshold = options().pressure_threshold;
        event.usage_after = after_cache.usage();
        publish(event);
        if (after_cache.usage() > options().aggressive_threshold)
            relief.unloaded = unload_for_pressure(after_cache, now);
        relief.usage_after = core_.probe().memory().usage();
        return relief;
    }

    // Waits (real time, at most `timeout`) for the peer calls still running on their own
    // threads, those abandoned at their deadline too. True when none runs any more.
    bool wait_for_peer_calls(std::chrono::milliseconds timeout) {
        return relief_.wait_for_calls(detail::saturating_duration(timeout));
    }

    // A snapshot for a status endpoint: every model (loaded or not), the device, the counters.
    RegistryStatus status() const {
        RegistryStatus status;
        const TimePoint now = core_.now();
        for (const auto& slot : core_.slots()) {
            status.models.push_back(detail::SlotAccess::status_at(*slot, now));
            if (status.models.back().loaded) ++status.loaded_models;
        }
        status.max_loaded_models = options().max_loaded_models;
        status.memory = core_.probe().memory();
        status.stats = stats();
        status.peers = relief_.status(now);
        return status;
    }

    RegistryStats stats() const noexcept { return core_.stats(); }
    const RegistryOptions& options() const noexcept { return core_.options(); }
    Guard<Probe>& guard() noexcept { return core_.guard(); }

   private:
    using Look = typename detail::RegistryCore<Probe>::Look;

    static UnloadResult busy_loading() noexcept {
        UnloadResult result;
        result.outcome = UnloadOutcome::busy;
        result.loading = true;
        return result;
    }

    void publish(const RegistryEvent& event) { core_.publish(event); }
    static RegistryEvent unload_event(RegistryEventKind kind, const detail::SlotBase& slot,
                                      const UnloadResult& result) noexcept {
        return detail::RegistryCore<Probe>::unload_event(kind, slot, result);
    }
    void warn_if_referenced(const detail::SlotBase& slot, bool still_referenced) {
        core_.warn_if_referenced(slot, still_referenced);
    }

    // Idle models unloaded least recently used first while use stays above aggressive_threshold
    // (by the estimate: the driver reports the frees late). Busy models are never touched.
    std::size_t unload_for_pressure(const MemoryInfo& after_cache, TimePoint now) {
        std::uint64_t used = after_cache.used_bytes();
        const std::uint64_t target =
            pressure::unload_target(after_cache.total_bytes, options().aggressive_threshold);
        const Look seen = core_.look();
        std::size_t unloaded = 0;
        for (const std::size_t i : eviction::idle_lru(seen.seen)) {
            if (used <= target) break;
            detail::SlotBase& slot = *seen.slots[i];
            bool still_referenced = false;
            const UnloadResult result = detail::SlotAccess::try_unload(
                slot, now, Duration::zero(), seen.seen[i].uses, &still_referenced);
            if (!result.unloaded()) continue;
            used = used > result.bytes ? used - result.bytes : 0;
            ++unloaded;
            RegistryEvent event = unload_event(RegistryEventKind::pressure_unloaded, slot, result);
            event.usage = after_cache.usage();
            event.threshold = options().aggressive_threshold;
            publish(event);
            warn_if_referenced(slot, still_referenced);
        }
        if (unloaded > 0) core_.probe().release_cached();
        return unloaded;
    }

    // ---- SlotOwner ---------------------------------------------------------------------------

    void* load_model(detail::SlotBase& slot) override {
        return detail::RegistryLoad<Probe>(core_, relief_).run(slot);
    }

    bool holds_load_turn() const noexcept override { return core_.holds_turn(); }

    void on_requested_unload(detail::SlotBase& slot, const UnloadResult& result) noexcept override {
        try {
            publish(unload_event(RegistryEventKind::requested_unloaded, slot, result));
            core_.probe().release_cached();
        } catch (...) {
        }
    }

    detail::RegistryCore<Probe> core_;
    detail::RegistryRelief<Probe> relief_;
    std::mutex pressure_mutex_;  // last_relief_
    std::optional<TimePoint> last_relief_;
    std::unique_ptr<detail::Reaper> reaper_;  // last: started once everything above exists
};

VRAMGUARD_END_NAMESPACE
