// SPDX-License-Identifier: MIT
// The files of one host ledger: the ledger itself (read, trusted or not, salvaged, replaced whole),
// the lock file whose flock orders every change to it, and the single-item lock files beside them.
// Every file is opened anew for each use (a descriptor inherited over fork() would share its
// flock).
#pragma once

#include <vramguard/detail/ledger_format.hpp>
#include <vramguard/detail/ledger_process.hpp>
#include <vramguard/detail/posix.hpp>
#include <vramguard/clock.hpp>
#include <vramguard/ledger_state.hpp>
#include <vramguard/version.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

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

class LedgerFile {
   public:
    LedgerFile(std::string directory, std::string_view device_identity, std::optional<gid_t> group,
               std::chrono::milliseconds lock_timeout)
        : directory_(std::move(directory)),
          device_hash_(ledger_device_hash(device_identity)),
          group_(group),
          lock_timeout_(lock_timeout) {
        while (directory_.size() > 1 && directory_.back() == '/') directory_.pop_back();
        path_ = directory_ + "/" + file_name(device_identity);
        lock_path_ = path_ + ".lock";
    }

    // "vramguard-ledger-<readable part of the identity>-<16 hex digits of its hash>".
    static std::string file_name(std::string_view device_identity) {
        return "vramguard-ledger-" + sanitize_file_part(device_identity) + "-" +
               hex16(ledger_device_hash(device_identity));
    }

    const std::string& directory() const noexcept { return directory_; }
    const std::string& path() const noexcept { return path_; }            // the ledger
    const std::string& lock_path() const noexcept { return lock_path_; }  // "<ledger>.lock"

    // Why a file found on disk is not to be trusted; "" when it is: it must be a regular file of
    // this user (or of HostOptions::group) that not every user may write.
    std::string distrust(const std::string& path, const struct stat& st) const {
        if (!S_ISREG(st.st_mode)) return path + " is not a regular file";
        if (st.st_uid != ::geteuid() && !(group_ && st.st_gid == *group_))
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
        const mode_t mode = group_ ? 0660 : 0600;
        return !(group_ && ::fchown(fd, static_cast<uid_t>(-1), *group_) != 0) &&
               ::fchmod(fd, mode) == 0;
    }

    // Opens (creating) one of the lock files, read-write, close-on-exec, never through a symbolic
    // link, and checks that it may be trusted. On failure: an invalid descriptor and the reason.
    FileDescriptor open_file(const std::string& path, std::string& reason) const {
        reason.clear();
        const mode_t mode = group_ ? 0660 : 0600;
        const int flags = O_RDWR | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK;
        int raw = retry_eintr([&] { return ::open(path.c_str(), flags | O_CREAT | O_EXCL, mode); });
        const bool created = raw >= 0;
        if (raw < 0 && errno == EEXIST)
            raw = retry_eintr([&] { return ::open(path.c_str(), flags); });
        FileDescriptor fd(raw);
        if (!fd) {
            reason = "cannot open " + path + " (" + errno_text(errno) + ")";
            return fd;
        }
        struct stat st {};
        if (::fstat(fd.get(), &st) != 0) {
            reason = "cannot stat " + path + " (" + errno_text(errno) + ")";
            return FileDescriptor();
        }
        if (created && !set_mode(fd.get())) {
            reason =
                "cannot set the owner group or mode of " + path + " (" + errno_text(errno) + ")";
            return FileDescriptor();
        }
        if (!created) reason = distrust(path, st);
        if (!reason.empty()) return FileDescriptor();
        return fd;
    }

    static std::string lock_failure(const std::string& path, int error) {
        if (error == ETIMEDOUT) return "timed out waiting for the lock on " + path;
        return "cannot lock " + path + " (" + errno_text(error) + ")";
    }

    // The flock that orders every read-modify-write of the ledger, on "<ledger>.lock": a file that
    // is never replaced (a lock on the ledger itself would protect nothing once a rename replaced
    // its inode). Held while the descriptor lives; the kernel drops it when its holder dies.
    FileDescriptor lock(std::string& reason) const {
        FileDescriptor fd = open_file(lock_path_, reason);
        if (!fd) return fd;
        const auto deadline = deadline_after(std::chrono::steady_clock::now(), lock_timeout_);
        if (const int error = lock_until(fd.get(), deadline); error != 0) {
            reason = lock_failure(lock_path_, error);
            return FileDescriptor();
        }
        return fd;
    }

    // The ledger's bytes ("" when there is none yet), read under the lock; the reason when it
    // cannot be trusted or read.
    std::optional<std::string> read_text(std::string& text) const {
        text.clear();
        struct stat st {};
        if (::lstat(path_.c_str(), &st) != 0) {
            if (errno == ENOENT) return std::nullopt;
            return "cannot stat " + path_ + " (" + errno_text(errno) + ")";
        }
        if (std::string why = distrust(path_, st); !why.empty()) return why;
        int error = 0;
        if (read_small_file(path_, text, error) == ReadResult::failed)
            return "cannot read " + path_ + " (" + errno_text(error) + ")";
        return std::nullopt;
    }

    // The ledger as the file says, into `state`. No file (or an empty one) is a new ledger; a file
    // written before this boot names no live process; a damaged one is salvaged, never emptied
    // (see salvage_ledger), with a warning. `dirty`: the file must be rewritten. Returns
    // the reason when the file cannot be read or trusted.
    std::optional<std::string> load(LedgerState& state, bool& dirty,
                                    std::vector<std::string>& warnings) const {
        std::string text;
        if (auto failure = read_text(text)) return failure;
        const std::string& boot = current_boot_id();
        std::string why;
        std::optional<LedgerState> parsed;
        if (!text.empty()) parsed = parse_ledger(text, &why);
        if (parsed && parsed->device != device_hash_) {
            why = "it belongs to another device identity";
            parsed.reset();
        }
        dirty = !parsed;
        if (parsed) {
            state = std::move(*parsed);
        } else if (!text.empty()) {
            state = salvage_ledger(text, boot);
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

    // Replaces the ledger whole (replace_file: "<ledger>.tmp", fsync, rename, directory
    // fsync), so a kill at any instant leaves the old file or the new one, never a mix (an
    // in-place rewrite killed between its write and its ftruncate left the new text followed by
    // stray bytes of the old). The temporary file has one name, used under the lock: one a writer
    // killed before its rename left is removed by the next writer, and litter never grows.
    std::optional<std::string> store(const LedgerState& state) const {
        ReplaceOptions how;
        how.mode = group_ ? 0660 : 0600;
        how.group = group_;
        how.exact_mode = true;
        how.fixed_temp = path_ + ".tmp";
        const ReplaceOutcome outcome =
            replace_file(directory_, path_, path_, serialize_ledger(state), how);
        if (outcome.error == 0) return std::nullopt;
        const bool rename = std::string_view(outcome.step) == "rename";
        return std::string("cannot ") + outcome.step + " " + outcome.temp +
               (rename ? " over " + path_ : std::string()) + " (" + errno_text(outcome.error) + ")";
    }

   private:
    std::string directory_;
    const std::uint64_t device_hash_;
    const std::optional<gid_t> group_;
    const std::chrono::milliseconds lock_timeout_;
    std::string path_;
    std::string lock_path_;
};

}  // namespace detail

VRAMGUARD_END_NAMESPACE
