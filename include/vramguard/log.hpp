// SPDX-License-Identifier: MIT
// Logging through a callback sink. Handled OOMs are WARN; nothing the library handles is ERROR.
#pragma once

#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>

VRAMGUARD_BEGIN_NAMESPACE

enum class Level { debug, info, warn, error };

inline const char* to_string(Level level) noexcept {
    switch (level) {
        case Level::debug: return "DEBUG";
        case Level::info: return "INFO";
        case Level::warn: return "WARN";
        case Level::error: return "ERROR";
    }
    return "?";
}

using LogSink = std::function<void(Level, std::string_view)>;

// The default sink: WARN and above to stderr, one line each.
inline LogSink stderr_sink(Level min_level = Level::warn) {
    return [min_level](Level level, std::string_view message) {
        if (level < min_level) return;
        std::fprintf(stderr, "vramguard %s: %.*s\n", to_string(level),
                     static_cast<int>(message.size()), message.data());
    };
}

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
