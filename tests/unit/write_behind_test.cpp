// SPDX-License-Identifier: MIT
// Issue 22: a guard's learning reaches the profile files through a background writer, coalesced
// per key (at most once per persist_interval), flushed by Guard::flush() and the destructor; a
// failing disk costs an encode nothing. Also: future-stamped samples age out (issue 19), and
// profiles unused for profile_max_age are removed (issue 24). The slow-fsync test is in
// kill_points_test.cpp, where fsync is interposed.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "fork_child.hpp"
#include "temp_dir.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using vramguard_test::TempDir;

namespace {

using View = BatchView<std::vector<int>::const_iterator>;

Options persisting(const std::string& dir, std::chrono::milliseconds interval) {
    Options options;
    options.profile_dir = dir;
    options.persist = true;
    options.persist_interval = interval;
    options.log = nullptr;
    return options;
}

// Encodes `items` at `per_item` bytes per item (allocated on the simulated device).
auto costing(SimulatedDevice& device, std::uint64_t per_item) {
    return [&device, per_item](const View& batch) {
        auto activations = device.allocate(per_item * batch.size());
        return std::vector<int>(batch.begin(), batch.end());
    };
}

bool exists(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
}

// What a new process would read.
Profile on_disk(const std::string& dir, const Key& key) {
    return ProfileCache(dir, true, nullptr).get(key);
}

// Polls `done` for up to `limit` (a real deadline: the writer runs on its own thread).
template <class Done>
bool eventually(Done done, std::chrono::seconds limit = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
}

TEST(WriteBehindProfile, ManyCallsWithinAnIntervalAreOneWriteAndFlushWritesTheRest) {
    TempDir dir;
    SimulatedDevice device(16_GiB);
    const Key key = Key::of("coalesced");
    const std::vector<int> items(16, 1);
    Guard<SimulatedDevice> guard(device, persisting(dir.path(), std::chrono::hours(1)));
    for (int call = 0; call < 60; ++call)
        guard.encode(key, std::vector<int>(items.begin(), items.begin() + 1 + call % 16),
                     costing(device, 10_MiB));
    // The first learning is written at once (the writer was idle); everything after waits an
    // hour: 60 calls that learned, at most one file write.
    EXPECT_LE(guard.stats().profile_writes, 1u);
    const Profile learned = guard.profiles().get(key);
    ASSERT_FALSE(learned.item_samples.empty());
    guard.flush();
    const std::uint64_t after_flush = guard.stats().profile_writes;
    EXPECT_GE(after_flush, 1u);
    EXPECT_LE(after_flush, 2u);
    EXPECT_EQ(on_disk(dir.path(), key).item_samples, learned.item_samples);
    guard.flush();  // nothing new: no write
    EXPECT_EQ(guard.stats().profile_writes, after_flush);
    EXPECT_EQ(guard.stats().profile_write_failures, 0u);
}

TEST(WriteBehindProfile, NothingLearnedIsLostOnACleanShutdown) {
    TempDir dir;
    SimulatedDevice device(16_GiB);
    const Key encode_key = Key::of("shutdown-encode");
    const Key load_key = Key::of("shutdown-load");
    Profile learned_encode, learned_load;
    {
        Guard<SimulatedDevice> guard(device, persisting(dir.path(), std::chrono::hours(1)));
        for (int call = 0; call < 20; ++call)
            guard.encode(encode_key, std::vector<int>(8, call), costing(device, 20_MiB));
        guard.load(load_key, [&] { auto weights = device.allocate(1_GiB); });
        learned_encode = guard.profiles().get(encode_key);
        learned_load = guard.profiles().get(load_key);
    }
    ASSERT_FALSE(learned_encode.item_samples.empty());
    EXPECT_EQ(on_disk(dir.path(), encode_key), learned_encode);
    EXPECT_EQ(on_disk(dir.path(), load_key), learned_load);
    EXPECT_EQ(on_disk(dir.path(), load_key).peak_bytes, 1_GiB);
}

TEST(WriteBehindProfile, TheWriterWritesWithoutAFlush) {
    TempDir dir;
    SimulatedDevice device(16_GiB);
    const Key key = Key::of("background");
    Guard<SimulatedDevice> guard(device, persisting(dir.path(), std::chrono::milliseconds(0)));
    guard.encode(key, std::vector<int>(4, 1), costing(device, 10_MiB));
    EXPECT_TRUE(eventually([&] { return guard.stats().profile_writes >= 1; }));
    EXPECT_EQ(on_disk(dir.path(), key).peak_bytes_per_item, 10_MiB);
}

TEST(WriteBehindProfile, AFailingDiskIsCountedAndLoggedNeverThrown) {
    TempDir temp;
    const std::string dir = temp.file("profiles");
    SimulatedDevice device(16_GiB);
    const Key key = Key::of("failing-disk");
    std::atomic<int> warnings{0};  // the writer thread logs
    Options options = persisting(dir, std::chrono::hours(1));
    options.log = [&warnings](Level level, std::string_view) {
        if (level >= Level::warn) ++warnings;
    };
    Guard<SimulatedDevice> guard(device, options);
    TempDir::remove_tree(dir);  // every write now fails
    for (int call = 0; call < 10; ++call)
        EXPECT_EQ(guard.encode(key, std::vector<int>(4, call), costing(device, 10_MiB)).size(), 4u);
    guard.flush();
    EXPECT_GE(guard.stats().profile_write_failures, 1u);
    // The writer may have met the failure first and log it just after its pass.
    EXPECT_TRUE(eventually([&] { return warnings.load() >= 1; }));
    EXPECT_EQ(warnings.load(), 1);  // said once; memory-only from then on
    EXPECT_FALSE(guard.profiles().persistent());
    EXPECT_EQ(guard.profiles().get(key).peak_bytes_per_item, 10_MiB);  // learning goes on
}

TEST(WriteBehindProfile, OptionsRejectANegativeIntervalOrAge) {
    Options options;
    options.persist_interval = std::chrono::milliseconds(-1);
    EXPECT_THROW(options.validate(), std::invalid_argument);
    options = Options{};
    options.profile_max_age = std::chrono::seconds(-1);
    EXPECT_THROW(options.validate(), std::invalid_argument);
}

// Pre-forked workers on one directory, writing behind at the same time: each one's samples end
// up in the file (merged under the directory lock), none overwrites the other's.
TEST(WriteBehindProfile, WorkersSharingTheDirectoryMerge) {
    TempDir dir;
    const Key key = Key::of("shared-workers");
    auto worker = [&](std::uint64_t per_item) {
        return [&dir, &key, per_item]() -> std::string {
            SimulatedDevice device(16_GiB);
            Guard<SimulatedDevice> guard(device,
                                         persisting(dir.path(), std::chrono::milliseconds(0)));
            for (int call = 0; call < 4; ++call)
                guard.encode(key, std::vector<int>(2 + call, 1), costing(device, per_item));
            return "";  // the destructor flushes
        };
    };
    pid_t children[2];
    const std::uint64_t costs[2] = {10_MiB, 30_MiB};
    for (int i = 0; i < 2; ++i) {
        const auto body = worker(costs[i]);
        children[i] = vramguard_test::spawn_child([&body] {
            ::alarm(60);
            return body().empty() ? 0 : 1;
        });
        ASSERT_GT(children[i], 0);
    }
    for (pid_t child : children) EXPECT_EQ(vramguard_test::wait_child(child), 0);
    bool seen[2] = {false, false};
    for (const ProfileSample& sample : on_disk(dir.path(), key).item_samples)
        for (int i = 0; i < 2; ++i) seen[i] |= sample.peak_bytes == costs[i] * sample.size;
    EXPECT_TRUE(seen[0]) << "the first worker's samples were lost";
    EXPECT_TRUE(seen[1]) << "the second worker's samples were lost";
}

// ---- issue 19 item 13: samples stamped in the future ----------------------------------------

TEST(ProfileFutureStamps, AreTakenAsTheOldest) {
    Profile profile;
    profile.item_samples = {{100, 1, 10}, {5000, 10, 800}, {6000, 10, 900}};
    profile.load_samples = {{50, 0, 7}};
    detail::derive_peaks(profile);
    EXPECT_TRUE(detail::clamp_future_stamps(profile, 1000));
    const std::vector<ProfileSample> expected = {{0, 10, 800}, {0, 10, 900}, {100, 1, 10}};
    EXPECT_EQ(profile.item_samples, expected);
    EXPECT_EQ(profile.load_samples, (std::vector<ProfileSample>{{50, 0, 7}}));
    EXPECT_EQ(profile.peak_bytes_per_item, 90u);
    EXPECT_FALSE(detail::clamp_future_stamps(profile, 1000));  // nothing left in the future
}

TEST(ProfileFutureStamps, AgeOutOfTheWindowLikeAnyOther) {
    TempDir dir;
    const Key key = Key::of("future-stamp");
    Profile planted;
    const std::uint64_t day = 86400ull * 1000000000ull;
    for (std::uint64_t i = 0; i < profile_window; ++i)
        planted.item_samples.push_back({detail::wall_clock_ns() + day + i, 10, 8_GiB});
    detail::derive_peaks(planted);
    std::ofstream(dir.file(key.hex() + ".profile")) << detail::serialize_profile(key, planted);

    // The planted samples (all alike) are one sample of stamp 0: a window of new records and it
    // is gone, from memory and from the file.
    ProfileCache cache(dir.path(), true, nullptr);
    EXPECT_EQ(cache.get(key).item_samples, (std::vector<ProfileSample>{{0, 10, 8_GiB}}));
    for (std::uint64_t i = 0; i < profile_window; ++i) cache.record_peak(key, 1_GiB, 10);
    for (const Profile& profile : {cache.get(key), on_disk(dir.path(), key)}) {
        ASSERT_EQ(profile.item_samples.size(), profile_window);
        for (const ProfileSample& sample : profile.item_samples)
            EXPECT_EQ(sample.peak_bytes, 1_GiB) << "a future-stamped sample outlived the window";
        EXPECT_EQ(profile.peak_bytes_per_item, 1_GiB / 10 + 1);
    }
}

// ---- issue 24 item 6: stale profile files ---------------------------------------------------

void age(const std::string& path, std::chrono::hours by) {
    const std::time_t then = std::time(nullptr) - static_cast<std::time_t>(by.count() * 3600);
    const timespec times[2] = {{then, 0}, {then, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path;
}

std::time_t modified(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? st.st_mtime : 0;
}

TEST(ProfileMaxAge, ProfilesUnusedForLongerAreRemovedWhenAGuardOpensTheDirectory) {
    TempDir dir;
    const Key old_key = Key::of("retired-model"), recent_key = Key::of("recent-model");
    {
        ProfileCache writer(dir.path(), true, nullptr);
        writer.record_peak(old_key, 1_GiB);
        writer.record_peak(recent_key, 2_GiB);
    }
    const std::string old_path = dir.file(old_key.hex() + ".profile");
    const std::string recent_path = dir.file(recent_key.hex() + ".profile");
    const std::string not_a_profile = dir.write("notes.txt", "an operator's file");
    age(old_path, std::chrono::hours(24 * 31));
    age(recent_path, std::chrono::hours(24 * 29));
    age(not_a_profile, std::chrono::hours(24 * 365));

    SimulatedDevice device(16_GiB);
    Options options = persisting(dir.path(), std::chrono::hours(1));  // the 30-day default
    ASSERT_EQ(options.profile_max_age, std::chrono::seconds(30 * 24 * 3600));
    Guard<SimulatedDevice> guard(device, options);
    EXPECT_FALSE(exists(old_path));
    EXPECT_TRUE(exists(recent_path));
    EXPECT_TRUE(exists(not_a_profile));  // only "<16 hex>.profile" files are ever removed
    EXPECT_EQ(guard.profiles().get(recent_key).peak_bytes, 2_GiB);
    EXPECT_EQ(guard.profiles().find(old_key), std::nullopt);
}

TEST(ProfileMaxAge, ReadingAProfileKeepsItAndZeroKeepsEverything) {
    TempDir dir;
    const Key key = Key::of("in-use");
    ProfileCache(dir.path(), true, nullptr).record_peak(key, 1_GiB);
    const std::string path = dir.file(key.hex() + ".profile");
    age(path, std::chrono::hours(24 * 365));
    ProfileCache(dir.path(), true, nullptr);  // max_age 0: a cache alone removes nothing
    ASSERT_TRUE(exists(path));
    age(path, std::chrono::hours(24 * 20));
    ProfileCache reader(dir.path(), true, nullptr,
                        ProfileCacheSettings{std::nullopt, std::chrono::hours(24 * 30)});
    EXPECT_EQ(reader.get(key).peak_bytes, 1_GiB);
    EXPECT_GE(modified(path), std::time(nullptr) - 3600);  // read: in use, young again
}

}  // namespace
