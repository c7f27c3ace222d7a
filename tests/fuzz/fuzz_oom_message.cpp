// SPDX-License-Identifier: MIT
// libFuzzer target: the OOM-message parser and classifier, which read text that LibTorch, CUDA or
// any caller's exception put in what() (it may be cut short, in any historical format, or be
// arbitrary bytes from an unrelated error).
//
// Checks, besides "no crash, no sanitizer report":
//  - parse_oom_message finds a report only where the text says "tried to allocate" or, in the
//    cudaMallocAsync format, "would exceed allowed memory" and "requested" (any case);
//  - every byte count it returns is below 1.8e19 (the parser's own overflow bound);
//  - classify_oom_message agrees with classify_oom/is_oom on a std::runtime_error carrying the
//    same text, and oom_report on it equals parse_oom_message;
//  - detail::parse_size never reads past its input and reports a consumed length within it, and
//    parse_size_before accepts any end position inside the text.
#include <vramguard/errors.hpp>

#include "fuzz_check.hpp"

#include <algorithm>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

constexpr double byte_bound = 1.8e19;

bool plausible(std::uint64_t bytes) { return static_cast<double>(bytes) < byte_bound; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    namespace vg = vramguard;
    // A heap copy of exactly `size` bytes with no terminator: ASan catches any read past the end.
    const std::string_view text(reinterpret_cast<const char*>(data), size);

    const auto report = vg::parse_oom_message(text);
    if (report) {
        FUZZ_CHECK(vg::detail::contains_nocase(text, "tried to allocate") ||
                   (vg::detail::contains_nocase(text, "would exceed allowed memory") &&
                    vg::detail::contains_nocase(text, "requested")));
        FUZZ_CHECK(plausible(report->requested_bytes));
        if (report->free_bytes) FUZZ_CHECK(plausible(*report->free_bytes));
        if (report->total_bytes) FUZZ_CHECK(plausible(*report->total_bytes));
    }

    const vg::OomKind kind = vg::classify_oom_message(text);
    FUZZ_CHECK(kind == vg::OomKind::none || kind == vg::OomKind::allocator ||
               kind == vg::OomKind::driver);
    if (kind == vg::OomKind::none) {
        FUZZ_CHECK(!vg::detail::contains_nocase(text, "CUDA out of memory"));
        FUZZ_CHECK(!vg::detail::contains_nocase(text, "CUDA error: out of memory"));
    }

    // The same text as an exception nobody registered a classifier for. (what() stops at a NUL,
    // so the exception's view of the text is compared against its own what().)
    const std::string owned(text);
    const std::runtime_error thrown(owned);
    const std::exception_ptr error = std::make_exception_ptr(thrown);
    const std::string what = thrown.what();  // not describe(): that one is shortened for logs
    const std::string line = vg::describe(error);
    // describe() is one line for logs: line breaks (and the blanks around them) folded into one
    // space, cut at 400 bytes. So: no line break, and without blanks its first 400 bytes are a
    // prefix of what() without blanks.
    FUZZ_CHECK(line.size() <= 403);
    FUZZ_CHECK(line.find_first_of("\r\n") == std::string::npos);
    auto no_blanks = [](std::string_view s) {
        std::string out;
        for (const char c : s)
            if (c != ' ' && c != '\t' && c != '\n' && c != '\r') out.push_back(c);
        return out;
    };
    const std::string kept = no_blanks(std::string_view(line).substr(0, 400));
    FUZZ_CHECK(no_blanks(what).compare(0, kept.size(), kept) == 0);
    FUZZ_CHECK(vg::classify_oom(error) == vg::classify_oom_message(what));
    FUZZ_CHECK(vg::is_oom(error) == (vg::classify_oom_message(what) != vg::OomKind::none));
    const auto via_exception = vg::oom_report(error);
    const auto direct = vg::parse_oom_message(what);
    FUZZ_CHECK(via_exception.has_value() == direct.has_value());
    if (direct) {
        FUZZ_CHECK(via_exception->requested_bytes == direct->requested_bytes);
        FUZZ_CHECK(via_exception->free_bytes == direct->free_bytes);
        FUZZ_CHECK(via_exception->total_bytes == direct->total_bytes);
    }
    // vramguard's own OOM type: the typed report wins; without one the message is parsed.
    const std::exception_ptr own = std::make_exception_ptr(vg::OutOfMemory(owned));
    FUZZ_CHECK(vg::classify_oom(own) == vg::OomKind::allocator);
    FUZZ_CHECK(vg::oom_report(own).has_value() == direct.has_value());

    // The size parser on its own, at every start the input offers cheaply.
    for (std::size_t start = 0; start < text.size() && start < 64; ++start) {
        const auto parsed = vg::detail::parse_size(text.substr(start));
        if (parsed) {
            FUZZ_CHECK(parsed->second <= text.size() - start);
            FUZZ_CHECK(parsed->second > 0);
            FUZZ_CHECK(plausible(parsed->first));
        }
    }
    if (!text.empty()) {
        const std::size_t end = static_cast<std::size_t>(data[0]) % (text.size() + 1);
        const auto before = vg::detail::parse_size_before(text, end);
        if (before) FUZZ_CHECK(plausible(*before));
    }
    return 0;
}
