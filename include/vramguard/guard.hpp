// SPDX-License-Identifier: MIT
// Guard<Probe>: the two loops. load() admits, measures and retries a model load; encode() runs a
// batched computation in chunks that halve on OOM down to single items, and remembers what fit.
// One guard per device, shared by every thread that uses the device.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/semaphore.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

// A no-copy view of a contiguous run of the caller's items, handed to an encode's batch function.
template <class It>
class BatchView {
   public:
    using iterator = It;

    BatchView(It first, It last, std::size_t size, std::size_t offset)
        : first_(first), last_(last), size_(size), offset_(offset) {}

    It begin() const { return first_; }
    It end() const { return last_; }
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }
    // Index of begin() in the caller's whole input.
    std::size_t offset() const noexcept { return offset_; }
    decltype(auto) operator[](std::size_t i) const {
        using Category = typename std::iterator_traits<It>::iterator_category;
        if constexpr (std::is_base_of_v<std::random_access_iterator_tag, Category>) {
            return first_[static_cast<typename std::iterator_traits<It>::difference_type>(i)];
        } else {
            return *std::next(first_,
                              static_cast<typename std::iterator_traits<It>::difference_type>(i));
        }
    }

   private:
    It first_, last_;
    std::size_t size_, offset_;
};

// Marks a weight function whose batches are padded to their heaviest item (a padded transformer
// batch): a batch then costs size x its heaviest weight, not the sum of the weights, and the
// learned budget counts padded weight. `guard.encode(key, texts, fn,
// vramguard::padded(tokens_of))`.
template <class W>
struct Padded {
    W weight;
};
template <class W>
Padded<std::decay_t<W>> padded(W&& weight) {
    return {std::forward<W>(weight)};
}

// What an admission check saw and decided.
struct Admission {
    bool admitted = false;
    policy::Requirement requirement;
    std::uint64_t margin_bytes = 0;
    MemoryInfo memory;
};

namespace detail {

template <class P, class = void>
struct has_peak_tracking : std::false_type {};
template <class P>
struct has_peak_tracking<P, std::void_t<decltype(std::declval<P&>().reset_peak()),
                                        decltype(std::declval<P&>().peak_bytes())>>
    : std::true_type {};

template <class P, class = void>
struct has_device_key : std::false_type {};
template <class P>
struct has_device_key<P, std::void_t<decltype(std::declval<const P&>().device_key())>>
    : std::true_type {};

template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

template <class Probe>
std::string device_identity(const Probe& probe) {
    if constexpr (has_device_key<Probe>::value) {
        return std::string(probe.device_key());
    } else {
        char text[40];
        std::snprintf(text, sizeof text, "probe@%p", static_cast<const void*>(&probe));
        return text;
    }
}

inline std::string percent(double fraction) {
    char text[16];
    std::snprintf(text, sizeof text, "%.0f%%", fraction * 100);
    return text;
}

template <class Range>
using range_iterator_t = decltype(std::begin(std::declval<const Range&>()));

template <class Range, class W, class = void>
struct is_weight_fn : std::false_type {};
template <class Range, class W>
struct is_weight_fn<
    Range, W, std::void_t<decltype(std::declval<W&>()(*std::begin(std::declval<const Range&>())))>>
    : std::is_convertible<decltype(std::declval<W&>()(*std::begin(std::declval<const Range&>()))),
                          std::uint64_t> {};

template <class W>
struct is_padded : std::false_type {};
template <class W>
struct is_padded<Padded<W>> : std::true_type {};

template <class W>
decltype(auto) unpadded(W& weight) {
    if constexpr (is_padded<std::remove_cv_t<W>>::value) {
        return (weight.weight);
    } else {
        return (weight);
    }
}
template <class W>
using unpadded_t = std::remove_reference_t<decltype(unpadded(std::declval<W&>()))>;

}  // namespace detail

template <class Probe>
class Guard {
   public:
    explicit Guard(Probe& probe, Options options = {})
        : probe_(probe),
          options_((options.validate(), std::move(options))),
          profiles_(options_.profile_dir, options_.persist, options_.log),
          single_item_(shared_device_semaphore(
              detail::device_identity(probe),
              static_cast<std::ptrdiff_t>(options_.single_item_concurrency))) {}

    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;

    // ---- load --------------------------------------------------------------------------------

    // Runs `fn` (a model load) once admitted; the requirement is the measured peak for `key` x
    // history_headroom, or first_run_fraction of the device when never measured.
    template <class F>
    std::invoke_result_t<F&> load(const Key& key, F&& fn) {
        return run_load(key, std::nullopt, fn);
    }
    // The same with the caller's own estimate, which beats any measurement.
    template <class F>
    std::invoke_result_t<F&> load(const Key& key, std::uint64_t declared_bytes, F&& fn) {
        if (declared_bytes == 0)
            throw std::invalid_argument("vramguard::Guard::load: declared_bytes must be > 0 for " +
                                        key.describe());
        return run_load(key, declared_bytes, fn);
    }

    // ---- encode ------------------------------------------------------------------------------

    // batch_fn(BatchView) returns one result per item (std::vector<R>) or nothing. Returns the
    // results in input order (std::vector<R>), or nothing.
    template <class It, class F, class = typename std::iterator_traits<It>::iterator_category>
    auto encode(const Key& key, It first, It last, F&& batch_fn) {
        return run_encode(key, first, last, batch_fn);
    }
    template <class Range, class F, class = detail::range_iterator_t<Range>>
    auto encode(const Key& key, const Range& items, F&& batch_fn) {
        return run_encode(key, std::begin(items), std::end(items), batch_fn);
    }
    // Weighted form: weight_fn(item) -> tokens, pixels, samples. The learned ceiling is a weight
    // budget: batches are cut where the next item would exceed it. Wrap weight_fn in padded() when
    // batches are padded to their longest item.
    template <class Range, class F, class W,
              class = std::enable_if_t<detail::is_weight_fn<
                  Range, detail::unpadded_t<std::remove_reference_t<W>>>::value>>
    auto encode(const Key& key, const Range& items, F&& batch_fn, W&& weight_fn) {
        auto& weight_of = detail::unpadded(weight_fn);
        std::vector<std::uint64_t> weights;
        for (const auto& item : items)
            weights.push_back(static_cast<std::uint64_t>(weight_of(item)));
        return run_encode(key, std::begin(items), std::end(items), batch_fn, &weights,
                          detail::is_padded<std::decay_t<W>>::value);
    }

    // ---- what it knows -----------------------------------------------------------------------

    Stats stats() const noexcept { return stats_.snapshot(); }
    const Options& options() const noexcept { return options_; }
    Probe& probe() noexcept { return probe_; }
    ProfileCache& profiles() noexcept { return profiles_; }

    // The learned largest batch (items) / batch weight for `key`; 0 when nothing limits it yet.
    std::uint64_t learned_batch_ceiling(const Key& key) { return key_memory(key).snapshot().first; }
    std::uint64_t learned_weight_budget(const Key& key) {
        return key_memory(key).snapshot().second;
    }

    // One admission reading, reserving nothing: would a load of `key` start now?
    Admission admission(const Key& key,
                        std::optional<std::uint64_t> declared_bytes = std::nullopt) {
        Admission result;
        result.memory = probe_.memory();
        result.requirement = requirement_for(key, declared_bytes, result.memory.total_bytes);
        result.margin_bytes =
            policy::margin_bytes(result.memory.total_bytes, options_.safety_margin);
        result.admitted =
            policy::admits(result.requirement.bytes, result.memory, options_.safety_margin);
        return result;
    }

    // After an unload of `expected_freed` bytes (free was `free_before`): polls until the driver
    // reports recovery_fraction of them, or `needed_free` is free, at most recovery_timeout; then
    // trusts the estimate. Returns whether the memory was seen (true) or only trusted (false).
    bool wait_for_freed_memory(std::uint64_t expected_freed, std::uint64_t free_before,
                               std::uint64_t needed_free = 0) {
        const TimePoint deadline = options_.clock() + options_.recovery_timeout;
        return detail::poll_until(
            options_.clock, options_.sleep, options_.poll_interval, deadline, [&] {
                const std::uint64_t free_now = probe_.memory().free_bytes;
                return (needed_free > 0 && free_now >= needed_free) ||
                       policy::recovered(free_before, free_now, expected_freed,
                                         options_.recovery_fraction);
            });
    }

   private:
    // Per-key learned state, shared by every thread using the key.
    struct KeyMemory {
        std::mutex mutex;
        policy::CeilingState items;
        policy::CeilingState weight;
        std::uint64_t persisted_items = 0;
        std::uint64_t persisted_weight = 0;
        std::uint64_t bytes_per_item = 0;       // highest measured cost of one item
        std::uint64_t cheapest_item_bytes = 0;  // lowest measured cost of one item

        // Copies of the above for the fast path, which reads them without the mutex (two cores
        // taking one mutex per call pay a cache-line transfer each time). Written under `mutex`
        // by publish() whenever the originals change.
        struct Published {
            std::atomic<std::uint64_t> ceiling{0};
            std::atomic<std::uint64_t> largest_success{0};
        };
        Published items_published, weight_published;
        std::atomic<std::uint64_t> cheapest_published{0}, costliest_published{0};
        std::atomic<std::uint64_t> load_peak{0};  // highest measured peak of a load (profile)

        void publish() noexcept {
            const auto order = std::memory_order_release;
            items_published.ceiling.store(items.ceiling, order);
            items_published.largest_success.store(items.largest_success, order);
            weight_published.ceiling.store(weight.ceiling, order);
            weight_published.largest_success.store(weight.largest_success, order);
            cheapest_published.store(cheapest_item_bytes, order);
            costliest_published.store(bytes_per_item, order);
        }

        std::pair<std::uint64_t, std::uint64_t> snapshot() {
            std::lock_guard<std::mutex> lock(mutex);
            return {policy::learned(items), policy::learned(weight)};
        }
    };

    // Measures one run's peak, but only when nothing else on this guard ran at the same time: a
    // peak shared by two concurrent runs would be recorded against the wrong key.
    class Measurement {
       public:
        explicit Measurement(Guard& guard) : guard_(guard) {
            if constexpr (detail::has_peak_tracking<Probe>::value) {
                // One word: runs in flight in the low half, runs started in the high half, so
                // a start is one atomic step.
                const std::uint64_t before =
                    guard.measurements_.fetch_add(started_one + 1, std::memory_order_acq_rel);
                solo_ = (before & in_flight_mask) == 0;
                started_ = (before >> 32) + 1;
                if (solo_) {
                    guard.probe_.reset_peak();
                    baseline_ = guard.probe_.peak_bytes();
                }
            }
        }
        ~Measurement() {
            if constexpr (detail::has_peak_tracking<Probe>::value)
                guard_.measurements_.fetch_sub(1, std::memory_order_acq_rel);
        }
        Measurement(const Measurement&) = delete;
        Measurement& operator=(const Measurement&) = delete;

        // Bytes this run added at its peak, when it ran alone.
        std::optional<std::uint64_t> peak() const {
            if constexpr (detail::has_peak_tracking<Probe>::value) {
                // Another run started meanwhile: the device's peak is shared, not this run's.
                if (!solo_ || (guard_.measurements_.load(std::memory_order_acquire) >> 32) !=
                                  (started_ & 0xffffffffu))
                    return std::nullopt;
                const std::uint64_t peak = guard_.probe_.peak_bytes();
                return peak > baseline_ ? peak - baseline_ : 0;
            } else {
                return std::nullopt;
            }
        }

       private:
        static constexpr std::uint64_t started_one = std::uint64_t{1} << 32;
        static constexpr std::uint64_t in_flight_mask = started_one - 1;
        Guard& guard_;
        bool solo_ = false;
        std::uint64_t started_ = 0;
        std::uint64_t baseline_ = 0;
    };

    class InFlight {
       public:
        explicit InFlight(Guard& guard) : guard_(guard) { guard.in_flight_.add(1); }
        ~InFlight() { guard_.in_flight_.add(-1); }
        InFlight(const InFlight&) = delete;
        InFlight& operator=(const InFlight&) = delete;
        // Read only on the rare path where admission says no.
        bool alone() const noexcept { return guard_.in_flight_.sum() <= 1; }

       private:
        Guard& guard_;
    };

    struct Admitted {
        std::unique_ptr<Hold> hold;
        policy::Requirement requirement;
        MemoryInfo memory;
    };

    policy::Requirement requirement_for(const Key& key, std::optional<std::uint64_t> declared,
                                        std::uint64_t total_bytes) {
        const std::uint64_t measured =
            declared ? 0 : key_memory(key).load_peak.load(std::memory_order_acquire);
        return policy::required_bytes(declared, measured, total_bytes, options_.history_headroom,
                                      options_.first_run_fraction);
    }

    void log(Level level, const std::string& message) const {
        detail::emit(options_.log, level, message);
    }

    // Admission: check (and reserve host-wide, with a coordinator) in one step; wait up to
    // admission_wait; throw InsufficientMemory with the numbers otherwise.
    // `requirement_of(total_bytes)` turns the device size into the requirement: the first
    // reading serves both, so the fast path reads the probe once. With a coordinator the reading
    // that is compared is taken by the coordinator under its lock (see Coordinator::try_reserve);
    // only the first try reads the probe before it too, for the device size.
    template <class RequirementOf>
    Admitted admit(const Key& key, const char* what, RequirementOf&& requirement_of) {
        Admitted admitted;
        const policy::Requirement& requirement = admitted.requirement;
        std::uint64_t available = 0;
        bool first = true;
        auto try_once = [&] {
            if (first || !options_.coordinator) admitted.memory = probe_.memory();
            if (first) {
                admitted.requirement = requirement_of(admitted.memory.total_bytes);
                first = false;
            }
            const std::uint64_t margin =
                policy::margin_bytes(admitted.memory.total_bytes, options_.safety_margin);
            if (options_.coordinator) {
                auto decision = options_.coordinator->try_reserve(
                    requirement.bytes, margin, [this] { return probe_.memory(); });
                admitted.memory = decision.seen;
                available = decision.available;
                admitted.hold = std::move(decision.hold);
                return admitted.hold != nullptr;
            }
            available = admitted.memory.free_bytes;
            return policy::admits(requirement.bytes, admitted.memory, options_.safety_margin);
        };
        if (try_once()) return admitted;
        if (!policy::can_ever_fit(requirement.bytes, admitted.memory.total_bytes,
                                  options_.safety_margin))
            reject(key, what, requirement, available, admitted.memory.total_bytes, true);
        if (options_.admission_wait.count() > 0) {
            stats_.bump(stats_.waits);
            const TimePoint start = options_.clock();
            log(Level::info, std::string(what) + " " + key.describe() + ": waiting up to " +
                                 std::to_string(options_.admission_wait.count()) + " ms for " +
                                 format_bytes(requirement.bytes) + " to be free");
            if (detail::poll_until(options_.clock, options_.sleep, options_.poll_interval,
                                   start + options_.admission_wait, try_once)) {
                remember_recovery(options_.clock() - start);
                return admitted;
            }
        }
        reject(key, what, requirement, available, admitted.memory.total_bytes, false);
    }

    [[noreturn]] void reject(const Key& key, const char* what,
                             const policy::Requirement& requirement, std::uint64_t available,
                             std::uint64_t total, bool never_fits) {
        stats_.bump(stats_.rejections);
        const std::uint64_t margin = policy::margin_bytes(total, options_.safety_margin);
        std::string message =
            "vramguard: cannot start " + std::string(what) + " " + key.describe() + ": it needs " +
            format_bytes(requirement.bytes) + " (" + policy::to_string(requirement.source) +
            ") plus a safety margin of " + format_bytes(margin) + " (" +
            detail::percent(options_.safety_margin) + " of " + format_bytes(total) + "), ";
        if (never_fits) {
            message +=
                "more than the whole device: it can never fit here. Declare a smaller size, "
                "lower safety_margin or use a larger device.";
        } else {
            message += "but only " + format_bytes(available) + " is free for this process" +
                       (options_.coordinator ? " after other processes' reservations" : "") +
                       ". Free memory (unload idle models), lower the load, or retry later.";
        }
        throw InsufficientMemory(requirement.bytes, available, total, key.describe(), retry_after(),
                                 message, never_fits);
    }

    std::chrono::milliseconds retry_after() const noexcept {
        const std::int64_t observed = last_recovery_ms_.load(std::memory_order_relaxed);
        return observed >= 0 ? std::chrono::milliseconds(std::max<std::int64_t>(observed, 1))
                             : options_.retry_delay;
    }
    void remember_recovery(Duration took) noexcept {
        last_recovery_ms_.store(std::chrono::duration_cast<std::chrono::milliseconds>(took).count(),
                                std::memory_order_relaxed);
    }

    // After an OOM: polls until `required` bytes (plus the margin) are free, or `max_wait` passes.
    // `distrusted_free` is the reading that let the failed work start: it was stale (drivers report
    // freed and taken memory late) or the memory was taken since, so only a reading that differs
    // from it is evidence that memory came back.
    bool wait_for_memory(std::uint64_t required, std::chrono::milliseconds max_wait,
                         std::uint64_t distrusted_free) {
        const TimePoint start = options_.clock();
        bool reading_moved = false;
        const bool came_back = detail::poll_until(
            options_.clock, options_.sleep, options_.poll_interval, start + max_wait, [&] {
                const MemoryInfo now = probe_.memory();
                reading_moved = reading_moved || now.free_bytes != distrusted_free;
                return reading_moved && policy::admits(required, now, options_.safety_margin);
            });
        if (options_.clock() > start) stats_.bump(stats_.waits);
        if (came_back) remember_recovery(options_.clock() - start);
        return came_back;
    }

    template <class F>
    std::invoke_result_t<F&> run_load(const Key& key, std::optional<std::uint64_t> declared,
                                      F& fn) {
        using R = std::invoke_result_t<F&>;
        stats_.calls.add(1);
        for (unsigned attempt = 1;; ++attempt) {
            Admitted admitted = admit(key, "load", [&](std::uint64_t total_bytes) {
                return requirement_for(key, declared, total_bytes);
            });
            try {
                Measurement measurement(*this);
                if constexpr (std::is_void_v<R>) {
                    std::invoke(fn);
                    record_load_peak(key, measurement);
                    return;
                } else {
                    R result = std::invoke(fn);
                    record_load_peak(key, measurement);
                    return std::forward<R>(result);
                }
            } catch (...) {
                const std::exception_ptr error = std::current_exception();
                take_oom_or_rethrow(error, "load", key);
                admitted.hold.reset();
                const std::uint64_t required = admitted.requirement.bytes;
                const bool hopeless =
                    asked_for_more_than_the_device(error, admitted.memory.total_bytes);
                if (attempt >= options_.load_attempts || hopeless) {
                    log(Level::warn, "load " + key.describe() + ": out of memory on attempt " +
                                         std::to_string(attempt) +
                                         ", giving up: " + describe(error));
                    std::throw_with_nested(OomExhausted(
                        "vramguard: load " + key.describe() + " ran out of memory " +
                            given_up_because(hopeless, attempt, admitted.memory.total_bytes) +
                            " It needed about " + format_bytes(required) +
                            ". Last error: " + describe(error),
                        key.describe(), std::nullopt, attempt));
                }
                log(Level::warn,
                    "load " + key.describe() + ": out of memory on attempt " +
                        std::to_string(attempt) + " of " + std::to_string(options_.load_attempts) +
                        "; released the allocator cache, waiting up to " +
                        std::to_string(options_.retry_delay.count()) + " ms for " +
                        format_bytes(required) + " to be free (" + describe(error) + ")");
                stats_.bump(stats_.retries);
                wait_for_memory(required, options_.retry_delay, admitted.memory.free_bytes);
            }
        }
    }

    // The first answer to anything the caller's work throws (inside a catch block): not an OOM
    // -> rethrown untouched, never retried; a driver-level OOM -> counted, logged, rethrown (the
    // CUDA context may be unusable); an allocator OOM -> counted, the cache emptied, and the
    // caller goes on to retry.
    void take_oom_or_rethrow(const std::exception_ptr& error, const char* what, const Key& key) {
        const OomKind kind = classify_oom(error);
        if (kind == OomKind::none) std::rethrow_exception(error);
        stats_.bump(stats_.ooms);
        if (kind == OomKind::driver) {
            log(Level::warn, std::string(what) + " " + key.describe() +
                                 ": driver-level out of memory (" + describe(error) +
                                 "); the CUDA context may be unusable, so it is not retried");
            std::rethrow_exception(error);
        }
        probe_.release_cached();
    }

    // An allocation larger than the whole device never succeeds: retrying it only wastes time.
    static bool asked_for_more_than_the_device(const std::exception_ptr& error,
                                               std::uint64_t total) {
        const auto report = oom_report(error);
        return report && total > 0 && report->requested_bytes > total;
    }

    // Why a load or an item was given up on, for OomExhausted's message: retried and waited for
    // in vain, or not retried at all because it asked for more than the device has.
    std::string given_up_because(bool hopeless, unsigned attempts, std::uint64_t total) const {
        if (hopeless)
            return "asking for more than the whole device (" + format_bytes(total) +
                   "), so it was not retried.";
        return std::to_string(attempts) +
               " times; the allocator cache was released and memory waited for (up to " +
               std::to_string(options_.retry_delay.count()) + " ms) before each retry.";
    }

    void record_load_peak(const Key& key, const Measurement& measurement) {
        const auto peak = measurement.peak();
        if (!peak || *peak == 0) return;
        profiles_.record_peak(key, *peak);
        std::atomic<std::uint64_t>& highest = key_memory(key).load_peak;
        std::uint64_t seen = highest.load(std::memory_order_relaxed);
        while (*peak > seen && !highest.compare_exchange_weak(seen, *peak)) {
        }
    }

    // The learned state of `key`, created from its profile on first use. A server encodes with one
    // key over and over, so each thread remembers its last lookup (guard ids are never reused, so
    // the remembered pointer cannot outlive its guard's map).
    KeyMemory& key_memory(const Key& key) {
        struct LastLookup {
            std::uint64_t guard_id = 0;
            std::uint64_t key = 0;
            KeyMemory* memory = nullptr;
        };
        thread_local LastLookup last;
        if (last.guard_id == id_ && last.key == key.value()) return *last.memory;
        KeyMemory* found = nullptr;
        {
            std::lock_guard<std::mutex> lock(keys_mutex_);
            if (auto it = keys_.find(key.value()); it != keys_.end()) found = it->second.get();
        }
        if (!found) {
            const Profile profile = profiles_.get(key);  // may read a file: outside the lock
            auto created = std::make_unique<KeyMemory>();
            seed(created->items, profile.batch_ceiling);
            seed(created->weight, profile.weight_budget);
            created->persisted_items = profile.batch_ceiling;
            created->persisted_weight = profile.weight_budget;
            created->bytes_per_item = profile.peak_bytes_per_item;
            created->load_peak.store(profile.peak_bytes, std::memory_order_relaxed);
            created->publish();
            std::lock_guard<std::mutex> lock(keys_mutex_);
            auto& slot = keys_[key.value()];
            if (!slot) slot = std::move(created);  // another thread may have won the race
            found = slot.get();
        }
        last = {id_, key.value(), found};
        return *found;
    }
    static std::uint64_t next_guard_id() noexcept {
        static std::atomic<std::uint64_t> next{1};
        return next.fetch_add(1, std::memory_order_relaxed);
    }
    // A learned ceiling came from halving: the size twice as large is assumed to have failed, so
    // growth probes halfway there first instead of doubling straight into the same OOM.
    static void seed(policy::CeilingState& state, std::uint64_t learned) {
        state.ceiling = learned;
        state.failed_at = learned == 0 ? 0 : policy::saturating_add(learned, learned);
    }

    void persist_learned(const Key& key, KeyMemory& memory) {
        std::uint64_t items = 0, weight = 0;
        bool items_changed = false, weight_changed = false;
        {
            std::lock_guard<std::mutex> lock(memory.mutex);
            items = policy::learned(memory.items);
            weight = policy::learned(memory.weight);
            items_changed = items != 0 && items != memory.persisted_items;
            weight_changed = weight != 0 && weight != memory.persisted_weight;
            if (items_changed) memory.persisted_items = items;
            if (weight_changed) memory.persisted_weight = weight;
        }
        if (items_changed) profiles_.record_batch_ceiling(key, items);
        if (weight_changed) profiles_.record_weight_budget(key, weight);
    }

    template <class It, class F>
    auto run_encode(const Key& key, It first, It last, F& batch_fn,
                    const std::vector<std::uint64_t>* weights = nullptr,
                    bool padded_weights = false) {
        using View = BatchView<It>;
        using Out = std::invoke_result_t<F&, View>;
        static_assert(std::is_void_v<Out> || detail::is_std_vector<Out>::value,
                      "vramguard::Guard::encode: batch_fn must return void or std::vector<R>, one "
                      "result per item of the view it was given");
        stats_.calls.add(1);
        const std::size_t n = static_cast<std::size_t>(std::distance(first, last));
        std::conditional_t<std::is_void_v<Out>, std::vector<char>, Out>
            results{};  // unused for void
        if (n == 0) {
            if constexpr (std::is_void_v<Out>)
                return;
            else
                return results;
        }

        KeyMemory& memory = key_memory(key);
        policy::CeilingState KeyMemory::*state_of =
            weights ? &KeyMemory::weight : &KeyMemory::items;
        typename KeyMemory::Published& published =
            weights ? memory.weight_published : memory.items_published;
        const policy::GrowthRule rule{options_.grow_after_successes, options_.forget_failure_after};
        auto weight_at = [weights](std::size_t i) { return (*weights)[i]; };

        // Admission: refuse (or wait) when not even the cheapest item seen so far fits; items
        // differ, and an encode adapts its batches, so only "nothing can run" is a reason to say
        // no. Memory held by this guard's own calls in flight comes back when they finish: then
        // the call goes ahead and takes turns on the single-item path instead of being refused.
        // Count mode with no learned ceiling starts at the batch the costliest item allows now.
        const InFlight in_flight(*this);
        std::uint64_t predicted = 0;
        const std::uint64_t cheapest = memory.cheapest_published.load(std::memory_order_acquire);
        const std::uint64_t costliest = memory.costliest_published.load(std::memory_order_acquire);
        if (cheapest > 0 || (!weights && costliest > 0)) {
            const MemoryInfo seen = probe_.memory();
            const std::uint64_t one_item = policy::scale_bytes(cheapest, options_.history_headroom);
            if (cheapest > 0 && !policy::admits(one_item, seen, options_.safety_margin) &&
                in_flight.alone())
                admit(key, "encode", [one_item](std::uint64_t) {
                    return policy::Requirement{one_item, policy::RequirementSource::measured};
                });
            if (!weights)
                predicted = policy::predicted_batch(
                    seen, options_.safety_margin,
                    policy::scale_bytes(costliest, options_.history_headroom));
        }

        // What this call learned is persisted when it ends, however it ends; a call that learned
        // nothing costs no lock here.
        struct PersistOnExit {
            Guard& guard;
            const Key& key;
            KeyMemory& memory;
            bool learned = false;
            ~PersistOnExit() {
                if (learned) guard.persist_learned(key, memory);
            }
        } persist_on_exit{*this, key, memory};

        std::size_t pos = 0;
        It cursor = first;
        unsigned alone_failures = 0;
        while (pos < n) {
            // The next chunk: up to the ceiling (items) or cut at the budget (weights).
            std::size_t size = 0;
            std::uint64_t limit = 0;
            bool alone = false;
            // Peaks are sampled (per thread): measuring costs three probe calls, and a per-item
            // cost moves slowly once known.
            thread_local unsigned chunks_since_measured = 0;
            const bool measure = memory.cheapest_published.load(std::memory_order_relaxed) == 0 ||
                                 ++chunks_since_measured % 16 == 0;
            limit = published.ceiling.load(std::memory_order_acquire);
            // A batch's weight: the sum of its items', or with padding its size x its heaviest.
            auto batch_weight = [&](std::size_t begin, std::size_t count) {
                std::uint64_t total = 0, heaviest = 0;
                for (std::size_t i = begin; i < begin + count; ++i) {
                    total = policy::saturating_add(total, weight_at(i));
                    heaviest = std::max(heaviest, weight_at(i));
                }
                return padded_weights ? policy::scale_bytes(heaviest, static_cast<double>(count))
                                      : total;
            };
            if (weights) {
                size = padded_weights ? policy::cut_by_padded_weight(pos, n, limit, weight_at)
                                      : policy::cut_by_weight(pos, n, limit, weight_at);
                // Alone when not even two such items fit the budget.
                alone =
                    size == 1 && limit != 0 &&
                    (pos + 1 < n ? batch_weight(pos, 2)
                                 : policy::saturating_add(weight_at(pos), weight_at(pos))) > limit;
            } else {
                const std::uint64_t cap = limit != 0 ? limit : predicted;
                size = cap == 0 ? n - pos
                                : static_cast<std::size_t>(std::min<std::uint64_t>(cap, n - pos));
                alone = limit == 1;
            }
            const std::uint64_t tried = weights ? batch_weight(pos, size) : size;
            const bool at_ceiling =
                limit != 0 && (weights ? pos + size < n || alone : size == limit);
            It chunk_end = std::next(
                cursor, static_cast<typename std::iterator_traits<It>::difference_type>(size));

            // batch_fn's output is checked after the try: a contract error must never meet the
            // OOM classifier (a key named like an OOM message would turn it into one).
            std::conditional_t<std::is_void_v<Out>, char, Out> produced{};
            try {
                Semaphore::Permit permit;
                std::unique_ptr<Hold> host_lock;
                if (alone) {
                    stats_.bump(stats_.single_item_calls);
                    permit = Semaphore::Permit(*single_item_);
                    if (options_.coordinator) host_lock = options_.coordinator->lock_single_item();
                }
                std::optional<Measurement> measurement;
                if (measure) measurement.emplace(*this);
                if constexpr (std::is_void_v<Out>) {
                    std::invoke(batch_fn, View(cursor, chunk_end, size, pos));
                } else {
                    produced = std::invoke(batch_fn, View(cursor, chunk_end, size, pos));
                }
                if (auto peak = measurement ? measurement->peak() : std::nullopt;
                    peak && *peak > 0) {
                    const std::uint64_t per_item = (*peak + size - 1) / size;
                    profiles_.record_peak(key, *peak, size);
                    std::lock_guard<std::mutex> lock(memory.mutex);
                    memory.bytes_per_item = std::max(memory.bytes_per_item, per_item);
                    memory.cheapest_item_bytes =
                        memory.cheapest_item_bytes == 0
                            ? per_item
                            : std::min(memory.cheapest_item_bytes, per_item);
                    memory.publish();
                }
            } catch (...) {
                const std::exception_ptr error = std::current_exception();
                take_oom_or_rethrow(error, "encode", key);
                // The message's "free" is the driver's view at the failure; what this process can
                // use now, with its cache emptied, is the probe's reading.
                const MemoryInfo after = probe_.memory();
                const std::uint64_t free_after = after.free_bytes;
                std::optional<OomReport> report = oom_report(error);
                if (report)
                    report->free_bytes = std::max(report->free_bytes.value_or(0), free_after);
                if (size > 1) {
                    const std::uint64_t next = policy::size_after_oom(tried, report);
                    {
                        std::lock_guard<std::mutex> lock(memory.mutex);
                        policy::on_oom(memory.*state_of, tried, next, free_after);
                        memory.publish();
                        persist_on_exit.learned = true;
                    }
                    stats_.bump(stats_.halvings);
                    log(Level::warn,
                        "encode " + key.describe() + ": out of memory on a batch of " +
                            std::to_string(size) + " items" +
                            (weights ? " (weight " + std::to_string(tried) + ")" : "") +
                            "; released the allocator cache, retrying at " +
                            (weights ? "weight budget " : "") + std::to_string(next) + " (" +
                            describe(error) + ")");
                    continue;
                }
                ++alone_failures;
                const bool hopeless = asked_for_more_than_the_device(error, after.total_bytes);
                if (alone_failures >= options_.single_item_attempts || hopeless) {
                    log(Level::warn, "encode " + key.describe() + ": item " + std::to_string(pos) +
                                         " ran out of memory alone " +
                                         std::to_string(alone_failures) +
                                         " times; giving up on it");
                    OomExhausted exhausted(
                        "vramguard: encode " + key.describe() + ": item " + std::to_string(pos) +
                            " ran out of memory even alone " +
                            given_up_because(hopeless, alone_failures, after.total_bytes) +
                            " The " + std::to_string(pos) +
                            " results before it are kept in OomExhausted::finished_results(). Last "
                            "error: " +
                            describe(error),
                        key.describe(), pos, alone_failures);
                    if constexpr (!std::is_void_v<Out>)
                        exhausted.keep_finished_results(std::move(results));
                    std::throw_with_nested(std::move(exhausted));
                }
                log(Level::warn, "encode " + key.describe() + ": item " + std::to_string(pos) +
                                     " ran out of memory alone (attempt " +
                                     std::to_string(alone_failures) + " of " +
                                     std::to_string(options_.single_item_attempts) +
                                     "); released the allocator cache, waiting for memory (" +
                                     describe(error) + ")");
                stats_.bump(stats_.retries);
                if (report && report->requested_bytes > 0)
                    wait_for_memory(report->requested_bytes, options_.retry_delay, free_after);
                else
                    options_.sleep(options_.poll_interval);
                continue;
            }

            if constexpr (!std::is_void_v<Out>) {
                if (produced.size() != size)
                    throw std::length_error(
                        "vramguard::Guard::encode " + key.describe() + ": batch_fn returned " +
                        std::to_string(produced.size()) + " results for " + std::to_string(size) +
                        " items (items " + std::to_string(pos) + ".." +
                        std::to_string(pos + size - 1) + "); it must return exactly one per item");
                if (results.empty() && size == n) {
                    results = std::move(produced);  // one chunk: its vector is the answer
                } else {
                    if (results.empty()) results.reserve(n);
                    std::move(produced.begin(), produced.end(), std::back_inserter(results));
                }
            }
            pos += size;
            cursor = chunk_end;
            alone_failures = 0;
            bool grew = false;
            // A success below the ceiling that is no larger than one seen before teaches nothing:
            // no lock for it (the common case once a size is learned or none is needed).
            if (at_ceiling || tried > published.largest_success.load(std::memory_order_acquire)) {
                std::unique_lock<std::mutex> lock(memory.mutex);
                policy::CeilingState& state = memory.*state_of;
                std::uint64_t free_now = 0;
                if (at_ceiling && policy::wants_memory_reading(state, rule)) {
                    lock.unlock();
                    free_now = probe_.memory().free_bytes;
                    lock.lock();
                }
                const std::uint64_t before = state.ceiling;
                const std::uint64_t learned_before = policy::learned(state);
                grew = policy::on_success(state, at_ceiling, tried, rule, free_now);
                memory.publish();
                if (policy::learned(state) != learned_before) persist_on_exit.learned = true;
                if (grew) limit = before;
            }
            if (grew) {
                stats_.bump(stats_.grow_backs);
                log(Level::info, "encode " + key.describe() + ": " +
                                     std::to_string(options_.grow_after_successes) +
                                     " batches at " + std::to_string(limit) +
                                     " succeeded; trying larger batches");
            }
        }
        if constexpr (std::is_void_v<Out>)
            return;
        else
            return results;
    }

    Probe& probe_;
    const Options options_;
    ProfileCache profiles_;
    std::shared_ptr<Semaphore> single_item_;
    const std::uint64_t id_ = next_guard_id();
    detail::AtomicStats stats_;
    std::mutex keys_mutex_;
    std::unordered_map<std::uint64_t, std::unique_ptr<KeyMemory>> keys_;
    std::atomic<std::uint64_t> measurements_{0};  // see Measurement
    detail::StripedCounter in_flight_;
    std::atomic<std::int64_t> last_recovery_ms_{-1};
};

VRAMGUARD_END_NAMESPACE
