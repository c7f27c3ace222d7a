// SPDX-License-Identifier: MIT
// Serving many requests at once (issue 23): request threads share one guard and one key on one
// simulated device, with REAL threads and the real clock. Unlike policy_bench there is no shared
// simulated time: batches hold their memory while they run (a real sleep), so what one thread's
// batch does to another's reading is what a server sees.
//
// The device: 24 GiB, a 4 GiB model held for the run; a batch of T tokens allocates 256 MiB +
// 2 MiB x T, sleeps ~1 us x T, then frees. T is the batch's tokens as the model computes them:
// packed (the sum; varlen kernels, as TEI) or padded (batch size x its longest item; the weight is
// then vramguard::padded()). Texts: 90 % of 16-64 tokens, 10 % of 256-512; each request thread
// makes 20-40 calls of 64 texts (fixed seed per thread). GPU time = sum over batches that ran of
// (1 ms launch + 1 us x T); an OOM costs half its batch's time plus a 2 ms flush. GPU time is a
// sum, not the wall time: what a device running one batch at a time would spend.
//
// Modes, each at 1, 8 and 32 request threads (the same calls for every mode):
//   static-partition   anchor, computed: each thread packs greedily up to 1/N of the free memory
//                      (the true cost model), never an OOM; an item over its share runs alone
//   whole-device-bound anchor, computed: each call packed greedily as if alone with the device
//   whole-device-best  anchor, computed: each call split in order at the cheapest points (padded:
//                      below the greedy bound, which pads more than it must; packed: the same)
//   encode             per-request Guard::encode, one Guard and one Key for all threads
//   tei-whole          a TEI-like batcher: one queue, one batching thread that coalesces the queued
//                      items of all callers up to a fixed token budget (--max-batch-tokens) and
//                      runs one batch at a time; budget sized for the whole device
//   tei-worst          the same, budget sized for the worst case (the squeeze's 8 GiB taken)
//   batcher            vramguard::Batcher (compiled where <vramguard/batcher.hpp> exists)
// The squeeze scenario: another process takes 8 GiB while the second third of all calls complete
// (encode, tei-whole, batcher). Its anchors pack each call that overlapped the squeeze in that
// run for the squeezed free memory, the others for the whole.
//
//   concurrency_bench [--quick | --full] [--threads=1,8,32] [--layout=packed|padded|both]
//                     [--scenario=steady|squeeze|all]
// --quick runs the first fifth of each thread's calls; --full (the default) all of them.
#include "cost_model.hpp"  // vgbench::SplitMix64, MiB, GiB

#include <vramguard/vramguard.hpp>
#if __has_include(<vramguard/batcher.hpp>)
#include <vramguard/batcher.hpp>
#define VGBENCH_HAVE_BATCHER 1
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using vgbench::GiB;
using vgbench::Layout;
using vgbench::MiB;

// ---- the workload and its true cost ------------------------------------------------------------

constexpr std::uint64_t device_bytes = 24 * GiB;
constexpr std::uint64_t model_bytes = 4 * GiB;
constexpr std::uint64_t free_bytes = device_bytes - model_bytes;
constexpr std::uint64_t squeeze_bytes = 8 * GiB;
constexpr std::uint64_t fixed_bytes = 256 * MiB;
constexpr std::uint64_t bytes_per_token = 2 * MiB;
constexpr double launch_us = 1000;
constexpr double flush_us = 2000;
constexpr std::size_t texts_per_call = 64;

struct Item {
    std::uint64_t id;  // unique in the run: thread << 32 | index
    std::uint32_t tokens;
};
using Call = std::vector<Item>;
using Results = std::vector<std::uint64_t>;  // what a batch returns: its items' ids, in order

// A batch's memory and time follow its tokens as the model computes them (batch_tokens()).
std::uint64_t bytes_for(std::uint64_t tokens) { return fixed_bytes + bytes_per_token * tokens; }
double batch_us(std::uint64_t tokens) { return launch_us + double(tokens); }
double oom_us(std::uint64_t tokens) { return batch_us(tokens) / 2 + flush_us; }
// The most tokens one batch may have with `bytes` free.
std::uint64_t token_budget(std::uint64_t bytes) { return (bytes - fixed_bytes) / bytes_per_token; }

// padded: batch size x its longest item (padded batches); packed: the sum (varlen kernels, TEI).
template <class It>
std::uint64_t batch_tokens(Layout layout, It first, It last) {
    std::uint64_t count = 0, longest = 0, sum = 0;
    for (; first != last; ++first, ++count) {
        longest = std::max<std::uint64_t>(longest, first->tokens);
        sum += first->tokens;
    }
    return layout == Layout::padded ? count * longest : sum;
}

// Thread t's calls: the same for every mode and every thread count it takes part in.
std::vector<Call> calls_of_thread(std::size_t t, bool quick) {
    vgbench::SplitMix64 random{0xc0c0'0000ull + 7919 * t};
    std::size_t calls = random.between(20, 40);
    std::vector<Call> list(calls);
    std::uint64_t next = std::uint64_t{t} << 32;
    for (Call& call : list) {
        for (std::size_t i = 0; i < texts_per_call; ++i) {
            const bool long_text = random.next() % 10 == 0;
            const auto tokens = long_text ? random.between(256, 512) : random.between(16, 64);
            call.push_back({next++, static_cast<std::uint32_t>(tokens)});
        }
    }
    if (quick) list.resize(std::max<std::size_t>(1, calls / 5));
    return list;
}

struct Workload {
    Layout layout;
    std::vector<std::vector<Call>> calls;  // [thread][call]
    std::size_t threads() const { return calls.size(); }
};

Workload workload(Layout layout, std::size_t threads, bool quick) {
    Workload all{layout, {}};
    for (std::size_t t = 0; t < threads; ++t) all.calls.push_back(calls_of_thread(t, quick));
    return all;
}

// ---- what a run measured ----------------------------------------------------------------------

struct Ledger {
    std::mutex mutex;
    std::uint64_t batches = 0, batch_tokens = 0, ooms = 0;
    double gpu_us = 0;

    void ran(std::uint64_t tokens) {
        std::lock_guard<std::mutex> lock(mutex);
        ++batches;
        batch_tokens += tokens;
        gpu_us += batch_us(tokens);
    }
    void oom(std::uint64_t tokens) {
        std::lock_guard<std::mutex> lock(mutex);
        ++ooms;
        gpu_us += oom_us(tokens);
    }
};

// Each call's results against its items: ids of other calls are `mixed`, extra copies
// `duplicated`, missing ids `lost` (a call that failed loses all its items), and a call with
// exactly its items in another order counts its misplaced positions as `reordered`.
struct Check {
    std::mutex mutex;
    std::uint64_t lost = 0, duplicated = 0, reordered = 0, mixed = 0, failed_calls = 0;

    void failed(const Call& call) {
        std::lock_guard<std::mutex> lock(mutex);
        ++failed_calls;
        lost += call.size();
    }
    void compare(const Call& call, const Results& got) {
        std::map<std::uint64_t, std::size_t> seen;
        for (const Item& item : call) seen[item.id] = 0;
        std::uint64_t foreign = 0, extra = 0, missing = 0, misplaced = 0;
        for (std::uint64_t id : got) {
            auto it = seen.find(id);
            if (it == seen.end())
                ++foreign;
            else if (it->second++ > 0)
                ++extra;
        }
        for (const auto& entry : seen) missing += entry.second == 0;
        if (foreign + extra + missing == 0)
            for (std::size_t i = 0; i < call.size(); ++i) misplaced += got[i] != call[i].id;
        std::lock_guard<std::mutex> lock(mutex);
        lost += missing;
        duplicated += extra;
        reordered += misplaced;
        mixed += foreign;
    }
};

struct Outcome {
    std::string mode;
    std::size_t threads = 0;
    std::uint64_t items = 0, batches = 0, batch_tokens = 0, ooms = 0;
    double gpu_us = 0, wall_s = 0;
    std::uint64_t lost = 0, duplicated = 0, reordered = 0, mixed = 0, failed_calls = 0;
    std::vector<std::vector<bool>> squeezed;  // [thread][call]: overlapped the squeeze
    std::string note;
};

// ---- the anchors: computed from the true cost model --------------------------------------------

// Where each batch of one call ends, packed greedily in order up to `bytes` (an item over it runs
// alone).
std::vector<std::size_t> greedy_split(Layout layout, const Call& call, std::uint64_t bytes) {
    std::vector<std::size_t> ends;
    for (std::size_t first = 0; first < call.size();) {
        std::size_t last = first + 1;
        while (last < call.size() &&
               bytes_for(batch_tokens(layout, &call[first], &call[last] + 1)) <= bytes)
            ++last;
        ends.push_back(last);
        first = last;
    }
    return ends;
}

// The cheapest in-order split of one call into batches of at most `bytes`, by dynamic programming
// over where batches end: what no packer that keeps a call's order and runs it alone can beat.
// With packed batches it is the greedy split; with padded ones greedy pads more than it must.
std::vector<std::size_t> best_split(Layout layout, const Call& call, std::uint64_t bytes) {
    const std::size_t n = call.size();
    std::vector<double> cost(n + 1, 1e300);
    std::vector<std::size_t> from(n + 1, 0);
    cost[0] = 0;
    for (std::size_t last = 1; last <= n; ++last) {
        std::uint64_t longest = 0, sum = 0;
        for (std::size_t first = last; first-- > 0;) {
            longest = std::max<std::uint64_t>(longest, call[first].tokens);
            sum += call[first].tokens;
            const std::uint64_t tokens = layout == Layout::padded ? longest * (last - first) : sum;
            if (first + 1 < last && bytes_for(tokens) > bytes) break;  // only grows from here
            if (cost[first] + batch_us(tokens) < cost[last]) {
                cost[last] = cost[first] + batch_us(tokens);
                from[last] = first;
            }
        }
    }
    std::vector<std::size_t> ends;
    for (std::size_t last = n; last > 0; last = from[last]) ends.push_back(last);
    std::reverse(ends.begin(), ends.end());
    return ends;
}

using Splitter = std::vector<std::size_t> (*)(Layout, const Call&, std::uint64_t);

// `share` divides the free memory: the thread count for the static partition, 1 for the bounds.
// `squeezed` (may be empty) says which calls pack for the squeezed device.
Outcome anchor(const std::string& mode, const Workload& work, std::size_t share,
               const std::vector<std::vector<bool>>& squeezed, Splitter split = greedy_split) {
    Outcome out;
    out.mode = mode;
    out.threads = work.threads();
    for (std::size_t t = 0; t < work.threads(); ++t) {
        for (std::size_t c = 0; c < work.calls[t].size(); ++c) {
            const Call& call = work.calls[t][c];
            const bool in_squeeze = !squeezed.empty() && squeezed[t][c];
            const std::uint64_t free = in_squeeze ? free_bytes - squeeze_bytes : free_bytes;
            std::size_t first = 0;
            for (std::size_t last : split(work.layout, call, free / share)) {
                const std::uint64_t tokens =
                    batch_tokens(work.layout, &call[first], &call[last - 1] + 1);
                ++out.batches;
                out.batch_tokens += tokens;
                out.gpu_us += batch_us(tokens);
                first = last;
            }
            out.items += call.size();
        }
    }
    return out;
}

// ---- the device rig: what every run mode drives ------------------------------------------------

// The other process: takes squeeze_bytes once a third of all calls completed, leaves at two
// thirds. Phases 0 (before), 1 (during), 2 (after).
class Squeeze {
   public:
    Squeeze(vramguard::SimulatedDevice& device, std::size_t total_calls, bool enabled)
        : device_(device), begin_(total_calls / 3), end_(2 * total_calls / 3), enabled_(enabled) {}
    int phase() const { return phase_.load(); }
    void call_done() {
        const std::size_t done = ++done_;
        if (!enabled_) return;
        if (done == begin_) {
            device_.set_external_usage(squeeze_bytes);
            phase_ = 1;
        }
        if (done == end_) {
            device_.set_external_usage(0);
            phase_ = 2;
        }
    }

   private:
    vramguard::SimulatedDevice& device_;
    const std::size_t begin_, end_;
    const bool enabled_;
    std::atomic<std::size_t> done_{0};
    std::atomic<int> phase_{0};
};

struct Rig {
    explicit Rig(Layout layout_) : layout(layout_) {}
    const Layout layout;
    vramguard::SimulatedDevice device{device_bytes};
    vramguard::SimulatedDevice::Allocation model = device.allocate(model_bytes);
    Ledger ledger;
    Check check;

    // One batch: allocate, hold the memory ~1 us per padded token, free. An OOM is the device's
    // own vramguard::OutOfMemory, counted and rethrown for whoever handles it.
    template <class It>
    Results run(It first, It last) {
        const std::uint64_t tokens = batch_tokens(layout, first, last);
        vramguard::SimulatedDevice::Allocation activations;
        try {
            activations = device.allocate(bytes_for(tokens));
        } catch (const vramguard::OutOfMemory&) {
            ledger.oom(tokens);
            throw;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(tokens));
        ledger.ran(tokens);
        Results ids;
        for (; first != last; ++first) ids.push_back(first->id);
        return ids;
    }
};

// The batch function handed to Guard::encode and the Batcher: a view of Items in, their ids out.
struct BatchFn {
    Rig* rig;
    template <class View>
    Results operator()(const View& batch) const {
        return rig->run(batch.begin(), batch.end());
    }
};

struct TokensOf {
    std::uint64_t operator()(const Item& item) const { return item.tokens; }
};

vramguard::Options guard_options() {
    vramguard::Options options;  // the real clock and sleep, default waits and policy
    options.persist = false;
    options.log = nullptr;
    return options;
}

// Runs every thread's calls through `encode_call(const Call&) -> Results` (throwing = the call
// failed), all threads started together, and fills the outcome from the rig.
template <class EncodeCall>
Outcome drive(const std::string& mode, const Workload& work, Rig& rig, bool squeeze_on,
              EncodeCall&& encode_call) {
    const std::vector<std::vector<Call>>& calls = work.calls;
    std::size_t total = 0;
    for (const auto& list : calls) total += list.size();
    Squeeze squeeze(rig.device, total, squeeze_on);
    Outcome out;
    out.mode = mode;
    out.threads = calls.size();
    out.squeezed.resize(calls.size());
    std::promise<void> go;
    std::shared_future<void> start = go.get_future().share();
    std::vector<std::thread> workers;
    for (std::size_t t = 0; t < calls.size(); ++t) {
        out.squeezed[t].resize(calls[t].size());
        workers.emplace_back([&, t] {
            start.wait();
            for (std::size_t c = 0; c < calls[t].size(); ++c) {
                const Call& call = calls[t][c];
                const int phase_before = squeeze.phase();
                try {
                    rig.check.compare(call, encode_call(call));
                } catch (const std::exception&) {
                    rig.check.failed(call);
                }
                out.squeezed[t][c] = phase_before <= 1 && squeeze.phase() >= 1 && squeeze_on;
                squeeze.call_done();
            }
        });
    }
    const auto began = std::chrono::steady_clock::now();
    go.set_value();
    for (auto& worker : workers) worker.join();
    out.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    for (const auto& list : calls)
        for (const Call& call : list) out.items += call.size();
    out.batches = rig.ledger.batches;
    out.batch_tokens = rig.ledger.batch_tokens;
    out.ooms = rig.ledger.ooms;
    out.gpu_us = rig.ledger.gpu_us;
    out.lost = rig.check.lost;
    out.duplicated = rig.check.duplicated;
    out.reordered = rig.check.reordered;
    out.mixed = rig.check.mixed;
    out.failed_calls = rig.check.failed_calls;
    return out;
}

// ---- mode (a): per-request Guard::encode -------------------------------------------------------

// Padded batches say so with padded(): the guard's budget then counts padded tokens.
Outcome run_encode(const Workload& work, bool squeeze) {
    Rig rig(work.layout);
    vramguard::Guard<vramguard::SimulatedDevice> guard(rig.device, guard_options());
    const vramguard::Key key = vramguard::Key::of("concurrency-bench");
    const BatchFn batch_fn{&rig};
    Outcome out = drive("encode", work, rig, squeeze, [&](const Call& call) {
        if (work.layout == Layout::padded)
            return guard.encode(key, call, batch_fn, vramguard::padded(TokensOf{}));
        return guard.encode(key, call, batch_fn, TokensOf{});
    });
    out.note = "guard counted " + std::to_string(guard.stats().ooms) + " OOMs";
    return out;
}

// ---- mode (d): a TEI-like fixed-budget batcher -------------------------------------------------

// text-embeddings-inference's router, reduced to what matters here: one FIFO queue of the items of
// all callers; one batching thread takes items from its front while the padded batch (count x
// longest) stays within max_batch_tokens (the first item always), and runs one batch at a time.
// It learns nothing: an OOM is counted, and the batch is retried split in two (recursively); a
// single item that still runs out waits 1 ms and retries, and fails its caller after 1000 tries.
class FixedBudgetBatcher {
   public:
    FixedBudgetBatcher(Rig& rig, std::uint64_t max_batch_tokens)
        : rig_(rig), budget_(max_batch_tokens), worker_([this] { loop(); }) {}
    ~FixedBudgetBatcher() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        worker_.join();
    }

    Results encode(const Call& call) {
        Pending pending;
        pending.results.resize(call.size());
        pending.remaining = call.size();
        {
            std::lock_guard<std::mutex> lock(mutex_);
            for (std::size_t i = 0; i < call.size(); ++i) queue_.push_back({call[i], &pending, i});
        }
        wake_.notify_all();
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return pending.remaining == 0; });
        if (pending.failed) throw std::runtime_error("an item ran out of memory alone");
        return std::move(pending.results);
    }

   private:
    struct Pending {
        Results results;
        std::size_t remaining = 0;
        bool failed = false;
    };
    struct Entry {
        Item item;
        Pending* call;
        std::size_t index;
    };
    using Batch = std::vector<Entry>;

    void loop() {
        for (;;) {
            Batch batch;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
                if (queue_.empty()) return;
                std::uint64_t longest = 0, sum = 0;
                while (!queue_.empty()) {
                    const std::uint32_t tokens = queue_.front().item.tokens;
                    const std::uint64_t next_longest = std::max<std::uint64_t>(longest, tokens);
                    const std::uint64_t next = rig_.layout == Layout::padded
                                                   ? next_longest * (batch.size() + 1)
                                                   : sum + tokens;
                    if (!batch.empty() && next > budget_) break;
                    longest = next_longest;
                    sum += tokens;
                    batch.push_back(queue_.front());
                    queue_.pop_front();
                }
            }
            run(batch.begin(), batch.end());
        }
    }

    void run(Batch::iterator first, Batch::iterator last) {
        std::vector<Item> items;
        for (auto it = first; it != last; ++it) items.push_back(it->item);
        for (int tries = 0;; ++tries) {
            try {
                const Results ids = rig_.run(items.begin(), items.end());
                finish(first, last, &ids);
                return;
            } catch (const vramguard::OutOfMemory&) {
                if (items.size() > 1) {
                    const auto middle = first + (last - first) / 2;
                    run(first, middle);
                    run(middle, last);
                    return;
                }
                if (tries >= 1000) break;
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
        }
        finish(first, last, nullptr);
    }

    void finish(Batch::iterator first, Batch::iterator last, const Results* ids) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            for (auto it = first; it != last; ++it) {
                if (ids)
                    it->call->results[it->index] = (*ids)[std::size_t(it - first)];
                else
                    it->call->failed = true;
                --it->call->remaining;
            }
        }
        done_.notify_all();
    }

    Rig& rig_;
    const std::uint64_t budget_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::deque<Entry> queue_;
    bool stop_ = false;
    std::thread worker_;  // last: started once the rest is ready
};

Outcome run_tei(const std::string& mode, std::uint64_t budget_bytes, const Workload& work,
                bool squeeze) {
    Rig rig(work.layout);
    const std::uint64_t budget = token_budget(budget_bytes);
    FixedBudgetBatcher batcher(rig, budget);
    Outcome out =
        drive(mode, work, rig, squeeze, [&](const Call& call) { return batcher.encode(call); });
    out.note = "max_batch_tokens " + std::to_string(budget);
    return out;
}

// ---- mode (e): vramguard::Batcher --------------------------------------------------------------

#ifdef VGBENCH_HAVE_BATCHER
template <class Weight>
Outcome run_batcher_with(const Workload& work, bool squeeze, Weight weight) {
    Rig rig(work.layout);
    vramguard::Guard<vramguard::SimulatedDevice> guard(rig.device, guard_options());
    const vramguard::Key key = vramguard::Key::of("concurrency-bench");
    auto batcher = vramguard::make_batcher<Item>(guard, key, BatchFn{&rig}, weight);
    Outcome out = drive("batcher", work, rig, squeeze, [&](const Call& call) {
        Results results = batcher.encode(std::vector<Item>(call));
        return results;
    });
    out.note = "guard counted " + std::to_string(guard.stats().ooms) + " OOMs";
    return out;
}

Outcome run_batcher(const Workload& work, bool squeeze) {
    if (work.layout == Layout::padded)
        return run_batcher_with(work, squeeze, vramguard::padded(TokensOf{}));
    return run_batcher_with(work, squeeze, TokensOf{});
}
#endif

// ---- the table ---------------------------------------------------------------------------------

void print_header(const char* title) {
    std::printf("\n%s\n", title);
    std::printf(
        "| %-18s | %3s | %6s | %5s | %8s | %8s | %9s | %9s | %10s | %4s | %4s | %4s | %5s "
        "| %6s |\n",
        "mode", "thr", "items", "OOMs", "OOM/1000", "GPU s", "vs static", "vs whole", "mean batch",
        "lost", "dup", "reord", "mixed", "wall s");
    std::printf("|%s|\n", std::string(142, '-').c_str());
}

void print_row(const Outcome& o, double static_us, double whole_us) {
    const double per_1000 = o.items ? 1000.0 * double(o.ooms) / double(o.items) : 0;
    const double mean = o.batches ? double(o.batch_tokens) / double(o.batches) : 0;
    std::printf(
        "| %-18s | %3zu | %6llu | %5llu | %8.2f | %8.3f | %9.3f | %9.3f | %10.0f | %4llu | "
        "%4llu | %5llu | %5llu | %6.1f |%s%s\n",
        o.mode.c_str(), o.threads, (unsigned long long)o.items, (unsigned long long)o.ooms,
        per_1000, o.gpu_us / 1e6, o.gpu_us / static_us, o.gpu_us / whole_us, mean,
        (unsigned long long)o.lost, (unsigned long long)o.duplicated,
        (unsigned long long)o.reordered, (unsigned long long)o.mixed, o.wall_s,
        o.note.empty() ? "" : " ", o.note.c_str());
    std::fflush(stdout);
}

// Prints a measured row against the anchors packed for the calls that overlapped its squeeze.
void print_measured(const Outcome& o, const Workload& work) {
    const Outcome partition = anchor("static-partition", work, work.threads(), o.squeezed);
    const Outcome whole = anchor("whole-device-bound", work, 1, o.squeezed);
    print_row(o, partition.gpu_us, whole.gpu_us);
}

struct Flags {
    bool quick = false;
    std::vector<std::size_t> threads{1, 8, 32};
    std::vector<Layout> layouts{Layout::packed, Layout::padded};
    bool steady = true, squeeze = true;
};

void steady_scenario(const Flags& flags, Layout layout) {
    print_header(("steady/" + std::string(to_string(layout)) +
                  ": 24 GiB device, 4 GiB model, nothing else on it")
                     .c_str());
    for (std::size_t n : flags.threads) {
        const Workload work = workload(layout, n, flags.quick);
        const Outcome partition = anchor("static-partition", work, n, {});
        const Outcome whole = anchor("whole-device-bound", work, 1, {});
        print_row(partition, partition.gpu_us, whole.gpu_us);
        print_row(whole, partition.gpu_us, whole.gpu_us);
        print_row(anchor("whole-device-best", work, 1, {}, best_split), partition.gpu_us,
                  whole.gpu_us);
        print_measured(run_encode(work, false), work);
        print_measured(run_tei("tei-whole", free_bytes, work, false), work);
        print_measured(run_tei("tei-worst", free_bytes - squeeze_bytes, work, false), work);
#ifdef VGBENCH_HAVE_BATCHER
        print_measured(run_batcher(work, false), work);
#endif
    }
}

void squeeze_scenario(const Flags& flags, Layout layout) {
    print_header(("squeeze/" + std::string(to_string(layout)) +
                  ": another process takes 8 GiB while the second third of the calls complete\n"
                  "(ratios: anchors pack the calls that overlapped the squeeze in that run for "
                  "12 GiB)")
                     .c_str());
    for (std::size_t n : flags.threads) {
        const Workload work = workload(layout, n, flags.quick);
        print_measured(run_encode(work, true), work);
        print_measured(run_tei("tei-whole", free_bytes, work, true), work);
#ifdef VGBENCH_HAVE_BATCHER
        print_measured(run_batcher(work, true), work);
#endif
    }
}

std::vector<std::size_t> parse_list(const char* text) {
    std::vector<std::size_t> list;
    for (const char* p = text; *p;) {
        char* end = nullptr;
        const unsigned long value = std::strtoul(p, &end, 10);
        if (end == p || value == 0) throw std::invalid_argument(std::string("bad list: ") + text);
        list.push_back(value);
        p = *end == ',' ? end + 1 : end;
        if (*end != ',' && *end != '\0')
            throw std::invalid_argument(std::string("bad list: ") + text);
    }
    return list;
}

Flags parse(int argc, char** argv) {
    Flags flags;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--quick") {
            flags.quick = true;
        } else if (arg == "--full") {
            flags.quick = false;
        } else if (arg.rfind("--threads=", 0) == 0) {
            flags.threads = parse_list(argv[i] + 10);
        } else if (arg.rfind("--layout=", 0) == 0) {
            const std::string l = arg.substr(9);
            flags.layouts.clear();
            if (l == "packed" || l == "both") flags.layouts.push_back(Layout::packed);
            if (l == "padded" || l == "both") flags.layouts.push_back(Layout::padded);
            if (flags.layouts.empty()) throw std::invalid_argument("bad " + arg);
        } else if (arg.rfind("--scenario=", 0) == 0) {
            const std::string s = arg.substr(11);
            flags.steady = s == "steady" || s == "all";
            flags.squeeze = s == "squeeze" || s == "all";
            if (!flags.steady && !flags.squeeze) throw std::invalid_argument("bad " + arg);
        } else {
            throw std::invalid_argument("unknown argument " + arg);
        }
    }
    return flags;
}

}  // namespace

int main(int argc, char** argv) {
    Flags flags;
    try {
        flags = parse(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr,
                     "concurrency_bench: %s\nusage: concurrency_bench [--quick | --full] "
                     "[--threads=1,8,32] [--layout=padded|packed|both] "
                     "[--scenario=steady|squeeze|all]\n",
                     e.what());
        return 2;
    }
    std::printf(
        "concurrency_bench (%s): 64 texts per call, 20-40 calls per thread%s; GPU time is "
        "the sum over batches, not wall time\n",
        flags.quick ? "quick" : "full", flags.quick ? " (quick: the first fifth of them)" : "");
#ifndef VGBENCH_HAVE_BATCHER
    std::printf("(no <vramguard/batcher.hpp>: the batcher mode is not built)\n");
#endif
    for (Layout layout : flags.layouts) {
        if (flags.steady) steady_scenario(flags, layout);
        if (flags.squeeze) squeeze_scenario(flags, layout);
    }
    return 0;
}
