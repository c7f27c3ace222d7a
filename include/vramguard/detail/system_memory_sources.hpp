// SPDX-License-Identifier: MIT
// Reading the host's memory limits (system_memory.hpp): /proc/meminfo fields, the cgroup (v1 or
// v2) this process is in and where it is mounted, and the rlimits.
#pragma once

#include <vramguard/detail/posix.hpp>
#include <vramguard/version.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>
#include <malloc.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {
namespace host {

// A host with thousands of mounts has a large mountinfo; no sane /proc file is larger than this.
inline constexpr std::size_t max_proc_file_bytes = std::size_t{8} << 20;

inline std::optional<std::uint64_t> parse_u64(std::string_view text) {
    std::size_t i = 0;
    while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
    if (i == text.size() || text[i] < '0' || text[i] > '9') return std::nullopt;
    std::uint64_t value = 0;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
        const std::uint64_t digit = static_cast<std::uint64_t>(text[i] - '0');
        if (value > (UINT64_MAX - digit) / 10) return UINT64_MAX;
        value = value * 10 + digit;
    }
    return value;
}

// The number after "<key>" at the start of a line ("MemTotal:", "inactive_file ").
inline std::optional<std::uint64_t> field(std::string_view text, std::string_view key) {
    std::size_t at = 0;
    while ((at = text.find(key, at)) != std::string_view::npos) {
        if (at == 0 || text[at - 1] == '\n') return parse_u64(text.substr(at + key.size()));
        at += key.size();
    }
    return std::nullopt;
}

inline std::vector<std::string_view> split(std::string_view text, char separator) {
    std::vector<std::string_view> parts;
    std::size_t start = 0;
    for (;;) {
        const std::size_t end = text.find(separator, start);
        parts.push_back(text.substr(start, end == std::string_view::npos ? end : end - start));
        if (end == std::string_view::npos) return parts;
        start = end + 1;
    }
}

// mountinfo escapes blanks and backslashes in paths as \ooo (octal).
inline std::string unescape_mount_path(std::string_view text) {
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        auto octal = [&](std::size_t at) { return text[at] >= '0' && text[at] <= '7'; };
        if (text[i] == '\\' && i + 3 < text.size() && octal(i + 1) && octal(i + 2) &&
            octal(i + 3)) {
            out += static_cast<char>((text[i + 1] - '0') * 64 + (text[i + 2] - '0') * 8 +
                                     (text[i + 3] - '0'));
            i += 3;
        } else {
            out += text[i];
        }
    }
    return out;
}

// The cgroup directories whose memory limits apply to this process, innermost first, and the
// cgroup version of their files. Limits are hierarchical: a parent's limit binds its children
// even when theirs is unset, so every level up to the mount point is read.
struct CgroupPath {
    int version = 0;  // 0: none found, 1: the v1 memory controller, 2: the unified hierarchy
    std::vector<std::string> directories;
};

// Where a hierarchy is mounted: the subtree of it shown ("root") and the mount point.
struct CgroupMount {
    std::string root, point;
};

// The memory cgroup's path in each hierarchy, from /proc/self/cgroup: "0::/path" (v2) and
// "N:controller,...:/path" (v1).
struct CgroupMembership {
    std::optional<std::string> v1, v2;
};

inline CgroupMembership parse_cgroup_membership(std::string_view membership) {
    CgroupMembership paths;
    for (std::string_view line : split(membership, '\n')) {
        const std::size_t first = line.find(':');
        const std::size_t second =
            first == std::string_view::npos ? first : line.find(':', first + 1);
        if (second == std::string_view::npos) continue;
        const std::string_view controllers = line.substr(first + 1, second - first - 1);
        const std::string path(line.substr(second + 1));
        if (line.substr(0, first) == "0" && controllers.empty()) paths.v2 = path;
        for (std::string_view controller : split(controllers, ','))
            if (controller == "memory") paths.v1 = path;
    }
    return paths;
}

// The first v1 hierarchy with the memory controller and the first unified one, from mountinfo:
// "id parent maj:min root mount_point options [tags...] - fstype source super".
struct CgroupMounts {
    std::optional<CgroupMount> v1, v2;
};

inline CgroupMounts parse_cgroup_mounts(std::string_view mountinfo) {
    CgroupMounts mounts;
    for (std::string_view line : split(mountinfo, '\n')) {
        const std::size_t dash = line.find(" - ");
        if (dash == std::string_view::npos) continue;
        const std::vector<std::string_view> left = split(line.substr(0, dash), ' ');
        const std::vector<std::string_view> right = split(line.substr(dash + 3), ' ');
        if (left.size() < 5 || right.size() < 3) continue;
        CgroupMount mount{unescape_mount_path(left[3]), unescape_mount_path(left[4])};
        if (right[0] == "cgroup2" && !mounts.v2) mounts.v2 = std::move(mount);
        if (right[0] == "cgroup" && !mounts.v1) {
            for (std::string_view option : split(right[2], ','))
                if (option == "memory") mounts.v1 = std::move(mount);
        }
    }
    return mounts;
}

// The directories from the process's cgroup (`path`, relative to the hierarchy's root) up to the
// mount point. The mount may show only a subtree of the hierarchy (a container's own cgroup
// mounted at /sys/fs/cgroup); a path outside the mounted subtree (a cgroup namespace shows "/..")
// leaves the mount point itself.
inline std::vector<std::string> cgroup_directories(const std::string& root,
                                                   const CgroupMount& mount,
                                                   const std::string& path) {
    std::string relative;
    if (mount.root == "/") {
        relative = path;
    } else if (path.compare(0, mount.root.size(), mount.root) == 0 &&
               (path.size() == mount.root.size() || path[mount.root.size()] == '/')) {
        relative = path.substr(mount.root.size());
    }
    if (relative.find("/..") != std::string::npos) relative.clear();
    while (!relative.empty() && relative.back() == '/') relative.pop_back();
    std::string base = root + mount.point;
    while (!base.empty() && base.back() == '/') base.pop_back();
    std::vector<std::string> directories;
    for (;;) {
        directories.push_back(base + relative);
        if (relative.empty()) return directories;
        relative.erase(relative.rfind('/'));
    }
}

inline CgroupPath find_memory_cgroup(const std::string& root) {
    std::string mountinfo, membership;
    if (!read_small_file(root + "/proc/self/mountinfo", mountinfo, max_proc_file_bytes) ||
        !read_small_file(root + "/proc/self/cgroup", membership, max_proc_file_bytes))
        return {};
    const CgroupMembership paths = parse_cgroup_membership(membership);
    const CgroupMounts mounts = parse_cgroup_mounts(mountinfo);
    // The memory controller lives in v1 when a v1 hierarchy has it (the "hybrid" layout also
    // mounts an empty unified hierarchy); otherwise in the unified one.
    CgroupPath result;
    if (mounts.v1 && paths.v1) {
        result.version = 1;
        result.directories = cgroup_directories(root, *mounts.v1, *paths.v1);
    } else if (mounts.v2 && paths.v2) {
        result.version = 2;
        result.directories = cgroup_directories(root, *mounts.v2, *paths.v2);
    }
    return result;
}

// A v1 limit this large means "no limit" (LONG_MAX rounded down to a page).
inline constexpr std::uint64_t cgroup_v1_unlimited = std::uint64_t{1} << 62;

inline std::uint64_t page_size() {
    const long size = ::sysconf(_SC_PAGESIZE);
    return size > 0 ? static_cast<std::uint64_t>(size) : 4096;
}

inline std::optional<std::uint64_t> soft_limit(int resource) {
    struct rlimit limit {};
    if (::getrlimit(resource, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return std::nullopt;
    return static_cast<std::uint64_t>(limit.rlim_cur);
}

}  // namespace host
}  // namespace detail

VRAMGUARD_END_NAMESPACE
