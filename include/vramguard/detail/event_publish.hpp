// SPDX-License-Identifier: MIT
// How the guard publishes an Event (events.hpp): counted always, formatted and logged only past
// the sink's level.
#pragma once

#include <vramguard/events.hpp>
#include <vramguard/log.hpp>
#include <vramguard/stats.hpp>
#include <vramguard/version.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// Counts the event and, when the sink wants its level, formats and sends it.
inline void publish(AtomicStats& stats, const LogSink& sink, Level least, const Event& event) {
    if (auto* counter = counter_for(stats, event.kind)) AtomicStats::bump(*counter);
    const Level level = level_of(event.kind);
    if (!sink || level < least) return;
    const std::string message = format_event(event);
    if (!message.empty()) emit(sink, level, message);
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
