// SPDX-License-Identifier: MIT
// vramguard::PrometheusExporter (prometheus.hpp) on a simulated device: two registries, one the
// other's peer, a guard that encodes. The text a scrape gets carries every counter of
// for_each_counter() with the guard's and the registry's values, follows Prometheus' naming rules
// (checked here, and by `promtool check metrics` where promtool is installed), and counters keep
// the totals across updates instead of adding them up twice.
#include <vramguard/prometheus.hpp>
#include <vramguard/vramguard.hpp>

#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "guard_fixture.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;
using vramguard_test::CapturedLog;
using vramguard_test::test_options;

namespace {

struct Weights {
    SimulatedDevice::Allocation allocation;
};

// Another registry as a peer, in-process: what a vramguard server's /request-unload does.
class RegistryPeer : public Peer {
   public:
    RegistryPeer(std::string name, ModelRegistry<SimulatedDevice>& registry)
        : name_(std::move(name)), registry_(registry) {}
    std::string name() const override { return name_; }
    PeerReply relieve(const ReliefRequest& request) override {
        return relief::reply_from(registry_.request_unload(0s, request.shortfall));
    }

   private:
    std::string name_;
    ModelRegistry<SimulatedDevice>& registry_;
};

struct Scrape {
    std::map<std::string, std::string> types;  // family -> counter / gauge
    std::map<std::string, std::string> helps;  // family -> help
    std::map<std::string, double> values;      // name{labels as written} -> value
};

Scrape parse(const std::string& text) {
    Scrape scrape;
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
        if (line.empty()) continue;
        std::istringstream words(line);
        std::string hash, kind, name, rest;
        if (line.rfind("# TYPE ", 0) == 0) {
            words >> hash >> kind >> name >> rest;
            scrape.types[name] = rest;
        } else if (line.rfind("# HELP ", 0) == 0) {
            words >> hash >> kind >> name >> std::ws;
            std::getline(words, rest);
            scrape.helps[name] = rest;
        } else {
            const std::size_t space = line.rfind(' ');
            scrape.values[line.substr(0, space)] = std::stod(line.substr(space + 1));
        }
    }
    return scrape;
}

class PrometheusExporterTest : public ::testing::Test {
   protected:
    SimulatedDevice device{10_GiB};
    ManualClock clock;
    CapturedLog log;
    Guard<SimulatedDevice> guard_a{device, test_options(clock, log)};
    Guard<SimulatedDevice> guard_b{device, test_options(clock, log)};
    std::unique_ptr<ModelRegistry<SimulatedDevice>> b, a;  // a is declared last: destroyed first
    ::prometheus::Registry metrics;
    const ::prometheus::Labels labels{{"device", "sim0"}, {"service", "a"}};

    void SetUp() override {
        b = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_b);
        RegistryOptions options;
        options.peers = {std::make_shared<RegistryPeer>("reranker@:8081", *b)};
        a = std::make_unique<ModelRegistry<SimulatedDevice>>(guard_a, options);
    }
    std::shared_ptr<ModelSlot<Weights>> add(ModelRegistry<SimulatedDevice>& registry,
                                            const std::string& name, std::uint64_t bytes) {
        return registry.add<Weights>(
            name, Key::of(name),
            [this, bytes] { return std::make_shared<Weights>(Weights{device.allocate(bytes)}); },
            bytes);
    }
    std::string scrape_text(PrometheusExporter& exporter) {
        exporter.update();
        return ::prometheus::TextSerializer().Serialize(metrics.Collect());
    }
    // name{device="sim0",service="a"[,extra]}: prometheus-cpp writes labels sorted by name.
    static std::string series(const std::string& name, const std::string& before = "",
                              const std::string& after = "") {
        return name + "{" + before + "device=\"sim0\"," + after + "service=\"a\"}";
    }
};

}  // namespace

TEST_F(PrometheusExporterTest, EveryCounterOfTheEnumerationWithTheLiveValues) {
    auto reranker = add(*b, "reranker", 6_GiB);
    reranker->acquire().release();
    auto embedder = add(*a, "embedder", 4_GiB);  // 4 GiB free, 5 GiB needed: the peer frees
    Lease<Weights> lease = embedder->acquire();
    const Key key = Key::of("encoder");
    const std::vector<int> items(8, 1);
    guard_a.encode(key, items, [](const auto& batch) { return std::vector<int>(batch.size(), 2); });

    PrometheusExporter exporter(metrics);
    exporter.add_guard(guard_a, labels);
    exporter.add_key(guard_a, key, labels);
    exporter.add_registry(*a, labels);
    const Scrape scrape = parse(scrape_text(exporter));

    for_each_counter(guard_a.stats(), [&](const char* name, const char* help, std::uint64_t value) {
        const std::string family = std::string("vramguard_guard_") + name + "_total";
        EXPECT_EQ(scrape.types.at(family), "counter");
        EXPECT_EQ(scrape.helps.at(family), help);
        EXPECT_EQ(scrape.values.at(series(family)), static_cast<double>(value)) << family;
    });
    for_each_counter(a->stats(), [&](const char* name, const char*, std::uint64_t value) {
        const std::string family = std::string("vramguard_registry_") + name + "_total";
        EXPECT_EQ(scrape.types.at(family), "counter");
        EXPECT_EQ(scrape.values.at(series(family)), static_cast<double>(value)) << family;
    });
    EXPECT_EQ(scrape.values.at(series("vramguard_guard_calls_total")), 2.0);  // a load, an encode
    EXPECT_EQ(scrape.values.at(series("vramguard_registry_peer_reliefs_total")), 1.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_device_total_bytes")), 10.0 * (1 << 30));
    EXPECT_EQ(scrape.types.at("vramguard_device_free_bytes"), "gauge");
    EXPECT_EQ(scrape.values.at(series("vramguard_registry_loaded_models")), 1.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_model_loaded", "", "model=\"embedder\",")), 1.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_model_bytes", "", "model=\"embedder\",")),
              4.0 * (1 << 30));
    EXPECT_EQ(scrape.values.at(series("vramguard_model_leases", "", "model=\"embedder\",")), 1.0);
    EXPECT_EQ(
        scrape.values.at(series("vramguard_peer_asked_total", "", "peer=\"reranker@:8081\",")),
        1.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_peer_last_answer", "answer=\"freed\",",
                                      "peer=\"reranker@:8081\",")),
              1.0);
    EXPECT_EQ(scrape.values.at(
                  series("vramguard_learned_batch_ceiling", "", "key=\"" + key.hex() + "\",")),
              static_cast<double>(guard_a.learned_batch_ceiling(key)));
}

TEST_F(PrometheusExporterTest, CountersFollowTheTotalsAcrossUpdatesAndNewModelsAppear) {
    PrometheusExporter exporter(metrics);
    exporter.add_guard(guard_a, labels);
    exporter.add_registry(*a, labels);
    Scrape scrape = parse(scrape_text(exporter));
    EXPECT_EQ(scrape.values.at(series("vramguard_guard_calls_total")), 0.0);
    EXPECT_EQ(scrape.values.count(series("vramguard_model_loaded", "", "model=\"late\",")), 0u);

    auto late = add(*a, "late", 1_GiB);
    late->acquire().release();
    scrape = parse(scrape_text(exporter));
    scrape = parse(scrape_text(exporter));  // a second update adds nothing
    EXPECT_EQ(scrape.values.at(series("vramguard_guard_calls_total")), 1.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_registry_loads_total")), 1.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_model_loaded", "", "model=\"late\",")), 1.0);
    a->request_unload("late");
    scrape = parse(scrape_text(exporter));
    EXPECT_EQ(scrape.values.at(series("vramguard_model_loaded", "", "model=\"late\",")), 0.0);
    EXPECT_EQ(scrape.values.at(series("vramguard_registry_requested_unloads_total")), 1.0);
}

TEST_F(PrometheusExporterTest, ASeriesFedTwiceIsRefused) {
    PrometheusExporter exporter(metrics);
    exporter.add_guard(guard_a, labels);
    EXPECT_THROW(exporter.add_guard(guard_b, labels), std::invalid_argument)
        << "two guards under the same labels would add their counts into one series";
    exporter.add_guard(guard_b, {{"device", "sim0"}, {"service", "b"}});
}

TEST_F(PrometheusExporterTest, NamesFollowPrometheusRulesAndPromtoolWherePresent) {
    auto reranker = add(*b, "reranker", 6_GiB);
    reranker->acquire().release();
    auto embedder = add(*a, "embedder", 4_GiB);
    embedder->acquire().release();
    PrometheusExporter exporter(metrics);
    exporter.add_guard(guard_a, labels);
    exporter.add_key(guard_a, Key::of("encoder"), labels);
    exporter.add_registry(*a, labels);
    const std::string text = scrape_text(exporter);
    const Scrape scrape = parse(text);

    // https://prometheus.io/docs/practices/naming/: snake_case with the library's prefix; a
    // counter ends in _total and nothing else does; units are base units (bytes, seconds).
    const std::regex name("vramguard_[a-z0-9]+(_[a-z0-9]+)*");
    ASSERT_GT(scrape.types.size(), 25u);
    for (const auto& [family, type] : scrape.types) {
        EXPECT_TRUE(std::regex_match(family, name)) << family;
        const bool total = family.size() > 6 && family.compare(family.size() - 6, 6, "_total") == 0;
        EXPECT_EQ(total, type == "counter") << family << " is a " << type;
        EXPECT_FALSE(scrape.helps.at(family).empty()) << family;
        for (const char* unit : {"_ms", "_milliseconds", "_mib", "_gib", "_kb", "_minutes"})
            EXPECT_EQ(family.find(unit), std::string::npos) << family;
    }

#ifdef VRAMGUARD_PROMTOOL
    const std::string path =
        ::testing::TempDir() + "vramguard_metrics_" + std::to_string(::getpid()) + ".txt";
    std::ofstream(path) << text;
    const std::string command =
        std::string(VRAMGUARD_PROMTOOL) + " check metrics < " + path + " 2>&1";
    FILE* pipe = ::popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    std::string output;
    char buffer[512];
    while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) output += buffer;
    const int status = ::pclose(pipe);
    std::remove(path.c_str());
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << output << "\n" << text;
    EXPECT_EQ(output, "") << text;
#else
    GTEST_SKIP() << "promtool not found at configure time: the naming rules were checked here only";
#endif
}

TEST_F(PrometheusExporterTest, ScrapesWhileThreadsWorkEndWithTheFinalTotals) {
    PrometheusExporter exporter(metrics);
    exporter.add_guard(guard_a, labels);
    exporter.add_registry(*a, labels);
    auto model = add(*a, "model", 1_GiB);
    const std::vector<int> items(16, 1);
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < 50; ++i) {
                if (t == 0) {
                    model->acquire().release();
                } else {
                    guard_a.encode(Key::of("encoder"), items, [](const auto& batch) {
                        return std::vector<int>(batch.size());
                    });
                }
            }
        });
    threads.emplace_back([&] {
        for (int i = 0; i < 50; ++i) scrape_text(exporter);
    });
    for (std::thread& thread : threads) thread.join();
    const Scrape scrape = parse(scrape_text(exporter));
    EXPECT_EQ(scrape.values.at(series("vramguard_guard_calls_total")),
              static_cast<double>(guard_a.stats().calls));
    EXPECT_EQ(guard_a.stats().calls, 101u) << "one load and 100 encodes";
    EXPECT_EQ(scrape.values.at(series("vramguard_registry_loads_total")), 1.0);
}
