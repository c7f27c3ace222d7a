// SPDX-License-Identifier: MIT
// libFuzzer target: the host ledger file (host.hpp), which every worker process on a host reads
// and rewrites in place under flock, so a killed writer can leave any prefix of it behind.
//
// The first input byte picks a mode, the rest is the payload:
//   0  parse_ledger(payload) as found on disk (almost always rejected: the checksum);
//   1  the payload with a correct checksum line appended, reaching the line parsing behind it;
//   else a round trip: a LedgerState built from the payload must serialize and parse back equal.
// For every file that parses: the format is canonical (serializing the result gives back the very
// same bytes), pids are in 1..INT_MAX, the boot id is valid, the entry count is bounded, and any
// cut-short copy is rejected.
#include <vramguard/host.hpp>

#include "fuzz_check.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

using vramguard::LedgerEntry;
using vramguard::LedgerState;
namespace detail = vramguard::detail;

void check_parse(std::string_view text, std::size_t cut_seed) {
    std::string error;
    const auto state = detail::parse_ledger(text, &error);
    if (!state) {
        FUZZ_CHECK(!error.empty());
        return;
    }
    FUZZ_CHECK(error.empty());
    FUZZ_CHECK(state->entries.size() <= detail::max_ledger_entries);
    FUZZ_CHECK(detail::is_boot_id(state->boot));
    for (const LedgerEntry& entry : state->entries) FUZZ_CHECK(entry.pid > 0);
    (void)state->live_bytes();  // saturates, never wraps
    FUZZ_CHECK(state->live_count() <= state->entries.size());
    // Canonical: what parses is exactly what serialize would have written.
    FUZZ_CHECK(detail::serialize_ledger(*state) == text);
    // A torn copy (a writer killed halfway) never reads as a ledger.
    FUZZ_CHECK(!detail::parse_ledger(text.substr(0, cut_seed % text.size())));
}

std::string with_checksum(std::string_view body) {
    std::string text(body);
    if (!text.empty() && text.back() != '\n') text += '\n';
    text += "checksum " + detail::hex16(detail::fnv1a64(text)) + "\n";
    return text;
}

void check_round_trip(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider input(data, size);
    LedgerState state;
    state.device = input.ConsumeIntegral<std::uint64_t>();
    state.boot = input.ConsumeBool() ? std::string("-") : input.ConsumeRandomLengthString(70);
    const bool boot_valid = detail::is_boot_id(state.boot);
    const std::size_t count = input.ConsumeIntegralInRange<std::size_t>(0, 64);
    for (std::size_t i = 0; i < count && input.remaining_bytes() > 0; ++i) {
        LedgerEntry entry;
        entry.id = input.ConsumeIntegral<std::uint64_t>();
        entry.pid = input.ConsumeIntegralInRange<pid_t>(1, INT_MAX);
        entry.start_ticks = input.ConsumeIntegral<std::uint64_t>();
        entry.bytes = input.ConsumeIntegral<std::uint64_t>();
        entry.created_ns = input.ConsumeIntegral<std::uint64_t>();
        entry.released_ns = input.ConsumeIntegral<std::uint64_t>();
        state.entries.push_back(entry);
    }
    const std::string text = detail::serialize_ledger(state);
    std::string error;
    const auto parsed = detail::parse_ledger(text, &error);
    if (!parsed) {
        std::fprintf(stderr, "round trip rejected: %s\n", error.c_str());
        FUZZ_FAIL("a serialized ledger must parse back");
    }
    LedgerState expected = state;
    if (!boot_valid) expected.boot = "-";  // serialize writes an invalid boot id as "-"
    FUZZ_CHECK(*parsed == expected);
    check_parse(text, state.device);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const std::string_view payload(reinterpret_cast<const char*>(data + 1), size - 1);
    switch (data[0] % 4) {
        case 0: check_parse(payload, size); break;
        case 1: {
            const std::string text = with_checksum(payload);
            check_parse(text, size);
            break;
        }
        default: check_round_trip(data + 1, size - 1); break;
    }
    return 0;
}
