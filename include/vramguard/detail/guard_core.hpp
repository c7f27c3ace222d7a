// SPDX-License-Identifier: MIT
// GuardCore<Probe>: the per-device services every load and encode run of a guard uses, in one
// object the runs receive by reference: the probe and options, admission, the run tracker (who
// else is running), the claims of the chunks in flight, the device's single-item turn, event
// publishing into the stats and the log, and the key table (what was learned per key) with its
// persistence. Guard is the facade over it; LoadRun (load_run.hpp) and EncodeRun (encode_run.hpp)
// orchestrate with it, and every decision they take is a pure function in policy.hpp.
#pragma once

#include <vramguard/detail/admission_control.hpp>
#include <vramguard/detail/claims.hpp>
#include <vramguard/detail/key_memory.hpp>
#include <vramguard/detail/run_tracker.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/events.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/semaphore.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
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

// What identifies the device for the shared single-item semaphore: the probe's device_key(), or
// the probe object itself.
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

template <class Probe>
class GuardCore {
   public:
    static constexpr bool measures_peaks = has_peak_tracking<Probe>::value;

    GuardCore(Probe& probe, Options options)
        : probe_(probe),
          options_((options.validate(), std::move(options))),
          profiles_(options_.profile_dir, options_.persist, options_.log,
                    ProfileCacheSettings{options_.persist_interval, options_.profile_max_age}),
          single_item_(shared_device_semaphore(
              device_identity(probe),
              static_cast<std::ptrdiff_t>(options_.single_item_concurrency))),
          admission_(probe_, options_, stats_) {}

    GuardCore(const GuardCore&) = delete;
    GuardCore& operator=(const GuardCore&) = delete;

    Probe& probe() noexcept { return probe_; }
    const Options& options() const noexcept { return options_; }
    ProfileCache& profiles() noexcept { return profiles_; }
    const ProfileCache& profiles() const noexcept { return profiles_; }
    AdmissionControl<Probe>& admission() noexcept { return admission_; }
    RunTracker& runs() noexcept { return runs_; }
    Claims& claims() noexcept { return claims_; }
    Semaphore& single_item() noexcept { return *single_item_; }
    AtomicStats& stats() noexcept { return stats_; }
    const AtomicStats& stats() const noexcept { return stats_; }

    // Counts the event and, past Options::log_level, formats and logs it.
    void publish(const Event& event) {
        detail::publish(stats_, options_.log, options_.log_level, event);
    }

    // One load or encode chunk while it runs: registered with the run tracker, and when
    // `measured` (and the probe measures peaks), its peak is read at the end, counted only when
    // no other run of this guard overlapped it.
    class Measurement {
       public:
        Measurement(GuardCore& core, bool measured, bool exclusive = false)
            : core_(core), run_(core.runs_, measured && measures_peaks, exclusive) {
            if constexpr (measures_peaks) {
                if (!run_.started_solo()) return;
                core.probe_.reset_peak();
                baseline_ = core.probe_.peak_bytes();
            }
        }
        // Bytes this run added at its peak, when it ran alone.
        std::optional<std::uint64_t> peak() const {
            if constexpr (measures_peaks) {
                // The peak first, then the check: a run that starts after the check could still
                // allocate before a later reading and be booked as ours.
                if (!run_.started_solo()) return std::nullopt;
                const std::uint64_t peak = core_.probe_.peak_bytes();
                if (!run_.solo_so_far()) return std::nullopt;
                return peak > baseline_ ? peak - baseline_ : 0;
            } else {
                return std::nullopt;
            }
        }

       private:
        GuardCore& core_;
        RunTracker::Run run_;
        std::uint64_t baseline_ = 0;
    };

    // One encode call in flight, for "is this guard's only call in flight?" (an encode's
    // refusal: memory held by the guard's other calls comes back when they finish).
    class CallInFlight {
       public:
        explicit CallInFlight(GuardCore& core) : core_(core) { core.calls_in_flight_.add(1); }
        ~CallInFlight() { core_.calls_in_flight_.add(-1); }
        CallInFlight(const CallInFlight&) = delete;
        CallInFlight& operator=(const CallInFlight&) = delete;

       private:
        GuardCore& core_;
    };
    bool only_call_in_flight() const noexcept { return calls_in_flight_.sum() <= 1; }

    // A load's requirement (policy::required_bytes); a measured peak that fits the device ran on
    // it, so x history_headroom it is capped at what the empty device admits.
    policy::Requirement requirement_for(const Key& key, std::optional<std::uint64_t> declared,
                                        std::uint64_t total_bytes) {
        const std::uint64_t measured =
            declared ? 0 : key_memory(key).load_peak.load(std::memory_order_acquire);
        policy::Requirement requirement =
            policy::required_bytes(declared, measured, total_bytes, options_.history_headroom,
                                   options_.first_run_fraction);
        if (requirement.source == policy::RequirementSource::measured)
            requirement.bytes = policy::capped_by_device(requirement.bytes, measured <= total_bytes,
                                                         total_bytes, options_.safety_margin);
        return requirement;
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

    // Why a load or an item was given up on, for OomExhausted's message: retried and waited for
    // in vain (up to `delay` each time), or not retried at all because it asked for more than
    // the device has.
    static std::string given_up_because(bool hopeless, unsigned attempts, std::uint64_t total,
                                        std::chrono::milliseconds delay) {
        if (hopeless)
            return "asking for more than the whole device (" + format_bytes(total) +
                   "), so it was not retried.";
        return std::to_string(attempts) +
               " times; the allocator cache was released and memory waited for (up to " +
               std::to_string(delay.count()) + " ms) before each retry.";
    }

    // The learned state of `key`, created from its profile on first use. A server encodes with one
    // key over and over, so each thread remembers its last lookup (core ids are never reused, so
    // the remembered pointer cannot outlive its core's map).
    KeyMemory& key_memory(const Key& key) {
        struct LastLookup {
            std::uint64_t core_id = 0;
            std::uint64_t key = 0;
            KeyMemory* memory = nullptr;
        };
        thread_local LastLookup last;
        if (last.core_id == id_ && last.key == key.value()) return *last.memory;
        KeyMemory* found = nullptr;
        {
            std::lock_guard<std::mutex> lock(keys_mutex_);
            if (auto it = keys_.find(key.value()); it != keys_.end()) found = it->second.get();
        }
        if (!found) {
            const Profile profile = profiles_.get(key);  // may read a file: outside the lock
            auto created = std::make_unique<KeyMemory>();
            created->seed(profile);
            std::lock_guard<std::mutex> lock(keys_mutex_);
            auto& slot = keys_[key.value()];
            if (!slot) slot = std::move(created);  // another thread may have won the race
            found = slot.get();
        }
        last = {id_, key.value(), found};
        return *found;
    }

    // A load's measured peak, into the profile and the key's requirement.
    void record_load_peak(const Key& key, std::optional<std::uint64_t> peak) {
        if (!peak || *peak == 0) return;
        profiles_.record_peak(key, *peak);
        // The profile's highest recent peak: one wrong reading ages out with its window.
        key_memory(key).load_peak.store(profiles_.get(key).peak_bytes, std::memory_order_release);
    }

    // Hands what an encode call learned (new samples, a new limit) to the profile cache, once per
    // call, after its last chunk, never while a chunk or a single-item turn is held. Memory only:
    // the cache's writer thread writes the files (persist_interval), never this call.
    void persist_learned(const Key& key, KeyMemory& memory) noexcept {
        try {
            std::vector<ProfileSample> items, weight;
            std::uint64_t items_limit = 0, weight_limit = 0;
            {
                std::lock_guard<std::mutex> lock(memory.mutex);
                items.swap(memory.items.unsaved);
                weight.swap(memory.weight.unsaved);
                items_limit = memory.items.take_changed_limit();
                weight_limit = memory.weight.take_changed_limit();
            }
            profiles_.record_samples(key, &Profile::item_samples, items);
            profiles_.record_samples(key, &Profile::weight_samples, weight);
            if (items_limit != 0) profiles_.record_batch_ceiling(key, items_limit);
            if (weight_limit != 0) profiles_.record_weight_budget(key, weight_limit);
        } catch (...) {
            // Out of memory for the bookkeeping itself: the profile misses this call's lessons.
        }
    }

   private:
    static std::uint64_t next_core_id() noexcept {
        static std::atomic<std::uint64_t> next{1};
        return next.fetch_add(1, std::memory_order_relaxed);
    }

    Probe& probe_;
    const Options options_;
    ProfileCache profiles_;
    std::shared_ptr<Semaphore> single_item_;
    const std::uint64_t id_ = next_core_id();
    AtomicStats stats_;
    AdmissionControl<Probe> admission_;
    std::mutex keys_mutex_;
    std::unordered_map<std::uint64_t, std::unique_ptr<KeyMemory>> keys_;
    RunTracker runs_{measures_peaks};
    Claims claims_;
    StripedCounter calls_in_flight_;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
