// SPDX-License-Identifier: MIT
// The processes a host ledger names: the boot they belong to, whether each still runs (pid and
// start time), and what this process itself holds; reconcile_ledger() makes a ledger agree.
#pragma once

#include <vramguard/detail/posix.hpp>
#include <vramguard/ledger_state.hpp>
#include <vramguard/version.hpp>

#include <signal.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// CLOCK_MONOTONIC: the one clock every process of a boot shares (steady_clock promises less).
inline std::uint64_t monotonic_ns() noexcept {
    timespec now{};
    ::clock_gettime(CLOCK_MONOTONIC, &now);
    return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000ULL +
           static_cast<std::uint64_t>(now.tv_nsec);
}

// The kernel's boot id, read once: a ledger left in a persistent directory by an earlier boot
// names pids (and start times) that mean nothing now.
inline const std::string& current_boot_id() {
    static const std::string boot = [] {
        std::string text;
        if (!read_small_file("/proc/sys/kernel/random/boot_id", text)) return std::string("-");
        while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
        return is_boot_id(text) ? text : std::string("-");
    }();
    return boot;
}

struct ProcessStat {
    char state = '?';
    std::uint64_t start_ticks = 0;
};

// Field 3 (state) and field 22 (starttime) of a /proc/<pid>/stat line. The command name (field
// 2) may hold any bytes, spaces and parentheses included, so fields are counted from its last ')'.
// A line cut anywhere before field 23 is rejected.
inline std::optional<ProcessStat> parse_process_stat(std::string_view text) {
    const std::size_t paren = text.rfind(')');
    if (paren == std::string_view::npos) return std::nullopt;
    std::string_view rest = text.substr(paren + 1);
    ProcessStat stat;
    for (int field = 3; field <= 22; ++field) {
        while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
        const std::size_t end = std::min(rest.find(' '), rest.size());
        const std::string_view token = rest.substr(0, end);
        if (token.empty()) return std::nullopt;
        if (field == 3) stat.state = token.front();
        // The kernel writes 52 fields: a start time with nothing after it was cut short.
        if (field == 22 && (end == rest.size() || !parse_decimal_u64(token, stat.start_ticks)))
            return std::nullopt;
        rest.remove_prefix(end);
    }
    return stat;
}

inline std::optional<ProcessStat> read_process_stat(pid_t pid) {
    std::string text;
    if (!read_small_file("/proc/" + std::to_string(pid) + "/stat", text)) return std::nullopt;
    return parse_process_stat(text);
}

inline std::uint64_t process_start_ticks(pid_t pid) {
    const auto stat = read_process_stat(pid);
    return stat ? stat->start_ticks : 0;
}

// Whether the process that wrote an entry still runs. Dead: no such pid, a zombie (killed but not
// yet reaped: its memory is already gone), or a different start time (the pid was recycled).
inline bool owner_alive(pid_t pid, std::uint64_t start_ticks) {
    if (pid <= 0) return false;
    if (const auto stat = read_process_stat(pid)) {
        if (stat->state == 'Z' || stat->state == 'X') return false;
        return start_ticks == 0 || stat->start_ticks == start_ticks;
    }
    // No /proc entry readable (another system, hidepid): only kill() can tell, and EPERM means it
    // exists but belongs to someone else.
    return !(::kill(pid, 0) != 0 && errno == ESRCH);
}

// Unique enough across processes and rebuilt ledgers: pid, time and a counter, mixed.
inline std::uint64_t fresh_reservation_id() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t x = monotonic_ns() ^ (static_cast<std::uint64_t>(::getpid()) << 40) ^
                      (counter.fetch_add(1, std::memory_order_relaxed) * 0x9e3779b97f4a7c15ULL);
    // splitmix64 finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x == 0 ? 1 : x;
}

// The reservations this process holds, per ledger file: what its own entries in that file must be.
// A transaction makes the file agree (reconcile_ledger below): an entry naming this process that it
// does not hold is a release that did not reach the file (or a stray line of a damaged one) and is
// dropped; one it holds that the file lacks (lost to damage) is written back. Process-wide, because
// several HostLedger objects may share one file; a forked child inherits a copy, but its pid
// differs, so it never claims the parent's entries.
class HeldReservations {
   public:
    static HeldReservations& instance() {
        static HeldReservations* const held = new HeldReservations();  // outlives every static
        return *held;
    }
    void add(const std::string& ledger, const LedgerEntry& entry) {
        std::lock_guard<std::mutex> lock(mutex_);
        held_.emplace_back(ledger, entry);
    }
    void remove(const std::string& ledger, std::uint64_t id) {
        std::lock_guard<std::mutex> lock(mutex_);
        held_.erase(std::remove_if(held_.begin(), held_.end(),
                                   [&](const auto& item) {
                                       return item.second.id == id && item.first == ledger;
                                   }),
                    held_.end());
    }
    // The live holds of process `pid` in `ledger`.
    std::vector<LedgerEntry> of(const std::string& ledger, pid_t pid) const {
        std::vector<LedgerEntry> result;
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& item : held_)
            if (item.first == ledger && item.second.pid == pid) result.push_back(item.second);
        return result;
    }

   private:
    mutable std::mutex mutex_;
    std::vector<std::pair<std::string, LedgerEntry>> held_;
};

// Makes the state of ledger `path` agree with what is alive: drops the entries of processes that
// are gone and those an earlier build marked released (see LedgerEntry), and makes this process's
// own entries exactly the reservations it holds (see HeldReservations): a release that did not
// reach the file is applied, a reservation a damaged file lost is written back, a size a damaged
// file lost is restored. True when it changed.
inline bool reconcile_ledger(LedgerState& state, const std::string& path) {
    const pid_t self = ::getpid();
    const std::vector<LedgerEntry> held = HeldReservations::instance().of(path, self);
    // Each owner (pid and start time) looked up once. This process's entries too: one under
    // our pid with another start time is a dead process's whose pid we were given.
    std::vector<std::pair<std::pair<pid_t, std::uint64_t>, bool>> looked_up;
    const auto alive = [&](const LedgerEntry& entry) {
        const std::pair<pid_t, std::uint64_t> owner{entry.pid, entry.start_ticks};
        for (const auto& known : looked_up)
            if (known.first == owner) return known.second;
        const bool live = owner_alive(entry.pid, entry.start_ticks);
        looked_up.emplace_back(owner, live);
        return live;
    };
    const auto holds = [&](std::uint64_t id) {
        return std::any_of(held.begin(), held.end(),
                           [id](const LedgerEntry& mine) { return mine.id == id; });
    };
    const std::size_t before = state.entries.size();
    state.entries.erase(std::remove_if(state.entries.begin(), state.entries.end(),
                                       [&](const LedgerEntry& entry) {
                                           if (!entry.live() || !alive(entry)) return true;
                                           return entry.pid == self && !holds(entry.id);
                                       }),
                        state.entries.end());
    bool changed = state.entries.size() != before;
    for (const LedgerEntry& mine : held) {
        const auto found = std::find_if(state.entries.begin(), state.entries.end(),
                                        [&](const LedgerEntry& e) { return e.id == mine.id; });
        if (found == state.entries.end()) {
            state.entries.push_back(mine);
        } else if (*found != mine) {
            *found = mine;
        } else {
            continue;
        }
        changed = true;
    }
    return changed;
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
