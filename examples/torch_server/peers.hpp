// SPDX-License-Identifier: MIT
// --peer KIND=URL: the other services on this GPU that the registry asks to free memory when the
// encoder does not fit (README, "Sharing a GPU with other services"), built with vramguard's HTTP
// adapters (vramguard/peers_http.hpp, CMake target vramguard::peers). Without them the server still
// builds, and --peer says what is missing.
#pragma once

#include <vramguard/peer.hpp>

#if defined(VRAMGUARD_WITH_HTTP_PEERS)
#include <vramguard/peers_http.hpp>
#endif

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

namespace torch_server {

// The protocol's minimum idle time: a vramguard peer gives up only a model unused this long.
inline constexpr std::chrono::seconds seed_min_idle{30};

// The Peer for --peer KIND=URL (vramguard, ollama, comfyui, llamacpp, vllm); bearer_token is sent
// to it as "Authorization: Bearer ..." ("" = none). std::invalid_argument when the flag is
// malformed or this build has no HTTP adapters.
inline std::shared_ptr<vramguard::Peer> make_peer_from_flag(const std::string& spec,
                                                            const std::string& bearer_token = "") {
#if defined(VRAMGUARD_WITH_HTTP_PEERS)
    namespace peers = vramguard::peers;
    peers::HttpPeerOptions options;
    options.bearer_token = bearer_token;
    // Another vramguard server gives up only a model idle for the protocol's 30 s (the adapter's
    // vramguard_unload_min_idle): two servers taking turns never unload a model the other used a
    // second ago.
    options.vramguard_unload_min_idle = seed_min_idle;
    return peers::parse_http_peer(spec, options);
#else
    (void)bearer_token;
    throw std::invalid_argument(
        "--peer " + spec +
        ": this torch_server was built without vramguard's HTTP peer adapters "
        "(vramguard/peers_http.hpp, target vramguard::peers: needs cpp-httplib and nlohmann_json, "
        "and VRAMGUARD_USE_HTTP_PEERS_IF_AVAILABLE on)");
#endif
}

}  // namespace torch_server
