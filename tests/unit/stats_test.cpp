// SPDX-License-Identifier: MIT
// for_each_counter: the one list of a guard's and a registry's counters, which status pages and
// the Prometheus exporter read. Every field once, in order, under a name fit for JSON and
// Prometheus, with a one-line help.
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <regex>
#include <set>
#include <string>
#include <vector>

namespace {

struct Visited {
    std::vector<std::string> names;
    std::vector<std::uint64_t> values;
    std::vector<std::string> helps;
};

template <class Counters>
Visited visit_all(const Counters& counters) {
    Visited visited;
    vramguard::for_each_counter(counters,
                                [&](const char* name, const char* help, std::uint64_t value) {
                                    visited.names.push_back(name);
                                    visited.helps.push_back(help);
                                    visited.values.push_back(value);
                                });
    return visited;
}

// Names a JSON key and a Prometheus metric (after a prefix and "_total") can both carry.
void expect_well_named(const Visited& visited) {
    const std::regex snake("[a-z][a-z0-9]*(_[a-z0-9]+)*");
    std::set<std::string> unique;
    for (std::size_t i = 0; i < visited.names.size(); ++i) {
        const std::string& name = visited.names[i];
        EXPECT_TRUE(std::regex_match(name, snake)) << name;
        EXPECT_TRUE(unique.insert(name).second) << name << " twice";
        EXPECT_EQ(name.find("total"), std::string::npos) << name << ": the exporter adds _total";
        EXPECT_GT(visited.helps[i].size(), 10u) << name;
        EXPECT_EQ(visited.helps[i].find('\n'), std::string::npos) << name;
        EXPECT_EQ(visited.helps[i].find('\\'), std::string::npos) << name;
    }
}

}  // namespace

TEST(CounterEnumeration, VisitsEveryGuardCounterOnceInDeclarationOrder) {
    vramguard::Stats stats;
    stats.calls = 1;
    stats.ooms = 2;
    stats.retries = 3;
    stats.halvings = 4;
    stats.single_item_calls = 5;
    stats.rejections = 6;
    stats.waits = 7;
    stats.grow_backs = 8;
    stats.profile_writes = 9;
    stats.profile_write_failures = 10;
    const Visited visited = visit_all(stats);
    EXPECT_EQ(visited.names,
              (std::vector<std::string>{"calls", "ooms", "retries", "halvings", "single_item_calls",
                                        "rejections", "waits", "grow_backs", "profile_writes",
                                        "profile_write_failures"}));
    EXPECT_EQ(visited.values, (std::vector<std::uint64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
    expect_well_named(visited);
}

TEST(CounterEnumeration, VisitsEveryRegistryCounterOnceInDeclarationOrder) {
    vramguard::RegistryStats stats;
    std::uint64_t next = 1;
    for (std::uint64_t* field :
         {&stats.loads, &stats.load_failures, &stats.evictions, &stats.recoveries_seen,
          &stats.recoveries_trusted, &stats.idle_unloads, &stats.requested_unloads,
          &stats.pressure_cache_releases, &stats.pressure_unloads, &stats.rejections, &stats.waits,
          &stats.peer_requests, &stats.peer_reliefs})
        *field = next++;
    const Visited visited = visit_all(stats);
    EXPECT_EQ(visited.names,
              (std::vector<std::string>{"loads", "load_failures", "evictions", "recoveries_seen",
                                        "recoveries_trusted", "idle_unloads", "requested_unloads",
                                        "pressure_cache_releases", "pressure_unloads", "rejections",
                                        "waits", "peer_requests", "peer_reliefs"}));
    std::vector<std::uint64_t> expected(13);
    for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = i + 1;
    EXPECT_EQ(visited.values, expected);
    expect_well_named(visited);
}

TEST(CounterEnumeration, IsUsableInConstantExpressions) {
    constexpr std::uint64_t sum = [] {
        std::uint64_t total = 0;
        vramguard::Stats s{};
        s.ooms = 40;
        s.waits = 2;
        vramguard::for_each_counter(
            s, [&total](const char*, const char*, std::uint64_t value) { total += value; });
        return total;
    }();
    static_assert(sum == 42, "for_each_counter is constexpr");
    EXPECT_EQ(vramguard::detail::counter_count<vramguard::Stats>(), 10u);
}
