// SPDX-License-Identifier: MIT
// Memory facts: what a probe reports, and bytes a person can read.
#pragma once

#include <vramguard/detail/numbers.hpp>
#include <vramguard/version.hpp>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

// What this process could allocate on one device now, and the device's size.
struct MemoryInfo {
    std::uint64_t free_bytes = 0;
    std::uint64_t total_bytes = 0;

    std::uint64_t used_bytes() const noexcept {
        return total_bytes > free_bytes ? total_bytes - free_bytes : 0;
    }
    // Fraction of the device in use, 0 for an empty report.
    double usage() const noexcept {
        return total_bytes == 0
                   ? 0.0
                   : static_cast<double>(used_bytes()) / static_cast<double>(total_bytes);
    }
    friend bool operator==(const MemoryInfo& a, const MemoryInfo& b) noexcept {
        return a.free_bytes == b.free_bytes && a.total_bytes == b.total_bytes;
    }
    friend bool operator!=(const MemoryInfo& a, const MemoryInfo& b) noexcept { return !(a == b); }
};

inline constexpr std::uint64_t KiB = 1024;
inline constexpr std::uint64_t MiB = 1024 * KiB;
inline constexpr std::uint64_t GiB = 1024 * MiB;

// "512 B", "1.50 KiB", "6.00 GiB": binary units with two decimals, as PyTorch prints them.
inline std::string format_bytes(std::uint64_t bytes) {
    if (bytes < KiB) return std::to_string(bytes) + " B";
    static const char* const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double value = static_cast<double>(bytes) / 1024.0;
    int unit = 0;
    while (value >= 1024.0 && unit < 5) {
        value /= 1024.0;
        ++unit;
    }
    char text[32];
    std::snprintf(text, sizeof text, "%.2f %s", value, units[unit]);
    return text;
}

namespace literals {
constexpr std::uint64_t operator""_B(unsigned long long n) { return n; }
constexpr std::uint64_t operator""_KiB(unsigned long long n) { return n * KiB; }
constexpr std::uint64_t operator""_MiB(unsigned long long n) { return n * MiB; }
constexpr std::uint64_t operator""_GiB(unsigned long long n) { return n * GiB; }
}  // namespace literals

VRAMGUARD_END_NAMESPACE
