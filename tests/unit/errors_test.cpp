// SPDX-License-Identifier: MIT
// OOM classification and the OOM-message parser, on the messages PyTorch and CUDA really print.
#include <vramguard/errors.hpp>

#include <gtest/gtest.h>

#include <new>
#include <stdexcept>
#include <string>

using namespace vramguard;
using namespace vramguard::literals;

namespace {

template <class E>
std::exception_ptr thrown(E error) {
    try {
        throw error;
    } catch (...) {
        return std::current_exception();
    }
}

// PyTorch <= 2.0 (and 1.13, Debian's libtorch): parenthesised, semicolon-separated.
const char* const kOldCudaOom =
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity; 14.56 GiB "
    "already allocated; 3.75 MiB free; 14.73 GiB reserved in total by PyTorch) If reserved memory "
    "is >> allocated memory try setting max_split_size_mb to avoid fragmentation.";
// The same format with the historical typo.
const char* const kTypoCudaOom =
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 7.79 GiB total capacty; 5.12 GiB "
    "already "
    "allocated; 1.25 GiB free; 5.50 GiB reserved in total by PyTorch)";
// PyTorch >= 2.1.
const char* const kNewCudaOom =
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB of "
    "which 12.75 MiB is free. Process 1234 has 79.13 GiB memory in use. Of the allocated memory "
    "78.2 GiB is allocated by PyTorch, and 300 MiB is reserved by PyTorch but unallocated.";
// The cudaMallocAsync backend (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync), also thrown as
// c10::OutOfMemoryError but with labelled lines instead of "Tried to allocate".
const char* const kAsyncCudaOom =
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 22.43 GiB\n"
    "Requested               : 4.07 GiB\n"
    "Device limit            : 16.00 GiB\n"
    "Free (according to CUDA): 0 bytes\n"
    "PyTorch limit (set by user-supplied memory fraction)\n"
    "                        : 17179869184.00 GiB";
const char* const kCpuOom =
    "[enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 8000000000 bytes. Error code 12 (Cannot allocate memory)";

TEST(ParseOomMessage, OldFormat) {
    const auto report = parse_oom_message(kOldCudaOom);
    ASSERT_TRUE(report);
    EXPECT_EQ(report->requested_bytes, 20_MiB);
    EXPECT_EQ(report->free_bytes, 3932160u);  // 3.75 MiB
    EXPECT_EQ(report->total_bytes, static_cast<std::uint64_t>(15.78 * GiB + 0.5));
}

TEST(ParseOomMessage, HistoricalTypoCapacty) {
    const auto report = parse_oom_message(kTypoCudaOom);
    ASSERT_TRUE(report);
    EXPECT_EQ(report->requested_bytes, 2_GiB);
    EXPECT_EQ(report->free_bytes, 1_GiB + 256_MiB);
    EXPECT_EQ(report->total_bytes, static_cast<std::uint64_t>(7.79 * GiB + 0.5));
}

TEST(ParseOomMessage, NewFormat) {
    const auto report = parse_oom_message(kNewCudaOom);
    ASSERT_TRUE(report);
    EXPECT_EQ(report->requested_bytes, 20_MiB);
    EXPECT_EQ(report->free_bytes, static_cast<std::uint64_t>(12.75 * MiB));
    EXPECT_EQ(report->total_bytes, static_cast<std::uint64_t>(79.15 * GiB + 0.5));
}

TEST(ParseOomMessage, CpuAllocatorBytes) {
    const auto report = parse_oom_message(kCpuOom);
    ASSERT_TRUE(report);
    EXPECT_EQ(report->requested_bytes, 8000000000u);
    EXPECT_FALSE(report->free_bytes);
    EXPECT_FALSE(report->total_bytes);
}

TEST(ParseOomMessage, OldFormatWithMemoryFractionAllowance) {
    // Under a memory fraction, PyTorch <= 2.0 adds "X allowed;" after the free figure.
    const auto report = parse_oom_message(
        "CUDA out of memory. Tried to allocate 512 bytes (GPU 0; 79.15 GiB total capacity; 19.50 "
        "GiB already allocated; 58.00 GiB free; 19.79 GiB allowed; 19.75 GiB reserved in total by "
        "PyTorch)");
    ASSERT_TRUE(report);
    EXPECT_EQ(report->requested_bytes, 512u);  // format_size writes small sizes in bytes
    EXPECT_EQ(report->free_bytes, 58_GiB);
    EXPECT_EQ(report->total_bytes, static_cast<std::uint64_t>(79.15 * GiB + 0.5));
}

TEST(ParseOomMessage, AsyncAllocatorLabelledLines) {
    const auto report = parse_oom_message(kAsyncCudaOom);
    ASSERT_TRUE(report);
    EXPECT_EQ(report->requested_bytes, static_cast<std::uint64_t>(4.07 * GiB + 0.5));
    EXPECT_EQ(report->free_bytes, 0u);
    EXPECT_EQ(report->total_bytes, 16_GiB);
    // Cut before the free line: what is there is kept.
    std::string text = kAsyncCudaOom;
    const auto cut = parse_oom_message(text.substr(0, text.find("Device limit")));
    ASSERT_TRUE(cut);
    EXPECT_FALSE(cut->free_bytes);
    EXPECT_FALSE(cut->total_bytes);
    // Labels without the allocator's sentence, or without a size, are no report.
    EXPECT_FALSE(parse_oom_message("Requested               : 4.07 GiB"));
    EXPECT_FALSE(parse_oom_message("would exceed allowed memory. Requested : lots"));
    EXPECT_FALSE(parse_oom_message("would exceed allowed memory. Requested 4 GiB"));
}

TEST(ParseOomMessage, CutShortMessagesKeepWhatIsThere) {
    std::string old = kOldCudaOom;
    const auto cut = parse_oom_message(old.substr(0, old.find("3.75")));
    ASSERT_TRUE(cut);
    EXPECT_EQ(cut->requested_bytes, 20_MiB);
    EXPECT_FALSE(cut->free_bytes);
    EXPECT_TRUE(cut->total_bytes);
    EXPECT_FALSE(parse_oom_message("CUDA out of memory. Tried to allocate"));
    EXPECT_FALSE(parse_oom_message("CUDA out of memory. Tried to allocate 20.00"));
    EXPECT_FALSE(parse_oom_message(""));
    EXPECT_FALSE(parse_oom_message("tried to allocate lots of bytes"));
}

TEST(ParseOomMessage, AbsurdNumbersDoNotOverflow) {
    EXPECT_FALSE(parse_oom_message("Tried to allocate 99999999999999999999999 GiB"));
    const auto huge = parse_oom_message("Tried to allocate 15 EiB");  // unknown unit: nothing
    EXPECT_FALSE(huge);
}

TEST(ClassifyOomMessage, AllocatorDriverAndNone) {
    EXPECT_EQ(classify_oom_message(kOldCudaOom), OomKind::allocator);
    EXPECT_EQ(classify_oom_message(kNewCudaOom), OomKind::allocator);
    EXPECT_EQ(classify_oom_message(kCpuOom), OomKind::allocator);
    EXPECT_EQ(classify_oom_message(kAsyncCudaOom), OomKind::allocator);
    EXPECT_EQ(classify_oom_message(
                  "CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                  "reported"),
              OomKind::driver);
    EXPECT_EQ(classify_oom_message("cudaMalloc failed: cudaErrorMemoryAllocation"),
              OomKind::driver);
    EXPECT_EQ(classify_oom_message("file not found"), OomKind::none);
    EXPECT_EQ(classify_oom_message("out of memory"), OomKind::none);  // too vague to retry on
    EXPECT_EQ(classify_oom_message("shape mismatch: tried to allocate [3, 4]"), OomKind::none);
}

TEST(ClassifyOom, ByTypeFirstThenMessage) {
    EXPECT_EQ(classify_oom(thrown(OutOfMemory("anything at all"))), OomKind::allocator);
    EXPECT_EQ(classify_oom(thrown(OutOfMemory("x", OomKind::driver))), OomKind::driver);
    EXPECT_EQ(classify_oom(thrown(std::bad_alloc())), OomKind::allocator);
    EXPECT_EQ(classify_oom(thrown(std::runtime_error(kNewCudaOom))), OomKind::allocator);
    EXPECT_EQ(classify_oom(thrown(std::runtime_error("bad weights"))), OomKind::none);
    EXPECT_EQ(classify_oom(thrown(42)), OomKind::none);
    EXPECT_EQ(classify_oom(nullptr), OomKind::none);
    EXPECT_TRUE(is_oom(thrown(OutOfMemory("x"))));
    EXPECT_FALSE(is_oom(thrown(std::logic_error("x"))));
}

struct VendorOom {
    int code;
};
OomKind classify_vendor(const std::exception_ptr& error) {
    try {
        std::rethrow_exception(error);
    } catch (const VendorOom& e) {
        return e.code == 2 ? OomKind::allocator : OomKind::none;
    } catch (...) {
        return OomKind::none;
    }
}

TEST(ClassifyOom, RegisteredClassifiersExtendIt) {
    EXPECT_EQ(classify_oom(thrown(VendorOom{2})), OomKind::none);
    EXPECT_TRUE(register_oom_classifier(&classify_vendor));
    EXPECT_TRUE(register_oom_classifier(&classify_vendor));  // idempotent
    EXPECT_EQ(classify_oom(thrown(VendorOom{2})), OomKind::allocator);
    EXPECT_EQ(classify_oom(thrown(VendorOom{3})), OomKind::none);
}

TEST(OomReport, FromOwnReportOrFromTheMessage) {
    const auto own = oom_report(
        thrown(OutOfMemory("no numbers here", OomKind::allocator, OomReport{1_GiB, 2_GiB, 8_GiB})));
    ASSERT_TRUE(own);
    EXPECT_EQ(own->requested_bytes, 1_GiB);
    const auto parsed = oom_report(thrown(std::runtime_error(kNewCudaOom)));
    ASSERT_TRUE(parsed);
    EXPECT_EQ(parsed->requested_bytes, 20_MiB);
    EXPECT_FALSE(oom_report(thrown(7)));
}

TEST(Describe, OneLineWithoutC10sBacktraceAndBounded) {
    EXPECT_EQ(describe(thrown(std::runtime_error(
                  "CUDA out of memory. Tried to allocate 2.00 MiB\nException raised from malloc at "
                  "CUDACachingAllocator.cpp:913 (most recent call first):\nframe #0: ..."))),
              "CUDA out of memory. Tried to allocate 2.00 MiB");
    EXPECT_EQ(describe(thrown(std::runtime_error(std::string(1000, 'x')))).size(), 403u);
    EXPECT_EQ(describe(thrown(3)), "unknown exception");
}

TEST(Describe, FoldsEveryLineBreakSoALogLineStaysOneLine) {
    // c10's enforce failures append "frame #N" lines without an "Exception raised from" header.
    EXPECT_EQ(describe(thrown(std::runtime_error(
                  "DefaultCPUAllocator: not enough memory\n  while loading\r\n\tframe #0: x\n"))),
              "DefaultCPUAllocator: not enough memory while loading frame #0: x");
    EXPECT_EQ(describe(std::exception_ptr()), "no exception");
}

TEST(Describe, UsesARegisteredTextReaderBeforeWhat) {
    struct WithBacktrace : std::runtime_error {
        WithBacktrace() : std::runtime_error("out of memory\nframe #0: f\nframe #1: g") {}
        const char* without_backtrace() const noexcept { return "out of memory"; }
    };
    const std::exception_ptr error = thrown(WithBacktrace());
    EXPECT_EQ(describe(error), "out of memory frame #0: f frame #1: g") << "before registering";
    const ErrorTextReader reader = [](const std::exception_ptr& e) -> const char* {
        try {
            std::rethrow_exception(e);
        } catch (const WithBacktrace& mine) {
            return mine.without_backtrace();
        } catch (...) {
            return nullptr;
        }
    };
    EXPECT_TRUE(register_error_text_reader(reader));
    EXPECT_TRUE(register_error_text_reader(reader)) << "idempotent";
    EXPECT_EQ(error_text(error), "out of memory");
    EXPECT_EQ(describe(error), "out of memory");
    EXPECT_EQ(describe(thrown(std::runtime_error("other"))), "other") << "not its type: what()";
}

TEST(InsufficientMemory, CarriesItsNumbers) {
    const InsufficientMemory e(6_GiB, 4_GiB, 80_GiB, "llm{size=7b} #0011223344556677",
                               std::chrono::milliseconds(1500), "needs more");
    EXPECT_EQ(e.required(), 6_GiB);
    EXPECT_EQ(e.available(), 4_GiB);
    EXPECT_EQ(e.total(), 80_GiB);
    EXPECT_EQ(e.key(), "llm{size=7b} #0011223344556677");
    EXPECT_EQ(e.retry_after(), std::chrono::milliseconds(1500));
    EXPECT_STREQ(e.what(), "needs more");
    EXPECT_FALSE(e.can_never_fit()) << "unless said, the work may fit later";
    const InsufficientMemory never(90_GiB, 80_GiB, 80_GiB, "llm{size=70b} #0011223344556677",
                                   std::chrono::milliseconds(1500), "too big", true);
    EXPECT_TRUE(never.can_never_fit());
}

TEST(FormatBytes, BinaryUnitsWithTwoDecimals) {
    EXPECT_EQ(format_bytes(0), "0 B");
    EXPECT_EQ(format_bytes(1023), "1023 B");
    EXPECT_EQ(format_bytes(1024), "1.00 KiB");
    EXPECT_EQ(format_bytes(1536), "1.50 KiB");
    EXPECT_EQ(format_bytes(6_GiB), "6.00 GiB");
    EXPECT_EQ(format_bytes(std::numeric_limits<std::uint64_t>::max()), "16.00 EiB");
    EXPECT_EQ(MemoryInfo({2_GiB, 8_GiB}).used_bytes(), 6_GiB);
    EXPECT_DOUBLE_EQ(MemoryInfo({2_GiB, 8_GiB}).usage(), 0.75);
    EXPECT_DOUBLE_EQ(MemoryInfo({}).usage(), 0.0);
}

}  // namespace
