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

#include <vramguard/detail/system_memory_sources.hpp>
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
    // Tightens `reading` with one bound: `limit` caps the total, `free` the free bytes.
    static void apply_bound(SystemMemoryReading& reading, std::uint64_t limit, std::uint64_t free,
                            const char* name) {
        reading.memory.total_bytes = std::min(reading.memory.total_bytes, limit);
        if (free < reading.memory.free_bytes) {
            reading.memory.free_bytes = free;
            reading.bound = name;
        }
    }

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
            apply_bound(reading, *limit, free, "cgroup");
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
            apply_bound(reading, *reading.address_space_limit,
                        detail::saturating_sub(*reading.address_space_limit, reading.virtual_bytes),
                        "RLIMIT_AS");
        if (reading.data_limit)
            apply_bound(reading, *reading.data_limit,
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
