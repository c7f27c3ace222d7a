// SPDX-License-Identifier: MIT
// The HTTP endpoints around one guarded encoder:
//   POST /encode          {"texts": [...]} -> {"embeddings": [[...]], "dim": D, "batches": n}
//   POST /request-unload  ?min_idle_seconds=N -> unloaded | busy (idle s, leases) | not_loaded
//   GET  /status          model, device memory, what the guard learned, counters
// Admission that says no is 503 with Retry-After, never 500: the client should come back later.
// Work that can never fit, even on an empty device, is not worth coming back for: a model larger
// than the device is 507 (the server's problem), an encode whose cheapest item cannot fit is 413
// (the request's), neither with Retry-After. A text too large to encode even alone is 413, naming
// it.
#pragma once

#include "encoder.hpp"
#include "limited_probe.hpp"

#include <vramguard/vramguard.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
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
    std::chrono::milliseconds idle_unload{std::chrono::minutes(5)};  // 0 = never
    std::string profile_dir;                                         // "" = vramguard's default
    std::size_t max_texts = 1024;                                    // per request
    // Fault injection for demos and tests: a batch whose padded tokens exceed this throws the
    // simulated out-of-memory error, as a device this size would. 0 = off.
    std::uint64_t simulate_oom_above_tokens = 0;
    vramguard::LogSink log = vramguard::stderr_sink(vramguard::Level::info);
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
            {"waits", s.waits}};
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
          guard_(probe, guard_options(config_)),
          registry_(guard_, registry_options(config_)),
          load_key_(vramguard::Key::of("torch_server.load", key_params(config_))),
          encode_key_(vramguard::Key::of("torch_server.encode", key_params(config_))) {
        const EncoderConfig encoder = config_.encoder;
        const torch::Device device = config_.device;
        slot_ = registry_.template add<EncoderModel>(
            "encoder", load_key_,
            [encoder, device] { return std::make_unique<EncoderModel>(encoder, device); },
            EncoderModel::parameter_bytes(encoder));
    }

    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    void install(httplib::Server& http) {
        http.Post("/encode", [this](const httplib::Request& req, httplib::Response& res) {
            handle_encode(req, res);
        });
        http.Post("/request-unload", [this](const httplib::Request& req, httplib::Response& res) {
            handle_request_unload(req, res);
        });
        http.Get("/status",
                 [this](const httplib::Request&, httplib::Response& res) { handle_status(res); });
    }

    json status() {
        const vramguard::RegistryStatus registry = registry_.status();
        const vramguard::ModelStatus& model = registry.models.front();
        vramguard::Guard<Probe>& guard = guard_;
        return {
            {"model",
             {{"name", model.name},
              {"key", model.key},
              {"state", vramguard::to_string(model.state)},
              {"loaded", model.loaded},
              {"bytes", model.bytes},
              {"declared_bytes", EncoderModel::parameter_bytes(config_.encoder)},
              {"idle_seconds", model.idle_seconds},
              {"leases", model.leases},
              {"dim", config_.encoder.dim},
              {"idle_unload_seconds", std::chrono::duration<double>(config_.idle_unload).count()}}},
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
        return options;
    }
    static vramguard::RegistryOptions registry_options(const ServerConfig& config) {
        vramguard::RegistryOptions options;
        options.max_loaded_models = 1;
        options.idle_timeout = config.idle_unload;
        options.reaper = config.idle_unload.count() > 0;
        return options;
    }
    // Keys must not change between runs for the same model and device: profiles are kept under
    // them.
    static std::vector<std::pair<std::string, std::string>> key_params(const ServerConfig& config) {
        return {{"model", "toy-encoder"},
                {"dim", std::to_string(config.encoder.dim)},
                {"layers", std::to_string(config.encoder.layers)},
                {"device", config.device_name}};
    }

    // Parses {"texts": [string, ...]}; on a bad body answers 400 and returns nothing.
    std::optional<std::vector<std::string>> parse_texts(const httplib::Request& req,
                                                        httplib::Response& res) {
        auto bad = [&](const std::string& message) {
            bad_requests_.fetch_add(1, std::memory_order_relaxed);
            detail::reply_error(res, 400, message);
            return std::nullopt;
        };
        json body;
        try {
            body = json::parse(req.body);
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

    void handle_encode(const httplib::Request& req, httplib::Response& res) {
        encode_requests_.fetch_add(1, std::memory_order_relaxed);
        const auto texts = parse_texts(req, res);
        if (!texts) return;
        if (texts->empty()) {
            detail::reply(
                res, 200,
                json{{"embeddings", json::array()}, {"dim", config_.encoder.dim}, {"batches", 0}});
            return;
        }
        std::vector<Tokens> tokens;
        tokens.reserve(texts->size());
        for (const std::string& text : *texts) tokens.push_back(tokenize(text, config_.encoder));

        bool loaded = false;  // past the load: an InsufficientMemory now is the encode's
        try {
            // The lease keeps the model loaded for this request: request-unload and the idle
            // reaper answer "busy" until it ends.
            vramguard::Lease<EncoderModel> model = slot_->acquire();
            loaded = true;
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

    void handle_request_unload(const httplib::Request& req, httplib::Response& res) {
        double min_idle = 0;
        if (req.has_param("min_idle_seconds")) {
            const std::string text = req.get_param_value("min_idle_seconds");
            std::size_t used = 0;
            try {
                min_idle = std::stod(text, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            if (used != text.size() || !std::isfinite(min_idle) || min_idle < 0 || min_idle > 1e9) {
                bad_requests_.fetch_add(1, std::memory_order_relaxed);
                detail::reply_error(
                    res, 400,
                    "min_idle_seconds must be a number of seconds >= 0, got \"" + text + "\"");
                return;
            }
        }
        const auto min_idle_duration = std::chrono::duration_cast<vramguard::Duration>(
            std::chrono::duration<double>(min_idle));
        const vramguard::UnloadResult result = slot_->request_unload(min_idle_duration);
        json body{{"result", detail::outcome_name(result.outcome)}};
        if (result.busy()) {
            body["idle_seconds"] = result.idle_seconds;
            body["leases"] = result.leases;
            body["min_idle_seconds"] = min_idle;
        } else if (result.unloaded()) {
            body["idle_seconds"] = result.idle_seconds;
            body["freed_bytes"] = result.bytes;
        }
        detail::reply(res, 200, body);
    }

    void handle_status(httplib::Response& res) {
        try {
            detail::reply(res, 200, status());
        } catch (const std::exception& e) {
            detail::reply_error(res, 500, e.what());
        }
    }

    ServerConfig config_;
    vramguard::Guard<Probe> guard_;
    vramguard::ModelRegistry<Probe> registry_;  // after the guard: destroyed first
    vramguard::Key load_key_;
    vramguard::Key encode_key_;
    std::shared_ptr<vramguard::ModelSlot<EncoderModel>> slot_;
    std::atomic<std::uint64_t> encode_requests_{0}, texts_encoded_{0}, rejected_{0},
        bad_requests_{0}, exhausted_{0}, never_fits_{0}, failed_{0};
};

}  // namespace torch_server
