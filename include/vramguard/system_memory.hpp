// SPDX-License-Identifier: MIT
// The host's memory as this process may still use it: the probe for CPU inference, and what makes
// real out-of-memory errors testable on a machine without a GPU (under setrlimit(RLIMIT_AS) in a
// child process).
//
// "Free" is the smallest of three views, because each one alone is a common mistake:
//   - MemAvailable (/proc/meminfo): what the kernel could hand out, page cache included (MemFree
//     alone ignores the cache the kernel drops on demand and makes a busy machine look full);
//   - the cgroup's limit minus its working set (a container sees the host's MemAvailable, and is
//     OOM-killed long before that is used up);
//   - RLIMIT_AS / RLIMIT_DATA minus this process's current virtual / data size (a limited process
//     gets ENOMEM from malloc while the machine is idle).
// "Total" is the matching bound: the smallest of MemTotal, the cgroup limit and those rlimits.
//
// Linux reads /proc and /sys; other POSIX systems fall back to sysconf and the rlimits alone.
#pragma once

#include <vramguard/detail/posix.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

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

// Where SystemMemoryProbe reads from. The defaults are the real system; tests point `root` at a
// fake tree (root + "/proc/meminfo", root + "/sys/fs/cgroup/...") to cover cgroup layouts this
// machine does not have.
struct SystemMemorySources {
    std::string root;            // prefix of every /proc and /sys path; "" = the real ones
    bool process_limits = true;  // apply this process's RLIMIT_AS and RLIMIT_DATA (getrlimit)
};

// One reading with its parts, for logs and tests. A bound that is not set is empty.
struct SystemMemoryReading {
    MemoryInfo memory;                // what memory() returns
    std::uint64_t mem_total = 0;      // MemTotal (or physical pages x page size)
    std::uint64_t mem_available = 0;  // MemAvailable (or an estimate where the kernel lacks it)
    std::optional<std::uint64_t> cgroup_limit;  // the tightest memory limit on this cgroup's path
    std::optional<std::uint64_t> cgroup_free;   // that limit minus the working set, tightest level
    std::optional<std::uint64_t> address_space_limit;  // RLIMIT_AS soft limit
    std::optional<std::uint64_t> data_limit;           // RLIMIT_DATA soft limit
    // This process's VmSize (what RLIMIT_AS counts) and data + stack size (what RLIMIT_DATA
    // counts); read only when one of those limits is set, 0 otherwise.
    std::uint64_t virtual_bytes = 0;
    std::uint64_t data_bytes = 0;
    // Which view set free_bytes: "MemAvailable", "cgroup", "RLIMIT_AS" or "RLIMIT_DATA".
    const char* bound = "MemAvailable";
};

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

// Tightens `reading` with one bound: `limit` caps the total, `free` the free bytes.
inline void apply_bound(SystemMemoryReading& reading, std::uint64_t limit, std::uint64_t free,
                        const char* name) {
    reading.memory.total_bytes = std::min(reading.memory.total_bytes, limit);
    if (free < reading.memory.free_bytes) {
        reading.memory.free_bytes = free;
        reading.bound = name;
    }
}

}  // namespace host
}  // namespace detail

// The host's memory as this process may still use it (see the top of this file). Stateless after
// construction, so one probe serves every thread. A reading costs a few small procfs/cgroupfs
// reads (microseconds): fine for CPU batches, which take milliseconds.
class SystemMemoryProbe {
   public:
    // Finds this process's memory cgroup once (a process rarely moves between cgroups, and the
    // mount table can be long on a container host).
    explicit SystemMemoryProbe(SystemMemorySources sources = {})
        : sources_(std::move(sources)), cgroup_(detail::host::find_memory_cgroup(sources_.root)) {}

    MemoryInfo memory() const { return read().memory; }

    // Every view and which one bound the result.
    SystemMemoryReading read() const {
        namespace host = detail::host;
        SystemMemoryReading reading;
        std::string text;
        if (detail::read_small_file(sources_.root + "/proc/meminfo", text)) {
            reading.mem_total = host::field(text, "MemTotal:").value_or(0) * 1024;
            if (auto available = host::field(text, "MemAvailable:")) {
                reading.mem_available = *available * 1024;
            } else {  // kernels before 3.14: free memory plus what the kernel can drop
                reading.mem_available = (host::field(text, "MemFree:").value_or(0) +
                                         host::field(text, "Buffers:").value_or(0) +
                                         host::field(text, "Cached:").value_or(0)) *
                                        1024;
            }
        } else {
            read_sysconf(reading);
        }
        reading.memory =
            MemoryInfo{std::min(reading.mem_available, reading.mem_total), reading.mem_total};
        read_cgroup(reading, text);
        if (sources_.process_limits) read_process_limits(reading, text);
        reading.memory.free_bytes = std::min(reading.memory.free_bytes, reading.memory.total_bytes);
        return reading;
    }

    // Gives the C library's cached free memory back to the kernel. glibc keeps freed blocks in its
    // heaps, and after a large free it raises its mmap threshold (up to 32 MiB), so the next
    // blocks of that size come from a heap and stay there once freed: the host's counterpart of
    // the CUDA caching allocator's cache. malloc_trim(0) returns those pages, so MemAvailable and
    // the cgroup's usage show them again. LibTorch's CPU allocator has no cache of its own (it
    // calls free()), so this is all there is to release. A no-op outside glibc.
    void release_cached() noexcept {
#if defined(__GLIBC__)
        ::malloc_trim(0);
#endif
    }

    // Every host probe shares one single-item semaphore: there is one host.
    std::string device_key() const { return "host"; }

    const SystemMemorySources& sources() const noexcept { return sources_; }
    // The cgroup version in use (1 or 2) or 0 when no memory cgroup was found.
    int cgroup_version() const noexcept { return cgroup_.version; }

   private:
    static void read_sysconf(SystemMemoryReading& reading) {
        const std::uint64_t page = detail::host::page_size();
        const long pages = ::sysconf(_SC_PHYS_PAGES);
        reading.mem_total = pages > 0 ? static_cast<std::uint64_t>(pages) * page : 0;
#if defined(_SC_AVPHYS_PAGES)
        const long available = ::sysconf(_SC_AVPHYS_PAGES);
        reading.mem_available = available > 0 ? static_cast<std::uint64_t>(available) * page : 0;
#else
        // No portable "available" figure (macOS): only the limits below narrow it.
        reading.mem_available = reading.mem_total;
#endif
    }

    // Every level's limit minus its working set; the tightest level wins. The working set leaves
    // out inactive file pages (the kernel reclaims them before it OOM-kills), as the kubelet and
    // `docker stats` count it: a process that has just read a 5 GiB model file must not look full.
    void read_cgroup(SystemMemoryReading& reading, std::string& text) const {
        namespace host = detail::host;
        if (cgroup_.version == 0) return;
        const bool v2 = cgroup_.version == 2;
        for (const std::string& directory : cgroup_.directories) {
            if (!detail::read_small_file(
                    directory + (v2 ? "/memory.max" : "/memory.limit_in_bytes"), text))
                continue;
            const std::optional<std::uint64_t> limit = host::parse_u64(text);
            if (!limit || (!v2 && *limit >= host::cgroup_v1_unlimited)) continue;  // "max": none
            std::uint64_t usage = 0;
            if (detail::read_small_file(
                    directory + (v2 ? "/memory.current" : "/memory.usage_in_bytes"), text))
                usage = host::parse_u64(text).value_or(0);
            if (detail::read_small_file(directory + "/memory.stat", text)) {
                std::optional<std::uint64_t> inactive;
                if (!v2) inactive = host::field(text, "total_inactive_file ");
                if (!inactive) inactive = host::field(text, "inactive_file ");
                usage = detail::saturating_sub(usage, inactive.value_or(0));
            }
            const std::uint64_t free = detail::saturating_sub(*limit, usage);
            reading.cgroup_limit = std::min(reading.cgroup_limit.value_or(UINT64_MAX), *limit);
            reading.cgroup_free = std::min(reading.cgroup_free.value_or(UINT64_MAX), free);
            host::apply_bound(reading, *limit, free, "cgroup");
        }
    }

    // RLIMIT_AS counts the whole virtual size (VmSize), RLIMIT_DATA (since Linux 4.7) the private
    // writable mappings; malloc fails with ENOMEM at either, whatever the machine has free.
    void read_process_limits(SystemMemoryReading& reading, std::string& text) const {
        namespace host = detail::host;
        reading.address_space_limit = host::soft_limit(RLIMIT_AS);
#if defined(RLIMIT_DATA)
        reading.data_limit = host::soft_limit(RLIMIT_DATA);
#endif
        if (!reading.address_space_limit && !reading.data_limit) return;
        // statm: "size resident shared text lib data dt", in pages.
        if (detail::read_small_file(sources_.root + "/proc/self/statm", text)) {
            const std::vector<std::string_view> fields = host::split(text, ' ');
            const std::uint64_t page = host::page_size();
            if (fields.size() >= 6) {
                reading.virtual_bytes = host::parse_u64(fields[0]).value_or(0) * page;
                reading.data_bytes = host::parse_u64(fields[5]).value_or(0) * page;
            }
        }
        if (reading.address_space_limit)
            host::apply_bound(
                reading, *reading.address_space_limit,
                detail::saturating_sub(*reading.address_space_limit, reading.virtual_bytes),
                "RLIMIT_AS");
        if (reading.data_limit)
            host::apply_bound(reading, *reading.data_limit,
                              detail::saturating_sub(*reading.data_limit, reading.data_bytes),
                              "RLIMIT_DATA");
    }

    SystemMemorySources sources_;
    detail::host::CgroupPath cgroup_;
};

// Resident bytes of this process (/proc/self/statm), 0 where unreadable: what a CPU-inference
// server's own work took, for demos that take a share of the host as their "device".
inline std::uint64_t process_resident_bytes() {
    std::string text;
    if (!detail::read_small_file("/proc/self/statm", text)) return 0;
    const std::vector<std::string_view> fields = detail::host::split(text, ' ');
    if (fields.size() < 2) return 0;
    return detail::host::parse_u64(fields[1]).value_or(0) * detail::host::page_size();
}

VRAMGUARD_END_NAMESPACE
