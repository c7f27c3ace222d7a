// SPDX-License-Identifier: MIT
// libFuzzer target: profile-cache files, the bytes vramguard reads back from disk.
//
// The first input byte picks a mode, the rest is the payload:
//   0  parse_profile(payload) as found on disk (almost always rejected: the checksum);
//   1  the payload with a correct checksum line appended, so the number, label and sample-line
//      parsing behind the checksum is reached too (seeds: version 1 and version 2 bodies);
//   2  the payload planted as a key's file in a real ProfileCache directory: find() must ignore
//      it (or read it), and the next record must overwrite it with a file that parses back;
//   3  temp_file_pid(payload): the directory-scan parser that decides which files are stale;
//   4  merging two sample windows built from the payload: the newest profile_window of the
//      union, each once, and the peaks derived from them;
//   else a round trip: a Key and a Profile (with samples of every kind) built from the payload
//      must serialize and parse back, to the same Profile and the same bytes.
// Every mode checks invariants and aborts on a violation; a crash or sanitizer report is a bug.
#include <vramguard/profile.hpp>

#include "fuzz_check.hpp"

#include <fuzzer/FuzzedDataProvider.h>
#include <unistd.h>

#include <algorithm>
#include <utility>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

using vramguard::Key;
using vramguard::Profile;
using vramguard::profile_window;
using vramguard::ProfileSample;
namespace detail = vramguard::detail;

constexpr std::string_view fixed_hex = "0123456789abcdef";

// The key hex a file names on its second line, when it has one; else a fixed one.
std::string_view claimed_hex(std::string_view text) {
    const std::size_t first = text.find('\n');
    if (first == std::string_view::npos) return fixed_hex;
    std::string_view rest = text.substr(first + 1);
    if (rest.substr(0, 4) != "key " || rest.size() < 20) return fixed_hex;
    return rest.substr(4, 16);
}

void check_parse(std::string_view text, std::string_view expected_hex) {
    std::string error;
    const auto profile = detail::parse_profile(text, expected_hex, &error);
    if (profile) {
        FUZZ_CHECK(error.empty());
        FUZZ_CHECK(text.size() <= detail::max_profile_file_bytes);
        const std::string_view magic = text.substr(0, detail::profile_magic.size() + 1);
        const bool version1 = magic == std::string(detail::profile_magic_v1) + "\n";
        FUZZ_CHECK(version1 || magic == std::string(detail::profile_magic) + "\n");
        FUZZ_CHECK(!text.empty() && text.back() == '\n');
        // Every window as the cache keeps it: at most profile_window, oldest first; version 1
        // has none.
        for (const detail::SampleKind& kind : detail::sample_kinds) {
            const std::vector<ProfileSample>& samples = (*profile).*kind.samples;
            FUZZ_CHECK(samples.size() <= profile_window);
            FUZZ_CHECK(std::adjacent_find(samples.begin(), samples.end(),
                                          [](const ProfileSample& a, const ProfileSample& b) {
                                              return !(a < b);
                                          }) == samples.end());  // oldest first, each once
            FUZZ_CHECK(!version1 || samples.empty());
        }
    } else {
        FUZZ_CHECK(!error.empty());  // every rejection says why
    }
    // Without the error out-parameter the answer is the same.
    const auto again = detail::parse_profile(text, expected_hex);
    FUZZ_CHECK(again.has_value() == profile.has_value());
    if (profile) FUZZ_CHECK(*again == *profile);
}

// Lines up to and including the one before "checksum", then a correct checksum line.
std::string with_checksum(std::string_view body) {
    std::string text(body);
    if (!text.empty() && text.back() != '\n') text += '\n';
    text += "checksum " + detail::hex16(detail::fnv1a64(text)) + "\n";
    return text;
}

std::string scratch_directory() {
    const char* base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/vramguard-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) FUZZ_FAIL("mkdtemp failed");
    return pattern;
}

void check_cache_overwrites(std::string_view payload) {
    static const std::string directory = scratch_directory();
    static const Key key = Key::of("fuzz", {{"mode", "cache"}});
    const std::string path = directory + "/" + key.hex() + ".profile";
    {
        std::FILE* file = std::fopen(path.c_str(), "wb");
        if (file == nullptr) FUZZ_FAIL("cannot plant the profile file");
        if (!payload.empty()) std::fwrite(payload.data(), 1, payload.size(), file);
        std::fclose(file);
    }
    auto planted = detail::parse_profile(payload, key.hex());
    vramguard::ProfileCache cache(directory, true, [](vramguard::Level, std::string_view) {});
    const auto found = cache.find(key);
    // A read takes samples stamped in the future as the oldest (repro_future_stamp): so does the
    // expectation, clamped at a "now" taken after the read.
    if (planted) detail::clamp_future_stamps(*planted, detail::wall_clock_ns());
    FUZZ_CHECK(found.has_value() == planted.has_value());
    if (found) FUZZ_CHECK(*found == *planted);
    const std::uint64_t peak = 4096 + payload.size();
    cache.record_peak(key, peak, 3);
    FUZZ_CHECK(cache.persistent());
    std::string text;
    int error = 0;
    FUZZ_CHECK(detail::read_small_file(path, text, error) == detail::ReadResult::ok);
    const auto rewritten = detail::parse_profile(text, key.hex());
    FUZZ_CHECK(rewritten.has_value());
    FUZZ_CHECK(text.substr(0, detail::profile_magic.size()) == detail::profile_magic);
    FUZZ_CHECK(*rewritten == cache.get(key));
    // The new item sample is in the window, and so counts for both peaks, unless a whole window
    // of newer ones (stamps from a clock ahead of ours) was already there.
    const auto& items = rewritten->item_samples;
    const bool kept = std::any_of(items.begin(), items.end(), [&](const ProfileSample& s) {
        return s.size == 3 && s.peak_bytes == peak;
    });
    if (kept) {
        FUZZ_CHECK(rewritten->peak_bytes >= peak);
        FUZZ_CHECK(rewritten->peak_bytes_per_item >= (peak + 2) / 3);
    } else {
        FUZZ_CHECK(planted && items.size() == profile_window);
    }
    // What the planted file held is merged in, not lost (newest window per kind).
    if (planted) {
        for (const detail::SampleKind& kind : detail::sample_kinds) {
            const auto& before = (*planted).*kind.samples;
            const auto& after = (*rewritten).*kind.samples;
            std::vector<ProfileSample> distinct = before;
            distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
            FUZZ_CHECK(after.size() >= std::min<std::size_t>(distinct.size(), profile_window));
            if (!before.empty()) FUZZ_CHECK(after.back().stamp >= before.back().stamp);
        }
        FUZZ_CHECK(rewritten->batch_ceiling == planted->batch_ceiling);
        FUZZ_CHECK(rewritten->weight_budget == planted->weight_budget);
    }
}

void check_temp_file_pid(std::string_view name) {
    const pid_t pid = detail::temp_file_pid(name);
    FUZZ_CHECK(pid >= 0);
    if (pid == 0) return;
    FUZZ_CHECK(name.size() >= 5 && name.front() == '.' && name.substr(name.size() - 4) == ".tmp");
    // The name we write is always recognised.
    const std::string ours = "." + detail::hex16(static_cast<std::uint64_t>(name.size())) + "." +
                             std::to_string(pid) + ".7.tmp";
    FUZZ_CHECK(detail::temp_file_pid(ours) == pid);
}

// Up to `most` samples from the payload, oldest first (sorted, so that equal ones may occur).
std::vector<ProfileSample> consume_samples(FuzzedDataProvider& input, std::size_t most) {
    std::vector<ProfileSample> samples(input.ConsumeIntegralInRange<std::size_t>(0, most));
    for (ProfileSample& s : samples) {
        // Small stamps collide often, so equal and near-equal samples are exercised.
        s.stamp = input.ConsumeBool() ? input.ConsumeIntegralInRange<std::uint64_t>(0, 64)
                                      : input.ConsumeIntegral<std::uint64_t>();
        s.size = input.ConsumeIntegralInRange<std::uint64_t>(0, 4);
        s.peak_bytes = input.ConsumeIntegral<std::uint64_t>();
    }
    std::sort(samples.begin(), samples.end());
    return samples;
}

// The newest profile_window of two windows' union, each once, and the peaks derived from the
// result, against a plain recomputation.
void check_merge(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider input(data, size);
    Profile into, from;
    into.peak_bytes = input.ConsumeIntegral<std::uint64_t>();
    into.peak_bytes_per_item = input.ConsumeIntegral<std::uint64_t>();
    for (const detail::SampleKind& kind : detail::sample_kinds) {
        into.*kind.samples = consume_samples(input, profile_window);
        from.*kind.samples = consume_samples(input, 2 * profile_window);
    }
    const Profile original = into;
    detail::merge_profile_samples(into, from);
    for (const detail::SampleKind& kind : detail::sample_kinds) {
        std::vector<ProfileSample> expected = original.*kind.samples;
        expected.insert(expected.end(), (from.*kind.samples).begin(), (from.*kind.samples).end());
        std::sort(expected.begin(), expected.end());
        expected.erase(std::unique(expected.begin(), expected.end()), expected.end());
        if (expected.size() > profile_window)
            expected.erase(expected.begin(),
                           expected.end() - static_cast<std::ptrdiff_t>(profile_window));
        FUZZ_CHECK(into.*kind.samples == expected);
    }
    // peak_bytes: the highest load or item peak; the scalars stand only with no such sample.
    std::uint64_t peak = 0, per_item = 0;
    for (const ProfileSample& s : into.load_samples) peak = std::max(peak, s.peak_bytes);
    for (const ProfileSample& s : into.item_samples) {
        peak = std::max(peak, s.peak_bytes);
        if (s.size > 0)
            per_item = std::max(per_item, s.peak_bytes / s.size + !!(s.peak_bytes % s.size));
    }
    const bool any_peak = !into.load_samples.empty() || !into.item_samples.empty();
    FUZZ_CHECK(into.peak_bytes == (any_peak ? peak : original.peak_bytes));
    FUZZ_CHECK(into.peak_bytes_per_item ==
               (into.item_samples.empty() ? original.peak_bytes_per_item : per_item));
    // Merging again changes nothing: a sample already merged is not a new one.
    Profile again = into;
    detail::merge_profile_samples(again, from);
    detail::merge_profile_samples(again, into);
    FUZZ_CHECK(again == into);
}

void check_round_trip(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider input(data, size);
    Profile profile;
    profile.peak_bytes = input.ConsumeIntegral<std::uint64_t>();
    profile.peak_bytes_per_item = input.ConsumeIntegral<std::uint64_t>();
    profile.batch_ceiling = input.ConsumeIntegral<std::uint64_t>();
    profile.weight_budget = input.ConsumeIntegral<std::uint64_t>();
    for (const detail::SampleKind& kind : detail::sample_kinds) {
        // As the cache keeps a window: each sample once (a file with one twice is refused).
        std::vector<ProfileSample> samples = consume_samples(input, profile_window);
        samples.erase(std::unique(samples.begin(), samples.end()), samples.end());
        profile.*kind.samples = std::move(samples);
    }
    const std::string name = input.ConsumeRandomLengthString(256);
    const std::string param = input.ConsumeRandomLengthString(64);
    const std::string value = input.ConsumeRemainingBytesAsString();
    const Key key = Key::of(name, {{param, value}});
    const std::string text = detail::serialize_profile(key, profile);
    std::string error;
    const auto parsed = detail::parse_profile(text, key, &error);
    if (!parsed) {
        std::fprintf(stderr, "round trip rejected: %s\n", error.c_str());
        FUZZ_FAIL("a serialized profile must parse back");
    }
    FUZZ_CHECK(*parsed == profile);
    FUZZ_CHECK(detail::serialize_profile(key, *parsed) == text);  // one spelling per profile
    // Any other key's name on it is refused.
    const Key other = Key::of(name + "x", {{param, value}});
    if (other.hex() != key.hex()) FUZZ_CHECK(!detail::parse_profile(text, other));
    // Cut short anywhere, it is refused (a torn write must never read as a record).
    const std::size_t cut = profile.peak_bytes % text.size();
    FUZZ_CHECK(!detail::parse_profile(std::string_view(text).substr(0, cut), key));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const std::string_view payload(reinterpret_cast<const char*>(data + 1), size - 1);
    switch (data[0] % 8) {
        case 0: check_parse(payload, claimed_hex(payload)); break;
        case 1: {
            const std::string text = with_checksum(payload);
            check_parse(text, claimed_hex(text));
            break;
        }
        case 2: check_cache_overwrites(payload); break;
        case 3: check_temp_file_pid(payload); break;
        case 4: check_merge(data + 1, size - 1); break;
        default: check_round_trip(data + 1, size - 1); break;
    }
    return 0;
}
