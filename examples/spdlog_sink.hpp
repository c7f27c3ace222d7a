// SPDX-License-Identifier: MIT
// vramguard's log, routed to an spdlog::logger. Not a vramguard header on purpose: the library
// never depends on spdlog (its sink is a std::function), and the adapter is three lines to copy.
// The README quotes the block between the markers verbatim (the spdlog_readme_snippet test checks
// it), examples/spdlog_logging.cpp uses it, and tests/spdlog/spdlog_sink_test.cpp tests it.
#pragma once

#include <vramguard/log.hpp>

#include <spdlog/spdlog.h>

#include <memory>
#include <string_view>
#include <utility>

// [README: spdlog adapter]
// vramguard's levels are spdlog's, one to one: debug, info, warn, error (spdlog's `err`).
inline vramguard::LogSink spdlog_sink(std::shared_ptr<spdlog::logger> logger) {
    return [logger = std::move(logger)](vramguard::Level level, std::string_view message) {
        constexpr spdlog::level::level_enum to_spdlog[] = {
            spdlog::level::debug, spdlog::level::info, spdlog::level::warn, spdlog::level::err};
        logger->log(to_spdlog[static_cast<int>(level)], "{}", message);
    };
}
// [README: spdlog adapter]
