// SPDX-License-Identifier: MIT
#include <vramguard/memory.hpp>
#include <vramguard/profile.hpp>

#include <gtest/gtest.h>
#include <temp_dir.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
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
static void PrintTo(const Profile& p, std::ostream* out) {
    *out << "Profile{peak_bytes=" << p.peak_bytes
         << ", peak_bytes_per_item=" << p.peak_bytes_per_item
         << ", batch_ceiling=" << p.batch_ceiling << ", weight_budget=" << p.weight_budget << "}";
}
}  // namespace vramguard

using vramguard::Key;
using vramguard::Level;
using vramguard::Profile;
using vramguard::ProfileCache;
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

}  // namespace

// ---------------------------------------------------------------- the file format

TEST(ProfileFormat, RoundTrip) {
    for (const Profile profile :
         {Profile{}, Profile{1, 2, 3, 4}, Profile{UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX},
          Profile{6442450944, 1048576, 64, 8192}}) {
        const std::string text = vramguard::detail::serialize_profile(kLoad, profile);
        std::string error;
        const auto parsed = vramguard::detail::parse_profile(text, kLoad, &error);
        ASSERT_TRUE(parsed) << error << "\n" << text;
        EXPECT_EQ(*parsed, profile);
        EXPECT_EQ(vramguard::detail::parse_profile(text, kLoad.hex()), parsed);
    }
}

// The exact bytes of a file: changing them orphans every stored profile (bump the version line).
TEST(ProfileFormat, PinnedText) {
    const Key key = Key::of("a", {{"b", "c"}});
    EXPECT_EQ(vramguard::detail::serialize_profile(key, Profile{100, 34, 8, 0}),
              "vramguard-profile 1\n"
              "key b127516e7162670c\n"
              "label a{b=c}\n"
              "peak_bytes 100\n"
              "peak_bytes_per_item 34\n"
              "batch_ceiling 8\n"
              "weight_budget 0\n"
              "checksum a8a078ac86c09b52\n");
}

TEST(ProfileFormat, LabelWithAnyBytesStaysOneLine) {
    const Key key = Key::of("x\ny", {{"\r\n", "\0\xff"s}});
    const std::string text = vramguard::detail::serialize_profile(key, Profile{1, 2, 3, 4});
    EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 8);
    EXPECT_EQ(vramguard::detail::parse_profile(text, key), (Profile{1, 2, 3, 4}));
}

TEST(ProfileFormat, RejectsEverythingButAnExactFile) {
    using vramguard::detail::parse_profile;
    const std::string good = vramguard::detail::serialize_profile(kLoad, Profile{100, 10, 8, 512});
    ASSERT_TRUE(parse_profile(good, kLoad));

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
    EXPECT_FALSE(parse_profile("vramguard-profile 2\n", kLoad, &error));
    EXPECT_NE(error.find("version"), std::string::npos) << error;

    // Numbers are strict: rebuild otherwise-valid files with a bad number and a valid checksum.
    const auto with_peak = [](const std::string& digits) {
        std::string text = "vramguard-profile 1\nkey " + kLoad.hex() + "\nlabel " + kLoad.label() +
                           "\npeak_bytes " + digits +
                           "\npeak_bytes_per_item 0\nbatch_ceiling 0\nweight_budget 0\n";
        const std::string checksum = vramguard::detail::hex16(vramguard::detail::fnv1a64(text));
        return text + "checksum " + checksum + "\n";
    };
    EXPECT_EQ(parse_profile(with_peak("18446744073709551615"), kLoad)->peak_bytes, UINT64_MAX);
    for (const char* bad : {"18446744073709551616", "99999999999999999999", "123456789012345678901",
                            "-1", "+1", "01", "1 ", " 1", "1x", "", "0x10", "1e3", "１"})
        EXPECT_FALSE(parse_profile(with_peak(bad), kLoad)) << bad;
    // Windows line endings are not the format.
    std::string crlf;
    for (const char c : good) crlf += c == '\n' ? "\r\n"s : std::string(1, c);
    EXPECT_FALSE(parse_profile(crlf, kLoad));
}

// The fuzzing entry point must survive anything; run under ASan/UBSan this is a small fuzzer.
TEST(ProfileFormat, ArbitraryBytesNeverCrash) {
    std::mt19937_64 random(12345);
    const std::string good = vramguard::detail::serialize_profile(kLoad, Profile{100, 10, 8, 512});
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
    // Recording "nothing known" (zero) creates nothing.
    cache.record_peak(kLoad, 0);
    cache.record_batch_ceiling(kLoad, 0);
    EXPECT_FALSE(cache.find(kLoad));
    EXPECT_FALSE(exists(cache.path_for(kLoad)));
    EXPECT_EQ(log.all(), "");
}

TEST(ProfileCache, RoundTripThroughDisk) {
    TempDir dir;
    LogCapture log;
    {
        ProfileCache cache(dir.path(), true, log.sink());
        cache.record_peak(kLoad, 6 * vramguard::GiB);
        cache.record_peak(kEncode, 1000, 8);
        cache.record_batch_ceiling(kEncode, 64);
        cache.record_weight_budget(kEncode, 8192);
        EXPECT_EQ(cache.get(kLoad), (Profile{6 * vramguard::GiB, 0, 0, 0}));
        EXPECT_EQ(cache.get(kEncode), (Profile{1000, 125, 64, 8192}));
    }
    EXPECT_EQ(dir.file(kLoad.hex() + ".profile"), ProfileCache(dir.path(), true).path_for(kLoad));
    ProfileCache fresh(dir.path(), true, log.sink());
    EXPECT_EQ(fresh.find(kLoad), (Profile{6 * vramguard::GiB, 0, 0, 0}));
    EXPECT_EQ(fresh.find(kEncode), (Profile{1000, 125, 64, 8192}));
    // The file is the documented format and names its key for a person reading the directory.
    const std::string text = read_text(fresh.path_for(kEncode));
    EXPECT_NE(text.find("label encode{model=m}\n"), std::string::npos) << text;
    EXPECT_EQ(vramguard::detail::parse_profile(text, kEncode), (Profile{1000, 125, 64, 8192}));
    EXPECT_EQ(log.all(), "");
}

TEST(ProfileCache, HigherPeakWins) {
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
    }
    ProfileCache other(dir.path(), true);
    other.record_peak(kLoad, 150);  // lower, from a "new run": must not lower the stored peak
    EXPECT_EQ(other.get(kLoad).peak_bytes, 200u);
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kLoad).peak_bytes, 200u);

    // Between two live caches on one directory, a lower in-memory peak cannot overwrite a higher
    // one on disk: the write re-reads the file under the lock.
    ProfileCache a(dir.path(), true), b(dir.path(), true);
    a.record_peak(kEncode, 10);
    b.record_peak(kEncode, 30);  // b read the file (10) first, then wrote 30
    a.record_peak(kEncode, 20);  // a still thinks 10: writes max(20, file 30)
    EXPECT_EQ(a.get(kEncode).peak_bytes, 30u);
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kEncode).peak_bytes, 30u);
}

TEST(ProfileCache, PeakPerItemRoundsUpAndHigherWins) {
    ProfileCache cache("", false);
    cache.record_peak(kEncode, 10, 3);
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, 4u);
    cache.record_peak(kEncode, 9, 3);
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, 4u);
    cache.record_peak(kEncode, 100, 1);
    EXPECT_EQ(cache.get(kEncode), (Profile{100, 100, 0, 0}));
    cache.record_peak(kEncode, UINT64_MAX, 2);
    EXPECT_EQ(cache.get(kEncode).peak_bytes_per_item, UINT64_MAX / 2 + 1);
    // items == 0 leaves the per-item peak alone.
    cache.record_peak(kLoad, 10);
    EXPECT_EQ(cache.get(kLoad), (Profile{10, 0, 0, 0}));
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
    b.record_peak(kEncode, 50);  // b loads {100, ...}; nothing changes
    a.record_batch_ceiling(kEncode, 16);
    b.record_peak(kEncode, 200);  // b's memory has ceiling 0, but it did not record one
    EXPECT_EQ(ProfileCache(dir.path(), true).get(kEncode), (Profile{200, 0, 16, 0}));
    EXPECT_EQ(b.get(kEncode), (Profile{200, 0, 16, 0}));  // and b learned the file's ceiling
}

// Records sit on every guarded call: one that changes nothing must not touch the disk.
TEST(ProfileCache, UnchangedRecordsDoNotWrite) {
    TempDir dir;
    ProfileCache cache(dir.path(), true);
    cache.record_peak(kEncode, 1000, 10);
    cache.record_batch_ceiling(kEncode, 8);
    cache.record_weight_budget(kEncode, 4096);
    const std::string path = cache.path_for(kEncode);
    const ino_t before = inode_of(path);  // every write renames a new file into place
    ASSERT_NE(before, 0u);
    cache.record_peak(kEncode, 1000, 10);
    cache.record_peak(kEncode, 500);
    cache.record_peak(kEncode, 900, 100);
    cache.record_batch_ceiling(kEncode, 8);
    cache.record_weight_budget(kEncode, 4096);
    EXPECT_EQ(inode_of(path), before);
    cache.record_peak(kEncode, 1001);
    EXPECT_NE(inode_of(path), before);
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
    EXPECT_EQ(cache.get(kLoad), (Profile{100, 50, 4, 40}));
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
     [](const std::string& good) { return "vramguard-profile 2\n" + good.substr(20); }},
};

}  // namespace

TEST(ProfileCache, DamagedFileIsIgnoredWithOneWarningThenOverwritten) {
    for (const Damage& damage : kDamages) {
        SCOPED_TRACE(damage.name);
        TempDir dir;
        const std::string good = vramguard::detail::serialize_profile(kLoad, Profile{100, 0, 4, 0});
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
        EXPECT_EQ(vramguard::detail::parse_profile(read_text(path), kLoad),
                  (Profile{123, 0, 2, 0}));
        LogCapture fresh_log;
        EXPECT_EQ(ProfileCache(dir.path(), true, fresh_log.sink()).find(kLoad),
                  (Profile{123, 0, 2, 0}));
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
    EXPECT_EQ(cache.get(kLoad), (Profile{2000, 1000, 0, 0}));
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

TEST(ProfileCache, ManyThreadsLoseNoMaximum) {
    for (const bool persist : {false, true}) {
        SCOPED_TRACE(persist ? "persistent" : "memory only");
        TempDir dir;
        ProfileCache cache(dir.path(), persist);
        const int threads = 8;
        // Disk writes fsync twice each, so the persistent run is smaller.
        const std::uint64_t rounds = persist ? 40 : 5000;
        std::vector<std::thread> workers;
        for (int t = 0; t < threads; ++t) {
            workers.emplace_back([&cache, t, rounds] {
                for (std::uint64_t j = 0; j < rounds; ++j) {
                    const std::uint64_t peak = j * 1000 + static_cast<std::uint64_t>(t);
                    cache.record_peak(kLoad, peak, 2);
                    cache.record_batch_ceiling(kEncode, j);
                    (void)cache.find(Key::of("thread", {{"t", std::to_string(t % 3)}}));
                    if (j % 16 == 0) cache.record_peak(Key::of("other"), peak);
                }
            });
        }
        for (std::thread& worker : workers) worker.join();
        const std::uint64_t max_peak = (rounds - 1) * 1000 + threads - 1;
        EXPECT_EQ(cache.get(kLoad), (Profile{max_peak, (max_peak + 1) / 2, 0, 0}));
        EXPECT_EQ(cache.get(kEncode).batch_ceiling, rounds - 1);
        if (persist) {
            ProfileCache fresh(dir.path(), true);
            EXPECT_EQ(fresh.get(kLoad), (Profile{max_peak, (max_peak + 1) / 2, 0, 0}));
            EXPECT_EQ(fresh.get(kEncode).batch_ceiling, rounds - 1);
        }
    }
}

// Several processes record into one directory while another parses the file nonstop: the reader
// never sees a torn file (rename), and no process's higher peak is lost (flock + re-read + merge).
TEST(ProfileCache, ConcurrentWriterProcesses) {
    TempDir dir;
    const std::string stop_file = dir.file("stop");
    const int writers = 6;
    const std::uint64_t rounds = 30;
    const Key shared = Key::of("shared", {{"model", "m"}});
    const Key side = Key::of("side", {{"w", "any"}});

    const pid_t reader = ::fork();
    ASSERT_GE(reader, 0);
    if (reader == 0) {
        // Exit codes: 0 ok, 2 torn/invalid file seen, 3 never saw a file, 4 peak went down.
        std::uint64_t parsed = 0, last_peak = 0;
        const std::string path = dir.file(shared.hex() + ".profile");
        for (;;) {
            const bool stopping = ::access(stop_file.c_str(), F_OK) == 0;
            std::string text;
            int error = 0;
            const auto read = vramguard::detail::read_small_file(path, text, error);
            if (read == vramguard::detail::ReadResult::failed) ::_exit(2);
            if (read == vramguard::detail::ReadResult::ok) {
                const auto profile = vramguard::detail::parse_profile(text, shared);
                if (!profile) ::_exit(2);
                if (profile->peak_bytes < last_peak) ::_exit(4);
                last_peak = profile->peak_bytes;
                ++parsed;
            }
            if (stopping) ::_exit(parsed > 0 ? 0 : 3);
        }
    }

    std::vector<pid_t> children;
    for (int w = 0; w < writers; ++w) {
        const pid_t child = ::fork();
        ASSERT_GE(child, 0);
        if (child == 0) {
            // Exit codes: 0 ok, 5 a warning was logged, 6 own maximum not visible, 7 exception.
            try {
                std::atomic<int> warnings{0};
                ProfileCache cache(dir.path(), true, [&warnings](Level level, std::string_view) {
                    if (level >= Level::warn) ++warnings;
                });
                const auto wid = static_cast<std::uint64_t>(w);
                for (std::uint64_t j = 0; j < rounds; ++j) {
                    cache.record_peak(shared, j * 1000 + wid, 2);
                    cache.record_batch_ceiling(shared, j + 1);
                    if (j % 5 == 0) cache.record_peak(side, j * 10 + wid);
                }
                cache.reload(shared);
                if (cache.get(shared).peak_bytes < (rounds - 1) * 1000 + wid) ::_exit(6);
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
    const std::uint64_t max_peak = (rounds - 1) * 1000 + writers - 1;
    // Every writer's last ceiling was `rounds`, so whichever wrote last, the file says `rounds`.
    EXPECT_EQ(cache.get(shared), (Profile{max_peak, (max_peak + 1) / 2, rounds, 0}));
    EXPECT_EQ(cache.get(side).peak_bytes, 25 * 10 + writers - 1);
    EXPECT_EQ(log.all(), "");
    for (const std::string& name : list_dir(dir.path()))
        EXPECT_EQ(name.find(".tmp"), std::string::npos) << name;
}
