// SPDX-License-Identifier: MIT
// What work costs, learned per Key and kept across runs: the newest measured peaks of loads and
// encode chunks (a bounded window, so a wrong reading ages out), and the batch ceiling / weight
// budget that last worked.
//
// Files are shared by every process on the host (pre-forked workers, restarts), so:
//  - one small text file per key, replaced by write-temp + fsync + rename, so a reader sees the old
//    file or the new one, never half of either, and never needs a lock;
//  - read-modify-write runs under flock on "<dir>/.lock", so the samples of every process are
//    merged (the newest window of all of them), not only those of this process's threads;
//  - nothing here throws or stops the caller over the disk: an unwritable directory degrades to
//    memory-only with one warning, and a damaged file is ignored with one warning and rewritten;
//  - a guard's cache writes behind (ProfileCacheSettings::write_behind): a record marks its key
//    dirty and a writer thread writes it, so no caller waits for an fsync.
#pragma once

#include <vramguard/detail/posix.hpp>
#include <vramguard/detail/profile_dir.hpp>
#include <vramguard/detail/profile_format.hpp>
#include <vramguard/detail/text_record.hpp>
#include <vramguard/detail/write_behind.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/profile_record.hpp>
#include <vramguard/version.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

// How a ProfileCache writes, beyond where (Guard fills it from Options).
struct ProfileCacheSettings {
    // Unset: each record is written before it returns (a cache made on its own, as tools and
    // tests use one). Set: a record only marks its key dirty, and a writer thread writes the dirty
    // keys, at most once per this interval, coalescing whatever they learned in between; flush()
    // and the destructor write what is left. A Guard always writes behind
    // (Options::persist_interval).
    std::optional<std::chrono::milliseconds> write_behind;
    // Profile files no process wrote or read for longer are removed when the cache opens the
    // directory; 0 keeps them for ever. (Reading a file refreshes its time.)
    std::chrono::seconds max_age{0};
};

// Profiles per key, in memory and (unless disabled or degraded) on disk. Thread-safe; one per
// guard, and any number per process or per directory. The memory is authoritative: the file is
// read once per key, and written from it (merged with what the file holds by then).
class ProfileCache {
   public:
    // A temporary file older than this belongs to no live write, whatever its pid says.
    static constexpr std::time_t stale_temp_file_seconds = 3600;
    // The longest wait for another process's write to the directory; then this one is skipped.
    static constexpr std::chrono::milliseconds lock_timeout{5000};

    // `directory` "" means default_directory(). `persist` false keeps everything in memory and
    // never touches the disk.
    explicit ProfileCache(std::string directory = "", bool persist = true,
                          LogSink log = stderr_sink(), ProfileCacheSettings settings = {})
        : persist_(persist), log_(std::move(log)), max_age_(settings.max_age) {
        if (persist_ && directory.empty()) directory = default_directory();
        while (directory.size() > 1 && directory.back() == '/') directory.pop_back();
        directory_ = std::move(directory);
        if (!persist_) return;
        if (directory_.empty()) {
            detail::emit(log_, Level::info,
                         "no profile directory (VRAMGUARD_PROFILE_DIR, XDG_CACHE_HOME and HOME are "
                         "unset); learned profiles are kept in memory only");
            return;
        }
        std::vector<std::string> warnings;
        if (const int error = detail::make_directories(directory_); error != 0) {
            degrade("cannot create it (" + detail::errno_text(error) + ")", warnings);
            log_warnings(warnings);
            return;
        }
        directory_usable_ = true;
        detail::remove_stale_temp_files(directory_, stale_temp_file_seconds);
        remove_old_profiles();
        if (settings.write_behind)
            writer_ = std::make_unique<detail::WriteBehind>(*settings.write_behind,
                                                            [this] { write_dirty(); });
    }
    ProfileCache(const ProfileCache&) = delete;
    ProfileCache& operator=(const ProfileCache&) = delete;
    // Writes what is still dirty: nothing learned is lost on a clean shutdown.
    ~ProfileCache() {
        if (!writer_) return;
        writer_->stop();
        write_dirty();
    }

    // $VRAMGUARD_PROFILE_DIR, else $XDG_CACHE_HOME/vramguard, else $HOME/.cache/vramguard, else ""
    // (memory only). Empty variables count as unset, and a relative XDG_CACHE_HOME is ignored, as
    // the XDG specification asks.
    static std::string default_directory() {
        if (const char* dir = std::getenv("VRAMGUARD_PROFILE_DIR"); dir && *dir) return dir;
        if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg == '/')
            return std::string(xdg) + "/vramguard";
        if (const char* home = std::getenv("HOME"); home && *home)
            return std::string(home) + "/.cache/vramguard";
        return "";
    }

    // Memory first; the file is read once per key, on the first miss.
    std::optional<Profile> find(const Key& key) {
        std::vector<std::string> warnings;
        std::optional<Profile> result;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            const Entry& entry = entry_for(key, warnings);
            if (entry.known) result = entry.profile;
        }
        log_warnings(warnings);
        return result;
    }
    Profile get(const Key& key) { return find(key).value_or(Profile{}); }

    // Records one measured peak: a load's, or with `items` an encode chunk's of that many items.
    // The profile keeps the newest profile_window of each; peak_bytes (peak_bytes_per_item) is the
    // highest among them, so a wrong reading ages out instead of winning for ever.
    // A zero peak is no measurement (the work ran inside memory already held): nothing is kept.
    void record_peak(const Key& key, std::uint64_t peak_bytes, std::uint64_t items = 0) {
        if (peak_bytes == 0) return;
        const ProfileSample sample{detail::next_sample_stamp(), items, peak_bytes};
        record_samples(key, items == 0 ? &Profile::load_samples : &Profile::item_samples,
                       {&sample, &sample + 1});
    }
    // Records encode chunks' samples (items or weight units) at once: one write for many.
    void record_samples(const Key& key, std::vector<ProfileSample> Profile::*kind,
                        const std::vector<ProfileSample>& samples) {
        if (samples.empty()) return;
        update(key, [&](Entry& entry) {
            detail::merge_samples(entry.profile.*kind, samples);
            detail::derive_peaks(entry.profile);
        });
    }
    // The latest wins: it is what just worked, and memory pressure changes both ways.
    void record_batch_ceiling(const Key& key, std::uint64_t ceiling) {
        update(key, [&](Entry& entry) {
            if (entry.profile.batch_ceiling == ceiling) return;
            entry.profile.batch_ceiling = ceiling;
            entry.ceiling_dirty = true;
        });
    }
    void record_weight_budget(const Key& key, std::uint64_t budget) {
        update(key, [&](Entry& entry) {
            if (entry.profile.weight_budget == budget) return;
            entry.profile.weight_budget = budget;
            entry.budget_dirty = true;
        });
    }

    // Writes every key recorded since its last write now, on the calling thread (after a write
    // the writer thread has in progress). Never throws; a disk that fails is logged and counted.
    void flush() noexcept { write_dirty(); }

    // Drops the key from memory and deletes its file.
    void forget(const Key& key) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            entries_.erase(key);
        }
        if (!directory_usable_) return;
        std::lock_guard<std::mutex> io_lock(io_mutex_);
        detail::FileDescriptor lock_file = lock_directory();  // best effort: unlink works without
        if (::unlink(path_for(key).c_str()) == 0) detail::sync_directory(directory_);
    }

    // Drops the in-memory copy, so the next find() reads the file again (to see other processes'
    // records); what this cache learned of the key and has not written yet is written first.
    void reload(const Key& key) {
        bool dirty = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto found = entries_.find(key);
            dirty = found != entries_.end() && found->second.dirty;
        }
        if (dirty) {
            std::vector<std::string> warnings;
            std::lock_guard<std::mutex> pass(pass_mutex_);
            write_through(key, warnings);
            log_warnings(warnings);
        }
        std::lock_guard<std::mutex> lock(mutex_);
        entries_.erase(key);
    }

    // False when persist was off, there is no directory, or writing failed and the cache degraded.
    bool persistent() const noexcept {
        return persist_ && directory_usable_ && !degraded_.load(std::memory_order_relaxed);
    }
    const std::string& directory() const noexcept { return directory_; }
    // Where the key's profile lives: "<directory>/<hex>.profile".
    std::string path_for(const Key& key) const { return directory_ + "/" + key.hex() + ".profile"; }
    // Profile files written, and writes that failed or were skipped (each also logged).
    std::uint64_t writes() const noexcept { return writes_.load(std::memory_order_relaxed); }
    std::uint64_t write_failures() const noexcept {
        return write_failures_.load(std::memory_order_relaxed);
    }
    // Whether records are written by a writer thread (ProfileCacheSettings::write_behind).
    bool writes_behind() const noexcept { return writer_ != nullptr; }

   private:
    struct Entry {
        Profile profile;
        bool known = false;          // a profile exists (read from disk or recorded)
        bool dirty = false;          // changed since the last write (write-behind), in dirty_
        bool ceiling_dirty = false;  // recorded since the last write: ours beats the file's
        bool budget_dirty = false;
    };
    enum class WriteResult { done, retry };

    // Applies `change`; when it changed anything, writes the result through, or (write-behind)
    // marks the key for the writer. Unchanged records cost one lock and one lookup: they are on
    // every guarded call's path.
    template <class Change>
    void update(const Key& key, Change&& change) {
        std::vector<std::string> warnings;
        bool changed = false, newly_dirty = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            Entry& entry = entry_for(key, warnings);
            const Profile before = entry.profile;
            change(entry);
            if (entry.profile != before) {
                entry.known = true;
                changed = true;
                if (writer_ && writing() && !entry.dirty) {
                    mark_dirty(key, entry);
                    newly_dirty = true;
                }
            }
        }
        if (newly_dirty) writer_->mark();
        if (changed && !writer_) write_through(key, warnings);
        log_warnings(warnings);
    }

    bool writing() const noexcept {
        return directory_usable_ && !degraded_.load(std::memory_order_relaxed);
    }
    // Caller holds mutex_.
    void mark_dirty(const Key& key, Entry& entry) {
        entry.dirty = true;
        dirty_.push_back(key);
    }

    // One write pass: every dirty key, merged with its file. Runs on the writer thread, in
    // flush() and at destruction; one pass at a time, so flush() returns only after a pass in
    // progress is done.
    void write_dirty() noexcept {
        std::vector<std::string> warnings;
        try {
            std::lock_guard<std::mutex> pass(pass_mutex_);
            std::vector<Key> keys;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                keys.swap(dirty_);
                for (const Key& key : keys)
                    if (auto found = entries_.find(key); found != entries_.end())
                        found->second.dirty = false;
            }
            bool retry = false;
            for (const Key& key : keys)
                if (write_through(key, warnings) == WriteResult::retry) retry |= remark(key);
            if (retry && writer_) writer_->mark();
        } catch (...) {
            // Out of memory for the bookkeeping: the keys stay in memory, written with a later
            // pass.
        }
        log_warnings(warnings);
    }
    // A write skipped (the directory stayed locked): the key goes back on the list.
    bool remark(const Key& key) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto found = entries_.find(key);
        if (found == entries_.end() || found->second.dirty) return false;
        mark_dirty(key, found->second);
        return true;
    }

    // The entry for `key`, read from disk on the first miss. Caller holds mutex_.
    Entry& entry_for(const Key& key, std::vector<std::string>& warnings) {
        auto found = entries_.find(key);
        if (found != entries_.end()) return found->second;
        Entry entry;
        if (auto profile = read_profile(key, warnings)) {
            entry.profile = *profile;
            entry.known = true;
            if (max_age_.count() > 0) detail::touch_file(path_for(key));  // in use: not old
        }
        return entries_.emplace(key, entry).first->second;
    }

    // The key's file, or nothing (missing, unreadable or damaged; the last two warn once per key).
    // Samples stamped in the future are taken as recorded now (clamp_future_stamps).
    // Caller holds mutex_ or io_mutex_ (the warned set has its own lock).
    std::optional<Profile> read_profile(const Key& key, std::vector<std::string>& warnings) {
        if (!directory_usable_) return std::nullopt;
        const std::string path = path_for(key);
        std::string text;
        int error = 0;
        const detail::ReadResult read = detail::read_small_file(path, text, error);
        if (read == detail::ReadResult::missing) return std::nullopt;
        std::string reason;
        if (read == detail::ReadResult::failed) {
            reason = "cannot read it (" + detail::errno_text(error) + ")";
        } else if (auto profile = detail::parse_profile(text, key.hex(), &reason)) {
            detail::clamp_future_stamps(*profile, detail::wall_clock_ns());
            return profile;
        }
        {
            std::lock_guard<std::mutex> lock(warned_mutex_);
            if (!warned_files_.insert(key.value()).second) return std::nullopt;
        }
        warnings.push_back("ignoring profile " + path + " for " + key.describe() + ": " + reason +
                           "; the next record overwrites it");
        return std::nullopt;
    }

    // Read-merge-write under the directory lock: the samples of both (the newest window); a
    // ceiling or budget recorded here since the last write replaces the file's. `retry` when the
    // directory stayed locked (the key is written with a later pass or record).
    WriteResult write_through(const Key& key, std::vector<std::string>& warnings) {
        if (!writing()) return WriteResult::done;
        std::lock_guard<std::mutex> io_lock(io_mutex_);
        if (degraded_.load(std::memory_order_relaxed)) return WriteResult::done;
        detail::FileDescriptor lock_file = lock_directory();
        if (!lock_file && errno == ETIMEDOUT) {
            write_failures_.fetch_add(1, std::memory_order_relaxed);
            warnings.push_back("profile directory " + directory_ + " stayed locked for " +
                               std::to_string(lock_timeout.count()) + " ms; " + key.describe() +
                               " is written later");
            return WriteResult::retry;
        }
        if (!lock_file) {
            write_failures_.fetch_add(1, std::memory_order_relaxed);
            degrade("cannot lock " + directory_ + "/.lock (" + detail::errno_text(errno) + ")",
                    warnings);
            return WriteResult::done;
        }
        const std::optional<Profile> on_disk = read_profile(key, warnings);
        std::optional<Profile> merged = merge_with(key, on_disk);
        if (!merged) return WriteResult::done;  // forgotten meanwhile
        if (on_disk && *on_disk == *merged) {
            adopt(key, *merged);  // the file already says it (another process was first)
            return WriteResult::done;
        }
        if (write_file(key, *merged, warnings)) adopt(key, *merged);
        return WriteResult::done;
    }

    // What memory holds for the key merged with the file's; nothing when the key was forgotten.
    std::optional<Profile> merge_with(const Key& key, const std::optional<Profile>& on_disk) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto found = entries_.find(key);
        if (found == entries_.end() || !found->second.known) return std::nullopt;
        Entry& entry = found->second;
        Profile merged = entry.profile;
        if (on_disk)
            detail::merge_profile(merged, *on_disk, entry.ceiling_dirty, entry.budget_dirty);
        entry.ceiling_dirty = entry.budget_dirty = false;
        return merged;
    }

    // Takes what the file now holds into memory, without undoing records made meanwhile.
    void adopt(const Key& key, const Profile& merged) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto found = entries_.find(key);
        if (found == entries_.end() || !found->second.known) return;
        Entry& entry = found->second;
        detail::merge_profile(entry.profile, merged, entry.ceiling_dirty, entry.budget_dirty);
    }

    // replace_file (temp, fsync, rename, directory fsync). Caller holds io_mutex_ and the
    // directory lock.
    bool write_file(const Key& key, const Profile& profile, std::vector<std::string>& warnings) {
        const detail::ReplaceOutcome outcome =
            detail::replace_file(directory_, directory_ + "/." + key.hex(), path_for(key),
                                 detail::serialize_profile(key, profile));
        if (outcome.error == 0) {
            writes_.fetch_add(1, std::memory_order_relaxed);
            return true;
        }
        write_failures_.fetch_add(1, std::memory_order_relaxed);
        degrade(std::string("cannot ") + outcome.step + " " + outcome.temp + " (" +
                    detail::errno_text(outcome.error) + ")",
                warnings);
        return false;
    }

    detail::FileDescriptor lock_directory() {
        return detail::lock_profile_directory(directory_, lock_timeout);
    }

    // Profiles nobody used for max_age go (under the lock: no write lands in between). Said once.
    void remove_old_profiles() {
        if (max_age_.count() <= 0) return;
        detail::FileDescriptor lock_file = lock_directory();
        if (!lock_file) return;  // another day
        const std::size_t removed =
            detail::remove_old_profiles(directory_, max_age_, std::time(nullptr));
        if (removed > 0)
            detail::emit(log_, Level::info,
                         "removed " + std::to_string(removed) + " profile(s) unused for over " +
                             std::to_string(max_age_.count()) + " s from " + directory_);
    }

    // Memory-only from now on, said once.
    void degrade(const std::string& reason, std::vector<std::string>& warnings) {
        if (degraded_.exchange(true)) return;
        warnings.push_back("profile directory " + directory_ + " is not usable: " + reason +
                           "; learned profiles are kept in memory only");
    }

    // Log outside every lock: a sink may call back into this cache.
    void log_warnings(const std::vector<std::string>& warnings) const {
        for (const std::string& warning : warnings) detail::emit(log_, Level::warn, warning);
    }

    const bool persist_;
    std::string directory_;
    bool directory_usable_ = false;  // set once in the constructor
    LogSink log_;
    const std::chrono::seconds max_age_;
    std::atomic<bool> degraded_{false};
    std::atomic<std::uint64_t> writes_{0}, write_failures_{0};

    std::mutex mutex_;       // entries_, dirty_
    std::mutex io_mutex_;    // one read-merge-write at a time here; the flock orders other caches
    std::mutex pass_mutex_;  // one write pass at a time (flush() waits for the writer's)
    std::unordered_map<Key, Entry> entries_;
    std::vector<Key> dirty_;  // keys whose entry is dirty, each once
    std::mutex warned_mutex_;
    std::unordered_set<std::uint64_t> warned_files_;
    std::unique_ptr<detail::WriteBehind> writer_;  // last: stopped before the rest goes
};

VRAMGUARD_END_NAMESPACE
