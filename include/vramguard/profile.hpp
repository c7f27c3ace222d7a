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
#include <vramguard/detail/text_record.hpp>
#include <vramguard/detail/write_behind.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
#include <vramguard/policy.hpp>
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

// One measured run, as the profile keeps it: what ran (`size`: items or weight units, 0 for a
// load), what it took at its peak, and when (a wall-clock stamp in ns, which orders samples from
// every process and tells a sample already merged from a new one).
struct ProfileSample {
    std::uint64_t stamp = 0;
    std::uint64_t size = 0;
    std::uint64_t peak_bytes = 0;

    friend bool operator==(const ProfileSample& a, const ProfileSample& b) noexcept {
        return a.stamp == b.stamp && a.size == b.size && a.peak_bytes == b.peak_bytes;
    }
    friend bool operator<(const ProfileSample& a, const ProfileSample& b) noexcept {
        if (a.stamp != b.stamp) return a.stamp < b.stamp;
        if (a.size != b.size) return a.size < b.size;
        return a.peak_bytes < b.peak_bytes;
    }
};

// Samples kept per key and kind, the newest: a wrong reading (another process's allocation seen
// as ours) ages out after this many newer ones instead of winning for ever. One window: the
// profile keeps exactly what the cost model fits (policy::cost_window).
inline constexpr std::size_t profile_window = policy::cost_window;

// What is known about one key; 0 or empty means "not known yet".
struct Profile {
    Profile() = default;
    Profile(std::uint64_t peak, std::uint64_t per_item, std::uint64_t ceiling, std::uint64_t budget)
        : peak_bytes(peak),
          peak_bytes_per_item(per_item),
          batch_ceiling(ceiling),
          weight_budget(budget) {}

    std::uint64_t peak_bytes = 0;               // highest peak of the recent loads (or runs)
    std::uint64_t peak_bytes_per_item = 0;      // highest peak per item of the recent encode chunks
    std::uint64_t batch_ceiling = 0;            // largest batch (items) that last worked
    std::uint64_t weight_budget = 0;            // largest batch weight (tokens...) that last worked
    std::vector<ProfileSample> load_samples;    // oldest first, at most profile_window each
    std::vector<ProfileSample> item_samples;    // encode chunks sized in items
    std::vector<ProfileSample> weight_samples;  // encode chunks sized in weight units

    friend bool operator==(const Profile& a, const Profile& b) noexcept {
        return a.peak_bytes == b.peak_bytes && a.peak_bytes_per_item == b.peak_bytes_per_item &&
               a.batch_ceiling == b.batch_ceiling && a.weight_budget == b.weight_budget &&
               a.load_samples == b.load_samples && a.item_samples == b.item_samples &&
               a.weight_samples == b.weight_samples;
    }
    friend bool operator!=(const Profile& a, const Profile& b) noexcept { return !(a == b); }
};

namespace detail {

// File format, version 2 (text, so an operator can read and delete it; every line ends in '\n'):
//   vramguard-profile 2
//   key <16 hex digits>
//   label <Key::label(), already escaped to one printable line>
//   peak_bytes <decimal>
//   peak_bytes_per_item <decimal>
//   batch_ceiling <decimal>
//   weight_budget <decimal>
//   samples <count>
//   <load|items|weight> <stamp> <size> <peak bytes>      (count lines, each kind oldest first)
//   checksum <FNV-1a 64 of every byte above, 16 hex digits>
// Version 1 is the same without the samples; it is still read (its peaks become the first
// samples' upper bounds, see Guard), and the next record rewrites it as version 2.
inline constexpr std::string_view profile_magic = "vramguard-profile 2";
inline constexpr std::string_view profile_magic_v1 = "vramguard-profile 1";
// Far above any real file; stops a stray huge file from being read into memory.
inline constexpr std::size_t max_profile_file_bytes = max_small_file_bytes;

struct SampleKind {
    std::string_view name;
    std::vector<ProfileSample> Profile::*samples;
};
inline constexpr SampleKind sample_kinds[] = {
    {"load", &Profile::load_samples},
    {"items", &Profile::item_samples},
    {"weight", &Profile::weight_samples},
};

inline std::string serialize_profile(const Key& key, const Profile& profile) {
    std::string text;
    text.reserve(200 + key.label().size() + 64 * profile_window);
    text.append(profile_magic).append("\n");
    text.append("key ").append(key.hex()).append("\n");
    text.append("label ").append(key.label()).append("\n");
    text.append("peak_bytes ").append(std::to_string(profile.peak_bytes)).append("\n");
    text.append("peak_bytes_per_item ").append(std::to_string(profile.peak_bytes_per_item));
    text.append("\n");
    text.append("batch_ceiling ").append(std::to_string(profile.batch_ceiling)).append("\n");
    text.append("weight_budget ").append(std::to_string(profile.weight_budget)).append("\n");
    std::size_t count = 0;
    for (const SampleKind& kind : sample_kinds) count += (profile.*kind.samples).size();
    text.append("samples ").append(std::to_string(count)).append("\n");
    for (const SampleKind& kind : sample_kinds) {
        for (const ProfileSample& sample : profile.*kind.samples) {
            text.append(kind.name).append(" ").append(std::to_string(sample.stamp)).append(" ");
            text.append(std::to_string(sample.size)).append(" ");
            text.append(std::to_string(sample.peak_bytes)).append("\n");
        }
    }
    append_checksum_line(text);
    return text;
}

// One "<kind> <stamp> <size> <peak>" line into its kind's list; false for anything this code
// would not have written: fields not separated by exactly one space, a kind before one already
// read (they are written load, items, weight), a sample not strictly newer than the one before,
// more than a window of a kind. `kind_index` is the index of the kind read last (0 to start).
inline bool parse_sample_line(std::string_view line, Profile& profile, std::size_t& kind_index) {
    if (std::count(line.begin(), line.end(), ' ') != 3) return false;
    std::string_view fields[4];
    for (std::string_view& field : fields) {
        const std::size_t space = line.find(' ');
        field = line.substr(0, space);
        line = space == std::string_view::npos ? std::string_view() : line.substr(space + 1);
        if (field.empty()) return false;
    }
    ProfileSample sample;
    if (!parse_decimal_u64(fields[1], sample.stamp) || !parse_decimal_u64(fields[2], sample.size) ||
        !parse_decimal_u64(fields[3], sample.peak_bytes))
        return false;
    for (std::size_t k = kind_index; k < std::size(sample_kinds); ++k) {
        if (fields[0] != sample_kinds[k].name) continue;
        auto& list = profile.*sample_kinds[k].samples;
        if (list.size() >= profile_window || (!list.empty() && !(list.back() < sample)))
            return false;
        list.push_back(sample);
        kind_index = k;
        return true;
    }
    return false;
}

// Parses a profile file written for the key whose hex() is `expected_hex`. Returns nothing, with
// the reason in `*error` when given, for anything that is not exactly such a file: arbitrary bytes
// are safe input (this is the fuzzing entry point).
inline std::optional<Profile> parse_profile(std::string_view text, std::string_view expected_hex,
                                            std::string* error = nullptr) {
    const auto fail = [error](std::string reason) {
        return parse_failure(error, std::move(reason));
    };
    if (text.size() > max_profile_file_bytes) return fail("file is too large");
    LineReader lines(text);

    std::string_view line;
    if (!lines.next(line)) return fail("file is empty or truncated");
    const bool version1 = line == profile_magic_v1;
    if (line != profile_magic && !version1) {
        if (line.substr(0, 18) == "vramguard-profile ")
            return fail("unsupported format version (expected \"" + std::string(profile_magic) +
                        "\")");
        return fail("not a vramguard profile (bad first line)");
    }
    std::string_view hex, label, checksum;
    if (!lines.next_field("key", hex) || !is_hex16(hex))
        return fail("truncated or malformed key line");
    if (!lines.next_field("label", label)) return fail("truncated or malformed label line");
    Profile profile;
    const std::pair<std::string_view, std::uint64_t*> numbers[] = {
        {"peak_bytes", &profile.peak_bytes},
        {"peak_bytes_per_item", &profile.peak_bytes_per_item},
        {"batch_ceiling", &profile.batch_ceiling},
        {"weight_budget", &profile.weight_budget},
    };
    for (const auto& number : numbers) {
        std::string_view digits;
        if (!lines.next_field(number.first, digits) || !parse_decimal_u64(digits, *number.second))
            return fail("truncated or malformed " + std::string(number.first) + " line");
    }
    std::string_view digits;
    std::uint64_t count = 0;
    if (!version1 && (!lines.next_field("samples", digits) || !parse_decimal_u64(digits, count) ||
                      count > std::size(sample_kinds) * profile_window))
        return fail("truncated or malformed samples line");
    std::size_t kind_index = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
        if (!lines.next(line) || !parse_sample_line(line, profile, kind_index))
            return fail("truncated or malformed sample line " + std::to_string(i + 1));
    }
    const std::size_t checked_bytes = lines.position();
    if (!lines.next_field("checksum", checksum))
        return fail("truncated or malformed checksum line");
    switch (check_checksum_line(lines, checked_bytes, checksum)) {
        case ChecksumLine::ok: break;
        case ChecksumLine::malformed: return fail("truncated or malformed checksum line");
        case ChecksumLine::not_last: return fail("unexpected bytes after the checksum line");
        case ChecksumLine::mismatch: return fail("checksum mismatch (damaged or hand-edited file)");
    }
    if (hex != expected_hex) return fail("file belongs to key " + std::string(hex));
    return profile;
}

inline std::optional<Profile> parse_profile(std::string_view text, const Key& expected,
                                            std::string* error = nullptr) {
    return parse_profile(text, expected.hex(), error);
}

// The wall clock in ns: what sample stamps are, so samples of every process order by it.
inline std::uint64_t wall_clock_ns() noexcept {
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME, &now);
    return static_cast<std::uint64_t>(now.tv_sec) * 1000000000u +
           static_cast<std::uint64_t>(now.tv_nsec);
}

// A wall-clock stamp in ns, strictly increasing within the process (two samples recorded in one
// tick stay two samples when merged).
inline std::uint64_t next_sample_stamp() noexcept {
    static std::atomic<std::uint64_t> last{0};
    std::uint64_t stamp = wall_clock_ns();
    std::uint64_t seen = last.load(std::memory_order_relaxed);
    do {
        stamp = std::max(stamp, seen + 1);
    } while (!last.compare_exchange_weak(seen, stamp, std::memory_order_relaxed));
    return stamp;
}

// `into` becomes the newest profile_window samples of both lists, oldest first, each once.
inline void merge_samples(std::vector<ProfileSample>& into,
                          const std::vector<ProfileSample>& from) {
    into.insert(into.end(), from.begin(), from.end());
    std::sort(into.begin(), into.end());
    into.erase(std::unique(into.begin(), into.end()), into.end());
    if (into.size() > profile_window)
        into.erase(into.begin(), into.end() - static_cast<std::ptrdiff_t>(profile_window));
}

// The scalar peaks follow the samples, so they age out with them; a version 1 file's scalars
// stand until samples replace them.
inline void derive_peaks(Profile& profile) {
    if (!profile.load_samples.empty() || !profile.item_samples.empty()) profile.peak_bytes = 0;
    for (const auto* samples : {&profile.load_samples, &profile.item_samples})
        for (const ProfileSample& s : *samples)
            profile.peak_bytes = std::max(profile.peak_bytes, s.peak_bytes);
    if (!profile.item_samples.empty()) {
        profile.peak_bytes_per_item = 0;
        for (const ProfileSample& s : profile.item_samples)
            if (s.size > 0)
                profile.peak_bytes_per_item =
                    std::max(profile.peak_bytes_per_item,
                             s.peak_bytes / s.size + (s.peak_bytes % s.size != 0));
    }
}

inline void merge_profile_samples(Profile& into, const Profile& from) {
    for (const SampleKind& kind : sample_kinds)
        merge_samples(into.*kind.samples, from.*kind.samples);
    derive_peaks(into);
}

// A sample stamped after `now` was written by a process whose wall clock ran ahead (before an NTP
// step back, a VM restore) or by a buggy writer. The window keeps the newest by stamp, so such a
// sample would push out every sample recorded after it until the clock caught up: for ever, if the
// clock was far ahead. Its stamp says nothing true about when it was taken, so, read from a file,
// it is taken as the oldest (stamp 0): the first to go when newer samples come, and while the
// window has room it still counts. Every read clamps it to the same stamp, so the copies that
// different reads (and processes) merge stay one sample. Returns whether anything was clamped.
inline bool clamp_future_stamps(Profile& profile, std::uint64_t now) {
    bool clamped = false;
    for (const SampleKind& kind : sample_kinds) {
        std::vector<ProfileSample>& samples = profile.*kind.samples;
        bool here = false;
        for (ProfileSample& sample : samples) {
            if (sample.stamp <= now) continue;
            sample.stamp = 0;
            here = true;
        }
        if (!here) continue;
        std::sort(samples.begin(), samples.end());
        samples.erase(std::unique(samples.begin(), samples.end()), samples.end());
        clamped = true;
    }
    if (clamped) derive_peaks(profile);
    return clamped;
}

}  // namespace detail

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
        if (on_disk) {
            merged.peak_bytes = std::max(merged.peak_bytes, on_disk->peak_bytes);
            merged.peak_bytes_per_item =
                std::max(merged.peak_bytes_per_item, on_disk->peak_bytes_per_item);
            detail::merge_profile_samples(merged, *on_disk);
            if (!entry.ceiling_dirty) merged.batch_ceiling = on_disk->batch_ceiling;
            if (!entry.budget_dirty) merged.weight_budget = on_disk->weight_budget;
        }
        entry.ceiling_dirty = entry.budget_dirty = false;
        return merged;
    }

    // Takes what the file now holds into memory, without undoing records made meanwhile.
    void adopt(const Key& key, const Profile& merged) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto found = entries_.find(key);
        if (found == entries_.end() || !found->second.known) return;
        Entry& entry = found->second;
        entry.profile.peak_bytes = std::max(entry.profile.peak_bytes, merged.peak_bytes);
        entry.profile.peak_bytes_per_item =
            std::max(entry.profile.peak_bytes_per_item, merged.peak_bytes_per_item);
        detail::merge_profile_samples(entry.profile, merged);
        if (!entry.ceiling_dirty) entry.profile.batch_ceiling = merged.batch_ceiling;
        if (!entry.budget_dirty) entry.profile.weight_budget = merged.weight_budget;
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

    // "<dir>/.lock", opened per operation and locked exclusively. A descriptor kept open would be
    // shared with forked children, and flock treats a shared descriptor as one owner.
    detail::FileDescriptor lock_directory() {
        const std::string path = directory_ + "/.lock";
        detail::FileDescriptor fd(detail::retry_eintr(
            [&] { return ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644); }));
        if (!fd) return fd;
        if (!detail::flock_within(fd.get(), lock_timeout)) {
            const int error = errno;
            fd.reset();
            errno = error;
        }
        return fd;
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
