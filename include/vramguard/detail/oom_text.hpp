// SPDX-License-Identifier: MIT
// Reading OOM messages: case-insensitive search and the sizes a message states ("Tried to
// allocate 2.00 GiB", "3.50 GiB free"), as errors.hpp's classification and parsing use them.
#pragma once

#include <vramguard/version.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <typeindex>
#include <typeinfo>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

inline char ascii_lower(char c) noexcept {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

inline std::size_t find_nocase(std::string_view text, std::string_view needle,
                               std::size_t from = 0) noexcept {
    if (needle.size() > text.size()) return std::string_view::npos;
    for (std::size_t i = from; i + needle.size() <= text.size(); ++i) {
        std::size_t j = 0;
        while (j < needle.size() && ascii_lower(text[i + j]) == ascii_lower(needle[j])) ++j;
        if (j == needle.size()) return i;
    }
    return std::string_view::npos;
}

inline bool contains_nocase(std::string_view text, std::string_view needle) noexcept {
    return find_nocase(text, needle) != std::string_view::npos;
}

// Parses "20.00 MiB", "1.5GiB", "8000000000 bytes" at the start of `text` (after spaces).
// Returns the byte count and how many characters were read.
inline std::optional<std::pair<std::uint64_t, std::size_t>> parse_size(
    std::string_view text) noexcept {
    std::size_t i = 0;
    while (i < text.size() && text[i] == ' ') ++i;
    const std::size_t digits_start = i;
    double whole = 0, fraction = 0, scale = 1;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
        if (whole < 1e30) whole = whole * 10 + (text[i] - '0');
        ++i;
    }
    if (i == digits_start) return std::nullopt;
    if (i < text.size() && text[i] == '.') {
        ++i;
        while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
            if (scale > 1e-18) {
                scale /= 10;
                fraction += (text[i] - '0') * scale;
            }
            ++i;
        }
    }
    while (i < text.size() && text[i] == ' ') ++i;
    struct Unit {
        std::string_view name;
        double bytes;
    };
    static constexpr Unit units[] = {
        {"bytes", 1.0},           {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0},
        {"TiB", 1099511627776.0}, {"KB", 1024.0},  {"MB", 1048576.0},  {"GB", 1073741824.0},
        {"TB", 1099511627776.0},  {"B", 1.0},
    };
    double multiplier = 0;
    for (const Unit& unit : units) {
        if (text.substr(i, unit.name.size()) == unit.name) {
            multiplier = unit.bytes;
            i += unit.name.size();
            break;
        }
    }
    if (multiplier == 0) return std::nullopt;
    const double bytes = (whole + fraction) * multiplier;
    if (!(bytes >= 0) || bytes >= 1.8e19) return std::nullopt;
    return std::make_pair(static_cast<std::uint64_t>(bytes + 0.5), i);
}

// The size written just before `end` in `text` ("... 3.75 MiB free").
inline std::optional<std::uint64_t> parse_size_before(std::string_view text,
                                                      std::size_t end) noexcept {
    std::size_t start = end;
    // Step back over "<number> <unit>" : at most two space-separated tokens.
    int tokens = 0;
    while (start > 0 && text[start - 1] == ' ') --start;
    while (start > 0 && tokens < 2) {
        std::size_t token_end = start;
        while (start > 0 && text[start - 1] != ' ' && text[start - 1] != ';' &&
               text[start - 1] != '(' && text[start - 1] != ',')
            --start;
        if (start == token_end) break;
        ++tokens;
        if (std::isdigit(static_cast<unsigned char>(text[start]))) break;
        while (start > 0 && text[start - 1] == ' ') --start;
    }
    auto parsed = parse_size(text.substr(start, end - start));
    if (!parsed) return std::nullopt;
    return parsed->first;
}

// "<label> : <size>" as the cudaMallocAsync backend writes it (the label padded with spaces).
inline std::optional<std::uint64_t> parse_labelled_size(std::string_view text,
                                                        std::string_view label) noexcept {
    const std::size_t at = find_nocase(text, label);
    if (at == std::string_view::npos) return std::nullopt;
    std::size_t i = at + label.size();
    while (i < text.size() && text[i] == ' ') ++i;
    if (i == text.size() || text[i] != ':') return std::nullopt;
    auto parsed = parse_size(text.substr(i + 1));
    if (!parsed) return std::nullopt;
    return parsed->first;
}

// The classifiers and text readers that backends register (errors.hpp). Kind is OomKind: a template
// so that this header needs nothing from errors.hpp; one registry per program all the same.
template <class Kind>
struct ClassifierRegistry {
    std::mutex mutex;
    std::vector<Kind (*)(const std::exception_ptr&)> classifiers;
    std::vector<const char* (*)(const std::exception_ptr&)> text_readers;
};
template <class Kind>
ClassifierRegistry<Kind>& classifier_registry() {
    static ClassifierRegistry<Kind> registry;
    return registry;
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
