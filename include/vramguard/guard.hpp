// SPDX-License-Identifier: MIT
// Guard<Probe>: the facade users see. load() admits, measures and retries a model load (the loop
// is here); encode() runs a batched computation in chunks planned from what the key costs and what
// is free, shrinking on OOM down to single items (the loop is EncodeRun, encode_run.hpp). One guard
// per device, shared by every thread that uses the device.
#pragma once

#include <vramguard/admission.hpp>
#include <vramguard/batch_view.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/detail/run_tracker.hpp>
#include <vramguard/encode_run.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/events.hpp>
#include <vramguard/key.hpp>
#include <vramguard/key_memory.hpp>
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
          profiles_(options_.profile_dir, options_.persist, options_.log,
                    ProfileCacheSettings{options_.persist_interval, options_.profile_max_age}),
          single_item_(shared_device_semaphore(
              detail::device_identity(probe),
              static_cast<std::ptrdiff_t>(options_.single_item_concurrency))),
          admission_(probe_, options_, stats_) {}

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
    // Weighted form: weight_fn(item) -> tokens, pixels, samples. The learned limit is a weight
    // budget: batches are cut where the next item would exceed it. Wrap weight_fn in padded() when
    // batches are padded to their longest item. A weight below 1 counts as 1; a negative or NaN
    // weight is std::invalid_argument.
    template <class Range, class F, class W,
              class = std::enable_if_t<detail::is_weight_fn<
                  Range, detail::unpadded_t<std::remove_reference_t<W>>>::value>>
    auto encode(const Key& key, const Range& items, F&& batch_fn, W&& weight_fn) {
        auto& weight_of = detail::unpadded(weight_fn);
        std::vector<std::uint64_t> weights;
        for (const auto& item : items)
            weights.push_back(detail::checked_weight(weight_of(item), weights.size()));
        return run_encode(key, std::begin(items), std::end(items), batch_fn, &weights,
                          detail::is_padded<std::decay_t<W>>::value);
    }

    // ---- what it knows -----------------------------------------------------------------------

    Stats stats() const noexcept {
        Stats stats = stats_.snapshot();
        stats.profile_writes = profiles_.writes();
        stats.profile_write_failures = profiles_.write_failures();
        return stats;
    }
    const Options& options() const noexcept { return options_; }
    Probe& probe() noexcept { return probe_; }
    ProfileCache& profiles() noexcept { return profiles_; }

    // Writes what the guard learned and has not yet written to the profile files, now, on the
    // calling thread (the background writer does it at most once per persist_interval, and the
    // destructor at the end). Never throws: a failing disk is logged and counted.
    void flush() noexcept { profiles_.flush(); }

    // The latest limit that cut a batch of `key` (items) / a weighted batch (weight); 0 when
    // nothing has limited one yet.
    std::uint64_t learned_batch_ceiling(const Key& key) { return key_memory(key).learned(false); }
    std::uint64_t learned_weight_budget(const Key& key) { return key_memory(key).learned(true); }
    // What a chunk of `key` costs, as fitted from its recent measured chunks (not known: no
    // samples yet, or a probe that measures no peaks).
    policy::CostModel cost_model(const Key& key, bool weighted = false) {
        detail::KeyMemory& memory = key_memory(key);
        std::lock_guard<std::mutex> lock(memory.mutex);
        return (weighted ? memory.weight : memory.items).model;
    }

    // One admission reading, reserving nothing: would a load of `key` start now?
    Admission admission(const Key& key,
                        std::optional<std::uint64_t> declared_bytes = std::nullopt) {
        const MemoryInfo memory = probe_.memory();
        return admission_.peek(requirement_for(key, declared_bytes, memory.total_bytes), memory);
    }

    // After an unload of `expected_freed` bytes (free was `free_before`): polls until the driver
    // reports recovery_fraction of them, or `needed_free` is free, at most recovery_timeout; then
    // trusts the estimate. Returns whether the memory was seen (true) or only trusted (false).
    bool wait_for_freed_memory(std::uint64_t expected_freed, std::uint64_t free_before,
                               std::uint64_t needed_free = 0) {
        return admission_.wait_for_freed_memory(expected_freed, free_before, needed_free);
    }

   private:
    template <class, class, class>
    friend class detail::EncodeRun;

    static constexpr bool measures_peaks = detail::has_peak_tracking<Probe>::value;

    // One load or encode chunk while it runs: registered with the guard's run tracker, and when
    // `measured` (and the probe measures peaks), its peak is read at the end, counted only when
    // no other run of this guard overlapped it.
    class Measurement {
       public:
        Measurement(Guard& guard, bool measured, bool exclusive = false)
            : guard_(guard), run_(guard.runs_, measured && measures_peaks, exclusive) {
            if constexpr (measures_peaks) {
                if (!run_.started_alone()) return;
                guard.probe_.reset_peak();
                baseline_ = guard.probe_.peak_bytes();
            }
        }
        // Bytes this run added at its peak, when it ran alone.
        std::optional<std::uint64_t> peak() const {
            if constexpr (measures_peaks) {
                // The peak first, then the check: a run that starts after the check could still
                // allocate before a later reading and be booked as ours.
                if (!run_.started_alone()) return std::nullopt;
                const std::uint64_t peak = guard_.probe_.peak_bytes();
                if (!run_.alone_so_far()) return std::nullopt;
                return peak > baseline_ ? peak - baseline_ : 0;
            } else {
                return std::nullopt;
            }
        }

       private:
        Guard& guard_;
        detail::RunTracker::Run run_;
        std::uint64_t baseline_ = 0;
    };

    // One encode call in flight, for "is this guard alone?" (admission's refusal).
    class CallInFlight {
       public:
        explicit CallInFlight(Guard& guard) : guard_(guard) { guard.calls_in_flight_.add(1); }
        ~CallInFlight() { guard_.calls_in_flight_.add(-1); }
        CallInFlight(const CallInFlight&) = delete;
        CallInFlight& operator=(const CallInFlight&) = delete;

       private:
        Guard& guard_;
    };
    bool alone() const noexcept { return calls_in_flight_.sum() <= 1; }

    void publish(const Event& event) {
        detail::publish(stats_, options_.log, options_.log_level, event);
    }

    policy::Requirement requirement_for(const Key& key, std::optional<std::uint64_t> declared,
                                        std::uint64_t total_bytes) {
        const std::uint64_t measured =
            declared ? 0 : key_memory(key).load_peak.load(std::memory_order_acquire);
        return policy::required_bytes(declared, measured, total_bytes, options_.history_headroom,
                                      options_.first_run_fraction);
    }

    template <class F>
    std::invoke_result_t<F&> run_load(const Key& key, std::optional<std::uint64_t> declared,
                                      F& fn) {
        using R = std::invoke_result_t<F&>;
        stats_.calls.add(1);
        for (unsigned attempt = 1;; ++attempt) {
            detail::Admitted admitted = admission_.admit(
                key, "load",
                [&](std::uint64_t total_bytes) {
                    return requirement_for(key, declared, total_bytes);
                },
                [] { return false; });
            std::exception_ptr error;
            try {
                Measurement measurement(*this, true);
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
                error = std::current_exception();
            }
            admitted.hold.reset();
            after_load_oom(key, error, admitted, attempt);
        }
    }

    // A load threw: not an OOM -> rethrown untouched; out of attempts -> OomExhausted; else the
    // cache is emptied and memory waited for before the next attempt.
    void after_load_oom(const Key& key, const std::exception_ptr& error,
                        const detail::Admitted& admitted, unsigned attempt) {
        take_oom_or_rethrow(error, "load", key);
        const std::uint64_t required = admitted.requirement.bytes;
        const std::uint64_t total = admitted.memory.total_bytes;
        const std::optional<OomReport> report = oom_report(error);
        const bool hopeless = asked_for_more_than_the_device(report, total);
        const bool last = attempt >= options_.load_attempts || hopeless;
        Event event(last ? EventKind::load_gave_up : EventKind::load_retry, key, "load");
        event.attempt = attempt;
        event.attempts = options_.load_attempts;
        event.bytes = required;
        event.wait = options_.retry_delay;
        event.error = &error;
        publish(event);
        if (last)
            throw_with_cause(error, [&] {
                return OomExhausted("vramguard: load " + key.describe() + " ran out of memory " +
                                        given_up_because(hopeless, attempt, total) +
                                        " It needed about " + format_bytes(required) +
                                        ". Last error: " + describe(error),
                                    key.describe(), std::nullopt, attempt);
            });
        admission_.wait_for_memory(required, options_.retry_delay,
                                   policy::failure_was_transient(report)
                                       ? std::nullopt
                                       : std::optional<std::uint64_t>(admitted.memory.free_bytes));
    }

    template <class It, class F>
    auto run_encode(const Key& key, It first, It last, F& batch_fn,
                    const std::vector<std::uint64_t>* weights = nullptr, bool padded = false) {
        static_assert(
            std::is_base_of_v<std::forward_iterator_tag,
                              typename std::iterator_traits<It>::iterator_category>,
            "vramguard::Guard::encode needs forward iterators: a chunk that runs out of memory is "
            "run again from its first item. Copy single-pass input (std::istream_iterator) into a "
            "std::vector first");
        stats_.calls.add(1);
        const std::size_t n = static_cast<std::size_t>(std::distance(first, last));
        const CallInFlight in_flight(*this);
        detail::EncodeRun<Guard, It, F> run(*this, key, first, n, batch_fn, weights, padded);
        return run.run();
    }

    // The first answer to anything the caller's work throws: not an OOM -> rethrown untouched,
    // never retried; a driver-level OOM -> counted, logged, rethrown (the CUDA context may be
    // unusable); an allocator OOM -> counted, the cache emptied, and the caller goes on to retry.
    void take_oom_or_rethrow(const std::exception_ptr& error, const char* what, const Key& key) {
        const OomKind kind = classify_oom(error);
        if (kind == OomKind::none) std::rethrow_exception(error);
        Event event(kind == OomKind::driver ? EventKind::driver_oom : EventKind::oom_caught, key,
                    what);
        event.error = &error;
        publish(event);
        if (kind == OomKind::driver) std::rethrow_exception(error);
        probe_.release_cached();
    }

    // An allocation larger than the whole device never succeeds: retrying it only wastes time.
    static bool asked_for_more_than_the_device(const std::optional<OomReport>& report,
                                               std::uint64_t total) noexcept {
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
        // The profile's highest recent peak: one wrong reading ages out with its window.
        key_memory(key).load_peak.store(profiles_.get(key).peak_bytes, std::memory_order_release);
    }

    // The learned state of `key`, created from its profile on first use. A server encodes with one
    // key over and over, so each thread remembers its last lookup (guard ids are never reused, so
    // the remembered pointer cannot outlive its guard's map).
    detail::KeyMemory& key_memory(const Key& key) {
        struct LastLookup {
            std::uint64_t guard_id = 0;
            std::uint64_t key = 0;
            detail::KeyMemory* memory = nullptr;
        };
        thread_local LastLookup last;
        if (last.guard_id == id_ && last.key == key.value()) return *last.memory;
        detail::KeyMemory* found = nullptr;
        {
            std::lock_guard<std::mutex> lock(keys_mutex_);
            if (auto it = keys_.find(key.value()); it != keys_.end()) found = it->second.get();
        }
        if (!found) {
            const Profile profile = profiles_.get(key);  // may read a file: outside the lock
            auto created = std::make_unique<detail::KeyMemory>();
            created->seed(profile);
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

    // Hands what an encode call learned (new samples, a new limit) to the profile cache, once per
    // call, after its last chunk, never while a chunk or a single-item turn is held. Memory only:
    // the cache's writer thread writes the files (persist_interval), never this call.
    void persist_learned(const Key& key, detail::KeyMemory& memory) noexcept {
        try {
            std::vector<ProfileSample> items, weight;
            std::uint64_t items_limit = 0, weight_limit = 0;
            {
                std::lock_guard<std::mutex> lock(memory.mutex);
                items.swap(memory.items.unsaved);
                weight.swap(memory.weight.unsaved);
                items_limit = take_changed_limit(memory.items);
                weight_limit = take_changed_limit(memory.weight);
            }
            profiles_.record_samples(key, &Profile::item_samples, items);
            profiles_.record_samples(key, &Profile::weight_samples, weight);
            if (items_limit != 0) profiles_.record_batch_ceiling(key, items_limit);
            if (weight_limit != 0) profiles_.record_weight_budget(key, weight_limit);
        } catch (...) {
            // Out of memory for the bookkeeping itself: the profile misses this call's lessons.
        }
    }
    static std::uint64_t take_changed_limit(detail::SizeLearner& learner) noexcept {
        const std::uint64_t limit = learner.learned_limit();
        if (limit == 0 || limit == learner.persisted_limit) return 0;
        learner.persisted_limit = limit;
        return limit;
    }

    Probe& probe_;
    const Options options_;
    ProfileCache profiles_;
    std::shared_ptr<Semaphore> single_item_;
    const std::uint64_t id_ = next_guard_id();
    detail::AtomicStats stats_;
    detail::AdmissionControl<Probe> admission_;
    std::mutex keys_mutex_;
    std::unordered_map<std::uint64_t, std::unique_ptr<detail::KeyMemory>> keys_;
    detail::RunTracker runs_{measures_peaks};
    detail::StripedCounter calls_in_flight_;
};

VRAMGUARD_END_NAMESPACE
