// SPDX-License-Identifier: MIT
// A small deterministic cost model of a GPU encoder, for comparing batch-sizing policies.
//
// Time is simulated (a ManualClock, never the wall clock), memory is a SimulatedDevice, and the
// stream of items comes from a fixed-seed generator, so every run of every policy sees exactly the
// same device, the same items in the same order and the same squeeze, and two runs give the same
// numbers on any machine.
//
// The device: `total_bytes` of memory, `model_bytes` of it taken by the model's weights for the
// whole run. A batch takes one activation tensor (what dominates an encoder's memory) of
//   packed: bytes_per_token x (sum of the items' lengths)          (varlen kernels, TEI)
//   padded: bytes_per_token x (batch size x longest item in it)    (padded batches, most encoders)
// and costs launch_s + per_token_s x (the tokens it computes: the same sum, padding included).
// A batch that does not fit fails the way a real one does: the work done before it ran out
// (launch plus the fraction of the tokens that fitted) is lost, then the cache is flushed
// (flush_s). Like PyTorch's caching allocator, an allocation that fails while blocks are cached
// first frees the cache and tries once more before raising the OOM; that retry is not charged
// (SimulatedDevice does not split cached blocks as PyTorch does, so charging it would mostly
// measure that difference, and would tax the oracle's ever-changing sizes most).
//
// Every policy, the real vramguard Guard and the re-implemented anchors alike, drives the same
// run_batch(); only the choice of batches differs.
#pragma once

#include <vramguard/vramguard.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace vgbench {

constexpr std::uint64_t MiB = 1024ull * 1024;
constexpr std::uint64_t GiB = 1024ull * MiB;

// splitmix64: the same numbers on every platform (std:: distributions are not portable).
struct SplitMix64 {
    std::uint64_t state;
    std::uint64_t next() noexcept {
        std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    // In [lo, hi], inclusive.
    std::uint64_t between(std::uint64_t lo, std::uint64_t hi) noexcept {
        return lo + next() % (hi - lo + 1);
    }
};

enum class Layout { packed, padded };
inline const char* to_string(Layout layout) {
    return layout == Layout::packed ? "packed" : "padded";
}

struct DeviceModel {
    std::uint64_t total_bytes = 16 * GiB;
    std::uint64_t model_bytes = 3 * GiB;
    std::uint64_t bytes_per_token = 1 * MiB;
    double launch_s = 0.005;    // per batch: kernel launches, host-side collation, sync
    double per_token_s = 1e-6;  // per token computed (1 M tokens/s at full width)
    double flush_s = 0.005;     // emptying the cache and allocating afresh
    Layout layout = Layout::packed;
};

struct StreamSpec {
    std::uint64_t seed = 0x5eed;
    std::size_t calls = 600;    // requests; each is one encode call
    std::size_t min_call = 64;  // items per call, uniform in [min_call, max_call]
    std::size_t max_call = 256;
    std::uint32_t short_min = 16;  // a short item's tokens, uniform in [short_min, short_max]
    std::uint32_t short_max = 128;
    unsigned long_percent = 5;  // this share of the items is long_factor x a short length
    std::uint32_t long_factor = 10;
    // The squeeze: another process holds squeeze_fraction of the device during calls
    // [squeeze_begin, squeeze_end), then leaves. squeeze_fraction 0 = a steady stream.
    std::size_t squeeze_begin = 200;
    std::size_t squeeze_end = 400;
    double squeeze_fraction = 0.0;

    std::uint32_t longest_item() const noexcept { return short_max * long_factor; }
};

struct Stream {
    std::vector<std::uint32_t> tokens;    // per item
    std::vector<std::size_t> call_begin;  // call c is items [call_begin[c], call_begin[c + 1])
    std::size_t calls() const noexcept { return call_begin.size() - 1; }
};

inline Stream make_stream(const StreamSpec& spec) {
    Stream stream;
    SplitMix64 rng{spec.seed};
    stream.call_begin.push_back(0);
    for (std::size_t c = 0; c < spec.calls; ++c) {
        const std::size_t n = rng.between(spec.min_call, spec.max_call);
        for (std::size_t i = 0; i < n; ++i) {
            auto length = static_cast<std::uint32_t>(rng.between(spec.short_min, spec.short_max));
            if (rng.between(1, 100) <= spec.long_percent) length *= spec.long_factor;
            stream.tokens.push_back(length);
        }
        stream.call_begin.push_back(stream.tokens.size());
    }
    return stream;
}

// What one policy's run cost, call by call.
struct CallRecord {
    double seconds = 0;       // simulated time the call took
    double kept_seconds = 0;  // time of the batches whose results were returned
    std::uint64_t ooms = 0;
    std::uint64_t batches = 0;
    std::uint64_t items = 0;
};

// One run: the device, the clock, the stream and the books.
class Sim {
   public:
    Sim(const DeviceModel& model, const Stream& stream)
        : device(model.total_bytes), model_(model), stream_(stream) {
        weights_ = device.allocate(model.model_bytes);
    }
    Sim(const Sim&) = delete;
    Sim& operator=(const Sim&) = delete;
    ~Sim() { device.release_cached(); }

    vramguard::ManualClock clock;
    vramguard::SimulatedDevice device;

    const DeviceModel& model() const noexcept { return model_; }
    const Stream& stream() const noexcept { return stream_; }
    std::uint32_t tokens(std::size_t i) const { return stream_.tokens[i]; }

    // Tokens computed by a batch of items [first, last): padding included in the padded layout.
    std::uint64_t computed_tokens(std::size_t first, std::size_t last) const {
        std::uint64_t sum = 0, longest = 0;
        for (std::size_t i = first; i < last; ++i) {
            sum += stream_.tokens[i];
            longest = std::max<std::uint64_t>(longest, stream_.tokens[i]);
        }
        return model_.layout == Layout::packed ? sum : longest * (last - first);
    }
    std::uint64_t batch_bytes(std::size_t first, std::size_t last) const {
        return computed_tokens(first, last) * model_.bytes_per_token;
    }

    // Runs items [first, last) as one batch. On success the time goes to `pending` (see commit);
    // on OOM the lost time is charged and the device's OutOfMemory propagates.
    void run_batch(std::size_t first, std::size_t last) {
        const std::uint64_t tokens = computed_tokens(first, last);
        const std::uint64_t bytes = tokens * model_.bytes_per_token;
        ++current_.batches;
        vramguard::SimulatedDevice::Allocation activations;
        try {
            activations = device.allocate(bytes);
        } catch (const vramguard::OutOfMemory&) {
            // The caching allocator's own retry: free the cached blocks, ask the driver again.
            if (device.cached_bytes() == 0) {
                charge_oom(tokens, bytes);
                throw;
            }
            device.release_cached();
            try {
                activations = device.allocate(bytes);
            } catch (const vramguard::OutOfMemory&) {
                charge_oom(tokens, bytes);
                throw;
            }
        }
        const double seconds = model_.launch_s + model_.per_token_s * static_cast<double>(tokens);
        advance(seconds);
        pending_ += seconds;
    }
    // The batches run since the last commit/discard returned their results (they count as useful).
    void commit() {
        current_.kept_seconds += pending_;
        pending_ = 0;
    }
    // They were thrown away (a restart redoes them): their time is waste.
    void discard() { pending_ = 0; }

    double now_s() const {
        return std::chrono::duration<double>(clock.now().time_since_epoch()).count();
    }
    void advance(double seconds) {
        clock.advance(std::chrono::duration_cast<vramguard::Duration>(
            std::chrono::duration<double>(seconds)));
    }

    // Bracket one call.
    void begin_call(std::size_t items) {
        current_ = CallRecord{};
        current_.items = items;
        pending_ = 0;
        call_start_ = clock.now();
    }
    CallRecord end_call() {
        commit();
        current_.seconds = std::chrono::duration<double>(clock.now() - call_start_).count();
        return current_;
    }

   private:
    void charge_oom(std::uint64_t tokens, std::uint64_t bytes) {
        ++current_.ooms;
        // It ran until the memory that was there ran out.
        const double free_now = static_cast<double>(device.memory().free_bytes);
        const double done = bytes == 0 ? 1.0 : std::min(1.0, free_now / static_cast<double>(bytes));
        advance(model_.launch_s + model_.per_token_s * static_cast<double>(tokens) * done +
                model_.flush_s);
    }

    DeviceModel model_;
    const Stream& stream_;
    vramguard::SimulatedDevice::Allocation weights_;
    CallRecord current_;
    double pending_ = 0;
    vramguard::TimePoint call_start_{};
};

// A batch-sizing policy: processes one call (items [first, last) of the stream) through
// sim.run_batch, every item exactly once, in order.
class Policy {
   public:
    virtual ~Policy() = default;
    virtual void run_call(Sim& sim, std::size_t first, std::size_t last) = 0;
};

// ---- the oracle: knows the largest batch that fits, never runs out of memory
// ---------------------

class OraclePolicy : public Policy {
   public:
    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        std::size_t pos = first;
        while (pos < last) {
            const std::uint64_t free = sim.device.memory().free_bytes;  // cached bytes are reusable
            std::size_t end = pos + 1;
            while (end < last && sim.batch_bytes(pos, end + 1) <= free) ++end;
            sim.run_batch(pos, end);
            sim.commit();
            pos = end;
        }
    }
};

// ---- anchors: small re-implementations of published policies
// -------------------------------------

// What the fixed-size anchors do on an OOM they did not plan for: split the failed chunk in two
// and go on, remembering nothing (their real counterparts would crash or fail the request).
inline void run_splitting(Sim& sim, std::size_t first, std::size_t last) {
    try {
        sim.run_batch(first, last);
        sim.commit();
    } catch (const vramguard::OutOfMemory&) {
        sim.device.release_cached();
        if (last - first == 1) throw;
        const std::size_t mid = first + (last - first) / 2;
        run_splitting(sim, first, mid);
        run_splitting(sim, mid, last);
    }
}

// A fixed item count, safe for a batch made only of the longest possible item on the device as it
// was at start-up.
class FixedCountPolicy : public Policy {
   public:
    explicit FixedCountPolicy(std::size_t batch) : batch_(std::max<std::size_t>(1, batch)) {}
    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        for (std::size_t pos = first; pos < last; pos += std::min(batch_, last - pos))
            run_splitting(sim, pos, pos + std::min(batch_, last - pos));
    }
    std::size_t batch() const noexcept { return batch_; }

   private:
    std::size_t batch_;
};

// text-embeddings-inference's --max-batch-tokens: batches cut where the next item would exceed a
// hand-picked token budget.
class FixedTokenBudgetPolicy : public Policy {
   public:
    explicit FixedTokenBudgetPolicy(std::uint64_t budget) : budget_(budget) {}
    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        std::size_t pos = first;
        while (pos < last) {
            std::size_t end = pos + 1;
            // Tokens as the model computes them: padding included in the padded layout.
            while (end < last && sim.computed_tokens(pos, end + 1) <= budget_) ++end;
            run_splitting(sim, pos, end);
            pos = end;
        }
    }

   private:
    std::uint64_t budget_;
};

// Restart the whole call at a smaller size on OOM. forget = true: start every call at the whole
// input and halve (the classic try/except pattern). forget = false, factor 0.9: accelerate's
// find_executable_batch_size (the size lives in the decorator's closure: it never grows back).
class RestartPolicy : public Policy {
   public:
    RestartPolicy(bool forget, double factor, std::size_t start)
        : forget_(forget), factor_(factor), size_(start) {}
    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        if (forget_) size_ = last - first;
        for (;;) {
            sim.discard();
            try {
                for (std::size_t pos = first; pos < last; pos += std::min(size_, last - pos))
                    sim.run_batch(pos, pos + std::min(size_, last - pos));
                sim.commit();
                return;
            } catch (const vramguard::OutOfMemory&) {
                sim.discard();  // the finished chunks of this attempt are redone
                sim.device.release_cached();
                if (size_ <= 1) throw;
                const auto next = static_cast<std::size_t>(static_cast<double>(size_) * factor_);
                size_ = std::max<std::size_t>(1, std::min(next, size_ - 1));
            }
        }
    }

   private:
    bool forget_;
    double factor_;
    std::size_t size_;
};

// toma's chunked mode: chunks of a size remembered per call site; on OOM the failed chunk is
// retried at half the size (finished chunks kept); it never grows back.
class HalveRememberPolicy : public Policy {
   public:
    explicit HalveRememberPolicy(std::size_t start) : size_(start) {}
    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        std::size_t pos = first;
        while (pos < last) {
            const std::size_t end = pos + std::min(size_, last - pos);
            try {
                sim.run_batch(pos, end);
                sim.commit();
                pos = end;
            } catch (const vramguard::OutOfMemory&) {
                sim.device.release_cached();
                if (end - pos == 1) throw;
                size_ = std::max<std::size_t>(1, (end - pos) / 2);
            }
        }
    }

   private:
    std::size_t size_;
};

// Lightning's BatchSizeFinder, mode "power": at start-up, from init_val = 2, run steps_per_trial
// batches of the first items (the data loader's first batches) and double until an OOM, then
// halve once and keep that size for good. The trials' time is paid by the first call.
class TuneOncePolicy : public Policy {
   public:
    static constexpr std::size_t init_val = 2, steps_per_trial = 3, max_trials = 25;
    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        if (size_ == 0) tune(sim);
        for (std::size_t pos = first; pos < last; pos += std::min(size_, last - pos))
            run_splitting(sim, pos, pos + std::min(size_, last - pos));
    }
    std::size_t size() const noexcept { return size_; }

   private:
    void tune(Sim& sim) {
        const std::size_t n = sim.stream().tokens.size();
        std::size_t size = init_val;
        for (std::size_t trial = 0; trial < max_trials; ++trial) {
            try {
                for (std::size_t step = 0; step < steps_per_trial; ++step) {
                    const std::size_t begin = std::min(step * size, n - std::min(n, size));
                    sim.run_batch(begin, std::min(n, begin + size));
                }
                sim.discard();
                if (size * 2 > n) break;
                size *= 2;
            } catch (const vramguard::OutOfMemory&) {
                sim.discard();
                sim.device.release_cached();
                size = std::max<std::size_t>(1, size / 2);
                break;
            }
        }
        size_ = size;
    }
    std::size_t size_ = 0;
};

// ---- vramguard: the real Guard::encode with its real policy
// --------------------------------------

class VramguardPolicy : public Policy {
   public:
    VramguardPolicy(Sim& sim, bool weighted)
        : weighted_(weighted),
          key_(vramguard::Key::of("bench-encoder")),
          guard_(sim.device, options_for(sim)) {}

    void run_call(Sim& sim, std::size_t first, std::size_t last) override {
        const Items items{sim.stream().tokens.begin() + static_cast<std::ptrdiff_t>(first),
                          sim.stream().tokens.begin() + static_cast<std::ptrdiff_t>(last)};
        auto batch = [&sim, first](const auto& view) {
            sim.run_batch(first + view.offset(), first + view.offset() + view.size());
            sim.commit();
        };
        auto tokens_of = [](std::uint32_t tokens) { return std::uint64_t{tokens}; };
        // Padded batches cost size x longest item: say so, and the budget counts padded tokens.
        if (weighted_ && sim.model().layout == Layout::padded)
            guard_.encode(key_, items, batch, vramguard::padded(tokens_of));
        else if (weighted_)
            guard_.encode(key_, items, batch, tokens_of);
        else
            guard_.encode(key_, items, batch);
    }
    vramguard::Guard<vramguard::SimulatedDevice>& guard() noexcept { return guard_; }
    const vramguard::Key& key() const noexcept { return key_; }

   private:
    using Iterator = std::vector<std::uint32_t>::const_iterator;
    struct Items {
        Iterator first, last;
        Iterator begin() const { return first; }
        Iterator end() const { return last; }
    };
    static vramguard::Options options_for(Sim& sim) {
        vramguard::Options options;
        options.persist = false;
        options.log = [](vramguard::Level, std::string_view) {};
        options.clock = sim.clock.clock_fn();
        options.sleep = sim.clock.sleep_fn();
        return options;
    }

    bool weighted_;
    vramguard::Key key_;
    vramguard::Guard<vramguard::SimulatedDevice> guard_;
};

// ---- running a policy over a stream
// --------------------------------------------------------------

struct RunResult {
    std::vector<CallRecord> calls;
    std::string note;  // e.g. the size a tuner picked
};

using PolicyFactory = std::function<std::unique_ptr<Policy>(Sim&)>;

inline RunResult run_policy(const DeviceModel& model, const StreamSpec& spec, const Stream& stream,
                            const PolicyFactory& make, std::string* note = nullptr) {
    Sim sim(model, stream);
    std::unique_ptr<Policy> policy = make(sim);
    RunResult result;
    result.calls.reserve(stream.calls());
    const auto squeeze_bytes =
        static_cast<std::uint64_t>(spec.squeeze_fraction * static_cast<double>(model.total_bytes));
    for (std::size_t c = 0; c < stream.calls(); ++c) {
        if (squeeze_bytes > 0 && c == spec.squeeze_begin) {
            // The other process can only take memory the driver has free: it gets its share while
            // this one's cache is empty (between requests, say), then holds it.
            sim.device.release_cached();
            sim.device.set_external_usage(squeeze_bytes);
        }
        if (squeeze_bytes > 0 && c == spec.squeeze_end) sim.device.set_external_usage(0);
        const std::size_t first = stream.call_begin[c], last = stream.call_begin[c + 1];
        sim.begin_call(last - first);
        policy->run_call(sim, first, last);
        result.calls.push_back(sim.end_call());
    }
    if (note) {
        if (auto* tuner = dynamic_cast<TuneOncePolicy*>(policy.get()))
            *note = "tuned batch " + std::to_string(tuner->size());
        else if (auto* fixed = dynamic_cast<FixedCountPolicy*>(policy.get()))
            *note = "batch " + std::to_string(fixed->batch());
    }
    return result;
}

// Totals over calls [first, last).
struct PhaseTotals {
    double seconds = 0, kept_seconds = 0;
    std::uint64_t ooms = 0, batches = 0, items = 0;

    double items_per_s() const { return seconds > 0 ? static_cast<double>(items) / seconds : 0; }
    double ooms_per_1000() const {
        return items ? 1000.0 * static_cast<double>(ooms) / static_cast<double>(items) : 0;
    }
    double wasted_fraction() const {
        return seconds > 0 ? std::max(0.0, 1.0 - kept_seconds / seconds) : 0;
    }
};

inline PhaseTotals totals(const RunResult& run, std::size_t first, std::size_t last) {
    PhaseTotals t;
    for (std::size_t c = first; c < last && c < run.calls.size(); ++c) {
        const CallRecord& r = run.calls[c];
        t.seconds += r.seconds;
        t.kept_seconds += r.kept_seconds;
        t.ooms += r.ooms;
        t.batches += r.batches;
        t.items += r.items;
    }
    return t;
}

// ---- the policies, by name
// -----------------------------------------------------------------------

// Free bytes for activations when the process starts (no squeeze yet).
inline std::uint64_t free_at_start(const DeviceModel& model) {
    return model.total_bytes - model.model_bytes;
}

struct NamedPolicy {
    std::string name;
    bool weighted;  // uses item lengths (compared with weighted policies) or counts only
    PolicyFactory make;
};

inline std::vector<NamedPolicy> all_policies(const DeviceModel& model, const StreamSpec& spec) {
    const std::uint64_t free_tokens = free_at_start(model) / model.bytes_per_token;
    const std::size_t conservative = static_cast<std::size_t>(free_tokens / spec.longest_item());
    const std::uint64_t token_budget =
        free_tokens * 9 / 10;  // a careful operator's pick: 90 % of what fits
    const std::size_t largest_call = spec.max_call;
    return {
        {"oracle", true, [](Sim&) { return std::make_unique<OraclePolicy>(); }},
        {"fixed-conservative", false,
         [conservative](Sim&) { return std::make_unique<FixedCountPolicy>(conservative); }},
        {"halve-restart-forget", false,
         [](Sim&) { return std::make_unique<RestartPolicy>(true, 0.5, 0); }},
        {"shrink-0.9-remember", false,
         [largest_call](Sim&) {
             return std::make_unique<RestartPolicy>(false, 0.9, largest_call);
         }},
        {"halve-remember-callsite", false,
         [largest_call](Sim&) { return std::make_unique<HalveRememberPolicy>(largest_call); }},
        {"tune-once", false, [](Sim&) { return std::make_unique<TuneOncePolicy>(); }},
        {"fixed-token-budget", true,
         [token_budget](Sim&) { return std::make_unique<FixedTokenBudgetPolicy>(token_budget); }},
        {"vramguard", false,
         [](Sim& sim) { return std::make_unique<VramguardPolicy>(sim, false); }},
        {"vramguard-weighted", true,
         [](Sim& sim) { return std::make_unique<VramguardPolicy>(sim, true); }},
    };
}

}  // namespace vgbench
