// SPDX-License-Identifier: MIT
// Host-wide coordination (POSIX): pre-forked workers on one GPU must not all see "6 GiB free" and
// all load 6 GiB. An in-process check cannot see the other processes, so admission goes through a
// per-device reservation ledger, a small file guarded by an flock: lock, prune the entries of dead
// processes, compare free memory minus everyone's live reservations, reserve or refuse, unlock.
// Every change replaces the file whole (detail::replace_file: temporary file, fsync, rename), so a
// process killed at any instant leaves a ledger that still holds every live reservation.
// No daemon: the kernel releases a dead process's flock, and its entries are pruned by the next
// process that looks.
//
// Accounting. A reservation covers the window between admission and the moment the load's own
// allocations show in the driver's free figure: while it is held, every other process sees
// `free - sum(live reservations)`. During the load its allocations already show in `free` and the
// reservation still counts, so the same bytes are counted twice for a while: conservative on
// purpose (an over-admission is an OOM in someone's load; a refusal is a retry). When the load
// returns, Guard drops the hold and only the driver's figure counts.
//
// The free-memory reading is taken under the lock, after pruning (Coordinator::try_reserve calls
// the probe there). A reading taken before the lock could predate a load that another process
// finished while this one waited for it, and compared with a ledger where that load's reservation
// is gone it would count the load's memory as free. Under the lock, every reservation missing from
// the ledger belonged to a load that had returned, so its allocations are in the reading. That
// relies on the driver showing a finished allocation at once, which cudaMemGetInfo does (a
// cudaMalloc that returned is counted); frees may show late, which only makes a reading
// conservative. So a released reservation is erased at once; nothing lingers.
//
// Every process that shares a ledger must share one pid namespace (liveness is judged by pid and
// the process start time from /proc/<pid>/stat) and one boot (checked through the boot id).
#pragma once

#include <vramguard/coordinator.hpp>
#include <vramguard/detail/text_record.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/options.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/version.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace defaults {
// The ledger lock is held for one read-modify-write of a small file (microseconds); waiting longer
// than this means its holder is stopped (SIGSTOP, a debugger), and admission falls back to this
// process's own view rather than stall every load on the host.
inline constexpr std::chrono::milliseconds ledger_lock_timeout{2000};
// The single-item lock is held for one item's computation. Past this the item runs without
// host-wide exclusion (an OOM it causes is still retried), instead of waiting forever on a holder
// that hangs.
inline constexpr std::chrono::milliseconds single_item_lock_timeout{30000};
// Worker processes per GPU: each loads its own model copy and contends for the same device, so
// the CPU formula (2 x cores + 1) only multiplies copies. A few workers keep the GPU busy while
// others do CPU work (tokenizing, I/O).
inline constexpr std::size_t gpu_workers = 4;
}  // namespace defaults

// How a HostLedger finds and protects its files. Every field states its default.
struct HostOptions {
    // Where the ledger lives; "" = HostLedger::default_directory() ($VRAMGUARD_RUNTIME_DIR, else
    // /dev/shm, else $XDG_RUNTIME_DIR, else /tmp). Every process of one server must agree on it.
    std::string directory;
    // Unset: files are 0600, this user's processes only. Set: files are created 0660 and owned by
    // this group, for workers that run as different users of one group. The ledger is replaced by
    // rename, which a sticky directory (/dev/shm, /tmp) refuses over another user's file: give
    // such workers a directory of that group that is not sticky (mode 2770, say).
    std::optional<gid_t> group;
    // Waits on other processes use the system's monotonic clock, not an injected one: the other
    // side of the wait is another process, which a test's ManualClock cannot move.
    // Longest wait for the ledger lock, (0, 10 s]; then admission uses this process's view alone.
    std::chrono::milliseconds lock_timeout = defaults::ledger_lock_timeout;
    // Longest wait for the host-wide single-item lock, > 0; then the item runs without it.
    std::chrono::milliseconds single_item_timeout = defaults::single_item_lock_timeout;
    LogSink log = stderr_sink();

    // Throws std::invalid_argument naming the first field that makes no sense.
    void validate() const {
        auto fail = [](const char* field, const std::string& why) {
            throw std::invalid_argument(std::string("vramguard::HostOptions::") + field + " " +
                                        why);
        };
        if (lock_timeout.count() <= 0 || lock_timeout > std::chrono::milliseconds(10000))
            fail("lock_timeout",
                 "must be in (0, 10000] ms, got " + std::to_string(lock_timeout.count()) + " ms");
        if (single_item_timeout.count() <= 0) fail("single_item_timeout", "must be positive");
    }
};

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

namespace detail {

// File format, version 1 (text, so an operator can `cat` it; every line ends in '\n'):
//   vramguard-ledger 1
//   device <16 hex digits: ledger_device_hash of the device identity>
//   boot <boot id, 1-64 of [0-9a-f-], or "-">
//   reservation <id, 16 hex> <pid> <start_ticks> <bytes> <created_ns> <released_ns>   (0 or more)
//     (released_ns: 0; nonzero only in files written by earlier builds, see LedgerEntry)
//   checksum <FNV-1a 64 of every byte above, 16 hex digits>
// Numbers are canonical decimals. It is never written in place: a writer holding the lock file's
// flock writes "<ledger>.tmp" and renames it over the ledger, so every reader, and every process
// after a writer killed at any instant, finds either the old file or the new one, whole (see
// HostLedger::store). A file damaged all the same (by hand, by a disk) is salvaged, never emptied:
// see salvage_ledger.
inline constexpr std::string_view ledger_magic = "vramguard-ledger 1";
// 4096 entries of at most ~130 bytes: an upper bound, far above any real ledger.
inline constexpr std::size_t max_ledger_entries = 4096;
inline constexpr std::size_t max_ledger_file_bytes = 1 << 20;

inline std::uint64_t ledger_device_hash(std::string_view device_identity) noexcept {
    return fnv1a64_string(device_identity, fnv1a64("vramguard-ledger-v1"));
}

inline bool is_boot_id(std::string_view text) noexcept {
    if (text == "-") return true;
    if (text.empty() || text.size() > 64) return false;
    for (const char c : text)
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-')) return false;
    return true;
}

inline std::string serialize_ledger(const LedgerState& state) {
    std::string text;
    text.reserve(96 + state.entries.size() * 112);
    text.append(ledger_magic).append("\n");
    text.append("device ").append(hex16(state.device)).append("\n");
    text.append("boot ")
        .append(is_boot_id(state.boot) ? state.boot : std::string("-"))
        .append("\n");
    for (const LedgerEntry& entry : state.entries) {
        text.append("reservation ").append(hex16(entry.id));
        const std::uint64_t numbers[] = {static_cast<std::uint64_t>(entry.pid < 0 ? 0 : entry.pid),
                                         entry.start_ticks, entry.bytes, entry.created_ns,
                                         entry.released_ns};
        for (const std::uint64_t number : numbers) text.append(" ").append(std::to_string(number));
        text.append("\n");
    }
    append_checksum_line(text);
    return text;
}

// One reservation line's value: "<id, 16 hex> <pid> <start_ticks> <bytes> <created_ns>
// <released_ns>".
inline std::optional<LedgerEntry> parse_reservation(std::string_view value, std::string* error) {
    const auto fail = [error](const char* reason) { return parse_failure(error, reason); };
    LedgerEntry entry;
    std::uint64_t pid = 0;
    std::uint64_t* const numbers[] = {&pid, &entry.start_ticks, &entry.bytes, &entry.created_ns,
                                      &entry.released_ns};
    std::size_t space = value.find(' ');
    if (space == std::string_view::npos || !parse_hex16_u64(value.substr(0, space), entry.id))
        return fail("malformed reservation id");
    value.remove_prefix(space + 1);
    for (std::size_t i = 0; i < 5; ++i) {
        space = value.find(' ');
        const bool last = i == 4;
        if (last != (space == std::string_view::npos)) return fail("malformed reservation line");
        if (!parse_decimal_u64(value.substr(0, last ? value.size() : space), *numbers[i]))
            return fail("malformed number in a reservation line");
        if (!last) value.remove_prefix(space + 1);
    }
    if (pid == 0 || pid > static_cast<std::uint64_t>(INT_MAX)) return fail("pid out of range");
    entry.pid = static_cast<pid_t>(pid);
    return entry;
}

// The three header lines (magic, device, boot) into `state`; false with the reason in `*error`.
inline bool parse_ledger_header(LineReader& lines, LedgerState& state, std::string* error) {
    const auto fail = [error](const char* reason) {
        parse_failure(error, reason);
        return false;
    };
    std::string_view line, value;
    if (!lines.next(line)) return fail("file is truncated");
    if (line != ledger_magic) {
        if (line.substr(0, 17) == "vramguard-ledger ") return fail("unsupported format version");
        return fail("not a vramguard ledger (bad first line)");
    }
    if (!lines.next_field("device", value) || !parse_hex16_u64(value, state.device))
        return fail("truncated or malformed device line");
    if (!lines.next_field("boot", value) || !is_boot_id(value))
        return fail("truncated or malformed boot line");
    state.boot = std::string(value);
    return true;
}

// Parses a ledger file. Returns nothing, with the reason in `*error` when given, for anything that
// is not exactly such a file: arbitrary bytes are safe input (this is the fuzzing entry point).
inline std::optional<LedgerState> parse_ledger(std::string_view text,
                                               std::string* error = nullptr) {
    const auto fail = [error](const char* reason) { return parse_failure(error, reason); };
    if (text.size() > max_ledger_file_bytes) return fail("file is too large");
    LineReader lines(text);
    LedgerState state;
    if (!parse_ledger_header(lines, state, error)) return std::nullopt;
    for (;;) {
        const std::size_t line_start = lines.position();
        std::string_view line, value;
        if (!lines.next(line)) return fail("file is truncated (no checksum line)");
        if (field_value(line, "checksum", value)) {
            switch (check_checksum_line(lines, line_start, value)) {
                case ChecksumLine::ok: return state;
                case ChecksumLine::malformed: return fail("malformed checksum line");
                case ChecksumLine::not_last:
                    return fail("unexpected bytes after the checksum line");
                case ChecksumLine::mismatch:
                    return fail("checksum mismatch (damaged, cut short or hand-edited)");
            }
        }
        if (!field_value(line, "reservation", value)) return fail("unexpected line");
        if (state.entries.size() >= max_ledger_entries) return fail("too many reservations");
        auto entry = parse_reservation(value, error);
        if (!entry) return std::nullopt;
        state.entries.push_back(*entry);
    }
}

// A number of a damaged reservation line, trusted only when a space ends it (a cut line may have
// lost its last digits: "10737" of "1073741824").
inline bool salvage_number(std::string_view& rest, std::uint64_t& out) noexcept {
    const std::size_t space = rest.find(' ');
    if (space == std::string_view::npos || !parse_decimal_u64(rest.substr(0, space), out))
        return false;
    rest.remove_prefix(space + 1);
    return true;
}

// What one line of a damaged file still says about a reservation. A whole line ('\n'-ended) that
// parses is taken as it is. Otherwise an id and a pid that are whole still name a reservation and
// its owner; its size is unknown and counts as the whole device (UINT64_MAX) until the owner
// releases it or exits. Nothing when no owner can be named.
inline std::optional<LedgerEntry> salvage_reservation(std::string_view line, bool whole) {
    std::string_view rest;
    if (!field_value(line, "reservation", rest)) return std::nullopt;
    if (whole)
        if (auto entry = parse_reservation(rest, nullptr)) return entry;
    LedgerEntry entry;
    std::uint64_t pid = 0;
    if (rest.size() < 17 || rest[16] != ' ' || !parse_hex16_u64(rest.substr(0, 16), entry.id))
        return std::nullopt;
    rest.remove_prefix(17);
    if (!salvage_number(rest, pid) || pid == 0 || pid > static_cast<std::uint64_t>(INT_MAX))
        return std::nullopt;
    entry.pid = static_cast<pid_t>(pid);
    if (!salvage_number(rest, entry.start_ticks)) entry.start_ticks = 0;  // the pid alone decides
    entry.bytes = UINT64_MAX;
    return entry;
}

// What a damaged ledger (a checksum that fails, a file cut short, stray bytes) still says, so that
// admission stays at least as careful as the truth: every reservation whose owner can be named
// (see salvage_reservation; one entry per id, the larger size), and the boot it was written in
// when that line is whole (otherwise `assumed_boot`: its pids are judged by liveness alone).
// Never more than max_ledger_entries. Arbitrary bytes are safe input.
inline LedgerState salvage_ledger(std::string_view text, std::string_view assumed_boot) {
    LedgerState state;
    state.boot = std::string(assumed_boot);
    std::size_t start = 0;
    while (start < text.size() && state.entries.size() < max_ledger_entries) {
        std::size_t end = text.find('\n', start);
        const bool whole = end != std::string_view::npos;
        if (!whole) end = text.size();
        const std::string_view line = text.substr(start, end - start);
        start = end + 1;
        std::string_view value;
        if (whole && field_value(line, "boot", value) && is_boot_id(value)) {
            state.boot = std::string(value);
        } else if (const auto entry = salvage_reservation(line, whole)) {
            const auto same = std::find_if(state.entries.begin(), state.entries.end(),
                                           [&](const LedgerEntry& e) { return e.id == entry->id; });
            if (same == state.entries.end())
                state.entries.push_back(*entry);
            else if (same->bytes < entry->bytes)
                *same = *entry;
        }
    }
    return state;
}

// ---- processes and clocks ----

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
// A transaction makes the file agree (HostLedger::reconcile): an entry naming this process that it
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

// "[A-Za-z0-9._-]" kept, anything else '_', at most 48 characters: readable in `ls`, safe as a
// name.
inline std::string sanitize_file_part(std::string_view text) {
    std::string out;
    for (const char c : text.substr(0, 48)) {
        const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                          (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
        out += keep ? c : '_';
    }
    return out;
}

// flock(LOCK_EX) with a deadline: flock itself cannot time out, so it is polled with a short
// backoff (20 us doubling to 1 ms; the ledger lock is held for microseconds). Returns 0, or the
// errno that stopped it (ETIMEDOUT when the deadline passed).
inline int lock_until(int fd, std::chrono::steady_clock::time_point deadline) {
    auto pause = std::chrono::microseconds(20);
    for (;;) {
        if (retry_eintr([&] { return ::flock(fd, LOCK_EX | LOCK_NB); }) == 0) return 0;
        if (errno != EWOULDBLOCK && errno != EAGAIN) return errno;
        const auto now = std::chrono::steady_clock::now();
        if (now >= deadline) return ETIMEDOUT;
        std::this_thread::sleep_for(
            std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
        pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(1));
    }
}

}  // namespace detail

// The per-device reservation ledger and the host-wide single-item lock: a Coordinator for
// Options::coordinator. Thread-safe. Create it in the parent before forking or in each worker:
// every operation opens the file anew, because a descriptor inherited over fork() is one flock
// owner shared by parent and children and would exclude no one.
//
// It never stops the caller over the filesystem: a ledger it cannot open, lock or write (missing
// or read-only directory, another user's file, ENOSPC) makes admission fall back to this process's
// own view, with one warning until it works again. A damaged file is rebuilt, not trusted.
class HostLedger : public Coordinator, public std::enable_shared_from_this<HostLedger> {
    struct Private {};

   public:
    // `device_identity` names the device the same way in every process: cuda::Probe::device_key()
    // ("cuda-<uuid>"), or any agreed string for SimulatedDevice. Never null; never throws over the
    // filesystem (see above); throws std::invalid_argument for invalid options or an empty
    // identity.
    static std::shared_ptr<HostLedger> open(std::string device_identity, HostOptions options = {}) {
        options.validate();
        if (device_identity.empty())
            throw std::invalid_argument("vramguard::HostLedger::open: device_identity is empty");
        auto ledger =
            std::make_shared<HostLedger>(Private{}, std::move(device_identity), std::move(options));
        // Creates the directory and the file now, so a ledger that cannot work says so at start-up
        // (once), not in the middle of the first load.
        detail::make_directories(ledger->directory_);
        ledger->snapshot();
        return ledger;
    }

    // $VRAMGUARD_RUNTIME_DIR, else /dev/shm (memory, shared by every process of the host, gone at
    // reboot), else $XDG_RUNTIME_DIR (per user), else /tmp.
    static std::string default_directory() {
        if (const char* dir = std::getenv("VRAMGUARD_RUNTIME_DIR"); dir && *dir) return dir;
        struct stat st {};
        if (::stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && ::access("/dev/shm", W_OK) == 0)
            return "/dev/shm";
        if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg == '/') return xdg;
        return "/tmp";
    }

    // "vramguard-ledger-<readable part of the identity>-<16 hex digits of its hash>".
    static std::string file_name(std::string_view device_identity) {
        return "vramguard-ledger-" + detail::sanitize_file_part(device_identity) + "-" +
               detail::hex16(detail::ledger_device_hash(device_identity));
    }

    HostLedger(Private, std::string device_identity, HostOptions options)
        : identity_(std::move(device_identity)),
          device_hash_(detail::ledger_device_hash(identity_)),
          options_(std::move(options)) {
        directory_ = options_.directory.empty() ? default_directory() : options_.directory;
        while (directory_.size() > 1 && directory_.back() == '/') directory_.pop_back();
        path_ = directory_ + "/" + file_name(identity_);
        lock_path_ = path_ + ".lock";
    }
    HostLedger(const HostLedger&) = delete;
    HostLedger& operator=(const HostLedger&) = delete;

    // Admits `required` bytes plus `margin_bytes` kept free against the free memory `read_memory`
    // reports, read under the lock, minus every live reservation on the host, and reserves them,
    // in one locked step. When the ledger cannot be used, against the reading alone; a full one
    // refuses (Decision::refused_because), since it could not record the reservation.
    Decision try_reserve(std::uint64_t required, std::uint64_t margin_bytes,
                         const std::function<MemoryInfo()>& read_memory) override {
        Decision decision;
        bool read = false;
        bool full = false;
        LedgerEntry mine;
        const std::optional<std::string> failure = transact(
            [&](LedgerState& state) {
                decision.seen = read_memory();
                read = true;
                const std::uint64_t reserved = state.live_bytes();
                decision.available =
                    decision.seen.free_bytes > reserved ? decision.seen.free_bytes - reserved : 0;
                if (!fits(required, margin_bytes, decision.available)) return false;
                if (state.entries.size() >= detail::max_ledger_entries) {
                    full = true;
                    return false;
                }
                mine.id = detail::fresh_reservation_id();
                mine.pid = ::getpid();
                mine.start_ticks = detail::process_start_ticks(mine.pid);
                mine.bytes = required;
                mine.created_ns = detail::monotonic_ns();
                state.entries.push_back(mine);
                return true;
            },
            [&] {
                // Held from the moment the file says so, before the lock is released: another
                // thread of this process reconciling in between would take the entry for a stale
                // one.
                if (mine.id != 0) detail::HeldReservations::instance().add(path_, mine);
            });
        if (full) return refuse_full(decision);
        full_.store(false, std::memory_order_relaxed);
        if (failure) {
            unusable(*failure);
            if (!read) decision.seen = read_memory();
            decision.available = decision.seen.free_bytes;
            if (fits(required, margin_bytes, decision.available))
                decision.hold = std::make_unique<Hold>();
            return decision;
        }
        if (mine.id != 0) decision.hold = std::make_unique<Reservation>(shared_from_this(), mine);
        return decision;
    }

    // Host-wide exclusion for the single-item path, held until the returned Hold is destroyed; the
    // kernel releases it if this process dies. Waits at most HostOptions::single_item_timeout, then
    // returns null with a warning (the item runs without host-wide exclusion), as it does when the
    // lock files cannot be opened. Waiters queue through a turnstile file first, so a process that
    // runs single items back to back cannot take the lock again before a waiter gets its turn.
    std::unique_ptr<Hold> lock_single_item() override {
        const auto deadline =
            detail::deadline_after(std::chrono::steady_clock::now(), options_.single_item_timeout);
        std::string reason;
        detail::FileDescriptor turnstile = open_file(path_ + ".turnstile", reason);
        if (!turnstile) return single_item_failed(reason);
        if (const int error = detail::lock_until(turnstile.get(), deadline); error != 0)
            return single_item_failed(lock_failure(path_ + ".turnstile", error));
        detail::FileDescriptor lock = open_file(path_ + ".single", reason);
        if (!lock) return single_item_failed(reason);
        if (const int error = detail::lock_until(lock.get(), deadline); error != 0)
            return single_item_failed(lock_failure(path_ + ".single", error));
        turnstile.reset();  // the next waiter may queue up behind us now
        single_item_failing_.store(false, std::memory_order_relaxed);
        return std::make_unique<SingleItemLock>(std::move(lock));
    }

    // The ledger as it is now, after pruning dead owners (and writing that back); nothing when it
    // cannot be used. For diagnostics and tests.
    std::optional<LedgerState> snapshot() {
        LedgerState copy;
        const std::optional<std::string> failure = transact([&](LedgerState& state) {
            copy = state;
            return false;
        });
        if (failure) {
            unusable(*failure);
            return std::nullopt;
        }
        return copy;
    }

    // Whether the last operation reached the ledger (false: admission is in-process only).
    bool usable() const noexcept { return !failing_.load(std::memory_order_relaxed); }
    // The ledger file, and the lock file beside it whose flock orders every change to it.
    const std::string& path() const noexcept { return path_; }
    const std::string& lock_path() const noexcept { return lock_path_; }
    const std::string& device_identity() const noexcept { return identity_; }
    const HostOptions& options() const noexcept { return options_; }

   private:
    // A reservation: erased from the ledger on destruction.
    class Reservation final : public Hold {
       public:
        Reservation(std::shared_ptr<HostLedger> ledger, const LedgerEntry& entry)
            : ledger_(std::move(ledger)), id_(entry.id), owner_(entry.pid) {}
        ~Reservation() override {
            // A copy inherited by a forked child is not the child's to release.
            if (::getpid() == owner_) ledger_->release(id_);
        }

       private:
        std::shared_ptr<HostLedger> ledger_;
        std::uint64_t id_;
        pid_t owner_;
    };

    class SingleItemLock final : public Hold {
       public:
        explicit SingleItemLock(detail::FileDescriptor fd)
            : fd_(std::move(fd)), owner_(::getpid()) {}
        ~SingleItemLock() override {
            // A forked child shares the lock's open file description: unlocking there would
            // release the parent's lock; closing its copy does not.
            if (::getpid() == owner_)
                detail::retry_eintr([&] { return ::flock(fd_.get(), LOCK_UN); });
        }

       private:
        detail::FileDescriptor fd_;
        pid_t owner_;
    };

    static bool fits(std::uint64_t required, std::uint64_t margin,
                     std::uint64_t available) noexcept {
        return required <= available && available - required >= margin;
    }

    void release(std::uint64_t id) noexcept {
        try {
            // No longer held, so the next transaction erases the entry (reconcile). When this one
            // fails, the next one of this process that works does (an entry left live would shrink
            // the host's memory until this process exits).
            detail::HeldReservations::instance().remove(path_, id);
            if (const auto failure = transact([](LedgerState&) { return false; }))
                unusable(*failure);
        } catch (...) {
            // Out of memory while releasing: the entry goes when this process does.
        }
    }

    // Why a file found on disk is not to be trusted; "" when it is: it must be a regular file of
    // this user (or of HostOptions::group) that not every user may write.
    std::string distrust(const std::string& path, const struct stat& st) const {
        if (!S_ISREG(st.st_mode)) return path + " is not a regular file";
        if (st.st_uid != ::geteuid() && !(options_.group && st.st_gid == *options_.group))
            return path + " belongs to uid " + std::to_string(st.st_uid) +
                   " (another user's ledger; to share one, set HostOptions::group in every "
                   "process)";
        if ((st.st_mode & S_IWOTH) != 0)
            return path + " is writable by every user; not trusting it";
        return {};
    }

    // Gives a file this process has just created the mode and group HostOptions asks for (the
    // umask may have taken the group bits).
    bool set_mode(int fd) const {
        const mode_t mode = options_.group ? 0660 : 0600;
        return !(options_.group && ::fchown(fd, static_cast<uid_t>(-1), *options_.group) != 0) &&
               ::fchmod(fd, mode) == 0;
    }

    // Opens (creating) one of the lock files, read-write, close-on-exec, never through a symbolic
    // link, and checks that it may be trusted. On failure: an invalid descriptor and the reason.
    detail::FileDescriptor open_file(const std::string& path, std::string& reason) const {
        reason.clear();
        const mode_t mode = options_.group ? 0660 : 0600;
        const int flags = O_RDWR | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK;
        int raw = detail::retry_eintr(
            [&] { return ::open(path.c_str(), flags | O_CREAT | O_EXCL, mode); });
        const bool created = raw >= 0;
        if (raw < 0 && errno == EEXIST)
            raw = detail::retry_eintr([&] { return ::open(path.c_str(), flags); });
        detail::FileDescriptor fd(raw);
        if (!fd) {
            reason = "cannot open " + path + " (" + detail::errno_text(errno) + ")";
            return fd;
        }
        struct stat st {};
        if (::fstat(fd.get(), &st) != 0) {
            reason = "cannot stat " + path + " (" + detail::errno_text(errno) + ")";
            return detail::FileDescriptor();
        }
        if (created && !set_mode(fd.get())) {
            reason = "cannot set the owner group or mode of " + path + " (" +
                     detail::errno_text(errno) + ")";
            return detail::FileDescriptor();
        }
        if (!created) reason = distrust(path, st);
        if (!reason.empty()) return detail::FileDescriptor();
        return fd;
    }

    static std::string lock_failure(const std::string& path, int error) {
        if (error == ETIMEDOUT) return "timed out waiting for the lock on " + path;
        return "cannot lock " + path + " (" + detail::errno_text(error) + ")";
    }

    // The flock that orders every read-modify-write of the ledger, on "<ledger>.lock": a file that
    // is never replaced (a lock on the ledger itself would protect nothing once a rename replaced
    // its inode). Held while the descriptor lives; the kernel drops it when its holder dies.
    detail::FileDescriptor lock_ledger(std::string& reason) const {
        detail::FileDescriptor fd = open_file(lock_path_, reason);
        if (!fd) return fd;
        const auto deadline =
            detail::deadline_after(std::chrono::steady_clock::now(), options_.lock_timeout);
        if (const int error = detail::lock_until(fd.get(), deadline); error != 0) {
            reason = lock_failure(lock_path_, error);
            return detail::FileDescriptor();
        }
        return fd;
    }

    // One locked read-modify-write: lock, load (salvaging a damaged file, with a warning),
    // reconcile with what is alive, run `change` (true: it changed the state), store what changed,
    // run `committed` while still locked (only when all of it worked), unlock. Returns the reason
    // when the ledger could not be used. An exception from `change` propagates with nothing written
    // (the flock goes with the descriptor).
    template <class Change, class Commit>
    std::optional<std::string> transact(Change&& change, Commit&& committed) {
        std::vector<std::string> warnings;
        std::optional<std::string> failure;
        {
            std::string reason;
            const detail::FileDescriptor lock = lock_ledger(reason);
            if (!lock) return reason;
            LedgerState state;
            bool dirty = false;
            if ((failure = load(state, dirty, warnings))) return failure;
            dirty |= reconcile(state);
            dirty |= change(state);
            if (dirty) failure = store(state);
            if (!failure) committed();
        }  // closing the lock file's descriptor releases the flock
        for (const std::string& warning : warnings)
            detail::emit(options_.log, Level::warn, warning);
        if (!failure && failing_.exchange(false, std::memory_order_relaxed))
            detail::emit(options_.log, Level::info,
                         "host ledger " + path_ + " works again; admission is host-wide again");
        return failure;
    }
    template <class Change>
    std::optional<std::string> transact(Change&& change) {
        return transact(std::forward<Change>(change), [] {});
    }

    // The ledger's bytes ("" when there is none yet), read under the lock; the reason when it
    // cannot be trusted or read.
    std::optional<std::string> read_text(std::string& text) const {
        text.clear();
        struct stat st {};
        if (::lstat(path_.c_str(), &st) != 0) {
            if (errno == ENOENT) return std::nullopt;
            return "cannot stat " + path_ + " (" + detail::errno_text(errno) + ")";
        }
        if (std::string why = distrust(path_, st); !why.empty()) return why;
        int error = 0;
        if (detail::read_small_file(path_, text, error) == detail::ReadResult::failed)
            return "cannot read " + path_ + " (" + detail::errno_text(error) + ")";
        return std::nullopt;
    }

    // The ledger as the file says, into `state`. No file (or an empty one) is a new ledger; a file
    // written before this boot names no live process; a damaged one is salvaged, never emptied
    // (see detail::salvage_ledger), with a warning. `dirty`: the file must be rewritten. Returns
    // the reason when the file cannot be read or trusted.
    std::optional<std::string> load(LedgerState& state, bool& dirty,
                                    std::vector<std::string>& warnings) const {
        std::string text;
        if (auto failure = read_text(text)) return failure;
        const std::string& boot = detail::current_boot_id();
        std::string why;
        std::optional<LedgerState> parsed;
        if (!text.empty()) parsed = detail::parse_ledger(text, &why);
        if (parsed && parsed->device != device_hash_) {
            why = "it belongs to another device identity";
            parsed.reset();
        }
        dirty = !parsed;
        if (parsed) {
            state = std::move(*parsed);
        } else if (!text.empty()) {
            state = detail::salvage_ledger(text, boot);
            warnings.push_back("host ledger " + path_ + " was damaged (" + why +
                               "); rebuilt it from the " + std::to_string(state.entries.size()) +
                               " reservations it still names (one whose size is lost counts as "
                               "the whole device until its owner releases it or exits; those of "
                               "dead owners are dropped)");
        }
        state.device = device_hash_;
        if (state.boot != boot) {
            // Written before a reboot: every pid in it is meaningless now.
            state.boot = boot;
            state.entries.clear();
            dirty = true;
        }
        return std::nullopt;
    }

    // Replaces the ledger whole (detail::replace_file: "<ledger>.tmp", fsync, rename, directory
    // fsync), so a kill at any instant leaves the old file or the new one, never a mix (an
    // in-place rewrite killed between its write and its ftruncate left the new text followed by
    // stray bytes of the old). The temporary file has one name, used under the lock: one a writer
    // killed before its rename left is removed by the next writer, and litter never grows.
    std::optional<std::string> store(const LedgerState& state) const {
        detail::ReplaceOptions how;
        how.mode = options_.group ? 0660 : 0600;
        how.group = options_.group;
        how.exact_mode = true;
        how.fixed_temp = path_ + ".tmp";
        const detail::ReplaceOutcome outcome =
            detail::replace_file(directory_, path_, path_, detail::serialize_ledger(state), how);
        if (outcome.error == 0) return std::nullopt;
        const bool rename = std::string_view(outcome.step) == "rename";
        return std::string("cannot ") + outcome.step + " " + outcome.temp +
               (rename ? " over " + path_ : std::string()) + " (" +
               detail::errno_text(outcome.error) + ")";
    }

    // Makes the state agree with what is alive: drops the entries of processes that are gone and
    // those an earlier build marked released (see LedgerEntry), and makes this process's own
    // entries exactly the reservations it holds (see detail::HeldReservations): a release that did
    // not reach the file is applied, a reservation a damaged file lost is written back, a size a
    // damaged file lost is restored. True when it changed.
    bool reconcile(LedgerState& state) const {
        const pid_t self = ::getpid();
        const std::vector<LedgerEntry> held = detail::HeldReservations::instance().of(path_, self);
        // Each owner (pid and start time) looked up once. This process's entries too: one under
        // our pid with another start time is a dead process's whose pid we were given.
        std::vector<std::pair<std::pair<pid_t, std::uint64_t>, bool>> looked_up;
        const auto alive = [&](const LedgerEntry& entry) {
            const std::pair<pid_t, std::uint64_t> owner{entry.pid, entry.start_ticks};
            for (const auto& known : looked_up)
                if (known.first == owner) return known.second;
            const bool live = detail::owner_alive(entry.pid, entry.start_ticks);
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

    // A full ledger is readable: admitting without an entry would hide the reservation from the
    // next process (over-admission), so nothing is admitted until a reservation ends; `available`
    // still counts the live ones.
    Decision refuse_full(Decision& decision) {
        decision.refused_because =
            "the host ledger " + path_ + " is full (" + std::to_string(detail::max_ledger_entries) +
            " live reservations: leaked holds?), so no reservation can be recorded";
        if (!full_.exchange(true, std::memory_order_relaxed))
            detail::emit(options_.log, Level::warn,
                         decision.refused_because + "; admission is refused until one ends");
        return std::move(decision);
    }

    // Host-wide admission is off until an operation works again; said once per such stretch.
    void unusable(const std::string& reason) {
        if (failing_.exchange(true, std::memory_order_relaxed)) return;
        detail::emit(options_.log, Level::warn,
                     "host ledger for " + identity_ + " is not usable: " + reason +
                         "; admission uses this process's own view only (other processes' loads "
                         "in flight are not seen), and single items are excluded within this "
                         "process only, until it works again");
    }

    std::unique_ptr<Hold> single_item_failed(const std::string& reason) {
        // When the ledger itself is unusable its one warning has said this already.
        if (!single_item_failing_.exchange(true, std::memory_order_relaxed) &&
            !failing_.load(std::memory_order_relaxed))
            detail::emit(options_.log, Level::warn,
                         "host-wide single-item lock for " + identity_ + " not taken: " + reason +
                             "; single items run with in-process exclusion only");
        return nullptr;
    }

    const std::string identity_;
    const std::uint64_t device_hash_;
    const HostOptions options_;
    std::string directory_;
    std::string path_;       // the ledger
    std::string lock_path_;  // "<ledger>.lock"
    std::atomic<bool> failing_{false};
    std::atomic<bool> full_{false};  // said once per spell of a full ledger
    std::atomic<bool> single_item_failing_{false};
};

// ---- how many worker processes ----------------------------------------------------------------

// Workers for a pre-forking server. Without a GPU (`gpu` empty, or a report of 0 total bytes) the
// usual CPU formula, 2 x cores + 1. With one: min(4, cores), because every worker loads its own
// model copy onto the same device; and, given the model's footprint, no more workers than the
// device's free memory holds beside the safety margin (each copy must pass the same admission
// rule: footprint + margin <= free). Never below 1. `gpu` is a reading taken before any worker
// loads; take it without initializing CUDA in the parent (NVML, nvidia-smi, or a short-lived
// child), since CUDA does not survive fork().
inline std::size_t recommended_workers(
    std::optional<MemoryInfo> gpu, std::uint64_t model_footprint_bytes = 0,
    double safety_margin = defaults::safety_margin,
    unsigned cores = std::thread::hardware_concurrency()) noexcept {
    const std::size_t cpus = cores == 0 ? 1 : cores;  // 0: the standard library could not tell
    if (!gpu || gpu->total_bytes == 0) return 2 * cpus + 1;
    std::size_t workers = std::min(defaults::gpu_workers, cpus);
    if (model_footprint_bytes > 0) {
        if (!(safety_margin >= 0 && safety_margin < 1)) safety_margin = defaults::safety_margin;
        const std::uint64_t margin = policy::margin_bytes(gpu->total_bytes, safety_margin);
        const std::uint64_t usable = gpu->free_bytes > margin ? gpu->free_bytes - margin : 0;
        workers = static_cast<std::size_t>(
            std::min<std::uint64_t>(workers, usable / model_footprint_bytes));
    }
    return std::max<std::size_t>(1, workers);
}

// The same with the footprint taken from the profile cache: the model's measured load peak times
// history_headroom, as Guard would require it (unknown: the count is not capped by memory).
inline std::size_t recommended_workers(std::optional<MemoryInfo> gpu, ProfileCache& profiles,
                                       const Key& model,
                                       double safety_margin = defaults::safety_margin,
                                       double history_headroom = defaults::history_headroom,
                                       unsigned cores = std::thread::hardware_concurrency()) {
    const std::uint64_t peak = profiles.get(model).peak_bytes;
    const std::uint64_t footprint = peak == 0 ? 0 : policy::scale_bytes(peak, history_headroom);
    return recommended_workers(gpu, footprint, safety_margin, cores);
}

VRAMGUARD_END_NAMESPACE
