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
// reason. The answers' parsers are in detail/peer_answers.hpp (fuzzed on their own).
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
#include <vramguard/detail/call_watchdog.hpp>
#include <vramguard/detail/detached_call.hpp>
#include <vramguard/detail/peer_answers.hpp>
#include <vramguard/memory.hpp>
#include <vramguard/peer.hpp>
#include <vramguard/protocol.hpp>
#include <vramguard/version.hpp>

#include <arpa/inet.h>
#include <httplib.h>
#include <netdb.h>
#include <sys/socket.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
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

// How hard to ask. The registry's relief (Peer::relieve) always unloads; an external manager asks
// for idle models first (above 75 % in use) and for unloads only above 85 %.
enum class Ask {
    idle,    // drop caches and models idle for at least idle_min; nothing in use
    unload,  // unload what is not in use now
};

inline const char* to_string(Ask ask) noexcept {
    return ask == Ask::idle ? "idle models and caches" : "unload";
}

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

// What a service says it holds on the device, for a manager's log.
struct Holding {
    std::optional<std::uint64_t> bytes;  // none when it does not say or could not be asked
    std::string detail;                  // "2 models", or why nothing is known
};

namespace detail {

// http(s)://host[:port][/prefix], split; throws std::invalid_argument (configuration time).
struct Url {
    std::string scheme, host, prefix;
    int port = 0;

    static Url parse(const std::string& text) {
        Url url;
        const std::size_t colon = text.find("://");
        if (colon == std::string::npos)
            throw std::invalid_argument("vramguard::peers: url \"" + text +
                                        "\" must start with http:// or https://");
        url.scheme = text.substr(0, colon);
        if (url.scheme != "http" && url.scheme != "https")
            throw std::invalid_argument("vramguard::peers: url \"" + text +
                                        "\": only http and https are supported");
        std::string rest = text.substr(colon + 3);
        const std::size_t slash = rest.find('/');
        if (slash != std::string::npos) {
            url.prefix = rest.substr(slash);
            rest.resize(slash);
            while (!url.prefix.empty() && url.prefix.back() == '/') url.prefix.pop_back();
        }
        url.port = url.scheme == "https" ? 443 : 80;
        const std::size_t port_colon = rest.rfind(':');
        if (port_colon != std::string::npos && rest.find(']', port_colon) == std::string::npos) {
            const std::string port = rest.substr(port_colon + 1);
            char* end = nullptr;
            const long value = std::strtol(port.c_str(), &end, 10);
            if (port.empty() || *end != '\0' || value <= 0 || value > 65535)
                throw std::invalid_argument("vramguard::peers: url \"" + text +
                                            "\" has a bad port");
            url.port = static_cast<int>(value);
            rest.resize(port_colon);
        }
        if (rest.empty())
            throw std::invalid_argument("vramguard::peers: url \"" + text + "\" has no host");
        url.host = rest;
        return url;
    }
    std::string origin() const { return scheme + "://" + host + ":" + std::to_string(port); }
    std::string host_port() const { return host + ":" + std::to_string(port); }
};

inline long long to_ms(Duration d) {
    return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

// ---- Resolving a host name within a deadline --------------------------------------------------

// "127.0.0.1", "::1" and "[::1]" need no resolver.
inline bool is_numeric_host(const std::string& host) {
    std::string bare = host;
    if (bare.size() > 2 && bare.front() == '[' && bare.back() == ']')
        bare = bare.substr(1, bare.size() - 2);
    unsigned char address[sizeof(in6_addr)];
    return ::inet_pton(AF_INET, bare.c_str(), address) == 1 ||
           ::inet_pton(AF_INET6, bare.c_str(), address) == 1;
}

// The system's resolver: an IPv4 address when the name has one (the services asked listen on
// 127.0.0.1 by default, and "localhost" may list ::1 first), else an IPv6 one; "" for none.
inline std::string resolve_with_getaddrinfo(const std::string& host) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || !found) return {};
    const addrinfo* chosen = nullptr;
    for (const addrinfo* entry = found; entry; entry = entry->ai_next) {
        if (entry->ai_family == AF_INET) {
            chosen = entry;
            break;
        }
        if (entry->ai_family == AF_INET6 && !chosen) chosen = entry;
    }
    char text[INET6_ADDRSTRLEN] = {};
    bool ok = false;
    if (chosen && chosen->ai_family == AF_INET)
        ok = ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(chosen->ai_addr)->sin_addr,
                         text, sizeof text) != nullptr;
    else if (chosen)
        ok = ::inet_ntop(AF_INET6,
                         &reinterpret_cast<const sockaddr_in6*>(chosen->ai_addr)->sin6_addr, text,
                         sizeof text) != nullptr;
    ::freeaddrinfo(found);
    return ok ? std::string(text) : std::string();
}

// A host's numeric address, or why there is none.
struct Resolved {
    std::string address;
    std::string error;
};

// `resolve(host)`, or the system's resolver when it is empty, on this thread; never throws.
inline Resolved resolve_now(const std::function<std::string(const std::string&)>& resolve,
                            const std::string& host) noexcept {
    Resolved result;
    try {
        result.address = resolve ? resolve(host) : resolve_with_getaddrinfo(host);
        if (result.address.empty()) result.error = "\"" + host + "\" does not resolve";
    } catch (const std::exception& error) {
        result.error = "resolving \"" + host + "\" failed: " + excerpt(error.what());
    } catch (...) {
        result.error = "resolving \"" + host + "\" failed";
    }
    return result;
}

// resolve_now() on a thread of its own, waited for at most `within`: a resolver still running then
// is left to finish alone (its thread owns copies of `resolve` and `host`).
inline Resolved resolve_within(const std::function<std::string(const std::string&)>& resolve,
                               const std::string& host, std::chrono::microseconds within) {
    std::optional<Resolved> resolved;
    try {
        const vramguard::detail::DetachedCall<Resolved> call(
            [resolve, host] { return resolve_now(resolve, host); });
        resolved = call.wait_for(within);
    } catch (const std::exception& error) {
        return {{}, "cannot start a thread to resolve \"" + host + "\": " + error.what()};
    }
    if (resolved) return std::move(*resolved);
    return {
        {},
        "resolving \"" + host + "\" took over " +
            std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(within).count()) +
            " ms"};
}

// What one HTTP call got: a status and a body, or why not.
struct HttpAnswer {
    int status = 0;
    std::string body;
    std::string error;  // network failure, timeout, HTTP error: a short reason
    bool ok() const noexcept { return error.empty(); }
};

// Why a body was refused before all of it was read.
enum class Refused { no, too_large, bad_length };

// The calls of one relieve(), all within one budget on the steady clock (a registry's injected
// clock may be a ManualClock that never moves: the network runs on real time). Each call ends by
// the budget's deadline, however the peer drips, and keeps at most max_peer_answer_bytes of body.
class HttpCalls {
   public:
    HttpCalls(const Url& url, const HttpPeerOptions& options, Duration budget)
        : url_(url),
          options_(options),
          budget_(budget),
          deadline_(std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(budget)) {}

    HttpAnswer get(const std::string& path) { return call("GET", path, nullptr); }
    HttpAnswer post(const std::string& path, const nlohmann::json& body) {
        return call("POST", path, &body);
    }
    HttpAnswer post(const std::string& path) {
        static const nlohmann::json no_body;
        return call("POST", path, &no_body);
    }
    bool time_left() const { return std::chrono::steady_clock::now() < deadline_; }

   private:
    HttpAnswer call(const char* method, const std::string& path, const nlohmann::json* body) {
        HttpAnswer answer;
        const auto started = std::chrono::steady_clock::now();
        httplib::Client client(url_.origin());
        answer.error = prepare(client, method, path);
        if (!answer.error.empty()) return answer;
        httplib::Request request = make_request(method, path, body);
        Refused refused = Refused::no;
        CallWatchdog::Cut cut = CallWatchdog::Cut::no;
        const httplib::Result result = [&] {
            CallWatchdog watchdog(deadline_);
            client.set_socket_options([&watchdog](socket_t fd) { watchdog.watch(fd); });
            request.response_handler = [&](const httplib::Response& response) {
                watchdog.headers_read();
                refused = length_refused(response);
                return refused == Refused::no;
            };
            request.content_receiver = [&](const char* data, std::size_t size, std::uint64_t,
                                           std::uint64_t) {
                if (size > protocol::max_peer_answer_bytes - answer.body.size()) {
                    refused = Refused::too_large;
                    return false;
                }
                answer.body.append(data, size);
                return true;
            };
            httplib::Result sent = client.send(request);
            client.set_socket_options(nullptr);  // it named the watchdog, which goes now
            cut = watchdog.cut();
            return sent;
        }();
        finish(answer, method, path, result, refused, cut, started);
        return answer;
    }

    // The answer's error, if any, from what the call got and why it may have been cut.
    void finish(HttpAnswer& answer, const char* method, const std::string& path,
                const httplib::Result& result, Refused refused, CallWatchdog::Cut cut,
                std::chrono::steady_clock::time_point started) const {
        const std::string what = std::string(method) + " " + path + ": ";
        if (cut == CallWatchdog::Cut::too_large) refused = Refused::too_large;
        if (refused != Refused::no || cut == CallWatchdog::Cut::headers_too_large) {
            answer.body.clear();
            answer.error =
                what + (refused == Refused::bad_length ? std::string("bad Content-Length")
                        : refused == Refused::too_large
                            ? "answer larger than " +
                                  std::to_string(protocol::max_peer_answer_bytes) + " bytes"
                            : "headers larger than " + std::to_string(protocol::max_header_bytes) +
                                  " bytes");
            return;
        }
        const auto now = std::chrono::steady_clock::now();
        if (!result) {
            // select() may wake a little before the deadline: a read that ran out of it is late.
            const bool late =
                cut == CallWatchdog::Cut::deadline || now >= deadline_ - (deadline_ - started) / 10;
            answer.error = what + failure_text(result.error(), late) + " after " +
                           std::to_string(to_ms(now - started)) + " ms";
            return;
        }
        answer.status = result->status;
        if (answer.status < 200 || answer.status > 299)
            answer.error =
                what + "HTTP " + std::to_string(answer.status) + error_message(answer.body);
    }

    httplib::Request make_request(const char* method, const std::string& path,
                                  const nlohmann::json* body) const {
        httplib::Request request;
        request.method = method;
        request.path = url_.prefix + path;
        if (body) {
            request.body = body->is_null() ? std::string() : body->dump();
            if (!request.body.empty()) request.set_header("Content-Type", "application/json");
        }
        return request;
    }

    // A declared Content-Length over the cap is refused before a byte of the body is read.
    static Refused length_refused(const httplib::Response& response) {
        if (!response.has_header("Content-Length")) return Refused::no;
        const std::string length = response.get_header_value("Content-Length");
        if (length.empty() || length.size() > 19 ||
            length.find_first_not_of("0123456789") != std::string::npos)
            return Refused::bad_length;
        return std::stoull(length) > protocol::max_peer_answer_bytes ? Refused::too_large
                                                                     : Refused::no;
    }

    std::chrono::microseconds time_left_from(std::chrono::steady_clock::time_point now) const {
        return std::chrono::duration_cast<std::chrono::microseconds>(deadline_ - now);
    }

    // Resolves the host within the time left (httplib's own lookup has no timeout) and bounds the
    // client's connect, write and read by what is left after: "", or why the call cannot be made.
    std::string prepare(httplib::Client& client, const char* method,
                        const std::string& path) const {
        if (time_left_from(std::chrono::steady_clock::now()).count() <= 0)
            return no_time_left(method, path);
        if (!client.is_valid()) return "cannot make a client for " + url_.origin();
        if (!is_numeric_host(url_.host)) {
            const Resolved resolved = resolve_within(
                options_.resolve, url_.host, time_left_from(std::chrono::steady_clock::now()));
            if (!resolved.error.empty())
                return std::string(method) + " " + path + ": " + resolved.error;
            client.set_hostname_addr_map({{url_.host, resolved.address}});
        }
        const auto left = time_left_from(std::chrono::steady_clock::now());
        if (left.count() <= 0) return no_time_left(method, path);
        client.set_connection_timeout(std::min<std::chrono::microseconds>(
            left, std::chrono::duration_cast<std::chrono::microseconds>(options_.connect_timeout)));
        client.set_read_timeout(left);
        client.set_write_timeout(left);
        client.set_keep_alive(false);
        client.set_follow_location(false);  // a redirect is an error answer, never followed
        if (!options_.bearer_token.empty()) client.set_bearer_token_auth(options_.bearer_token);
        return {};
    }

    std::string no_time_left(const char* method, const std::string& path) const {
        return "no time left for " + std::string(method) + " " + path + " (timeout " +
               std::to_string(to_ms(budget_)) + " ms)";
    }

    static std::string failure_text(httplib::Error error, bool out_of_time) {
        if (out_of_time) return "no answer in time";
        switch (error) {
            case httplib::Error::Connection: return "cannot connect";
            case httplib::Error::ConnectionTimeout: return "connect timed out";
            case httplib::Error::Read: return "connection closed without an answer";
            case httplib::Error::Write: return "could not send the request";
            case httplib::Error::SSLConnection:
            case httplib::Error::SSLServerVerification: return "TLS failed";
            default: return "failed (" + httplib::to_string(error) + ")";
        }
    }

    const Url& url_;
    const HttpPeerOptions& options_;
    const Duration budget_;
    const std::chrono::steady_clock::time_point deadline_;
};

}  // namespace detail

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
