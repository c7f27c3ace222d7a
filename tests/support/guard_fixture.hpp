// SPDX-License-Identifier: MIT
// Shared pieces of the scenario tests: a captured log, options on a ManualClock, a probe wrapper
// that forgets to empty the cache (the guard must not rely on the probe doing it for it).
#pragma once

#include <vramguard/vramguard.hpp>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace vramguard_test {

// Collects every line a guard logs, for assertions on levels and text.
class CapturedLog {
   public:
    vramguard::LogSink sink() {
        return [this](vramguard::Level level, std::string_view message) {
            std::lock_guard<std::mutex> lock(mutex_);
            lines_.emplace_back(level, std::string(message));
        };
    }
    std::vector<std::pair<vramguard::Level, std::string>> lines() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return lines_;
    }
    std::size_t count(vramguard::Level level) const {
        std::size_t n = 0;
        for (const auto& line : lines())
            if (line.first == level) ++n;
        return n;
    }
    bool contains(std::string_view text) const {
        for (const auto& line : lines())
            if (line.second.find(text) != std::string::npos) return true;
        return false;
    }

   private:
    mutable std::mutex mutex_;
    std::vector<std::pair<vramguard::Level, std::string>> lines_;
};

// Options for a test: injected time, memory-only profiles, a captured log.
inline vramguard::Options test_options(vramguard::ManualClock& clock, CapturedLog& log) {
    vramguard::Options options;
    options.clock = clock.clock_fn();
    options.sleep = clock.sleep_fn();
    options.persist = false;
    options.log = log.sink();
    return options;
}

// A probe whose release_cached() does nothing: what a guard that "forgets" looks like from the
// device's side. Used to prove the guard's own call is what recovers.
class ForgetfulProbe {
   public:
    explicit ForgetfulProbe(vramguard::SimulatedDevice& device) : device_(device) {}
    vramguard::MemoryInfo memory() const { return device_.memory(); }
    void release_cached() {}

   private:
    vramguard::SimulatedDevice& device_;
};

}  // namespace vramguard_test
