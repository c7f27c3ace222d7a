// SPDX-License-Identifier: MIT
// The state machine of one model slot with the model's type erased (SlotBase), and the seams the
// registry and the leases use to reach it (SlotOwner, SlotAccess). ModelSlot<T> (model_slot.hpp)
// derives from SlotBase, so users name ModelSlot<T> without naming the device.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/key.hpp>
#include <vramguard/model_status.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

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
    // Bytes the loaded model is counted as holding (measured, else declared); 0 when not loaded.
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
    // again, and N sequential failures would cost N loader calls and N rejections), even when it
    // wakes only after other loads and unloads have come and gone.
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
            if (state_ == ModelState::loading) {
                const std::shared_ptr<LoadAttempt> attempt = load_attempt_;
                cv_.wait(lock, [&] { return attempt->done; });
                if (attempt->error) std::rethrow_exception(attempt->error);
                continue;
            }
            if (state_ == ModelState::unloading) {
                cv_.wait(lock, [&] { return state_ != ModelState::unloading; });
                continue;
            }
            // Unloaded: this thread loads.
            if (owner_ == nullptr)
                throw std::logic_error("vramguard::ModelSlot::acquire: model '" + name_ +
                                       "' belongs to a ModelRegistry that no longer exists");
            return load_here(lock);
        }
    }

   private:
    friend struct SlotAccess;

    // One load and whoever waits for it: its outcome stays with it, not with the slot, which may
    // have seen other loads and unloads by the time a waiter wakes.
    struct LoadAttempt {
        bool done = false;
        std::exception_ptr error;  // what the load threw (null: it committed)
    };

    // Runs the load with the slot marked loading (`lock` held on entry, released during the load).
    void* load_here(std::unique_lock<std::mutex>& lock) {
        auto attempt = std::make_shared<LoadAttempt>();
        SlotOwner* owner = owner_;
        state_ = ModelState::loading;
        load_attempt_ = attempt;
        lock.unlock();
        try {
            return owner->load_model(*this);  // published by commit_load
        } catch (...) {
            lock.lock();
            state_ = ModelState::unloaded;
            attempt->error = std::current_exception();
            attempt->done = true;
            cv_.notify_all();
            throw;
        }
    }

    // The loaded model, with the loader's lease: the slot counts as loaded from here on.
    void* commit_load(LoadedModel loaded, TimePoint now) {
        std::lock_guard<std::mutex> lock(mutex_);
        model_ = std::move(loaded.model);
        bytes_ = loaded.bytes;
        if (load_attempt_) load_attempt_->done = true;
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
    std::shared_ptr<LoadAttempt> load_attempt_;  // the load in progress, or the last one
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

VRAMGUARD_END_NAMESPACE
