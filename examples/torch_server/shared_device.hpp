// SPDX-License-Identifier: MIT
// A simulated device in a file, shared by every process that maps it (--simulate-shared-device
// FILE): its size, the bytes in use, and a simulated clock. Two servers started on the same file
// see each other's models as used memory, as two servers on one GPU do, and the model's parameter
// bytes are taken from it while it is loaded (and each batch's activations while it runs, with
// --simulate-bytes-per-token): an allocation that does not fit throws vramguard's out-of-memory
// error, as a device would, and counts in ooms(). The clock moves only when a process
// sleeps (the guard's and the registry's waits advance it) or a test advances it, so "idle for
// 30 s" and a peer's 30 s cooldown are deterministic in tests. POSIX; the counters are lock-free
// atomics in shared memory.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/memory.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

namespace torch_server {

class SharedDevice {
   public:
    // Maps `path`, creating it for a device of `total_bytes` when it does not exist (or is empty).
    // A file made for another size is an error: the processes would disagree about the device.
    // total_bytes 0: the file must exist; its size is used.
    SharedDevice(const std::string& path, std::uint64_t total_bytes) : path_(path) {
        const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) fail("cannot open");
        // The first process to lock an empty file lays it out; the others wait for that.
        if (::flock(fd, LOCK_EX) != 0) fail("cannot lock", fd);
        struct stat info {};
        if (::fstat(fd, &info) != 0) fail("cannot stat", fd);
        const bool fresh = info.st_size == 0;
        if (fresh && total_bytes == 0) {
            ::close(fd);
            ::unlink(path.c_str());
            throw std::runtime_error("simulated device " + path +
                                     " does not exist yet: give its size in bytes");
        }
        if (fresh && ::ftruncate(fd, sizeof(Layout)) != 0) fail("cannot size", fd);
        if (!fresh && static_cast<std::size_t>(info.st_size) != sizeof(Layout)) {
            ::close(fd);
            throw std::runtime_error("simulated device " + path + ": not a simulated device file");
        }
        void* memory = ::mmap(nullptr, sizeof(Layout), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (memory == MAP_FAILED) fail("cannot map", fd);
        layout_ = static_cast<Layout*>(memory);
        if (fresh) {
            new (layout_) Layout{};
            layout_->total = total_bytes;
            // The clock starts an hour in, so "never used" and "used at 0" differ.
            layout_->now_ns.store(std::chrono::nanoseconds(std::chrono::hours(1)).count());
            layout_->magic = magic;
        }
        ::flock(fd, LOCK_UN);
        ::close(fd);
        if (layout_->magic != magic)
            throw std::runtime_error("simulated device " + path + ": not a simulated device file");
        if (total_bytes != 0 && layout_->total != total_bytes)
            throw std::runtime_error("simulated device " + path + " was made for " +
                                     std::to_string(layout_->total) + " bytes, not " +
                                     std::to_string(total_bytes));
    }
    SharedDevice(const SharedDevice&) = delete;
    SharedDevice& operator=(const SharedDevice&) = delete;
    ~SharedDevice() {
        if (layout_) ::munmap(layout_, sizeof(Layout));
    }

    std::uint64_t total() const noexcept { return layout_->total; }
    std::uint64_t used() const noexcept { return layout_->used.load(); }
    std::uint64_t ooms() const noexcept { return layout_->ooms.load(); }
    const std::string& path() const noexcept { return path_; }

    vramguard::TimePoint now() const noexcept {
        return vramguard::TimePoint(std::chrono::duration_cast<vramguard::Duration>(
            std::chrono::nanoseconds(layout_->now_ns.load())));
    }
    void advance(vramguard::Duration d) noexcept {
        if (d > vramguard::Duration::zero())
            layout_->now_ns.fetch_add(
                std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
    }
    vramguard::ClockFn clock() {
        return [this] { return now(); };
    }
    // A wait moves the shared clock: nothing else would, and a wait for memory or for a peer's
    // answer must end.
    vramguard::SleepFn sleep() {
        return [this](vramguard::Duration d) {
            advance(d);
            ::usleep(1000);  // let the process being waited for run
        };
    }

    // Takes `bytes` until the returned holder is destroyed, or throws vramguard::OutOfMemory.
    std::shared_ptr<void> allocate(std::uint64_t bytes) {
        std::uint64_t used = layout_->used.load();
        for (;;) {
            if (used + bytes > layout_->total) {
                layout_->ooms.fetch_add(1);
                throw vramguard::OutOfMemory(
                    "simulated device " + path_ + ": out of memory allocating " +
                    vramguard::format_bytes(bytes) + " (" + vramguard::format_bytes(used) + " of " +
                    vramguard::format_bytes(layout_->total) + " in use)");
            }
            if (layout_->used.compare_exchange_weak(used, used + bytes)) break;
        }
        held_.fetch_add(bytes);
        std::uint64_t peak = peak_.load();
        while (held_.load() > peak && !peak_.compare_exchange_weak(peak, held_.load())) {
        }
        return std::shared_ptr<void>(nullptr, [this, bytes](void*) {
            layout_->used.fetch_sub(bytes);
            held_.fetch_sub(bytes);
        });
    }

    // The guard's probe: what every process on the device sees.
    class Probe {
       public:
        explicit Probe(SharedDevice& device) : device_(device) {}
        vramguard::MemoryInfo memory() const {
            const std::uint64_t used = device_.used(), total = device_.total();
            return {total > used ? total - used : 0, total};
        }
        void release_cached() {}
        // This process's bytes at their highest since reset_peak().
        void reset_peak() { device_.peak_.store(device_.held_.load()); }
        std::uint64_t peak_bytes() const { return device_.peak_.load(); }
        std::string device_key() const { return "simulated:" + device_.path(); }

       private:
        SharedDevice& device_;
    };

   private:
    static constexpr std::uint64_t magic = 0x7673696d64657631;  // "vsimdev1"
    struct Layout {
        std::uint64_t magic = 0;
        std::uint64_t total = 0;
        std::atomic<std::uint64_t> used{0};
        std::atomic<std::uint64_t> ooms{0};
        std::atomic<std::int64_t> now_ns{0};
    };
    static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                      std::atomic<std::int64_t>::is_always_lock_free,
                  "atomics shared between processes must be lock-free");

    [[noreturn]] void fail(const char* what, int fd = -1) {
        const std::string message =
            "simulated device " + path_ + ": " + what + ": " + std::strerror(errno);
        if (fd >= 0) ::close(fd);
        throw std::runtime_error(message);
    }

    std::string path_;
    Layout* layout_ = nullptr;
    std::atomic<std::uint64_t> held_{0};  // this process's bytes
    std::atomic<std::uint64_t> peak_{0};
};

}  // namespace torch_server
