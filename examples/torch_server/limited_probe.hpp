// SPDX-License-Identifier: MIT
// A probe that reports a smaller device than the real one (`--memory-limit-bytes`), or one that
// another process shares (`--simulate-other-process-bytes`).
//
// For demos and tests of admission on a machine whose real memory is plentiful (or unknown): the
// server then behaves as if it had `limit` bytes in all, of which what it has used since it
// started is gone. "Used since it started" is the drop in the real probe's free bytes, except on
// the host, where it is this process's resident growth (MemAvailable moves with every other
// process on the machine). `other_process` bytes are then taken off what is free, total
// unchanged: work that fits the device but not now, the case a server answers with 503 and
// Retry-After (a limit alone can only make work that never fits). With neither, the readings
// pass through unchanged.
#pragma once

#include <vramguard/memory.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/system_memory.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include <fcntl.h>
#include <unistd.h>

namespace torch_server {

template <class Inner>
class LimitedProbe {
   public:
    LimitedProbe(Inner& inner, std::optional<std::uint64_t> limit,
                 std::uint64_t other_process_bytes = 0)
        : inner_(inner),
          limit_(limit),
          other_process_bytes_(other_process_bytes),
          baseline_(limit ? usage_mark() : 0) {}

    LimitedProbe(const LimitedProbe&) = delete;
    LimitedProbe& operator=(const LimitedProbe&) = delete;

    vramguard::MemoryInfo memory() const {
        const vramguard::MemoryInfo real = inner_.memory();
        vramguard::MemoryInfo seen = real;
        if (limit_) {
            seen.total_bytes = std::min(real.total_bytes, *limit_);
            const std::uint64_t used = used_since_start(real);
            const std::uint64_t left = seen.total_bytes > used ? seen.total_bytes - used : 0;
            seen.free_bytes = std::min(real.free_bytes, left);
        }
        seen.free_bytes = vramguard::policy::saturating_sub(seen.free_bytes, other_process_bytes_);
        return seen;
    }
    void release_cached() { inner_.release_cached(); }
    void reset_peak() { inner_.reset_peak(); }
    std::uint64_t peak_bytes() const { return inner_.peak_bytes(); }
    // The real device's identity: guards on the same device share its single-item semaphore.
    std::string device_key() const { return inner_.device_key(); }

    std::optional<std::uint64_t> limit() const noexcept { return limit_; }
    std::uint64_t other_process_bytes() const noexcept { return other_process_bytes_; }
    Inner& inner() noexcept { return inner_; }

   private:
    static constexpr bool on_host = std::is_base_of_v<vramguard::SystemMemoryProbe, Inner>;

    // Resident bytes on the host; the real probe's free bytes on a device.
    std::uint64_t usage_mark() const {
        if constexpr (on_host)
            return vramguard::process_resident_bytes();
        else
            return inner_.memory().free_bytes;
    }
    std::uint64_t used_since_start(const vramguard::MemoryInfo& real) const {
        if constexpr (on_host) {
            const std::uint64_t now = vramguard::process_resident_bytes();
            return now > baseline_ ? now - baseline_ : 0;
        } else {
            return baseline_ > real.free_bytes ? baseline_ - real.free_bytes : 0;
        }
    }

    Inner& inner_;
    std::optional<std::uint64_t> limit_;
    std::uint64_t other_process_bytes_;
    std::uint64_t baseline_;
};

}  // namespace torch_server
