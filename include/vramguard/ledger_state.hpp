// SPDX-License-Identifier: MIT
// What a host ledger file (host.hpp) holds: its reservations, as HostLedger::snapshot() returns
// them.
#pragma once

#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <sys/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

// One reservation in the ledger file.
struct LedgerEntry {
    std::uint64_t id = 0;           // random, so ids survive a rebuilt ledger without clashing
    pid_t pid = 0;                  // owner, 1..INT_MAX
    std::uint64_t start_ticks = 0;  // owner's start time (/proc/<pid>/stat field 22); 0 = unknown
    std::uint64_t bytes = 0;        // reserved
    std::uint64_t created_ns = 0;   // CLOCK_MONOTONIC when reserved
    // Always 0 in what this version writes: it erases an entry on release. Earlier builds, which
    // read the probe before taking the lock, kept a released entry a few seconds, marked with its
    // CLOCK_MONOTONIC release time here; such an entry is no reservation and is dropped on sight.
    // The field stays so that files of either kind parse (format version 1 is unchanged).
    std::uint64_t released_ns = 0;

    bool live() const noexcept { return released_ns == 0; }
    friend bool operator==(const LedgerEntry& a, const LedgerEntry& b) noexcept {
        return a.id == b.id && a.pid == b.pid && a.start_ticks == b.start_ticks &&
               a.bytes == b.bytes && a.created_ns == b.created_ns && a.released_ns == b.released_ns;
    }
    friend bool operator!=(const LedgerEntry& a, const LedgerEntry& b) noexcept {
        return !(a == b);
    }
};

// The whole ledger file, parsed.
struct LedgerState {
    std::uint64_t device = 0;  // detail::ledger_device_hash(device identity)
    std::string boot = "-";    // the boot id when written ("-" when the system has none)
    std::vector<LedgerEntry> entries;

    std::uint64_t live_bytes() const noexcept {
        std::uint64_t sum = 0;
        for (const LedgerEntry& entry : entries)
            if (entry.live()) sum = policy::saturating_add(sum, entry.bytes);
        return sum;
    }
    std::size_t live_count() const noexcept {
        return static_cast<std::size_t>(std::count_if(
            entries.begin(), entries.end(), [](const LedgerEntry& entry) { return entry.live(); }));
    }
    friend bool operator==(const LedgerState& a, const LedgerState& b) noexcept {
        return a.device == b.device && a.boot == b.boot && a.entries == b.entries;
    }
    friend bool operator!=(const LedgerState& a, const LedgerState& b) noexcept {
        return !(a == b);
    }
};

VRAMGUARD_END_NAMESPACE
