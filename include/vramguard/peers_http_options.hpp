// SPDX-License-Identifier: MIT
// How an HTTP peer (peers_http.hpp) is configured: HttpPeerOptions, every field with its default
// (peers::defaults) and validate(). A header of its own so that the peers' HTTP calls
// (detail/http_calls.hpp) can read it; needs neither cpp-httplib nor nlohmann/json.
#pragma once

#include <vramguard/protocol.hpp>
#include <vramguard/version.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE
namespace peers {

namespace defaults {
// A service on the same host accepts a connection in microseconds: one that has not within half a
// second is down or stuck, and the rest of the request's time is left for its answer.
inline constexpr std::chrono::milliseconds connect_timeout{500};
// When a request carries no timeout (a caller that is not a registry): the registry's own default.
inline constexpr std::chrono::milliseconds request_timeout{2000};
// Ask::idle: a model unused for a minute is not serving a conversation turn.
inline constexpr std::chrono::seconds idle_min{60};
// Ollama's default keep_alive (api/types.go): what expires_at counts from.
inline constexpr std::chrono::minutes ollama_keep_alive{5};
// An Ollama model that expires more than this from now was pinned (keep_alive -1 or hours) by
// someone who wants it to stay: it is never asked to go.
inline constexpr std::chrono::hours ollama_pinned_after{1};
// vLLM's sleep level: 1 keeps the weights in host memory (a quick wake-up), 2 drops them.
inline constexpr int vllm_sleep_level = 1;
}  // namespace defaults

// One peer's configuration. Every field states its default; validate() names the bad field.
struct HttpPeerOptions {
    std::string url;           // required: http://host:port[/prefix] (https where httplib has TLS)
    std::string name;          // "" -> "<kind>@host:port"
    std::string bearer_token;  // "" -> no Authorization header
    // How a host name becomes a numeric address: "" or a throw when it does not resolve. Empty:
    // the system's resolver (getaddrinfo). Either way it runs on its own thread and the call waits
    // for it no longer than the request's time left: a resolver stuck on an unreachable DNS server
    // costs the request its timeout, not the resolver's own (seconds per attempt). Not called for
    // numeric hosts (127.0.0.1, [::1]).
    std::function<std::string(const std::string& host)> resolve;
    std::chrono::milliseconds connect_timeout = defaults::connect_timeout;  // > 0, capped by the
                                                                            // request's time left
    std::chrono::milliseconds idle_min = defaults::idle_min;  // Ask::idle: unused at least this
    // Ask::unload (relieve()) of a vramguard server: unused at least this (the protocol's 30 s)
    std::chrono::milliseconds vramguard_unload_min_idle = protocol::default_min_idle;
    // What to claim when a service unloaded something but does not say how much (llama.cpp, vLLM,
    // an old vramguard server): 0 = the bytes asked for, so the registry looks again and its probe
    // decides. A claim is never trusted either way.
    std::uint64_t unknown_freed_bytes = 0;
    // Ollama
    std::chrono::milliseconds ollama_keep_alive = defaults::ollama_keep_alive;
    std::chrono::milliseconds ollama_pinned_after = defaults::ollama_pinned_after;
    // llama.cpp router: the models it may unload; empty = every loaded model GET /models lists.
    std::vector<std::string> llamacpp_models;
    // vLLM
    int vllm_sleep_level = defaults::vllm_sleep_level;  // 1 or 2
    bool vllm_check_running = true;  // read /metrics first; busy while requests run

    void validate() const {
        auto fail = [](const char* field, const std::string& why) {
            throw std::invalid_argument(std::string("vramguard::peers::HttpPeerOptions::") + field +
                                        " " + why);
        };
        if (url.empty()) fail("url", "must not be empty (http://host:port)");
        if (connect_timeout.count() <= 0) fail("connect_timeout", "must be positive");
        if (idle_min.count() < 0) fail("idle_min", "must not be negative");
        if (vramguard_unload_min_idle.count() < 0)
            fail("vramguard_unload_min_idle", "must not be negative");
        if (ollama_keep_alive.count() < 0) fail("ollama_keep_alive", "must not be negative");
        if (ollama_pinned_after.count() <= 0) fail("ollama_pinned_after", "must be positive");
        if (vllm_sleep_level != 1 && vllm_sleep_level != 2)
            fail("vllm_sleep_level", "must be 1 or 2");
        for (const std::string& model : llamacpp_models)
            if (model.empty()) fail("llamacpp_models", "must not hold an empty name");
    }
};

}  // namespace peers
VRAMGUARD_END_NAMESPACE
