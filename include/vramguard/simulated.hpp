// SPDX-License-Identifier: MIT
// SimulatedDevice: a deterministic in-memory GPU for tests, demos and benchmarks.
//
// It behaves like a device driven by PyTorch's caching allocator: a freed block is not given back
// to the driver but kept *cached* for reuse, so the driver's view (cudaMemGetInfo) counts it as
// used while this process may still reuse it. Like that allocator, an allocation that finds no
// cached block to reuse and too little free in the driver first frees the cache and tries once
// more before it raises the OOM, so fragmentation alone never fails an allocation. A strict mode
// (set_flush_cache_before_oom(false)) skips that retry: a cache of many small blocks then cannot
// serve one big request until release_cached(), which makes a guard that forgets release_cached()
// after an OOM fail visibly. An optional report lag serves readings as they were some time ago, so
// a guard that trusts a stale reading fails here too.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <limits>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

// Thread-safe (one mutex). Every operation is O(log n) in the number of cached blocks or O(1)
// amortised; memory() with no report lag takes one lock and allocates nothing, because benchmarks
// call it millions of times.
//
// The device must outlive every Allocation taken from it (debug builds assert this).
class SimulatedDevice {
    using BlockSet = std::multiset<std::uint64_t>;

   public:
    // Snapshots kept for the report lag, at most. When more changes than this happen within one
    // lag, the oldest go and readings become less stale than asked: a bound on memory beats
    // exactness for a test double.
    static constexpr std::size_t max_report_history = 65536;

    // One block taken from the device. Move-only; on destruction or release() the block goes back
    // to the device's cache, not to the driver, as the caching allocator does.
    class Allocation {
       public:
        Allocation() = default;
        Allocation(const Allocation&) = delete;
        Allocation& operator=(const Allocation&) = delete;
        Allocation(Allocation&& other) noexcept
            : device_(std::exchange(other.device_, nullptr)),
              bytes_(std::exchange(other.bytes_, 0)),
              block_(std::move(other.block_)) {}
        Allocation& operator=(Allocation&& other) noexcept {
            if (this != &other) {
                release();
                device_ = std::exchange(other.device_, nullptr);
                bytes_ = std::exchange(other.bytes_, 0);
                block_ = std::move(other.block_);
            }
            return *this;
        }
        ~Allocation() { release(); }

        // The bytes asked for.
        std::uint64_t bytes() const noexcept { return bytes_; }
        // The block actually held, what allocated_bytes() counts: bytes(), since a bigger cached
        // block is split for the request as the caching allocator does.
        std::uint64_t block_bytes() const noexcept { return block_.empty() ? 0 : block_.value(); }
        explicit operator bool() const noexcept { return device_ != nullptr; }

        // Returns the block to the device's cache now; the allocation becomes empty.
        void release() noexcept {
            if (device_ == nullptr) return;
            std::exchange(device_, nullptr)->give_back(std::move(block_));
            bytes_ = 0;
        }

       private:
        friend class SimulatedDevice;
        Allocation(SimulatedDevice* device, std::uint64_t bytes, BlockSet::node_type block) noexcept
            : device_(device), bytes_(bytes), block_(std::move(block)) {}

        SimulatedDevice* device_ = nullptr;
        std::uint64_t bytes_ = 0;
        // The block travels as a set node, so giving it back to the cache allocates nothing and so
        // cannot fail inside a destructor.
        BlockSet::node_type block_;
    };

    explicit SimulatedDevice(std::uint64_t total_bytes) : total_(total_bytes) {
        if (total_bytes == 0)
            throw std::invalid_argument("vramguard::SimulatedDevice: total_bytes must be > 0");
    }
    SimulatedDevice(const SimulatedDevice&) = delete;
    SimulatedDevice& operator=(const SimulatedDevice&) = delete;
    SimulatedDevice(SimulatedDevice&&) = delete;
    SimulatedDevice& operator=(SimulatedDevice&&) = delete;
    ~SimulatedDevice() {
        // An allocation outliving its device would write into freed memory on release.
        assert(live_allocations_ == 0 && "SimulatedDevice destroyed before its allocations");
    }

    // Takes `bytes` from the device. 0 bytes gives an empty Allocation and changes nothing.
    // Reuses the best-fitting cached block (the smallest with size >= bytes; what the request
    // does not need of it stays cached); otherwise takes a new block from what the driver has
    // free, freeing the cache first when the driver has too little (not in strict mode). Throws
    // OutOfMemory (allocator kind) when neither works.
    Allocation allocate(std::uint64_t bytes) {
        if (bytes == 0) return Allocation();
        std::lock_guard<std::mutex> lock(mutex_);
        if (injected_failures_ > 0) {
            --injected_failures_;
            throw_oom_locked(bytes, "simulated out of memory (injected)");
        }
        BlockSet::node_type block;
        const auto cached = cache_.lower_bound(bytes);
        if (cached != cache_.end()) {
            // Split like the caching allocator: the request takes what it needs, the rest stays
            // cached (the node is made first, where failing changes nothing).
            BlockSet rest;
            if (*cached > bytes) rest.insert(*cached - bytes);
            block = cache_.extract(cached);
            cached_ -= block.value();
            if (!rest.empty()) {
                block.value() = bytes;
                cached_ += *rest.begin();
                cache_.insert(rest.extract(rest.begin()));
            }
        } else {
            if (bytes > driver_free_locked() && flush_cache_before_oom_ && cached_ > 0) {
                cache_.clear();
                cached_ = 0;
            }
            if (bytes > driver_free_locked()) throw_oom_locked(bytes, "simulated out of memory");
            BlockSet fresh;  // the node is made here, where failing is allowed
            fresh.insert(bytes);
            block = fresh.extract(fresh.begin());
        }
        allocated_ += block.value();
        peak_ = std::max(peak_, allocated_ + cached_);
        peak_allocated_ = std::max(peak_allocated_, allocated_);
        ++allocation_count_;
        ++live_allocations_;
        record_locked();
        return Allocation(this, bytes, std::move(block));
    }

    // What this process could allocate: cached bytes count as free, they are its own to reuse.
    // As reported, so it lags when set_report_lag() says so.
    MemoryInfo memory() const {
        std::lock_guard<std::mutex> lock(mutex_);
        const State state = reported_locked();
        return {
            detail::saturating_sub(total_, detail::saturating_add(state.external, state.allocated)),
            total_};
    }

    // What cudaMemGetInfo would say: cached bytes count as used. Lags like memory().
    MemoryInfo driver_memory() const {
        std::lock_guard<std::mutex> lock(mutex_);
        const State state = reported_locked();
        const std::uint64_t reserved = detail::saturating_add(state.allocated, state.cached);
        return {detail::saturating_sub(total_, detail::saturating_add(state.external, reserved)),
                total_};
    }

    // PyTorch's caching allocator frees its cached blocks and retries before it raises an OOM, so
    // fragmentation alone never fails an allocation there. On by default; off is the strict
    // device, on which a guard that forgets release_cached() after an OOM keeps failing.
    void set_flush_cache_before_oom(bool flush) {
        std::lock_guard<std::mutex> lock(mutex_);
        flush_cache_before_oom_ = flush;
    }

    // Gives every cached block back to the driver (torch's emptyCache()).
    void release_cached() {
        std::lock_guard<std::mutex> lock(mutex_);
        ++release_cached_calls_;
        if (cache_.empty()) return;
        cache_.clear();
        cached_ = 0;
        record_locked();
    }

    // Memory held by other processes. It may exceed what is free: free memory then reads 0 and
    // allocations fail, as when another process grabs the GPU.
    void set_external_usage(std::uint64_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        external_ = bytes;
        record_locked();
    }
    std::uint64_t external_usage() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return external_;
    }

    // Peaks as vramguard::torch::Probe reads them: the larger of the growth in reserved bytes
    // (allocated + cached, torch's max_memory_reserved(): what work really took from the device)
    // and the growth in allocated bytes (work that ran inside blocks the cache already held, where
    // reserved bytes do not move), both since reset_peak(), on the reserved scale.
    void reset_peak() {
        std::lock_guard<std::mutex> lock(mutex_);
        peak_ = allocated_ + cached_;
        peak_allocated_ = allocated_;
        cached_at_reset_ = cached_;
    }
    std::uint64_t peak_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return std::max(peak_, peak_allocated_ + cached_at_reset_);
    }

    // Exact current books (never lagged).
    std::uint64_t allocated_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return allocated_;
    }
    std::uint64_t cached_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return cached_;
    }
    std::uint64_t reserved_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return allocated_ + cached_;
    }
    std::uint64_t total_bytes() const noexcept { return total_; }

    // Counters for tests. allocation_count() counts successful non-empty allocations; oom_count()
    // counts thrown OutOfMemory, injected ones included.
    std::uint64_t release_cached_calls() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return release_cached_calls_;
    }
    std::uint64_t oom_count() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return oom_count_;
    }
    std::uint64_t allocation_count() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return allocation_count_;
    }
    // Allocations taken and not yet released.
    std::uint64_t live_allocations() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return live_allocations_;
    }

    // OOM injection for soak tests: the next `n` non-empty allocate() calls throw OutOfMemory
    // whatever the space. Replaces any count still pending; 0 cancels.
    void fail_next_allocations(std::uint64_t n) {
        std::lock_guard<std::mutex> lock(mutex_);
        injected_failures_ = n;
    }

    // Laggy driver reporting: memory() and driver_memory() report the state as it was `lag` ago on
    // `clock`; drivers do report freed memory late, and a guard must poll rather than trust one
    // reading. Lag 0 (the default) is exact and keeps no history. `clock` is called under the
    // device's lock, so it must not call back into the device.
    void set_report_lag(Duration lag, ClockFn clock) {
        if (lag < Duration::zero())
            throw std::invalid_argument("vramguard::SimulatedDevice: report lag must be >= 0");
        if (lag > Duration::zero() && !clock)
            throw std::invalid_argument("vramguard::SimulatedDevice: report lag needs a clock");
        std::lock_guard<std::mutex> lock(mutex_);
        history_.clear();
        if (lag == Duration::zero()) {
            lag_ = lag;
            clock_ = nullptr;
            return;
        }
        // Nothing earlier is known, so the state now stands for all the past: readings show it
        // until `lag` has passed since the first change.
        history_.push_back({TimePoint::min(), current_locked()});
        lag_ = lag;
        clock_ = std::move(clock);
    }
    Duration report_lag() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return lag_;
    }

   private:
    struct State {
        std::uint64_t allocated = 0;
        std::uint64_t cached = 0;
        std::uint64_t external = 0;
    };
    struct Snapshot {
        TimePoint time;
        State state;
    };

    State current_locked() const noexcept { return {allocated_, cached_, external_}; }

    std::uint64_t driver_free_locked() const noexcept {
        return detail::saturating_sub(total_,
                                      detail::saturating_add(external_, allocated_ + cached_));
    }

    [[noreturn]] void throw_oom_locked(std::uint64_t bytes, const char* what) {
        ++oom_count_;
        OomReport report;
        report.requested_bytes = bytes;
        report.free_bytes = driver_free_locked();
        report.total_bytes = total_;
        // PyTorch 2.x's shape, so message parsing is exercised along with the typed path.
        std::string message = std::string(what) + ". Tried to allocate " + format_bytes(bytes) +
                              ". Device has a total capacity of " + format_bytes(total_) +
                              " of which " + format_bytes(*report.free_bytes) + " is free. " +
                              format_bytes(cached_) +
                              " is reserved by this process but unallocated.";
        throw OutOfMemory(message, OomKind::allocator, report);
    }

    // Called after every change to the books. Never throws: it runs on Allocation's release path.
    void record_locked() noexcept {
        if (lag_ == Duration::zero()) return;
        TimePoint now;
        try {
            now = clock_();
        } catch (...) {
            return;  // a clock that throws loses this step of history, not the books
        }
        const Snapshot snapshot{now, current_locked()};
        if (!history_.empty() && history_.back().time >= now) {
            history_.back().state = snapshot.state;  // same instant: only the latest state counts
        } else {
            try {
                history_.push_back(snapshot);
            } catch (...) {
                if (!history_.empty()) history_.back().state = snapshot.state;
            }
        }
        // Only the newest snapshot at or before now - lag can still be read; older ones go.
        const TimePoint horizon = now - lag_;
        while (history_.size() >= 2 && history_[1].time <= horizon) history_.pop_front();
        while (history_.size() > max_report_history) history_.pop_front();
    }

    State reported_locked() const {
        if (lag_ == Duration::zero() || history_.empty()) return current_locked();
        const TimePoint horizon = clock_() - lag_;
        auto newer = std::upper_bound(
            history_.begin(), history_.end(), horizon,
            [](const TimePoint& time, const Snapshot& snapshot) { return time < snapshot.time; });
        if (newer == history_.begin()) return history_.front().state;  // older than all we kept
        return std::prev(newer)->state;
    }

    void give_back(BlockSet::node_type block) noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        const std::uint64_t size = block.value();
        allocated_ -= size;
        cached_ += size;
        cache_.insert(std::move(block));
        --live_allocations_;
        record_locked();
    }

    const std::uint64_t total_;
    mutable std::mutex mutex_;
    BlockSet cache_;  // sizes of the blocks freed but kept, for best-fit reuse
    std::uint64_t allocated_ = 0;
    std::uint64_t cached_ = 0;
    std::uint64_t external_ = 0;
    std::uint64_t peak_ = 0;  // reserved
    std::uint64_t peak_allocated_ = 0;
    std::uint64_t cached_at_reset_ = 0;
    std::uint64_t release_cached_calls_ = 0;
    std::uint64_t oom_count_ = 0;
    std::uint64_t allocation_count_ = 0;
    std::uint64_t live_allocations_ = 0;
    std::uint64_t injected_failures_ = 0;
    bool flush_cache_before_oom_ = true;
    Duration lag_{Duration::zero()};
    ClockFn clock_;
    std::deque<Snapshot> history_;
};

VRAMGUARD_END_NAMESPACE
