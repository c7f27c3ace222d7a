// SPDX-License-Identifier: MIT
// The CUDA backend where the toolkit exists, GPU or not: error mapping, OOM classification, and how
// the probe fails without a device. Checks that need a real GPU skip with the runtime's reason.
#include <vramguard/cuda.hpp>

#include <gtest/gtest.h>

#include <exception>
#include <string>

namespace vg = vramguard;
namespace cuda = vramguard::cuda;

namespace {

template <class E, class F>
E capture(F&& fn) {
    try {
        fn();
    } catch (const E& e) {
        return e;
    }
    ADD_FAILURE() << "expected an exception";
    throw std::logic_error("expected an exception");
}

bool contains(const std::string& text, const std::string& needle) {
    return text.find(needle) != std::string::npos;
}

// Why there is no GPU, in the runtime's words, or nothing when there is one.
std::string no_device_reason() {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        static_cast<void>(cudaGetLastError());
        return cuda::error_text(status);
    }
    if (count == 0) return "cudaGetDeviceCount reports 0 devices";
    return "";
}

}  // namespace

TEST(CudaDeviceCount, NeverThrowsAndAgreesWithAvailable) {
    int count = -1;
    EXPECT_NO_THROW(count = cuda::device_count());
    EXPECT_GE(count, 0);
    EXPECT_EQ(cuda::available(), count > 0);
    if (!no_device_reason().empty()) {
        EXPECT_EQ(count, 0);
    }
    // With a device, device_count() leaves no error behind for the caller's next
    // cudaGetLastError(). Without a driver the runtime's initialisation error is sticky: every
    // cudaGetLastError() returns it again, and nothing can clear it.
    if (count > 0) {
        EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    }
}

TEST(CudaProbe, WithoutDeviceThrowsDeviceUnavailableNamingTheRuntimeError) {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    static_cast<void>(cudaGetLastError());
    if (status == cudaSuccess && count > 0)
        GTEST_SKIP() << "a CUDA device is present; this checks the no-device path";

    const auto e = capture<vg::DeviceUnavailable>([] { cuda::Probe probe(0); });
    const std::string message = e.what();
    EXPECT_TRUE(contains(message, "vramguard::cuda::Probe: no usable CUDA device 0")) << message;
    if (status != cudaSuccess) {
        EXPECT_TRUE(contains(message, cudaGetErrorName(status))) << message;
        EXPECT_TRUE(contains(message, cudaGetErrorString(status))) << message;
        EXPECT_EQ(e.error_code(), static_cast<int>(status));
        EXPECT_TRUE(status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver ||
                    cuda::detail::is_unavailable(status))
            << cuda::error_text(status);
    }
}

TEST(CudaProbe, OutOfRangeOrNegativeDeviceThrowsDeviceUnavailable) {
    const int count = cuda::device_count();
    for (int device : {-1, count, count + 7}) {
        const auto e = capture<vg::DeviceUnavailable>([device] { cuda::Probe probe(device); });
        EXPECT_TRUE(contains(e.what(), "no usable CUDA device " + std::to_string(device)))
            << e.what();
    }
}

TEST(CudaProbe, ReadsMemoryWhenADeviceExists) {
    const std::string reason = no_device_reason();
    if (!reason.empty()) GTEST_SKIP() << "no CUDA device: " << reason;
    cuda::Probe probe(0);
    const vg::MemoryInfo info = probe.memory();
    EXPECT_GT(info.total_bytes, 0u);
    EXPECT_LE(info.free_bytes, info.total_bytes);
    EXPECT_EQ(probe.device(), 0);
    EXPECT_EQ(probe.device_key().rfind("cuda-", 0), 0u) << probe.device_key();
    probe.release_cached();  // a no-op on the raw runtime; must not disturb the next reading
    EXPECT_EQ(probe.memory().total_bytes, info.total_bytes);
}

TEST(CudaError, MessageNamesCallErrorNameAndDescription) {
    const cuda::Error e(cudaErrorNoDevice, "cudaMemGetInfo on device 0");
    EXPECT_EQ(std::string(e.what()),
              std::string("cudaMemGetInfo on device 0 failed: cudaErrorNoDevice (") +
                  cudaGetErrorString(cudaErrorNoDevice) + ")");
    EXPECT_EQ(e.code(), cudaErrorNoDevice);
    EXPECT_EQ(
        cuda::error_text(cudaErrorInvalidValue),
        std::string("cudaErrorInvalidValue (") + cudaGetErrorString(cudaErrorInvalidValue) + ")");
}

TEST(CudaCheck, SuccessDoesNothing) { EXPECT_NO_THROW(cuda::check(cudaSuccess, "cudaFree")); }

TEST(CudaCheck, MemoryAllocationIsOutOfMemoryOfTheGivenKind) {
    for (vg::OomKind kind : {vg::OomKind::allocator, vg::OomKind::driver}) {
        const auto e = capture<vg::OutOfMemory>(
            [kind] { cuda::check(cudaErrorMemoryAllocation, "cudaMalloc on device 0", kind); });
        EXPECT_EQ(e.kind(), kind);
        EXPECT_TRUE(contains(e.what(), "cudaMalloc on device 0 failed: cudaErrorMemoryAllocation"))
            << e.what();
        const auto error = std::make_exception_ptr(e);
        EXPECT_TRUE(vg::is_oom(error));
        EXPECT_EQ(vg::classify_oom(error), kind);
    }
}

TEST(CudaCheck, MemoryAllocationDefaultsToDriverKind) {
    // Outside cudaMalloc (a kernel launch, a cuBLAS handle) the context may be broken: not retried.
    const auto e =
        capture<vg::OutOfMemory>([] { cuda::check(cudaErrorMemoryAllocation, "cublasCreate"); });
    EXPECT_EQ(e.kind(), vg::OomKind::driver);
    EXPECT_EQ(vg::classify_oom(std::make_exception_ptr(e)), vg::OomKind::driver);
}

TEST(CudaCheck, MissingDeviceErrorsAreDeviceUnavailable) {
    for (cudaError_t status : {cudaErrorNoDevice, cudaErrorInsufficientDriver,
                               cudaErrorInvalidDevice, cudaErrorNoKernelImageForDevice}) {
        const auto e = capture<vg::DeviceUnavailable>(
            [status] { cuda::check(status, std::string("cudaSetDevice(3)")); });
        EXPECT_EQ(e.error_code(), static_cast<int>(status));
        EXPECT_TRUE(contains(e.what(), "cudaSetDevice(3) failed: ")) << e.what();
        EXPECT_TRUE(contains(e.what(), cudaGetErrorName(status))) << e.what();
        EXPECT_TRUE(contains(e.what(), cudaGetErrorString(status))) << e.what();
        EXPECT_FALSE(vg::is_oom(std::make_exception_ptr(e)));
    }
}

TEST(CudaCheck, OtherErrorsAreCudaErrorAndNotOom) {
    for (cudaError_t status :
         {cudaErrorInvalidValue, cudaErrorIllegalAddress, cudaErrorLaunchFailure}) {
        const auto e = capture<cuda::Error>([status] { cuda::check(status, "cudaMemcpy"); });
        EXPECT_EQ(e.code(), status);
        EXPECT_TRUE(contains(e.what(), cudaGetErrorName(status))) << e.what();
        EXPECT_FALSE(vg::is_oom(std::make_exception_ptr(e)));
        EXPECT_EQ(vg::classify_oom(std::make_exception_ptr(e)), vg::OomKind::none);
    }
}

TEST(CudaClassifier, IsRegisteredByIncludingTheHeader) {
    EXPECT_TRUE(cuda::cuda_oom_classifier_registered);
    // A cuda::Error built from a raw status: classified by type and code, not by its message.
    const auto oom =
        std::make_exception_ptr(cuda::Error(cudaErrorMemoryAllocation, "cuLaunchKernel"));
    EXPECT_EQ(cuda::classify_error(oom), vg::OomKind::driver);
    EXPECT_EQ(vg::classify_oom(oom), vg::OomKind::driver);
    EXPECT_TRUE(vg::is_oom(oom));

    const auto other = std::make_exception_ptr(cuda::Error(cudaErrorInvalidValue, "cudaMemcpy"));
    EXPECT_EQ(cuda::classify_error(other), vg::OomKind::none);
    EXPECT_EQ(vg::classify_oom(other), vg::OomKind::none);

    EXPECT_EQ(cuda::classify_error(std::make_exception_ptr(std::runtime_error("x"))),
              vg::OomKind::none);
}

TEST(CudaDeviceBuffer, DefaultIsEmptyAndMovesLeaveTheSourceEmpty) {
    cuda::DeviceBuffer a;
    EXPECT_TRUE(a.empty());
    EXPECT_FALSE(static_cast<bool>(a));
    EXPECT_EQ(a.bytes(), 0u);
    EXPECT_EQ(a.data(), nullptr);
    cuda::DeviceBuffer b(std::move(a));
    EXPECT_TRUE(b.empty());
    a = std::move(b);
    EXPECT_TRUE(a.empty());
    a.reset();  // freeing nothing is fine, GPU or not
}

TEST(CudaAllocate, WithoutDeviceThrowsDeviceUnavailable) {
    const std::string reason = no_device_reason();
    if (reason.empty()) GTEST_SKIP() << "a CUDA device is present; this checks the no-device path";
    const auto e = capture<vg::DeviceUnavailable>([] { cuda::allocate(1024); });
    EXPECT_TRUE(contains(e.what(), "vramguard::cuda::allocate")) << e.what();
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        EXPECT_EQ(e.error_code(), static_cast<int>(status));
        EXPECT_TRUE(contains(e.what(), cudaGetErrorName(status))) << e.what();
    }
}
