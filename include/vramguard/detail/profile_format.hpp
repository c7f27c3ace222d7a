// SPDX-License-Identifier: MIT
// The profile files' format (profile.hpp): writing and parsing one key's file, and merging the
// sample windows of two copies of a profile.
#pragma once

#include <vramguard/detail/posix.hpp>
#include <vramguard/detail/text_record.hpp>
#include <vramguard/key.hpp>
#include <vramguard/profile_record.hpp>
#include <vramguard/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace detail {

// File format, version 2 (text, so an operator can read and delete it; every line ends in '\n'):
//   vramguard-profile 2
//   key <16 hex digits>
//   label <Key::label(), already escaped to one printable line>
//   peak_bytes <decimal>
//   peak_bytes_per_item <decimal>
//   batch_ceiling <decimal>
//   weight_budget <decimal>
//   samples <count>
//   <load|items|weight> <stamp> <size> <peak bytes>      (count lines, each kind oldest first)
//   checksum <FNV-1a 64 of every byte above, 16 hex digits>
// Version 1 is the same without the samples; it is still read (its peaks become the first
// samples' upper bounds, see Guard), and the next record rewrites it as version 2.
inline constexpr std::string_view profile_magic = "vramguard-profile 2";
inline constexpr std::string_view profile_magic_v1 = "vramguard-profile 1";
// Far above any real file; stops a stray huge file from being read into memory.
inline constexpr std::size_t max_profile_file_bytes = max_small_file_bytes;

struct SampleKind {
    std::string_view name;
    std::vector<ProfileSample> Profile::*samples;
};
inline constexpr SampleKind sample_kinds[] = {
    {"load", &Profile::load_samples},
    {"items", &Profile::item_samples},
    {"weight", &Profile::weight_samples},
};

inline std::string serialize_profile(const Key& key, const Profile& profile) {
    std::string text;
    text.reserve(200 + key.label().size() + 64 * profile_window);
    text.append(profile_magic).append("\n");
    text.append("key ").append(key.hex()).append("\n");
    text.append("label ").append(key.label()).append("\n");
    text.append("peak_bytes ").append(std::to_string(profile.peak_bytes)).append("\n");
    text.append("peak_bytes_per_item ").append(std::to_string(profile.peak_bytes_per_item));
    text.append("\n");
    text.append("batch_ceiling ").append(std::to_string(profile.batch_ceiling)).append("\n");
    text.append("weight_budget ").append(std::to_string(profile.weight_budget)).append("\n");
    std::size_t count = 0;
    for (const SampleKind& kind : sample_kinds) count += (profile.*kind.samples).size();
    text.append("samples ").append(std::to_string(count)).append("\n");
    for (const SampleKind& kind : sample_kinds) {
        for (const ProfileSample& sample : profile.*kind.samples) {
            text.append(kind.name).append(" ").append(std::to_string(sample.stamp)).append(" ");
            text.append(std::to_string(sample.size)).append(" ");
            text.append(std::to_string(sample.peak_bytes)).append("\n");
        }
    }
    append_checksum_line(text);
    return text;
}

// One "<kind> <stamp> <size> <peak>" line into its kind's list; false for anything this code
// would not have written: fields not separated by exactly one space, a kind before one already
// read (they are written load, items, weight), a sample not strictly newer than the one before,
// more than a window of a kind. `kind_index` is the index of the kind read last (0 to start).
inline bool parse_sample_line(std::string_view line, Profile& profile, std::size_t& kind_index) {
    if (std::count(line.begin(), line.end(), ' ') != 3) return false;
    std::string_view fields[4];
    for (std::string_view& field : fields) {
        const std::size_t space = line.find(' ');
        field = line.substr(0, space);
        line = space == std::string_view::npos ? std::string_view() : line.substr(space + 1);
        if (field.empty()) return false;
    }
    ProfileSample sample;
    if (!parse_decimal_u64(fields[1], sample.stamp) || !parse_decimal_u64(fields[2], sample.size) ||
        !parse_decimal_u64(fields[3], sample.peak_bytes))
        return false;
    for (std::size_t k = kind_index; k < std::size(sample_kinds); ++k) {
        if (fields[0] != sample_kinds[k].name) continue;
        auto& list = profile.*sample_kinds[k].samples;
        if (list.size() >= profile_window || (!list.empty() && !(list.back() < sample)))
            return false;
        list.push_back(sample);
        kind_index = k;
        return true;
    }
    return false;
}

// Parses a profile file written for the key whose hex() is `expected_hex`. Returns nothing, with
// the reason in `*error` when given, for anything that is not exactly such a file: arbitrary bytes
// are safe input (this is the fuzzing entry point).
inline std::optional<Profile> parse_profile(std::string_view text, std::string_view expected_hex,
                                            std::string* error = nullptr) {
    const auto fail = [error](std::string reason) {
        return parse_failure(error, std::move(reason));
    };
    if (text.size() > max_profile_file_bytes) return fail("file is too large");
    LineReader lines(text);

    std::string_view line;
    if (!lines.next(line)) return fail("file is empty or truncated");
    const bool version1 = line == profile_magic_v1;
    if (line != profile_magic && !version1) {
        if (line.substr(0, 18) == "vramguard-profile ")
            return fail("unsupported format version (expected \"" + std::string(profile_magic) +
                        "\")");
        return fail("not a vramguard profile (bad first line)");
    }
    std::string_view hex, label, checksum;
    if (!lines.next_field("key", hex) || !is_hex16(hex))
        return fail("truncated or malformed key line");
    if (!lines.next_field("label", label)) return fail("truncated or malformed label line");
    Profile profile;
    const std::pair<std::string_view, std::uint64_t*> numbers[] = {
        {"peak_bytes", &profile.peak_bytes},
        {"peak_bytes_per_item", &profile.peak_bytes_per_item},
        {"batch_ceiling", &profile.batch_ceiling},
        {"weight_budget", &profile.weight_budget},
    };
    for (const auto& number : numbers) {
        std::string_view digits;
        if (!lines.next_field(number.first, digits) || !parse_decimal_u64(digits, *number.second))
            return fail("truncated or malformed " + std::string(number.first) + " line");
    }
    std::string_view digits;
    std::uint64_t count = 0;
    if (!version1 && (!lines.next_field("samples", digits) || !parse_decimal_u64(digits, count) ||
                      count > std::size(sample_kinds) * profile_window))
        return fail("truncated or malformed samples line");
    std::size_t kind_index = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
        if (!lines.next(line) || !parse_sample_line(line, profile, kind_index))
            return fail("truncated or malformed sample line " + std::to_string(i + 1));
    }
    const std::size_t checked_bytes = lines.position();
    if (!lines.next_field("checksum", checksum))
        return fail("truncated or malformed checksum line");
    switch (check_checksum_line(lines, checked_bytes, checksum)) {
        case ChecksumLine::ok: break;
        case ChecksumLine::malformed: return fail("truncated or malformed checksum line");
        case ChecksumLine::not_last: return fail("unexpected bytes after the checksum line");
        case ChecksumLine::mismatch: return fail("checksum mismatch (damaged or hand-edited file)");
    }
    if (hex != expected_hex) return fail("file belongs to key " + std::string(hex));
    return profile;
}

inline std::optional<Profile> parse_profile(std::string_view text, const Key& expected,
                                            std::string* error = nullptr) {
    return parse_profile(text, expected.hex(), error);
}

// The wall clock in ns: what sample stamps are, so samples of every process order by it.
inline std::uint64_t wall_clock_ns() noexcept {
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME, &now);
    return static_cast<std::uint64_t>(now.tv_sec) * 1000000000u +
           static_cast<std::uint64_t>(now.tv_nsec);
}

// A wall-clock stamp in ns, strictly increasing within the process (two samples recorded in one
// tick stay two samples when merged).
inline std::uint64_t next_sample_stamp() noexcept {
    static std::atomic<std::uint64_t> last{0};
    std::uint64_t stamp = wall_clock_ns();
    std::uint64_t seen = last.load(std::memory_order_relaxed);
    do {
        stamp = std::max(stamp, seen + 1);
    } while (!last.compare_exchange_weak(seen, stamp, std::memory_order_relaxed));
    return stamp;
}

// `into` becomes the newest profile_window samples of both lists, oldest first, each once.
inline void merge_samples(std::vector<ProfileSample>& into,
                          const std::vector<ProfileSample>& from) {
    into.insert(into.end(), from.begin(), from.end());
    std::sort(into.begin(), into.end());
    into.erase(std::unique(into.begin(), into.end()), into.end());
    if (into.size() > profile_window)
        into.erase(into.begin(), into.end() - static_cast<std::ptrdiff_t>(profile_window));
}

// The scalar peaks follow the samples, so they age out with them; a version 1 file's scalars
// stand until samples replace them.
inline void derive_peaks(Profile& profile) {
    if (!profile.load_samples.empty() || !profile.item_samples.empty()) profile.peak_bytes = 0;
    for (const auto* samples : {&profile.load_samples, &profile.item_samples})
        for (const ProfileSample& s : *samples)
            profile.peak_bytes = std::max(profile.peak_bytes, s.peak_bytes);
    if (!profile.item_samples.empty()) {
        profile.peak_bytes_per_item = 0;
        for (const ProfileSample& s : profile.item_samples)
            if (s.size > 0)
                profile.peak_bytes_per_item =
                    std::max(profile.peak_bytes_per_item,
                             s.peak_bytes / s.size + (s.peak_bytes % s.size != 0));
    }
}

inline void merge_profile_samples(Profile& into, const Profile& from) {
    for (const SampleKind& kind : sample_kinds)
        merge_samples(into.*kind.samples, from.*kind.samples);
    derive_peaks(into);
}

// Takes another copy of the same key's profile (a file's, or what memory holds) into `into`: the
// larger peaks, the newest window of both samples, and its ceiling and budget unless `into`'s
// were recorded since the last write (`keep_ceiling`, `keep_budget`).
inline void merge_profile(Profile& into, const Profile& from, bool keep_ceiling, bool keep_budget) {
    into.peak_bytes = std::max(into.peak_bytes, from.peak_bytes);
    into.peak_bytes_per_item = std::max(into.peak_bytes_per_item, from.peak_bytes_per_item);
    merge_profile_samples(into, from);
    if (!keep_ceiling) into.batch_ceiling = from.batch_ceiling;
    if (!keep_budget) into.weight_budget = from.weight_budget;
}

// A sample stamped after `now` was written by a process whose wall clock ran ahead (before an NTP
// step back, a VM restore) or by a buggy writer. The window keeps the newest by stamp, so such a
// sample would push out every sample recorded after it until the clock caught up: for ever, if the
// clock was far ahead. Its stamp says nothing true about when it was taken, so, read from a file,
// it is taken as the oldest (stamp 0): the first to go when newer samples come, and while the
// window has room it still counts. Every read clamps it to the same stamp, so the copies that
// different reads (and processes) merge stay one sample. Returns whether anything was clamped.
inline bool clamp_future_stamps(Profile& profile, std::uint64_t now) {
    bool clamped = false;
    for (const SampleKind& kind : sample_kinds) {
        std::vector<ProfileSample>& samples = profile.*kind.samples;
        bool here = false;
        for (ProfileSample& sample : samples) {
            if (sample.stamp <= now) continue;
            sample.stamp = 0;
            here = true;
        }
        if (!here) continue;
        std::sort(samples.begin(), samples.end());
        samples.erase(std::unique(samples.begin(), samples.end()), samples.end());
        clamped = true;
    }
    if (clamped) derive_peaks(profile);
    return clamped;
}

}  // namespace detail

VRAMGUARD_END_NAMESPACE
