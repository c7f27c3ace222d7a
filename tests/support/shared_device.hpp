// SPDX-License-Identifier: MIT
// A device budget in shared memory, for tests with real processes: every forked child reads and
// takes from the same bytes, so over-admission between processes shows up as a real (simulated)
// OOM and a peak above the device's size. POSIX.
#pragma once

#include <vramguard/errors.hpp>
#include <vramguard/memory.hpp>

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

namespace vramguard_test {

class SharedBudget {
   public:
    explicit SharedBudget(std::uint64_t total_bytes) {
        void* memory = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) throw std::runtime_error("mmap failed");
        shared_ = new (memory) Shared{};
        shared_->total = total_bytes;
    }
    SharedBudget(const SharedBudget&) = delete;
    SharedBudget& operator=(const SharedBudget&) = delete;
    ~SharedBudget() { ::munmap(shared_, sizeof(Shared)); }

    std::uint64_t total() const noexcept { return shared_->total; }
    std::uint64_t used() const noexcept { return shared_->used.load(); }
    // The most ever asked for at once (what was in use plus a request, fitting or not):
    // over-admission shows as a peak demand above total().
    std::uint64_t peak_demand() const noexcept { return shared_->peak_demand.load(); }
    std::uint64_t ooms() const noexcept { return shared_->ooms.load(); }

    // RAII bytes taken from the budget.
    class Allocation {
       public:
        Allocation() = default;
        Allocation(SharedBudget* budget, std::uint64_t bytes) : budget_(budget), bytes_(bytes) {}
        Allocation(Allocation&& other) noexcept : budget_(other.budget_), bytes_(other.bytes_) {
            other.budget_ = nullptr;
        }
        Allocation& operator=(Allocation&& other) noexcept {
            if (this != &other) {
                reset();
                budget_ = other.budget_;
                bytes_ = other.bytes_;
                other.budget_ = nullptr;
            }
            return *this;
        }
        Allocation(const Allocation&) = delete;
        Allocation& operator=(const Allocation&) = delete;
        ~Allocation() { reset(); }
        void reset() noexcept {
            if (budget_) budget_->shared_->used.fetch_sub(bytes_);
            budget_ = nullptr;
        }

       private:
        SharedBudget* budget_ = nullptr;
        std::uint64_t bytes_ = 0;
    };

    // Takes `bytes` or throws vramguard::OutOfMemory, as a device would.
    Allocation allocate(std::uint64_t bytes) {
        Shared& s = *shared_;
        std::uint64_t used = s.used.load();
        for (;;) {
            const std::uint64_t demand = used + bytes;
            std::uint64_t peak = s.peak_demand.load();
            while (demand > peak && !s.peak_demand.compare_exchange_weak(peak, demand)) {
            }
            if (demand > s.total) {
                s.ooms.fetch_add(1);
                throw vramguard::OutOfMemory("shared budget: out of memory allocating " +
                                             vramguard::format_bytes(bytes));
            }
            if (s.used.compare_exchange_weak(used, demand)) break;
        }
        return Allocation(this, bytes);
    }

    // The probe a Guard in any process reads.
    class Probe {
       public:
        explicit Probe(SharedBudget& budget) : budget_(budget) {}
        vramguard::MemoryInfo memory() const {
            const std::uint64_t used = budget_.used();
            return {budget_.total() > used ? budget_.total() - used : 0, budget_.total()};
        }
        void release_cached() {}

       private:
        SharedBudget& budget_;
    };

   private:
    struct Shared {
        std::uint64_t total = 0;
        std::atomic<std::uint64_t> used{0};
        std::atomic<std::uint64_t> peak_demand{0};
        std::atomic<std::uint64_t> ooms{0};
    };
    static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
                  "atomics shared between processes must be lock-free");

    Shared* shared_ = nullptr;
};

}  // namespace vramguard_test
