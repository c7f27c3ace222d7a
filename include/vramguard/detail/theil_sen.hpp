// SPDX-License-Identifier: MIT
// The Theil-Sen slope (the median of the slopes between every two samples of different sizes),
// which policy::fit_cost uses for a key's cost per unit: one wrong reading cannot move it. No
// allocation: the pairs of at most `Window` samples fit on the stack.
#pragma once

#include <vramguard/version.hpp>

#include <algorithm>
#include <cstddef>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

inline double median_in_place(double* first, double* last) noexcept {
    const std::size_t n = static_cast<std::size_t>(last - first);
    double* middle = first + n / 2;
    std::nth_element(first, middle, last);
    if (n % 2 == 1) return *middle;
    return (*middle + *std::max_element(first, middle)) / 2;
}

// The slope of the first `count` (<= Window) samples, each with `size` and `peak_bytes` (0 when no
// two sizes differ).
template <std::size_t Window, class It>
double theil_sen_slope(It first, std::size_t count) noexcept {
    double slopes[Window * (Window - 1) / 2];
    std::size_t pairs = 0;
    It a = first;
    for (std::size_t i = 0; i < count && i < Window; ++i, ++a) {
        It b = first;
        for (std::size_t j = 0; j < i; ++j, ++b) {
            if (b->size == a->size) continue;
            slopes[pairs++] =
                (static_cast<double>(a->peak_bytes) - static_cast<double>(b->peak_bytes)) /
                (static_cast<double>(a->size) - static_cast<double>(b->size));
        }
    }
    return pairs > 0 ? median_in_place(slopes, slopes + pairs) : 0;
}

}  // namespace detail
VRAMGUARD_END_NAMESPACE
