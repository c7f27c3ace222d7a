// SPDX-License-Identifier: MIT
// The CUDA backend against a real GPU (ctest label "gpu"): the probe's numbers, a real allocation
// moving them, a real OOM with its report, and the caller's current device left alone.
// Without a GPU every test skips with the runtime's reason.
#include <vramguard/cuda.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <exception>
#include <string>

namespace vg = vramguard;
namespace cuda = vramguard::cuda;
using vg::GiB;
using vg::MiB;

namespace {

std::uint64_t distance(std::uint64_t a, std::uint64_t b) { return a > b ? a - b : b - a; }

class CudaGpu : public ::testing::Test {
   protected:
    void SetUp() override {
        const cudaError_t status = cudaGetDeviceCount(&count_);
        if (status != cudaSuccess) {
            static_cast<void>(cudaGetLastError());
            GTEST_SKIP() << "no CUDA device: " << cuda::error_text(status);
        }
        if (count_ == 0) GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount reports 0 devices";
    }

    // The driver's own view, read directly, for comparison.
    static vg::MemoryInfo driver_memory(int device) {
        int previous = 0;
        EXPECT_EQ(cudaGetDevice(&previous), cudaSuccess);
        EXPECT_EQ(cudaSetDevice(device), cudaSuccess);
        std::size_t free_bytes = 0, total_bytes = 0;
        EXPECT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
        EXPECT_EQ(cudaSetDevice(previous), cudaSuccess);
        return vg::MemoryInfo{free_bytes, total_bytes};
    }

    int count_ = 0;
};

}  // namespace

TEST_F(CudaGpu, ProbeAgreesWithCudaMemGetInfo) {
    cuda::Probe probe(0);
    const vg::MemoryInfo ours = probe.memory();  // creates the context first, so both see it
    const vg::MemoryInfo driver = driver_memory(0);
    EXPECT_EQ(ours.total_bytes, driver.total_bytes);
    // Other processes may move free memory a little between the two readings.
    EXPECT_LE(distance(ours.free_bytes, driver.free_bytes), 8 * MiB)
        << vg::format_bytes(ours.free_bytes) << " vs " << vg::format_bytes(driver.free_bytes);
    EXPECT_GT(ours.total_bytes, 0u);
    EXPECT_LE(ours.free_bytes, ours.total_bytes);
}

TEST_F(CudaGpu, AllocatingOneGibLowersFreeByOneGib) {
    cuda::Probe probe(0);
    const vg::MemoryInfo before = probe.memory();
    if (before.free_bytes < 2 * GiB)
        GTEST_SKIP() << "only " << vg::format_bytes(before.free_bytes) << " free on device 0";
    {
        cuda::DeviceBuffer buffer = cuda::allocate(1 * GiB, 0);
        ASSERT_NE(buffer.data(), nullptr);
        EXPECT_EQ(buffer.bytes(), 1 * GiB);
        EXPECT_EQ(buffer.device(), 0);
        const vg::MemoryInfo during = probe.memory();
        const std::uint64_t drop =
            before.free_bytes > during.free_bytes ? before.free_bytes - during.free_bytes : 0;
        // Allocation granularity and page tables add a little; other processes may too.
        EXPECT_LE(distance(drop, 1 * GiB), 64 * MiB)
            << "free dropped by " << vg::format_bytes(drop);

        cuda::DeviceBuffer moved(std::move(buffer));
        EXPECT_TRUE(buffer.empty());
        EXPECT_EQ(moved.bytes(), 1 * GiB);
    }
    const vg::MemoryInfo after = probe.memory();
    EXPECT_LE(distance(after.free_bytes, before.free_bytes), 64 * MiB)
        << "the buffer's memory did not come back: " << vg::format_bytes(after.free_bytes) << " vs "
        << vg::format_bytes(before.free_bytes);
}

TEST_F(CudaGpu, AllocatingMoreThanTotalThrowsOutOfMemoryWithReport) {
    cuda::Probe probe(0);
    const vg::MemoryInfo info = probe.memory();
    const std::uint64_t requested = info.total_bytes + 1 * GiB;
    try {
        cuda::allocate(requested, 0);
        FAIL() << "allocating " << vg::format_bytes(requested) << " succeeded";
    } catch (const vg::OutOfMemory& e) {
        EXPECT_EQ(e.kind(), vg::OomKind::allocator);
        ASSERT_TRUE(e.report().has_value());
        EXPECT_EQ(e.report()->requested_bytes, requested);
        ASSERT_TRUE(e.report()->total_bytes.has_value());
        EXPECT_EQ(*e.report()->total_bytes, info.total_bytes);
        ASSERT_TRUE(e.report()->free_bytes.has_value());
        EXPECT_LE(*e.report()->free_bytes, info.total_bytes);
        EXPECT_TRUE(vg::is_oom(std::make_exception_ptr(e)));
        EXPECT_EQ(vg::classify_oom(std::make_exception_ptr(e)), vg::OomKind::allocator);
        EXPECT_NE(std::string(e.what()).find("cudaErrorMemoryAllocation"), std::string::npos)
            << e.what();
    }
    // A failed cudaMalloc leaves the context healthy and no error behind: the next one works.
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    cuda::DeviceBuffer small = cuda::allocate(1 * MiB, 0);
    EXPECT_NE(small.data(), nullptr);
}

TEST_F(CudaGpu, CurrentDeviceIsRestored) {
    const int other = count_ - 1;  // the same as 0 on a single-GPU machine, still a useful check
    ASSERT_EQ(cudaSetDevice(other), cudaSuccess);
    cuda::Probe probe(0);
    static_cast<void>(probe.memory());
    int current = -1;
    ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
    EXPECT_EQ(current, other);

    cuda::DeviceBuffer buffer = cuda::allocate(1 * MiB, 0);
    ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
    EXPECT_EQ(current, other);
    buffer.reset();
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
}

TEST_F(CudaGpu, DeviceKeyIsStableAndNamesTheUuid) {
    const std::string key = cuda::Probe(0).device_key();
    EXPECT_EQ(key.rfind("cuda-", 0), 0u) << key;
    EXPECT_EQ(cuda::Probe(0).device_key(), key);
    EXPECT_GT(key.size(), 5u);
    for (int device = 1; device < count_; ++device)
        EXPECT_NE(cuda::Probe(device).device_key(), key) << "device " << device;
}

TEST_F(CudaGpu, OutOfRangeDeviceIsUnavailable) {
    EXPECT_THROW(cuda::Probe probe(count_), vg::DeviceUnavailable);
    EXPECT_THROW(cuda::allocate(1 * MiB, count_), vg::DeviceUnavailable);
    int current = -1;
    EXPECT_EQ(cudaGetDevice(&current), cudaSuccess);
    EXPECT_GE(current, 0);
}
