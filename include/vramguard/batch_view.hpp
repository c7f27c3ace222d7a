// SPDX-License-Identifier: MIT
// What an encode's batch function is handed: a no-copy view of a contiguous run of the caller's
// items; and padded(), which marks a weight function whose batches are padded to their heaviest
// item.
#pragma once

#include <vramguard/version.hpp>

#include <cstddef>
#include <iterator>
#include <type_traits>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

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

VRAMGUARD_END_NAMESPACE
