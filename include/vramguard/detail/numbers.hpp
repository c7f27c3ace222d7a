// SPDX-License-Identifier: MIT
// Saturating byte arithmetic, and numbers as the messages say them (percent, seconds, ms).
#pragma once

#include <vramguard/version.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {
// "10%": a fraction of the device (a margin, a threshold, a usage) as log lines say it.
inline std::string percent(double fraction) {
    char text[16];
    std::snprintf(text, sizeof text, "%.0f%%", fraction * 100);
    return text;
}

// Byte counts from probes and callers can be absurd (2^64 - 1, usage beyond the device): sums
// stop at the largest value and differences at zero instead of wrapping around.
constexpr std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) noexcept {
    return a > std::numeric_limits<std::uint64_t>::max() - b
               ? std::numeric_limits<std::uint64_t>::max()
               : a + b;
}
constexpr std::uint64_t saturating_sub(std::uint64_t a, std::uint64_t b) noexcept {
    return a > b ? a - b : 0;
}
inline std::string seconds_text(double seconds) {
    char text[32];
    std::snprintf(text, sizeof text, "%.1f s", seconds);
    return text;
}
// Any duration, in ms: options in ms are not converted to the clock's ns on the way (a
// milliseconds::max() "for ever" would overflow).
template <class Rep, class Period>
std::string ms_text(std::chrono::duration<Rep, Period> d) {
    return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
