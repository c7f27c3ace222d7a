// SPDX-License-Identifier: MIT
// How an encode call's items are counted and cut into chunks: the weights as the learner counts
// them (whole units, at least 1; none given: every item counts 1), padded or summed, and where a
// limit cuts the next chunk (policy::cut_by_weight / cut_by_padded_weight).
#pragma once

#include <vramguard/batch_view.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

// A weight as the learner counts it: a whole number of units, at least 1 (an item of weight 0
// still takes memory, and a budget of zero-weight items would never shrink); a fraction rounds
// up, and anything past 2^64 saturates. NaN and negative weights are the caller's bug, named with
// the item, before any batch runs.
template <class W>
std::uint64_t checked_weight(W weight, std::size_t index) {
    auto refuse = [index](const std::string& value) {
        return std::invalid_argument("vramguard::Guard::encode: weight_fn returned " + value +
                                     " for item " + std::to_string(index) +
                                     "; a weight must be >= 0");
    };
    if constexpr (std::is_floating_point_v<W>) {
        if (!(weight >= 0)) throw refuse(std::to_string(weight));
        if (!(weight < 1.8e19)) return std::numeric_limits<std::uint64_t>::max();
        return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::ceil(weight)));
    } else {
        if constexpr (std::is_signed_v<W>) {
            if (weight < 0) throw refuse(std::to_string(weight));
        }
        return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(weight));
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

// One chunk as a limit cuts it.
struct ChunkCut {
    std::size_t size = 0;     // items
    std::uint64_t tried = 0;  // its size as the learner counts it (items or weight)
    bool at_limit = false;    // cut by the limit (not by the end of the input)
    bool lone_item = false;   // one item that the limit allows no company
};

class ChunkWeights {
   public:
    // `weights`: one per item (nullptr: every item counts 1); `padded`: a batch costs its size x
    // its heaviest item, else the sum.
    ChunkWeights(const std::vector<std::uint64_t>* weights, bool padded, std::size_t n) noexcept
        : weights_(weights), padded_(padded), n_(n) {}

    bool weighted() const noexcept { return weights_ != nullptr; }
    // The lightest item's weight (1 without weights).
    std::uint64_t lightest() const {
        return weights_ && !weights_->empty()
                   ? *std::min_element(weights_->begin(), weights_->end())
                   : 1;
    }

    // The next chunk from item `pos` under `limit` (0: no limit).
    ChunkCut cut(std::size_t pos, std::uint64_t limit) const {
        if (weights_) return cut_weighted(pos, limit);
        ChunkCut chunk;  // items: the fast path, kept small enough to inline
        chunk.size = limit == 0
                         ? n_ - pos
                         : static_cast<std::size_t>(std::min<std::uint64_t>(limit, n_ - pos));
        chunk.lone_item = limit == 1;
        chunk.tried = chunk.size;
        chunk.at_limit = limit != 0 && chunk.size == limit;
        return chunk;
    }

   private:
    VRAMGUARD_NOINLINE ChunkCut cut_weighted(std::size_t pos, std::uint64_t limit) const {
        ChunkCut chunk;
        auto weight_at = [this](std::size_t i) { return (*weights_)[i]; };
        chunk.size = padded_ ? policy::cut_by_padded_weight(pos, n_, limit, weight_at)
                             : policy::cut_by_weight(pos, n_, limit, weight_at);
        // Alone when not even two such items fit the limit.
        chunk.lone_item =
            chunk.size == 1 && limit != 0 &&
            (pos + 1 < n_ ? batch_weight(pos, 2)
                          : policy::saturating_add(weight_at(pos), weight_at(pos))) > limit;
        chunk.tried = batch_weight(pos, chunk.size);
        chunk.at_limit = limit != 0 && (pos + chunk.size < n_ || chunk.lone_item);
        return chunk;
    }

    // A batch's weight: the sum of its items', or with padding its size x its heaviest.
    std::uint64_t batch_weight(std::size_t begin, std::size_t count) const {
        std::uint64_t total = 0, heaviest = 0;
        for (std::size_t i = begin; i < begin + count; ++i) {
            total = policy::saturating_add(total, (*weights_)[i]);
            heaviest = std::max(heaviest, (*weights_)[i]);
        }
        return padded_ ? policy::scale_bytes(heaviest, static_cast<double>(count)) : total;
    }

    const std::vector<std::uint64_t>* weights_;
    bool padded_;
    std::size_t n_;
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
