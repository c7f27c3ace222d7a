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
#include <vramguard/detail/ledger_file.hpp>
#include <vramguard/detail/ledger_format.hpp>
#include <vramguard/detail/ledger_process.hpp>
#include <vramguard/detail/posix.hpp>
#include <vramguard/key.hpp>
#include <vramguard/ledger_state.hpp>
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
        detail::make_directories(ledger->file_.directory());
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
        return detail::LedgerFile::file_name(device_identity);
    }

    HostLedger(Private, std::string device_identity, HostOptions options)
        : identity_(std::move(device_identity)),
          options_(std::move(options)),
          file_(options_.directory.empty() ? default_directory() : options_.directory, identity_,
                options_.group, options_.lock_timeout) {}
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
                if (mine.id != 0) detail::HeldReservations::instance().add(file_.path(), mine);
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
        detail::FileDescriptor turnstile = file_.open_file(file_.path() + ".turnstile", reason);
        if (!turnstile) return single_item_failed(reason);
        if (const int error = detail::lock_until(turnstile.get(), deadline); error != 0)
            return single_item_failed(
                detail::LedgerFile::lock_failure(file_.path() + ".turnstile", error));
        detail::FileDescriptor lock = file_.open_file(file_.path() + ".single", reason);
        if (!lock) return single_item_failed(reason);
        if (const int error = detail::lock_until(lock.get(), deadline); error != 0)
            return single_item_failed(
                detail::LedgerFile::lock_failure(file_.path() + ".single", error));
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
    const std::string& path() const noexcept { return file_.path(); }
    const std::string& lock_path() const noexcept { return file_.lock_path(); }
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
            detail::HeldReservations::instance().remove(file_.path(), id);
            if (const auto failure = transact([](LedgerState&) { return false; }))
                unusable(*failure);
        } catch (...) {
            // Out of memory while releasing: the entry goes when this process does.
        }
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
            const detail::FileDescriptor lock = file_.lock(reason);
            if (!lock) return reason;
            LedgerState state;
            bool dirty = false;
            if ((failure = file_.load(state, dirty, warnings))) return failure;
            dirty |= detail::reconcile_ledger(state, file_.path());
            dirty |= change(state);
            if (dirty) failure = file_.store(state);
            if (!failure) committed();
        }  // closing the lock file's descriptor releases the flock
        for (const std::string& warning : warnings)
            detail::emit(options_.log, Level::warn, warning);
        if (!failure && failing_.exchange(false, std::memory_order_relaxed))
            detail::emit(
                options_.log, Level::info,
                "host ledger " + file_.path() + " works again; admission is host-wide again");
        return failure;
    }
    template <class Change>
    std::optional<std::string> transact(Change&& change) {
        return transact(std::forward<Change>(change), [] {});
    }

    // A full ledger is readable: admitting without an entry would hide the reservation from the
    // next process (over-admission), so nothing is admitted until a reservation ends; `available`
    // still counts the live ones.
    Decision refuse_full(Decision& decision) {
        decision.refused_because =
            "the host ledger " + file_.path() + " is full (" +
            std::to_string(detail::max_ledger_entries) +
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
    const HostOptions options_;
    const detail::LedgerFile file_;
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
