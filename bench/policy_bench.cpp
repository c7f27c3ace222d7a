// SPDX-License-Identifier: MIT
// Adaptive throughput: every batch-sizing policy on the same simulated GPU and the same skewed
// stream (cost_model.hpp), in simulated time. The numbers are deterministic: Google Benchmark's
// own timings here only say how long the simulation took; what matters are the counters.
//
// Scenarios: steady (the skewed stream alone) and squeeze (another process takes 40 % of the device
// during calls [200, 400), then leaves), each with packed (varlen) and padded activations.
// Counters, per policy: items_per_sim_s, ratio_to_oracle (steady: whole run; squeeze: the squeeze
// window), ratio_after (squeeze: the calls after it left), ratio_overall, ooms_per_1000,
// wasted_fraction (time not spent on batches whose results were returned).
//
// --series=PATH (or VRAMGUARD_BENCH_SERIES=PATH) writes throughput per window of the stream per
// policy as JSON, for bench/plot.py.

#include "cost_model.hpp"

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

using namespace vgbench;

constexpr std::size_t window_calls = 20;

struct Scenario {
    std::string name;  // "steady/packed"
    DeviceModel model;
    StreamSpec spec;
    bool squeeze = false;
};

std::vector<Scenario> scenarios() {
    std::vector<Scenario> list;
    for (Layout layout : {Layout::packed, Layout::padded}) {
        for (bool squeeze : {false, true}) {
            Scenario s;
            s.model.layout = layout;
            s.squeeze = squeeze;
            s.spec.squeeze_fraction = squeeze ? 0.4 : 0.0;
            s.name = std::string(squeeze ? "squeeze/" : "steady/") + to_string(layout);
            list.push_back(s);
        }
    }
    return list;
}

struct Outcome {
    RunResult run;
    std::string note;
};

// Results by scenario then policy, filled as the benchmarks run (the oracle first, on demand).
std::mutex results_mutex;
std::map<std::string, std::map<std::string, Outcome>> results;
std::map<std::string, Stream> streams;

const Stream& stream_for(const Scenario& s) {
    auto it = streams.find(s.name);
    if (it == streams.end()) it = streams.emplace(s.name, make_stream(s.spec)).first;
    return it->second;
}

const Outcome& outcome(const Scenario& s, const NamedPolicy& policy) {
    std::lock_guard<std::mutex> lock(results_mutex);
    auto& by_policy = results[s.name];
    auto it = by_policy.find(policy.name);
    if (it == by_policy.end()) {
        Outcome o;
        o.run = run_policy(s.model, s.spec, stream_for(s), policy.make, &o.note);
        it = by_policy.emplace(policy.name, std::move(o)).first;
    }
    return it->second;
}

struct Phases {
    PhaseTotals main, after, overall;
};

Phases phases(const Scenario& s, const RunResult& run) {
    const std::size_t n = run.calls.size();
    Phases p;
    p.overall = totals(run, 0, n);
    if (s.squeeze) {
        p.main = totals(run, s.spec.squeeze_begin, s.spec.squeeze_end);
        p.after = totals(run, s.spec.squeeze_end, n);
    } else {
        p.main = p.overall;
        p.after = p.overall;
    }
    return p;
}

void run_benchmark(benchmark::State& state, const Scenario& s, const NamedPolicy& policy,
                   const NamedPolicy& oracle) {
    const Outcome* mine = nullptr;
    for (auto _ : state) {
        mine = &outcome(s, policy);
        benchmark::DoNotOptimize(mine);
    }
    const Phases p = phases(s, mine->run);
    const Phases o = phases(s, outcome(s, oracle).run);
    state.counters["items_per_sim_s"] = p.main.items_per_s();
    state.counters["ratio_to_oracle"] = p.main.items_per_s() / o.main.items_per_s();
    if (s.squeeze) {
        state.counters["ratio_after"] = p.after.items_per_s() / o.after.items_per_s();
        state.counters["ratio_overall"] = p.overall.items_per_s() / o.overall.items_per_s();
    }
    state.counters["ooms_per_1000"] = p.main.ooms_per_1000();
    state.counters["wasted_fraction"] = p.main.wasted_fraction();
    state.counters["items_per_batch"] =
        p.main.batches ? static_cast<double>(p.main.items) / static_cast<double>(p.main.batches)
                       : 0;
    if (!mine->note.empty()) state.SetLabel(mine->note);
}

std::string json_escape(const std::string& text) {
    std::string out;
    for (char c : text) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out;
}

void write_series(const std::string& path, const std::vector<Scenario>& list) {
    std::ofstream out(path);
    if (!out) {
        std::fprintf(stderr, "policy_bench: cannot write %s\n", path.c_str());
        return;
    }
    std::lock_guard<std::mutex> lock(results_mutex);
    out << "{\n  \"window_calls\": " << window_calls << ",\n  \"scenarios\": {";
    bool first_scenario = true;
    for (const Scenario& s : list) {
        auto found = results.find(s.name);
        if (found == results.end()) continue;
        const Stream& stream = streams.at(s.name);
        out << (first_scenario ? "\n" : ",\n") << "    \"" << s.name << "\": {\n";
        first_scenario = false;
        if (s.squeeze)
            out << "      \"squeeze_calls\": [" << s.spec.squeeze_begin << ", "
                << s.spec.squeeze_end << "],\n";
        out << "      \"window_first_call\": [";
        for (std::size_t c = 0; c < stream.calls(); c += window_calls) out << (c ? ", " : "") << c;
        out << "],\n      \"window_first_item\": [";
        for (std::size_t c = 0; c < stream.calls(); c += window_calls)
            out << (c ? ", " : "") << stream.call_begin[c];
        out << "],\n      \"items_per_sim_s\": {";
        bool first_policy = true;
        for (const auto& [name, o] : found->second) {
            out << (first_policy ? "\n" : ",\n") << "        \"" << json_escape(name) << "\": [";
            first_policy = false;
            for (std::size_t c = 0; c < o.run.calls.size(); c += window_calls) {
                char number[32];
                std::snprintf(number, sizeof number, "%.1f",
                              totals(o.run, c, c + window_calls).items_per_s());
                out << (c ? ", " : "") << number;
            }
            out << "]";
        }
        out << "\n      }\n    }";
    }
    out << "\n  }\n}\n";
}

void print_summary(const std::vector<Scenario>& list, const std::vector<NamedPolicy>& policies) {
    std::lock_guard<std::mutex> lock(results_mutex);
    for (const Scenario& s : list) {
        auto found = results.find(s.name);
        if (found == results.end() || !found->second.count("oracle")) continue;
        const Phases o = phases(s, found->second.at("oracle").run);
        std::fprintf(stderr, "\n%s: throughput as a ratio to the oracle (%.0f items/sim s%s)\n",
                     s.name.c_str(), o.main.items_per_s(), s.squeeze ? " in the squeeze" : "");
        if (s.squeeze)
            std::fprintf(stderr, "| %-24s | %8s | %8s | %8s | %9s | %7s |\n", "policy", "squeeze",
                         "after", "overall", "OOM/1000", "wasted");
        else
            std::fprintf(stderr, "| %-24s | %8s | %9s | %7s |\n", "policy", "ratio", "OOM/1000",
                         "wasted");
        for (const NamedPolicy& policy : policies) {
            auto it = found->second.find(policy.name);
            if (it == found->second.end()) continue;
            const Phases p = phases(s, it->second.run);
            if (s.squeeze)
                std::fprintf(stderr, "| %-24s | %8.3f | %8.3f | %8.3f | %9.2f | %6.1f%% |\n",
                             policy.name.c_str(), p.main.items_per_s() / o.main.items_per_s(),
                             p.after.items_per_s() / o.after.items_per_s(),
                             p.overall.items_per_s() / o.overall.items_per_s(),
                             p.main.ooms_per_1000(), 100 * p.main.wasted_fraction());
            else
                std::fprintf(stderr, "| %-24s | %8.3f | %9.2f | %6.1f%% |\n", policy.name.c_str(),
                             p.main.items_per_s() / o.main.items_per_s(), p.main.ooms_per_1000(),
                             100 * p.main.wasted_fraction());
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    std::string series_path;
    if (const char* env = std::getenv("VRAMGUARD_BENCH_SERIES")) series_path = env;
    std::vector<char*> args;
    for (int i = 0; i < argc; ++i) {
        if (std::strncmp(argv[i], "--series=", 9) == 0)
            series_path = argv[i] + 9;
        else
            args.push_back(argv[i]);
    }
    int count = static_cast<int>(args.size());

    static const std::vector<Scenario> list = scenarios();
    static std::vector<std::vector<NamedPolicy>> policies;
    for (const Scenario& s : list) policies.push_back(all_policies(s.model, s.spec));
    for (std::size_t i = 0; i < list.size(); ++i) {
        const Scenario& s = list[i];
        const NamedPolicy& oracle = policies[i].front();
        for (const NamedPolicy& policy : policies[i]) {
            benchmark::RegisterBenchmark(("policy/" + s.name + "/" + policy.name).c_str(),
                                         [&s, &policy, &oracle](benchmark::State& state) {
                                             run_benchmark(state, s, policy, oracle);
                                         })
                ->Iterations(1)
                ->Unit(benchmark::kMillisecond);
        }
    }

    benchmark::Initialize(&count, args.data());
    if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();

    print_summary(list, policies.front());
    if (!series_path.empty()) write_series(series_path, list);
    return 0;
}
