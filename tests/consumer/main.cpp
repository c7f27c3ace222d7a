// SPDX-License-Identifier: MIT
// What a user writes first: include the library the documented way and use it.
#include <vramguard/vramguard.hpp>

#include <cstdio>
#include <string>

#if defined(VRAMGUARD_CONSUMER_EXPECT_SINGLE_HEADER) && !defined(VRAMGUARD_SINGLE_HEADER_HPP)
#error "expected the generated single header, got the split headers"
#endif
#if defined(VRAMGUARD_CONSUMER_EXPECT_CUDA) && !defined(VRAMGUARD_WITH_CUDA)
#error "vramguard::cuda did not define VRAMGUARD_WITH_CUDA"
#endif
#if defined(VRAMGUARD_CONSUMER_EXPECT_TORCH) && !defined(VRAMGUARD_WITH_TORCH)
#error "vramguard::torch did not define VRAMGUARD_WITH_TORCH"
#endif
#if defined(VRAMGUARD_CONSUMER_EXPECT_PEERS)
#if !defined(VRAMGUARD_WITH_HTTP_PEERS)
#error "vramguard::peers did not define VRAMGUARD_WITH_HTTP_PEERS"
#endif
#include <vramguard/peers_http.hpp>
#endif

#if defined(VRAMGUARD_CONSUMER_EXPECT_PROMETHEUS)
#if !defined(VRAMGUARD_WITH_PROMETHEUS)
#error "vramguard::prometheus did not define VRAMGUARD_WITH_PROMETHEUS"
#endif
#include <vramguard/prometheus.hpp>

#include <prometheus/registry.h>
#endif

int main() {
    const std::string text = vramguard::format_bytes(6ull << 30);
    std::printf("vramguard %d.%d.%d: %s\n", VRAMGUARD_VERSION_MAJOR, VRAMGUARD_VERSION_MINOR,
                VRAMGUARD_VERSION_PATCH, text.c_str());
    if (text != "6.00 GiB") {
        std::fprintf(stderr, "expected \"6.00 GiB\", got \"%s\"\n", text.c_str());
        return 1;
    }
#if defined(VRAMGUARD_CONSUMER_EXPECT_PEERS)
    // Compiled with cpp-httplib's flags and linked with its library, as the component promises.
    const auto peer = vramguard::peers::parse_http_peer("ollama=http://127.0.0.1:11434");
    if (peer->name() != "ollama@127.0.0.1:11434") {
        std::fprintf(stderr, "unexpected peer name \"%s\"\n", peer->name().c_str());
        return 1;
    }
#endif
#if defined(VRAMGUARD_CONSUMER_EXPECT_PROMETHEUS)
    // Linked with prometheus-cpp's core, as the component promises.
    vramguard::SimulatedDevice device(1ull << 30);
    vramguard::Options options;
    options.persist = false;
    vramguard::Guard<vramguard::SimulatedDevice> guard(device, options);
    prometheus::Registry registry;
    vramguard::PrometheusExporter exporter(registry);
    exporter.add_guard(guard);
    exporter.update();
    if (registry.Collect().empty()) {
        std::fprintf(stderr, "the exporter registered nothing\n");
        return 1;
    }
#endif
    return 0;
}
