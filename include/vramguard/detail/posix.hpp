// SPDX-License-Identifier: MIT
// POSIX plumbing shared by every file vramguard writes: each call retried on EINTR, each
// descriptor close-on-exec, and replace_file(), the one way a file is replaced (temporary file,
// fsync, rename, directory fsync), so a reader (or a process killed at any instant) sees the old
// file or the new one, never half of either.
#pragma once

#include <vramguard/version.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

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

// Far above any file vramguard writes; stops a stray huge file from being read into memory.
inline constexpr std::size_t max_small_file_bytes = 1 << 20;

// Reads a whole regular file (up to max_bytes + 1 bytes, enough to tell "too large").
inline ReadResult read_small_file(const std::string& path, std::string& out, int& error,
                                  std::size_t max_bytes = max_small_file_bytes) {
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
    while (out.size() <= max_bytes) {
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

// The same where only "read or not" matters (/proc and /sys files, absent on other systems).
inline bool read_small_file(const std::string& path, std::string& out,
                            std::size_t max_bytes = max_small_file_bytes) {
    int error = 0;
    return read_small_file(path, out, error, max_bytes) == ReadResult::ok;
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

// The same with a timeout, reporting through errno (ETIMEDOUT): a holder that hangs (a process
// stopped under a debugger, a hung NFS server) costs the caller at most `timeout`, and its work
// goes on without the file.
inline bool flock_within(int fd, std::chrono::milliseconds timeout) noexcept {
    const int error = lock_until(fd, std::chrono::steady_clock::now() + timeout);
    if (error != 0) errno = error;
    return error == 0;
}

// Numbers temporary files uniquely within this process (the pid separates processes).
inline std::uint64_t next_temp_counter() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    return counter.fetch_add(1, std::memory_order_relaxed);
}

inline std::string errno_text(int error) { return std::strerror(error); }

// Best effort: makes a rename durable on filesystems that need the directory synced too.
inline void sync_directory(const std::string& path) noexcept {
    FileDescriptor fd(
        retry_eintr([&] { return ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }));
    if (fd) retry_eintr([&] { return ::fsync(fd.get()); });
}

// How replace_file() ended: error 0 when the target durably holds the new bytes; else the errno,
// the step that failed ("create", "set the mode of", "write", "fsync", "close", "rename") and the
// temporary file.
struct ReplaceOutcome {
    int error = 0;
    const char* step = "";
    std::string temp;
};

// How replace_file() makes its temporary file.
struct ReplaceOptions {
    mode_t mode = 0644;  // before the umask, unless `exact_mode`
    // Empty: "<temp_stem>.<pid>.<n>.tmp", unique, for writers that share no lock. Else this one
    // name, removed first: for writers that hold a common lock, where a leftover of a killed
    // writer goes with the next write and litter never grows.
    std::string fixed_temp;
    std::optional<gid_t> group;  // the temporary file's group (fchown), when set
    bool exact_mode = false;     // fchmod to `mode`: the umask may have taken the group bits
};

namespace replace {

// Creates the temporary file, exclusively (never through a symbolic link).
inline FileDescriptor create_temp(const std::string& temp, const ReplaceOptions& how) noexcept {
    return FileDescriptor(retry_eintr([&] {
        return ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW,
                      how.mode);
    }));
}

inline bool set_mode(int fd, const ReplaceOptions& how) noexcept {
    if (how.group && ::fchown(fd, static_cast<uid_t>(-1), *how.group) != 0) return false;
    return !how.exact_mode || ::fchmod(fd, how.mode) == 0;
}

// Mode, write, fsync, close, rename: the first step that fails, with its errno.
inline void fill_and_rename(FileDescriptor& fd, const std::string& target, std::string_view bytes,
                            const ReplaceOptions& how, ReplaceOutcome& outcome) {
    if (!set_mode(fd.get(), how)) {
        outcome.error = errno, outcome.step = "set the mode of";
    } else if (!write_all(fd.get(), bytes)) {
        outcome.error = errno, outcome.step = "write";
    } else if (retry_eintr([&] { return ::fsync(fd.get()); }) != 0) {
        outcome.error = errno, outcome.step = "fsync";
    } else if ((outcome.error = fd.reset()) != 0) {
        outcome.step = "close";
    } else if (::rename(outcome.temp.c_str(), target.c_str()) != 0) {
        outcome.error = errno, outcome.step = "rename";
    }
}

}  // namespace replace

// Replaces `target` (in `directory`) with `bytes`: a temporary file in the same directory (rename
// is atomic only within one filesystem), fsync, rename over the target, fsync of the directory. A
// failed attempt removes its temporary file. Another process may remove a unique temporary file
// if it misjudges our pid as dead (pid namespaces): one more attempt covers that, and EEXIST covers
// a recycled pid's leftovers.
inline ReplaceOutcome replace_file(const std::string& directory, const std::string& temp_stem,
                                   const std::string& target, std::string_view bytes,
                                   const ReplaceOptions& how = {}) {
    ReplaceOutcome outcome;
    const bool fixed = !how.fixed_temp.empty();
    for (int attempt = 0; attempt < 4; ++attempt) {
        outcome.temp = fixed ? how.fixed_temp
                             : temp_stem + "." + std::to_string(::getpid()) + "." +
                                   std::to_string(next_temp_counter()) + ".tmp";
        if (fixed && ::unlink(outcome.temp.c_str()) != 0 && errno != ENOENT) {
            outcome.error = errno, outcome.step = "remove";
            return outcome;
        }
        FileDescriptor fd = replace::create_temp(outcome.temp, how);
        outcome.step = "create";
        outcome.error = fd ? 0 : errno;
        if (outcome.error == EEXIST && !fixed) continue;
        if (outcome.error != 0) return outcome;
        replace::fill_and_rename(fd, target, bytes, how, outcome);
        if (outcome.error == 0) {
            sync_directory(directory);
            return outcome;
        }
        fd.reset();
        ::unlink(outcome.temp.c_str());
        if (fixed || outcome.error != ENOENT || std::string_view(outcome.step) != "rename")
            return outcome;
    }
    return outcome;
}

}  // namespace detail
VRAMGUARD_END_NAMESPACE
