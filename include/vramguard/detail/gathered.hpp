// SPDX-License-Identifier: MIT
// The items a Batcher gathered from its callers, as one input for Guard::encode: a random-access
// view over pointers to the callers' own items (nothing is copied), so batch_fn sees `const Item&`
// exactly as with Guard::encode on a vector of items.
#pragma once

#include <vramguard/version.hpp>

#include <cstddef>
#include <iterator>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

template <class Item>
class GatheredIterator {
   public:
    using iterator_category = std::random_access_iterator_tag;
    using value_type = Item;
    using difference_type = std::ptrdiff_t;
    using pointer = const Item*;
    using reference = const Item&;

    GatheredIterator() = default;
    explicit GatheredIterator(const Item* const* at) noexcept : at_(at) {}

    reference operator*() const noexcept { return **at_; }
    pointer operator->() const noexcept { return *at_; }
    reference operator[](difference_type n) const noexcept { return *at_[n]; }

    GatheredIterator& operator++() noexcept { return ++at_, *this; }
    GatheredIterator operator++(int) noexcept { return GatheredIterator(at_++); }
    GatheredIterator& operator--() noexcept { return --at_, *this; }
    GatheredIterator operator--(int) noexcept { return GatheredIterator(at_--); }
    GatheredIterator& operator+=(difference_type n) noexcept { return at_ += n, *this; }
    GatheredIterator& operator-=(difference_type n) noexcept { return at_ -= n, *this; }
    friend GatheredIterator operator+(GatheredIterator it, difference_type n) noexcept {
        return it += n;
    }
    friend GatheredIterator operator+(difference_type n, GatheredIterator it) noexcept {
        return it += n;
    }
    friend GatheredIterator operator-(GatheredIterator it, difference_type n) noexcept {
        return it -= n;
    }
    friend difference_type operator-(GatheredIterator a, GatheredIterator b) noexcept {
        return a.at_ - b.at_;
    }
    friend bool operator==(GatheredIterator a, GatheredIterator b) noexcept {
        return a.at_ == b.at_;
    }
    friend bool operator!=(GatheredIterator a, GatheredIterator b) noexcept {
        return a.at_ != b.at_;
    }
    friend bool operator<(GatheredIterator a, GatheredIterator b) noexcept { return a.at_ < b.at_; }
    friend bool operator>(GatheredIterator a, GatheredIterator b) noexcept { return a.at_ > b.at_; }
    friend bool operator<=(GatheredIterator a, GatheredIterator b) noexcept {
        return a.at_ <= b.at_;
    }
    friend bool operator>=(GatheredIterator a, GatheredIterator b) noexcept {
        return a.at_ >= b.at_;
    }

   private:
    const Item* const* at_ = nullptr;
};

// The gathered items as a range (what Guard::encode takes).
template <class Item>
struct Gathered {
    const std::vector<const Item*>* items;
    GatheredIterator<Item> begin() const noexcept { return GatheredIterator<Item>(items->data()); }
    GatheredIterator<Item> end() const noexcept {
        return GatheredIterator<Item>(items->data() + items->size());
    }
};

}  // namespace detail
VRAMGUARD_END_NAMESPACE
