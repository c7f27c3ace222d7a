// SPDX-License-Identifier: MIT
// Key: a stable 64-bit identity of "what is being done with which parameters".
//
// The value names profile files on disk and is shared between processes, runs and machines, so it
// is specified byte by byte (below) and never depends on std::hash, endianness or parameter order.
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

// The hash input, version 1 (changing any byte of it changes every key and orphans every stored
// profile, so it is frozen; a new encoding needs a new tag):
//   "vramguard-key-v1"                      16 ASCII bytes
//   u64le(size(name)) name
//   u64le(number of parameters)
//   for each parameter, sorted by name:     u64le(size(name)) name u64le(size(value)) value
// hashed with FNV-1a 64. Length prefixes make every boundary explicit, so names and values may hold
// any bytes at all ('=', ',', '{', NUL) without two different keys meeting.
class Key {
   public:
    using Param = std::pair<std::string_view, std::string_view>;

    // The empty key: the same as Key::of("").
    Key() : Key(std::string_view{}, std::vector<Param>{}) {}

    // Parameter order does not matter; a parameter named twice throws std::invalid_argument.
    static Key of(std::string_view name, std::initializer_list<Param> params = {}) {
        return Key(name, std::vector<Param>(params.begin(), params.end()));
    }
    static Key of(std::string_view name,
                  const std::vector<std::pair<std::string, std::string>>& params) {
        std::vector<Param> views;
        views.reserve(params.size());
        for (const auto& param : params) views.emplace_back(param.first, param.second);
        return Key(name, std::move(views));
    }

    std::uint64_t value() const noexcept { return value_; }
    std::string hex() const { return detail::hex16(value_); }
    const std::string& name() const noexcept { return name_; }
    // "name{a=1,b=2}" with sorted, escaped parameters; just "name" without parameters.
    const std::string& label() const noexcept { return label_; }
    // "name{a=1,b=2} #0123456789abcdef": what logs and errors print.
    std::string describe() const { return label_ + " #" + hex(); }

    // Equal keys have equal values; the label breaks the (astronomically unlikely) value tie, so
    // equality never merges two different keys within one process.
    friend bool operator==(const Key& a, const Key& b) noexcept {
        return a.value_ == b.value_ && a.label_ == b.label_;
    }
    friend bool operator!=(const Key& a, const Key& b) noexcept { return !(a == b); }
    friend bool operator<(const Key& a, const Key& b) noexcept {
        if (a.value_ != b.value_) return a.value_ < b.value_;
        return a.label_ < b.label_;
    }

   private:
    Key(std::string_view name, std::vector<Param> params) : name_(name) {
        std::sort(params.begin(), params.end());
        for (std::size_t i = 1; i < params.size(); ++i) {
            if (params[i].first == params[i - 1].first) {
                std::string shown;
                detail::append_label_escaped(shown, params[i].first);
                throw std::invalid_argument("vramguard::Key \"" + label_for(name, {}) +
                                            "\": parameter \"" + shown + "\" given twice");
            }
        }
        std::uint64_t hash = detail::fnv1a64("vramguard-key-v1");
        hash = detail::fnv1a64_string(name, hash);
        hash = detail::fnv1a64_u64le(params.size(), hash);
        for (const Param& param : params) {
            hash = detail::fnv1a64_string(param.first, hash);
            hash = detail::fnv1a64_string(param.second, hash);
        }
        value_ = hash;
        label_ = label_for(name, params);
    }

    static std::string label_for(std::string_view name, const std::vector<Param>& params) {
        std::string label;
        detail::append_label_escaped(label, name);
        if (params.empty()) return label;
        label += '{';
        for (std::size_t i = 0; i < params.size(); ++i) {
            if (i != 0) label += ',';
            detail::append_label_escaped(label, params[i].first);
            label += '=';
            detail::append_label_escaped(label, params[i].second);
        }
        label += '}';
        return label;
    }

    std::uint64_t value_ = 0;
    std::string name_;
    std::string label_;
};

VRAMGUARD_END_NAMESPACE

// Outside the versioned namespace: the standard only allows specialising std templates here.
namespace std {
template <>
struct hash<vramguard::Key> {
    std::size_t operator()(const vramguard::Key& key) const noexcept {
        return static_cast<std::size_t>(key.value());
    }
};
}  // namespace std
