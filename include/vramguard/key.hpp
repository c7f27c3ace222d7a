// SPDX-License-Identifier: MIT
// Key: a stable 64-bit identity of "what is being done with which parameters".
//
// The value names profile files on disk and is shared between processes, runs and machines, so it
// is specified byte by byte (below) and never depends on std::hash, endianness or parameter order.
#pragma once

#include <vramguard/detail/fnv1a.hpp>
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
