// SPDX-License-Identifier: MIT
// Housekeeping of a profile directory, done when a cache opens it: temporary files left by
// writers that were killed, and profiles no process has written or read for a long time (a model
// long retired, a key whose parameters changed): without both, the directory only grows.
#pragma once

#include <vramguard/detail/posix.hpp>
#include <vramguard/detail/text_record.hpp>
#include <vramguard/version.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <string>
#include <string_view>

VRAMGUARD_BEGIN_NAMESPACE
namespace detail {

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

// Writers killed between creating and renaming their temporary file leave it behind; without
// this, a crash-looping worker would fill the directory. A temporary file is stale when its pid is
// gone, or (pid namespaces, recycled pids) when it is older than `stale_seconds`.
inline void remove_stale_temp_files(const std::string& directory, std::time_t stale_seconds) {
    DIR* dir = ::opendir(directory.c_str());
    if (dir == nullptr) return;
    const std::time_t now = std::time(nullptr);
    while (const dirent* item = ::readdir(dir)) {
        const pid_t pid = temp_file_pid(item->d_name);
        if (pid == 0) continue;
        bool stale = ::kill(pid, 0) != 0 && errno == ESRCH;
        struct stat st {};
        if (!stale && ::fstatat(::dirfd(dir), item->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0)
            stale = now - st.st_mtime > stale_seconds;
        if (stale) ::unlinkat(::dirfd(dir), item->d_name, 0);
    }
    ::closedir(dir);
}

// Whether `name` is a profile file's name, "<16 hex digits>.profile": nothing else is ever
// removed as an old profile.
inline bool is_profile_file_name(std::string_view name) noexcept {
    constexpr std::string_view suffix = ".profile";
    return name.size() == 16 + suffix.size() && name.substr(16) == suffix &&
           is_hex16(name.substr(0, 16));
}

// Removes the profile files (regular files only) last modified more than `max_age` before `now`.
// A cache refreshes a file's time when it reads it (touch_file), so "modified" means "written or
// read by some process". Caller holds the directory lock, so no write lands between the age check
// and the unlink. Returns how many went.
inline std::size_t remove_old_profiles(const std::string& directory, std::chrono::seconds max_age,
                                       std::time_t now) {
    if (max_age.count() <= 0) return 0;
    DIR* dir = ::opendir(directory.c_str());
    if (dir == nullptr) return 0;
    std::size_t removed = 0;
    while (const dirent* item = ::readdir(dir)) {
        if (!is_profile_file_name(item->d_name)) continue;
        struct stat st {};
        if (::fstatat(::dirfd(dir), item->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
            !S_ISREG(st.st_mode) || now - st.st_mtime <= max_age.count())
            continue;
        if (::unlinkat(::dirfd(dir), item->d_name, 0) == 0) ++removed;
    }
    ::closedir(dir);
    if (removed > 0) sync_directory(directory);
    return removed;
}

// Marks a file as used now (its modification time), best effort: a read-only file stays as is.
inline void touch_file(const std::string& path) noexcept {
    ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0);
}

// "<dir>/.lock", opened per operation and locked exclusively (at most `timeout`; errno says why
// not). A descriptor kept open would be shared with forked children, and flock treats a shared
// descriptor as one owner.
inline FileDescriptor lock_profile_directory(const std::string& directory,
                                             std::chrono::milliseconds timeout) {
    const std::string path = directory + "/.lock";
    FileDescriptor fd(retry_eintr(
        [&] { return ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644); }));
    if (!fd) return fd;
    if (!flock_within(fd.get(), timeout)) {
        const int error = errno;
        fd.reset();
        errno = error;
    }
    return fd;
}

}  // namespace detail
VRAMGUARD_END_NAMESPACE
