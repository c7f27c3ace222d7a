// SPDX-License-Identifier: MIT
// libFuzzer target: Key construction from arbitrary parameter strings (names and values are often
// user input: model names, file paths, request options).
//
// Checks, besides "no crash, no sanitizer report":
//  - a parameter named twice throws std::invalid_argument, and nothing else ever throws;
//  - value() equals an independent implementation of the frozen v1 hash input (key.hpp);
//  - parameter order never matters; hex() is 16 lowercase digits of value();
//  - label() is one printable-ASCII line, and two different parameter sets never share a label
//    (the escaping is injective), so equality never merges two different keys;
//  - describe() is label() + " #" + hex().
#include <vramguard/key.hpp>

#include "fuzz_check.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using vramguard::Key;
using Params = std::vector<std::pair<std::string, std::string>>;

// The v1 hash input, written again from its specification in key.hpp, not from its code.
std::uint64_t reference_value(const std::string& name, Params params) {
    std::string bytes = "vramguard-key-v1";
    const auto put_u64 = [&](std::uint64_t v) {
        for (int i = 0; i < 8; ++i) bytes += static_cast<char>((v >> (8 * i)) & 0xff);
    };
    const auto put_string = [&](const std::string& s) {
        put_u64(s.size());
        bytes += s;
    };
    std::sort(params.begin(), params.end());
    put_string(name);
    put_u64(params.size());
    for (const auto& p : params) {
        put_string(p.first);
        put_string(p.second);
    }
    std::uint64_t hash = 0xcbf29ce484222325ULL;
    for (const unsigned char c : bytes) {
        hash ^= c;
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

bool has_duplicate_names(const Params& params) {
    std::set<std::string> names;
    for (const auto& p : params)
        if (!names.insert(p.first).second) return true;
    return false;
}

void check_key(const Key& key, const std::string& name, const Params& params) {
    FUZZ_CHECK(key.value() == reference_value(name, params));
    FUZZ_CHECK(key.name() == name);
    const std::string hex = key.hex();
    FUZZ_CHECK(hex.size() == 16);
    std::uint64_t parsed = 0;
    for (const char c : hex) {
        FUZZ_CHECK((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
        parsed = parsed * 16 + static_cast<std::uint64_t>(c <= '9' ? c - '0' : c - 'a' + 10);
    }
    FUZZ_CHECK(parsed == key.value());
    for (const char c : key.label()) FUZZ_CHECK(c >= 0x20 && c <= 0x7e);
    FUZZ_CHECK(key.describe() == key.label() + " #" + hex);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider input(data, size);
    const std::string name = input.ConsumeRandomLengthString(128);
    const std::size_t count = input.ConsumeIntegralInRange<std::size_t>(0, 8);
    Params params;
    for (std::size_t i = 0; i < count && input.remaining_bytes() > 0; ++i) {
        std::string param = input.ConsumeRandomLengthString(64);
        std::string value = input.ConsumeRandomLengthString(64);
        params.emplace_back(std::move(param), std::move(value));
    }

    if (has_duplicate_names(params)) {
        bool threw = false;
        try {
            (void)Key::of(name, params);
        } catch (const std::invalid_argument& e) {
            threw = true;
            for (const char* c = e.what(); *c; ++c) FUZZ_CHECK(*c != '\n');
        }
        FUZZ_CHECK(threw);
        return 0;
    }

    const Key key = Key::of(name, params);  // must not throw
    check_key(key, name, params);

    Params reversed(params.rbegin(), params.rend());
    const Key same = Key::of(name, reversed);
    FUZZ_CHECK(same == key && same.value() == key.value() && same.label() == key.label());

    // A different parameter set: one byte appended to the last value, or one parameter dropped.
    if (!params.empty()) {
        Params changed = params;
        changed.back().second += static_cast<char>(size & 0xff);
        const Key other = Key::of(name, changed);
        check_key(other, name, changed);
        FUZZ_CHECK(other.label() != key.label());
        FUZZ_CHECK(other != key);
        Params dropped(params.begin(), params.end() - 1);
        const Key fewer = Key::of(name, dropped);
        FUZZ_CHECK(fewer.label() != key.label());
        FUZZ_CHECK(fewer != key);
    }
    // The name folded into a parameter is a different key too.
    if (!name.empty()) {
        Params moved = params;
        moved.emplace_back(std::string(1, '\0') + name, "");
        if (!has_duplicate_names(moved)) FUZZ_CHECK(Key::of("", moved) != key);
    }
    return 0;
}
