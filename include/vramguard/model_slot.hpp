// SPDX-License-Identifier: MIT
// One model's lifecycle, independent of the device: ModelSlot<T> holds at most one loaded model
// and lends it out through leases (Lease<T>); its registry (models.hpp) decides when it may load
// and when it goes.
//
// Rules that hold everywhere here and in the slot's state machine (detail/slot_base.hpp):
// - A model is never unloaded while a lease on it is alive (checked under the slot's lock).
// - No lock is held while a user's loader runs or while a model is destroyed.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/detail/slot_base.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/model_status.hpp>
#include <vramguard/version.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

template <class T>
class Lease;
template <class T>
class ModelSlot;

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

VRAMGUARD_END_NAMESPACE
