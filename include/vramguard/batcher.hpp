// SPDX-License-Identifier: MIT
// Batcher: a memory-aware dynamic batcher for a server whose request threads encode with one key at
// once. Each caller's items are queued; one caller at a time leads (no thread of its own): it takes
// every queued item of every caller and runs them through Guard::encode, so batches are sized by
// the key's learned cost model against the live reading (the same planner, OOM recovery and
// single-item turns as encode), and items that arrive meanwhile form the next gathering. With
// padded weights the gathered items are grouped by weight, so short texts are not padded to long
// ones. Each caller gets its own results, in its order; an item that fails even alone fails only
// its own caller's call.
//
//   auto batcher = vramguard::make_batcher<std::string>(guard, key, embed_batch,
//                                                        vramguard::padded(tokens_of));
//   std::vector<Embedding> mine = batcher.encode(std::move(texts));   // from any thread
#pragma once

#include <vramguard/batcher_options.hpp>
#include <vramguard/detail/batcher_core.hpp>
#include <vramguard/guard.hpp>
#include <vramguard/key.hpp>
#include <vramguard/options.hpp>
#include <vramguard/version.hpp>

#include <future>
#include <memory>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

// Item: the callers' item type. F: batch_fn(BatchView<...>) -> std::vector<Result>, one result
// per item, as for Guard::encode (the view's items are `const Item&`). W: a weight function
// (tokens, pixels), padded(weight_fn), or detail::NoWeight (every item counts 1).
//
// Every member may be called from many threads at once. The guard must outlive the batcher and
// every future submit() returned.
template <class Item, class Probe, class F, class W = detail::NoWeight>
class Batcher {
    using Core = detail::BatcherCore<Item, Probe, F, W>;

   public:
    using Result = typename Core::Result;

    Batcher(Guard<Probe>& guard, Key key, F batch_fn, W weight_fn = {}, BatcherOptions options = {})
        : core_(std::make_shared<Core>(guard, std::move(key), std::move(batch_fn),
                                       std::move(weight_fn), options)) {}

    Batcher(Batcher&&) noexcept = default;
    Batcher& operator=(Batcher&&) = delete;
    Batcher(const Batcher&) = delete;
    Batcher& operator=(const Batcher&) = delete;

    // Fails the calls still queued with BatcherClosed, then waits for the batches running now
    // (their callers get their results). No thread is left behind: the batcher has none.
    ~Batcher() {
        if (core_) core_->close();
    }

    // Queues `items` with every other caller's, waits for their results (taking its turn as the
    // batch leader when no batch runs) and returns them in input order. Throws Overloaded (the
    // queue is full: retry after retry_after()), DeadlinePassed (`call.deadline`, on the guard's
    // clock, passed first: its items still queued are removed before they run), BatcherClosed,
    // OomExhausted (one of these items ran out of memory even alone), or what batch_fn threw for
    // a batch that held these items (other callers' items in that batch fail with it too).
    std::vector<Result> encode(std::vector<Item> items, const EncodeOptions& call = {}) {
        return core_->wait(core_->enqueue(std::move(items)), call.deadline);
    }

    // The same without blocking: the items are queued now and run with the other callers'
    // batches; the future is deferred: get() waits as encode() does (and leads when no batch
    // runs). Overloaded and BatcherClosed are thrown here, at once.
    std::future<std::vector<Result>> submit(std::vector<Item> items,
                                            const EncodeOptions& call = {}) {
        auto queued = core_->enqueue(std::move(items));
        return std::async(std::launch::deferred,
                          [core = core_, queued = std::move(queued), deadline = call.deadline] {
                              return core->wait(queued, deadline);
                          });
    }

    BatcherStats stats() const noexcept { return core_->stats(); }
    const BatcherOptions& options() const noexcept { return core_->options(); }

   private:
    std::shared_ptr<Core> core_;
};

// make_batcher<Item>(guard, key, batch_fn [, weight_fn [, options]]).
template <class Item, class Probe, class F>
Batcher<Item, Probe, std::decay_t<F>> make_batcher(Guard<Probe>& guard, Key key, F&& batch_fn) {
    return {guard, std::move(key), std::forward<F>(batch_fn)};
}
template <class Item, class Probe, class F>
Batcher<Item, Probe, std::decay_t<F>> make_batcher(Guard<Probe>& guard, Key key, F&& batch_fn,
                                                   BatcherOptions options) {
    return {guard, std::move(key), std::forward<F>(batch_fn), detail::NoWeight{}, options};
}
template <class Item, class Probe, class F, class W>
Batcher<Item, Probe, std::decay_t<F>, std::decay_t<W>> make_batcher(Guard<Probe>& guard, Key key,
                                                                    F&& batch_fn, W&& weight_fn,
                                                                    BatcherOptions options = {}) {
    return {guard, std::move(key), std::forward<F>(batch_fn), std::forward<W>(weight_fn), options};
}

VRAMGUARD_END_NAMESPACE
