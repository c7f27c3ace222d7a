// SPDX-License-Identifier: MIT
// SystemMemoryProbe: sane numbers on this machine, the cgroup layouts it does not have (fake
// /proc and /sys trees), and RLIMIT_AS really bounding "free" in a forked child.
#include <vramguard/system_memory.hpp>

#include <gtest/gtest.h>

#include "fork_child.hpp"
#include "temp_dir.hpp"

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

using vramguard::GiB;
using vramguard::MiB;
using vramguard::SystemMemoryProbe;
using vramguard::SystemMemoryReading;
using vramguard::SystemMemorySources;
using vramguard_test::run_in_child;

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif
#else
constexpr bool sanitized = false;
#endif

// A fake root: files written under it with their directories made on the way.
class FakeRoot {
   public:
    void write(const std::string& path, const std::string& contents) {
        std::string directory = dir_.path();
        std::size_t at = 1;
        while ((at = path.find('/', at)) != std::string::npos) {
            directory = dir_.path() + path.substr(0, at);
            ::mkdir(directory.c_str(), 0755);
            ++at;
        }
        std::ofstream out(dir_.path() + path, std::ios::binary | std::ios::trunc);
        out << contents;
        ASSERT_TRUE(out.good()) << "cannot write " << path;
    }
    SystemMemorySources sources() const { return SystemMemorySources{dir_.path(), false}; }

   private:
    vramguard_test::TempDir dir_{"vramguard-sysmem-"};
};

std::string kib(std::uint64_t bytes) { return std::to_string(bytes / 1024) + " kB"; }

std::string meminfo(std::uint64_t total, std::uint64_t available) {
    return "MemTotal:       " + kib(total) + "\nMemFree:        " + kib(available / 2) +
           "\nMemAvailable:   " + kib(available) + "\nBuffers:        0 kB\n";
}

std::uint64_t virtual_size() {
    std::ifstream statm("/proc/self/statm");
    std::uint64_t pages = 0;
    statm >> pages;
    return pages * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

}  // namespace

TEST(SystemMemoryProbe, ReportsSaneNumbersForThisMachine) {
    SystemMemoryProbe probe;
    const SystemMemoryReading reading = probe.read();
    EXPECT_GT(reading.memory.total_bytes, 64 * MiB);
    EXPECT_GT(reading.memory.free_bytes, 0u);
    EXPECT_LE(reading.memory.free_bytes, reading.memory.total_bytes);
    EXPECT_LE(reading.memory.total_bytes, reading.mem_total);
    EXPECT_LE(reading.memory.free_bytes, reading.mem_available);
    EXPECT_EQ(probe.memory().total_bytes, reading.memory.total_bytes);
    EXPECT_EQ(probe.device_key(), "host");
    ASSERT_NE(reading.bound, nullptr);
#if defined(__linux__)
    std::ifstream file("/proc/meminfo");
    std::string key;
    std::uint64_t kib_total = 0;
    while (file >> key && key != "MemTotal:") file.ignore(1 << 10, '\n');
    file >> kib_total;
    EXPECT_EQ(reading.mem_total, kib_total * 1024);
    probe.release_cached();  // must be harmless
    EXPECT_GT(probe.memory().free_bytes, 0u);
#endif
}

TEST(SystemMemoryProbe, CgroupV2TightestLevelBindsAndInactiveFilesAreReclaimable) {
    FakeRoot root;
    root.write("/proc/meminfo", meminfo(16 * GiB, 12 * GiB));
    root.write("/proc/self/mountinfo",
               "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
               "30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:9 - cgroup2 cgroup2 rw\n");
    root.write("/proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
    // The pod's parent: 4 GiB limit, 3.5 GiB used -> 512 MiB left: the binding level.
    root.write("/sys/fs/cgroup/kubepods/memory.max", std::to_string(4 * GiB) + "\n");
    root.write("/sys/fs/cgroup/kubepods/memory.current", std::to_string(3584 * MiB) + "\n");
    root.write("/sys/fs/cgroup/kubepods/pod1/memory.max", "max\n");
    root.write("/sys/fs/cgroup/kubepods/pod1/memory.current", std::to_string(3 * GiB) + "\n");
    // The container: 2 GiB limit, 1.5 GiB charged of which 512 MiB are inactive file pages.
    root.write("/sys/fs/cgroup/kubepods/pod1/ctr/memory.max", std::to_string(2 * GiB) + "\n");
    root.write("/sys/fs/cgroup/kubepods/pod1/ctr/memory.current",
               std::to_string(1536 * MiB) + "\n");
    root.write("/sys/fs/cgroup/kubepods/pod1/ctr/memory.stat",
               "anon 1073741824\nfile 536870912\nactive_file 0\ninactive_file 536870912\n");

    SystemMemoryProbe probe(root.sources());
    EXPECT_EQ(probe.cgroup_version(), 2);
    const SystemMemoryReading reading = probe.read();
    EXPECT_EQ(reading.mem_total, 16 * GiB);
    EXPECT_EQ(reading.mem_available, 12 * GiB);
    ASSERT_TRUE(reading.cgroup_limit.has_value());
    EXPECT_EQ(*reading.cgroup_limit, 2 * GiB);
    EXPECT_EQ(*reading.cgroup_free, 512 * MiB);
    EXPECT_EQ(reading.memory.total_bytes, 2 * GiB);
    EXPECT_EQ(reading.memory.free_bytes, 512 * MiB);
    EXPECT_STREQ(reading.bound, "cgroup");

    // The parent frees up: now the container's own working set (1 GiB of 2) binds.
    root.write("/sys/fs/cgroup/kubepods/memory.current", std::to_string(1 * GiB) + "\n");
    EXPECT_EQ(probe.memory().free_bytes, 1 * GiB);
}

TEST(SystemMemoryProbe, CgroupV1InTheHybridLayout) {
    FakeRoot root;
    root.write("/proc/meminfo", meminfo(8 * GiB, 6 * GiB));
    root.write("/proc/self/mountinfo",
               "25 1 0:21 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
               "26 25 0:22 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
               "28 25 0:24 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n"
               "29 25 0:25 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n");
    root.write("/proc/self/cgroup", "5:cpu:/\n4:memory:/docker/abc\n0::/\n");
    root.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
    root.write("/sys/fs/cgroup/memory/docker/memory.limit_in_bytes", "9223372036854771712\n");
    root.write("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", std::to_string(1 * GiB));
    root.write("/sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", std::to_string(900 * MiB));
    root.write("/sys/fs/cgroup/memory/docker/abc/memory.stat",
               "cache 104857600\ninactive_file 52428800\ntotal_inactive_file 104857600\n");

    SystemMemoryProbe probe(root.sources());
    EXPECT_EQ(probe.cgroup_version(), 1);
    const SystemMemoryReading reading = probe.read();
    EXPECT_EQ(reading.cgroup_limit.value_or(0), 1 * GiB);
    // 1 GiB - (900 MiB - 100 MiB of inactive file pages, counted hierarchically).
    EXPECT_EQ(reading.memory.free_bytes, 224 * MiB);
    EXPECT_EQ(reading.memory.total_bytes, 1 * GiB);
    EXPECT_STREQ(reading.bound, "cgroup");
}

TEST(SystemMemoryProbe, CgroupMountedAsTheContainersOwnSubtree) {
    // Inside a container the memory hierarchy's mount shows only the container's cgroup: its
    // root is /docker/abc, and the process's path /docker/abc is the mount point itself.
    FakeRoot root;
    root.write("/proc/meminfo", meminfo(8 * GiB, 6 * GiB));
    root.write(
        "/proc/self/mountinfo",
        "29 25 0:25 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n");
    root.write("/proc/self/cgroup", "4:memory:/docker/abc\n");
    root.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", std::to_string(2 * GiB));
    root.write("/sys/fs/cgroup/memory/memory.usage_in_bytes", std::to_string(512 * MiB));

    SystemMemoryProbe probe(root.sources());
    EXPECT_EQ(probe.memory().free_bytes, 1536 * MiB);
    EXPECT_EQ(probe.memory().total_bytes, 2 * GiB);
}

TEST(SystemMemoryProbe, NoLimitLeavesMemAvailable) {
    FakeRoot root;
    root.write("/proc/meminfo", meminfo(8 * GiB, 6 * GiB));
    root.write("/proc/self/mountinfo",
               "30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n");
    root.write("/proc/self/cgroup", "0::/user.slice/session-1.scope\n");
    root.write("/sys/fs/cgroup/user.slice/memory.max", "max\n");
    root.write("/sys/fs/cgroup/user.slice/session-1.scope/memory.max", "max\n");

    const SystemMemoryReading reading = SystemMemoryProbe(root.sources()).read();
    EXPECT_FALSE(reading.cgroup_limit.has_value());
    EXPECT_EQ(reading.memory.free_bytes, 6 * GiB);
    EXPECT_EQ(reading.memory.total_bytes, 8 * GiB);
    EXPECT_STREQ(reading.bound, "MemAvailable");
}

TEST(SystemMemoryProbe, KernelWithoutMemAvailableCountsTheDroppableCache) {
    FakeRoot root;
    root.write("/proc/meminfo",
               "MemTotal:  8388608 kB\nMemFree:  1048576 kB\nBuffers:   524288 kB\n"
               "Cached:   2097152 kB\nSwapCached:  0 kB\n");
    const SystemMemoryReading reading = SystemMemoryProbe(root.sources()).read();
    EXPECT_EQ(reading.memory.free_bytes, 3584 * MiB);
    EXPECT_EQ(reading.memory.total_bytes, 8 * GiB);
}

TEST(SystemMemoryProbe, EscapedMountPointsAreDecoded) {
    FakeRoot root;
    root.write("/proc/meminfo", meminfo(8 * GiB, 6 * GiB));
    root.write("/proc/self/mountinfo",
               "30 22 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n");
    root.write("/proc/self/cgroup", "0::/job\n");
    root.write("/sys/fs/my cgroup/job/memory.max", std::to_string(1 * GiB));
    root.write("/sys/fs/my cgroup/job/memory.current", std::to_string(256 * MiB));
    EXPECT_EQ(SystemMemoryProbe(root.sources()).memory().free_bytes, 768 * MiB);
}

TEST(SystemMemoryProbe, RlimitAsBoundsFreeMemoryInAChild) {
#if !defined(__linux__)
    GTEST_SKIP() << "reads /proc/self/statm";
#endif
    const std::string report = run_in_child([]() -> std::string {
        constexpr std::uint64_t headroom = 64 * MiB;
        const std::uint64_t limit = virtual_size() + headroom;
        struct rlimit rl {};
        rl.rlim_cur = rl.rlim_max = static_cast<rlim_t>(limit);
        if (::setrlimit(RLIMIT_AS, &rl) != 0)
            return std::string("setrlimit: ") + std::strerror(errno);

        SystemMemoryProbe probe;
        const SystemMemoryReading reading = probe.read();
        std::ostringstream out;
        if (std::string(reading.bound) != "RLIMIT_AS") out << "bound is " << reading.bound << "; ";
        if (reading.address_space_limit.value_or(0) != limit) out << "limit not seen; ";
        // The limit is the total unless RAM or the cgroup is smaller (a sanitizer's shadow
        // mappings make the virtual size, and so the limit, terabytes).
        const std::uint64_t total =
            std::min({limit, reading.mem_total, reading.cgroup_limit.value_or(limit)});
        if (reading.memory.total_bytes != total)
            out << "total " << reading.memory.total_bytes << " != " << total << "; ";
        if (reading.memory.free_bytes > headroom || reading.memory.free_bytes < headroom / 2)
            out << "free " << reading.memory.free_bytes << " not within the 64 MiB headroom; ";
        if (reading.virtual_bytes == 0) out << "no virtual size; ";
        if (!sanitized) {
            // The figure is real: more than it fails, less than it fits.
            void* too_much = std::malloc(reading.memory.free_bytes + 8 * MiB);
            if (too_much != nullptr) out << "allocating more than 'free' succeeded; ";
            std::free(too_much);
            const std::uint64_t half = reading.memory.free_bytes / 2;
            char* fits = static_cast<char*>(std::malloc(half));
            if (fits == nullptr) {
                out << "allocating half of 'free' failed; ";
            } else {
                std::memset(fits, 1, half);
                const std::uint64_t free_while_held = probe.memory().free_bytes;
                if (free_while_held + half > reading.memory.free_bytes + 4 * MiB)
                    out << "free did not shrink by the held bytes; ";
                std::free(fits);
            }
        }
        return out.str();
    });
    EXPECT_EQ(report, "");
}
