// SPDX-License-Identifier: MIT
// libFuzzer target: the /proc/<pid>/stat parser (host.hpp), which decides whether the owner of a
// ledger reservation is alive. Field 2 is the command name, which any process may set to any
// bytes (prctl(PR_SET_NAME), the executable's name), so the parser must count fields from the
// last ')'.
//
// Checks, besides "no crash, no sanitizer report":
//  - on the raw input: a result only where there is a ')';
//  - with the input as the command name of an otherwise well-formed line: the state and the start
//    time are always found, whatever the name holds.
#include <vramguard/host.hpp>

#include "fuzz_check.hpp"

#include <cstdint>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    namespace detail = vramguard::detail;
    const std::string_view text(reinterpret_cast<const char*>(data), size);

    if (detail::parse_process_stat(text)) FUZZ_CHECK(text.find(')') != std::string_view::npos);

    std::string line = "31337 (" + std::string(text) + ") D";
    for (int field = 4; field <= 52; ++field)
        line += " " + std::to_string(field == 22 ? 18446744073709551615ULL : field);
    line += '\n';
    const auto stat = detail::parse_process_stat(line);
    FUZZ_CHECK(stat.has_value());
    FUZZ_CHECK(stat->state == 'D');
    FUZZ_CHECK(stat->start_ticks == 18446744073709551615ULL);
    return 0;
}
