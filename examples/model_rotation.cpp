// SPDX-License-Identifier: MIT
// Three models taking turns on a device too small for all three.
//
// A simulated 10 GiB GPU (1 GiB kept free as the safety margin) serves an embedder (4 GiB), a
// reranker (3 GiB) and a generator (4 GiB): any two fit, all three do not. Requests arrive for one
// model after another; the registry loads each on demand, evicts the least recently used idle one
// when the next does not fit, never touches a model in use, and unloads what stays idle. The
// device reports memory changes 100 ms late, as drivers report freed memory late, so each
// eviction shows the recovery wait. Real time, short timeouts: it finishes in about two seconds.
#include <vramguard/vramguard.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

using namespace vramguard;
using namespace vramguard::literals;
using namespace std::chrono_literals;

namespace {

const auto program_start = std::chrono::steady_clock::now();

double elapsed_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - program_start).count();
}

// A model is its weights on the device; loading it takes a moment.
struct Model {
    std::string name;
    SimulatedDevice::Allocation weights;
};

void print_status(const RegistryStatus& status) {
    std::printf("  %-10s %-9s %10s %8s %6s\n", "model", "state", "bytes", "idle", "leases");
    for (const ModelStatus& model : status.models)
        std::printf("  %-10s %-9s %10s %7.1fs %6d\n", model.name.c_str(), to_string(model.state),
                    model.loaded ? format_bytes(model.bytes).c_str() : "-", model.idle_seconds,
                    model.leases);
    std::printf(
        "  device: %s free of %s; %zu of %zu models loaded; %llu loads, %llu evictions, "
        "%llu idle unloads\n",
        format_bytes(status.memory.free_bytes).c_str(),
        format_bytes(status.memory.total_bytes).c_str(), status.loaded_models,
        status.max_loaded_models, static_cast<unsigned long long>(status.stats.loads),
        static_cast<unsigned long long>(status.stats.evictions),
        static_cast<unsigned long long>(status.stats.idle_unloads));
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    SimulatedDevice device(10_GiB);
    device.set_report_lag(100ms, system_clock());

    Options options;
    options.persist = false;        // a demo leaves no profile files behind
    options.poll_interval = 25ms;   // short, to keep the demo quick (default 250 ms)
    options.recovery_timeout = 1s;  // default 5 s
    options.log = [](Level level, std::string_view message) {
        std::printf("[%6.3f s] %-5s %.*s\n", elapsed_seconds(), to_string(level),
                    static_cast<int>(message.size()), message.data());
    };
    Guard<SimulatedDevice> guard(device, options);

    RegistryOptions lifecycle;
    lifecycle.idle_timeout = 400ms;    // default 5 min
    lifecycle.reaper = true;           // a library thread calls tick() ...
    lifecycle.reaper_interval = 50ms;  // ... this often (default 1 s)
    ModelRegistry<SimulatedDevice> registry(guard, lifecycle);

    auto add = [&](const std::string& name, std::uint64_t bytes) {
        return registry.add<Model>(
            name, Key::of(name, {{"dtype", "fp16"}}),
            [&device, name, bytes] {
                auto model = std::make_unique<Model>(Model{name, device.allocate(bytes)});
                std::this_thread::sleep_for(150ms);  // copying the weights in from disk
                return model;
            },
            bytes);
    };
    auto embedder = add("embedder", 4_GiB);
    auto reranker = add("reranker", 3_GiB);
    auto generator = add("generator", 4_GiB);

    auto serve = [](ModelSlot<Model>& slot) {
        std::printf("[%6.3f s] request for %s\n", elapsed_seconds(), slot.name().c_str());
        Lease<Model> model = slot.acquire();  // loads (and evicts) when needed
        std::this_thread::sleep_for(10ms);    // inference
    };

    std::printf("-- taking turns: each request evicts the least recently used idle model\n");
    serve(*embedder);
    serve(*reranker);
    serve(*generator);  // embedder is least recently used: it goes
    serve(*embedder);   // now reranker goes
    serve(*generator);  // loaded already: no load, no eviction

    std::printf("-- a model in use is never evicted, even when least recently used\n");
    {
        Lease<Model> busy = generator->acquire();
        std::this_thread::sleep_for(10ms);
        serve(*embedder);  // keeps embedder fresher than generator
        serve(*reranker);  // generator is least recently used, but busy: embedder goes
        std::printf(
            "-- with every loaded model busy, a load fails fast and says who holds memory\n");
        Lease<Model> also_busy = reranker->acquire();
        try {
            embedder->acquire();
        } catch (const InsufficientMemory& e) {
            std::printf("[%6.3f s] InsufficientMemory: %s\n", elapsed_seconds(), e.what());
        }
    }
    print_status(registry.status());

    std::printf("-- idle for longer than idle_timeout: the reaper unloads everything\n");
    std::this_thread::sleep_for(600ms);
    print_status(registry.status());
    return 0;
}
