// SPDX-License-Identifier: MIT
// Issue 24 item 4: a real LibTorch OOM on the CPU (c10::Error from DefaultCPUAllocator under a
// lowered RLIMIT_AS, in a forked child as in torch_oom_test.cpp) must give single-line WARN lines
// and a single-line what() on OomExhausted, while the original c10::Error, backtrace and all,
// stays nested in it for whoever wants it.
#include <vramguard/torch.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "fork_child.hpp"
#include "guard_fixture.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace vg = vramguard;
namespace vt = vramguard::torch;
using vg::MiB;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

// Leaves `headroom` bytes of address space above what the process maps now.
std::string limit_address_space_to(std::uint64_t headroom) {
    std::ifstream statm("/proc/self/statm");
    std::uint64_t pages = 0;
    statm >> pages;
    struct rlimit limit {};
    limit.rlim_cur = limit.rlim_max =
        static_cast<rlim_t>(pages * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE)) + headroom);
    if (::setrlimit(RLIMIT_AS, &limit) != 0)
        return std::string("setrlimit: ") + std::strerror(errno);
    return "";
}

// What is wrong with the error and the log of a guard that gave up on a real c10 OOM.
std::string check_single_line(const vg::OomExhausted& exhausted, const CapturedLog& log) {
    std::ostringstream failures;
    const std::string what = exhausted.what();
    if (what.find('\n') != std::string::npos) failures << "what() has a line break: " << what;
    if (what.find("frame #") != std::string::npos) failures << "what() has a backtrace; ";
    if (what.find("DefaultCPUAllocator") == std::string::npos)
        failures << "what() lost LibTorch's message: " << what << "; ";
    try {
        std::rethrow_if_nested(exhausted);
        failures << "nothing nested; ";
    } catch (const ::c10::Error& nested) {
        // The original is untouched: its what() still carries what the log lines leave out.
        if (std::string(nested.what()).find('\n') == std::string::npos)
            failures << "the nested c10::Error has no backtrace, so this test proves nothing; ";
        if (what.find(nested.what_without_backtrace()) == std::string::npos)
            failures << "what() does not quote the nested error; ";
    } catch (...) {
        failures << "the nested exception is not a c10::Error; ";
    }
    std::size_t warnings = 0;
    for (const auto& [level, line] : log.lines()) {
        if (level == vg::Level::warn) ++warnings;
        if (line.find('\n') != std::string::npos) failures << "multi-line log line: " << line;
    }
    if (warnings == 0) failures << "no WARN line; ";
    if (!log.contains("DefaultCPUAllocator")) failures << "the log lost LibTorch's message; ";
    return failures.str();
}

}  // namespace

TEST(TorchErrorText, LoadOomExhaustedIsOneLineAndNestsTheC10Error) {
    const std::string report = vramguard_test::run_in_child([]() -> std::string {
        ::at::set_num_threads(1);
        static_cast<void>(::torch::empty({1024}, ::torch::kByte));  // warm up before the limit
        if (std::string error = limit_address_space_to(256 * MiB); !error.empty()) return error;
        vt::HostProbe probe;
        vg::ManualClock clock;
        CapturedLog log;
        vg::Options options = test_options(clock, log);
        options.load_attempts = 2;
        vg::Guard<vt::HostProbe> guard(probe, options);
        const vg::Key key = vg::Key::of("too-big-model");
        try {
            // Declared small, so that admission lets it start; it then asks LibTorch for 1 GiB.
            guard.load(key, 16 * MiB,
                       [] { return ::torch::empty({1024 * 1024 * 1024}, ::torch::kByte); });
        } catch (const vg::OomExhausted& exhausted) {
            return check_single_line(exhausted, log);
        } catch (const std::exception& other) {
            return std::string("not OomExhausted: ") + other.what();
        }
        return "a 1 GiB load fitted in 256 MiB of address space";
    });
    EXPECT_EQ(report, "");
}

TEST(TorchErrorText, EncodeItemOomExhaustedIsOneLineAndNestsTheC10Error) {
    const std::string report = vramguard_test::run_in_child([]() -> std::string {
        ::at::set_num_threads(1);
        static_cast<void>(::torch::empty({1024}, ::torch::kByte));
        if (std::string error = limit_address_space_to(256 * MiB); !error.empty()) return error;
        vt::HostProbe probe;
        vg::ManualClock clock;
        CapturedLog log;
        vg::Options options = test_options(clock, log);
        options.single_item_attempts = 1;
        vg::Guard<vt::HostProbe> guard(probe, options);
        const std::vector<int> items{1, 2, 3, 4};
        try {
            guard.encode(vg::Key::of("one-huge-item"), items, [](const auto& batch) {
                std::vector<std::int64_t> sizes;
                for (int item : batch) {
                    // Item 3 needs 1 GiB on its own; the others a few KiB.
                    const std::int64_t bytes = item == 3 ? 1024ll * 1024 * 1024 : 4096;
                    sizes.push_back(::torch::empty({bytes}, ::torch::kByte).numel());
                }
                return sizes;
            });
        } catch (const vg::OomExhausted& exhausted) {
            if (exhausted.item_index() != std::optional<std::size_t>(2))
                return std::string("wrong item index; ") + check_single_line(exhausted, log);
            return check_single_line(exhausted, log);
        } catch (const std::exception& other) {
            return std::string("not OomExhausted: ") + other.what();
        }
        return "a 1 GiB item fitted in 256 MiB of address space";
    });
    EXPECT_EQ(report, "");
}
