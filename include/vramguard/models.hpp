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
#include <vramguard/errors.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
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
    }
};

// What a registry has done, as plain counters.
struct RegistryStats {
    std::uint64_t loads = 0;                    // models loaded
    std::uint64_t load_failures = 0;            // acquire() calls whose load threw (any error)
    std::uint64_t evictions = 0;                // idle models unloaded to make room for a load
    std::uint64_t recoveries_seen = 0;          // eviction waits that saw the freed memory reported
    std::uint64_t recoveries_trusted = 0;       // ... that timed out and trusted the estimate
    std::uint64_t idle_unloads = 0;             // models unloaded after idle_timeout
    std::uint64_t requested_unloads = 0;        // request_unload()/unload() that unloaded
    std::uint64_t pressure_cache_releases = 0;  // release_cached() calls by pressure relief
    std::uint64_t pressure_unloads = 0;         // idle models unloaded by pressure relief
    std::uint64_t rejections = 0;               // loads refused with InsufficientMemory here
    std::uint64_t waits = 0;                    // loads that waited (load_wait) for room
};

enum class ModelState { unloaded, loading, loaded, unloading };

inline const char* to_string(ModelState state) noexcept {
    switch (state) {
        case ModelState::unloaded: return "unloaded";
        case ModelState::loading: return "loading";
        case ModelState::loaded: return "loaded";
        case ModelState::unloading: return "unloading";
    }
    return "?";
}

enum class UnloadOutcome {
    unloaded,    // it was loaded and idle long enough: its memory is given back
    busy,        // leased, being loaded, or idle for less than asked
    not_loaded,  // nothing to unload (or already on its way out)
};

inline const char* to_string(UnloadOutcome outcome) noexcept {
    switch (outcome) {
        case UnloadOutcome::unloaded: return "unloaded";
        case UnloadOutcome::busy: return "busy";
        case UnloadOutcome::not_loaded: return "not loaded";
    }
    return "?";
}

// The answer to request_unload(min_idle).
struct UnloadResult {
    UnloadOutcome outcome = UnloadOutcome::not_loaded;
    double idle_seconds = 0;  // since the last lease ended; 0 while leased or loading
    int leases = 0;           // alive when asked (busy because of them when > 0)
    std::uint64_t bytes = 0;  // what the model was counted as holding, when unloaded

    bool unloaded() const noexcept { return outcome == UnloadOutcome::unloaded; }
    bool busy() const noexcept { return outcome == UnloadOutcome::busy; }
};

// One model as status() saw it: what a status endpoint serialises.
struct ModelStatus {
    std::string name;
    std::string key;  // Key::hex(): 16 hex digits
    ModelState state = ModelState::unloaded;
    bool loaded = false;      // state == loaded
    std::uint64_t bytes = 0;  // counted as held (declared, else measured); 0 when not loaded
    double idle_seconds = 0;  // since the last lease ended; 0 while leased or not loaded
    int leases = 0;
};

struct RegistryStatus {
    std::vector<ModelStatus> models;  // in the order they were added
    std::size_t loaded_models = 0;
    std::size_t max_loaded_models = 0;
    MemoryInfo memory;  // the probe's reading
    RegistryStats stats;
};

// What one pressure-relief pass did.
struct PressureRelief {
    bool acted = false;         // usage was above pressure_threshold and the window was open
    bool rate_limited = false;  // usage was above it, but relief acted less than a window ago
    std::size_t unloaded = 0;   // idle models unloaded (only above aggressive_threshold)
    double usage_before = 0;
    double usage_after = 0;
};

template <class T>
class Lease;
template <class T>
class ModelSlot;
template <class Probe>
class ModelRegistry;

namespace detail {

class SlotBase;

// A loader with its model's type erased; the slot casts back.
using ErasedLoader = std::function<std::shared_ptr<void>()>;

struct LoadedModel {
    std::shared_ptr<void> model;
    std::uint64_t bytes = 0;
};

// The registry as a slot sees it: a slot never knows its registry's probe type, so users name
// ModelSlot<T> without naming the device.
class SlotOwner {
   public:
    // Loads the model and publishes it in the slot (SlotAccess::commit_load, with the loader's
    // lease) before the registry's turn ends, so that the next load counts it against the cap.
    // Returns the model, leased.
    virtual void* load_model(SlotBase& slot) = 0;
    // Whether the calling thread holds the registry's load turn (it runs a load or a loader).
    virtual bool holds_load_turn() const noexcept = 0;
    virtual void on_requested_unload(SlotBase& slot, const UnloadResult& result) noexcept = 0;

   protected:
    virtual ~SlotOwner() = default;
};

struct SlotSnapshot {
    ModelState state = ModelState::unloaded;
    int leases = 0;
    std::uint64_t bytes = 0;
    TimePoint last_used{};
    std::uint64_t uses = 0;  // leases ever taken: tells an eviction that the model was used since
};

// The state machine of one slot, independent of the model's type.
//   unloaded -> loading (one acquire() runs the load; the others wait for it)
//   loading  -> loaded (with the loader's lease) | unloaded (the load threw)
//   loaded   -> unloading (only at zero leases) -> unloaded
class SlotBase : public std::enable_shared_from_this<SlotBase> {
   public:
    SlotBase(const SlotBase&) = delete;
    SlotBase& operator=(const SlotBase&) = delete;
    virtual ~SlotBase() = default;

    const std::string& name() const noexcept { return name_; }
    const Key& key() const noexcept { return key_; }
    const std::optional<std::uint64_t>& declared_bytes() const noexcept { return declared_bytes_; }

    ModelState state() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return state_;
    }
    bool loaded() const { return state() == ModelState::loaded; }
    int leases() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return leases_;
    }
    // Bytes the loaded model is counted as holding (declared, else measured); 0 when not loaded.
    std::uint64_t bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return state_ == ModelState::loaded ? bytes_ : 0;
    }
    // Seconds since the last lease ended; 0 while leased or not loaded.
    double idle_seconds() const { return status().idle_seconds; }
    ModelStatus status() const { return status_at(clock_()); }

    // Unloads the model if it is loaded, not leased and idle for at least `min_idle`. Otherwise
    // says why not: busy (leased, loading, or idle for less; with the idle seconds) or not loaded.
    UnloadResult request_unload(Duration min_idle = Duration::zero()) {
        SlotOwner* owner = nullptr;
        const UnloadResult result = try_unload(clock_(), min_idle, std::nullopt, &owner);
        if (result.unloaded() && owner != nullptr) owner->on_requested_unload(*this, result);
        return result;
    }
    // request_unload() with no idle minimum: unloads unless a lease (or a load) is in progress.
    UnloadResult unload() { return request_unload(Duration::zero()); }

   protected:
    SlotBase(std::string name, Key key, std::optional<std::uint64_t> declared_bytes,
             ErasedLoader loader, SlotOwner* owner, ClockFn clock)
        : name_(std::move(name)),
          key_(std::move(key)),
          declared_bytes_(declared_bytes),
          loader_(std::move(loader)),
          clock_(std::move(clock)),
          owner_(owner) {}

    // Takes a lease, loading the model first when absent. When several threads acquire an absent
    // model at once, one runs the load and the others wait for it; if that load throws, every
    // waiter of that load gets the same exception (a load that just failed would most likely fail
    // again, and N sequential failures would cost N loader calls and N rejections).
    void* acquire_lease() {
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            if (state_ == ModelState::loaded) {
                ++leases_;
                ++uses_;
                return model_.get();
            }
            // A loader (this thread holds its registry's turn) that needs an absent model: its
            // load needs that turn too, so waiting for it would wait for ever.
            if (state_ != ModelState::unloading && owner_ != nullptr && owner_->holds_load_turn())
                throw std::logic_error(
                    "vramguard::ModelRegistry: the loader of a model acquired model '" + name_ +
                    "', which is not loaded (" + to_string(state_) +
                    "): loads take turns, so it would wait for itself. Acquire it before, not "
                    "inside, the loader.");
            if (state_ == ModelState::loading || state_ == ModelState::unloading) {
                const bool waiting_for_load = state_ == ModelState::loading;
                const std::uint64_t generation = load_generation_;
                cv_.wait(lock, [&] {
                    return state_ == ModelState::loaded || state_ == ModelState::unloaded;
                });
                if (waiting_for_load && state_ == ModelState::unloaded &&
                    failed_generation_ == generation)
                    std::rethrow_exception(last_error_);
                continue;
            }
            // Unloaded: this thread loads.
            if (owner_ == nullptr)
                throw std::logic_error("vramguard::ModelSlot::acquire: model '" + name_ +
                                       "' belongs to a ModelRegistry that no longer exists");
            SlotOwner* owner = owner_;
            state_ = ModelState::loading;
            const std::uint64_t generation = ++load_generation_;
            lock.unlock();
            try {
                return owner->load_model(*this);  // published by commit_load
            } catch (...) {
                lock.lock();
                state_ = ModelState::unloaded;
                failed_generation_ = generation;
                last_error_ = std::current_exception();
                cv_.notify_all();
                throw;
            }
        }
    }

   private:
    friend struct SlotAccess;

    // The loaded model, with the loader's lease: the slot counts as loaded from here on.
    void* commit_load(LoadedModel loaded, TimePoint now) {
        std::lock_guard<std::mutex> lock(mutex_);
        model_ = std::move(loaded.model);
        bytes_ = loaded.bytes;
        last_error_ = nullptr;  // nobody waits for that failure any more
        last_used_ = now;
        state_ = ModelState::loaded;
        ++leases_;
        ++uses_;
        cv_.notify_all();
        return model_.get();
    }

    void end_lease() noexcept {
        TimePoint now{};
        try {
            now = clock_();
        } catch (...) {
            now = TimePoint{};  // a clock that throws makes the model look long idle, nothing worse
        }
        std::shared_ptr<void> orphan;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (--leases_ > 0) return;
            last_used_ = std::max(last_used_, now);
            // The registry is gone: nobody else will ever unload this model, so the last lease
            // does.
            if (owner_ == nullptr && state_ == ModelState::loaded) {
                orphan = std::move(model_);
                bytes_ = 0;
                state_ = ModelState::unloaded;
            }
        }
    }

    SlotSnapshot snapshot() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return {state_, leases_, state_ == ModelState::loaded ? bytes_ : 0, last_used_, uses_};
    }

    ModelStatus status_at(TimePoint now) const {
        ModelStatus status;
        status.name = name_;
        status.key = key_.hex();
        std::lock_guard<std::mutex> lock(mutex_);
        status.state = state_;
        status.loaded = state_ == ModelState::loaded;
        status.leases = leases_;
        if (status.loaded) {
            status.bytes = bytes_;
            if (leases_ == 0 && now > last_used_)
                status.idle_seconds = to_seconds(now - last_used_);
        }
        return status;
    }

    // The one way a model leaves: under the lock it checks the rules and marks the slot unloading
    // (so no lease can start), then drops the model outside the lock (a destructor that frees GPU
    // memory may take a while), then marks it unloaded and wakes acquire()s waiting to reload it.
    // `expected_uses`: unload only if no lease was taken since the caller looked (an eviction's
    // least-recently-used choice is stale otherwise).
    UnloadResult try_unload(TimePoint now, Duration min_idle,
                            std::optional<std::uint64_t> expected_uses,
                            SlotOwner** owner_out = nullptr, bool* still_referenced = nullptr) {
        UnloadResult result;
        std::shared_ptr<void> doomed;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (owner_out != nullptr) *owner_out = owner_;
            result.leases = leases_;
            if (state_ == ModelState::loading) {
                result.outcome = UnloadOutcome::busy;
                return result;
            }
            if (state_ != ModelState::loaded) {
                result.outcome = UnloadOutcome::not_loaded;
                return result;
            }
            if (leases_ > 0) {
                result.outcome = UnloadOutcome::busy;
                return result;
            }
            const Duration idle = now > last_used_ ? now - last_used_ : Duration::zero();
            result.idle_seconds = to_seconds(idle);
            if (idle < min_idle || (expected_uses && *expected_uses != uses_)) {
                result.outcome = UnloadOutcome::busy;
                return result;
            }
            result.outcome = UnloadOutcome::unloaded;
            result.bytes = bytes_;
            state_ = ModelState::unloading;
            doomed = std::move(model_);
        }
        // A copy the loader kept elsewhere keeps the memory: the registry logs it.
        if (still_referenced != nullptr) *still_referenced = doomed.use_count() > 1;
        doomed.reset();
        std::lock_guard<std::mutex> lock(mutex_);
        bytes_ = 0;
        state_ = ModelState::unloaded;
        cv_.notify_all();
        return result;
    }

    // The registry is going away: idle models go now, leased ones when their last lease ends.
    void detach() noexcept {
        std::shared_ptr<void> doomed;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            owner_ = nullptr;
            if (state_ != ModelState::loaded || leases_ > 0) return;
            doomed = std::move(model_);
            bytes_ = 0;
            state_ = ModelState::unloaded;
        }
    }

    const std::string name_;
    const Key key_;
    const std::optional<std::uint64_t> declared_bytes_;
    const ErasedLoader loader_;
    const ClockFn clock_;

    mutable std::mutex mutex_;
    std::condition_variable cv_;
    SlotOwner* owner_;
    ModelState state_ = ModelState::unloaded;
    int leases_ = 0;
    std::uint64_t uses_ = 0;
    std::uint64_t bytes_ = 0;
    TimePoint last_used_{};
    std::shared_ptr<void> model_;
    std::uint64_t load_generation_ = 0;
    std::uint64_t failed_generation_ = 0;
    std::exception_ptr last_error_;
};

// The registry's and the lease's way in to what a slot keeps private from its users.
struct SlotAccess {
    static void end_lease(SlotBase& slot) noexcept { slot.end_lease(); }
    static SlotSnapshot snapshot(const SlotBase& slot) { return slot.snapshot(); }
    static ModelStatus status_at(const SlotBase& slot, TimePoint now) {
        return slot.status_at(now);
    }
    static const ErasedLoader& loader(const SlotBase& slot) { return slot.loader_; }
    static void* commit_load(SlotBase& slot, LoadedModel loaded, TimePoint now) {
        return slot.commit_load(std::move(loaded), now);
    }
    static UnloadResult try_unload(SlotBase& slot, TimePoint now, Duration min_idle,
                                   std::optional<std::uint64_t> expected_uses,
                                   bool* still_referenced) {
        return slot.try_unload(now, min_idle, expected_uses, nullptr, still_referenced);
    }
    static void detach(SlotBase& slot) noexcept { slot.detach(); }
};

// Passkey: only the registry makes slots, through std::make_shared.
struct SlotPasskey {
    explicit SlotPasskey() = default;
};

}  // namespace detail

// A model lent out: the model stays loaded while any lease on it is alive. Move-only. A lease keeps
// its slot alive, so it may outlive the registry (the model is unloaded when it ends then).
template <class T>
class Lease {
   public:
    Lease() = default;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&& other) noexcept
        : slot_(std::move(other.slot_)), model_(std::exchange(other.model_, nullptr)) {}
    Lease& operator=(Lease&& other) noexcept {
        if (this != &other) {
            release();
            slot_ = std::move(other.slot_);
            model_ = std::exchange(other.model_, nullptr);
        }
        return *this;
    }
    ~Lease() { release(); }

    T& operator*() const noexcept { return *model_; }
    T* operator->() const noexcept { return model_; }
    T* get() const noexcept { return model_; }
    explicit operator bool() const noexcept { return model_ != nullptr; }

    // Ends the lease now (the model becomes idle when it was the last one); the lease becomes
    // empty.
    void release() noexcept {
        if (!slot_) return;
        model_ = nullptr;
        detail::SlotAccess::end_lease(*slot_);
        slot_.reset();
    }

   private:
    friend class ModelSlot<T>;
    Lease(std::shared_ptr<detail::SlotBase> slot, T* model) noexcept
        : slot_(std::move(slot)), model_(model) {}

    std::shared_ptr<detail::SlotBase> slot_;
    T* model_ = nullptr;
};

// At most one loaded model of type T, made by its registry (ModelRegistry::add).
template <class T>
class ModelSlot : public detail::SlotBase {
   public:
    ModelSlot(detail::SlotPasskey, std::string name, Key key,
              std::optional<std::uint64_t> declared_bytes, detail::ErasedLoader loader,
              detail::SlotOwner* owner, ClockFn clock)
        : SlotBase(std::move(name), std::move(key), declared_bytes, std::move(loader), owner,
                   std::move(clock)) {}

    // A lease on the model, loading it through the registry (admission, eviction, Guard::load)
    // when absent. Throws what the load threw: InsufficientMemory, OomExhausted, the loader's own.
    Lease<T> acquire() {
        T* model = static_cast<T*>(acquire_lease());
        return Lease<T>(shared_from_this(), model);
    }
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
template <class Probe>
class ModelRegistry : private detail::SlotOwner {
   public:
    explicit ModelRegistry(Guard<Probe>& guard, RegistryOptions options = {})
        : guard_(guard),
          options_((options.validate(), std::move(options))),
          clock_(options_.clock ? options_.clock : guard.options().clock),
          sleep_(options_.sleep ? options_.sleep : guard.options().sleep) {
        if (options_.reaper) reaper_ = std::thread([this] { reaper_loop(); });
    }

    ModelRegistry(const ModelRegistry&) = delete;
    ModelRegistry& operator=(const ModelRegistry&) = delete;

    // Stops the reaper (at once), then unloads every idle model; a leased one goes when its last
    // lease ends. No call into the registry may still be running.
    ~ModelRegistry() {
        if (reaper_.joinable()) {
            {
                std::lock_guard<std::mutex> lock(reaper_mutex_);
                reaper_stop_ = true;
            }
            reaper_cv_.notify_all();
            reaper_.join();
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
    // device) and, when given, what it is counted as holding once loaded (else the measured peak).
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
    UnloadResult request_unload(std::string_view name, Duration min_idle = Duration::zero()) {
        for (const auto& slot : slots())
            if (slot->name() == name) return slot->request_unload(min_idle);
        throw std::out_of_range("vramguard::ModelRegistry::request_unload: no model named '" +
                                std::string(name) + "'");
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
                *slot, now, options_.idle_timeout, std::nullopt, &still_referenced);
            if (!result.unloaded()) continue;
            ++count;
            bump(stats_.idle_unloads);
            log(Level::info, "unloaded model '" + slot->name() + "' (" +
                                 format_bytes(result.bytes) + ") after " +
                                 seconds_text(result.idle_seconds) + " idle (idle_timeout " +
                                 ms_text(options_.idle_timeout) + ")");
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
        if (relief.usage_before <= options_.pressure_threshold) return relief;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (last_relief_ && now - *last_relief_ < options_.pressure_rate_limit) {
                relief.rate_limited = true;
                return relief;
            }
            last_relief_ = now;
        }
        relief.acted = true;
        guard_.probe().release_cached();
        bump(stats_.pressure_cache_releases);
        const MemoryInfo after_cache = guard_.probe().memory();
        // INFO: emptying the cache is routine and cheap; unloading a model (below) is WARN.
        log(Level::info, "memory pressure: " + detail::percent(before.usage()) + " of " +
                             format_bytes(before.total_bytes) + " in use (pressure_threshold " +
                             detail::percent(options_.pressure_threshold) +
                             "); released the allocator cache, now " +
                             detail::percent(after_cache.usage()));
        if (after_cache.usage() > options_.aggressive_threshold) {
            std::uint64_t used = after_cache.used_bytes();
            const std::uint64_t target =
                policy::scale_bytes(after_cache.total_bytes, options_.aggressive_threshold);
            for (const Candidate& candidate : evictable(nullptr)) {
                if (used <= target) break;
                bool still_referenced = false;
                const UnloadResult result = detail::SlotAccess::try_unload(
                    *candidate.slot, now, Duration::zero(), candidate.seen.uses, &still_referenced);
                if (!result.unloaded()) continue;
                used = used > result.bytes ? used - result.bytes : 0;
                ++relief.unloaded;
                bump(stats_.pressure_unloads);
                log(Level::warn, "memory pressure: still " + detail::percent(after_cache.usage()) +
                                     " in use (aggressive_threshold " +
                                     detail::percent(options_.aggressive_threshold) +
                                     "); unloaded idle model '" + candidate.slot->name() + "' (" +
                                     format_bytes(result.bytes) + ", idle " +
                                     seconds_text(result.idle_seconds) + ")");
                warn_if_referenced(*candidate.slot, still_referenced);
            }
            if (relief.unloaded > 0) guard_.probe().release_cached();
        }
        relief.usage_after = guard_.probe().memory().usage();
        return relief;
    }

    // A snapshot for a status endpoint: every model (loaded or not), the device, the counters.
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
        return status;
    }

    RegistryStats stats() const noexcept {
        const auto r = std::memory_order_relaxed;
        RegistryStats s;
        s.loads = stats_.loads.load(r);
        s.load_failures = stats_.load_failures.load(r);
        s.evictions = stats_.evictions.load(r);
        s.recoveries_seen = stats_.recoveries_seen.load(r);
        s.recoveries_trusted = stats_.recoveries_trusted.load(r);
        s.idle_unloads = stats_.idle_unloads.load(r);
        s.requested_unloads = stats_.requested_unloads.load(r);
        s.pressure_cache_releases = stats_.pressure_cache_releases.load(r);
        s.pressure_unloads = stats_.pressure_unloads.load(r);
        s.rejections = stats_.rejections.load(r);
        s.waits = stats_.waits.load(r);
        return s;
    }
    const RegistryOptions& options() const noexcept { return options_; }
    Guard<Probe>& guard() noexcept { return guard_; }

   private:
    // Relaxed atomics: counters are for reading, not for synchronising.
    struct AtomicRegistryStats {
        std::atomic<std::uint64_t> loads{0}, load_failures{0}, evictions{0}, recoveries_seen{0},
            recoveries_trusted{0}, idle_unloads{0}, requested_unloads{0},
            pressure_cache_releases{0}, pressure_unloads{0}, rejections{0}, waits{0};
    };
    struct Candidate {
        std::shared_ptr<detail::SlotBase> slot;
        detail::SlotSnapshot seen;
    };
    // What one look at the device decided.
    struct Room {
        bool ready = false;
        std::uint64_t trusted_bytes = 0;  // freed by evictions, not yet reported: trusted
        Admission admission;
        std::size_t loaded = 0;
        bool at_cap = false;
        bool evicting_cannot_help = false;
    };

    static void bump(std::atomic<std::uint64_t>& counter) noexcept {
        counter.fetch_add(1, std::memory_order_relaxed);
    }
    void log(Level level, const std::string& message) const {
        detail::emit(guard_.options().log, level, message);
    }
    static std::string seconds_text(double seconds) {
        char text[32];
        std::snprintf(text, sizeof text, "%.1f s", seconds);
        return text;
    }
    static std::string ms_text(Duration d) {
        return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) +
               " ms";
    }
    void warn_if_referenced(const detail::SlotBase& slot, bool still_referenced) const {
        if (still_referenced)
            log(Level::warn, "model '" + slot.name() +
                                 "' was unloaded but something else still holds a copy of it, so "
                                 "its memory is not free; the loader should hand over ownership");
    }

    std::vector<std::shared_ptr<detail::SlotBase>> slots() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return slots_;
    }

    // Loaded, unleased models other than `except`, least recently used first.
    std::vector<Candidate> evictable(const detail::SlotBase* except) const {
        std::vector<Candidate> candidates;
        for (const auto& slot : slots()) {
            if (slot.get() == except) continue;
            const detail::SlotSnapshot seen = detail::SlotAccess::snapshot(*slot);
            if (seen.state == ModelState::loaded && seen.leases == 0)
                candidates.push_back({slot, seen});
        }
        std::stable_sort(candidates.begin(), candidates.end(),
                         [](const Candidate& a, const Candidate& b) {
                             return a.seen.last_used < b.seen.last_used;
                         });
        return candidates;
    }

    std::size_t loaded_count(const detail::SlotBase* except) const {
        std::size_t count = 0;
        for (const auto& slot : slots())
            if (slot.get() != except &&
                detail::SlotAccess::snapshot(*slot).state == ModelState::loaded)
                ++count;
        return count;
    }

    // ---- SlotOwner ---------------------------------------------------------------------------

    void* load_model(detail::SlotBase& slot) override {
        try {
            return load_with_room(slot);
        } catch (...) {
            bump(stats_.load_failures);
            throw;
        }
    }

    bool holds_load_turn() const noexcept override {
        return turn_owner_.load(std::memory_order_acquire) == std::this_thread::get_id();
    }

    void on_requested_unload(detail::SlotBase& slot, const UnloadResult& result) noexcept override {
        bump(stats_.requested_unloads);
        try {
            log(Level::info, "unloaded model '" + slot.name() + "' (" + format_bytes(result.bytes) +
                                 ") on request, idle " + seconds_text(result.idle_seconds));
            guard_.probe().release_cached();
        } catch (...) {
        }
    }

    // ---- loading -----------------------------------------------------------------------------

    void* load_with_room(detail::SlotBase& slot) {
        const TimePoint start = clock_();
        const TimePoint deadline = start + options_.load_wait;
        bool waited = false;
        for (;;) {
            Room room;
            {
                std::lock_guard<std::mutex> turn(turn_mutex_);
                turn_owner_.store(std::this_thread::get_id(), std::memory_order_release);
                struct ClearOwner {
                    std::atomic<std::thread::id>& owner;
                    ~ClearOwner() { owner.store(std::thread::id(), std::memory_order_release); }
                } clear_owner{turn_owner_};
                room = make_room(slot);
                if (room.ready) {
                    detail::LoadedModel loaded = run_loader(slot, room.trusted_bytes);
                    // Published before the turn ends: the next load counts it against the cap.
                    return detail::SlotAccess::commit_load(slot, std::move(loaded), clock_());
                }
            }
            const TimePoint now = clock_();
            if (now >= deadline) {
                bump(stats_.rejections);
                throw_insufficient(slot, room, now - start);
            }
            if (!waited) {
                waited = true;
                bump(stats_.waits);
                log(Level::info,
                    "load of model '" + slot.name() + "' waits up to " +
                        ms_text(options_.load_wait) +
                        " for a lease to end or memory to "
                        "free (" +
                        (room.at_cap ? "max_loaded_models reached" : "not enough free memory") +
                        ", no idle model to evict)");
            }
            sleep_(std::min<Duration>(guard_.options().poll_interval, deadline - now));
        }
    }

    // Evicts idle models, least recently used first, until the load is admitted and under the cap.
    // Ready also when the model could never fit: then Guard::load says so with its own numbers,
    // and nothing was evicted for nothing.
    Room make_room(detail::SlotBase& slot) {
        Room room;
        const double margin = guard_.options().safety_margin;
        for (;;) {
            room.admission = guard_.admission(slot.key(), slot.declared_bytes());
            const MemoryInfo& memory = room.admission.memory;
            const std::uint64_t required = room.admission.requirement.bytes;
            if (!policy::can_ever_fit(required, memory.total_bytes, margin)) {
                room.ready = true;
                room.trusted_bytes = 0;
                return room;
            }
            const bool fits =
                room.admission.admitted ||
                (room.trusted_bytes > 0 &&
                 policy::admits(required,
                                {policy::saturating_add(memory.free_bytes, room.trusted_bytes),
                                 memory.total_bytes},
                                margin));
            if (room.admission.admitted) room.trusted_bytes = 0;
            room.loaded = loaded_count(&slot);
            room.at_cap = room.loaded >= options_.max_loaded_models;
            if (fits && !room.at_cap) {
                room.ready = true;
                return room;
            }
            const std::vector<Candidate> candidates = evictable(&slot);
            if (candidates.empty()) return room;
            if (!room.at_cap) {
                // Evicting every idle model would not make room: keep them (a model whose size is
                // unknown might, so it counts as big enough).
                std::uint64_t reachable =
                    policy::saturating_add(memory.free_bytes, room.trusted_bytes);
                for (const Candidate& candidate : candidates)
                    reachable = candidate.seen.bytes == 0
                                    ? std::numeric_limits<std::uint64_t>::max()
                                    : policy::saturating_add(reachable, candidate.seen.bytes);
                if (!policy::admits(required, {reachable, memory.total_bytes}, margin)) {
                    room.evicting_cannot_help = true;
                    return room;
                }
            }
            evict(slot, candidates.front(), room, fits);
        }
    }

    void evict(detail::SlotBase& for_slot, const Candidate& victim, Room& room, bool memory_fits) {
        const std::uint64_t free_before = guard_.probe().memory().free_bytes;
        bool still_referenced = false;
        const UnloadResult result = detail::SlotAccess::try_unload(
            *victim.slot, clock_(), Duration::zero(), victim.seen.uses, &still_referenced);
        if (!result.unloaded()) return;  // a lease came first: decide again
        guard_.probe().release_cached();
        bump(stats_.evictions);
        log(Level::info,
            "evicted idle model '" + victim.slot->name() + "' (" + format_bytes(result.bytes) +
                ", idle " + seconds_text(result.idle_seconds) +
                ", least recently used) to make room for '" + for_slot.name() + "'" +
                (room.at_cap ? " (max_loaded_models " + std::to_string(options_.max_loaded_models) +
                                   " reached)"
                             : ""));
        warn_if_referenced(*victim.slot, still_referenced);
        if (memory_fits || result.bytes == 0)
            return;  // only the cap was in the way: nothing to wait for
        // The driver reports freed memory late: wait until it shows (or enough is free), else trust
        // the estimate, as Ollama does.
        const std::uint64_t needed =
            policy::saturating_add(room.admission.requirement.bytes, room.admission.margin_bytes);
        const TimePoint start = clock_();
        if (guard_.wait_for_freed_memory(result.bytes, free_before, needed)) {
            bump(stats_.recoveries_seen);
            log(Level::info, "memory freed by unloading '" + victim.slot->name() +
                                 "' reported after " + ms_text(clock_() - start));
        } else {
            bump(stats_.recoveries_trusted);
            room.trusted_bytes = policy::saturating_add(room.trusted_bytes, result.bytes);
            log(Level::warn, "the device did not report " +
                                 detail::percent(guard_.options().recovery_fraction) + " of the " +
                                 format_bytes(result.bytes) + " freed by unloading '" +
                                 victim.slot->name() + "' within " + ms_text(clock_() - start) +
                                 "; trusting the estimate");
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
        // What the model holds: declared, else the guard's measured peak, else what free memory
        // dropped by (the last is blurred by anything else running, so it comes last).
        if (declared) {
            loaded.bytes = *declared;
        } else if (const std::uint64_t peak = guard_.profiles().get(slot.key()).peak_bytes;
                   peak > 0) {
            loaded.bytes = peak;
        } else {
            const std::uint64_t free_after = guard_.probe().memory().free_bytes;
            loaded.bytes = free_before > free_after ? free_before - free_after : 0;
        }
        bump(stats_.loads);
        log(Level::info, "loaded model '" + slot.name() + "' (" + format_bytes(loaded.bytes) +
                             ") in " + ms_text(clock_() - start));
        return loaded;
    }

    [[noreturn]] void throw_insufficient(detail::SlotBase& slot, const Room& room,
                                         Duration waited) {
        const Admission& admission = room.admission;
        const MemoryInfo& memory = admission.memory;
        std::string message =
            "vramguard: cannot load model '" + slot.name() + "' (" + slot.key().describe() + "): ";
        if (room.at_cap && admission.admitted) {
            message += std::to_string(room.loaded) + " models are loaded (max_loaded_models " +
                       std::to_string(options_.max_loaded_models) + ") and none of them is idle";
        } else {
            message += "it needs " + format_bytes(admission.requirement.bytes) + " (" +
                       policy::to_string(admission.requirement.source) +
                       ") plus a safety margin of " + format_bytes(admission.margin_bytes) +
                       ", but only " + format_bytes(memory.free_bytes) + " of " +
                       format_bytes(memory.total_bytes) + " is free, and ";
            message += room.evicting_cannot_help
                           ? "unloading every idle model would not free enough"
                       : room.loaded == 0 ? "no other model is loaded to unload"
                                          : "no loaded model is idle";
            if (room.at_cap)
                message += " (max_loaded_models " + std::to_string(options_.max_loaded_models) +
                           " reached)";
        }
        message += ". Holding memory: ";
        const TimePoint now = clock_();
        std::uint64_t held = 0;
        bool any = false;
        for (const auto& other : slots()) {
            const ModelStatus status = detail::SlotAccess::status_at(*other, now);
            if (!status.loaded) continue;
            held = policy::saturating_add(held, status.bytes);
            message += std::string(any ? ", " : "") + "'" + status.name + "' " +
                       format_bytes(status.bytes) + " (" +
                       (status.leases > 0 ? "busy, " + std::to_string(status.leases) +
                                                (status.leases == 1 ? " lease" : " leases")
                                          : "idle " + seconds_text(status.idle_seconds)) +
                       ")";
            any = true;
        }
        const std::uint64_t used = memory.used_bytes();
        message += std::string(any ? ", " : "") +
                   "other use (other processes, work outside the registry) " +
                   format_bytes(used > held ? used - held : 0) + ". Waited " + ms_text(waited) +
                   " (load_wait " + ms_text(options_.load_wait) + "); retry " +
                   (room.loaded == 0 ? "when the other use shrinks." : "when a lease ends.");
        // Never a "can never fit": make_room calls such a load ready, and Guard::load rejects it.
        throw InsufficientMemory(admission.requirement.bytes, memory.free_bytes, memory.total_bytes,
                                 slot.key().describe(), guard_.options().retry_delay, message,
                                 false);
    }

    // ---- reaper ------------------------------------------------------------------------------

    void reaper_loop() {
        std::unique_lock<std::mutex> lock(reaper_mutex_);
        while (!reaper_stop_) {
            if (reaper_cv_.wait_for(lock, options_.reaper_interval,
                                    [this] { return reaper_stop_; }))
                break;
            lock.unlock();
            try {
                tick(clock_());
            } catch (const std::exception& e) {
                log(Level::warn, std::string("model reaper: tick failed: ") + e.what());
            } catch (...) {
                log(Level::warn, "model reaper: tick failed with an unknown exception");
            }
            lock.lock();
        }
    }

    Guard<Probe>& guard_;
    const RegistryOptions options_;
    const ClockFn clock_;
    const SleepFn sleep_;

    mutable std::mutex mutex_;  // slots_ and last_relief_; never held while loading or waiting
    std::vector<std::shared_ptr<detail::SlotBase>> slots_;
    std::optional<TimePoint> last_relief_;
    AtomicRegistryStats stats_;

    std::mutex turn_mutex_;  // one load (decide, evict, load) at a time
    std::atomic<std::thread::id> turn_owner_{};

    std::mutex reaper_mutex_;
    std::condition_variable reaper_cv_;
    bool reaper_stop_ = false;
    std::thread reaper_;  // last: started once everything above exists
};

VRAMGUARD_END_NAMESPACE
