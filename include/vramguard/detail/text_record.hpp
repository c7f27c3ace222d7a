// SPDX-License-Identifier: MIT
// The pieces shared by vramguard's small checksummed text files (profile.hpp, host.hpp): every
// line ends in '\n', fields read "<name> <value>", numbers are canonical (one spelling per value,
// so serializing what parsed gives back the very same bytes), and the last line is
// "checksum <16 hex digits>", the FNV-1a 64 of every byte before it. Each format keeps its own
// layout and wording of errors; only the reading and checking rules live here, in one place.
#pragma once

#include <vramguard/key.hpp>
#include <vramguard/version.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// Canonical decimal only: digits, no sign, no leading zero, no overflow.
inline bool parse_decimal_u64(std::string_view text, std::uint64_t& out) noexcept {
    if (text.empty() || text.size() > 20 || (text.size() > 1 && text[0] == '0')) return false;
    std::uint64_t value = 0;
    for (const char c : text) {
        if (c < '0' || c > '9') return false;
        const auto digit = static_cast<std::uint64_t>(c - '0');
        if (value > (UINT64_MAX - digit) / 10) return false;
        value = value * 10 + digit;
    }
    out = value;
    return true;
}

// Exactly 16 lowercase hex digits, as hex16() writes them.
inline bool is_hex16(std::string_view text) noexcept {
    if (text.size() != 16) return false;
    for (const char c : text)
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    return true;
}

inline bool parse_hex16_u64(std::string_view text, std::uint64_t& out) noexcept {
    if (!is_hex16(text)) return false;
    std::uint64_t value = 0;
    for (const char c : text)
        value = (value << 4) | static_cast<std::uint64_t>(c <= '9' ? c - '0' : c - 'a' + 10);
    out = value;
    return true;
}

// Stores why a parse failed, when the caller asked; converts to any empty std::optional.
inline std::nullopt_t parse_failure(std::string* error, std::string reason) {
    if (error) *error = std::move(reason);
    return std::nullopt;
}

// "<name> <value>": the value after exactly one space; false when the line is another field.
inline bool field_value(std::string_view line, std::string_view name,
                        std::string_view& value) noexcept {
    if (line.size() <= name.size() || line.substr(0, name.size()) != name ||
        line[name.size()] != ' ')
        return false;
    value = line.substr(name.size() + 1);
    return true;
}

// Walks the '\n'-terminated lines of a file. A last line without its '\n' is never returned: it
// means the file was cut short (a writer killed halfway), which must not read as a shorter file.
class LineReader {
   public:
    explicit LineReader(std::string_view text) noexcept : text_(text) {}

    bool next(std::string_view& line) noexcept {
        const std::size_t end = text_.find('\n', position_);
        if (end == std::string_view::npos) return false;
        line = text_.substr(position_, end - position_);
        position_ = end + 1;
        return true;
    }
    // The next line, which must be the field `name`.
    bool next_field(std::string_view name, std::string_view& value) noexcept {
        std::string_view line;
        return next(line) && field_value(line, name, value);
    }
    // Bytes consumed so far: where the next line starts.
    std::size_t position() const noexcept { return position_; }
    bool at_end() const noexcept { return position_ == text_.size(); }
    std::string_view text() const noexcept { return text_; }

   private:
    std::string_view text_;
    std::size_t position_ = 0;
};

// Writes the closing "checksum" line over every byte of `text` so far.
inline void append_checksum_line(std::string& text) {
    const std::string checksum = hex16(fnv1a64(text));  // of every byte before its own line
    text.append("checksum ").append(checksum).append("\n");
}

enum class ChecksumLine { ok, malformed, not_last, mismatch };

// Checks the value of the "checksum" line `lines` has just read, which started at `line_start`:
// 16 hex digits, nothing after the line, and the FNV-1a 64 of every byte before it. The checks
// run in this order, so each format can word the first failure its own way.
inline ChecksumLine check_checksum_line(const LineReader& lines, std::size_t line_start,
                                        std::string_view value) {
    if (!is_hex16(value)) return ChecksumLine::malformed;
    if (!lines.at_end()) return ChecksumLine::not_last;
    if (value != hex16(fnv1a64(lines.text().substr(0, line_start)))) return ChecksumLine::mismatch;
    return ChecksumLine::ok;
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
