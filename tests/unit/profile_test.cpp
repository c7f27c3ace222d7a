// SPDX-License-Identifier: MIT
#include <vramguard/memory.hpp>
#include <vramguard/profile.hpp>

#include <gtest/gtest.h>
#include <temp_dir.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <ostream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace vramguard {
// Readable failure messages; gtest finds this by argument-dependent lookup.
static void PrintTo(const ProfileSample& s, std::ostream* out) {
    *out << "{" << s.stamp << ", " << s.size << ", " << s.peak_bytes << "}";
}
static void PrintTo(const Profile& p, std::ostream* out) {
    *out << "Profile{peak_bytes=" << p.peak_bytes
         << ", peak_bytes_per_item=" << p.peak_bytes_per_item
         << ", batch_ceiling=" << p.batch_ceiling << ", weight_budget=" << p.weight_budget;
    const std::pair<const char*, const std::vector<ProfileSample>*> kinds[] = {
        {"load", &p.load_samples}, {"items", &p.item_samples}, {"weight", &p.weight_samples}};
    for (const auto& kind : kinds) {
        if (kind.second->empty()) continue;
        *out << ", " << kind.first << "=[";
        for (std::size_t i = 0; i < kind.second->size(); ++i) {
            if (i > 0) *out << " ";
            PrintTo((*kind.second)[i], out);
        }
        *out << "]";
    }
    *out << "}";
}
}  // namespace vramguard

using vramguard::Key;
using vramguard::Level;
using vramguard::Profile;
using vramguard::profile_window;
using vramguard::ProfileCache;
using vramguard::ProfileSample;
using vramguard_test::TempDir;
using namespace std::string_literals;

namespace {

// Counts what the cache logs.
class LogCapture {
   public:
    vramguard::LogSink sink() {
        return [this](Level level, std::string_view message) {
            std::lock_guard<std::mutex> lock(mutex_);
            messages_.emplace_back(level, std::string(message));
        };
    }
    std::size_t count(Level level) const {
        std::lock_guard<std::mutex> lock(mutex_);
        return static_cast<std::size_t>(
            std::count_if(messages_.begin(), messages_.end(),
                          [level](const auto& message) { return message.first == level; }));
    }
    std::string all() const {
        std::lock_guard<std::mutex> lock(mutex_);
        std::string text;
        for (const auto& message : messages_)
            text += std::string(vramguard::to_string(message.first)) + ": " + message.second + "\n";
        return text;
    }

   private:
    mutable std::mutex mutex_;
    std::vector<std::pair<Level, std::string>> messages_;
};

// Sets (or unsets, with nullopt) an environment variable for one scope.
class ScopedEnv {
   public:
    ScopedEnv(std::string name, std::optional<std::string> value) : name_(std::move(name)) {
        if (const char* old = std::getenv(name_.c_str())) old_ = old;
        apply(value);
    }
    ScopedEnv(const ScopedEnv&) = delete;
    ScopedEnv& operator=(const ScopedEnv&) = delete;
    ~ScopedEnv() { apply(old_); }

   private:
    void apply(const std::optional<std::string>& value) {
        if (value)
            ::setenv(name_.c_str(), value->c_str(), 1);
        else
            ::unsetenv(name_.c_str());
    }
    std::string name_;
    std::optional<std::string> old_;
};

std::string read_text(const std::string& path) {
    std::string text;
    int error = 0;
    if (vramguard::detail::read_small_file(path, text, error) != vramguard::detail::ReadResult::ok)
        return "<unreadable>";
    return text;
}

std::vector<std::string> list_dir(const std::string& path) {
    std::vector<std::string> names;
    if (DIR* dir = ::opendir(path.c_str())) {
        while (const dirent* item = ::readdir(dir)) {
            const std::string name = item->d_name;
            if (name != "." && name != "..") names.push_back(name);
        }
        ::closedir(dir);
    }
    std::sort(names.begin(), names.end());
    return names;
}

bool exists(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0;
}

ino_t inode_of(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

// A pid no process has: a child that already exited and was reaped.
pid_t dead_pid() {
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    int status = 0;
    ::waitpid(child, &status, 0);
    return child;
}

// Waits for a forked child; returns its exit code, or 100 + signal when it was killed.
int wait_child(pid_t child) {
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 100 + WTERMSIG(status);
    return 99;
}

const Key kLoad = Key::of("load", {{"model", "m"}, {"dtype", "fp16"}});
const Key kEncode = Key::of("encode", {{"model", "m"}});

// The four numbers alone, for comparing what was derived while the samples carry clock stamps.
Profile scalars(const Profile& p) {
    return Profile{p.peak_bytes, p.peak_bytes_per_item, p.batch_ceiling, p.weight_budget};
}
Profile scalars(const std::optional<Profile>& p) { return p ? scalars(*p) : Profile{}; }

// The peaks of a sample list, oldest first.
std::vector<std::uint64_t> peaks_of(const std::vector<ProfileSample>& samples) {
    std::vector<std::uint64_t> peaks;
    for (const ProfileSample& s : samples) peaks.push_back(s.peak_bytes);
    return peaks;
}

// A Profile with samples, for format tests.
Profile with_samples(Profile p, std::vector<ProfileSample> load, std::vector<ProfileSample> items,
                     std::vector<ProfileSample> weight) {
    p.load_samples = std::move(load);
    p.item_samples = std::move(items);
    p.weight_samples = std::move(weight);
    return p;
}

// Samples stamped first..last (inclusive), `size` each, peak = stamp * 10.
std::vector<ProfileSample> stamped(std::uint64_t first, std::uint64_t last, std::uint64_t size) {
    std::vector<ProfileSample> samples;
    for (std::uint64_t stamp = first; stamp <= last; ++stamp)
        samples.push_back(ProfileSample{stamp, size, stamp * 10});
    return samples;
}

// The file's text, `body` (every line before "checksum") closed by the checksum the code writes.
std::string checksummed(std::string body) {
    vramguard::detail::append_checksum_line(body);
    return body;
}

// A version 2 body for kLoad with four zero numbers and the given sample lines.
std::string v2_body(std::size_t count, const std::string& sample_lines) {
    return "vramguard-profile 2\nkey " + kLoad.hex() + "\nlabel " + kLoad.label() +
           "\npeak_bytes 0\npeak_bytes_per_item 0\nbatch_ceiling 0\nweight_budget 0\nsamples " +
           std::to_string(count) + "\n" + sample_lines;
}

}  // namespace

// ---------------------------------------------------------------- the file format

TEST(ProfileFormat, RoundTrip) {
    const Profile sampled =
        with_samples(Profile{6442450944, 1048576, 64, 8192}, {{1, 0, 6442450944}},
                     {{2, 8, 8388608}, {5, 16, 16777216}}, {{3, 4096, 9000000}});
    Profile full_window{UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX};
    for (const auto& kind : vramguard::detail::sample_kinds) {
        for (std::uint64_t i = 0; i < profile_window; ++i)
            (full_window.*kind.samples)
                .push_back(ProfileSample{UINT64_MAX - profile_window + i, UINT64_MAX, UINT64_MAX});
    }
    for (const Profile& profile :
         {Profile{}, Profile{1, 2, 3, 4}, Profile{UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX},
          Profile{6442450944, 1048576, 64, 8192}, sampled, full_window,
          with_samples(Profile{}, {}, {}, {{0, 0, 0}, {0, 0, 1}})}) {
        const std::string text = vramguard::detail::serialize_profile(kLoad, profile);
        std::string error;
        const auto parsed = vramguard::detail::parse_profile(text, kLoad, &error);
        ASSERT_TRUE(parsed) << error << "\n" << text;
        EXPECT_EQ(*parsed, profile);
        EXPECT_EQ(vramguard::detail::parse_profile(text, kLoad.hex()), parsed);
        // Canonical: what parsed serializes to the very same bytes.
        EXPECT_EQ(vramguard::detail::serialize_profile(kLoad, *parsed), text);
    }
}

// The exact bytes of a file: changing them orphans every stored profile (bump the version line).
TEST(ProfileFormat, PinnedText) {
    const Key key = Key::of("a", {{"b", "c"}});
    const std::string head =
        "vramguard-profile 2\n"
        "key b127516e7162670c\n"
        "label a{b=c}\n"
        "peak_bytes 100\n"
        "peak_bytes_per_item 34\n"
        "batch_ceiling 8\n"
        "weight_budget 0\n";
    EXPECT_EQ(vramguard::detail::serialize_profile(key, Profile{100, 34, 8, 0}),
              head +
                  "samples 0\n"
                  "checksum 43bd8e08b88fd3f6\n");
    // Samples: one line each, kinds in the order load, items, weight, each oldest first.
    const Profile sampled =
        with_samples(Profile{100, 34, 8, 0}, {{1700000000000000000, 0, 100}},
                     {{1700000000000000001, 3, 100}}, {{1700000000000000002, 50, 90}});
    EXPECT_EQ(vramguard::detail::serialize_profile(key, sampled),
              head +
                  "samples 3\n"
                  "load 1700000000000000000 0 100\n"
                  "items 1700000000000000001 3 100\n"
                  "weight 1700000000000000002 50 90\n"
                  "checksum bcd3642e58202e11\n");
}

// Version 1 files (written before the samples) are still read, as their four numbers.
TEST(ProfileFormat, ReadsVersion1) {
    const Key key = Key::of("a", {{"b", "c"}});
    const std::string v1 = checksummed(
        "vramguard-profile 1\n"
        "key b127516e7162670c\n"
        "label a{b=c}\n"
        "peak_bytes 100\n"
        "peak_bytes_per_item 34\n"
        "batch_ceiling 8\n"
        "weight_budget 0\n");
    // The exact bytes version 1 wrote (the old PinnedText), checksum included.
    ASSERT_EQ(v1.substr(v1.find("checksum ")), "checksum a8a078ac86c09b52\n");
    std::string error;
    const auto parsed = vramguard::detail::parse_profile(v1, key, &error);
    ASSERT_TRUE(parsed) << error;
    EXPECT_EQ(*parsed, (Profile{100, 34, 8, 0}));  // and no samples
    // Version 1 has no samples line: one there is a damaged file, not a version 1 one.
    std::string with_samples_line = v1.substr(0, v1.find("checksum "));
    with_samples_line += "samples 0\n";
    EXPECT_FALSE(vramguard::detail::parse_profile(checksummed(with_samples_line), key, &error));
    EXPECT_NE(error.find("checksum line"), std::string::npos) << error;
    // Every truncation and every single-byte change of a version 1 file is refused too.
    for (std::size_t size = 0; size < v1.size(); ++size)
        EXPECT_FALSE(vramguard::detail::parse_profile(v1.substr(0, size), key)) << size;
    for (std::size_t i = 0; i < v1.size(); ++i) {
        std::string changed = v1;
        changed[i] = static_cast<char>(changed[i] ^ 0x01);
        EXPECT_FALSE(vramguard::detail::parse_profile(changed, key)) << i;
    }
}

TEST(ProfileFormat, LabelWithAnyBytesStaysOneLine) {
    const Key key = Key::of("x\ny", {{"\r\n", "\0\xff"s}});
    const std::string text = vramguard::detail::serialize_profile(key, Profile{1, 2, 3, 4});
    // magic, key, label, four numbers, samples, checksum.
    EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 9);
    EXPECT_EQ(vramguard::detail::parse_profile(text, key), (Profile{1, 2, 3, 4}));
    // And one more line per sample.
    const Profile sampled = with_samples(Profile{1, 2, 3, 4}, {{1, 0, 1}}, {{2, 1, 2}}, {});
    const std::string longer = vramguard::detail::serialize_profile(key, sampled);
    EXPECT_EQ(std::count(longer.begin(), longer.end(), '\n'), 11);
    EXPECT_EQ(vramguard::detail::parse_profile(longer, key), sampled);
}

TEST(ProfileFormat, RejectsEverythingButAnExactFile) {
    using vramguard::detail::parse_profile;
    const Profile sampled = with_samples(Profile{100, 10, 8, 512}, {{1, 0, 100}, {4, 0, 90}},
                                         {{2, 4, 40}}, {{3, 300, 60}});
    const std::string good = vramguard::detail::serialize_profile(kLoad, sampled);
    ASSERT_EQ(parse_profile(good, kLoad), sampled);

    // Every truncation (a writer killed mid-write without rename would look like this).
    for (std::size_t size = 0; size < good.size(); ++size)
        EXPECT_FALSE(parse_profile(good.substr(0, size), kLoad)) << size;
    // Every single-byte change is caught (by the structure or by the checksum).
    for (std::size_t i = 0; i < good.size(); ++i) {
        std::string changed = good;
        changed[i] = static_cast<char>(changed[i] ^ 0x01);
        EXPECT_FALSE(parse_profile(changed, kLoad)) << i;
    }
    std::string error;
    EXPECT_FALSE(parse_profile(good + "x", kLoad, &error));
    EXPECT_NE(error.find("after the checksum"), std::string::npos) << error;
    EXPECT_FALSE(parse_profile(good, kEncode, &error));
    EXPECT_NE(error.find("belongs to key " + kLoad.hex()), std::string::npos) << error;
    EXPECT_FALSE(parse_profile("", kLoad, &error));
    EXPECT_NE(error.find("empty"), std::string::npos) << error;
    EXPECT_FALSE(parse_profile("vramguard-profile 3\n", kLoad, &error));
    EXPECT_NE(error.find("unsupported format version"), std::string::npos) << error;
    EXPECT_FALSE(parse_profile("vramguard-profile 0\n", kLoad, &error));
    EXPECT_NE(error.find("unsupported format version"), std::string::npos) << error;
    EXPECT_FALSE(parse_profile("vramguard-profile 2\n", kLoad, &error));
    EXPECT_NE(error.find("key line"), std::string::npos) << error;

    // Numbers are strict: rebuild otherwise-valid files with a bad number and a valid checksum,
    // in both versions.
    for (const char* magic : {"vramguard-profile 1", "vramguard-profile 2"}) {
        SCOPED_TRACE(magic);
        const bool v2 = magic[18] == '2';
        const auto with_peak = [&](const std::string& digits) {
            return checksummed(std::string(magic) + "\nkey " + kLoad.hex() + "\nlabel " +
                               kLoad.label() + "\npeak_bytes " + digits +
                               "\npeak_bytes_per_item 0\nbatch_ceiling 0\nweight_budget 0\n" +
                               (v2 ? "samples 0\n" : ""));
        };
        EXPECT_EQ(parse_profile(with_peak("18446744073709551615"), kLoad)->peak_bytes, UINT64_MAX);
        for (const char* bad :
             {"18446744073709551616", "99999999999999999999", "123456789012345678901", "-1", "+1",
              "01", "1 ", " 1", "1x", "", "0x10", "1e3", "１"})
            EXPECT_FALSE(parse_profile(with_peak(bad), kLoad)) << bad;
    }
    // Windows line endings are not the format.
    std::string crlf;
    for (const char c : good) crlf += c == '\n' ? "\r\n"s : std::string(1, c);
    EXPECT_FALSE(parse_profile(crlf, kLoad));
}

// Sample lines are what serialize_profile writes, or the file is refused with a reason.
TEST(ProfileFormat, RejectsMalformedSampleLines) {
    using vramguard::detail::parse_profile;
    const auto refused = [](const std::string& text) {
        std::string error;
        const auto parsed = parse_profile(text, kLoad, &error);
        EXPECT_FALSE(parsed) << text;
        EXPECT_FALSE(error.empty());
        return error;
    };
    // The baseline is accepted: one of each kind.
    ASSERT_TRUE(
        parse_profile(checksummed(v2_body(3, "load 1 0 5\nitems 2 3 6\nweight 3 4 7\n")), kLoad));

    // A kind that does not exist, or spelled otherwise.
    for (const char* line : {"loads 1 0 5\n", "item 1 3 5\n", "Items 1 3 5\n", "weights 1 4 5\n",
                             "samples 1 0 5\n", " load 1 0 5\n", "1 0 5\n"}) {
        EXPECT_EQ(refused(checksummed(v2_body(1, line))), "truncated or malformed sample line 1")
            << line;
    }
    // Non-canonical or malformed numbers, and the wrong number of fields.
    for (const char* line : {"load 01 0 5\n", "load 1 00 5\n", "load 1 0 05\n", "load +1 0 5\n",
                             "load 1 -0 5\n", "load 1 0 0x5\n", "load 1 0 18446744073709551616\n",
                             "load 1  0 5\n", "load  1 0 5\n", "load 1 0 5 6\n", "load 1 0\n",
                             "load 1\n", "load\n", "load 1 0 5\r\n", "load 1\t0 5\n"}) {
        EXPECT_EQ(refused(checksummed(v2_body(1, line))), "truncated or malformed sample line 1")
            << line;
    }
    EXPECT_TRUE(parse_profile(checksummed(v2_body(1,
                                                  "load 18446744073709551615 18446744073709551615 "
                                                  "18446744073709551615\n")),
                              kLoad));

    // Out of order within a kind (oldest first, by stamp, then size, then peak).
    EXPECT_EQ(refused(checksummed(v2_body(2, "load 5 0 1\nload 4 0 1\n"))),
              "truncated or malformed sample line 2");
    EXPECT_EQ(refused(checksummed(v2_body(2, "items 5 2 1\nitems 5 1 1\n"))),
              "truncated or malformed sample line 2");
    EXPECT_EQ(refused(checksummed(v2_body(3, "weight 1 1 1\nweight 7 1 9\nweight 7 1 8\n"))),
              "truncated or malformed sample line 3");
    EXPECT_TRUE(parse_profile(checksummed(v2_body(2, "load 5 0 1\nload 5 0 2\n")), kLoad));

    // More than a window of one kind; a full window of each is fine.
    std::string window, all_kinds;
    for (std::uint64_t i = 1; i <= profile_window; ++i)
        window += "items " + std::to_string(i) + " 1 1\n";
    for (const char* kind : {"load", "items", "weight"})  // the order they are written in
        for (std::uint64_t i = 1; i <= profile_window; ++i)
            all_kinds += std::string(kind) + " " + std::to_string(i) + " 1 1\n";
    ASSERT_TRUE(parse_profile(checksummed(v2_body(profile_window, window)), kLoad));
    ASSERT_TRUE(parse_profile(checksummed(v2_body(3 * profile_window, all_kinds)), kLoad));
    EXPECT_EQ(refused(checksummed(v2_body(profile_window + 1, window + "items 99 1 1\n"))),
              "truncated or malformed sample line " + std::to_string(profile_window + 1));

    // A count that does not match the lines that follow.
    EXPECT_EQ(refused(checksummed(v2_body(2, "load 1 0 5\n"))),
              "truncated or malformed sample line 2");  // the checksum line is no sample
    EXPECT_EQ(refused(checksummed(v2_body(0, "load 1 0 5\n"))),
              "truncated or malformed checksum line");
    EXPECT_EQ(refused(checksummed(v2_body(1, "load 1 0 5\nload 2 0 5\n"))),
              "truncated or malformed checksum line");
    EXPECT_EQ(refused(checksummed(v2_body(3 * profile_window + 1, all_kinds + "load 99 1 1\n"))),
              "truncated or malformed samples line");  // more than three windows: said at once
    for (const char* count : {"01", "-1", "", " 1", "1 ", "x", "18446744073709551616"}) {
        std::string body = v2_body(1, "load 1 0 5\n");
        body.replace(body.find("samples 1"), 9, "samples "s + count);
        EXPECT_EQ(refused(checksummed(body)), "truncated or malformed samples line") << count;
    }
    std::string no_count = v2_body(1, "load 1 0 5\n");
    no_count.erase(no_count.find("samples 1\n"), 10);
    EXPECT_EQ(refused(checksummed(no_count)), "truncated or malformed samples line");
}

// One spelling per file, as serialize_profile writes it: each sample once, kinds in the order
// load, items, weight, no space at the end of a line. Anything else is refused like any other
// non-canonical spelling, so that what parses serializes back to the very same bytes.
TEST(ProfileFormat, SampleLinesAreCanonical) {
    for (const char* lines : {"load 1 0 5 \n", "items 1 3 5\nload 2 0 5\n",
                              "weight 2 1 5\nitems 3 1 5\n", "load 1 0 5\nload 1 0 5\n"}) {
        const std::string text = checksummed(v2_body(
            static_cast<std::size_t>(std::count(lines, lines + std::strlen(lines), '\n')), lines));
        std::string error;
        EXPECT_FALSE(vramguard::detail::parse_profile(text, kLoad, &error)) << text;
        EXPECT_NE(error.find("sample line"), std::string::npos) << error;
    }
}

// The fuzzing entry point must survive anything; run under ASan/UBSan this is a small fuzzer.
TEST(ProfileFormat, ArbitraryBytesNeverCrash) {
    std::mt19937_64 random(12345);
    const std::string good = vramguard::detail::serialize_profile(
        kLoad, with_samples(Profile{100, 10, 8, 512}, {{1, 0, 100}}, {{2, 4, 40}, {3, 8, 70}},
                            {{4, 300, 60}}));
    for (int round = 0; round < 20000; ++round) {
        std::string text;
        if (round % 2 == 0) {
            text.resize(random() % 300);
            for (char& c : text) c = static_cast<char>(random());
        } else {
            text = good;
            const int edits = 1 + static_cast<int>(random() % 4);
            for (int e = 0; e < edits; ++e) {
                const std::size_t at = random() % (text.size() + 1);
                switch (random() % 3) {
                    case 0:
                        if (at < text.size()) text[at] = static_cast<char>(random());
                        break;
                    case 1: text.insert(at, 1, static_cast<char>(random())); break;
                    default:
                        if (at < text.size()) text.erase(at, 1 + random() % 8);
                        break;
                }
            }
        }
        std::string error;
        const auto parsed = vramguard::detail::parse_profile(text, kLoad, &error);
        if (parsed) {
            // Only the good file (or an edit that changed nothing) may parse.
            EXPECT_EQ(text, good);
        } else {
            EXPECT_FALSE(error.empty());
        }
    }
}

TEST(ProfileFormat, TempFileNames) {
    using vramguard::detail::temp_file_pid;
    EXPECT_EQ(temp_file_pid(".0123456789abcdef.4242.7.tmp"), 4242);
    EXPECT_EQ(temp_file_pid(".x.17.0.tmp"), 17);
    EXPECT_EQ(temp_file_pid(".a.b.17.0.tmp"), 17);
    for (const char* not_temp :
         {"0123456789abcdef.profile", ".lock", ".x.17.tmp", "x.17.0.tmp", ".x.0.0.tmp",
          ".x.-1.0.tmp", ".x.99999999999.0.tmp", ".x.17.0.tmpx", ".17.0.tmp", "..tmp", ".tmp",
          ".x.17.a.tmp", ".x.1 7.0.tmp"})
        EXPECT_EQ(temp_file_pid(not_temp), 0) << not_temp;
}

// ---------------------------------------------------------------- the cache

TEST(ProfileCache, UnknownKeyIsNotFound) {
    TempDir dir;
    LogCapture log;
    ProfileCache cache(dir.path(), true, log.sink());
    EXPECT_TRUE(cache.persistent());
    EXPECT_EQ(cache.directory(), dir.path());
    EXPECT_FALSE(cache.find(kLoad));
    EXPECT_EQ(cache.get(kLoad), Profile{});
    // Recording "nothing known" (a zero limit, no samples) creates nothing.
    cache.record_batch_ceiling(kLoad, 0);
    cache.record_weight_budget(kLoad, 0);
    cache.record_samples(kLoad, &Profile::item_samples, {});
    cache.record_samples(kLoad, &Profile::weight_samples, {});
    EXPECT_FALSE(cache.find(kLoad));
    EXPECT_FALSE(exists(cache.path_for(kLoad)));
    EXPECT_EQ(log.all(), "");
}

// A zero peak is "not measured" (Guard never records one): it should not become a sample that
// pushes a real one out of the window or, on a version 1 profile, replaces its peak with 0.
TEST(ProfileCache, ZeroPeakIsNotASample) {
    TempDir dir;
    ProfileCache cache(dir.path(), true);
    cache.record_peak(kLoad, 0);
    cache.record_peak(kEncode, 0, 4);
    EXPECT_FALSE(cache.find(kLoad));
    EXPECT_FALSE(cache.find(kEncode));
    EXPECT_FALSE(exists(cache.path_for(kLoad)));
    cache.record_peak(kLoad, 100);
    cache.record_peak(kLoad, 0);
    EXPECT_EQ(peaks_of(cache.get(kLoad).load_samples), (std::vector<std::uint64_t>{100}));
}

TEST(ProfileCache, RoundTripThroughDisk) {
    TempDir dir;
    LogCapture log;
    Profile load, encode;
    {
        ProfileCache cache(dir.path(), true, log.sink());
        cache.record_peak(kLoad, 6 * vramguard::GiB);
        cache.record_peak(kEncode, 1000, 8);
        cache.record_samples(kEncode, &Profile::weight_samples, {{5, 4096, 700}});
        cache.record_batch_ceiling(kEncode, 64);
        cache.record_weight_budget(kEncode, 8192);
        load = cache.get(kLoad);
        encode = cache.get(kEncode);
    }
    EXPECT_EQ(scalars(load), (Profile{6 * vramguard::GiB, 0, 0, 0}));
    ASSERT_EQ(load.load_samples.size(), 1u);
    EXPECT_EQ(load.load_samples[0].size, 0u);
    EXPECT_EQ(load.load_samples[0].peak_bytes, 6 * vramguard::GiB);
    EXPECT_TRUE(load.item_samples.empty() && load.weight_samples.empty());
    // A weight sample counts for neither peak: only loads and item chunks do.
    EXPECT_EQ(scalars(encode), (Profile{1000, 125, 64, 8192}));
    ASSERT_EQ(encode.item_samples.size(), 1u);
    EXPECT_EQ(encode.item_samples[0].size, 8u);
    EXPECT_EQ(encode.item_samples[0].peak_bytes, 1000u);
    EXPECT_EQ(encode.weight_samples, (std::vector<ProfileSample>{{5, 4096, 700}}));
    EXPECT_TRUE(encode.load_samples.empty());

    EXPECT_EQ(dir.file(kLoad.hex() + ".profile"), ProfileCache(dir.path(), true).path_for(kLoad));
    ProfileCache fresh(dir.path(), true, log.sink());
    EXPECT_EQ(fresh.find(kLoad), load);  // samples and stamps included
    EXPECT_EQ(fresh.find(kEncode), encode);
    // The file is the documented format and names its key for a person reading the directory.
    const std::string text = read_text(fresh.path_for(kEncode));
    EXPECT_EQ(text.rfind("vramguard-profile 2\n", 0), 0u) << text;
    EXPECT_NE(text.find("label encode{model=m}\n"), std::string::npos) << text;
    EXPECT_NE(text.find("\nsamples 2\nitems " + std::to_string(encode.item_samples[0].stamp) +
                        " 8 1000\nweight 5 4096 700\nchecksum "),
              std::string::npos)
        << text;
    EXPECT_EQ(vramguard::detail::parse_profile(text, kEncode), encode);
    EXPECT_EQ(text, vramguard::detail::serialize_profile(kEncode, encode));
    EXPECT_EQ(log.all(), "");
}

// Each record is a sample; the peak is the highest of the newest profile_window, wherever they
// were recorded.
TEST(ProfileCache, PeakIsTheHighestOfTheWindow) {
    TempDir dir;
    {
        ProfileCache cache(dir.path(), true);
        cache.record_peak(kLoad, 100);
        cache.record_peak(kLoad, 50);
        EXPECT_EQ(cache.get(kLoad).peak_bytes, 100u);
        cache.record_peak(kLoad, 200);
        EXPECT_EQ(cache.get(kLoad).peak_bytes, 200u);
        cache.reload(kLoad);
        EXPECT_EQ(cache.get(kLoad).peak_bytes, 200u);
        EXPECT_EQ(peaks_of(cache.get(kLoad).load_samples),
                  (std::vector<std::uint64_t>{100, 50, 200}));
    }
    ProfileCache other(dir.path(), true);
    other.record_peak(kLoad, 150);  // lower, from a "new run": 200 is still in the window
    EXPECT_EQ(other.get(kLoad).peak_bytes, 200u);
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kLoad).peak_bytes, 200u);
    EXPECT_EQ(peaks_of(ProfileCache(dir.path(), true).get(kLoad).load_samples),
              (std::vector<std::uint64_t>{100, 50, 200, 150}));

    // Between two live caches on one directory, a write keeps the other's samples: it re-reads
    // the file under the lock and writes the union.
    ProfileCache a(dir.path(), true), b(dir.path(), true);
    a.record_peak(kEncode, 10);
    b.record_peak(kEncode, 30);  // b read the file (10) first, then wrote 10, 30
    a.record_peak(kEncode, 20);  // a still holds only 10: writes 10, 30, 20
    EXPECT_EQ(a.get(kEncode).peak_bytes, 30u);
    EXPECT_EQ(peaks_of(a.get(kEncode).load_samples), (std::vector<std::uint64_t>{10, 30, 20}));
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kEncode), a.get(kEncode));
}

TEST(ProfileCache, PeakPerItemRoundsUpAndIsTheHighestOfTheWindow) {
    ProfileCache cache("", false);
    cache.record_peak(kEncode, 10, 3);
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, 4u);
    cache.record_peak(kEncode, 9, 3);
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, 4u);
    cache.record_peak(kEncode, 100, 1);
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{100, 100, 0, 0}));
    cache.record_peak(kEncode, UINT64_MAX, 2);
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, UINT64_MAX / 2 + 1);
    EXPECT_EQ(cache.get(kEncode).peak_bytes, UINT64_MAX);
    // Weight samples count for neither peak.
    cache.record_samples(kEncode, &Profile::weight_samples, {{1, 1, 7}});
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, UINT64_MAX / 2 + 1);
    // A window of lower ones later, both peaks have come down: nothing wins for ever.
    for (std::size_t i = 0; i < profile_window; ++i) cache.record_peak(kEncode, 6, 3);
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{6, 2, 0, 0}));
    EXPECT_EQ(cache.get(kEncode).item_samples.size(), profile_window);
    // items == 0 is a load sample: it leaves the per-item peak alone.
    cache.record_peak(kLoad, 10);
    EXPECT_EQ(scalars(cache.get(kLoad)), (Profile{10, 0, 0, 0}));
    EXPECT_EQ(cache.get(kLoad).item_samples.size(), 0u);
    // A load sample and item samples on one key: the peak is the highest of both.
    cache.record_peak(kEncode, 11);
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{11, 2, 0, 0}));
}

// One wrong reading (another process's allocation seen as ours) ages out after a window of
// normal ones, in memory and on disk.
TEST(ProfileCache, WrongPeakAgesOutAfterAWindow) {
    TempDir dir;
    ProfileCache cache(dir.path(), true);
    const std::uint64_t wrong = 1000 * vramguard::GiB, normal = 2 * vramguard::GiB;
    cache.record_peak(kLoad, wrong);
    cache.record_peak(kEncode, wrong, 4);
    for (std::size_t i = 0; i + 1 < profile_window; ++i) {
        cache.record_peak(kLoad, normal - i);
        cache.record_peak(kEncode, normal - i, 4);
    }
    // A window minus one later, the wrong one is still the highest of the window.
    EXPECT_EQ(cache.get(kLoad).peak_bytes, wrong);
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kLoad).peak_bytes, wrong);
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{wrong, wrong / 4, 0, 0}));
    cache.record_peak(kLoad, normal - 100);
    cache.record_peak(kEncode, normal - 100, 4);
    EXPECT_EQ(scalars(cache.get(kLoad)), (Profile{normal, 0, 0, 0}));
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{normal, normal / 4, 0, 0}));
    EXPECT_EQ(cache.get(kLoad).load_samples.size(), profile_window);
    EXPECT_EQ(cache.get(kLoad).load_samples.front().peak_bytes, normal);
    EXPECT_EQ(cache.get(kLoad).load_samples.back().peak_bytes, normal - 100);
    ProfileCache fresh(dir.path(), true);
    EXPECT_EQ(fresh.get(kLoad), cache.get(kLoad));
    EXPECT_EQ(fresh.get(kEncode), cache.get(kEncode));
    EXPECT_EQ(vramguard::detail::parse_profile(read_text(cache.path_for(kLoad)), kLoad)->peak_bytes,
              normal);
}

// Two caches on one directory (as two processes would be): the file holds the newest window of
// the union of both, each sample once, whatever the order of the writes.
TEST(ProfileCache, TwoCachesKeepTheNewestWindowOfTheUnion) {
    TempDir dir;
    ProfileCache a(dir.path(), true), b(dir.path(), true);
    // Explicit stamps: a the odd ones, b the even ones, in batches out of order, and both the
    // same few (a sample already merged must not count twice).
    for (std::uint64_t first = 1; first <= 41; first += 10) {
        std::vector<ProfileSample> odd, even;
        for (const ProfileSample& s : stamped(first, first + 9, 3))
            (s.stamp % 2 ? odd : even).push_back(s);
        b.record_samples(kEncode, &Profile::item_samples, even);
        a.record_samples(kEncode, &Profile::item_samples, odd);
    }
    a.record_samples(kEncode, &Profile::item_samples, stamped(45, 50, 3));  // b wrote these too
    b.record_samples(kEncode, &Profile::item_samples, stamped(47, 50, 3));  // and a these
    a.record_samples(kEncode, &Profile::item_samples, stamped(1, 5, 3));    // too old to stay
    b.record_samples(kEncode, &Profile::item_samples, stamped(30, 30, 3));  // already there
    const std::vector<ProfileSample> newest = stamped(50 - profile_window + 1, 50, 3);
    const auto on_disk = vramguard::detail::parse_profile(read_text(a.path_for(kEncode)), kEncode);
    ASSERT_TRUE(on_disk);
    EXPECT_EQ(on_disk->item_samples, newest);
    EXPECT_EQ(scalars(on_disk), (Profile{500, 167, 0, 0}));  // ceil(500 / 3)
    // Each cache holds what it last wrote or read: b wrote last, a learns the rest on reload.
    EXPECT_EQ(b.get(kEncode), *on_disk);
    a.reload(kEncode);
    EXPECT_EQ(a.get(kEncode), *on_disk);

    // The same with clock stamps, alternating: the window is the last profile_window records.
    for (std::uint64_t i = 1; i <= 40; ++i) (i % 2 ? a : b).record_peak(kLoad, i);
    std::vector<std::uint64_t> expected;
    for (std::uint64_t i = 40 - profile_window + 1; i <= 40; ++i) expected.push_back(i);
    const Profile loads = ProfileCache(dir.path(), true).get(kLoad);
    EXPECT_EQ(peaks_of(loads.load_samples), expected);
    EXPECT_EQ(loads.peak_bytes, 40u);
    EXPECT_EQ(b.get(kLoad), loads);
}

// A version 1 file is read as its four numbers; the next record rewrites it as version 2, and
// its peaks stand until samples of their kind replace them.
TEST(ProfileCache, Version1FileIsReadThenRewrittenAsVersion2) {
    TempDir dir;
    const std::string path = dir.write(
        kEncode.hex() + ".profile",
        checksummed("vramguard-profile 1\nkey " + kEncode.hex() + "\nlabel " + kEncode.label() +
                    "\npeak_bytes 5000\npeak_bytes_per_item 600\nbatch_ceiling 8\n"
                    "weight_budget 4096\n"));
    LogCapture log;
    ProfileCache cache(dir.path(), true, log.sink());
    EXPECT_EQ(cache.find(kEncode), (Profile{5000, 600, 8, 4096}));

    cache.record_batch_ceiling(kEncode, 16);
    std::string text = read_text(path);
    EXPECT_EQ(text, vramguard::detail::serialize_profile(kEncode, Profile{5000, 600, 16, 4096}));
    EXPECT_EQ(text.rfind("vramguard-profile 2\n", 0), 0u) << text;

    // A weight sample replaces neither peak; a load sample replaces the peak, not the per-item.
    cache.record_samples(kEncode, &Profile::weight_samples, {{1, 100, 9000}});
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{5000, 600, 16, 4096}));
    cache.record_peak(kEncode, 300);
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{300, 600, 16, 4096}));
    // An item sample replaces the per-item peak.
    cache.record_peak(kEncode, 400, 4);
    EXPECT_EQ(scalars(cache.get(kEncode)), (Profile{400, 100, 16, 4096}));
    const Profile now = cache.get(kEncode);
    EXPECT_EQ(read_text(path), vramguard::detail::serialize_profile(kEncode, now));
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kEncode), now);
    EXPECT_EQ(log.all(), "");

    // Item samples alone (no load sample) replace both v1 peaks.
    const Key other = Key::of("v1-items");
    dir.write(other.hex() + ".profile",
              checksummed("vramguard-profile 1\nkey " + other.hex() + "\nlabel " + other.label() +
                          "\npeak_bytes 5000\npeak_bytes_per_item 600\nbatch_ceiling 0\n"
                          "weight_budget 0\n"));
    cache.record_peak(other, 90, 3);
    EXPECT_EQ(scalars(cache.get(other)), (Profile{90, 30, 0, 0}));
    EXPECT_EQ(scalars(ProfileCache(dir.path(), true).get(other)), (Profile{90, 30, 0, 0}));
}

// A directory lock held elsewhere (another process's write, hung) delays a record by at most
// lock_timeout: the write is skipped with a warning, the cache stays persistent, and the next
// record after the lock is released writes what was skipped.
TEST(ProfileCache, LockHeldElsewhereSkipsTheWriteWithoutDegrading) {
    TempDir dir;
    LogCapture log;
    ProfileCache cache(dir.path(), true, log.sink());
    cache.record_peak(kLoad, 100);
    const Profile before = cache.get(kLoad);

    // flock conflicts between open file descriptions, even within one process.
    const int holder = ::open(dir.file(".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(holder, 0);
    ASSERT_EQ(::flock(holder, LOCK_EX | LOCK_NB), 0);
    const auto start = std::chrono::steady_clock::now();
    cache.record_peak(kLoad, 200);
    const auto waited = std::chrono::steady_clock::now() - start;
    EXPECT_GE(waited, ProfileCache::lock_timeout);
    EXPECT_LT(waited, ProfileCache::lock_timeout + std::chrono::seconds(3));  // one bounded wait
    EXPECT_EQ(log.count(Level::warn), 1u) << log.all();
    EXPECT_NE(log.all().find("stayed locked"), std::string::npos) << log.all();
    EXPECT_EQ(log.all().find("memory only"), std::string::npos) << log.all();
    EXPECT_TRUE(cache.persistent());
    EXPECT_EQ(cache.get(kLoad).peak_bytes, 200u);                  // kept in memory
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kLoad), before);  // not on disk yet
    ASSERT_EQ(::close(holder), 0);

    cache.record_batch_ceiling(kLoad, 4);  // the next record writes the skipped sample too
    const Profile after = cache.get(kLoad);
    EXPECT_EQ(scalars(after), (Profile{200, 0, 4, 0}));
    EXPECT_EQ(peaks_of(after.load_samples), (std::vector<std::uint64_t>{100, 200}));
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kLoad), after);
    EXPECT_EQ(log.count(Level::warn), 1u) << log.all();
    EXPECT_TRUE(cache.persistent());
}

TEST(ProfileCache, LatestCeilingAndBudgetWin) {
    TempDir dir;
    {
        ProfileCache cache(dir.path(), true);
        cache.record_batch_ceiling(kEncode, 64);
        cache.record_batch_ceiling(kEncode, 16);
        cache.record_weight_budget(kEncode, 8192);
        cache.record_weight_budget(kEncode, 4096);
        EXPECT_EQ(cache.get(kEncode), (Profile{0, 0, 16, 4096}));
        cache.record_batch_ceiling(kEncode, 32);
        EXPECT_EQ(cache.get(kEncode).batch_ceiling, 32u);
    }
    ProfileCache fresh(dir.path(), true);
    EXPECT_EQ(fresh.get(kEncode), (Profile{0, 0, 32, 4096}));
    fresh.record_batch_ceiling(kEncode, 8);  // lower, and latest: it wins on disk too
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kEncode).batch_ceiling, 8u);
}

// A peak recorded in one cache must not overwrite a ceiling another cache recorded since.
TEST(ProfileCache, WritesMergeFieldsOtherWritersChanged) {
    TempDir dir;
    ProfileCache a(dir.path(), true), b(dir.path(), true);
    a.record_peak(kEncode, 100);
    b.record_peak(kEncode, 50);  // b loads {100}, adds 50
    a.record_batch_ceiling(kEncode, 16);
    b.record_peak(kEncode, 200);  // b's memory has ceiling 0, but it did not record one
    const Profile on_disk = ProfileCache(dir.path(), true).get(kEncode);
    EXPECT_EQ(scalars(on_disk), (Profile{200, 0, 16, 0}));
    EXPECT_EQ(peaks_of(on_disk.load_samples), (std::vector<std::uint64_t>{100, 50, 200}));
    EXPECT_EQ(b.get(kEncode), on_disk);  // and b learned the file's ceiling
}

// Records sit on every guarded call: one that changes nothing must not touch the disk. A peak is
// a new sample each time, so it always writes; limits and samples already known do not.
TEST(ProfileCache, UnchangedRecordsDoNotWrite) {
    TempDir dir;
    ProfileCache cache(dir.path(), true);
    const std::vector<ProfileSample> chunks{{10, 8, 1000}, {11, 16, 1900}};
    cache.record_samples(kEncode, &Profile::item_samples, chunks);
    cache.record_samples(kEncode, &Profile::weight_samples, {{12, 4096, 3000}});
    cache.record_batch_ceiling(kEncode, 8);
    cache.record_weight_budget(kEncode, 4096);
    const std::string path = cache.path_for(kEncode);
    const ino_t before = inode_of(path);  // every write renames a new file into place
    ASSERT_NE(before, 0u);
    cache.record_samples(kEncode, &Profile::item_samples, chunks);
    cache.record_samples(kEncode, &Profile::item_samples, {chunks[1]});
    cache.record_samples(kEncode, &Profile::item_samples, {});
    cache.record_samples(kEncode, &Profile::weight_samples, {{12, 4096, 3000}});
    cache.record_batch_ceiling(kEncode, 8);
    cache.record_weight_budget(kEncode, 4096);
    EXPECT_EQ(inode_of(path), before);
    cache.record_samples(kEncode, &Profile::item_samples, stamped(20, 20 + profile_window, 1));
    const ino_t full = inode_of(path);
    EXPECT_NE(full, before);
    // Older than a full window: it would be dropped at once, so nothing changes.
    cache.record_samples(kEncode, &Profile::item_samples, {{5, 1, 1}});
    EXPECT_EQ(inode_of(path), full);
    cache.record_peak(kEncode, 1, 1);
    EXPECT_NE(inode_of(path), full);
}

TEST(ProfileCache, PersistFalseNeverTouchesTheDisk) {
    TempDir dir;
    const std::string sub = dir.file("not-created");
    LogCapture log;
    ProfileCache cache(sub, false, log.sink());
    EXPECT_FALSE(cache.persistent());
    cache.record_peak(kLoad, 100, 2);
    cache.record_batch_ceiling(kLoad, 4);
    cache.record_weight_budget(kLoad, 40);
    EXPECT_EQ(scalars(cache.get(kLoad)), (Profile{100, 50, 4, 40}));
    EXPECT_EQ(peaks_of(cache.get(kLoad).item_samples), (std::vector<std::uint64_t>{100}));
    cache.forget(kLoad);
    EXPECT_FALSE(cache.find(kLoad));
    cache.record_peak(kLoad, 7);
    EXPECT_FALSE(exists(sub));
    EXPECT_TRUE(list_dir(dir.path()).empty());
    EXPECT_EQ(log.all(), "");

    // Nor does a memory-only cache on an existing directory read it.
    ProfileCache writer(dir.path(), true);
    writer.record_peak(kEncode, 5);
    EXPECT_FALSE(ProfileCache(dir.path(), false).find(kEncode));
}

TEST(ProfileCache, ForgetDropsMemoryAndFile) {
    TempDir dir;
    ProfileCache cache(dir.path(), true);
    cache.record_peak(kLoad, 100);
    cache.record_peak(kEncode, 100);
    ASSERT_TRUE(exists(cache.path_for(kLoad)));
    cache.forget(kLoad);
    EXPECT_FALSE(exists(cache.path_for(kLoad)));
    EXPECT_FALSE(cache.find(kLoad));
    EXPECT_TRUE(cache.find(kEncode));
    cache.record_peak(kLoad, 10);  // starts again from nothing
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kLoad).peak_bytes, 10u);
    cache.forget(Key::of("never-recorded"));
}

TEST(ProfileCache, ReloadSeesOtherWriters) {
    TempDir dir;
    ProfileCache reader(dir.path(), true), writer(dir.path(), true);
    EXPECT_FALSE(reader.find(kLoad));  // the miss is remembered: the file is read once per key
    writer.record_peak(kLoad, 100);
    EXPECT_FALSE(reader.find(kLoad));
    reader.reload(kLoad);
    EXPECT_EQ(reader.get(kLoad).peak_bytes, 100u);
    writer.record_peak(kLoad, 300);
    EXPECT_EQ(reader.get(kLoad).peak_bytes, 100u);
    reader.reload(kLoad);
    EXPECT_EQ(reader.get(kLoad).peak_bytes, 300u);
}

TEST(ProfileCache, DefaultDirectoryPrecedence) {
    ScopedEnv own("VRAMGUARD_PROFILE_DIR", "/srv/profiles");
    ScopedEnv xdg("XDG_CACHE_HOME", "/xdg/cache");
    ScopedEnv home("HOME", "/home/user");
    EXPECT_EQ(ProfileCache::default_directory(), "/srv/profiles");
    {
        ScopedEnv empty("VRAMGUARD_PROFILE_DIR", "");
        EXPECT_EQ(ProfileCache::default_directory(), "/xdg/cache/vramguard");
    }
    ScopedEnv no_own("VRAMGUARD_PROFILE_DIR", std::nullopt);
    EXPECT_EQ(ProfileCache::default_directory(), "/xdg/cache/vramguard");
    {
        ScopedEnv relative("XDG_CACHE_HOME", "relative/cache");  // the XDG spec says: ignore it
        EXPECT_EQ(ProfileCache::default_directory(), "/home/user/.cache/vramguard");
    }
    ScopedEnv no_xdg("XDG_CACHE_HOME", std::nullopt);
    EXPECT_EQ(ProfileCache::default_directory(), "/home/user/.cache/vramguard");
    ScopedEnv no_home("HOME", std::nullopt);
    EXPECT_EQ(ProfileCache::default_directory(), "");
}

TEST(ProfileCache, EmptyDirectoryArgumentUsesTheDefault) {
    TempDir dir;
    const std::string target = dir.file("from-env/nested");
    {
        ScopedEnv own("VRAMGUARD_PROFILE_DIR", target + "/");
        ProfileCache cache;
        EXPECT_EQ(cache.directory(), target);  // trailing slash dropped
        EXPECT_TRUE(cache.persistent());
        cache.record_peak(kLoad, 42);
        EXPECT_TRUE(exists(target + "/" + kLoad.hex() + ".profile"));
    }
    ScopedEnv no_own("VRAMGUARD_PROFILE_DIR", std::nullopt);
    ScopedEnv no_xdg("XDG_CACHE_HOME", std::nullopt);
    ScopedEnv no_home("HOME", std::nullopt);
    LogCapture log;
    ProfileCache cache("", true, log.sink());
    EXPECT_EQ(cache.directory(), "");
    EXPECT_FALSE(cache.persistent());
    cache.record_peak(kLoad, 42);
    EXPECT_EQ(cache.get(kLoad).peak_bytes, 42u);
    EXPECT_EQ(log.count(Level::warn), 0u) << log.all();  // a fact of the environment, not a fault
}

namespace {

struct Damage {
    const char* name;
    std::string (*make)(const std::string& good);
};

const Damage kDamages[] = {
    {"garbage", [](const std::string&) { return "\x7f\x45LF\0\x01\x02 not a profile\n\n"s; }},
    {"empty", [](const std::string&) { return std::string(); }},
    {"truncated", [](const std::string& good) { return good.substr(0, good.size() - 7); }},
    {"bad checksum",
     [](const std::string& good) {
         std::string text = good;
         text.replace(text.find("peak_bytes 100"), 14, "peak_bytes 900");
         return text;
     }},
    {"other key's content",
     [](const std::string&) {
         return vramguard::detail::serialize_profile(kEncode, Profile{100, 0, 4, 0});
     }},
    {"newer version",
     [](const std::string& good) { return "vramguard-profile 3\n" + good.substr(20); }},
    {"version 1 with samples",
     [](const std::string& good) {
         std::string body = "vramguard-profile 1\n" + good.substr(20);
         return checksummed(body.substr(0, body.find("checksum ")));
     }},
    {"sample out of order",
     [](const std::string& good) {
         std::string body = good.substr(0, good.find("samples "));
         return checksummed(body + "samples 2\nload 9 0 100\nload 8 0 100\n");
     }},
};

}  // namespace

TEST(ProfileCache, DamagedFileIsIgnoredWithOneWarningThenOverwritten) {
    for (const Damage& damage : kDamages) {
        SCOPED_TRACE(damage.name);
        TempDir dir;
        const std::string good = vramguard::detail::serialize_profile(
            kLoad, with_samples(Profile{100, 0, 4, 0}, {{1, 0, 100}}, {}, {}));
        const std::string path = dir.write(kLoad.hex() + ".profile", damage.make(good));
        LogCapture log;
        ProfileCache cache(dir.path(), true, log.sink());
        EXPECT_FALSE(cache.find(kLoad));
        EXPECT_EQ(log.count(Level::warn), 1u) << log.all();
        EXPECT_NE(log.all().find(path), std::string::npos) << log.all();
        EXPECT_FALSE(cache.find(kLoad));
        cache.record_peak(kLoad, 123);  // re-reads the damaged file under the lock: no new warning
        cache.record_batch_ceiling(kLoad, 2);
        EXPECT_EQ(log.count(Level::warn), 1u) << log.all();
        EXPECT_TRUE(cache.persistent());
        // Nothing of the damaged file survives: only what was recorded since.
        const Profile recorded = cache.get(kLoad);
        EXPECT_EQ(scalars(recorded), (Profile{123, 0, 2, 0}));
        EXPECT_EQ(peaks_of(recorded.load_samples), (std::vector<std::uint64_t>{123}));
        EXPECT_EQ(vramguard::detail::parse_profile(read_text(path), kLoad), recorded);
        LogCapture fresh_log;
        EXPECT_EQ(ProfileCache(dir.path(), true, fresh_log.sink()).find(kLoad), recorded);
        EXPECT_EQ(fresh_log.all(), "");
    }
}

TEST(ProfileCache, NonRegularFileIsIgnored) {
    TempDir dir;
    const Key key = Key::of("fifo");
    ASSERT_EQ(::mkfifo(dir.file(key.hex() + ".profile").c_str(), 0644), 0);
    LogCapture log;
    ProfileCache cache(dir.path(), true, log.sink());
    EXPECT_FALSE(cache.find(key));  // and does not hang opening the FIFO
    EXPECT_EQ(log.count(Level::warn), 1u) << log.all();
    cache.record_peak(key, 5);  // rename replaces the FIFO
    EXPECT_EQ(ProfileCache(dir.path(), true).get(key).peak_bytes, 5u);
}

namespace {

// Records into a cache that cannot write, and checks it degrades once and still remembers.
void expect_memory_only_with_one_warning(const std::string& directory) {
    LogCapture log;
    ProfileCache cache(directory, true, log.sink());
    for (std::uint64_t i = 1; i <= 20; ++i) {
        cache.record_peak(kLoad, i * 100, 2);
        cache.record_batch_ceiling(kEncode, i);
        cache.record_weight_budget(kEncode, i * 10);
        EXPECT_NO_THROW(cache.find(Key::of("k", {{"i", std::to_string(i)}})));
        cache.forget(Key::of("gone"));
    }
    EXPECT_FALSE(cache.persistent());
    EXPECT_EQ(scalars(cache.get(kLoad)), (Profile{2000, 1000, 0, 0}));
    EXPECT_EQ(cache.get(kLoad).item_samples.size(), 20u);
    EXPECT_EQ(cache.get(kEncode), (Profile{0, 0, 20, 200}));
    EXPECT_EQ(log.count(Level::warn), 1u) << log.all();
    EXPECT_NE(log.all().find("memory only"), std::string::npos) << log.all();
}

}  // namespace

TEST(ProfileCache, UncreatableDirectoryDegradesToMemoryOnly) {
    TempDir dir;
    dir.write("file", "a regular file");
    // mkdir under a regular file fails with ENOTDIR, for root too.
    expect_memory_only_with_one_warning(dir.file("file/sub"));
}

TEST(ProfileCache, ReadOnlyDirectoryDegradesToMemoryOnly) {
    TempDir dir;
    const std::string read_only = dir.file("read-only");
    ASSERT_EQ(::mkdir(read_only.c_str(), 0755), 0);
    ASSERT_EQ(::chmod(read_only.c_str(), 0555), 0);
    const std::string probe = read_only + "/probe";
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ::close(fd);
        ::unlink(probe.c_str());
        GTEST_SKIP() << "permissions do not stop writes here (root?); "
                        "UncreatableDirectoryDegradesToMemoryOnly covers degradation";
    }
    expect_memory_only_with_one_warning(read_only);
}

TEST(ProfileCache, ThrowingLogSinkNeverEscapes) {
    TempDir dir;
    dir.write("file", "x");
    ProfileCache* cache = nullptr;
    const vramguard::LogSink throwing = [](Level, std::string_view) {
        throw std::runtime_error("sink is broken");
    };
    ASSERT_NO_THROW(cache = new ProfileCache(dir.file("file/sub"), true, throwing));
    EXPECT_NO_THROW(cache->record_peak(kLoad, 1));
    EXPECT_EQ(cache->get(kLoad).peak_bytes, 1u);
    delete cache;
}

TEST(ProfileCache, StaleTempFilesAreRemoved) {
    TempDir dir;
    const pid_t dead = dead_pid();
    const std::string me = std::to_string(::getpid());
    const std::string dead_temp = ".x." + std::to_string(dead) + ".0.tmp";
    const std::string dead_temp_hex = "." + kLoad.hex() + "." + std::to_string(dead) + ".7.tmp";
    const std::string live_temp = ".y." + me + ".0.tmp";
    const std::string old_live_temp = ".z." + me + ".1.tmp";
    for (const std::string& name : {dead_temp, dead_temp_hex, live_temp, old_live_temp})
        dir.write(name, "partial");
    dir.write("keep.tmp", "not ours");
    dir.write(".notes.tmp", "not ours either");
    // Two hours old: no write takes that long, whoever its pid now belongs to.
    const struct timeval old_times[2] = {{::time(nullptr) - 7200, 0}, {::time(nullptr) - 7200, 0}};
    ASSERT_EQ(::utimes(dir.file(old_live_temp).c_str(), old_times), 0);

    ProfileCache cache(dir.path(), true);
    EXPECT_FALSE(exists(dir.file(dead_temp)));
    EXPECT_FALSE(exists(dir.file(dead_temp_hex)));
    EXPECT_FALSE(exists(dir.file(old_live_temp)));
    EXPECT_TRUE(exists(dir.file(live_temp)));  // its writer (this process) may still rename it
    EXPECT_TRUE(exists(dir.file("keep.tmp")));
    EXPECT_TRUE(exists(dir.file(".notes.tmp")));
}

TEST(ProfileCache, WritesLeaveNoTemporaryFiles) {
    TempDir dir;
    ProfileCache cache(dir.path(), true);
    for (std::uint64_t i = 1; i <= 10; ++i) cache.record_peak(kLoad, i);
    cache.record_batch_ceiling(kEncode, 3);
    EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{".lock", kEncode.hex() + ".profile",
                                                              kLoad.hex() + ".profile"}));
    struct stat st {};
    ASSERT_EQ(::stat(cache.path_for(kLoad).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0600, 0600u);
}

// Records from many threads in any order: the window is the newest profile_window of all of
// them (the merge is a union, so the order of arrival cannot matter), in memory and on disk.
TEST(ProfileCache, ManyThreadsKeepTheNewestWindow) {
    for (const bool persist : {false, true}) {
        SCOPED_TRACE(persist ? "persistent" : "memory only");
        TempDir dir;
        ProfileCache cache(dir.path(), persist);
        const std::uint64_t threads = 8;
        // Disk writes fsync twice each, so the persistent run is smaller.
        const std::uint64_t rounds = persist ? 40 : 5000;
        std::vector<std::thread> workers;
        for (std::uint64_t t = 0; t < threads; ++t) {
            workers.emplace_back([&cache, t, rounds] {
                for (std::uint64_t j = 0; j < rounds; ++j) {
                    // Stamps 1..threads * rounds, each once, handed out in no particular order.
                    const std::uint64_t stamp = j * threads + t + 1;
                    cache.record_samples(kEncode, &Profile::item_samples, {{stamp, 2, stamp * 10}});
                    cache.record_batch_ceiling(kEncode, j);
                    (void)cache.find(Key::of("thread", {{"t", std::to_string(t % 3)}}));
                    if (j % 16 == 0) cache.record_peak(Key::of("other"), stamp, 2);
                }
            });
        }
        for (std::thread& worker : workers) worker.join();
        const std::uint64_t total = threads * rounds;
        Profile expected{total * 10, total * 5, rounds - 1, 0};
        expected.item_samples = stamped(total - profile_window + 1, total, 2);
        EXPECT_EQ(cache.get(kEncode), expected);
        const Profile other = cache.get(Key::of("other"));
        EXPECT_EQ(other.item_samples.size(),
                  std::min<std::size_t>(profile_window, threads * ((rounds + 15) / 16)));
        EXPECT_TRUE(std::is_sorted(other.item_samples.begin(), other.item_samples.end()));
        if (persist) {
            ProfileCache fresh(dir.path(), true);
            EXPECT_EQ(fresh.get(kEncode), expected);
            EXPECT_EQ(fresh.get(Key::of("other")), other);
        }
    }
}

// Several processes record into one directory while another parses the file nonstop: the reader
// never sees a torn file (rename), and the file ends as the newest window of every process's
// samples, each once (flock + re-read + union).
TEST(ProfileCache, ConcurrentWriterProcesses) {
    TempDir dir;
    const std::string stop_file = dir.file("stop");
    const std::uint64_t writers = 6;
    const std::uint64_t rounds = 30;
    const Key shared = Key::of("shared", {{"model", "m"}});
    const Key side = Key::of("side", {{"w", "any"}});

    const pid_t reader = ::fork();
    ASSERT_GE(reader, 0);
    if (reader == 0) {
        // Exit codes: 0 ok, 2 torn/invalid file seen, 3 never saw a file, 4 the window went back.
        // Every write is the union of the file and a process's samples, so the window never
        // shrinks, its newest never goes back, and once full its oldest never goes back either
        // (before that, a process's older sample may arrive after another's newer one).
        std::uint64_t parsed = 0, last_oldest = 0, last_newest = 0;
        std::size_t last_size = 0;
        const std::string path = dir.file(shared.hex() + ".profile");
        for (;;) {
            const bool stopping = ::access(stop_file.c_str(), F_OK) == 0;
            std::string text;
            int error = 0;
            const auto read = vramguard::detail::read_small_file(path, text, error);
            if (read == vramguard::detail::ReadResult::failed) ::_exit(2);
            if (read == vramguard::detail::ReadResult::ok) {
                const auto profile = vramguard::detail::parse_profile(text, shared);
                if (!profile || profile->item_samples.empty()) ::_exit(2);
                const std::uint64_t oldest = profile->item_samples.front().stamp;
                const std::uint64_t newest = profile->item_samples.back().stamp;
                const std::size_t size = profile->item_samples.size();
                if (size < last_size || newest < last_newest ||
                    (last_size == profile_window && oldest < last_oldest))
                    ::_exit(4);
                last_size = size;
                last_oldest = oldest;
                last_newest = newest;
                ++parsed;
            }
            if (stopping) ::_exit(parsed > 0 ? 0 : 3);
        }
    }

    std::vector<pid_t> children;
    for (std::uint64_t w = 0; w < writers; ++w) {
        const pid_t child = ::fork();
        ASSERT_GE(child, 0);
        if (child == 0) {
            // Exit codes: 0 ok, 5 a warning was logged, 6 own newest sample lost, 7 exception,
            // 8 the directory stayed locked for ten lock_timeouts in a row.
            try {
                // A write that found the directory locked for lock_timeout (six processes
                // fsyncing in turn on a loaded machine can starve one) is skipped with a
                // warning and left to the next record: allowed, and flushed below.
                std::atomic<int> warnings{0}, lock_waits{0};
                ProfileCache cache(
                    dir.path(), true, [&warnings, &lock_waits](Level level, std::string_view text) {
                        if (level < Level::warn) return;
                        ++(text.find("stayed locked") != std::string_view::npos ? lock_waits
                                                                                : warnings);
                    });
                bool unsaved_shared = false, unsaved_side = false;
                // Whether a record's write timed out. Not every record writes (one the file
                // already holds changes nothing), so only a flush below clears `unsaved`.
                const auto record = [&](bool& unsaved, const auto& change) {
                    const int before = lock_waits;
                    change();
                    if (lock_waits != before) unsaved = true;
                };
                std::uint64_t stamp = 0;
                for (std::uint64_t j = 0; j < rounds; ++j) {
                    stamp = j * writers + w + 1;  // every process's stamps interleave
                    record(unsaved_shared, [&] {
                        cache.record_samples(shared, &Profile::item_samples,
                                             {{stamp, 2, stamp * 10}});
                    });
                    record(unsaved_shared, [&] { cache.record_batch_ceiling(shared, j + 1); });
                    if (j % 6 == 0)
                        record(unsaved_side, [&] { cache.record_peak(side, j * 10 + w + 1); });
                }
                // Flush what a timed-out write left in memory: a new weight budget (not checked
                // below) is a change, so its write carries everything else too.
                for (const auto& [key, unsaved] :
                     {std::pair<const Key&, bool&>{shared, unsaved_shared},
                      std::pair<const Key&, bool&>{side, unsaved_side}}) {
                    for (int attempt = 0; unsaved; ++attempt) {
                        if (attempt == 10) ::_exit(8);
                        unsaved = false;
                        record(unsaved, [&, &key = key] {
                            cache.record_weight_budget(key, cache.get(key).weight_budget + 1);
                        });
                    }
                }
                cache.reload(shared);
                const Profile after = cache.get(shared);
                const std::vector<ProfileSample>& window = after.item_samples;
                // Its own last sample is there, or a whole window of newer ones pushed it out.
                const bool kept =
                    std::count(window.begin(), window.end(), ProfileSample{stamp, 2, stamp * 10});
                if (!kept && (window.size() < profile_window || window.front().stamp < stamp))
                    ::_exit(6);
                ::_exit(warnings == 0 ? 0 : 5);
            } catch (...) {
                ::_exit(7);
            }
        }
        children.push_back(child);
    }
    for (const pid_t child : children) EXPECT_EQ(wait_child(child), 0);
    dir.write("stop", "");
    EXPECT_EQ(wait_child(reader), 0);

    LogCapture log;
    ProfileCache cache(dir.path(), true, log.sink());
    const std::uint64_t total = writers * rounds;
    // Every writer's last ceiling was `rounds`, so whichever wrote last, the file says `rounds`.
    // (The weight budget counts the flushes of timed-out writes, if any: not compared.)
    Profile shared_profile = cache.get(shared);
    Profile expected{total * 10, total * 5, rounds, shared_profile.weight_budget};
    expected.item_samples = stamped(total - profile_window + 1, total, 2);
    EXPECT_EQ(shared_profile, expected);
    // 5 loads from each of 6 writers fit in one window: none is lost.
    const Profile side_profile = cache.get(side);
    EXPECT_EQ(side_profile.load_samples.size(), 5 * writers);
    EXPECT_EQ(side_profile.peak_bytes, 24 * 10 + writers);
    EXPECT_EQ(log.all(), "");
    for (const std::string& name : list_dir(dir.path()))
        EXPECT_EQ(name.find(".tmp"), std::string::npos) << name;
}
