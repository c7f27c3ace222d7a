// SPDX-License-Identifier: MIT
// FNV-1a 64 (the hash behind Key and the checksums of vramguard's files), hex16, and the
// escaping of labels: specified byte by byte, the same on every platform (key.hpp).
#pragma once

#include <vramguard/version.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

inline constexpr std::uint64_t fnv1a64_basis = 0xcbf29ce484222325ULL;
inline constexpr std::uint64_t fnv1a64_prime = 0x100000001b3ULL;

// FNV-1a 64: tiny, byte-oriented and the same everywhere; `hash` continues an earlier run.
inline std::uint64_t fnv1a64(std::string_view bytes, std::uint64_t hash = fnv1a64_basis) noexcept {
    for (const char c : bytes) {
        hash ^= static_cast<unsigned char>(c);
        hash *= fnv1a64_prime;
    }
    return hash;
}

// Lengths go in as 8 little-endian bytes whatever the host's byte order.
inline std::uint64_t fnv1a64_u64le(std::uint64_t value, std::uint64_t hash) noexcept {
    for (int i = 0; i < 8; ++i) {
        hash ^= (value >> (8 * i)) & 0xffU;
        hash *= fnv1a64_prime;
    }
    return hash;
}

inline std::uint64_t fnv1a64_string(std::string_view text, std::uint64_t hash) noexcept {
    return fnv1a64(text, fnv1a64_u64le(text.size(), hash));
}

// "0123456789abcdef": exactly 16 lowercase digits.
inline std::string hex16(std::uint64_t value) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string text(16, '0');
    for (int i = 15; i >= 0; --i) {
        text[static_cast<std::size_t>(i)] = digits[value & 0xfU];
        value >>= 4;
    }
    return text;
}

// Keeps a label unambiguous and printable: the label's own punctuation is backslash-escaped and any
// byte outside printable ASCII becomes \xNN, so a label is always one clean log line.
inline void append_label_escaped(std::string& out, std::string_view text) {
    static constexpr char digits[] = "0123456789abcdef";
    for (const char c : text) {
        const auto byte = static_cast<unsigned char>(c);
        if (c == '\\' || c == ',' || c == '=' || c == '{' || c == '}') {
            out += '\\';
            out += c;
        } else if (byte < 0x20 || byte > 0x7e) {
            out += "\\x";
            out += digits[byte >> 4];
            out += digits[byte & 0xfU];
        } else {
            out += c;
        }
    }
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
