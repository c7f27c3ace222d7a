// SPDX-License-Identifier: MIT
// Crash consistency of the profile cache (issue #7): writer processes are SIGKILLed at random
// points, hundreds of times, while this process and a reader child parse the cache nonstop.
//   - no reader ever sees a torn or invalid record (write temp + fsync + rename);
//   - a peak never goes down, whoever was killed when (flock + re-read + merge);
//   - a killed writer's temporary file is litter only until the next cache opens the directory:
//     litter stays bounded by the writers killed since then, and a fresh cache leaves none.
// Children report through exit codes and pipes, never through gtest; every child arms alarm() so
// nothing outlives a broken run; the parent waits with poll() timeouts, never with sleeps.
//
// VRAMGUARD_CRASH_ROUNDS=<n> changes the number of rounds (default 200).
#include <vramguard/profile.hpp>

#include <gtest/gtest.h>

#include "temp_dir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace vramguard;
using vramguard_test::TempDir;

namespace {

constexpr int writers_per_round = 2;
constexpr unsigned child_alarm_seconds = 120;  // a child never outlives a hung parent for long
constexpr int ready_timeout_ms = 60000;        // poll() timeout for a child's ready byte

// Exit codes of the children.
constexpr int exit_ok = 0;
constexpr int exit_torn = 2;         // a file that exists did not parse
constexpr int exit_peak_down = 3;    // a peak went down
constexpr int exit_degraded = 4;     // a writer's cache gave up on the disk
constexpr int exit_exception = 5;    // anything thrown
constexpr int exit_read_failed = 6;  // the read itself failed (not "missing")

const Key& peak_key() {
    static const Key key = Key::of("crash-consistency", {{"record", "peak"}});
    return key;
}
const Key& ceiling_key() {
    static const Key key = Key::of("crash-consistency", {{"record", "ceiling"}});
    return key;
}

int configured_rounds() {
    if (const char* text = std::getenv("VRAMGUARD_CRASH_ROUNDS"); text && *text) {
        const int rounds = std::atoi(text);
        if (rounds > 0) return rounds;
    }
    return 200;
}

// What one read of one key's file found.
struct Reading {
    bool present = false;
    bool valid = false;
    bool read_failed = false;
    Profile profile;
};

Reading read_record(const std::string& dir, const Key& key) {
    Reading reading;
    std::string text;
    int error = 0;
    const std::string path = dir + "/" + key.hex() + ".profile";
    const auto result = detail::read_small_file(path, text, error);
    if (result == detail::ReadResult::missing) return reading;
    reading.present = true;
    if (result == detail::ReadResult::failed) {
        reading.read_failed = true;
        return reading;
    }
    if (auto profile = detail::parse_profile(text, key)) {
        reading.valid = true;
        reading.profile = *profile;
    }
    return reading;
}

std::size_t count_temp_files(const std::string& dir) {
    std::size_t count = 0;
    if (DIR* handle = ::opendir(dir.c_str())) {
        while (const dirent* entry = ::readdir(handle))
            if (detail::temp_file_pid(entry->d_name) != 0) ++count;
        ::closedir(handle);
    }
    return count;
}

// Reaps a child. Every child arms alarm(), so even a hung one ends: the wait is bounded.
int reap(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
}

// Kills and reaps whatever children are still listed when a failed assertion leaves the test.
struct Children {
    std::vector<pid_t> pids;
    ~Children() {
        for (const pid_t pid : pids) ::kill(pid, SIGKILL);
        for (const pid_t pid : pids) reap(pid);
    }
    void forget(pid_t pid) { pids.erase(std::find(pids.begin(), pids.end(), pid)); }
};

// Blocks until the child writes its ready byte (or dies, or the timeout passes).
bool wait_ready(int fd) {
    pollfd item{fd, POLLIN, 0};
    if (::poll(&item, 1, ready_timeout_ms) != 1) return false;
    char byte = 0;
    return ::read(fd, &byte, 1) == 1;
}

// A writer: opens the cache (which removes the temp files of dead writers), says ready, then
// records forever until it is killed.
[[noreturn]] void writer_main(const std::string& dir, int ready_fd, std::uint64_t base,
                              unsigned seed) {
    ::alarm(child_alarm_seconds);
    try {
        ProfileCache cache(dir, true, [](Level, std::string_view) {});
        if (!cache.persistent()) ::_exit(exit_degraded);
        const char ready = 'r';
        if (::write(ready_fd, &ready, 1) != 1) ::_exit(exit_exception);
        ::close(ready_fd);
        std::minstd_rand random(seed);
        // Half the writers start with the ceiling: a writer killed inside its first write leaves
        // each file's write path cut somewhere, whichever of the two it is.
        const bool ceiling_first = random() % 2 == 0;
        for (std::uint64_t i = 1;; ++i) {
            if (ceiling_first) cache.record_batch_ceiling(ceiling_key(), 1 + random() % 97);
            cache.record_peak(peak_key(), base + i, 1 + i % 7);
            if (!ceiling_first) cache.record_batch_ceiling(ceiling_key(), 1 + random() % 97);
            if (!cache.persistent()) ::_exit(exit_degraded);
        }
    } catch (...) {
        ::_exit(exit_exception);
    }
}

// A reader in its own process, parsing both files until `stop_fd` becomes readable.
[[noreturn]] void reader_main(const std::string& dir, int stop_fd) {
    ::alarm(child_alarm_seconds * 4);
    try {
        std::uint64_t last_peak = 0;
        for (;;) {
            pollfd item{stop_fd, POLLIN, 0};
            const bool stopping = ::poll(&item, 1, 0) == 1;
            for (const Key* key : {&peak_key(), &ceiling_key()}) {
                const Reading reading = read_record(dir, *key);
                if (reading.read_failed) ::_exit(exit_read_failed);
                if (reading.present && !reading.valid) ::_exit(exit_torn);
                if (reading.valid && key == &peak_key()) {
                    if (reading.profile.peak_bytes < last_peak) ::_exit(exit_peak_down);
                    last_peak = reading.profile.peak_bytes;
                }
            }
            if (stopping) ::_exit(exit_ok);
        }
    } catch (...) {
        ::_exit(exit_exception);
    }
}

std::string describe_status(int status) {
    if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return "signal " + std::to_string(WTERMSIG(status));
    return "status " + std::to_string(status);
}

TEST(CrashConsistency, SigkilledWritersNeverLeaveATornRecordOrUnboundedLitter) {
    TempDir temp("vramguard-crash-");
    const std::string dir = temp.path();
    const int rounds = configured_rounds();
    std::mt19937 random(20240607);  // fixed: a failure replays the same kill points

    Children children;
    int stop_pipe[2];
    ASSERT_EQ(::pipe(stop_pipe), 0);
    const pid_t reader = ::fork();
    ASSERT_GE(reader, 0);
    if (reader == 0) {
        ::close(stop_pipe[1]);
        reader_main(dir, stop_pipe[0]);
    }
    children.pids.push_back(reader);
    ::close(stop_pipe[0]);

    std::vector<std::string> warnings;
    ProfileCache parent_cache(dir, true, [&warnings](Level level, std::string_view message) {
        if (level >= Level::warn) warnings.emplace_back(message);
    });
    // Both records exist before the first writer starts: on a machine where fsync is slow next to
    // the parent's reads, writers may be killed before they finish one write, and the end checks
    // below must not depend on how fast the disk is.
    parent_cache.record_peak(peak_key(), 1, 1);
    parent_cache.record_batch_ceiling(ceiling_key(), 1);
    ASSERT_TRUE(read_record(dir, peak_key()).valid);
    ASSERT_TRUE(read_record(dir, ceiling_key()).valid);
    std::uint64_t last_peak = 0, parent_reads = 0, valid_reads = 0;
    std::size_t most_litter = 0;
    int unexpected_exits = 0;

    for (int round = 0; round < rounds; ++round) {
        std::vector<pid_t> writers;
        for (int w = 0; w < writers_per_round; ++w) {
            int ready[2];
            ASSERT_EQ(::pipe(ready), 0);
            const pid_t child = ::fork();
            ASSERT_GE(child, 0);
            if (child == 0) {
                ::close(ready[0]);
                ::close(stop_pipe[1]);
                writer_main(dir, ready[1], static_cast<std::uint64_t>(round) * 1000000,
                            static_cast<unsigned>(random()));
            }
            ::close(ready[1]);
            children.pids.push_back(child);
            const bool is_ready = wait_ready(ready[0]);
            ::close(ready[0]);
            writers.push_back(child);
            ASSERT_TRUE(is_ready) << "writer " << w << " of round " << round
                                  << " never became ready";
        }

        // Read for a random while, then kill: the kill point is wherever the writers are by then
        // (often inside fsync, between creating the temp file and renaming it).
        const int reads = static_cast<int>(random() % 48);
        for (int r = 0; r <= reads; ++r) {
            for (const Key* key : {&peak_key(), &ceiling_key()}) {
                const Reading reading = read_record(dir, *key);
                ++parent_reads;
                ASSERT_FALSE(reading.read_failed) << "round " << round;
                ASSERT_TRUE(!reading.present || reading.valid) << "torn record in round " << round;
                if (!reading.valid) continue;
                ++valid_reads;
                if (key == &peak_key()) {
                    ASSERT_GE(reading.profile.peak_bytes, last_peak)
                        << "peak went down in round " << round;
                    last_peak = reading.profile.peak_bytes;
                }
            }
            // The cache's own read path: reload, then find (a damaged file would warn).
            parent_cache.reload(peak_key());
            (void)parent_cache.find(peak_key());
        }
        if (random() % 2) std::swap(writers[0], writers[1]);
        for (const pid_t child : writers) ::kill(child, SIGKILL);
        for (const pid_t child : writers) {
            const int status = reap(child);
            children.forget(child);
            if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
                ++unexpected_exits;
                ADD_FAILURE() << "round " << round << ": writer ended with "
                              << describe_status(status);
            }
        }
        // Each writer opened the cache (and cleaned up after the previous round) before it was
        // killed, and writes one temp file at a time: litter is bounded by this round's writers.
        const std::size_t litter = count_temp_files(dir);
        most_litter = std::max(most_litter, litter);
        ASSERT_LE(litter, static_cast<std::size_t>(writers_per_round)) << "round " << round;
    }

    ASSERT_EQ(::write(stop_pipe[1], "s", 1), 1);
    ::close(stop_pipe[1]);
    const int reader_status = reap(reader);
    children.forget(reader);
    EXPECT_TRUE(WIFEXITED(reader_status) && WEXITSTATUS(reader_status) == exit_ok)
        << "reader: " << describe_status(reader_status);
    EXPECT_EQ(unexpected_exits, 0);
    EXPECT_TRUE(warnings.empty()) << warnings.front();

    // The writers made progress and everything they left is a valid record.
    EXPECT_GT(valid_reads, 0u);
    const Reading final_peak = read_record(dir, peak_key());
    ASSERT_TRUE(final_peak.valid);
    EXPECT_GE(final_peak.profile.peak_bytes, last_peak);
    ASSERT_TRUE(read_record(dir, ceiling_key()).valid);

    // A fresh cache removes the litter of every dead writer.
    ProfileCache fresh(dir, true, [](Level, std::string_view) {});
    EXPECT_EQ(count_temp_files(dir), 0u);
    EXPECT_EQ(fresh.get(peak_key()), final_peak.profile);
    RecordProperty("rounds", rounds);
    RecordProperty("parent_reads", static_cast<int>(parent_reads));
    RecordProperty("most_litter", static_cast<int>(most_litter));
}

// The same directory, with a writer killed while it holds the directory's flock: the kernel drops
// the lock with the process, so the next writer is not blocked (a hang here would be a deadlock
// the cache could never recover from).
TEST(CrashConsistency, AWriterKilledHoldingTheLockDoesNotBlockTheNext) {
    TempDir temp("vramguard-crash-lock-");
    const std::string dir = temp.path();
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t holder = ::fork();
    ASSERT_GE(holder, 0);
    if (holder == 0) {
        ::alarm(child_alarm_seconds);
        ::close(ready[0]);
        const std::string lock_path = dir + "/.lock";
        const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0 || ::flock(fd, LOCK_EX) != 0) ::_exit(exit_exception);
        if (::write(ready[1], "r", 1) != 1) ::_exit(exit_exception);
        for (;;) ::pause();  // holds the lock until killed
    }
    ::close(ready[1]);
    const bool is_ready = wait_ready(ready[0]);
    ::close(ready[0]);
    if (!is_ready) ::kill(holder, SIGKILL);
    ASSERT_TRUE(is_ready) << "the lock holder never took the lock";
    ::kill(holder, SIGKILL);
    const int status = reap(holder);
    ASSERT_TRUE(WIFSIGNALED(status)) << describe_status(status);

    ProfileCache cache(dir, true, [](Level, std::string_view) {});
    cache.record_peak(peak_key(), 42);
    ProfileCache fresh(dir, true, [](Level, std::string_view) {});
    EXPECT_EQ(fresh.get(peak_key()).peak_bytes, 42u);
}

}  // namespace
