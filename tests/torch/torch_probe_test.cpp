// SPDX-License-Identifier: MIT
// The LibTorch backend without a GPU: what torch::Probe says where there is no CUDA device, which
// c10 errors are out-of-memory errors (real ones from LibTorch's CPU allocator, constructed ones
// in every historical CUDA format), the numbers a guard reads out of them, and the host probe.
#include <vramguard/torch.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "guard_fixture.hpp"

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace vg = vramguard;
namespace vt = vramguard::torch;
using namespace vramguard::literals;
using vg::GiB;
using vg::MiB;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

// The caching allocator's messages, as LibTorch 1.13 and 2.x word them.
const std::string cuda_oom_1_13 =
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 10.00 GiB total capacity; 9.00 GiB "
    "already allocated; 512.00 MiB free; 9.20 GiB reserved in total by PyTorch) If reserved "
    "memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See "
    "documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF";
const std::string cuda_oom_2_x =
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 10.00 GiB of "
    "which 512.00 MiB is free. Including non-PyTorch memory, this process has 9.50 GiB memory in "
    "use. Of the allocated memory 9.00 GiB is allocated by PyTorch, and 200.00 MiB is reserved by "
    "PyTorch but unallocated.";

// Thrown the way LibTorch throws them, so what() carries c10's backtrace as it does in 1.13.
std::exception_ptr c10_oom(const std::string& message) {
    try {
        C10_THROW_ERROR(OutOfMemoryError, message);
    } catch (...) {
        return std::current_exception();
    }
    return nullptr;
}
std::exception_ptr c10_error(const std::string& message) {
    try {
        TORCH_CHECK(false, message);
    } catch (...) {
        return std::current_exception();
    }
    return nullptr;
}

template <class F>
std::exception_ptr error_of(F&& f) {
    try {
        f();
    } catch (...) {
        return std::current_exception();
    }
    return nullptr;
}

}  // namespace

TEST(TorchProbe, SaysWhyThereIsNoCudaDevice) {
    if (VRAMGUARD_TORCH_CUDA && ::torch::cuda::is_available())
        GTEST_SKIP() << "a CUDA device is present: tests/gpu/torch_gpu_test.cpp covers the probe";
    try {
        vt::Probe probe(0);
        FAIL() << "constructed a CUDA probe without a CUDA device";
    } catch (const vg::DeviceUnavailable& e) {
        const std::string message = e.what();
        EXPECT_NE(message.find("vramguard::torch::Probe"), std::string::npos) << message;
        if (VRAMGUARD_TORCH_CUDA) {
            EXPECT_NE(message.find("torch::cuda::is_available() is false"), std::string::npos)
                << message;
        } else {
            EXPECT_NE(message.find("built without CUDA"), std::string::npos) << message;
            EXPECT_NE(message.find("HostProbe"), std::string::npos) << message;
        }
    }
}

TEST(TorchClassify, OutOfMemoryErrorIsAnAllocatorOom) {
    for (const std::string& message : {cuda_oom_1_13, cuda_oom_2_x}) {
        const std::exception_ptr error = c10_oom(message);
        ASSERT_TRUE(error);
        EXPECT_EQ(vt::classify(error), vg::OomKind::allocator);
        EXPECT_EQ(vg::classify_oom(error), vg::OomKind::allocator);
        EXPECT_TRUE(vg::is_oom(error));
    }
    // The type decides even when the message is cut short.
    EXPECT_EQ(vt::classify(c10_oom("")), vg::OomKind::allocator);
}

TEST(TorchClassify, PlainC10ErrorWithAnOomMessageIsAnAllocatorOom) {
    // LibTorch before 1.13 raised every allocator OOM as a plain c10::Error; TorchScript may
    // re-raise one that way.
    EXPECT_EQ(vt::classify(c10_error(cuda_oom_1_13)), vg::OomKind::allocator);
    EXPECT_EQ(vt::classify(c10_error(cuda_oom_2_x)), vg::OomKind::allocator);
    EXPECT_EQ(vt::classify(c10_error("DefaultCPUAllocator: not enough memory: you tried to "
                                     "allocate 8000000000 bytes.")),
              vg::OomKind::allocator);
}

TEST(TorchClassify, RealCpuAllocatorFailureIsAnAllocatorOomWithItsSize) {
    // 1 PiB: more than any x86-64 or arm64 address space, so it fails for real everywhere.
    constexpr std::int64_t bytes = std::int64_t{1} << 50;
    const std::exception_ptr error =
        error_of([] { static_cast<void>(::torch::empty({bytes}, ::torch::kByte)); });
    ASSERT_TRUE(error) << "allocating 1 PiB succeeded";
    EXPECT_EQ(vt::classify(error), vg::OomKind::allocator) << vg::describe(error);
    EXPECT_TRUE(vg::is_oom(error));
    const std::optional<vg::OomReport> report = vg::oom_report(error);
    ASSERT_TRUE(report.has_value()) << vg::describe(error);
    EXPECT_EQ(report->requested_bytes, static_cast<std::uint64_t>(bytes));
}

TEST(TorchClassify, DriverLevelCudaErrorIsClassifiedApart) {
    const std::string driver =
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
        "other API call, so the stacktrace below might be incorrect.";
    EXPECT_EQ(vt::classify(c10_error(driver)), vg::OomKind::driver);
    EXPECT_EQ(vt::classify(c10_oom(driver)), vg::OomKind::driver);
    EXPECT_EQ(vg::classify_oom(c10_error(driver)), vg::OomKind::driver);
}

TEST(TorchClassify, OtherErrorsAreNotOoms) {
    // A real shape error from LibTorch.
    const std::exception_ptr shape = error_of([] {
        static_cast<void>(::torch::ones({2, 3}).matmul(::torch::ones({2, 3})));
    });
    ASSERT_TRUE(shape);
    EXPECT_EQ(vt::classify(shape), vg::OomKind::none) << vg::describe(shape);
    EXPECT_FALSE(vg::is_oom(shape));
    // A real index error (c10::IndexError, a c10::Error subclass).
    const std::exception_ptr index =
        error_of([] { static_cast<void>(::torch::ones({2}).select(0, 5)); });
    ASSERT_TRUE(index);
    EXPECT_EQ(vt::classify(index), vg::OomKind::none) << vg::describe(index);
    EXPECT_FALSE(vg::is_oom(index));
    // Words near the subject are not enough.
    EXPECT_EQ(vt::classify(c10_error("Tried to allocate a tensor with a negative dimension")),
              vg::OomKind::none);
    EXPECT_EQ(vt::classify(c10_error("memory format not supported")), vg::OomKind::none);
    // Not c10's at all: left to the other classifiers.
    EXPECT_EQ(vt::classify(std::make_exception_ptr(std::runtime_error("CUDA out of memory"))),
              vg::OomKind::none);
    EXPECT_EQ(vt::classify(std::make_exception_ptr(std::bad_alloc())), vg::OomKind::none);
    EXPECT_EQ(vt::classify(nullptr), vg::OomKind::none);
    EXPECT_TRUE(vt::torch_oom_classifier_registered);
}

TEST(TorchOomReport, NumbersAreReadDespiteTheBacktrace) {
    for (const std::string& message : {cuda_oom_1_13, cuda_oom_2_x}) {
        const std::exception_ptr error = c10_oom(message);
        const std::optional<vg::OomReport> report = vg::oom_report(error);
        ASSERT_TRUE(report.has_value()) << message;
        EXPECT_EQ(report->requested_bytes, 2 * GiB);
        EXPECT_EQ(report->free_bytes.value_or(0), 512 * MiB);
        EXPECT_EQ(report->total_bytes.value_or(0), 10 * GiB);
    }
}

// The CUDA OOM's own numbers ("tried to allocate 2 GiB ... 512 MiB free") tell the guard that a
// quarter of the batch fits: it goes there at once instead of halving twice.
class TorchGuardOomMessage : public ::testing::TestWithParam<std::string> {};

TEST_P(TorchGuardOomMessage, NextBatchIsSmallerThanHalf) {
    vg::SimulatedDevice device(10_GiB);
    device.set_external_usage(10_GiB - 512_MiB);  // the free memory the message reports
    vg::ManualClock clock;
    CapturedLog log;
    vg::Guard<vg::SimulatedDevice> guard(device, test_options(clock, log));
    std::vector<int> items(64);
    for (int i = 0; i < 64; ++i) items[static_cast<std::size_t>(i)] = i;
    std::vector<std::size_t> sizes;
    const auto results = guard.encode(vg::Key::of("encoder", {}), items, [&](const auto& batch) {
        sizes.push_back(batch.size());
        // 32 MiB per item: 64 items asked for 2 GiB, 16 items fit in 512 MiB.
        if (batch.size() > 16) C10_THROW_ERROR(OutOfMemoryError, GetParam());
        std::vector<int> out;
        for (int item : batch) out.push_back(item * 3);
        return out;
    });
    ASSERT_EQ(results.size(), 64u);
    for (int i = 0; i < 64; ++i) EXPECT_EQ(results[static_cast<std::size_t>(i)], i * 3);
    EXPECT_EQ(sizes, (std::vector<std::size_t>{64, 16, 16, 16, 16}));
    EXPECT_EQ(guard.stats().ooms, 1u);
    EXPECT_EQ(guard.stats().halvings, 1u);
    EXPECT_EQ(guard.learned_batch_ceiling(vg::Key::of("encoder", {})), 16u);
}

INSTANTIATE_TEST_SUITE_P(Formats, TorchGuardOomMessage,
                         ::testing::Values(cuda_oom_1_13, cuda_oom_2_x),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                             return info.index == 0 ? std::string("LibTorch1_13")
                                                    : std::string("LibTorch2");
                         });

TEST(TorchHostProbe, ReportsTheHostAndItsPeak) {
    vt::HostProbe probe;
    const vg::MemoryInfo memory = probe.memory();
    EXPECT_GT(memory.total_bytes, 0u);
    EXPECT_GT(memory.free_bytes, 0u);
    EXPECT_LE(memory.free_bytes, memory.total_bytes);
    EXPECT_EQ(probe.device_key(), "host");
    probe.release_cached();
    if (!probe.peak_tracking()) GTEST_SKIP() << "/proc/self/clear_refs cannot reset VmHWM here";

    probe.reset_peak();
    const std::uint64_t baseline = probe.peak_bytes();
    EXPECT_GT(baseline, 0u);
    {
        // Written, so resident: 64 MiB.
        ::torch::Tensor tensor = ::torch::ones({static_cast<std::int64_t>(64 * MiB / 4)});
        EXPECT_GE(probe.peak_bytes(), baseline + 60 * MiB);
    }
    const std::uint64_t peak = probe.peak_bytes();
    probe.reset_peak();  // the tensor is gone: the new peak is today's resident set
    EXPECT_LT(probe.peak_bytes() + 32 * MiB, peak);
}

TEST(TorchHostProbe, GuardRecordsWhatAnEncodeCost) {
    vt::HostProbe probe;
    if (!probe.peak_tracking()) GTEST_SKIP() << "/proc/self/clear_refs cannot reset VmHWM here";
    vg::ManualClock clock;
    CapturedLog log;
    vg::Guard<vt::HostProbe> guard(probe, test_options(clock, log));
    const vg::Key key = vg::Key::of("cpu-encoder", {{"dim", "1024"}});
    std::vector<int> items(8, 1);
    const auto results = guard.encode(key, items, [](const auto& batch) {
        // 8 MiB of activations per item, written.
        ::torch::Tensor activations =
            ::torch::ones({static_cast<std::int64_t>(batch.size()), 2 * 1024 * 1024});
        std::vector<float> out;
        for (std::size_t i = 0; i < batch.size(); ++i)
            out.push_back(activations[static_cast<std::int64_t>(i)].sum().item<float>());
        return out;
    });
    ASSERT_EQ(results.size(), 8u);
    EXPECT_EQ(results[0], 2.0f * 1024 * 1024);
    EXPECT_GE(guard.profiles().get(key).peak_bytes, 60 * MiB);
}
