// SPDX-License-Identifier: MIT
// A counting semaphore for the single-item path: once batches are down to one item, concurrent
// callers on the same device take turns instead of OOMing each other. One per device, shared by
// every guard on it (shared_device_semaphore).
#pragma once

#include <vramguard/version.hpp>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#if VRAMGUARD_HAS_STD_SEMAPHORE
#include <semaphore>
#endif

VRAMGUARD_BEGIN_NAMESPACE

class Semaphore {
   public:
    explicit Semaphore(std::ptrdiff_t count) : count_(check(count)) {}
    Semaphore(const Semaphore&) = delete;
    Semaphore& operator=(const Semaphore&) = delete;

#if VRAMGUARD_HAS_STD_SEMAPHORE
    void acquire() { semaphore_.acquire(); }
    bool try_acquire() noexcept { return semaphore_.try_acquire(); }
    template <class Rep, class Period>
    bool try_acquire_for(const std::chrono::duration<Rep, Period>& timeout) {
        return semaphore_.try_acquire_for(timeout);
    }
    void release() { semaphore_.release(); }
#else
    void acquire() {
        std::unique_lock<std::mutex> lock(mutex_);
        available_.wait(lock, [&] { return count_ > 0; });
        --count_;
    }
    bool try_acquire() noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        if (count_ == 0) return false;
        --count_;
        return true;
    }
    template <class Rep, class Period>
    bool try_acquire_for(const std::chrono::duration<Rep, Period>& timeout) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (!available_.wait_for(lock, timeout, [&] { return count_ > 0; })) return false;
        --count_;
        return true;
    }
    void release() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            ++count_;
        }
        available_.notify_one();
    }
#endif

    // RAII: holds one permit until destroyed.
    class Permit {
       public:
        Permit() = default;
        explicit Permit(Semaphore& semaphore) : semaphore_(&semaphore) { semaphore.acquire(); }
        Permit(Permit&& other) noexcept : semaphore_(other.semaphore_) {
            other.semaphore_ = nullptr;
        }
        Permit& operator=(Permit&& other) noexcept {
            if (this != &other) {
                reset();
                semaphore_ = other.semaphore_;
                other.semaphore_ = nullptr;
            }
            return *this;
        }
        ~Permit() { reset(); }
        void reset() noexcept {
            if (semaphore_) semaphore_->release();
            semaphore_ = nullptr;
        }
        explicit operator bool() const noexcept { return semaphore_ != nullptr; }

       private:
        Semaphore* semaphore_ = nullptr;
    };

   private:
    static std::ptrdiff_t check(std::ptrdiff_t count) {
        if (count < 1) throw std::invalid_argument("vramguard::Semaphore: count must be >= 1");
        return count;
    }
#if VRAMGUARD_HAS_STD_SEMAPHORE
    std::ptrdiff_t count_;
    std::counting_semaphore<> semaphore_{count_};
#else
    std::ptrdiff_t count_;
    std::mutex mutex_;
    std::condition_variable available_;
#endif
};

// The semaphore of one device in this process: guards naming the same device get the same one
// (the first caller's count wins), and it lives while any of them does.
inline std::shared_ptr<Semaphore> shared_device_semaphore(const std::string& device,
                                                          std::ptrdiff_t count) {
    static std::mutex mutex;
    static std::map<std::string, std::weak_ptr<Semaphore>> semaphores;
    std::lock_guard<std::mutex> lock(mutex);
    auto& slot = semaphores[device];
    if (auto existing = slot.lock()) return existing;
    auto created = std::make_shared<Semaphore>(count);
    slot = created;
    return created;
}

VRAMGUARD_END_NAMESPACE
