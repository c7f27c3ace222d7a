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

VRAMGUARD_END_NAMESPACE

// Internals that need the types above.
#include <vramguard/detail/emit.hpp>
