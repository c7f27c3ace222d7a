// SPDX-License-Identifier: MIT
// Shared pieces of the scenario tests: a captured log, options on a ManualClock, a simulated scene
// with or without its guard, a probe wrapper that forgets to empty the cache (the guard must not
// rely on the probe doing it for it).
#pragma once

#include <vramguard/vramguard.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
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

// A simulated device, injected time, a captured log and test options for them: where a scenario
// test starts. A test adjusts `options` before it makes its guard.
struct Scene {
    explicit Scene(std::uint64_t device_bytes) : device(device_bytes) {}
    vramguard::SimulatedDevice device;
    vramguard::ManualClock clock;
    CapturedLog log;
    vramguard::Options options = test_options(clock, log);
};

// The same with a guard on the device, made with the test options.
struct GuardScene : Scene {
    explicit GuardScene(std::uint64_t device_bytes) : Scene(device_bytes), guard(device, options) {}
    vramguard::Guard<vramguard::SimulatedDevice> guard;
};

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

// A coordinator that admits everything and counts what it hands out and what is still held: a
// leaked hold would block every other process on the host.
class CountingCoordinator : public vramguard::Coordinator {
   public:
    struct Counted : vramguard::Hold {
        explicit Counted(std::atomic<int>& live) : live_(live) { ++live_; }
        ~Counted() override { --live_; }
        std::atomic<int>& live_;
    };
    Decision try_reserve(std::uint64_t, std::uint64_t,
                         const std::function<vramguard::MemoryInfo()>& read_memory) override {
        ++reservations;
        Decision decision;
        decision.seen = read_memory();
        decision.available = decision.seen.free_bytes;
        decision.hold = std::make_unique<Counted>(live_reservations);
        return decision;
    }
    std::unique_ptr<vramguard::Hold> lock_single_item() override {
        ++single_item_locks;
        return std::make_unique<Counted>(live_locks);
    }
    int live() const { return live_reservations.load() + live_locks.load(); }
    std::atomic<int> live_reservations{0}, live_locks{0}, reservations{0}, single_item_locks{0};
};

}  // namespace vramguard_test
