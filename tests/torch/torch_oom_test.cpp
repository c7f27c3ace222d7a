// SPDX-License-Identifier: MIT
// Real out-of-memory errors without a GPU: in a forked child, setrlimit(RLIMIT_AS) leaves a few
// hundred MiB of address space, and LibTorch's CPU allocator really fails (c10::Error from
// DefaultCPUAllocator). Guard<torch::HostProbe> then has to do for real what the simulated tests
// check: halve an encode and finish every item with the same bits as one item at a time, and
// retry a load once memory has been released.
//
// Each test runs in a child process (the limit must not reach the test runner) and reports a
// failure as text through a pipe. All LibTorch work happens in the children: the parent never
// starts LibTorch's thread pools, which a fork would inherit in a broken state.
#include <vramguard/torch.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "fork_child.hpp"
#include "guard_fixture.hpp"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace vg = vramguard;
namespace vt = vramguard::torch;
using namespace std::chrono_literals;
using vg::MiB;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

std::uint64_t virtual_size() {
    std::ifstream statm("/proc/self/statm");
    std::uint64_t pages = 0;
    statm >> pages;
    return pages * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Leaves `headroom` bytes of address space above what the process maps now.
std::string limit_address_space(std::uint64_t headroom) {
    struct rlimit limit {};
    limit.rlim_cur = limit.rlim_max = static_cast<rlim_t>(virtual_size() + headroom);
    if (::setrlimit(RLIMIT_AS, &limit) != 0)
        return std::string("setrlimit: ") + std::strerror(errno);
    return "";
}

std::string log_text(const CapturedLog& log) {
    std::string text;
    for (const auto& line : log.lines())
        text += "  [" + std::to_string(static_cast<int>(line.first)) + "] " + line.second + "\n";
    return text;
}

// A small encoder with one big intermediate: a linear layer computed the memory-hungry way,
// [batch, seq, dim, 1] x [dim, hidden] -> [batch, seq, dim, hidden] summed over dim, then GELU and
// a mean over the sequence. 8 MiB per item at seq 32, dim 64, hidden 1024. Written this way (no
// GEMM) its results do not depend on the batch size: a BLAS may block, vectorise or align a
// matrix product differently for every batch size, so bit-for-bit equality with the single-item
// results would test the BLAS, not the guard. With one thread, elementwise ops and reductions
// over a fixed dimension compute every item's numbers in the same order in any batch.
struct Encoder {
    static constexpr std::int64_t seq = 32, dim = 64, hidden = 1024;
    ::torch::Tensor weight = ::torch::randn({hidden, dim});
    ::torch::Tensor bias = ::torch::randn({hidden});

    ::torch::Tensor operator()(const ::torch::Tensor& x) const {
        const ::torch::Tensor wide = x.unsqueeze(-1) * weight.t();
        return ::torch::gelu(wide.sum(-2) + bias).mean(1);
    }
};

}  // namespace

TEST(TorchRealOom, EncodeHalvesUnderRlimitAndMatchesSingleItemResultsBitForBit) {
    const std::string report = vramguard_test::run_in_child([]() -> std::string {
        ::at::set_num_threads(1);
        // oneDNN JIT-compiles a kernel for every new shape (GELU goes through it), and its code
        // generator crashes instead of throwing when mmap fails under RLIMIT_AS. This test is
        // about LibTorch's allocator, so oneDNN stays out.
        ::at::globalContext().setUserEnabledMkldnn(false);
        ::torch::manual_seed(7);
        const Encoder encoder;
        constexpr int count = 48;  // 384 MiB at once: more than the 256 MiB the limit leaves
        std::vector<::torch::Tensor> items;
        for (int i = 0; i < count; ++i)
            items.push_back(::torch::randn({Encoder::seq, Encoder::dim}));
        // The unguarded single-item results, before any limit (this also warms up every op, so
        // nothing lazily maps memory under the limit).
        std::vector<::torch::Tensor> expected;
        for (const ::torch::Tensor& item : items)
            expected.push_back(encoder(item.unsqueeze(0))[0].clone());

        if (std::string error = limit_address_space(256 * MiB); !error.empty()) return error;
        vt::HostProbe probe;
        vg::ManualClock clock;
        CapturedLog log;
        vg::Guard<vt::HostProbe> guard(probe, test_options(clock, log));
        const vg::Key key = vg::Key::of("cpu-encoder", {{"hidden", "1024"}});
        std::vector<std::size_t> sizes;
        const std::vector<::torch::Tensor> results =
            guard.encode(key, items, [&](const auto& batch) {
                sizes.push_back(batch.size());
                const ::torch::Tensor out = encoder(
                    ::torch::stack(std::vector<::torch::Tensor>(batch.begin(), batch.end())));
                std::vector<::torch::Tensor> per_item;
                for (std::int64_t i = 0; i < out.size(0); ++i) per_item.push_back(out[i].clone());
                return per_item;
            });

        std::ostringstream failures;
        if (results.size() != expected.size())
            failures << results.size() << " results for " << expected.size() << " items; ";
        for (std::size_t i = 0; i < std::min(results.size(), expected.size()); ++i)
            if (!::torch::equal(results[i], expected[i])) failures << "item " << i << " differs; ";
        const vg::Stats stats = guard.stats();
        if (sizes.empty() || sizes.front() != count) failures << "did not start with every item; ";
        if (stats.ooms < 1 || stats.halvings < 1) failures << "no real OOM, no halving; ";
        for (std::size_t i = 1; i < sizes.size(); ++i)
            if (sizes[i] > count / 2) failures << "a retry above half; ";
        if (!log.contains("DefaultCPUAllocator"))
            failures << "the OOM did not come from LibTorch's CPU allocator; ";
        if (log.count(vg::Level::error) != 0) failures << "logged at ERROR; ";
        const std::uint64_t ceiling = guard.learned_batch_ceiling(key);
        if (ceiling == 0 || ceiling > count / 2) failures << "learned ceiling " << ceiling << "; ";
        if (failures.str().empty()) return "";
        std::ostringstream out;
        out << failures.str() << "\nbatch sizes:";
        for (std::size_t size : sizes) out << ' ' << size;
        out << "\nlog:\n" << log_text(log);
        return out.str();
    });
    EXPECT_EQ(report, "");
}

TEST(TorchRealOom, LoadFailsForRealThenSucceedsOnceMemoryIsReleased) {
    const std::string report = vramguard_test::run_in_child([]() -> std::string {
        ::at::set_num_threads(1);
        // Warm up the module code path before the limit.
        static_cast<void>(::torch::nn::Linear(::torch::nn::LinearOptions(16, 16)));

        if (std::string error = limit_address_space(256 * MiB); !error.empty()) return error;
        vt::HostProbe probe;
        vg::ManualClock clock;
        CapturedLog log;
        vg::Options options = test_options(clock, log);
        options.safety_margin = 0.01;  // the total is the whole address-space limit
        vg::Guard<vt::HostProbe> guard(probe, options);

        // Something else in the process takes 160 MiB after the load was admitted (the race every
        // admission check has), and gives it back a second later.
        ::torch::Tensor other_work;
        clock.after(1s, [&] { other_work = ::torch::Tensor(); });
        int attempts = 0;
        const vg::Key key = vg::Key::of("cpu-model", {{"shape", "4096x8192"}});
        constexpr std::uint64_t model_bytes = 4096ull * 8192 * sizeof(float);  // 128 MiB
        ::torch::nn::Linear model = guard.load(key, model_bytes, [&] {
            if (++attempts == 1) other_work = ::torch::empty({160 * 1024 * 1024}, ::torch::kByte);
            return ::torch::nn::Linear(::torch::nn::LinearOptions(8192, 4096));
        });

        std::ostringstream failures;
        const vg::Stats stats = guard.stats();
        if (attempts != 2) failures << attempts << " attempts, not 2; ";
        if (stats.ooms != 1 || stats.retries != 1) failures << "ooms/retries not 1/1; ";
        if (stats.waits < 1) failures << "did not wait for memory; ";
        if (clock.slept() < 1s || clock.slept() > 2s) failures << "waited the wrong time; ";
        if (model->weight.size(0) != 4096 || model->weight.size(1) != 8192)
            failures << "wrong model; ";
        if (!log.contains("DefaultCPUAllocator"))
            failures << "the OOM did not come from LibTorch's CPU allocator; ";
        if (!log.contains("out of memory on attempt 1")) failures << "no WARN for attempt 1; ";
        if (log.count(vg::Level::error) != 0) failures << "logged at ERROR; ";
        if (probe.peak_tracking() && guard.profiles().get(key).peak_bytes < 100 * MiB)
            failures << "recorded peak " << guard.profiles().get(key).peak_bytes
                     << " for 128 MiB; ";
        if (failures.str().empty()) return "";
        return failures.str() + "\nlog:\n" + log_text(log);
    });
    EXPECT_EQ(report, "");
}
