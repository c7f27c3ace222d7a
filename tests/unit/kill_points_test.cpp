// SPDX-License-Identifier: MIT
// Kill points (issue 13): every file vramguard writes survives a SIGKILL at any instant. Each
// scenario runs one file-writing path in a forked child, killed at its 1st, 2nd, ... call to the
// libc functions below (interposed in this executable: a call counts only in an armed child,
// everywhere else they pass straight through), until a run ends without reaching the kill point.
// A write() counts twice: killed before it, and killed after writing half its bytes (a torn
// write). After every kill the parent checks what the next process finds:
//   - the ledger parses whole (strict parse, no salvage needed) and still holds the live
//     reservation another process made, so a load that does not fit beside it is refused (the
//     repro's 10 GiB + 8 GiB on 16 GiB);
//   - the dead child's reservation, if it got into the file, is pruned by the next operation;
//   - no lock (ledger, single-item, turnstile, profile directory) is held by the dead;
//   - a profile reads back as it was before or as the finished write leaves it, never torn;
//   - a temporary file left behind is gone after the next operation.
// Files between kills never change except by these calls, so killing before each of them (and
// inside each write) reaches every state a kill at any instant can leave.
#include <vramguard/host.hpp>
#include <vramguard/profile.hpp>
#include <vramguard/simulated.hpp>
#include <vramguard/guard.hpp>

#include <gtest/gtest.h>

#include "fork_child.hpp"
#include "temp_dir.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using vramguard_test::spawn_child;
using vramguard_test::TempDir;

namespace {

// Where the armed child says which call it was killed at (shared with the parent).
struct KillReport {
    std::atomic<int> calls{0};
    char name[32] = {};
};

// The child's plan; plain memory, copied into the child by fork and set only there.
std::atomic<bool> armed{false};
std::atomic<int> kill_at{0};
KillReport* report = nullptr;

// Counts one kill point; true when this is the one to die at (its name is reported first).
bool kill_point(const char* name) {
    if (!armed.load(std::memory_order_relaxed)) return false;
    const int count = report->calls.fetch_add(1, std::memory_order_relaxed) + 1;
    if (count != kill_at.load(std::memory_order_relaxed)) return false;
    std::strncpy(report->name, name, sizeof report->name - 1);
    return true;
}

[[noreturn]] void die() {
    ::kill(::getpid(), SIGKILL);
    for (;;) ::pause();
}

// An fsync that takes as long as the test wants (a disk where fsync takes seconds): while a gate
// is installed, fsync waits until the test opens it (at most 60 s), and says which thread called.
struct FsyncGate {
    std::mutex mutex;
    std::condition_variable changed;
    bool open = false;
    int waiting = 0;
    std::vector<std::thread::id> callers;

    void pass() {
        std::unique_lock<std::mutex> lock(mutex);
        ++waiting;
        callers.push_back(std::this_thread::get_id());
        changed.notify_all();
        changed.wait_for(lock, std::chrono::seconds(60), [&] { return open; });
        --waiting;
    }
    void release() {
        std::lock_guard<std::mutex> lock(mutex);
        open = true;
        changed.notify_all();
    }
};
std::atomic<FsyncGate*> fsync_gate{nullptr};

template <class Fn>
Fn real(const char* name) {
    return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

}  // namespace

// ---- the interposed calls (C linkage, the libc names) -------------------------------------------

#define VRAMGUARD_KILL_POINT(name)   \
    do {                             \
        if (kill_point(name)) die(); \
    } while (false)

extern "C" {

ssize_t write(int fd, const void* data, size_t size) {
    static const auto next = real<ssize_t (*)(int, const void*, size_t)>("write");
    VRAMGUARD_KILL_POINT("write");
    if (kill_point("write (torn)")) {
        if (size > 1) next(fd, data, size / 2);
        die();
    }
    return next(fd, data, size);
}

ssize_t pwrite(int fd, const void* data, size_t size, off_t offset) {
    static const auto next = real<ssize_t (*)(int, const void*, size_t, off_t)>("pwrite");
    VRAMGUARD_KILL_POINT("pwrite");
    return next(fd, data, size, offset);
}

int ftruncate(int fd, off_t length) {
    static const auto next = real<int (*)(int, off_t)>("ftruncate");
    VRAMGUARD_KILL_POINT("ftruncate");
    return next(fd, length);
}

int fsync(int fd) {
    static const auto next = real<int (*)(int)>("fsync");
    VRAMGUARD_KILL_POINT("fsync");
    if (FsyncGate* gate = fsync_gate.load()) gate->pass();
    return next(fd);
}

int rename(const char* from, const char* to) {
    static const auto next = real<int (*)(const char*, const char*)>("rename");
    VRAMGUARD_KILL_POINT("rename");
    return next(from, to);
}

int close(int fd) {
    static const auto next = real<int (*)(int)>("close");
    VRAMGUARD_KILL_POINT("close");
    return next(fd);
}

int unlink(const char* path) {
    static const auto next = real<int (*)(const char*)>("unlink");
    VRAMGUARD_KILL_POINT("unlink");
    return next(path);
}

int unlinkat(int dir, const char* path, int flags) {
    static const auto next = real<int (*)(int, const char*, int)>("unlinkat");
    VRAMGUARD_KILL_POINT("unlinkat");
    return next(dir, path, flags);
}

int flock(int fd, int operation) {
    static const auto next = real<int (*)(int, int)>("flock");
    VRAMGUARD_KILL_POINT("flock");
    return next(fd, operation);
}

int fchmod(int fd, mode_t mode) {
    static const auto next = real<int (*)(int, mode_t)>("fchmod");
    VRAMGUARD_KILL_POINT("fchmod");
    return next(fd, mode);
}

int fchown(int fd, uid_t owner, gid_t group) {
    static const auto next = real<int (*)(int, uid_t, gid_t)>("fchown");
    VRAMGUARD_KILL_POINT("fchown");
    return next(fd, owner, group);
}

int mkdir(const char* path, mode_t mode) {
    static const auto next = real<int (*)(const char*, mode_t)>("mkdir");
    VRAMGUARD_KILL_POINT("mkdir");
    return next(path, mode);
}

int open(const char* path, int flags, ...) {
    static const auto next = real<int (*)(const char*, int, ...)>("open");
    mode_t mode = 0;
    if ((flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE) {
        va_list arguments;
        va_start(arguments, flags);
        mode = static_cast<mode_t>(va_arg(arguments, int));
        va_end(arguments);
    }
    VRAMGUARD_KILL_POINT("open");
    return next(path, flags, mode);
}

}  // extern "C"

namespace {

using Clock = std::chrono::steady_clock;

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

// True when nobody holds an flock on `path` (or it does not exist): taken and dropped at once.
bool lock_is_free(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT;
    const bool free = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
    ::close(fd);
    return free;
}

bool exists(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0;
}

std::function<MemoryInfo()> reading(std::uint64_t free_bytes) {
    return [free_bytes] { return MemoryInfo{free_bytes, 16_GiB}; };
}

// One file-writing path: `setup` runs in the parent on a fresh directory, `action` in the child
// (armed just before it), `check` in the parent after the child died or finished.
struct Scenario {
    const char* name;
    std::function<void(const std::string& dir)> setup;
    std::function<void(const std::string& dir)> action;
    std::function<void(const std::string& dir, bool finished)> check;
    std::function<void()> teardown = [] {};
};

// What one scenario's sweep saw: kills per call name, and whether the last run finished.
struct Sweep {
    std::map<std::string, int> kills;
    int total = 0;
    bool finished = false;
};

constexpr int max_kill_points = 400;  // a bound far above any path's calls (about 10 to 40)

Sweep sweep(const Scenario& scenario, KillReport& shared) {
    Sweep result;
    for (int point = 1; point <= max_kill_points && !result.finished; ++point) {
        TempDir dir("vramguard-kill-");
        scenario.setup(dir.path());
        shared.calls = 0;
        std::memset(shared.name, 0, sizeof shared.name);
        const pid_t child = spawn_child([&] {
            ::alarm(60);  // never outlives a broken parent for long
            kill_at = point;
            armed = true;
            scenario.action(dir.path());
            armed = false;
            return 0;
        });
        const auto status = vramguard_test::wait_child_status(child, std::chrono::seconds(30));
        if (!status) {
            ADD_FAILURE() << scenario.name << ": child at kill point " << point << " hung";
            break;
        }
        if (WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL && shared.name[0] != '\0') {
            ++result.kills[shared.name];
            ++result.total;
        } else if (WIFEXITED(*status) && WEXITSTATUS(*status) == 0) {
            result.finished = true;
        } else {
            ADD_FAILURE() << scenario.name << ": child at kill point " << point << " ended with "
                          << *status;
            break;
        }
        SCOPED_TRACE(std::string(scenario.name) + ", kill point " + std::to_string(point) + " (" +
                     (result.finished ? "finished" : shared.name) + ")");
        scenario.check(dir.path(), result.finished);
        scenario.teardown();
        if (::testing::Test::HasFatalFailure()) break;
    }
    return result;
}

std::string describe(const Sweep& sweep) {
    std::string text = std::to_string(sweep.total) + " kill points:";
    for (const auto& [name, count] : sweep.kills)
        text += " " + name + " " + std::to_string(count) + ";";
    return text;
}

class KillPointTest : public ::testing::Test {
   protected:
    void SetUp() override {
        void* memory = ::mmap(nullptr, sizeof(KillReport), PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        ASSERT_NE(memory, MAP_FAILED);
        report = new (memory) KillReport();
    }
    void TearDown() override {
        ::munmap(report, sizeof(KillReport));
        report = nullptr;
    }

    // Runs the sweep, prints its table row and checks it ran to completion and killed at least
    // once at every call named in `expected`.
    void run(const Scenario& scenario, const std::vector<std::string>& expected) {
        const Sweep result = sweep(scenario, *report);
        std::cout << "[kill points] " << scenario.name << ": " << describe(result) << "\n";
        RecordProperty("kill_points", result.total);
        EXPECT_TRUE(result.finished) << scenario.name << " never finished within the bound";
        for (const std::string& name : expected)
            EXPECT_GT(result.kills.count(name), 0u) << scenario.name << " never killed at " << name;
    }
};

// ---- the ledger
// ----------------------------------------------------------------------------------

// The world of every ledger scenario: another live worker (a helper process, the "holder")
// holds 10 GiB, of which 1 GiB is allocated so far (free 15 GiB), as P1 in
// repro_ledger_torn_write. This process plays the next worker: it is not the holder, so nothing it
// remembers can stand in for what the file says.
struct LedgerWorld {
    std::shared_ptr<HostLedger> ledger;
    std::vector<std::string> warnings;
    pid_t holder = -1;
    int release_fd = -1;  // closing it lets the holder release and exit

    void open(const std::string& dir, bool reserve = true) {
        HostOptions options;
        options.directory = dir;
        options.lock_timeout = std::chrono::milliseconds(500);
        options.single_item_timeout = std::chrono::milliseconds(500);
        options.log = [this](Level level, std::string_view message) {
            if (level >= Level::warn) warnings.emplace_back(message);
        };
        ledger = HostLedger::open("kill-gpu", options);
        if (reserve) start_holder();
    }
    void start_holder() {
        int ready[2], release[2];
        ASSERT_EQ(::pipe(ready), 0);
        ASSERT_EQ(::pipe(release), 0);
        holder = spawn_child([&] {
            ::alarm(60);
            ::close(ready[0]);
            ::close(release[1]);
            std::unique_ptr<Hold> live = ledger->try_reserve(10_GiB, 0, reading(16_GiB)).hold;
            if (!live || ::write(ready[1], "r", 1) != 1) return 1;
            char byte = 0;
            while (::read(release[0], &byte, 1) > 0) {
            }
            return 0;
        });
        ::close(ready[1]);
        ::close(release[0]);
        release_fd = release[1];
        char byte = 0;
        const bool is_ready = ::read(ready[0], &byte, 1) == 1;
        ::close(ready[0]);
        ASSERT_TRUE(is_ready) << "the holder did not reserve";
    }
    void reset() {
        if (release_fd >= 0) ::close(release_fd);
        if (holder > 0) {
            EXPECT_EQ(vramguard_test::wait_child(holder), 0);
        }
        holder = release_fd = -1;
        ledger.reset();
        warnings.clear();
    }

    // What the next process finds after the child died (or finished).
    void check_next_process(bool damaged_before = false) {
        const std::string path = ledger->path();
        EXPECT_TRUE(lock_is_free(ledger->lock_path())) << "the dead hold the ledger lock";
        const std::string text = read_file(path);
        std::string why;
        if (!damaged_before) {
            EXPECT_TRUE(detail::parse_ledger(text, &why)) << "torn: " << why;
        }
        const auto state = ledger->snapshot();
        ASSERT_TRUE(state) << "the ledger is not usable";
        EXPECT_EQ(state->live_bytes(), 10_GiB) << "a live reservation was lost or one stayed";
        ASSERT_EQ(state->entries.size(), 1u);
        EXPECT_EQ(state->entries[0].pid, holder);
        // The repro's third worker: 8 GiB beside 10 GiB reserved on 15 GiB free must not fit.
        EXPECT_FALSE(ledger->try_reserve(8_GiB, 0, reading(15_GiB)).hold) << "over-admission";
        // What fits is admitted (and written: a temporary file left by the dead goes with it).
        EXPECT_TRUE(ledger->try_reserve(4_GiB, 0, reading(15_GiB)).hold);
        EXPECT_FALSE(exists(path + ".tmp")) << "a temporary file outlived the next write";
        EXPECT_TRUE(detail::parse_ledger(read_file(path))) << "the next process left it torn";
        if (!damaged_before) {
            EXPECT_TRUE(warnings.empty()) << warnings.front();
        }
    }
};

// A ledger scenario: the world opened (and `prepare`d) in the parent, `action` in the child, the
// next process's checks after it. Each kills at least once at every call of a ledger write.
Scenario ledger_scenario(const char* name, LedgerWorld& world,
                         std::function<void(const std::string&)> prepare,
                         std::function<void(const std::string&)> action, bool damaged = false) {
    return {name,
            [&world, prepare](const std::string& dir) {
                world.open(dir);
                if (!::testing::Test::HasFatalFailure()) prepare(dir);
            },
            std::move(action),
            [&world, damaged](const std::string&, bool) { world.check_next_process(damaged); },
            [&world] { world.reset(); }};
}
const std::vector<std::string> ledger_write_calls = {"open",  "flock", "write", "write (torn)",
                                                     "fsync", "close", "rename"};

TEST_F(KillPointTest, LedgerAdd) {
    LedgerWorld world;
    run(ledger_scenario(
            "ledger add", world, [](const std::string&) {},
            [&](const std::string&) {
                // Keeps the reservation past its death (a worker killed during its load).
                (void)world.ledger->try_reserve(1_GiB, 0, reading(15_GiB)).hold.release();
            }),
        ledger_write_calls);
}

TEST_F(KillPointTest, LedgerRelease) {
    LedgerWorld world;
    run(ledger_scenario(
            "ledger release", world, [](const std::string&) {},
            [&](const std::string&) {
                // The reservation is made unarmed; its release is the path.
                armed = false;
                std::unique_ptr<Hold> hold =
                    world.ledger->try_reserve(1_GiB, 0, reading(15_GiB)).hold;
                if (!hold) ::_exit(5);
                armed = true;
                hold.reset();
            }),
        ledger_write_calls);
}

TEST_F(KillPointTest, LedgerPruneOfADeadProcess) {
    LedgerWorld world;
    run(ledger_scenario(
            "ledger prune", world,
            [&](const std::string&) {
                // A worker that died holding 3 GiB: its entry is in the file.
                const pid_t dead = spawn_child([&] {
                    return world.ledger->try_reserve(3_GiB, 0, reading(15_GiB)).hold.release() ? 0
                                                                                               : 1;
                });
                ASSERT_EQ(vramguard_test::wait_child(dead), 0);
                ASSERT_EQ(detail::parse_ledger(read_file(world.ledger->path()))->entries.size(),
                          2u);
            },
            [&](const std::string&) { (void)world.ledger->snapshot(); }),
        ledger_write_calls);
}

TEST_F(KillPointTest, LedgerRebuildOfADamagedFile) {
    LedgerWorld world;
    run(ledger_scenario(
            "ledger salvage", world,
            [&](const std::string&) {
                // What an in-place rewrite killed before its ftruncate left (the repro's file):
                // the new, shorter ledger followed by stray bytes of the old one.
                const std::string path = world.ledger->path();
                const std::string current = read_file(path);
                auto longer = detail::parse_ledger(current);
                ASSERT_TRUE(longer);
                longer->entries.push_back({0x77, INT_MAX, 1, 1_GiB, 1, 0});
                const std::string old_text = detail::serialize_ledger(*longer);
                std::ofstream(path, std::ios::binary | std::ios::trunc)
                    << current + old_text.substr(current.size());
            },
            [&](const std::string&) { (void)world.ledger->snapshot(); }, true),
        ledger_write_calls);
}

TEST_F(KillPointTest, LedgerCreation) {
    LedgerWorld world;
    run({"ledger creation", [&](const std::string&) {},
         [&](const std::string& dir) { world.open(dir + "/runtime", false); },
         [&](const std::string& dir, bool) {
             world.open(dir + "/runtime");
             if (!::testing::Test::HasFatalFailure()) world.check_next_process();
         },
         [&] { world.reset(); }},
        {"mkdir", "open", "fchmod", "flock", "write", "fsync", "rename"});
}

TEST_F(KillPointTest, SingleItemLockAndTurnstile) {
    LedgerWorld world;
    run({"single-item lock", [&](const std::string& dir) { world.open(dir, false); },
         [&](const std::string&) {
             std::unique_ptr<Hold> lock = world.ledger->lock_single_item();
             if (!lock) ::_exit(5);
             lock.reset();
         },
         [&](const std::string&, bool) {
             const std::string path = world.ledger->path();
             EXPECT_TRUE(lock_is_free(path + ".single")) << "the dead hold the single-item lock";
             EXPECT_TRUE(lock_is_free(path + ".turnstile")) << "the dead hold the turnstile";
             // Taken, not timed out: a timeout returns null and warns.
             EXPECT_TRUE(world.ledger->lock_single_item());
             EXPECT_TRUE(world.warnings.empty()) << world.warnings.front();
         },
         [&] { world.reset(); }},
        {"open", "fchmod", "flock", "close"});
}

// ---- profiles ----------------------------------------------------------------------------------

const Key& profile_key() {
    static const Key key = Key::of("kill-points", {{"record", "peak"}});
    return key;
}

// What a profile says, without the time stamps a second run of the same records would change:
// "peak/per item/ceiling/budget", or "none".
std::string summary(const std::optional<Profile>& profile) {
    if (!profile) return "none";
    return std::to_string(profile->peak_bytes) + "/" +
           std::to_string(profile->peak_bytes_per_item) + "/" +
           std::to_string(profile->batch_ceiling) + "/" + std::to_string(profile->weight_budget);
}

// A profile as the next process reads it, and the warnings it logged reading it.
std::optional<Profile> next_process_reads(const std::string& dir,
                                          std::vector<std::string>& warnings) {
    ProfileCache cache(dir, true, [&warnings](Level level, std::string_view message) {
        if (level >= Level::warn) warnings.emplace_back(message);
    });
    return cache.find(profile_key());
}

// The child's records, run unarmed once in a scratch directory to learn the finished result.
struct ProfileWorld {
    std::function<void(ProfileCache&)> before;  // what another process wrote first (or nothing)
    std::function<void(ProfileCache&)> records;
    bool write_behind = false;  // the child's records are written by the writer thread
    // With write_behind: the records up to where the writer may have written once already (the
    // file may then hold this state, a write earlier than the last: not a torn one).
    std::function<void(ProfileCache&)> first_records;
    std::string middle_profile;
    std::string before_profile, after_profile;  // summary()

    void setup(const std::string& dir) {
        ProfileCache cache(dir, true, [](Level, std::string_view) {});
        if (before) before(cache);
        std::vector<std::string> ignored;
        before_profile = summary(next_process_reads(dir, ignored));
        TempDir scratch("vramguard-kill-reference-");
        {
            ProfileCache reference(scratch.path(), true, [](Level, std::string_view) {});
            if (before) before(reference);
        }
        {
            ProfileCache reference(scratch.path(), true, [](Level, std::string_view) {});
            records(reference);
        }
        after_profile = summary(next_process_reads(scratch.path(), ignored));
        ASSERT_NE(before_profile, after_profile);
        if (first_records) {
            TempDir middle("vramguard-kill-middle-");
            {
                ProfileCache reference(middle.path(), true, [](Level, std::string_view) {});
                if (before) before(reference);
                first_records(reference);
            }
            middle_profile = summary(next_process_reads(middle.path(), ignored));
        }
    }
    void action(const std::string& dir) const {
        ProfileCacheSettings settings;
        if (write_behind) settings.write_behind = std::chrono::milliseconds(0);
        ProfileCache cache(
            dir, true, [](Level, std::string_view) {}, settings);
        records(cache);
    }  // a write-behind cache writes what its writer has not yet written here
    void check(const std::string& dir, bool finished) const {
        EXPECT_TRUE(lock_is_free(dir + "/.lock")) << "the dead hold the profile directory lock";
        std::vector<std::string> warnings;
        const std::string now = summary(next_process_reads(dir, warnings));
        EXPECT_TRUE(warnings.empty()) << "torn profile: " << warnings.front();
        if (finished)
            EXPECT_EQ(now, after_profile);
        else
            EXPECT_TRUE(now == before_profile || now == after_profile ||
                        (first_records && now == middle_profile))
                << "neither the profile before the write nor after it: " << now;
        // The next writer is not blocked, and its record lands.
        {
            ProfileCache next(dir, true, [](Level, std::string_view) {});
            next.record_batch_ceiling(profile_key(), 999);
        }
        warnings.clear();
        const std::optional<Profile> last = next_process_reads(dir, warnings);
        ASSERT_TRUE(last);
        EXPECT_EQ(last->batch_ceiling, 999u);
        EXPECT_TRUE(warnings.empty());
    }
};

TEST_F(KillPointTest, ProfileWrite) {
    ProfileWorld world;
    // One record, one write: the file is either before it or after it.
    world.records = [](ProfileCache& cache) { cache.record_peak(profile_key(), 5_GiB, 64); };
    run({"profile write", [&](const std::string& dir) { world.setup(dir); },
         [&](const std::string& dir) { world.action(dir); },
         [&](const std::string& dir, bool finished) { world.check(dir, finished); }},
        {"open", "flock", "write", "write (torn)", "fsync", "close", "rename"});
}

TEST_F(KillPointTest, ProfileMergeWithAnotherProcesssRecord) {
    ProfileWorld world;
    world.before = [](ProfileCache& cache) {
        cache.record_peak(profile_key(), 3_GiB, 16);
        cache.record_batch_ceiling(profile_key(), 16);
    };
    world.records = [](ProfileCache& cache) { cache.record_peak(profile_key(), 7_GiB, 32); };
    run({"profile merge", [&](const std::string& dir) { world.setup(dir); },
         [&](const std::string& dir) { world.action(dir); },
         [&](const std::string& dir, bool finished) { world.check(dir, finished); }},
        {"open", "flock", "write", "write (torn)", "fsync", "close", "rename"});
}

// The writer thread (issue 22): two records, written behind by the writer thread or by the
// destructor's final flush (once, or twice when the writer ran between them); a kill anywhere in
// either leaves the file before, after, or as the first write left it, never torn, and no lock
// held.
TEST_F(KillPointTest, ProfileWriteBehind) {
    ProfileWorld world;
    world.write_behind = true;
    world.before = [](ProfileCache& cache) { cache.record_peak(profile_key(), 3_GiB, 16); };
    world.first_records = [](ProfileCache& cache) { cache.record_peak(profile_key(), 7_GiB, 32); };
    world.records = [&world](ProfileCache& cache) {
        world.first_records(cache);
        cache.record_batch_ceiling(profile_key(), 32);
    };
    run({"profile write-behind", [&](const std::string& dir) { world.setup(dir); },
         [&](const std::string& dir) { world.action(dir); },
         [&](const std::string& dir, bool finished) { world.check(dir, finished); }},
        {"open", "flock", "write", "write (torn)", "fsync", "close", "rename"});
}

// A disk where fsync hangs (issue 22: "a 200 ms fsync leaves encode latency unchanged", taken to
// the limit): while the writer thread sits in fsync, encodes that learn go on returning, and the
// fsync was never called on a caller's thread. Then the write completes and the file has it all.
TEST(SlowDiskProfile, EncodesReturnWhileTheWriterIsStuckInFsync) {
    TempDir dir("vramguard-slow-fsync-");
    SimulatedDevice device(16_GiB);
    Options options;
    options.profile_dir = dir.path();
    options.persist_interval = std::chrono::milliseconds(0);
    options.log = nullptr;
    const Key key = Key::of("slow-fsync"), other = Key::of("slow-fsync-other");
    auto batch = [&](const BatchView<std::vector<int>::const_iterator>& b) {
        auto activations = device.allocate(10_MiB * b.size());
        return std::vector<int>(b.begin(), b.end());
    };
    FsyncGate gate;
    fsync_gate = &gate;
    struct Uninstall {
        FsyncGate& gate;
        ~Uninstall() {
            gate.release();
            fsync_gate = nullptr;
        }
    } uninstall{gate};
    Guard<SimulatedDevice> guard(device, options);
    guard.encode(key, std::vector<int>(4, 1), batch);  // learns: the writer starts a write
    {
        std::unique_lock<std::mutex> lock(gate.mutex);
        ASSERT_TRUE(gate.changed.wait_for(lock, std::chrono::seconds(20), [&] {
            return gate.waiting > 0;
        })) << "the writer never reached fsync";
    }
    // Every call below learns something (new sizes, a new key), on another thread, while the
    // write is stuck.
    const std::thread::id test_thread = std::this_thread::get_id();
    auto calls = std::async(std::launch::async, [&] {
        for (int call = 0; call < 50; ++call) {
            guard.encode(key, std::vector<int>(1 + call % 12, call), batch);
            guard.encode(other, std::vector<int>(2, call), batch);
        }
        return std::this_thread::get_id();
    });
    const bool returned = calls.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
    {
        std::lock_guard<std::mutex> lock(gate.mutex);
        EXPECT_TRUE(returned) << "encodes waited for the stuck fsync";
        EXPECT_EQ(gate.waiting, 1) << "the write finished early: the test proved nothing";
    }
    gate.release();
    const std::thread::id caller = calls.get();
    {
        std::lock_guard<std::mutex> lock(gate.mutex);
        for (const std::thread::id& id : gate.callers) {
            EXPECT_NE(id, caller) << "an encode called fsync";
            EXPECT_NE(id, test_thread) << "fsync on the first encode's thread";
        }
    }
    guard.flush();  // the rest, on this thread: flush() is the caller's own choice
    const Profile learned = guard.profiles().get(key);
    EXPECT_EQ(ProfileCache(dir.path(), true, nullptr).get(key).item_samples, learned.item_samples);
    EXPECT_EQ(guard.stats().profile_write_failures, 0u);
}

}  // namespace
