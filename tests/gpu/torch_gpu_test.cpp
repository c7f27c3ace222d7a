// SPDX-License-Identifier: MIT
// The LibTorch backend against a real GPU (ctest label "gpu"): the probe's numbers against
// cudaMemGetInfo and the caching allocator's stats, emptyCache, peak recording, and a guard that
// halves under real pressure (a memory fraction set through the probe).
// Without a CUDA device, or with a LibTorch built without CUDA, every test skips and says why.
#if defined(VRAMGUARD_WITH_TORCH)
#include <vramguard/torch.hpp>
#endif
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#if defined(VRAMGUARD_WITH_TORCH) && VRAMGUARD_TORCH_CUDA

#include <torch/torch.h>

#include "guard_fixture.hpp"

namespace vg = vramguard;
namespace vt = vramguard::torch;
using vg::GiB;
using vg::MiB;

namespace {

std::uint64_t distance(std::uint64_t a, std::uint64_t b) { return a > b ? a - b : b - a; }

::torch::Tensor device_bytes(std::uint64_t bytes, int device = 0) {
    return ::torch::empty(
        {static_cast<std::int64_t>(bytes)},
        ::torch::TensorOptions().dtype(::torch::kByte).device(::torch::kCUDA, device));
}

class TorchGpu : public ::testing::Test {
   protected:
    void SetUp() override {
        if (!::torch::cuda::is_available())
            GTEST_SKIP() << "no CUDA device: torch::cuda::is_available() is false";
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
};

// Puts the allocator's memory fraction back when a test ends, however it ends.
struct FractionReset {
    vt::Probe& probe;
    ~FractionReset() { probe.set_memory_fraction(1.0); }
};

}  // namespace

TEST_F(TorchGpu, ProbeAddsTheAllocatorCacheToDriverFree) {
    vt::Probe probe(0);
    static_cast<void>(device_bytes(256 * MiB));  // freed at once: cached, not returned
    const vt::AllocatorStats stats = probe.allocator_stats();
    ASSERT_GE(stats.cached(), 256 * MiB);
    const vg::MemoryInfo ours = probe.memory();
    const vg::MemoryInfo driver = driver_memory(0);
    EXPECT_EQ(ours.total_bytes, driver.total_bytes);
    // cudaMemGetInfo counts the cache as used; the probe gives it back. Other processes may move
    // free memory a little between the readings.
    EXPECT_LE(distance(ours.free_bytes, driver.free_bytes + stats.cached()), 8 * MiB)
        << vg::format_bytes(ours.free_bytes) << " vs " << vg::format_bytes(driver.free_bytes)
        << " + " << vg::format_bytes(stats.cached());
    EXPECT_LE(ours.free_bytes, ours.total_bytes);
}

TEST_F(TorchGpu, ReleaseCachedGivesTheCacheBackToTheDriver) {
    vt::Probe probe(0);
    static_cast<void>(device_bytes(512 * MiB));
    const std::uint64_t cached = probe.allocator_stats().cached();
    ASSERT_GE(cached, 512 * MiB);
    const vg::MemoryInfo driver_before = driver_memory(0);
    const vg::MemoryInfo probe_before = probe.memory();

    probe.release_cached();

    EXPECT_LT(probe.allocator_stats().cached() + 500 * MiB, cached);
    const vg::MemoryInfo driver_after = driver_memory(0);
    EXPECT_GE(driver_after.free_bytes + 8 * MiB, driver_before.free_bytes + 500 * MiB);
    // What this process could allocate did not change: the cache was already counted as free.
    EXPECT_LE(distance(probe.memory().free_bytes, probe_before.free_bytes), 16 * MiB);
}

TEST_F(TorchGpu, PeakCountsNewSegmentsAndWorkInsideTheCache) {
    vt::Probe probe(0);
    probe.release_cached();

    probe.reset_peak();
    std::uint64_t baseline = probe.peak_bytes();
    static_cast<void>(device_bytes(1 * GiB));  // a new segment: reserved bytes grow
    EXPECT_GE(probe.peak_bytes(), baseline + 1 * GiB);
    EXPECT_GE(probe.allocator_stats().peak_reserved, 1 * GiB);

    // The same size again is served from the cache: reserved bytes do not move, yet the work
    // still cost 1 GiB.
    probe.reset_peak();
    baseline = probe.peak_bytes();
    const std::uint64_t reserved_before = probe.allocator_stats().reserved;
    static_cast<void>(device_bytes(1 * GiB));
    EXPECT_EQ(probe.allocator_stats().reserved, reserved_before);
    EXPECT_GE(probe.peak_bytes(), baseline + 1 * GiB);
}

TEST_F(TorchGpu, MemoryFractionPressureMakesTheGuardHalve) {
    vt::Probe probe(0);
    probe.release_cached();
    const vg::MemoryInfo driver = driver_memory(0);
    const vt::AllocatorStats stats = probe.allocator_stats();
    // Room for a bit less than 1 GiB more than the allocator holds now.
    const std::uint64_t room = 1 * GiB - 64 * MiB;
    const double fraction =
        static_cast<double>(stats.reserved + room) / static_cast<double>(driver.total_bytes);
    FractionReset reset{probe};
    probe.set_memory_fraction(fraction);

    const vg::MemoryInfo capped = probe.memory();
    EXPECT_LE(capped.total_bytes, static_cast<std::uint64_t>(fraction * driver.total_bytes) + 1);
    EXPECT_LE(capped.free_bytes, room + 8 * MiB);
    EXPECT_GE(capped.free_bytes + 8 * MiB, room);

    vg::ManualClock clock;
    vramguard_test::CapturedLog log;
    vg::Options options = vramguard_test::test_options(clock, log);
    vg::Guard<vt::Probe> guard(probe, options);
    const vg::Key key = vg::Key::of("gpu-encoder", {{"item", "64MiB"}});
    std::vector<std::int64_t> items(64);
    for (std::size_t i = 0; i < items.size(); ++i) items[i] = static_cast<std::int64_t>(i);
    std::vector<std::size_t> sizes;
    constexpr std::int64_t per_item = 16 * 1024 * 1024;  // int32 values: 64 MiB per item
    const std::vector<std::int64_t> results = guard.encode(key, items, [&](const auto& batch) {
        sizes.push_back(batch.size());
        const auto n = static_cast<std::int64_t>(batch.size());
        const ::torch::Tensor ids =
            ::torch::tensor(std::vector<std::int64_t>(batch.begin(), batch.end()))
                .to(::torch::kInt32);
        ::torch::Tensor big = ::torch::empty(
            {n, per_item},
            ::torch::TensorOptions().dtype(::torch::kInt32).device(::torch::kCUDA, 0));
        big.copy_(ids.to(::torch::kCUDA).view({n, 1}).expand({n, per_item}));
        big.mul_(3);
        const ::torch::Tensor last =
            big.select(1, per_item - 1).to(::torch::kCPU).to(::torch::kInt64);
        return std::vector<std::int64_t>(last.data_ptr<std::int64_t>(),
                                         last.data_ptr<std::int64_t>() + n);
    });

    ASSERT_EQ(results.size(), items.size());
    for (std::size_t i = 0; i < items.size(); ++i) EXPECT_EQ(results[i], items[i] * 3) << i;
    ASSERT_FALSE(sizes.empty());
    EXPECT_EQ(sizes.front(), 64u);
    for (std::size_t i = 1; i < sizes.size(); ++i) EXPECT_LE(sizes[i], 32u);
    EXPECT_GE(guard.stats().halvings, 3u);  // 64 (4 GiB) -> 32 -> 16 -> 8 (512 MiB) fits
    EXPECT_LE(guard.learned_batch_ceiling(key), 8u);
    EXPECT_TRUE(log.contains("CUDA out of memory")) << "the OOMs were not the caching allocator's";
    EXPECT_EQ(log.count(vg::Level::error), 0u);
}

TEST_F(TorchGpu, RealCudaOomIsAnAllocatorOomWithItsNumbers) {
    vt::Probe probe(0);
    probe.release_cached();
    const vt::AllocatorStats stats = probe.allocator_stats();
    const vg::MemoryInfo driver = driver_memory(0);
    FractionReset reset{probe};
    probe.set_memory_fraction(static_cast<double>(stats.reserved + 256 * MiB) /
                              static_cast<double>(driver.total_bytes));
    std::exception_ptr error;
    try {
        static_cast<void>(device_bytes(2 * GiB));
    } catch (...) {
        error = std::current_exception();
    }
    ASSERT_TRUE(error) << "2 GiB fit under a 256 MiB cap";
    EXPECT_EQ(vt::classify(error), vg::OomKind::allocator) << vg::describe(error);
    EXPECT_TRUE(vg::is_oom(error));
    const std::optional<vg::OomReport> report = vg::oom_report(error);
    ASSERT_TRUE(report.has_value()) << vg::describe(error);
    EXPECT_EQ(report->requested_bytes, 2 * GiB);
    EXPECT_TRUE(report->free_bytes.has_value()) << vg::describe(error);
}

TEST_F(TorchGpu, DeviceKeyMatchesTheCudaProbe) {
    vt::Probe probe(0);
    EXPECT_EQ(probe.device_key().rfind("cuda-", 0), 0u) << probe.device_key();
    EXPECT_EQ(probe.device_key(), vg::cuda::Probe(0).device_key());
    EXPECT_EQ(probe.device(), 0);
}

TEST_F(TorchGpu, MissingDeviceIndexIsDeviceUnavailable) {
    const auto count = static_cast<int>(::torch::cuda::device_count());
    EXPECT_THROW(vt::Probe probe(count), vg::DeviceUnavailable);
    EXPECT_THROW(vt::Probe probe(-1), vg::DeviceUnavailable);
}

#else  // no LibTorch, or a LibTorch without CUDA: say so, once.

TEST(TorchGpu, NeedsLibTorchWithCuda) {
#if !defined(VRAMGUARD_WITH_TORCH)
    GTEST_SKIP() << "no CUDA device for LibTorch: this build has no LibTorch (vramguard::torch)";
#else
    GTEST_SKIP() << "no CUDA device: LibTorch " TORCH_VERSION " was built without CUDA";
#endif
}

#endif
