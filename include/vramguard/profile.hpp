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
//    memory-only with one warning, and a damaged file is ignored with one warning and rewritten.
#pragma once

#include <vramguard/detail/text_record.hpp>
#include <vramguard/key.hpp>
#include <vramguard/log.hpp>
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
// as ours) ages out after this many newer ones instead of winning for ever.
inline constexpr std::size_t profile_window = 32;

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
inline constexpr std::size_t max_profile_file_bytes = 1 << 20;

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

// ---- POSIX plumbing: every call retried on EINTR, every descriptor close-on-exec ----

template <class Call>
auto retry_eintr(Call&& call) {
    for (;;) {
        const auto result = call();
        if (result != -1 || errno != EINTR) return result;
    }
}

class FileDescriptor {
   public:
    explicit FileDescriptor(int fd = -1) noexcept : fd_(fd) {}
    FileDescriptor(FileDescriptor&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    ~FileDescriptor() { reset(); }
    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    // Closes now; returns close()'s errno, 0 on success. (close is never retried: on Linux the
    // descriptor is gone even when it reports EINTR.)
    int reset() noexcept {
        int error = 0;
        if (fd_ >= 0 && ::close(fd_) != 0) error = errno;
        fd_ = -1;
        return error;
    }

   private:
    int fd_;
};

inline bool write_all(int fd, std::string_view bytes) noexcept {
    while (!bytes.empty()) {
        const ssize_t written =
            retry_eintr([&] { return ::write(fd, bytes.data(), bytes.size()); });
        if (written <= 0) {
            if (written == 0) errno = EIO;
            return false;
        }
        bytes.remove_prefix(static_cast<std::size_t>(written));
    }
    return true;
}

enum class ReadResult { ok, missing, failed };

// Reads a whole regular file (up to max_profile_file_bytes + 1 bytes, enough to tell "too large").
inline ReadResult read_small_file(const std::string& path, std::string& out, int& error) {
    out.clear();
    // O_NONBLOCK: a FIFO planted where a profile belongs must not hang the caller.
    FileDescriptor fd(retry_eintr(
        [&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK); }));
    if (!fd) {
        error = errno;
        return (error == ENOENT || error == ENOTDIR) ? ReadResult::missing : ReadResult::failed;
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
        error = errno;
        return ReadResult::failed;
    }
    if (!S_ISREG(st.st_mode)) {
        error = EINVAL;
        return ReadResult::failed;
    }
    char buffer[4096];
    while (out.size() <= max_profile_file_bytes) {
        const ssize_t got = retry_eintr([&] { return ::read(fd.get(), buffer, sizeof buffer); });
        if (got < 0) {
            error = errno;
            return ReadResult::failed;
        }
        if (got == 0) break;
        out.append(buffer, static_cast<std::size_t>(got));
    }
    return ReadResult::ok;
}

// mkdir -p with mode 0755 (before the umask). Returns 0 or the errno that stopped it.
inline int make_directories(const std::string& path) {
    if (path.empty()) return ENOENT;
    std::size_t end = 0;
    while (end != std::string::npos) {
        end = path.find('/', end + 1);
        const std::string prefix = path.substr(0, end);
        if (prefix.empty() || prefix == "/") continue;
        if (::mkdir(prefix.c_str(), 0755) != 0) {
            const int error = errno;
            struct stat st {};
            // An existing directory is fine even where mkdir reports EACCES or EROFS first.
            if (::stat(prefix.c_str(), &st) != 0) return error == EEXIST ? errno : error;
            if (!S_ISDIR(st.st_mode)) return ENOTDIR;
        }
    }
    return 0;
}

// Best effort: makes a rename durable on filesystems that need the directory synced too.
inline void sync_directory(const std::string& path) noexcept {
    FileDescriptor fd(
        retry_eintr([&] { return ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }));
    if (fd) retry_eintr([&] { return ::fsync(fd.get()); });
}

// The pid inside a temporary file name ".<hex>.<pid>.<counter>.tmp"; 0 when the name is not one.
inline pid_t temp_file_pid(std::string_view name) noexcept {
    constexpr std::string_view suffix = ".tmp";
    if (name.size() < 1 + suffix.size() || name[0] != '.' ||
        name.substr(name.size() - suffix.size()) != suffix)
        return 0;
    name = name.substr(1, name.size() - 1 - suffix.size());  // "<hex>.<pid>.<counter>"
    const std::size_t counter_dot = name.rfind('.');
    if (counter_dot == std::string_view::npos || counter_dot == 0) return 0;
    std::uint64_t counter = 0, pid = 0;
    if (!parse_decimal_u64(name.substr(counter_dot + 1), counter)) return 0;
    name = name.substr(0, counter_dot);  // "<hex>.<pid>"
    const std::size_t pid_dot = name.rfind('.');
    if (pid_dot == std::string_view::npos) return 0;
    if (!parse_decimal_u64(name.substr(pid_dot + 1), pid) || pid == 0 ||
        pid > static_cast<std::uint64_t>(INT_MAX))
        return 0;
    return static_cast<pid_t>(pid);
}

// flock(LOCK_EX) that gives up after `timeout` (errno ETIMEDOUT) instead of waiting for ever on a
// holder that hangs (a process stopped under a debugger, a hung NFS server): polled, because flock
// has no timed form. The caller's work goes on without the file.
inline bool flock_within(int fd, std::chrono::milliseconds timeout) noexcept {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::chrono::microseconds pause{100};
    for (;;) {
        if (retry_eintr([&] { return ::flock(fd, LOCK_EX | LOCK_NB); }) == 0) return true;
        if (errno != EWOULDBLOCK) return false;
        if (std::chrono::steady_clock::now() >= deadline) {
            errno = ETIMEDOUT;
            return false;
        }
        timespec nap{0, static_cast<long>(pause.count()) * 1000};
        ::nanosleep(&nap, nullptr);
        // Short pauses: a poller sleeping long loses the lock to ones that keep trying.
        pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(2));
    }
}

// Numbers temporary files uniquely within this process (the pid separates processes).
inline std::uint64_t next_temp_counter() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    return counter.fetch_add(1, std::memory_order_relaxed);
}

inline std::string errno_text(int error) { return std::strerror(error); }

// A wall-clock stamp in ns, strictly increasing within the process (two samples recorded in one
// tick stay two samples when merged).
inline std::uint64_t next_sample_stamp() noexcept {
    static std::atomic<std::uint64_t> last{0};
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME, &now);
    std::uint64_t stamp = static_cast<std::uint64_t>(now.tv_sec) * 1000000000u +
                          static_cast<std::uint64_t>(now.tv_nsec);
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

}  // namespace detail

// Profiles per key, in memory and (unless disabled or degraded) on disk. Thread-safe; one per
// guard, and any number per process or per directory.
class ProfileCache {
   public:
    // A temporary file older than this belongs to no live write, whatever its pid says.
    static constexpr std::time_t stale_temp_file_seconds = 3600;
    // The longest wait for another process's write to the directory; then this one is skipped.
    static constexpr std::chrono::milliseconds lock_timeout{5000};

    // `directory` "" means default_directory(). `persist` false keeps everything in memory and
    // never touches the disk.
    explicit ProfileCache(std::string directory = "", bool persist = true,
                          LogSink log = stderr_sink())
        : persist_(persist), log_(std::move(log)) {
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
        if (const int error = detail::make_directories(directory_); error != 0) {
            std::vector<std::string> warnings;
            degrade("cannot create it (" + detail::errno_text(error) + ")", warnings);
            flush(warnings);
            return;
        }
        directory_usable_ = true;
        remove_stale_temp_files();
    }
    ProfileCache(const ProfileCache&) = delete;
    ProfileCache& operator=(const ProfileCache&) = delete;

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
        flush(warnings);
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
    // records). Records this process has not yet written are lost with it.
    void reload(const Key& key) {
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

   private:
    struct Entry {
        Profile profile;
        bool known = false;          // a profile exists (read from disk or recorded)
        bool ceiling_dirty = false;  // recorded since the last write: ours beats the file's
        bool budget_dirty = false;
    };

    // Applies `change` and, when it changed anything, writes the result through. Unchanged records
    // cost one lock and one lookup: they are on every guarded call's path.
    template <class Change>
    void update(const Key& key, Change&& change) {
        std::vector<std::string> warnings;
        bool changed = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            Entry& entry = entry_for(key, warnings);
            const Profile before = entry.profile;
            change(entry);
            if (entry.profile != before) {
                entry.known = true;
                changed = true;
            }
        }
        if (changed) write_through(key, warnings);
        flush(warnings);
    }

    // The entry for `key`, read from disk on the first miss. Caller holds mutex_.
    Entry& entry_for(const Key& key, std::vector<std::string>& warnings) {
        auto found = entries_.find(key);
        if (found != entries_.end()) return found->second;
        Entry entry;
        if (auto profile = read_profile(key, warnings)) {
            entry.profile = *profile;
            entry.known = true;
        }
        return entries_.emplace(key, entry).first->second;
    }

    // The key's file, or nothing (missing, unreadable or damaged; the last two warn once per key).
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
    // ceiling or budget recorded here since the last write replaces the file's.
    void write_through(const Key& key, std::vector<std::string>& warnings) {
        if (!directory_usable_ || degraded_.load(std::memory_order_relaxed)) return;
        std::lock_guard<std::mutex> io_lock(io_mutex_);
        if (degraded_.load(std::memory_order_relaxed)) return;
        detail::FileDescriptor lock_file = lock_directory();
        if (!lock_file && errno == ETIMEDOUT) {  // kept in memory; the next record writes it
            warnings.push_back("profile directory " + directory_ + " stayed locked for " +
                               std::to_string(lock_timeout.count()) + " ms; " + key.describe() +
                               " is written with its next record");
            return;
        }
        if (!lock_file) {
            degrade("cannot lock " + directory_ + "/.lock (" + detail::errno_text(errno) + ")",
                    warnings);
            return;
        }
        const std::optional<Profile> on_disk = read_profile(key, warnings);
        Profile merged;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto found = entries_.find(key);
            if (found == entries_.end() || !found->second.known) return;  // forgotten meanwhile
            Entry& entry = found->second;
            merged = entry.profile;
            if (on_disk) {
                merged.peak_bytes = std::max(merged.peak_bytes, on_disk->peak_bytes);
                merged.peak_bytes_per_item =
                    std::max(merged.peak_bytes_per_item, on_disk->peak_bytes_per_item);
                detail::merge_profile_samples(merged, *on_disk);
                if (!entry.ceiling_dirty) merged.batch_ceiling = on_disk->batch_ceiling;
                if (!entry.budget_dirty) merged.weight_budget = on_disk->weight_budget;
            }
            entry.ceiling_dirty = entry.budget_dirty = false;
        }
        if (on_disk && *on_disk == merged) {
            adopt(key, merged);  // the file already says it (another process was first)
            return;
        }
        if (write_file(key, merged, warnings)) adopt(key, merged);
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

    // Temporary file in the same directory (rename is atomic only within one filesystem), fsync,
    // rename over the target, fsync the directory. Caller holds io_mutex_ and the directory lock.
    bool write_file(const Key& key, const Profile& profile, std::vector<std::string>& warnings) {
        const std::string text = detail::serialize_profile(key, profile);
        const std::string target = path_for(key);
        // Another process may remove our temporary file if it misjudges our pid as dead (pid
        // namespaces); one more attempt covers that, and EEXIST covers a recycled pid's leftovers.
        for (int attempt = 0; attempt < 4; ++attempt) {
            const std::string temp = directory_ + "/." + key.hex() + "." +
                                     std::to_string(::getpid()) + "." +
                                     std::to_string(detail::next_temp_counter()) + ".tmp";
            detail::FileDescriptor fd(detail::retry_eintr([&] {
                return ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY,
                              0644);
            }));
            if (!fd) {
                if (errno == EEXIST) continue;
                degrade("cannot create " + temp + " (" + detail::errno_text(errno) + ")", warnings);
                return false;
            }
            int error = 0;
            const char* step = "write";
            if (!detail::write_all(fd.get(), text)) {
                error = errno;
            } else if (detail::retry_eintr([&] { return ::fsync(fd.get()); }) != 0) {
                error = errno;
                step = "fsync";
            } else if ((error = fd.reset()) != 0) {
                step = "close";
            } else if (::rename(temp.c_str(), target.c_str()) != 0) {
                error = errno;
                step = "rename";
                if (error == ENOENT) continue;
            }
            if (error != 0) {
                fd.reset();
                ::unlink(temp.c_str());
                degrade(std::string("cannot ") + step + " " + temp + " (" +
                            detail::errno_text(error) + ")",
                        warnings);
                return false;
            }
            detail::sync_directory(directory_);
            return true;
        }
        degrade("cannot create a temporary file for " + target, warnings);
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

    // Writers killed between creating and renaming their temporary file leave it behind; without
    // this, a crash-looping worker would fill the directory.
    void remove_stale_temp_files() {
        DIR* dir = ::opendir(directory_.c_str());
        if (dir == nullptr) return;
        const std::time_t now = std::time(nullptr);
        while (const dirent* item = ::readdir(dir)) {
            const pid_t pid = detail::temp_file_pid(item->d_name);
            if (pid == 0) continue;
            bool stale = ::kill(pid, 0) != 0 && errno == ESRCH;
            struct stat st {};
            if (!stale && ::fstatat(::dirfd(dir), item->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0)
                stale = now - st.st_mtime > stale_temp_file_seconds;
            if (stale) ::unlinkat(::dirfd(dir), item->d_name, 0);
        }
        ::closedir(dir);
    }

    // Memory-only from now on, said once.
    void degrade(const std::string& reason, std::vector<std::string>& warnings) {
        if (degraded_.exchange(true)) return;
        warnings.push_back("profile directory " + directory_ + " is not usable: " + reason +
                           "; learned profiles are kept in memory only");
    }

    // Log outside every lock: a sink may call back into this cache.
    void flush(const std::vector<std::string>& warnings) const {
        for (const std::string& warning : warnings) detail::emit(log_, Level::warn, warning);
    }

    const bool persist_;
    std::string directory_;
    bool directory_usable_ = false;  // set once in the constructor
    LogSink log_;
    std::atomic<bool> degraded_{false};

    std::mutex mutex_;     // entries_
    std::mutex io_mutex_;  // one read-merge-write at a time here; the flock orders other caches
    std::unordered_map<Key, Entry> entries_;
    std::mutex warned_mutex_;
    std::unordered_set<std::uint64_t> warned_files_;
};

VRAMGUARD_END_NAMESPACE
