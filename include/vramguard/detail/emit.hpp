// SPDX-License-Identifier: MIT
// How vramguard calls a LogSink (log.hpp): a sink that throws never escapes the library.
#pragma once

#include <vramguard/log.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// A sink that throws must never take the caller down: the message goes to stderr instead, at most
// once a second, so a broken sink cannot flood the log either.
inline void emit(const LogSink& sink, Level level, std::string_view message) noexcept {
    if (!sink) return;
    try {
        sink(level, message);
    } catch (...) {
        static std::atomic<std::int64_t> last_fallback_second{-1};
        const auto second = std::chrono::duration_cast<std::chrono::seconds>(
                                std::chrono::steady_clock::now().time_since_epoch())
                                .count();
        if (last_fallback_second.exchange(second) == second) return;
        std::fprintf(stderr, "vramguard %s (log sink threw): %.*s\n", to_string(level),
                     static_cast<int>(message.size()), message.data());
    }
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
