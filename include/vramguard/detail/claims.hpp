// SPDX-License-Identifier: MIT
// Claims: what the guard's chunks in flight have planned and the reading may not show yet, so that
// chunks planned at once do not plan for the same free bytes (policy::free_for_plan says how the
// reading is read against them). Planners take turns in arrival order under one lock: the reading
// is taken, the plan made and the claim registered as one step, and a planner that waits for a
// claim to end (policy::run_or_wait) keeps its place at the head, so the memory that comes back is
// its first. A planner inside another run of the guard, or holding the guard for itself, neither
// queues nor waits: what it waits for could be its own run.
#pragma once

#include <vramguard/memory.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

class Claims {
   public:
    // A claim for a chunk whose cost is unknown: every other plan sees nothing free until it ends.
    static constexpr std::uint64_t whole_device = std::uint64_t{1} << 62;

    // The bytes one chunk claimed, given back when it ends (or earlier, by release()).
    class Claim {
       public:
        Claim() = default;
        Claim(Claim&& other) noexcept
            : owner_(std::exchange(other.owner_, nullptr)),
              bytes_(std::exchange(other.bytes_, 0)) {}
        Claim& operator=(Claim&& other) noexcept {
            if (this != &other) {
                release();
                owner_ = std::exchange(other.owner_, nullptr);
                bytes_ = std::exchange(other.bytes_, 0);
            }
            return *this;
        }
        ~Claim() { release(); }
        void release() noexcept {
            if (owner_ != nullptr) std::exchange(owner_, nullptr)->give_back(bytes_);
        }
        std::uint64_t bytes() const noexcept { return owner_ != nullptr ? bytes_ : 0; }

       private:
        friend class Claims;
        Claim(Claims* owner, std::uint64_t bytes) noexcept : owner_(owner), bytes_(bytes) {}
        Claims* owner_ = nullptr;
        std::uint64_t bytes_ = 0;
    };

    // One planner's turn: holds the lock from the reading to the claim. `queued`: takes its turn
    // in arrival order (and may wait); otherwise it plans at once and never waits.
    class Turn {
       public:
        Turn(Claims& claims, bool queued) : claims_(claims), lock_(claims.mutex_), queued_(queued) {
            if (!queued_) return;
            const std::uint64_t ticket = claims_.next_ticket_++;
            if (claims_.serving_ != ticket) {
                claims_.waiting_.fetch_add(1);
                claims_.changed_.wait(lock_, [&] { return claims_.serving_ == ticket; });
                claims_.waiting_.fetch_sub(1);
            }
        }
        ~Turn() {
            if (!queued_) return;
            ++claims_.serving_;
            const bool someone_waits = claims_.waiting_.load() != 0;
            lock_.unlock();
            if (someone_waits) claims_.changed_.notify_all();
        }
        Turn(const Turn&) = delete;
        Turn& operator=(const Turn&) = delete;

        // The free memory a plan may count on, from the probe's reading `free_now` (taken while
        // this turn is held, so every claim registered before it is in the sum).
        std::uint64_t available(std::uint64_t free_now) noexcept {
            const std::uint64_t claimed = claims_.claimed_.load();
            claims_.anchor_ = claimed == 0 ? free_now : std::max(claims_.anchor_, free_now);
            return policy::free_for_plan(free_now, claims_.anchor_, claimed);
        }
        // What would be free were the claims back (after available(free_now)).
        std::uint64_t without_claims(std::uint64_t free_now) const noexcept {
            return policy::free_without_claims(free_now, claims_.anchor_, claimed());
        }
        // What the chunks in flight claim now.
        std::uint64_t claimed() const noexcept { return claims_.claimed_.load(); }

        // Waits until a claim ends or `until` passes; true when one ended.
        bool wait_for_release(std::chrono::steady_clock::time_point until) {
            if (!queued_) return false;
            const std::uint64_t seen = claims_.releases_.load();
            claims_.waiting_.fetch_add(1);
            const bool released = claims_.changed_.wait_until(
                lock_, until, [&] { return claims_.releases_.load() != seen; });
            claims_.waiting_.fetch_sub(1);
            return released;
        }

        Claim claim(std::uint64_t bytes) noexcept { return claims_.claim_now(bytes); }

       private:
        Claims& claims_;
        std::unique_lock<std::mutex> lock_;
        const bool queued_;
    };

    // A claim made outside any turn (a load admitted for `bytes`): no lock, no wait.
    Claim claim_now(std::uint64_t bytes) noexcept {
        if (bytes == 0) return {};
        claimed_.fetch_add(bytes);
        return Claim(this, bytes);
    }

   private:
    // Lock-free unless a planner waits: the count first, then the wake-up under the lock a waiter
    // checks its condition in, so no waiter misses a release.
    void give_back(std::uint64_t bytes) noexcept {
        claimed_.fetch_sub(bytes);
        releases_.fetch_add(1);
        if (waiting_.load() == 0) return;
        { std::lock_guard<std::mutex> lock(mutex_); }
        changed_.notify_all();
    }

    std::mutex mutex_;
    std::condition_variable changed_;
    std::atomic<std::uint64_t> claimed_{0};
    std::atomic<std::uint64_t> releases_{0};
    std::atomic<unsigned> waiting_{0};
    std::uint64_t anchor_ = 0;  // guarded by mutex_, as are the tickets
    std::uint64_t next_ticket_ = 0;
    std::uint64_t serving_ = 0;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
