// SPDX-License-Identifier: MIT
// The LibTorch backend: a probe for a CUDA device that knows about LibTorch's caching allocator,
// a host probe for CPU inference, and the classifier that tells LibTorch's out-of-memory errors
// from every other c10::Error.
//
// Works with LibTorch 1.13 and 2.x, with or without CUDA: link vramguard::torch. The CUDA parts
// are compiled where the LibTorch in use was built with CUDA (VRAMGUARD_TORCH_CUDA below); on a
// CPU-only LibTorch torch::Probe still exists, and its constructor says there is no CUDA device.
#pragma once

#include <vramguard/errors.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/system_memory.hpp>
#include <vramguard/version.hpp>

#if defined(__has_include)
#if !__has_include(<c10/util/Exception.h>) || !__has_include(<torch/version.h>)
#error "vramguard/torch.hpp needs LibTorch's headers: link vramguard::torch (find_package(Torch))"
#endif
#endif

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <fcntl.h>
#include <unistd.h>

// Whether this LibTorch has CUDA. Every LibTorch may ship the c10/cuda headers (Debian's CPU-only
// libtorch-dev does), so the headers alone prove nothing: the macro file that only a CUDA build
// generates, and the CUDA Runtime headers, must be there too. Define VRAMGUARD_TORCH_CUDA to 0 to
// leave the CUDA parts out (a program that does not link c10_cuda), or to 1 to insist.
#if !defined(VRAMGUARD_TORCH_CUDA)
#if defined(__has_include)
#if __has_include(<c10/cuda/CUDACachingAllocator.h>) && \
    __has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && __has_include(<cuda_runtime_api.h>)
#define VRAMGUARD_TORCH_CUDA 1
#endif
#endif
#endif
#if !defined(VRAMGUARD_TORCH_CUDA)
#define VRAMGUARD_TORCH_CUDA 0
#endif

// c10::OutOfMemoryError exists since LibTorch 1.13; before, every OOM was a plain c10::Error.
#if TORCH_VERSION_MAJOR > 1 || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 13)
#define VRAMGUARD_TORCH_HAS_OOM_ERROR 1
#else
#define VRAMGUARD_TORCH_HAS_OOM_ERROR 0
#endif

#if VRAMGUARD_TORCH_CUDA
#include <vramguard/cuda.hpp>

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace torch {

// What LibTorch's caching allocator holds on one device, in bytes. "Reserved" is what it took
// from the driver (cudaMalloc'd segments); "allocated" is what live tensors use of it; the
// difference is the cache, this process's to reuse though the driver counts it as used.
struct AllocatorStats {
    std::uint64_t allocated = 0;
    std::uint64_t reserved = 0;
    std::uint64_t peak_allocated = 0;  // since the last reset_peak() (or the start)
    std::uint64_t peak_reserved = 0;
    std::uint64_t cached() const noexcept {
        return reserved > allocated ? reserved - allocated : 0;
    }
};

// One CUDA device as LibTorch sees it.
//   memory(): free = driver free (cudaMemGetInfo) + the allocator's cache (reserved - allocated).
//     cudaMemGetInfo alone counts the cache as used, so a guard would refuse work that fits; the
//     allocator's stats alone ignore other processes on the GPU. With a memory fraction set
//     (set_memory_fraction), the allocator refuses to reserve beyond fraction x total: total is
//     then that cap, and free never counts bytes the cap forbids.
//   release_cached(): emptyCache(), which gives the cache back to the driver.
//   peaks: the larger of the growth in reserved bytes and the growth in allocated bytes since
//     reset_peak(). Reserved growth is what the work really took from the device (allocated
//     bytes miss the allocator's rounding and fragmentation); allocated growth covers work that
//     ran inside blocks the cache already held, where reserved bytes do not move at all.
// One probe per device, shared like the Guard that uses it. Not copyable (it holds the peak
// baseline).
class Probe {
   public:
    // Throws DeviceUnavailable when LibTorch has no CUDA, sees no device, or has no device with
    // this index. Initialises CUDA and the caching allocator the way the first CUDA tensor does
    // (with a one-byte tensor, freed at once: its 2 MiB block stays in the cache).
    explicit Probe(int device = 0) : device_(device) {
#if !VRAMGUARD_TORCH_CUDA
        throw DeviceUnavailable("vramguard::torch::Probe: LibTorch " TORCH_VERSION
                                " was built without CUDA, so there is no CUDA device to guard (use "
                                "vramguard::torch::HostProbe for CPU inference)");
#else
        const std::string who = "vramguard::torch::Probe(" + std::to_string(device) + ")";
        if (!::torch::cuda::is_available())
            throw DeviceUnavailable(who +
                                    ": torch::cuda::is_available() is false: no CUDA device (or no "
                                    "usable driver) is visible to LibTorch " TORCH_VERSION);
        // size_t in 1.13, c10::DeviceIndex in later 2.x.
        const auto count = static_cast<std::size_t>(::torch::cuda::device_count());
        if (device < 0 || static_cast<std::size_t>(device) >= count)
            throw DeviceUnavailable(who + ": LibTorch sees " + std::to_string(count) +
                                        " CUDA device(s) (check CUDA_VISIBLE_DEVICES)",
                                    static_cast<int>(cudaErrorInvalidDevice));
        static_cast<void>(
            ::at::empty({1}, ::at::TensorOptions()
                                 .dtype(::at::kByte)
                                 .device(::c10::Device(::c10::DeviceType::CUDA, index()))));
        key_ = cuda::detail::device_key(device);
#endif
    }

    Probe(const Probe&) = delete;
    Probe& operator=(const Probe&) = delete;

    MemoryInfo memory() const {
#if VRAMGUARD_TORCH_CUDA
        const MemoryInfo driver = cuda::detail::read_memory(device_, "vramguard::torch::Probe");
        const AllocatorStats stats = allocator_stats();
        MemoryInfo result{detail::saturating_add(driver.free_bytes, stats.cached()),
                          driver.total_bytes};
        const double fraction = fraction_.load(std::memory_order_relaxed);
        if (fraction < 1.0) {
            // The allocator compares reserved + request with fraction x total (the total that
            // cudaMemGetInfo reports); only the cache and what is left under the cap can be had.
            const auto cap =
                static_cast<std::uint64_t>(fraction * static_cast<double>(driver.total_bytes));
            const std::uint64_t under_cap = cap > stats.reserved ? cap - stats.reserved : 0;
            result.total_bytes = cap;
            result.free_bytes =
                detail::saturating_add(stats.cached(), std::min(driver.free_bytes, under_cap));
        }
        result.free_bytes = std::min(result.free_bytes, result.total_bytes);
        return result;
#else
        return {};
#endif
    }

    // emptyCache() releases the cache of every device LibTorch uses: the caching allocator has
    // no per-device call.
    void release_cached() {
#if VRAMGUARD_TORCH_CUDA
        ::c10::cuda::CUDACachingAllocator::emptyCache();
#endif
    }

    void reset_peak() {
#if VRAMGUARD_TORCH_CUDA
        ::c10::cuda::CUDACachingAllocator::resetPeakStats(index());
        // The peaks now equal the current values; what was cached then is the offset that makes
        // "allocated peak" comparable with "reserved peak" (see the class comment).
        cached_at_reset_.store(allocator_stats().cached(), std::memory_order_relaxed);
#endif
    }

    std::uint64_t peak_bytes() const {
        const AllocatorStats stats = allocator_stats();
        return std::max(stats.peak_reserved,
                        detail::saturating_add(stats.peak_allocated,
                                               cached_at_reset_.load(std::memory_order_relaxed)));
    }

    // Caps what the allocator may reserve on this device at fraction x total (LibTorch's
    // setMemoryFraction), and makes memory() report within the cap. LibTorch offers no way to
    // read the fraction back, so set it here rather than behind the probe's back.
    void set_memory_fraction(double fraction) {
        if (!(fraction > 0.0 && fraction <= 1.0))
            throw std::invalid_argument(
                "vramguard::torch::Probe::set_memory_fraction: fraction must be in (0, 1], got " +
                std::to_string(fraction));
#if VRAMGUARD_TORCH_CUDA
        ::c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, index());
#endif
        fraction_.store(fraction, std::memory_order_relaxed);
    }
    double memory_fraction() const noexcept { return fraction_.load(std::memory_order_relaxed); }

    AllocatorStats allocator_stats() const {
        AllocatorStats result;
#if VRAMGUARD_TORCH_CUDA
        const auto stats = ::c10::cuda::CUDACachingAllocator::getDeviceStats(index());
        // Index 0 is StatType::AGGREGATE (every pool) in every LibTorch; the enum itself moved
        // between namespaces in 2.x, the index did not.
        const auto& allocated = stats.allocated_bytes[0];
        const auto& reserved = stats.reserved_bytes[0];
        auto bytes = [](std::int64_t value) {
            return value > 0 ? static_cast<std::uint64_t>(value) : std::uint64_t{0};
        };
        result.allocated = bytes(allocated.current);
        result.reserved = bytes(reserved.current);
        result.peak_allocated = bytes(allocated.peak);
        result.peak_reserved = bytes(reserved.peak);
#endif
        return result;
    }

    int device() const noexcept { return device_; }

    // The same key as vramguard::cuda::Probe for the same GPU ("cuda-<uuid>"), so guards built on
    // either probe share the device's single-item semaphore and host-wide ledger.
    std::string device_key() const { return key_; }

   private:
    ::c10::DeviceIndex index() const noexcept { return static_cast<::c10::DeviceIndex>(device_); }

    int device_;
    std::string key_;
    std::atomic<double> fraction_{1.0};
    std::atomic<std::uint64_t> cached_at_reset_{0};
};

// The host, for CPU inference with LibTorch: SystemMemoryProbe's numbers (MemAvailable, bounded
// by the cgroup and RLIMIT_AS) and release_cached() (malloc_trim: LibTorch's CPU allocator calls
// free() and caches nothing itself, glibc does). Peaks are the process's peak resident set
// (VmHWM), reset through /proc/self/clear_refs ("5", Linux 4.0+): CPU tensors are written as they
// are made, so resident growth is what a piece of work cost. Resetting VmHWM is process-wide and
// visible to other tools that read it, which is why the plain SystemMemoryProbe does not do it.
// Where the reset is not possible (not Linux, a sandbox without clear_refs) peak_bytes() is
// always 0, so a guard records nothing rather than a lifetime peak passed off as one run's.
class HostProbe : public SystemMemoryProbe {
   public:
    explicit HostProbe(SystemMemorySources sources = {})
        : SystemMemoryProbe(std::move(sources)), peak_tracking_(write_clear_refs()) {}

    void reset_peak() {
        if (peak_tracking_) static_cast<void>(write_clear_refs());
    }

    // Peak resident bytes since the last reset_peak(); 0 without peak tracking.
    std::uint64_t peak_bytes() const {
        if (!peak_tracking_) return 0;
        std::string text;
        if (!detail::read_small_file(sources().root + "/proc/self/status", text)) return 0;
        return detail::host::field(text, "VmHWM:").value_or(0) * 1024;
    }

    bool peak_tracking() const noexcept { return peak_tracking_; }

   private:
    bool write_clear_refs() const {
        const std::string path = sources().root + "/proc/self/clear_refs";
        const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
        if (fd < 0) return false;
        const bool written = ::write(fd, "5", 1) == 1;
        ::close(fd);
        return written;
    }

    bool peak_tracking_;  // decided once: whether this system lets VmHWM be reset
};

// LibTorch's out-of-memory errors, by type first and message second:
//   c10::OutOfMemoryError (the caching allocator's, since 1.13) -> allocator;
//   c10::Error saying "CUDA out of memory" / "DefaultCPUAllocator: can't allocate memory" (an
//     allocator OOM in a LibTorch before 1.13, or re-raised by TorchScript) -> allocator;
//   "CUDA error: out of memory" (a CUDA call outside the allocator, whatever the exception type)
//     -> driver, which is reported and not retried, since the CUDA context may be unusable;
//   every other c10::Error, and everything else -> none (left to the other classifiers).
// The message is read without c10's backtrace (what() appends one in 1.13), so a frame that
// happens to mention memory cannot make a shape error look like an OOM.
inline OomKind classify(const std::exception_ptr& error) {
    if (!error) return OomKind::none;
    try {
        std::rethrow_exception(error);
    }
#if VRAMGUARD_TORCH_HAS_OOM_ERROR
    catch (const ::c10::OutOfMemoryError& oom) {
        return classify_oom_message(oom.what_without_backtrace()) == OomKind::driver
                   ? OomKind::driver
                   : OomKind::allocator;
    }
#endif
    catch (const ::c10::Error& e) {
        return classify_oom_message(e.what_without_backtrace());
    } catch (...) {
        return OomKind::none;
    }
}

// A c10::Error's message without the backtrace its what() carries (describe() and every log line
// use it); the exception itself, backtrace included, stays nested in vramguard's errors.
inline const char* text_without_backtrace(const std::exception_ptr& error) noexcept {
    try {
        std::rethrow_exception(error);
    } catch (const ::c10::Error& e) {
        return e.what_without_backtrace();
    } catch (...) {
        return nullptr;
    }
}

// Including this header is all it takes for is_oom() and describe() to know LibTorch's errors.
inline const bool torch_oom_classifier_registered = register_oom_classifier(&classify);
inline const bool torch_error_text_registered = register_error_text_reader(&text_without_backtrace);

}  // namespace torch
VRAMGUARD_END_NAMESPACE
