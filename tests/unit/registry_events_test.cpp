// SPDX-License-Identifier: MIT
// registry_events.hpp: every registry event's level, counter and sentence, table by table.
#include <vramguard/registry_events.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

using namespace vramguard;
using namespace vramguard::literals;
using Kind = RegistryEventKind;

namespace {

// The counter an event bumps, read back through the one counter enumeration.
std::string counter_bumped(const RegistryEvent& event) {
    detail::AtomicRegistryStats stats;
    detail::count(stats, event);
    std::string bumped;
    for_each_counter(stats.snapshot(), [&](const char* name, const char*, std::uint64_t value) {
        if (value != 0)
            bumped += std::string(bumped.empty() ? "" : ",") + name + "=" + std::to_string(value);
    });
    return bumped;
}

TEST(RegistryEvents, EachKindHasItsLevelItsCounterAndASentenceWhenLogged) {
    struct Row {
        Kind kind;
        Level level;
        const char* counter;  // "" = counted nowhere
        const char* says;     // "" = only counted, never formatted
    };
    const std::vector<Row> rows = {
        {Kind::loaded, Level::info, "loads=1", "loaded model 'm' (2.00 GiB) in 1500 ms"},
        {Kind::load_failed, Level::debug, "load_failures=1", ""},
        {Kind::load_waits, Level::info, "waits=1", "waits up to 7000 ms"},
        {Kind::rejected, Level::debug, "rejections=1", ""},
        {Kind::evicted, Level::info, "evictions=1", "to make room for 'other'"},
        {Kind::recovery_seen, Level::info, "recoveries_seen=1", "reported after 1500 ms"},
        {Kind::recovery_trusted, Level::warn, "recoveries_trusted=1", "trusting the estimate"},
        {Kind::idle_unloaded, Level::info, "idle_unloads=1", "(idle_timeout 7000 ms)"},
        {Kind::requested_unloaded, Level::info, "requested_unloads=1", "on request, idle 12.5 s"},
        {Kind::pressure_cache_released, Level::info, "pressure_cache_releases=1",
         "released the allocator cache"},
        {Kind::pressure_unloaded, Level::warn, "pressure_unloads=1", "unloaded idle model 'm'"},
        {Kind::peers_asked, Level::info, "peer_requests=3", "peers: ollama: freed"},
        {Kind::peer_relief, Level::debug, "peer_reliefs=1", ""},
        {Kind::still_referenced, Level::warn, "", "still holds a copy"},
        {Kind::housekeeping_failed, Level::warn, "", "ollama: freed"},
        {Kind::peer_calls_left, Level::warn, "", "3 peer call(s) still running"},
    };
    for (const Row& row : rows) {
        RegistryEvent event(row.kind, "m");
        event.for_model = "other";
        event.bytes = 2_GiB;
        event.idle_seconds = 12.5;
        event.took = std::chrono::milliseconds(1500);
        event.limit = std::chrono::milliseconds(7000);
        event.count = 3;
        event.text = "ollama: freed";
        const int kind = static_cast<int>(row.kind);
        EXPECT_EQ(level_of(row.kind), row.level) << kind;
        EXPECT_EQ(counter_bumped(event), row.counter) << kind;
        const std::string sentence = format_registry_event(event);
        if (*row.says == '\0') {
            EXPECT_TRUE(sentence.empty()) << kind << ": " << sentence;
        } else {
            EXPECT_NE(sentence.find(row.says), std::string::npos) << kind << ": " << sentence;
            EXPECT_EQ(sentence.find('\n'), std::string::npos) << kind << ": one line";
        }
    }
}

TEST(RegistryEvents, NothingIsFormattedOrSentBelowTheLevelButEverythingIsCounted) {
    detail::AtomicRegistryStats stats;
    int sent = 0;
    const LogSink sink = [&sent](Level, std::string_view) { ++sent; };
    detail::publish(stats, sink, Level::warn, RegistryEvent(Kind::loaded, "m"));
    detail::publish(stats, sink, Level::warn, RegistryEvent(Kind::still_referenced, "m"));
    detail::publish(stats, sink, Level::debug, RegistryEvent(Kind::rejected, "m"));  // no text
    EXPECT_EQ(sent, 1);
    EXPECT_EQ(stats.snapshot().loads, 1u);
    EXPECT_EQ(stats.snapshot().rejections, 1u);
}

}  // namespace
