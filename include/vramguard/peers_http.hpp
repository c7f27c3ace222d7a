// SPDX-License-Identifier: MIT
// HTTP peers: adapters that ask the other services on a GPU to free memory, each speaking that
// service's own HTTP API. Optional: needs cpp-httplib and nlohmann/json (CMake target
// vramguard::peers), and is never part of the core or of the generated single header.
//
//   vramguard / the seed protocol  POST /request-unload {"min_idle_seconds": N}, GET /status
//   Ollama                         GET /api/ps, POST /api/generate {"model": M, "keep_alive": 0}
//   ComfyUI                        GET /queue, GET /system_stats, POST /free
//   llama.cpp (router mode)        GET /models, POST /models/unload {"model": M}
//   vLLM (sleep mode, opt-in)      GET /is_sleeping, GET /metrics, POST /sleep?level=N
//
// Every call ends by the request's deadline (one total deadline for the request's calls: name
// lookup, connect, headers and body, however slowly a peer drips them) and keeps at most
// protocol::max_peer_answer_bytes of an answer; no thread is left reading after it returns. A
// bearer token is sent when one is configured; redirects are not followed. Nothing here throws out
// of relieve() or ask(): a service that is down, too slow, or answers garbage (not JSON, too big,
// too deep, wrong types, numbers out of range) is a PeerReply::error with a short, printable
// reason. The options are in peers_http_options.hpp, the calls and their deadline in
// detail/http_calls.hpp, the answers' parsers in detail/peer_answers.hpp (fuzzed on their own).
// What a service says it freed is a claim; only the probe's reading admits a load (peer.hpp).
//
// What was checked in each service's source (read, not copied):
// - Ollama server/routes.go: PsHandler lists s.sched.loaded with size_vram and expires_at;
//   GenerateHandler unloads on an empty prompt with keep_alive 0 (expireRunner) and answers
//   done_reason "unload". api/types.go: a negative keep_alive becomes the largest Duration, so a
//   pinned model's expires_at lies centuries ahead; the default keep_alive is 5 minutes.
// - ComfyUI server.py: GET /queue answers queue_running and queue_pending; POST /free records
//   unload_models and free_memory as queue flags only when true, and main.py's prompt worker
//   reads flags.get("unload_models", free_memory): free_memory alone also unloads every model.
//   Both fields are therefore always sent. GET /system_stats: devices[].torch_vram_total is what
//   ComfyUI's PyTorch allocator holds. The flags act between prompts, so /free answers at once.
// - llama.cpp tools/server (server.cpp, server-models.cpp): in router mode POST /models/unload
//   {"model": M} answers {"success": true}, or 400 "model is not running"/"model is not found";
//   GET /models lists data[] with status.value "loaded"/"unloaded"/"loading". An unload stops
//   the model's process, generation in flight included.
// - vLLM docs/features/sleep_mode.md: POST /sleep?level=1 offloads the weights and drops the KV
//   cache, GET /is_sleeping answers {"is_sleeping": bool}; the endpoints exist only with
//   VLLM_SERVER_DEV_MODE=1. Sleeping does not wait for the requests in flight, so this adapter
//   is only built when configured and first reads vllm:num_requests_running from /metrics.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/detail/http_calls.hpp>
#include <vramguard/detail/peer_answers.hpp>
#include <vramguard/detail/peer_url.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/peers_http_options.hpp>
#include <vramguard/protocol.hpp>
#include <vramguard/version.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE

namespace peers {

// How hard to ask. The registry's relief (Peer::relieve) always unloads; an external manager asks
// for idle models first (above 75 % in use) and for unloads only above 85 %.
enum class Ask {
    idle,    // drop caches and models idle for at least idle_min; nothing in use
    unload,  // unload what is not in use now
};

inline const char* to_string(Ask ask) noexcept {
    return ask == Ask::idle ? "idle models and caches" : "unload";
}

// What a service says it holds on the device, for a manager's log.
struct Holding {
    std::optional<std::uint64_t> bytes;  // none when it does not say or could not be asked
    std::string detail;                  // "2 models", or why nothing is known
};

// A service reached over HTTP. relieve() is the registry's ask (unload); ask() lets a manager ask
// for idle models only. Neither throws: every failure is a PeerReply::error.
class HttpPeer : public Peer {
   public:
    HttpPeer(std::string kind, HttpPeerOptions options)
        : kind_(std::move(kind)), options_(std::move(options)) {
        options_.validate();
        url_ = detail::Url::parse(options_.url);
        name_ = options_.name.empty() ? kind_ + "@" + url_.host_port() : options_.name;
    }

    std::string name() const override { return name_; }
    const std::string& kind() const noexcept { return kind_; }
    const HttpPeerOptions& options() const noexcept { return options_; }

    PeerReply relieve(const ReliefRequest& request) override { return ask(request, Ask::unload); }

    PeerReply ask(const ReliefRequest& request, Ask how) noexcept {
        try {
            detail::HttpCalls calls(url_, options_, budget(request.timeout));
            return ask_over_http(calls, request, how);
        } catch (const detail::FieldError& e) {
            return PeerReply::error(std::string("garbage answer: ") + e.what());
        } catch (const std::exception& e) {
            return PeerReply::error(std::string("failed: ") + e.what());
        } catch (...) {
            return PeerReply::error("failed with an unknown exception");
        }
    }

    // What it says it holds on the device, within `timeout`. Never throws.
    Holding holding(Duration timeout = defaults::request_timeout) noexcept {
        try {
            detail::HttpCalls calls(url_, options_, budget(timeout));
            return holding_over_http(calls);
        } catch (const std::exception& e) {
            return {std::nullopt, std::string("unknown: ") + e.what()};
        } catch (...) {
            return {std::nullopt, "unknown"};
        }
    }

   protected:
    virtual PeerReply ask_over_http(detail::HttpCalls& calls, const ReliefRequest& request,
                                    Ask how) = 0;
    virtual Holding holding_over_http(detail::HttpCalls& calls) = 0;

    // Bytes to claim when the service freed an unknown amount.
    std::uint64_t unknown_claim(const ReliefRequest& request) const noexcept {
        const std::uint64_t claim =
            options_.unknown_freed_bytes > 0 ? options_.unknown_freed_bytes : request.shortfall;
        return claim > 0 ? claim : 1;
    }

    // A JSON answer or the reason there is none.
    static std::optional<nlohmann::json> json_of(const detail::HttpAnswer& answer,
                                                 const std::string& what, std::string& error) {
        if (!answer.ok()) {
            error = answer.error;
            return std::nullopt;
        }
        std::string why;
        std::optional<nlohmann::json> json = detail::parse_json(answer.body, &why);
        if (!json) error = "garbage answer to " + what + ": " + why;
        return json;
    }

   private:
    // The request's timeout, or the default when it has none; at most an hour, so that the
    // deadline (now + budget) never overflows, whatever a caller passes (milliseconds::max()).
    static Duration budget(Duration timeout) {
        if (timeout <= Duration::zero()) return Duration(defaults::request_timeout);
        return std::min<Duration>(timeout, std::chrono::hours(1));
    }

    std::string kind_;
    HttpPeerOptions options_;
    detail::Url url_;
    std::string name_;
};

// The same peer as a Peer that asks `how`: a manager's relief round (PeerRelief, relief.hpp) asks
// Ask::idle at its first stage and Ask::unload (relieve() itself) at its second.
inline std::shared_ptr<Peer> asking(std::shared_ptr<HttpPeer> peer, Ask how) {
    if (!peer) throw std::invalid_argument("vramguard::peers::asking: peer must not be null");
    if (how == Ask::unload) return peer;
    return make_peer(peer->name(),
                     [peer, how](const ReliefRequest& request) { return peer->ask(request, how); });
}

// Another vramguard server (examples/torch_server), the seeds' protocol:
//   POST /request-unload {"min_idle_seconds": N} (also ?min_idle_seconds=N, for servers that read
//   the query) -> {"status": "ok"|"busy", "unloaded": bool, "message": str, "idle_seconds": s}
//   or, from earlier servers, {"result": "unloaded"|"busy"|"not_loaded", "idle_seconds": s,
//   "leases": n, "freed_bytes": b}. Missing fields are tolerated; wrong types and numbers out of
//   range are garbage. GET /status -> model.bytes while model.loaded.
class VramguardPeer final : public HttpPeer {
   public:
    explicit VramguardPeer(HttpPeerOptions options) : HttpPeer("vramguard", std::move(options)) {}

   protected:
    PeerReply ask_over_http(detail::HttpCalls& calls, const ReliefRequest& request,
                            Ask how) override {
        const double min_idle =
            std::chrono::duration<double>(how == Ask::idle ? options().idle_min
                                                           : options().vramguard_unload_min_idle)
                .count();
        char query[64];
        std::snprintf(query, sizeof query, "?min_idle_seconds=%g", min_idle);
        const detail::HttpAnswer answer =
            calls.post(std::string("/request-unload") + query, {{"min_idle_seconds", min_idle}});
        // A busy server may say so with an error status and the same body.
        const std::optional<nlohmann::json> json = detail::parse_json(answer.body);
        if (!answer.ok() && !(json && json->is_object() && json->contains("status")))
            return PeerReply::error(answer.error);
        if (!json) {
            std::string error;
            json_of(answer, "/request-unload", error);
            return PeerReply::error(error);
        }
        return detail::vramguard_unload_reply(*json, unknown_claim(request));
    }

    Holding holding_over_http(detail::HttpCalls& calls) override {
        std::string error;
        const std::optional<nlohmann::json> json = json_of(calls.get("/status"), "/status", error);
        if (!json) return {std::nullopt, error};
        const detail::VramguardModel model = detail::vramguard_status_model(*json);
        return {model.bytes, model.loaded ? "model loaded" : "no model loaded"};
    }
};

// Ollama. GET /api/ps lists the loaded models with size_vram and expires_at (last use plus
// keep_alive); POST /api/generate {"model": M, "keep_alive": 0} unloads one (a model answering a
// request goes when that request ends). Models asked, least recently used first, until their
// size_vram covers the shortfall: never one that lives on the CPU (size_vram 0), never a pinned
// one (expires more than ollama_pinned_after from now), and for Ask::idle only those unused for
// idle_min (expiring within keep_alive - idle_min).
class OllamaPeer final : public HttpPeer {
   public:
    explicit OllamaPeer(HttpPeerOptions options) : HttpPeer("ollama", std::move(options)) {}

   protected:
    using Loaded = detail::OllamaModel;

    PeerReply ask_over_http(detail::HttpCalls& calls, const ReliefRequest& request,
                            Ask how) override {
        std::string error;
        std::vector<Loaded> models;
        if (!list(calls, models, error)) return PeerReply::error(error);
        if (models.empty()) return PeerReply::nothing("no model loaded");
        const double pinned = seconds(options().ollama_pinned_after);
        const double idle_within =
            seconds(options().ollama_keep_alive) - seconds(options().idle_min);
        std::vector<std::string> kept, unloaded, failed;
        std::uint64_t claimed = 0;
        std::sort(models.begin(), models.end(),
                  [](const Loaded& a, const Loaded& b) { return a.expires_in < b.expires_in; });
        for (const Loaded& model : models) {
            const std::string name = detail::excerpt(model.name, 60);
            if (model.vram == 0) continue;
            if (model.expires_in > pinned) {
                kept.push_back(name + " pinned");
                continue;
            }
            if (how == Ask::idle && model.expires_in > idle_within) {
                kept.push_back(name + " in use");
                continue;
            }
            if (claimed >= request.shortfall && request.shortfall > 0) break;
            if (!calls.time_left()) {
                failed.push_back(name + ": out of time");
                break;
            }
            std::string why;
            if (unload(calls, model.name, why)) {
                claimed = detail::add_bytes(claimed, model.vram);
                unloaded.push_back(name);
            } else {
                failed.push_back(name + ": " + why);
            }
        }
        if (!unloaded.empty())
            return PeerReply::freed(claimed,
                                    "unloaded " + detail::join(unloaded) +
                                        (kept.empty() ? "" : "; kept " + detail::join(kept)));
        if (!failed.empty()) return PeerReply::error(detail::join(failed));
        if (!kept.empty()) return PeerReply::busy(std::nullopt, detail::join(kept));
        return PeerReply::nothing("no model on the GPU");
    }

    Holding holding_over_http(detail::HttpCalls& calls) override {
        std::string error;
        std::vector<Loaded> models;
        if (!list(calls, models, error)) return {std::nullopt, error};
        std::uint64_t bytes = 0;
        for (const Loaded& model : models) bytes = detail::add_bytes(bytes, model.vram);
        return {bytes, std::to_string(models.size()) + " model(s) loaded"};
    }

   private:
    static double seconds(std::chrono::milliseconds d) {
        return std::chrono::duration<double>(d).count();
    }

    static bool list(detail::HttpCalls& calls, std::vector<Loaded>& models, std::string& error) {
        const std::optional<nlohmann::json> json = json_of(calls.get("/api/ps"), "/api/ps", error);
        if (!json) return false;
        models = detail::ollama_models(*json, detail::unix_now());
        return true;
    }

    static bool unload(detail::HttpCalls& calls, const std::string& model, std::string& why) {
        const detail::HttpAnswer answer =
            calls.post("/api/generate", {{"model", model}, {"keep_alive", 0}, {"stream", false}});
        const std::optional<nlohmann::json> json = json_of(answer, "/api/generate", why);
        if (!json) return false;
        why = detail::ollama_unload_refusal(*json);
        return why.empty();
    }
};

// ComfyUI. GET /queue first: a prompt running or pending means it needs its models now (busy, not
// asked); an answer without both queue lists is an error, never taken for an idle queue. Then GET
// /system_stats for what its PyTorch allocator holds (torch_vram_total, the claim; an answer
// without it is an error) and POST /free
// with both fields explicit: {"unload_models": true, "free_memory": F}, F = true for Ask::unload
// (the node cache goes too), false for Ask::idle (models only).
class ComfyUiPeer final : public HttpPeer {
   public:
    explicit ComfyUiPeer(HttpPeerOptions options) : HttpPeer("comfyui", std::move(options)) {}

   protected:
    PeerReply ask_over_http(detail::HttpCalls& calls, const ReliefRequest& /*request*/,
                            Ask how) override {
        std::string error;
        const std::optional<nlohmann::json> json = json_of(calls.get("/queue"), "/queue", error);
        if (!json) return PeerReply::error(error);
        const detail::ComfyUiQueue queue = detail::comfyui_queue(*json);
        if (queue.running + queue.pending > 0)
            return PeerReply::busy(std::nullopt, std::to_string(queue.running) + " running, " +
                                                     std::to_string(queue.pending) + " pending");
        // What it holds is the claim: an answer that does not say is an error, not a guess.
        const std::optional<nlohmann::json> stats =
            json_of(calls.get("/system_stats"), "/system_stats", error);
        if (!stats) return PeerReply::error(error);
        const std::uint64_t held = detail::comfyui_torch_bytes(*stats);
        if (held == 0) return PeerReply::nothing("its allocator holds nothing");
        const detail::HttpAnswer freed =
            calls.post("/free", {{"unload_models", true}, {"free_memory", how == Ask::unload}});
        if (!freed.ok()) return PeerReply::error(freed.error);
        return PeerReply::freed(held, how == Ask::unload ? "models and node cache" : "models");
    }

    Holding holding_over_http(detail::HttpCalls& calls) override {
        std::string error;
        const std::optional<nlohmann::json> stats =
            json_of(calls.get("/system_stats"), "/system_stats", error);
        if (!stats) return {std::nullopt, error};
        try {
            return {detail::comfyui_torch_bytes(*stats), "held by its PyTorch allocator"};
        } catch (const detail::FieldError& e) {
            return {std::nullopt, e.what()};
        }
    }
};

// llama.cpp's server in router mode. POST /models/unload {"model": M} for each model in
// llamacpp_models, or for each model GET /models lists as loaded. An unload stops generation in
// flight, so Ask::idle (a manager's first stage) never unloads here. The router does not say how
// much memory a model held: the claim is unknown_freed_bytes per model, else the shortfall.
class LlamaCppRouterPeer final : public HttpPeer {
   public:
    explicit LlamaCppRouterPeer(HttpPeerOptions options)
        : HttpPeer("llamacpp", std::move(options)) {}

   protected:
    PeerReply ask_over_http(detail::HttpCalls& calls, const ReliefRequest& request,
                            Ask how) override {
        if (how == Ask::idle)
            return PeerReply::nothing("unloads only when asked to unload (stops generation)");
        std::vector<std::string> models = options().llamacpp_models;
        if (models.empty()) {
            std::string error;
            if (!loaded(calls, models, error)) return PeerReply::error(error);
            if (models.empty()) return PeerReply::nothing("no model loaded");
        }
        std::vector<std::string> unloaded, failed;
        for (const std::string& model : models) {
            const std::string name = detail::excerpt(model, 60);
            if (!calls.time_left()) {
                failed.push_back(name + ": out of time");
                break;
            }
            const detail::HttpAnswer answer = calls.post("/models/unload", {{"model", model}});
            if (answer.ok()) {
                const std::optional<nlohmann::json> json = detail::parse_json(answer.body);
                if (!json || !detail::llamacpp_unloaded(*json))
                    failed.push_back(name + ": garbage answer");
                else
                    unloaded.push_back(name);
            } else if (answer.status == 400 &&
                       answer.error.find("not running") != std::string::npos) {
                continue;  // not loaded: nothing to free
            } else {
                failed.push_back(name + ": " + answer.error);
            }
        }
        if (!unloaded.empty()) {
            std::uint64_t claim = 0;
            for (std::size_t i = 0; i < unloaded.size(); ++i)
                claim = detail::add_bytes(claim, options().unknown_freed_bytes);
            if (claim == 0) claim = unknown_claim(request);
            return PeerReply::freed(claim, "unloaded " + detail::join(unloaded));
        }
        if (!failed.empty()) return PeerReply::error(detail::join(failed));
        return PeerReply::nothing("no model loaded");
    }

    Holding holding_over_http(detail::HttpCalls& calls) override {
        std::vector<std::string> models;
        std::string error;
        if (!loaded(calls, models, error)) return {std::nullopt, error};
        return {std::nullopt, std::to_string(models.size()) + " model(s) loaded (sizes unknown)"};
    }

   private:
    static bool loaded(detail::HttpCalls& calls, std::vector<std::string>& models,
                       std::string& error) {
        const std::optional<nlohmann::json> json = json_of(calls.get("/models"), "/models", error);
        if (!json) return false;
        models = detail::llamacpp_loaded(*json);
        return true;
    }
};

// vLLM's sleep mode (VLLM_SERVER_DEV_MODE=1, --enable-sleep-mode), opt-in: make one only for a
// vLLM server whose requests may be refused while it sleeps. GET /is_sleeping (asleep: nothing to
// free), GET /metrics (vllm:num_requests_running > 0: busy), then POST /sleep?level=N. Ask::idle
// never puts it to sleep. The claim is unknown_freed_bytes, else the shortfall.
class VllmSleepPeer final : public HttpPeer {
   public:
    explicit VllmSleepPeer(HttpPeerOptions options) : HttpPeer("vllm", std::move(options)) {}

   protected:
    PeerReply ask_over_http(detail::HttpCalls& calls, const ReliefRequest& request,
                            Ask how) override {
        if (how == Ask::idle) return PeerReply::nothing("sleeps only when asked to unload");
        std::string error;
        const std::optional<nlohmann::json> sleeping =
            json_of(calls.get("/is_sleeping"), "/is_sleeping", error);
        if (!sleeping) return PeerReply::error(error);
        if (detail::vllm_is_sleeping(*sleeping)) return PeerReply::nothing("already asleep");
        if (options().vllm_check_running) {
            const detail::HttpAnswer metrics = calls.get("/metrics");
            if (!metrics.ok()) return PeerReply::error(metrics.error);
            const std::optional<double> running = detail::vllm_requests_running(metrics.body);
            if (!running) return PeerReply::error("/metrics has no vllm:num_requests_running");
            if (*running > 0)  // range-checked: at most 2^32
                return PeerReply::busy(
                    std::nullopt,
                    std::to_string(static_cast<std::uint64_t>(*running)) + " request(s) running");
        }
        const detail::HttpAnswer slept =
            calls.post("/sleep?level=" + std::to_string(options().vllm_sleep_level));
        if (!slept.ok()) return PeerReply::error(slept.error);
        return PeerReply::freed(unknown_claim(request),
                                "asleep at level " + std::to_string(options().vllm_sleep_level));
    }

    Holding holding_over_http(detail::HttpCalls& calls) override {
        std::string error;
        const std::optional<nlohmann::json> sleeping =
            json_of(calls.get("/is_sleeping"), "/is_sleeping", error);
        if (!sleeping) return {std::nullopt, error};
        const bool asleep = detail::vllm_is_sleeping(*sleeping);
        return {asleep ? std::optional<std::uint64_t>(0) : std::nullopt,
                asleep ? "asleep" : "awake (size unknown)"};
    }
};

// The adapter for `kind`: "vramguard", "ollama", "comfyui", "llamacpp" or "vllm". Throws
// std::invalid_argument for an unknown kind or bad options (configuration time).
inline std::shared_ptr<HttpPeer> make_http_peer(const std::string& kind, HttpPeerOptions options) {
    if (kind == "vramguard") return std::make_shared<VramguardPeer>(std::move(options));
    if (kind == "ollama") return std::make_shared<OllamaPeer>(std::move(options));
    if (kind == "comfyui") return std::make_shared<ComfyUiPeer>(std::move(options));
    if (kind == "llamacpp") return std::make_shared<LlamaCppRouterPeer>(std::move(options));
    if (kind == "vllm") return std::make_shared<VllmSleepPeer>(std::move(options));
    throw std::invalid_argument("vramguard::peers: unknown peer kind \"" + kind +
                                "\" (vramguard, ollama, comfyui, llamacpp, vllm)");
}

// "ollama=http://127.0.0.1:11434" -> make_http_peer("ollama", {url, ...}); `options` supplies the
// rest (token, timeouts). Throws std::invalid_argument.
inline std::shared_ptr<HttpPeer> parse_http_peer(const std::string& spec,
                                                 HttpPeerOptions options = {}) {
    const std::size_t equals = spec.find('=');
    if (equals == std::string::npos || equals == 0 || equals + 1 == spec.size())
        throw std::invalid_argument("vramguard::peers: peer \"" + spec +
                                    "\" should read KIND=URL, e.g. ollama=http://127.0.0.1:11434");
    options.url = spec.substr(equals + 1);
    return make_http_peer(spec.substr(0, equals), std::move(options));
}

}  // namespace peers

VRAMGUARD_END_NAMESPACE
