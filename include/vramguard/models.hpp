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

namespace defaults {
// Ollama's OLLAMA_MAX_LOADED_MODELS default (per GPU): enough for an embedder, a reranker and a
// generator side by side; more mostly means more reload churn when memory runs short.
inline constexpr std::size_t max_loaded_models = 3;
// Ollama's keep_alive default: long enough to serve a conversation, short enough that a model
// nobody uses gives its memory back within minutes.
inline constexpr std::chrono::milliseconds idle_timeout{std::chrono::minutes(5)};
// Above this fraction of the device in use, the allocator cache is emptied first: that costs only
// some re-allocation later.
inline constexpr double pressure_threshold = 0.75;
// Above this even after emptying the cache, idle models are unloaded: reloading one costs seconds.
inline constexpr double aggressive_threshold = 0.85;
// Relief acts at most once per window: the driver reports freed memory late, and acting again on
// the same stale reading would unload model after model.
inline constexpr std::chrono::milliseconds pressure_rate_limit{30000};
// 0: a load that cannot be made room for fails at once with InsufficientMemory (a server answers
// 503 with retry_after) instead of holding the request.
inline constexpr std::chrono::milliseconds load_wait{0};
inline constexpr std::chrono::milliseconds reaper_interval{1000};
// A peer that has not answered in 2 s is down or stuck: an unload it agrees to answers at once.
inline constexpr std::chrono::milliseconds peer_timeout{2000};
// The seeds' /request-unload rate limit: a peer is asked at most once per window, so two servers
// that need memory in turn cannot ping-pong each other's models.
inline constexpr std::chrono::milliseconds peer_cooldown{30000};
}  // namespace defaults

struct RegistryOptions {
    std::size_t max_loaded_models = defaults::max_loaded_models;      // models loaded at once, >= 1
    std::chrono::milliseconds idle_timeout = defaults::idle_timeout;  // unload after; 0 = never
    // Fractions of the device in use (the probe's reading): above the first the cache is
    // emptied, (0, 1]; above the second idle models are unloaded, [pressure_threshold, 1].
    double pressure_threshold = defaults::pressure_threshold;
    double aggressive_threshold = defaults::aggressive_threshold;
    std::chrono::milliseconds pressure_rate_limit = defaults::pressure_rate_limit;  // >= 0
    std::chrono::milliseconds load_wait = defaults::load_wait;  // max wait for room to load, >= 0
    // true: a library-owned thread calls tick() every reaper_interval; it stops (at once) when the
    // registry is destroyed. false: the host calls tick() from its own loop.
    bool reaper = false;
    std::chrono::milliseconds reaper_interval = defaults::reaper_interval;  // > 0, real time
    // Other services on the device, asked in this order to free memory when a load still does not
    // fit after the registry's own idle models went (peer.hpp). Empty: no peer relief.
    std::vector<std::shared_ptr<Peer>> peers;
    std::chrono::milliseconds peer_timeout = defaults::peer_timeout;    // per ask, > 0
    std::chrono::milliseconds peer_cooldown = defaults::peer_cooldown;  // per peer, >= 0
    ClockFn clock;  // empty = the guard's Options::clock
    SleepFn sleep;  // empty = the guard's Options::sleep

    // Throws std::invalid_argument naming the first field that makes no sense.
    void validate() const {
        auto fail = [](const char* field, const std::string& why) {
            throw std::invalid_argument(std::string("vramguard::RegistryOptions::") + field + " " +
                                        why);
        };
        if (max_loaded_models < 1) fail("max_loaded_models", "must be at least 1");
        if (idle_timeout.count() < 0) fail("idle_timeout", "must not be negative (0 = never)");
        if (!std::isfinite(pressure_threshold) || pressure_threshold <= 0 || pressure_threshold > 1)
            fail("pressure_threshold",
                 "must be in (0, 1], got " + std::to_string(pressure_threshold));
        if (!std::isfinite(aggressive_threshold) || aggressive_threshold < pressure_threshold ||
            aggressive_threshold > 1)
            fail("aggressive_threshold",
                 "must be in [pressure_threshold, 1], got " + std::to_string(aggressive_threshold));
        if (pressure_rate_limit.count() < 0) fail("pressure_rate_limit", "must not be negative");
        if (load_wait.count() < 0) fail("load_wait", "must not be negative");
        if (reaper_interval.count() <= 0) fail("reaper_interval", "must be positive");
        for (const auto& peer : peers)
            if (!peer) fail("peers", "must not hold a null peer");
        if (peer_timeout.count() <= 0) fail("peer_timeout", "must be positive");
        if (peer_cooldown.count() < 0) fail("peer_cooldown", "must not be negative");
    }
};

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
        : guard_(guard),
          options_((options.validate(), std::move(options))),
          clock_(options_.clock ? options_.clock : guard.options().clock),
          sleep_(options_.sleep ? options_.sleep : guard.options().sleep),
          peers_(options_.peers, detail::saturating_duration(options_.peer_timeout),
                 detail::saturating_duration(options_.peer_cooldown)),
          relief_mutex_(detail::device_relief_mutex(detail::device_identity(guard.probe()))) {
        if (options_.reaper)
            reaper_ = std::make_unique<detail::Reaper>(
                detail::saturating_duration(options_.reaper_interval), [this] { tick(clock_()); },
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
            if (!wait_for_peer_calls(options_.peer_timeout)) {
                RegistryEvent event(RegistryEventKind::peer_calls_left);
                event.count = peers_.calls_running();
                event.limit = options_.peer_timeout;
                publish(event);
            }
        } catch (...) {
        }
        for (const auto& slot : slots()) detail::SlotAccess::detach(*slot);
        try {
            guard_.probe().release_cached();
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
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& slot : slots_)
            if (slot->name() == name)
                throw std::invalid_argument("vramguard::ModelRegistry::add: a model named '" +
                                            name + "' is already registered");
        auto slot = std::make_shared<ModelSlot<T>>(
            detail::SlotPasskey{}, std::move(name), std::move(key), declared_bytes,
            std::move(erased), static_cast<detail::SlotOwner*>(this), clock_);
        slots_.push_back(slot);
        return slot;
    }

    // request_unload() of the model registered as `name`; std::out_of_range when there is none.
    // Busy (loading) while this registry loads a model, like the registry-wide form below.
    UnloadResult request_unload(std::string_view name, Duration min_idle = Duration::zero()) {
        if (loading()) return busy_loading();
        for (const auto& slot : slots())
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
        if (loading()) return busy_loading();
        const TimePoint now = clock_();
        const Look seen = look();
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
    void tick() { tick(clock_()); }
    void tick(TimePoint now) {
        unload_idle(now);
        relieve_pressure(now);
    }

    // Unloads every model idle for at least idle_timeout at `now`; returns how many.
    std::size_t unload_idle(TimePoint now) {
        if (options_.idle_timeout.count() == 0) return 0;
        std::size_t count = 0;
        for (const auto& slot : slots()) {
            const detail::SlotSnapshot seen = detail::SlotAccess::snapshot(*slot);
            if (seen.state != ModelState::loaded || seen.leases > 0) continue;
            bool still_referenced = false;
            const UnloadResult result = detail::SlotAccess::try_unload(
                *slot, now, detail::saturating_duration(options_.idle_timeout), std::nullopt,
                &still_referenced);
            if (!result.unloaded()) continue;
            ++count;
            RegistryEvent event = unload_event(RegistryEventKind::idle_unloaded, *slot, result);
            event.limit = options_.idle_timeout;
            publish(event);
            warn_if_referenced(*slot, still_referenced);
        }
        if (count > 0) guard_.probe().release_cached();
        return count;
    }

    // Two stages, at most once per pressure_rate_limit: above pressure_threshold the allocator
    // cache is emptied; if usage is still above aggressive_threshold, idle models are unloaded
    // least-recently-used first until the estimate is back under aggressive_threshold (a reload
    // costs more than a little pressure). Busy models are never touched.
    PressureRelief relieve_pressure(TimePoint now) {
        PressureRelief relief;
        const MemoryInfo before = guard_.probe().memory();
        relief.usage_before = relief.usage_after = before.usage();
        {
            std::lock_guard<std::mutex> lock(mutex_);
            const pressure::Action action =
                pressure::decide(relief.usage_before, options_.pressure_threshold, last_relief_,
                                 now, detail::saturating_duration(options_.pressure_rate_limit));
            if (action != pressure::Action::act) {
                relief.rate_limited = action == pressure::Action::rate_limited;
                return relief;
            }
            last_relief_ = now;
        }
        relief.acted = true;
        guard_.probe().release_cached();
        const MemoryInfo after_cache = guard_.probe().memory();
        // INFO: emptying the cache is routine and cheap; unloading a model (below) is WARN.
        RegistryEvent event(RegistryEventKind::pressure_cache_released);
        event.usage = before.usage();
        event.total_bytes = before.total_bytes;
        event.threshold = options_.pressure_threshold;
        event.usage_after = after_cache.usage();
        publish(event);
        if (after_cache.usage() > options_.aggressive_threshold)
            relief.unloaded = unload_for_pressure(after_cache, now);
        relief.usage_after = guard_.probe().memory().usage();
        return relief;
    }

    // A snapshot for a status endpoint: every model (loaded or not), the device, the counters.
    // Waits (real time, at most `timeout`) for the peer calls still running on their own
    // threads, those abandoned at their deadline too. True when none runs any more.
    bool wait_for_peer_calls(std::chrono::milliseconds timeout) {
        return peers_.wait_for_calls(detail::saturating_duration(timeout));
    }

    RegistryStatus status() const {
        RegistryStatus status;
        const TimePoint now = clock_();
        for (const auto& slot : slots()) {
            status.models.push_back(detail::SlotAccess::status_at(*slot, now));
            if (status.models.back().loaded) ++status.loaded_models;
        }
        status.max_loaded_models = options_.max_loaded_models;
        status.memory = guard_.probe().memory();
        status.stats = stats();
        status.peers = peers_.status(now);
        return status;
    }

    RegistryStats stats() const noexcept { return stats_.snapshot(); }
    const RegistryOptions& options() const noexcept { return options_; }
    Guard<Probe>& guard() noexcept { return guard_; }

   private:
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

    // Whether a load is in progress on this registry (some thread holds the turn).
    bool loading() const noexcept {
        return turn_owner_.load(std::memory_order_acquire) != std::thread::id();
    }
    static UnloadResult busy_loading() noexcept {
        UnloadResult result;
        result.outcome = UnloadOutcome::busy;
        result.loading = true;
        return result;
    }

    // Counts the event and, past the guard's Options::log_level, formats and logs it.
    void publish(const RegistryEvent& event) {
        detail::publish(stats_, guard_.options().log, guard_.options().log_level, event);
    }
    // An unload's event: the model, its bytes, how long it was idle.
    static RegistryEvent unload_event(RegistryEventKind kind, const detail::SlotBase& slot,
                                      const UnloadResult& result) noexcept {
        RegistryEvent event(kind, slot.name());
        event.bytes = result.bytes;
        event.idle_seconds = result.idle_seconds;
        return event;
    }
    void warn_if_referenced(const detail::SlotBase& slot, bool still_referenced) {
        if (still_referenced)
            publish(RegistryEvent(RegistryEventKind::still_referenced, slot.name()));
    }

    std::vector<std::shared_ptr<detail::SlotBase>> slots() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return slots_;
    }

    // The slots and what each held when looked at, in the registry's order.
    struct Look {
        std::vector<std::shared_ptr<detail::SlotBase>> slots;
        std::vector<detail::SlotSnapshot> seen;
        std::size_t index_of(const detail::SlotBase* slot) const {
            for (std::size_t i = 0; i < slots.size(); ++i)
                if (slots[i].get() == slot) return i;
            return eviction::no_slot;
        }
    };
    Look look() const {
        Look result;
        result.slots = slots();
        for (const auto& slot : result.slots)
            result.seen.push_back(detail::SlotAccess::snapshot(*slot));
        return result;
    }

    // Idle models unloaded least recently used first while use stays above aggressive_threshold
    // (by the estimate: the driver reports the frees late). Busy models are never touched.
    std::size_t unload_for_pressure(const MemoryInfo& after_cache, TimePoint now) {
        std::uint64_t used = after_cache.used_bytes();
        const std::uint64_t target =
            pressure::unload_target(after_cache.total_bytes, options_.aggressive_threshold);
        const Look seen = look();
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
            event.threshold = options_.aggressive_threshold;
            publish(event);
            warn_if_referenced(slot, still_referenced);
        }
        if (unloaded > 0) guard_.probe().release_cached();
        return unloaded;
    }

    // ---- SlotOwner ---------------------------------------------------------------------------

    void* load_model(detail::SlotBase& slot) override {
        try {
            return load_with_room(slot);
        } catch (...) {
            publish(RegistryEvent(RegistryEventKind::load_failed, slot.name()));
            throw;
        }
    }

    bool holds_load_turn() const noexcept override {
        return turn_owner_.load(std::memory_order_acquire) == std::this_thread::get_id();
    }

    void on_requested_unload(detail::SlotBase& slot, const UnloadResult& result) noexcept override {
        try {
            publish(unload_event(RegistryEventKind::requested_unloaded, slot, result));
            guard_.probe().release_cached();
        } catch (...) {
        }
    }

    // ---- loading -----------------------------------------------------------------------------

    void* load_with_room(detail::SlotBase& slot) {
        const TimePoint start = clock_();
        const TimePoint deadline = detail::deadline_after(start, options_.load_wait);
        bool waited = false;
        for (;;) {
            Room room;
            if (void* model = load_in_turn(slot, room)) return model;
            const TimePoint now = clock_();
            if (now >= deadline) {
                publish(RegistryEvent(RegistryEventKind::rejected, slot.name()));
                throw_insufficient(slot, room, now - start);
            }
            if (!waited) {
                waited = true;
                RegistryEvent event(RegistryEventKind::load_waits, slot.name());
                event.limit = options_.load_wait;
                event.at_cap = room.plan.at_cap;
                publish(event);
            }
            sleep_(std::min<Duration>(guard_.options().poll_interval, deadline - now));
        }
    }

    // One turn: make room, ask peers when that is not enough, then load once admitted. Returns the
    // model (published, leased), or nullptr when there is no room (`room` says why).
    void* load_in_turn(detail::SlotBase& slot, Room& room) {
        std::lock_guard<std::mutex> turn(turn_mutex_);
        turn_owner_.store(std::this_thread::get_id(), std::memory_order_release);
        struct ClearOwner {
            std::atomic<std::thread::id>& owner;
            ~ClearOwner() { owner.store(std::thread::id(), std::memory_order_release); }
        } clear_owner{turn_owner_};
        room = make_room(slot);
        if (!room.ready && relieve_with_peers(slot, room)) {
            std::string asked = std::move(room.peers);
            room = make_room(slot);  // admit once more: only the probe's reading counts
            room.peers = std::move(asked);
            if (room.ready) publish(RegistryEvent(RegistryEventKind::peer_relief, slot.name()));
        }
        if (!room.ready) return nullptr;
        detail::LoadedModel loaded = run_loader(slot, room.trusted_bytes);
        // Published before the turn ends: the next load counts it against the cap.
        return detail::SlotAccess::commit_load(slot, std::move(loaded), clock_());
    }

    // Peer relief (relief.hpp), after local eviction: asks the peers for what the registry cannot
    // reach by itself, then waits for the memory with the recovery rule. Returns whether to look
    // again. Claims are never trusted: the next look reads the probe. One relief per device at a
    // time; a second one does not wait for the first, it does without.
    bool relieve_with_peers(detail::SlotBase& slot, Room& room) {
        if (peers_.empty() ||
            !relief::worth_asking(room.plan.never_fits, room.plan.fits, room.plan.at_cap))
            return false;
        const std::uint64_t needed =
            policy::saturating_add(room.admission.requirement.bytes, room.admission.margin_bytes);
        const std::uint64_t shortfall = relief::shortfall(needed, room.reachable);
        if (shortfall == 0) return false;
        std::unique_lock<std::mutex> one_relief(*relief_mutex_, std::try_to_lock);
        if (!one_relief.owns_lock()) {
            room.peers = "none (another load on this device is asking them)";
            return false;
        }
        const std::uint64_t free_before = guard_.probe().memory().free_bytes;
        const detail::ReliefOutcome outcome =
            peers_.ask(shortfall, slot.name(), clock_, sleep_, guard_.options().poll_interval);
        for (const std::string& answer : outcome.answers)
            room.peers += (room.peers.empty() ? "" : "; ") + answer;
        RegistryEvent asked(RegistryEventKind::peers_asked, slot.name());
        asked.count = outcome.asked;
        asked.bytes = shortfall;
        asked.text = room.peers;
        publish(asked);
        if (outcome.claimed == 0) return false;
        const TimePoint start = clock_();
        const bool seen = guard_.wait_for_freed_memory(outcome.claimed, free_before, needed);
        room.peers +=
            (seen ? "; the memory showed after " : "; the claimed memory did not show within ") +
            detail::ms_text(clock_() - start);
        return true;
    }

    // Evicts idle models, least recently used first, until the load is admitted and under the cap
    // (eviction::plan decides). Ready also when the model could never fit: then Guard::load says so
    // with its own numbers, and nothing was evicted for nothing.
    Room make_room(detail::SlotBase& slot) {
        Room room;
        for (;;) {
            room.admission = guard_.admission(slot.key(), slot.declared_bytes());
            if (room.admission.admitted) room.trusted_bytes = 0;
            const Look seen = look();
            const std::size_t self = seen.index_of(&slot);
            const std::vector<std::size_t> idle = eviction::idle_lru(seen.seen, self);
            eviction::Situation situation;
            situation.required = room.admission.requirement.bytes;
            situation.memory = room.admission.memory;
            situation.safety_margin = guard_.options().safety_margin;
            situation.trusted = room.trusted_bytes;
            situation.loaded = room.loaded = eviction::loaded_count(seen.seen, self);
            situation.max_loaded = options_.max_loaded_models;
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

    void evict(detail::SlotBase& for_slot, detail::SlotBase& victim, std::uint64_t seen_uses,
               Room& room) {
        const std::uint64_t free_before = guard_.probe().memory().free_bytes;
        bool still_referenced = false;
        const UnloadResult result = detail::SlotAccess::try_unload(
            victim, clock_(), Duration::zero(), seen_uses, &still_referenced);
        if (!result.unloaded()) return;  // a lease came first: decide again
        guard_.probe().release_cached();
        RegistryEvent event = unload_event(RegistryEventKind::evicted, victim, result);
        event.for_model = for_slot.name();
        event.at_cap = room.plan.at_cap;
        event.count = options_.max_loaded_models;
        publish(event);
        warn_if_referenced(victim, still_referenced);
        if (room.plan.fits || result.bytes == 0)
            return;  // only the cap was in the way: nothing to wait for
        wait_for_eviction(victim, result.bytes, free_before, room);
    }

    // The driver reports freed memory late: wait until it shows (or enough is free), else trust
    // the estimate, as Ollama does.
    void wait_for_eviction(const detail::SlotBase& victim, std::uint64_t freed,
                           std::uint64_t free_before, Room& room) {
        const std::uint64_t needed =
            policy::saturating_add(room.admission.requirement.bytes, room.admission.margin_bytes);
        const TimePoint start = clock_();
        if (guard_.wait_for_freed_memory(freed, free_before, needed)) {
            RegistryEvent event(RegistryEventKind::recovery_seen, victim.name());
            event.took = std::chrono::duration_cast<std::chrono::milliseconds>(clock_() - start);
            publish(event);
        } else {
            room.trusted_bytes = policy::saturating_add(room.trusted_bytes, freed);
            RegistryEvent event(RegistryEventKind::recovery_trusted, victim.name());
            event.took = std::chrono::duration_cast<std::chrono::milliseconds>(clock_() - start);
            event.bytes = freed;
            event.threshold = guard_.options().recovery_fraction;
            publish(event);
        }
    }

    detail::LoadedModel run_loader(detail::SlotBase& slot, std::uint64_t trusted_bytes) {
        const auto& loader = detail::SlotAccess::loader(slot);
        const std::optional<std::uint64_t>& declared = slot.declared_bytes();
        const std::uint64_t free_before = guard_.probe().memory().free_bytes;
        const TimePoint start = clock_();
        detail::LoadedModel loaded;
        if (trusted_bytes > 0) {
            // Memory an eviction freed but the driver does not report yet: the guard's admission
            // only sees the report, so the requirement it checks is lowered by what is trusted.
            const std::uint64_t required = guard_.admission(slot.key(), declared).requirement.bytes;
            loaded.model = guard_.load(
                slot.key(), required > trusted_bytes ? required - trusted_bytes : 1, loader);
        } else if (declared) {
            loaded.model = guard_.load(slot.key(), *declared, loader);
        } else {
            loaded.model = guard_.load(slot.key(), loader);
        }
        if (!loaded.model)
            throw std::runtime_error("vramguard::ModelRegistry: the loader of model '" +
                                     slot.name() + "' returned no model (a null pointer)");
        // What the model holds: the guard's measured peak (a declaration is an estimate made
        // before loading; what was measured is what an unload frees), else declared, else what
        // free memory dropped by (blurred by anything else running, so it comes last).
        if (const std::uint64_t peak = guard_.profiles().get(slot.key()).peak_bytes; peak > 0) {
            loaded.bytes = peak;
        } else if (declared) {
            loaded.bytes = *declared;
        } else {
            const std::uint64_t free_after = guard_.probe().memory().free_bytes;
            loaded.bytes = free_before > free_after ? free_before - free_after : 0;
        }
        RegistryEvent event(RegistryEventKind::loaded, slot.name());
        event.bytes = loaded.bytes;
        event.took = std::chrono::duration_cast<std::chrono::milliseconds>(clock_() - start);
        publish(event);
        return loaded;
    }

    [[noreturn]] void throw_insufficient(detail::SlotBase& slot, const Room& room,
                                         Duration waited) {
        const Admission& admission = room.admission;
        const MemoryInfo& memory = admission.memory;
        const std::string message =
            "vramguard: cannot load model '" + slot.name() + "' (" + slot.key().describe() +
            "): " + refusal_reason(room) + ". Holding memory: " + holders_text(memory) +
            (room.peers.empty() ? "" : ". Peers asked: " + room.peers) + ". Waited " +
            detail::ms_text(waited) + " (load_wait " + detail::ms_text(options_.load_wait) +
            "); retry " + (room.loaded == 0 ? "when the other use shrinks." : "when a lease ends.");
        // Never a "can never fit": make_room calls such a load ready, and Guard::load rejects it.
        throw InsufficientMemory(admission.requirement.bytes, memory.free_bytes, memory.total_bytes,
                                 slot.key().describe(), guard_.options().retry_delay, message,
                                 false);
    }

    std::string refusal_reason(const Room& room) const {
        const Admission& admission = room.admission;
        const std::string cap = std::to_string(options_.max_loaded_models);
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
        const TimePoint now = clock_();
        std::uint64_t held = 0;
        for (const auto& other : slots()) {
            const ModelStatus status = detail::SlotAccess::status_at(*other, now);
            if (!status.loaded) continue;
            held = policy::saturating_add(held, status.bytes);
            text += "'" + status.name + "' " + format_bytes(status.bytes) + " (" +
                    (status.leases > 0 ? "busy, " + std::to_string(status.leases) +
                                             (status.leases == 1 ? " lease" : " leases")
                                       : "idle " + detail::seconds_text(status.idle_seconds)) +
                    "), ";
        }
        const std::uint64_t used = memory.used_bytes();
        return text + "other use (other processes, work outside the registry) " +
               format_bytes(used > held ? used - held : 0);
    }

    Guard<Probe>& guard_;
    const RegistryOptions options_;
    const ClockFn clock_;
    const SleepFn sleep_;

    mutable std::mutex mutex_;  // slots_ and last_relief_; never held while loading or waiting
    std::vector<std::shared_ptr<detail::SlotBase>> slots_;
    std::optional<TimePoint> last_relief_;
    detail::AtomicRegistryStats stats_;

    detail::PeerRelief peers_;
    const std::shared_ptr<std::mutex> relief_mutex_;  // one peer relief per device at a time

    std::mutex turn_mutex_;  // one load (decide, evict, ask peers, load) at a time
    std::atomic<std::thread::id> turn_owner_{};

    std::unique_ptr<detail::Reaper> reaper_;  // last: started once everything above exists
};

VRAMGUARD_END_NAMESPACE
