// SPDX-License-Identifier: MIT
// The CUDA Runtime backend: a probe over cudaMemGetInfo, checked calls that turn CUDA status codes
// into vramguard's error types (cuda_error.hpp), and an RAII device buffer for tests and examples.
//
// Needs only the Runtime API headers and libcudart (no nvcc, no kernels): link vramguard::cuda.
#pragma once

#include <vramguard/cuda_error.hpp>
#include <vramguard/detail/cuda_device.hpp>
#include <vramguard/errors.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace cuda {

// Visible CUDA devices; 0 when there is no driver or no GPU. Never throws, so it is safe for
// "should I even try the GPU?" decisions and for skipping tests.
inline int device_count() noexcept {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        static_cast<void>(cudaGetLastError());
        return 0;
    }
    return count;
}

inline bool available() noexcept { return device_count() > 0; }

// Free and total memory of one device as the driver reports them. The raw runtime has no cache of
// its own, so this is exactly what this process could allocate now; a program that uses a caching
// allocator (LibTorch) needs the allocator-aware probe in torch.hpp instead, which adds back the
// bytes the cache holds. No peak tracking: the driver cannot say what one piece of work used.
class Probe {
   public:
    // Throws DeviceUnavailable when there is no driver, no GPU, or no device with this index.
    explicit Probe(int device = 0) : device_(device) {
        const std::string who =
            "vramguard::cuda::Probe: no usable CUDA device " + std::to_string(device);
        int count = 0;
        const cudaError_t status = cudaGetDeviceCount(&count);
        if (status != cudaSuccess) {
            static_cast<void>(cudaGetLastError());
            throw DeviceUnavailable(who + ": " + error_text(status), static_cast<int>(status));
        }
        if (device < 0 || device >= count)
            throw DeviceUnavailable(who + ": " + std::to_string(count) +
                                        " CUDA device(s) visible (check CUDA_VISIBLE_DEVICES)",
                                    static_cast<int>(cudaErrorInvalidDevice));
        key_ = detail::device_key(device);
    }

    // Reads cudaMemGetInfo with this probe's device made current for the call only; the calling
    // thread's current device is the same afterwards. The first call on a device creates its
    // CUDA context (a few hundred MiB), which the reading then already accounts for.
    MemoryInfo memory() const { return detail::read_memory(device_, "vramguard::cuda::Probe"); }

    // Nothing to release: the raw runtime caches nothing. A program with a caching allocator pairs
    // its allocator-aware probe (torch.hpp) with this contract instead.
    void release_cached() noexcept {}

    int device() const noexcept { return device_; }

    // Stable across processes and CUDA_VISIBLE_DEVICES orders: "cuda-<uuid>" (for example
    // "cuda-8f3c0a1e-52d4-9b7e-0c11-2a3b4c5d6e7f"), or "cuda-pci-<bus id>" for a device without
    // a UUID.
    // Host-wide coordination (host.hpp) names its per-device ledger after it.
    std::string device_key() const { return key_; }

   private:
    int device_;
    std::string key_;
};

// Device memory from cudaMalloc, freed by cudaFree on destruction. Move-only.
class DeviceBuffer {
   public:
    DeviceBuffer() noexcept = default;
    DeviceBuffer(void* data, std::uint64_t bytes, int device) noexcept
        : data_(data), bytes_(bytes), device_(device) {}
    DeviceBuffer(DeviceBuffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)),
          bytes_(std::exchange(other.bytes_, 0)),
          device_(other.device_) {}
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
        if (this != &other) {
            reset();
            data_ = std::exchange(other.data_, nullptr);
            bytes_ = std::exchange(other.bytes_, 0);
            device_ = other.device_;
        }
        return *this;
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { reset(); }

    void* data() const noexcept { return data_; }
    std::uint64_t bytes() const noexcept { return bytes_; }
    int device() const noexcept { return device_; }
    bool empty() const noexcept { return data_ == nullptr; }
    explicit operator bool() const noexcept { return data_ != nullptr; }

    // Frees now. Errors are swallowed: a destructor must not throw, and at process exit the runtime
    // may already be unloaded (cudaErrorCudartUnloading), when the memory goes back anyway.
    void reset() noexcept {
        if (data_ == nullptr) return;
        if (cudaFree(data_) != cudaSuccess) static_cast<void>(cudaGetLastError());
        data_ = nullptr;
        bytes_ = 0;
    }

   private:
    void* data_ = nullptr;
    std::uint64_t bytes_ = 0;
    int device_ = 0;
};

// cudaMalloc on `device` (made current for the call only). An allocation that does not fit throws
// OutOfMemory of kind `allocator` (a failed cudaMalloc leaves the context healthy) with the numbers
// the driver reports right after the failure; a missing device throws DeviceUnavailable.
inline DeviceBuffer allocate(std::uint64_t bytes, int device = 0) {
    detail::CurrentDevice current(device, "vramguard::cuda::allocate");
    if (bytes == 0) return DeviceBuffer(nullptr, 0, device);
    const std::string context = "cudaMalloc of " + format_bytes(bytes) + " (" +
                                std::to_string(bytes) + " bytes) on device " +
                                std::to_string(device);
    if (bytes > static_cast<std::uint64_t>(static_cast<std::size_t>(-1)))
        throw OutOfMemory(context + " failed: larger than the address space", OomKind::allocator,
                          OomReport{bytes, std::nullopt, std::nullopt});
    void* data = nullptr;
    const cudaError_t status = cudaMalloc(&data, static_cast<std::size_t>(bytes));
    if (status == cudaErrorMemoryAllocation) {
        static_cast<void>(cudaGetLastError());
        OomReport report;
        report.requested_bytes = bytes;
        std::size_t free_bytes = 0, total_bytes = 0;
        std::string numbers;
        if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
            report.free_bytes = free_bytes;
            report.total_bytes = total_bytes;
            numbers = "; " + format_bytes(free_bytes) + " free of " + format_bytes(total_bytes);
        } else {
            static_cast<void>(cudaGetLastError());
        }
        throw OutOfMemory(context + " failed: " + error_text(status) + numbers, OomKind::allocator,
                          report);
    }
    check(status, context, OomKind::allocator);
    return DeviceBuffer(data, bytes, device);
}

// Recognises a cuda::Error that carries cudaErrorMemoryAllocation (one a caller built from a raw
// status rather than through check()). It is a driver-level OOM: where it came from is unknown, so
// the context may be broken and it is not retried blindly.
inline OomKind classify_error(const std::exception_ptr& error) {
    try {
        std::rethrow_exception(error);
    } catch (const Error& e) {
        return e.code() == cudaErrorMemoryAllocation ? OomKind::driver : OomKind::none;
    } catch (...) {
        return OomKind::none;
    }
}

// Including this header is all it takes for is_oom() to know cuda::Error.
inline const bool cuda_oom_classifier_registered = register_oom_classifier(&classify_error);

}  // namespace cuda
VRAMGUARD_END_NAMESPACE
