// SPDX-License-Identifier: MIT
// The HTTP endpoints around one guarded encoder:
//   POST /encode          {"texts": [...]} -> {"embeddings": [[...]], "dim": D, "batches": n}
//   POST /request-unload  ?min_idle_seconds=N (default 30) -> the seeds' protocol: {"status":
//                         "ok"|"busy", "unloaded", "message", "idle_seconds"} and "result":
//                         unloaded | busy (idle s, leases) | not_loaded; loopback callers only,
//                         or with --unload-token as "Authorization: Bearer <token>"
//   GET  /status          model, device memory, what the guard learned, counters, peers
//   GET  /metrics         the same in the Prometheus text format (where prometheus-cpp is)
// Admission that says no is 503 with Retry-After, never 500: the client should come back later.
// Work that can never fit, even on an empty device, is not worth coming back for: a model larger
// than the device is 507 (the server's problem), an encode whose cheapest item cannot fit is 413
// (the request's), neither with Retry-After. A text too large to encode even alone is 413, naming
// it.
#pragma once

#include "encoder.hpp"
#include "limited_probe.hpp"
#include "metrics.hpp"
#include "unload_access.hpp"

#include <vramguard/vramguard.hpp>

#include <httplib.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <thread>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace torch_server {

using json = nlohmann::json;

struct ServerConfig {
    std::string device_name = "cpu";  // "cpu" or "cuda:N", for keys and /status
    torch::Device device{torch::kCPU};
    EncoderConfig encoder;
    // What to serve (--model: torchscript_encoder.hpp); none: the built-in encoder of `encoder`.
    std::optional<ModelSource> model;
    // Text -> ids (--tokenizer: sentencepiece_tokenizer.hpp); empty: the built-in tokenize().
    Tokenizer tokenizer;
    std::chrono::milliseconds idle_unload{std::chrono::minutes(5)};  // 0 = never
    std::string profile_dir;                                         // "" = vramguard's default
    std::size_t max_texts = 1024;                                    // per request
    // Fault injection for demos and tests: a batch whose padded tokens exceed this throws the
    // simulated out-of-memory error, as a device this size would. 0 = off.
    std::uint64_t simulate_oom_above_tokens = 0;
    vramguard::LogSink log = vramguard::stderr_sink(vramguard::Level::info);
    // POST /request-unload without min_idle_seconds: the seeds' protocol's 30 s, so a peer's bare
    // request never unloads a model that served a request a second ago.
    std::chrono::milliseconds default_min_idle{std::chrono::seconds(30)};
    // Lets remote callers use /request-unload ("Authorization: Bearer <token>"); "" = loopback
    // only.
    std::string unload_token;
    // Other services on the device, asked to free memory when the encoder does not fit (--peer).
    std::vector<std::shared_ptr<vramguard::Peer>> peers;
    // A request body larger than this is a 413 before it is read.
    std::size_t max_body_bytes = 64u << 20;
    // Simulated devices (--simulate-shared-device): the clock and sleep every wait goes through,
    // and what takes the model's bytes from the device while it is loaded (empty: nothing to take).
    vramguard::ClockFn clock;
    vramguard::SleepFn sleep;
    std::function<std::shared_ptr<void>(std::uint64_t bytes)> hold_device_bytes;
    // Tests: while this file exists (up to 60 s of real time), an /encode that holds its lease
    // waits before encoding, so a test can keep a request in flight for as long as it needs.
    std::string hold_encodes_while_file_exists;
};

namespace detail {

inline void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(body.dump(), "application/json");
}

inline void reply_error(httplib::Response& res, int status, const std::string& message) {
    reply(res, status, json{{"error", message}});
}

inline json to_json(const vramguard::MemoryInfo& memory) {
    return {{"free_bytes", memory.free_bytes},
            {"total_bytes", memory.total_bytes},
            {"free", vramguard::format_bytes(memory.free_bytes)},
            {"total", vramguard::format_bytes(memory.total_bytes)}};
}

inline json to_json(const vramguard::Stats& s) {
    return {{"calls", s.calls},
            {"ooms", s.ooms},
            {"retries", s.retries},
            {"halvings", s.halvings},
            {"single_item_calls", s.single_item_calls},
            {"rejections", s.rejections},
            {"waits", s.waits},
            {"grow_backs", s.grow_backs}};
}

inline json to_json(const vramguard::RegistryStats& s) {
    return {{"loads", s.loads},
            {"load_failures", s.load_failures},
            {"evictions", s.evictions},
            {"idle_unloads", s.idle_unloads},
            {"requested_unloads", s.requested_unloads},
            {"pressure_cache_releases", s.pressure_cache_releases},
            {"pressure_unloads", s.pressure_unloads},
            {"rejections", s.rejections},
            {"waits", s.waits},
            {"recoveries_seen", s.recoveries_seen},
            {"recoveries_trusted", s.recoveries_trusted},
            {"peer_requests", s.peer_requests},
            {"peer_reliefs", s.peer_reliefs}};
}

// The whole body, read here rather than by cpp-httplib: it caps a body sent as
// application/x-www-form-urlencoded (curl -d's and Python urllib's default) at 8 KB before any
// handler runs, and a JSON request is JSON whatever its Content-Type says. False when the read
// failed: cpp-httplib has set the status (413 over the payload limit, 400) and the error handler
// writes the body.
inline bool read_body(const httplib::Request& req, const httplib::ContentReader& content_reader,
                      std::string& body) {
    if (req.is_multipart_form_data()) return true;  // the handler says what to send instead
    return content_reader([&](const char* data, std::size_t size) {
        body.append(data, size);
        return true;
    });
}

// cpp-httplib's own errors (404, a 413 over the payload limit, a 400 for a POST without a body)
// come with an empty body: say in JSON what happened and what to send. Answers this server wrote
// already carry a body and are left alone.
inline httplib::Server::HandlerResponse explain_error(const httplib::Request& req,
                                                      httplib::Response& res,
                                                      std::size_t max_body_bytes) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string message;
    switch (res.status) {
        case 404:
            message = "no endpoint " + req.method + " " + req.path +
                      "; there are POST /encode, POST /request-unload, GET /status, GET /metrics";
            break;
        case 413:
            message = "the request body is larger than " + std::to_string(max_body_bytes) +
                      " bytes; send fewer texts per request, as JSON (Content-Type: "
                      "application/json)";
            break;
        case 400:
            message =
                "cpp-httplib could not read this request (a POST needs a body and its "
                "Content-Length: send {\"texts\": [...]} as Content-Type: application/json, "
                "or -d '' for an empty one)";
            break;
        default: message = "HTTP " + std::to_string(res.status); break;
    }
    res.set_content(json{{"error", message}}.dump(), "application/json");
    return httplib::Server::HandlerResponse::Handled;
}

inline const char* outcome_name(vramguard::UnloadOutcome outcome) {
    switch (outcome) {
        case vramguard::UnloadOutcome::unloaded: return "unloaded";
        case vramguard::UnloadOutcome::busy: return "busy";
        case vramguard::UnloadOutcome::not_loaded: return "not_loaded";
    }
    return "?";
}

// Retry-After is whole seconds (RFC 9110); round up so a client never comes back too early.
inline long long retry_after_seconds(std::chrono::milliseconds hint) {
    return std::max<long long>(1, (static_cast<long long>(hint.count()) + 999) / 1000);
}

}  // namespace detail

// One encoder behind a guard, a registry and an HTTP server. Probe is the guard's probe type
// (LimitedProbe<HostProbe> or LimitedProbe<torch::Probe>).
template <class Probe>
class Server {
   public:
    Server(Probe& probe, ServerConfig config)
        : config_(std::move(config)),
          model_(config_.model ? *config_.model : builtin_model(config_.encoder)),
          guard_(probe, guard_options(config_)),
          registry_(guard_, registry_options(config_)),
          load_key_(vramguard::Key::of("torch_server.load", key_params(model_, config_))),
          encode_key_(vramguard::Key::of("torch_server.encode", key_params(model_, config_))) {
        if (!config_.tokenizer)
            config_.tokenizer = [encoder = config_.encoder](std::string_view text) {
                return tokenize(text, encoder);
            };
        const ModelSource model = model_;
        const torch::Device device = config_.device;
        const auto hold = config_.hold_device_bytes;
        slot_ = registry_.template add<HeldEncoder>(
            "encoder", load_key_,
            [model, device, hold] {
                // On a simulated device the bytes are taken first, as an allocation would be: a
                // load that does not fit fails there, with vramguard's out-of-memory error.
                std::shared_ptr<void> held = hold ? hold(model.parameter_bytes) : nullptr;
                return std::make_unique<HeldEncoder>(model.load(device), model.dim,
                                                     model.padding_id, std::move(held));
            },
            model.declared_bytes);
    }

    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    void install(httplib::Server& http) {
        // Content-reader handlers: the body is read by the handler, not parsed as a form first.
        http.Post("/encode", [this](const httplib::Request& req, httplib::Response& res,
                                    const httplib::ContentReader& content_reader) {
            std::string body;
            if (!detail::read_body(req, content_reader, body)) return;
            handle_encode(req, body, res);
        });
        http.Post("/request-unload", [this](const httplib::Request& req, httplib::Response& res,
                                            const httplib::ContentReader& content_reader) {
            std::string body;
            if (!detail::read_body(req, content_reader, body)) return;
            handle_request_unload(req, body, res);
        });
        http.Get("/status",
                 [this](const httplib::Request&, httplib::Response& res) { handle_status(res); });
        http.Get("/metrics",
                 [this](const httplib::Request&, httplib::Response& res) { handle_metrics(res); });
        http.set_payload_max_length(config_.max_body_bytes);
        const std::size_t max_body = config_.max_body_bytes;
        http.set_error_handler(httplib::Server::HandlerWithResponse(
            [max_body](const httplib::Request& req, httplib::Response& res) {
                return detail::explain_error(req, res, max_body);
            }));
    }

    json status() {
        const vramguard::RegistryStatus registry = registry_.status();
        const vramguard::ModelStatus& model = registry.models.front();
        vramguard::Guard<Probe>& guard = guard_;
        json peers = json::array();
        for (const vramguard::PeerStatus& peer : registry.peers)
            peers.push_back({{"name", peer.name},
                             {"asked", peer.asked},
                             {"last_answer", peer.last_answer},
                             {"asked_ago_seconds", peer.asked_ago ? json(*peer.asked_ago) : json()},
                             {"cooldown_left_seconds", peer.cooldown_left_seconds}});
        const double idle_unload_seconds =
            std::chrono::duration<double>(config_.idle_unload).count();
        return {
            // The seeds' /status fields, for services written to that protocol.
            {"model_loaded", model.loaded},
            {"auto_unload_enabled", config_.idle_unload.count() > 0},
            {"auto_unload_minutes", idle_unload_seconds / 60},
            {"model",
             {{"name", model.name},
              {"key", model.key},
              {"state", vramguard::to_string(model.state)},
              {"loaded", model.loaded},
              {"bytes", model.bytes},
              {"declared_bytes",
               model_.declared_bytes ? json(*model_.declared_bytes) : json(nullptr)},
              {"source", model_.description},
              {"idle_seconds", model.idle_seconds},
              {"leases", model.leases},
              {"dim", model_.dim},
              {"idle_unload_seconds", idle_unload_seconds}}},
            {"device",
             {{"name", config_.device_name},
              {"memory", detail::to_json(registry.memory)},
              {"limit_bytes", guard.probe().limit() ? json(*guard.probe().limit()) : json(nullptr)},
              {"simulated_other_process_bytes", guard.probe().other_process_bytes()}}},
            {"encode",
             {{"key", encode_key_.hex()},
              {"learned_batch_ceiling", guard.learned_batch_ceiling(encode_key_)},
              {"learned_weight_budget", guard.learned_weight_budget(encode_key_)},
              {"weight", "padded tokens"}}},
            {"guard", detail::to_json(guard_.stats())},
            {"registry", detail::to_json(registry.stats)},
            {"peers", std::move(peers)},
            {"unload_requests", unload_answers_json()},
            {"requests",
             {{"encode", encode_requests_.load()},
              {"texts", texts_encoded_.load()},
              {"rejected_503", rejected_.load()},
              {"bad_request_400", bad_requests_.load()},
              {"oom_413", exhausted_.load()},
              {"never_fits_507", never_fits_.load()},
              {"failed_500", failed_.load()}}},
        };
    }

   private:
    static vramguard::Options guard_options(const ServerConfig& config) {
        vramguard::Options options;
        options.profile_dir = config.profile_dir;
        options.log = config.log;
        if (config.clock) options.clock = config.clock;
        if (config.sleep) options.sleep = config.sleep;
        return options;
    }
    static vramguard::RegistryOptions registry_options(const ServerConfig& config) {
        vramguard::RegistryOptions options;
        options.max_loaded_models = 1;
        options.idle_timeout = config.idle_unload;
        options.reaper = config.idle_unload.count() > 0;
        options.peers = config.peers;  // the peer_cooldown default (30 s): no ping-pong
        return options;
    }
    // Keys must not change between runs for the same model and device: profiles are kept under
    // them.
    static std::vector<std::pair<std::string, std::string>> key_params(const ModelSource& model,
                                                                       const ServerConfig& config) {
        auto params = model.key_params;
        params.emplace_back("device", config.device_name);
        return params;
    }

    // Parses {"texts": [string, ...]}; on a bad body answers 400 and returns nothing.
    std::optional<std::vector<std::string>> parse_texts(const httplib::Request& req,
                                                        const std::string& text,
                                                        httplib::Response& res) {
        auto bad = [&](const std::string& message) {
            bad_requests_.fetch_add(1, std::memory_order_relaxed);
            detail::reply_error(res, 400, message);
            return std::nullopt;
        };
        if (req.is_multipart_form_data())
            return bad(
                "send the texts as JSON, {\"texts\": [...]} with Content-Type: "
                "application/json, not as a multipart form");
        json body;
        try {
            body = json::parse(text);
        } catch (const json::parse_error& e) {
            return bad(std::string("malformed JSON: ") + e.what());
        }
        if (!body.is_object()) return bad("the body must be a JSON object: {\"texts\": [...]}");
        const auto texts = body.find("texts");
        if (texts == body.end()) return bad("missing field \"texts\" (an array of strings)");
        if (!texts->is_array()) return bad("\"texts\" must be an array of strings");
        if (texts->size() > config_.max_texts)
            return bad("too many texts: " + std::to_string(texts->size()) + " (at most " +
                       std::to_string(config_.max_texts) + " per request)");
        std::vector<std::string> result;
        result.reserve(texts->size());
        for (std::size_t i = 0; i < texts->size(); ++i) {
            const json& text = (*texts)[i];
            if (!text.is_string())
                return bad("texts[" + std::to_string(i) + "] is " + text.type_name() +
                           ", not a string");
            result.push_back(text.get<std::string>());
        }
        return result;
    }

    void handle_encode(const httplib::Request& req, const std::string& body,
                       httplib::Response& res) {
        encode_requests_.fetch_add(1, std::memory_order_relaxed);
        const auto texts = parse_texts(req, body, res);
        if (!texts) return;
        if (texts->empty()) {
            encoded_ok_.fetch_add(1, std::memory_order_relaxed);
            detail::reply(res, 200,
                          json{{"embeddings", json::array()}, {"dim", model_.dim}, {"batches", 0}});
            return;
        }
        std::vector<Tokens> tokens;
        tokens.reserve(texts->size());
        for (const std::string& text : *texts) tokens.push_back(config_.tokenizer(text));

        bool loaded = false;  // past the load: an InsufficientMemory now is the encode's
        try {
            // The lease keeps the model loaded for this request: request-unload and the idle
            // reaper answer "busy" until it ends.
            vramguard::Lease<HeldEncoder> model = slot_->acquire();
            loaded = true;
            hold_while_file_exists();
            std::atomic<unsigned> batches{0};
            const std::uint64_t oom_above = config_.simulate_oom_above_tokens;
            std::vector<Embedding> embeddings = guard_.encode(
                encode_key_, tokens,
                [&](const auto& batch) {
                    batches.fetch_add(1, std::memory_order_relaxed);
                    if (oom_above > 0) {
                        std::size_t longest = 0;
                        for (const Tokens& t : batch) longest = std::max(longest, t.size());
                        const std::uint64_t padded = longest * batch.size();
                        if (padded > oom_above)
                            throw vramguard::OutOfMemory(
                                "simulated out of memory: a batch of " +
                                std::to_string(batch.size()) + " texts padded to " +
                                std::to_string(longest) + " tokens (" + std::to_string(padded) +
                                " > --simulate-oom-above-tokens " + std::to_string(oom_above) +
                                ")");
                    }
                    return model->encode(batch);
                },
                vramguard::padded(
                    [](const Tokens& t) { return static_cast<std::uint64_t>(t.size()); }));
            texts_encoded_.fetch_add(texts->size(), std::memory_order_relaxed);
            encoded_ok_.fetch_add(1, std::memory_order_relaxed);
            detail::reply(res, 200,
                          json{{"embeddings", std::move(embeddings)},
                               {"dim", model->dim()},
                               {"batches", batches.load()}});
        } catch (const vramguard::InsufficientMemory& e) {
            json body{{"error", e.what()},
                      {"required_bytes", e.required()},
                      {"available_bytes", e.available()},
                      {"total_bytes", e.total()},
                      {"can_never_fit", e.can_never_fit()}};
            if (e.can_never_fit()) {
                // More than the whole device: a retry would get the same answer, so no
                // Retry-After. The model is this server's problem (507); the request is the
                // client's (413).
                (loaded ? exhausted_ : never_fits_).fetch_add(1, std::memory_order_relaxed);
                detail::reply(res, loaded ? 413 : 507, body);
                return;
            }
            rejected_.fetch_add(1, std::memory_order_relaxed);
            const long long retry = detail::retry_after_seconds(e.retry_after());
            res.set_header("Retry-After", std::to_string(retry));
            body["retry_after_seconds"] = retry;
            detail::reply(res, 503, body);
        } catch (const vramguard::OomExhausted& e) {
            json body{{"error", e.what()}, {"attempts", e.attempts()}};
            if (e.item_index()) {
                // One text does not fit even alone: this request can never succeed here.
                exhausted_.fetch_add(1, std::memory_order_relaxed);
                body["item_index"] = *e.item_index();
                detail::reply(res, 413, body);
            } else {
                // The load ran out of memory on every attempt: the device is busy, come back.
                rejected_.fetch_add(1, std::memory_order_relaxed);
                const long long retry = detail::retry_after_seconds(guard_.options().retry_delay);
                res.set_header("Retry-After", std::to_string(retry));
                body["retry_after_seconds"] = retry;
                detail::reply(res, 503, body);
            }
        } catch (const c10::Error& e) {
            failed_.fetch_add(1, std::memory_order_relaxed);
            detail::reply_error(res, 500, e.what_without_backtrace());
        } catch (const std::exception& e) {
            failed_.fetch_add(1, std::memory_order_relaxed);
            detail::reply_error(res, 500, e.what());
        }
    }

    // A number of seconds, or bytes, from a query parameter or the JSON body; the query wins.
    // Answers 400 and returns false when it is there but not a number >= 0 (and <= `max`).
    static bool read_number(const httplib::Request& req, const json& body, const char* name,
                            double max, std::optional<double>& value, std::string& error) {
        if (req.has_param(name)) {
            const std::string text = req.get_param_value(name);
            std::size_t used = 0;
            double number = 0;
            try {
                number = std::stod(text, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            if (used != text.size() || !std::isfinite(number) || number < 0 || number > max) {
                error = std::string(name) + " must be a number >= 0, got \"" + text + "\"";
                return false;
            }
            value = number;
            return true;
        }
        const auto field = body.is_object() ? body.find(name) : body.end();
        if (!body.is_object() || field == body.end() || field->is_null()) return true;
        if (!field->is_number() || !std::isfinite(field->get<double>()) ||
            field->get<double>() < 0 || field->get<double>() > max) {
            error = std::string(name) + " must be a number >= 0, got " + field->dump();
            return false;
        }
        value = field->get<double>();
        return true;
    }

    // The seeds' protocol: {"status": "ok"|"busy", "unloaded", "message", "idle_seconds"}, with
    // this server's own fields besides ("result", "freed_bytes", "leases", "min_idle_seconds",
    // "loading"). Only this server's model is unloaded: a request is never passed on to its peers.
    void handle_request_unload(const httplib::Request& req, const std::string& text,
                               httplib::Response& res) {
        const UnloadAccess access = decide_unload_access(req.remote_addr, config_.unload_token,
                                                         req.get_header_value("Authorization"));
        if (!access.allowed) {
            unload_refused_.fetch_add(1, std::memory_order_relaxed);
            if (access.status == 401) res.set_header("WWW-Authenticate", "Bearer");
            detail::reply(res, access.status,
                          json{{"status", "refused"},
                               {"unloaded", false},
                               {"message", access.reason},
                               {"error", access.reason}});
            return;
        }
        auto bad = [&](const std::string& message) {
            unload_bad_.fetch_add(1, std::memory_order_relaxed);
            bad_requests_.fetch_add(1, std::memory_order_relaxed);
            detail::reply_error(res, 400, message);
        };
        json body = json::object();
        if (text.find_first_not_of(" \t\r\n") != std::string::npos) {
            body = json::parse(text, nullptr, false);
            if (!body.is_object())
                return bad(
                    "the body must be empty or a JSON object ({\"min_idle_seconds\": 30, "
                    "\"wanted_bytes\": N}); parameters also go in the query string");
        }
        std::optional<double> min_idle_seconds, wanted;
        std::string error;
        if (!read_number(req, body, "min_idle_seconds", 1e9, min_idle_seconds, error) ||
            !read_number(req, body, "wanted_bytes", 1.8e19, wanted, error))
            return bad(error);
        const double min_idle = min_idle_seconds.value_or(
            std::chrono::duration<double>(config_.default_min_idle).count());
        const auto min_idle_duration = std::chrono::duration_cast<vramguard::Duration>(
            std::chrono::duration<double>(min_idle));
        const std::uint64_t wanted_bytes = wanted ? static_cast<std::uint64_t>(*wanted)
                                                  : std::numeric_limits<std::uint64_t>::max();

        // The registry-wide form: busy (loading) while this server loads its own model, so two
        // servers asking each other do not trade the device back and forth.
        const vramguard::UnloadResult result =
            registry_.request_unload(min_idle_duration, wanted_bytes);
        json answer{{"status", result.busy() ? "busy" : "ok"},
                    {"unloaded", result.unloaded()},
                    {"idle_seconds", result.idle_seconds},
                    {"result", detail::outcome_name(result.outcome)},
                    {"min_idle_seconds", min_idle},
                    {"leases", result.leases},
                    {"loading", result.loading},
                    {"freed_bytes", result.unloaded() ? result.bytes : 0}};
        char idle[64];
        std::snprintf(idle, sizeof idle, "%.1f s", result.idle_seconds);
        if (result.unloaded()) {
            unload_unloaded_.fetch_add(1, std::memory_order_relaxed);
            answer["message"] = "unloaded model 'encoder' (" +
                                vramguard::format_bytes(result.bytes) + "), idle " + idle;
        } else if (result.busy()) {
            unload_busy_.fetch_add(1, std::memory_order_relaxed);
            char asked[64];
            std::snprintf(asked, sizeof asked, "%g s", min_idle);
            answer["message"] =
                result.loading ? std::string("busy: loading its model")
                : result.leases > 0
                    ? "busy: " + std::to_string(result.leases) + " request(s) in flight"
                    : std::string("busy: idle ") + idle + ", less than the " + asked + " asked for";
        } else {
            unload_not_loaded_.fetch_add(1, std::memory_order_relaxed);
            answer["message"] = "no model loaded";
        }
        detail::reply(res, 200, answer);
    }

    std::vector<std::pair<std::string, std::uint64_t>> unload_answers() const {
        return {{"unloaded", unload_unloaded_.load()},
                {"busy", unload_busy_.load()},
                {"not_loaded", unload_not_loaded_.load()},
                {"refused", unload_refused_.load()},
                {"bad_request", unload_bad_.load()}};
    }
    json unload_answers_json() const {
        json answers = json::object();
        for (const auto& [answer, count] : unload_answers()) answers[answer] = count;
        return answers;
    }

    void handle_metrics(httplib::Response& res) {
#if TORCH_SERVER_HAS_PROMETHEUS
        try {
            MetricsSnapshot snapshot;
            snapshot.registry = registry_.status();
            snapshot.guard = guard_.stats();
            snapshot.device = config_.device_name;
            snapshot.encode_key = encode_key_.hex();
            snapshot.learned_weight_budget = guard_.learned_weight_budget(encode_key_);
            snapshot.learned_batch_ceiling = guard_.learned_batch_ceiling(encode_key_);
            snapshot.requests = {{"ok", encoded_ok_.load()},
                                 {"rejected_503", rejected_.load()},
                                 {"bad_request_400", bad_requests_.load() - unload_bad_.load()},
                                 {"oom_413", exhausted_.load()},
                                 {"never_fits_507", never_fits_.load()},
                                 {"failed_500", failed_.load()}};
            snapshot.unload_answers = unload_answers();
            res.status = 200;
            res.set_content(render_metrics(snapshot), "text/plain; version=0.0.4; charset=utf-8");
        } catch (const std::exception& e) {
            detail::reply_error(res, 500, e.what());
        }
#else
        detail::reply_error(res, 404,
                            "/metrics needs prometheus-cpp (Debian: prometheus-cpp-dev), which "
                            "this build of torch_server did not find");
#endif
    }

    void hold_while_file_exists() const {
        const std::string& path = config_.hold_encodes_while_file_exists;
        if (path.empty()) return;
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (::access(path.c_str(), F_OK) == 0 && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }

    void handle_status(httplib::Response& res) {
        try {
            detail::reply(res, 200, status());
        } catch (const std::exception& e) {
            detail::reply_error(res, 500, e.what());
        }
    }

    ServerConfig config_;
    ModelSource model_;  // what the registry loads
    vramguard::Guard<Probe> guard_;
    vramguard::ModelRegistry<Probe> registry_;  // after the guard: destroyed first
    vramguard::Key load_key_;
    vramguard::Key encode_key_;
    std::shared_ptr<vramguard::ModelSlot<HeldEncoder>> slot_;
    std::atomic<std::uint64_t> encode_requests_{0}, texts_encoded_{0}, rejected_{0},
        bad_requests_{0}, exhausted_{0}, never_fits_{0}, failed_{0}, encoded_ok_{0};
    // POST /request-unload answers: unloaded, busy, not_loaded, refused (401/403), bad (400).
    std::atomic<std::uint64_t> unload_unloaded_{0}, unload_busy_{0}, unload_not_loaded_{0},
        unload_refused_{0}, unload_bad_{0};
};

}  // namespace torch_server
