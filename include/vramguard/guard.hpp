// SPDX-License-Identifier: MIT
// Guard<Probe>: the facade users see. load() admits, measures and retries a model load; encode()
// runs a batched computation in chunks planned from what the key costs and what is free, shrinking
// on OOM down to single items. The per-device services live in one core (detail/guard_core.hpp);
// each call is a run over it (detail/load_run.hpp, detail/encode_run.hpp) whose decisions are pure
// functions in policy.hpp. One guard per device, shared by every thread that uses the device.
#pragma once

#include <vramguard/admission.hpp>
#include <vramguard/batch_view.hpp>
#include <vramguard/detail/encode_run.hpp>
#include <vramguard/detail/guard_core.hpp>
#include <vramguard/detail/load_run.hpp>
#include <vramguard/key.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <cstdint>
#include <iterator>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

template <class Probe>
class Guard {
   public:
    explicit Guard(Probe& probe, Options options = {}) : core_(probe, std::move(options)) {}

    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;

    // ---- load --------------------------------------------------------------------------------

    // Runs `fn` (a model load) once admitted; the requirement is the measured peak for `key` x
    // history_headroom, or first_run_fraction of the device when never measured.
    template <class F>
    std::invoke_result_t<F&> load(const Key& key, F&& fn) {
        return detail::LoadRun<Probe>(core_, key, std::nullopt).run(fn);
    }
    // The same with the caller's own estimate, which beats any measurement.
    template <class F>
    std::invoke_result_t<F&> load(const Key& key, std::uint64_t declared_bytes, F&& fn) {
        if (declared_bytes == 0)
            throw std::invalid_argument("vramguard::Guard::load: declared_bytes must be > 0 for " +
                                        key.describe());
        return detail::LoadRun<Probe>(core_, key, declared_bytes).run(fn);
    }

    // ---- encode ------------------------------------------------------------------------------

    // batch_fn(BatchView) returns one result per item (std::vector<R>) or nothing. Returns the
    // results in input order (std::vector<R>), or nothing. Every form takes an EncodeOptions last
    // (a first-chunk hint, a deadline for the call's waits).
    template <class It, class F, class = typename std::iterator_traits<It>::iterator_category>
    auto encode(const Key& key, It first, It last, F&& batch_fn, const EncodeOptions& call = {}) {
        return run_encode(key, first, last, batch_fn, call);
    }
    template <class Range, class F, class = detail::range_iterator_t<Range>>
    auto encode(const Key& key, const Range& items, F&& batch_fn, const EncodeOptions& call = {}) {
        return run_encode(key, std::begin(items), std::end(items), batch_fn, call);
    }
    // Weighted form: weight_fn(item) -> tokens, pixels, samples. The learned limit is a weight
    // budget: batches are cut where the next item would exceed it. Wrap weight_fn in padded() when
    // batches are padded to their longest item. A weight below 1 counts as 1; a negative or NaN
    // weight is std::invalid_argument.
    template <class Range, class F, class W,
              class = std::enable_if_t<detail::is_weight_fn<
                  Range, detail::unpadded_t<std::remove_reference_t<W>>>::value>>
    auto encode(const Key& key, const Range& items, F&& batch_fn, W&& weight_fn,
                const EncodeOptions& call = {}) {
        auto& weight_of = detail::unpadded(weight_fn);
        std::vector<std::uint64_t> weights;
        for (const auto& item : items)
            weights.push_back(detail::checked_weight(weight_of(item), weights.size()));
        return run_encode(key, std::begin(items), std::end(items), batch_fn, call, &weights,
                          detail::is_padded<std::decay_t<W>>::value);
    }

    // ---- what it knows -----------------------------------------------------------------------

    Stats stats() const noexcept {
        Stats stats = core_.stats().snapshot();
        stats.profile_writes = core_.profiles().writes();
        stats.profile_write_failures = core_.profiles().write_failures();
        return stats;
    }
    const Options& options() const noexcept { return core_.options(); }
    Probe& probe() noexcept { return core_.probe(); }
    ProfileCache& profiles() noexcept { return core_.profiles(); }

    // Writes what the guard learned and has not yet written to the profile files, now, on the
    // calling thread (the background writer does it at most once per persist_interval, and the
    // destructor at the end). Never throws: a failing disk is logged and counted.
    void flush() noexcept { core_.profiles().flush(); }

    // The latest limit that cut a batch of `key` (items) / a weighted batch (weight); 0 when
    // nothing has limited one yet.
    std::uint64_t learned_batch_ceiling(const Key& key) {
        return core_.key_memory(key).learned(false);
    }
    std::uint64_t learned_weight_budget(const Key& key) {
        return core_.key_memory(key).learned(true);
    }
    // What a chunk of `key` costs, as fitted from its recent measured chunks (not known: no
    // samples yet, or a probe that measures no peaks).
    policy::CostModel cost_model(const Key& key, bool weighted = false) {
        detail::KeyMemory& memory = core_.key_memory(key);
        std::lock_guard<std::mutex> lock(memory.mutex);
        return (weighted ? memory.weight : memory.items).model;
    }

    // One admission reading, reserving nothing: would a load of `key` start now?
    Admission admission(const Key& key,
                        std::optional<std::uint64_t> declared_bytes = std::nullopt) {
        const MemoryInfo memory = core_.probe().memory();
        return core_.admission().peek(
            core_.requirement_for(key, declared_bytes, memory.total_bytes), memory);
    }

    // After an unload of `expected_freed` bytes (free was `free_before`): polls until the driver
    // reports recovery_fraction of them, or `needed_free` is free, at most recovery_timeout; then
    // trusts the estimate. Returns whether the memory was seen (true) or only trusted (false).
    bool wait_for_freed_memory(std::uint64_t expected_freed, std::uint64_t free_before,
                               std::uint64_t needed_free = 0) {
        return core_.admission().wait_for_freed_memory(expected_freed, free_before, needed_free);
    }

   private:
    template <class It, class F>
    auto run_encode(const Key& key, It first, It last, F& batch_fn, const EncodeOptions& call,
                    const std::vector<std::uint64_t>* weights = nullptr, bool padded = false) {
        static_assert(
            std::is_base_of_v<std::forward_iterator_tag,
                              typename std::iterator_traits<It>::iterator_category>,
            "vramguard::Guard::encode needs forward iterators: a chunk that runs out of memory is "
            "run again from its first item. Copy single-pass input (std::istream_iterator) into a "
            "std::vector first");
        core_.stats().calls.add(1);
        const std::size_t n = static_cast<std::size_t>(std::distance(first, last));
        const typename detail::GuardCore<Probe>::CallInFlight in_flight(core_);
        detail::EncodeRun<Probe, It, F> run(core_, key, first, n, batch_fn, call, weights, padded);
        return run.run();
    }

    detail::GuardCore<Probe> core_;
};

VRAMGUARD_END_NAMESPACE
