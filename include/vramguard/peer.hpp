// SPDX-License-Identifier: MIT
// Peers: other services on the same GPU (another vramguard server, Ollama, ComfyUI, llama.cpp's
// router, vLLM's sleep mode) that a registry asks to free memory when a load still does not fit
// after its own idle models went. The core knows only this interface; an adapter that speaks a
// service's protocol (HTTP, with its own timeout) implements it in an optional header.
//
// A peer's answer is a claim, never trusted: only the probe's reading admits a load.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/version.hpp>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE

enum class PeerAnswer {
    freed,    // it says it gave memory back (claimed_bytes)
    busy,     // it holds memory but will not give it now (in use, or idle for less than asked)
    nothing,  // it holds nothing it could free
    error,    // no usable answer: down, too slow, garbage, or it threw
};

inline const char* to_string(PeerAnswer answer) noexcept {
    switch (answer) {
        case PeerAnswer::freed: return "freed";
        case PeerAnswer::busy: return "busy";
        case PeerAnswer::nothing: return "nothing";
        case PeerAnswer::error: return "error";
    }
    return "?";
}

struct PeerReply {
    PeerAnswer answer = PeerAnswer::nothing;
    std::uint64_t claimed_bytes = 0;     // freed: what it says it gave back (a claim)
    std::optional<double> idle_seconds;  // busy: how long its model has been idle, when it says
    std::string detail;                  // for the operator: a model's name, an error message

    static PeerReply freed(std::uint64_t bytes, std::string detail = {}) {
        return {PeerAnswer::freed, bytes, std::nullopt, std::move(detail)};
    }
    static PeerReply busy(std::optional<double> idle_seconds = std::nullopt,
                          std::string detail = {}) {
        return {PeerAnswer::busy, 0, idle_seconds, std::move(detail)};
    }
    static PeerReply nothing(std::string detail = {}) {
        return {PeerAnswer::nothing, 0, std::nullopt, std::move(detail)};
    }
    static PeerReply error(std::string detail) {
        return {PeerAnswer::error, 0, std::nullopt, std::move(detail)};
    }
};

// "freed 2.00 GiB (claimed)", "busy, idle 3 s", "nothing to free", "error: connection refused".
inline std::string describe(const PeerReply& reply) {
    std::string text;
    switch (reply.answer) {
        case PeerAnswer::freed:
            text = "freed " + format_bytes(reply.claimed_bytes) + " (claimed)";
            break;
        case PeerAnswer::busy: text = "busy"; break;
        case PeerAnswer::nothing: text = "nothing to free"; break;
        case PeerAnswer::error: text = "error"; break;
    }
    if (reply.answer == PeerAnswer::busy && reply.idle_seconds && *reply.idle_seconds >= 0) {
        char idle[48];
        std::snprintf(idle, sizeof idle, ", idle %.0f s", *reply.idle_seconds);
        text += idle;
    }
    if (!reply.detail.empty())
        text += (reply.answer == PeerAnswer::error ? ": " : " (") + reply.detail +
                (reply.answer == PeerAnswer::error ? "" : ")");
    return text;
}

// What a peer is asked.
struct ReliefRequest {
    std::uint64_t shortfall = 0;  // bytes the load still lacks on the device
    Duration timeout{};           // answer within this (for a client with a relative timeout) ...
    TimePoint deadline{};         // ... which is this on the registry's clock
    std::string requester;        // the model that needs the memory, for the peer's log
};

// Another service on the same device. relieve() may block, but not past request.deadline: the
// registry stops waiting for it there (the call goes on on its own thread, its answer unused).
// An exception counts as an error answer; nothing a peer does escapes the registry's acquire().
class Peer {
   public:
    virtual ~Peer() = default;
    // How refusals and status() name it: "reranker@:8081".
    virtual std::string name() const = 0;
    virtual PeerReply relieve(const ReliefRequest& request) = 0;
};

// A Peer from a name and a callable.
inline std::shared_ptr<Peer> make_peer(std::string name,
                                       std::function<PeerReply(const ReliefRequest&)> relieve) {
    class FunctionPeer final : public Peer {
       public:
        FunctionPeer(std::string n, std::function<PeerReply(const ReliefRequest&)> f)
            : name_(std::move(n)), relieve_(std::move(f)) {}
        std::string name() const override { return name_; }
        PeerReply relieve(const ReliefRequest& request) override { return relieve_(request); }

       private:
        const std::string name_;
        const std::function<PeerReply(const ReliefRequest&)> relieve_;
    };
    if (name.empty()) throw std::invalid_argument("vramguard::make_peer: name must not be empty");
    if (!relieve) throw std::invalid_argument("vramguard::make_peer: relieve must be callable");
    return std::make_shared<FunctionPeer>(std::move(name), std::move(relieve));
}

VRAMGUARD_END_NAMESPACE
