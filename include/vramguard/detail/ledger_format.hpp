// SPDX-License-Identifier: MIT
// The host ledger's file format: writing, parsing, and salvaging a damaged file.
#pragma once

#include <vramguard/detail/text_record.hpp>
#include <vramguard/key.hpp>
#include <vramguard/ledger_state.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// File format, version 1 (text, so an operator can `cat` it; every line ends in '\n'):
//   vramguard-ledger 1
//   device <16 hex digits: ledger_device_hash of the device identity>
//   boot <boot id, 1-64 of [0-9a-f-], or "-">
//   reservation <id, 16 hex> <pid> <start_ticks> <bytes> <created_ns> <released_ns>   (0 or more)
//     (released_ns: 0; nonzero only in files written by earlier builds, see LedgerEntry)
//   checksum <FNV-1a 64 of every byte above, 16 hex digits>
// Numbers are canonical decimals. It is never written in place: a writer holding the lock file's
// flock writes "<ledger>.tmp" and renames it over the ledger, so every reader, and every process
// after a writer killed at any instant, finds either the old file or the new one, whole (see
// LedgerFile::store). A file damaged all the same (by hand, by a disk) is salvaged, never emptied:
// see salvage_ledger.
inline constexpr std::string_view ledger_magic = "vramguard-ledger 1";
// 4096 entries of at most ~130 bytes: an upper bound, far above any real ledger.
inline constexpr std::size_t max_ledger_entries = 4096;
inline constexpr std::size_t max_ledger_file_bytes = 1 << 20;

inline std::uint64_t ledger_device_hash(std::string_view device_identity) noexcept {
    return fnv1a64_string(device_identity, fnv1a64("vramguard-ledger-v1"));
}

inline bool is_boot_id(std::string_view text) noexcept {
    if (text == "-") return true;
    if (text.empty() || text.size() > 64) return false;
    for (const char c : text)
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-')) return false;
    return true;
}

inline std::string serialize_ledger(const LedgerState& state) {
    std::string text;
    text.reserve(96 + state.entries.size() * 112);
    text.append(ledger_magic).append("\n");
    text.append("device ").append(hex16(state.device)).append("\n");
    text.append("boot ")
        .append(is_boot_id(state.boot) ? state.boot : std::string("-"))
        .append("\n");
    for (const LedgerEntry& entry : state.entries) {
        text.append("reservation ").append(hex16(entry.id));
        const std::uint64_t numbers[] = {static_cast<std::uint64_t>(entry.pid < 0 ? 0 : entry.pid),
                                         entry.start_ticks, entry.bytes, entry.created_ns,
                                         entry.released_ns};
        for (const std::uint64_t number : numbers) text.append(" ").append(std::to_string(number));
        text.append("\n");
    }
    append_checksum_line(text);
    return text;
}

// One reservation line's value: "<id, 16 hex> <pid> <start_ticks> <bytes> <created_ns>
// <released_ns>".
inline std::optional<LedgerEntry> parse_reservation(std::string_view value, std::string* error) {
    const auto fail = [error](const char* reason) { return parse_failure(error, reason); };
    LedgerEntry entry;
    std::uint64_t pid = 0;
    std::uint64_t* const numbers[] = {&pid, &entry.start_ticks, &entry.bytes, &entry.created_ns,
                                      &entry.released_ns};
    std::size_t space = value.find(' ');
    if (space == std::string_view::npos || !parse_hex16_u64(value.substr(0, space), entry.id))
        return fail("malformed reservation id");
    value.remove_prefix(space + 1);
    for (std::size_t i = 0; i < 5; ++i) {
        space = value.find(' ');
        const bool last = i == 4;
        if (last != (space == std::string_view::npos)) return fail("malformed reservation line");
        if (!parse_decimal_u64(value.substr(0, last ? value.size() : space), *numbers[i]))
            return fail("malformed number in a reservation line");
        if (!last) value.remove_prefix(space + 1);
    }
    if (pid == 0 || pid > static_cast<std::uint64_t>(INT_MAX)) return fail("pid out of range");
    entry.pid = static_cast<pid_t>(pid);
    return entry;
}

// The three header lines (magic, device, boot) into `state`; false with the reason in `*error`.
inline bool parse_ledger_header(LineReader& lines, LedgerState& state, std::string* error) {
    const auto fail = [error](const char* reason) {
        parse_failure(error, reason);
        return false;
    };
    std::string_view line, value;
    if (!lines.next(line)) return fail("file is truncated");
    if (line != ledger_magic) {
        if (line.substr(0, 17) == "vramguard-ledger ") return fail("unsupported format version");
        return fail("not a vramguard ledger (bad first line)");
    }
    if (!lines.next_field("device", value) || !parse_hex16_u64(value, state.device))
        return fail("truncated or malformed device line");
    if (!lines.next_field("boot", value) || !is_boot_id(value))
        return fail("truncated or malformed boot line");
    state.boot = std::string(value);
    return true;
}

// Parses a ledger file. Returns nothing, with the reason in `*error` when given, for anything that
// is not exactly such a file: arbitrary bytes are safe input (this is the fuzzing entry point).
inline std::optional<LedgerState> parse_ledger(std::string_view text,
                                               std::string* error = nullptr) {
    const auto fail = [error](const char* reason) { return parse_failure(error, reason); };
    if (text.size() > max_ledger_file_bytes) return fail("file is too large");
    LineReader lines(text);
    LedgerState state;
    if (!parse_ledger_header(lines, state, error)) return std::nullopt;
    for (;;) {
        const std::size_t line_start = lines.position();
        std::string_view line, value;
        if (!lines.next(line)) return fail("file is truncated (no checksum line)");
        if (field_value(line, "checksum", value)) {
            switch (check_checksum_line(lines, line_start, value)) {
                case ChecksumLine::ok: return state;
                case ChecksumLine::malformed: return fail("malformed checksum line");
                case ChecksumLine::not_last:
                    return fail("unexpected bytes after the checksum line");
                case ChecksumLine::mismatch:
                    return fail("checksum mismatch (damaged, cut short or hand-edited)");
            }
        }
        if (!field_value(line, "reservation", value)) return fail("unexpected line");
        if (state.entries.size() >= max_ledger_entries) return fail("too many reservations");
        auto entry = parse_reservation(value, error);
        if (!entry) return std::nullopt;
        state.entries.push_back(*entry);
    }
}

// A number of a damaged reservation line, trusted only when a space ends it (a cut line may have
// lost its last digits: "10737" of "1073741824").
inline bool salvage_number(std::string_view& rest, std::uint64_t& out) noexcept {
    const std::size_t space = rest.find(' ');
    if (space == std::string_view::npos || !parse_decimal_u64(rest.substr(0, space), out))
        return false;
    rest.remove_prefix(space + 1);
    return true;
}

// What one line of a damaged file still says about a reservation. A whole line ('\n'-ended) that
// parses is taken as it is. Otherwise an id and a pid that are whole still name a reservation and
// its owner; its size is unknown and counts as the whole device (UINT64_MAX) until the owner
// releases it or exits. Nothing when no owner can be named.
inline std::optional<LedgerEntry> salvage_reservation(std::string_view line, bool whole) {
    std::string_view rest;
    if (!field_value(line, "reservation", rest)) return std::nullopt;
    if (whole)
        if (auto entry = parse_reservation(rest, nullptr)) return entry;
    LedgerEntry entry;
    std::uint64_t pid = 0;
    if (rest.size() < 17 || rest[16] != ' ' || !parse_hex16_u64(rest.substr(0, 16), entry.id))
        return std::nullopt;
    rest.remove_prefix(17);
    if (!salvage_number(rest, pid) || pid == 0 || pid > static_cast<std::uint64_t>(INT_MAX))
        return std::nullopt;
    entry.pid = static_cast<pid_t>(pid);
    if (!salvage_number(rest, entry.start_ticks)) entry.start_ticks = 0;  // the pid alone decides
    entry.bytes = UINT64_MAX;
    return entry;
}

// What a damaged ledger (a checksum that fails, a file cut short, stray bytes) still says, so that
// admission stays at least as careful as the truth: every reservation whose owner can be named
// (see salvage_reservation; one entry per id, the larger size), and the boot it was written in
// when that line is whole (otherwise `assumed_boot`: its pids are judged by liveness alone).
// Never more than max_ledger_entries. Arbitrary bytes are safe input.
inline LedgerState salvage_ledger(std::string_view text, std::string_view assumed_boot) {
    LedgerState state;
    state.boot = std::string(assumed_boot);
    std::size_t start = 0;
    while (start < text.size() && state.entries.size() < max_ledger_entries) {
        std::size_t end = text.find('\n', start);
        const bool whole = end != std::string_view::npos;
        if (!whole) end = text.size();
        const std::string_view line = text.substr(start, end - start);
        start = end + 1;
        std::string_view value;
        if (whole && field_value(line, "boot", value) && is_boot_id(value)) {
            state.boot = std::string(value);
        } else if (const auto entry = salvage_reservation(line, whole)) {
            const auto same = std::find_if(state.entries.begin(), state.entries.end(),
                                           [&](const LedgerEntry& e) { return e.id == entry->id; });
            if (same == state.entries.end())
                state.entries.push_back(*entry);
            else if (same->bytes < entry->bytes)
                *same = *entry;
        }
    }
    return state;
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
