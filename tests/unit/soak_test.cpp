// SPDX-License-Identifier: MIT
// Soak (issue #7): many threads x many calls through one Guard, with random OOM injection, random
// non-OOM exceptions, random external usage changes and a log sink that sometimes throws.
// Checked for every call: each item's result exactly once and in input order (or, for a call that
// failed, exactly the documented part of it); and at the end: the counters add up, every
// allocation was given back (ASan/LSan see the rest), no reservation is held. A watchdog bounds
// the run: a deadlock aborts the test with the numbers instead of hanging CI.
//
// Short by default (fixed work, a few seconds; well under a minute under TSan on 2 cores).
// By hand:  VRAMGUARD_SOAK_SECONDS=600 ./soak_test     (runs each worker for 600 s of wall time)
//           VRAMGUARD_SOAK_SEED=7 ...                   (another random sequence)
//           VRAMGUARD_SOAK_THREADS=16 ...               (more threads)
// Waits inside the guard run on a ManualClock: nothing here sleeps for real.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include "guard_fixture.hpp"
#include "temp_dir.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::TempDir;

namespace {

using View = BatchView<std::vector<int>::const_iterator>;

// The non-OOM failure the callables throw at random: it must reach the caller untouched.
struct InjectedFailure : std::runtime_error {
    InjectedFailure() : std::runtime_error("soak: injected non-OOM failure") {}
};

unsigned long env_number(const char* name, unsigned long fallback) {
    if (const char* text = std::getenv(name); text && *text) {
        char* end = nullptr;
        const unsigned long value = std::strtoul(text, &end, 10);
        if (end && *end == '\0') return value;
    }
    return fallback;
}

struct SoakConfig {
    unsigned threads = 8;
    unsigned calls_per_thread = 150;  // the short variant: fixed work
    unsigned long seconds = 0;        // the long variant: wall time per worker instead
    unsigned long seed = 20240607;

    static SoakConfig from_environment() {
        SoakConfig config;
        config.seconds = env_number("VRAMGUARD_SOAK_SECONDS", 0);
        config.seed = env_number("VRAMGUARD_SOAK_SEED", config.seed);
        config.threads =
            static_cast<unsigned>(env_number("VRAMGUARD_SOAK_THREADS", config.threads));
        if (config.threads == 0) config.threads = 1;
        return config;
    }
};

// What the workers saw, summed over threads at the end.
struct Tally {
    std::atomic<std::uint64_t> calls{0}, succeeded{0}, injected{0}, exhausted{0}, rejected{0},
        items{0};
};

// Aborts the process (with the numbers) unless disarmed before the deadline: a deadlock must fail
// the test, not hang CI until its global timeout.
class Watchdog {
   public:
    Watchdog(std::chrono::seconds limit, const Tally& tally) : tally_(tally) {
        thread_ = std::thread([this, limit] {
            std::unique_lock<std::mutex> lock(mutex_);
            if (done_cv_.wait_for(lock, limit, [this] { return done_; })) return;
            std::fprintf(
                stderr,
                "soak_test: no progress within %lld s (deadlock?): calls %llu, succeeded %llu\n",
                static_cast<long long>(limit.count()),
                static_cast<unsigned long long>(tally_.calls.load()),
                static_cast<unsigned long long>(tally_.succeeded.load()));
            std::abort();
        });
    }
    ~Watchdog() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            done_ = true;
        }
        done_cv_.notify_all();
        thread_.join();
    }

   private:
    const Tally& tally_;
    std::mutex mutex_;
    std::condition_variable done_cv_;
    bool done_ = false;
    std::thread thread_;
};

// Counts log lines by level; throws on every 97th line (the guard must swallow it).
struct SoakLog {
    std::atomic<std::uint64_t> lines{0}, errors{0};
    LogSink sink() {
        return [this](Level level, std::string_view) {
            if (level >= Level::error) ++errors;
            if (++lines % 97 == 0) throw std::runtime_error("soak: log sink failure");
        };
    }
};

using vramguard_test::CountingCoordinator;

class Worker {
   public:
    Worker(Guard<SimulatedDevice>& guard, SimulatedDevice& device, Tally& tally, unsigned long seed)
        : guard_(guard), device_(device), tally_(tally), random_(seed) {}

    // One random call; returns a description of what went wrong, or "" when all was as documented.
    std::string one_call(unsigned call) {
        const unsigned kind = pick(100);
        if (kind < 65) return encode_call(call, false);
        if (kind < 82) return encode_call(call, true);
        return load_call(call);
    }

   private:
    unsigned pick(unsigned n) { return static_cast<unsigned>(random_() % n); }

    // The chaos a callable adds before doing its work.
    void chaos() {
        const unsigned roll = pick(1000);
        if (roll < 15) throw InjectedFailure();                     // 1.5 %
        if (roll < 75) device_.fail_next_allocations(1 + pick(2));  // 6 %
        if (roll < 125)
            device_.set_external_usage(static_cast<std::uint64_t>(pick(11)) * 1_GiB);  // 5 %
    }

    std::string encode_call(unsigned call, bool weighted) {
        const int n = 1 + static_cast<int>(pick(48));
        std::vector<int> items(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i)
            items[static_cast<std::size_t>(i)] = static_cast<int>(call) * 1000 + i;
        std::vector<int> expected;
        for (int item : items) expected.push_back(item * 3 + 1);
        std::vector<int> seen(items.size(), 0);
        const std::uint64_t item_bytes = (8 + pick(57)) * 1_MiB;
        auto weight = [](int item) -> std::uint64_t {
            return 1 + static_cast<std::uint64_t>(item % 13);
        };
        auto batch_fn = [&](const View& batch) {
            chaos();
            std::uint64_t bytes = 0;
            for (int item : batch) bytes += weighted ? weight(item) * 4_MiB : item_bytes;
            auto activations = device_.allocate(bytes);
            std::vector<int> out;
            out.reserve(batch.size());
            for (std::size_t i = 0; i < batch.size(); ++i) {
                ++seen[batch.offset() + i];
                out.push_back(batch[i] * 3 + 1);
            }
            return out;
        };
        const Key key = weighted ? Key::of("soak-weighted")
                                 : Key::of("soak-encode", {{"k", std::to_string(call % 2)}});
        ++tally_.calls;
        std::size_t done = 0;  // how many leading items must have run exactly once
        try {
            std::vector<int> out = weighted ? guard_.encode(key, items, batch_fn, weight)
                                            : guard_.encode(key, items, batch_fn);
            if (out != expected) return "results differ from the input order";
            done = items.size();
            ++tally_.succeeded;
            tally_.items += items.size();
        } catch (const InjectedFailure&) {
            ++tally_.injected;
            while (done < seen.size() && seen[done] == 1) ++done;  // a prefix ran, then it stopped
        } catch (const OomExhausted& e) {
            ++tally_.exhausted;
            if (!e.item_index()) return "OomExhausted from encode without an item index";
            done = *e.item_index();
            const std::vector<int> prefix(expected.begin(),
                                          expected.begin() + static_cast<long>(done));
            if (e.finished_results<int>() != prefix) return "finished results are not the prefix";
        } catch (const InsufficientMemory&) {
            ++tally_.rejected;  // refused before any chunk ran
        } catch (const std::exception& e) {
            return std::string("unexpected exception: ") + e.what();
        }
        for (std::size_t i = 0; i < seen.size(); ++i)
            if (seen[i] != (i < done ? 1 : 0))
                return "item " + std::to_string(i) + " ran " + std::to_string(seen[i]) + " times";
        return "";
    }

    std::string load_call(unsigned call) {
        const std::uint64_t declared = (256 + pick(1793)) * 1_MiB;
        const Key key = Key::of("soak-load", {{"model", std::to_string(call % 3)}});
        int runs = 0;
        ++tally_.calls;
        try {
            auto model = guard_.load(key, declared, [&] {
                ++runs;
                chaos();
                return device_.allocate(declared);
            });
            if (model.bytes() != declared) return "load returned the wrong allocation";
            ++tally_.succeeded;
        } catch (const InjectedFailure&) {
            ++tally_.injected;
        } catch (const OomExhausted& e) {
            ++tally_.exhausted;
            if (e.item_index()) return "OomExhausted from load with an item index";
        } catch (const InsufficientMemory&) {
            ++tally_.rejected;
        } catch (const std::exception& e) {
            return std::string("unexpected exception from load: ") + e.what();
        }
        if (runs > static_cast<int>(guard_.options().load_attempts)) return "load ran too often";
        return "";
    }

    Guard<SimulatedDevice>& guard_;
    SimulatedDevice& device_;
    Tally& tally_;
    std::mt19937_64 random_;
};

TEST(Soak, ManyThreadsRandomOomsFailuresAndExternalUsageLoseNothing) {
    const SoakConfig config = SoakConfig::from_environment();
    SimulatedDevice device(16_GiB);
    ManualClock clock;
    SoakLog log;
    TempDir profiles("vramguard-soak-");
    auto holds = std::make_shared<CountingCoordinator>();
    Options options;
    options.clock = clock.clock_fn();
    options.sleep = clock.sleep_fn();
    options.log = log.sink();
    options.profile_dir = profiles.path();
    options.persist = true;
    options.retry_delay = 1s;
    options.admission_wait = 500ms;
    options.coordinator = holds;
    Guard<SimulatedDevice> guard(device, options);

    Tally tally;
    std::vector<std::string> problems;
    std::mutex problems_mutex;
    const auto limit = std::chrono::seconds(config.seconds > 0 ? config.seconds + 120 : 240);
    {
        Watchdog watchdog(limit, tally);
        const auto stop_at =
            std::chrono::steady_clock::now() + std::chrono::seconds(config.seconds);
        std::vector<std::thread> workers;
        for (unsigned t = 0; t < config.threads; ++t) {
            workers.emplace_back([&, t] {
                Worker worker(guard, device, tally, config.seed * 1000003 + t);
                for (unsigned call = 0;; ++call) {
                    if (config.seconds > 0 ? std::chrono::steady_clock::now() >= stop_at
                                           : call >= config.calls_per_thread)
                        break;
                    std::string problem = worker.one_call(call);
                    if (!problem.empty()) {
                        std::lock_guard<std::mutex> lock(problems_mutex);
                        if (problems.size() < 20)
                            problems.push_back("thread " + std::to_string(t) + " call " +
                                               std::to_string(call) + ": " + problem);
                    }
                }
            });
        }
        for (auto& worker : workers) worker.join();
    }
    device.fail_next_allocations(0);

    for (const std::string& problem : problems) ADD_FAILURE() << problem;
    const Stats stats = guard.stats();
    // Every call is accounted for, once.
    EXPECT_EQ(tally.calls.load(),
              tally.succeeded + tally.injected + tally.exhausted + tally.rejected);
    EXPECT_EQ(stats.calls, tally.calls.load());
    EXPECT_EQ(stats.rejections, tally.rejected.load());
    // Every OOM thrown was caught by the guard, and each was halved, retried or given up on.
    EXPECT_EQ(stats.ooms, device.oom_count());
    EXPECT_EQ(stats.ooms, stats.halvings + stats.retries + tally.exhausted.load());
    // Nothing leaked: allocations, reservations, locks, the single-item permit.
    EXPECT_EQ(device.live_allocations(), 0u);
    EXPECT_EQ(device.allocated_bytes(), 0u);
    EXPECT_EQ(holds->live(), 0);
    auto semaphore = shared_device_semaphore(detail::device_identity(device), 1);
    EXPECT_TRUE(semaphore->try_acquire());
    semaphore->release();
    EXPECT_EQ(log.errors.load(), 0u);  // handled OOMs are WARN, never ERROR
    // The run exercised what it claims to.
    EXPECT_GT(tally.succeeded.load(), 0u);
    EXPECT_GT(stats.ooms, 0u);
    EXPECT_GT(stats.halvings, 0u);
    EXPECT_GT(tally.injected.load(), 0u);
    // The learned state made it to disk in a form a new process can read.
    guard.flush();  // written behind: now
    ProfileCache fresh(profiles.path(), true, [](Level, std::string_view) {});
    EXPECT_TRUE(fresh.persistent());
    EXPECT_GT(fresh.get(Key::of("soak-encode", {{"k", "0"}})).batch_ceiling +
                  fresh.get(Key::of("soak-encode", {{"k", "1"}})).batch_ceiling,
              0u);

    RecordProperty("seed", static_cast<int>(config.seed));
    RecordProperty("calls", static_cast<int>(tally.calls.load()));
    RecordProperty("items", static_cast<int>(tally.items.load()));
    RecordProperty("ooms", static_cast<int>(stats.ooms));
    std::printf(
        "soak: seed %lu, %u threads, %llu calls (%llu ok, %llu injected failures, %llu "
        "exhausted, %llu rejected), %llu items, %llu OOMs, %llu halvings, %llu retries\n",
        config.seed, config.threads, static_cast<unsigned long long>(tally.calls.load()),
        static_cast<unsigned long long>(tally.succeeded.load()),
        static_cast<unsigned long long>(tally.injected.load()),
        static_cast<unsigned long long>(tally.exhausted.load()),
        static_cast<unsigned long long>(tally.rejected.load()),
        static_cast<unsigned long long>(tally.items.load()),
        static_cast<unsigned long long>(stats.ooms),
        static_cast<unsigned long long>(stats.halvings),
        static_cast<unsigned long long>(stats.retries));
}

}  // namespace
