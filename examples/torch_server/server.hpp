// SPDX-License-Identifier: MIT
// The HTTP endpoints around one guarded encoder:
//   POST /encode          {"texts": [...]} -> {"embeddings": [[...]], "dim": D, "batches": n}
//   POST /request-unload  ?min_idle_seconds=N (default 30) -> the seeds' protocol: {"status":
//                         "ok"|"busy", "unloaded", "message", "idle_seconds"} and "result":
//                         unloaded | busy (idle s, leases) | not_loaded; loopback callers only,
//                         or with --unload-token as "Authorization: Bearer <token>"
//   GET  /status          model, device memory, what the guard learned, counters, peers
//   GET  /metrics         the same in the Prometheus text format (where prometheus-cpp is)
// /encode runs every request's texts through one vramguard::Batcher (batching.hpp), or each
// request alone through Guard::encode with --batching per-request.
// Admission that says no is 503 with Retry-After, never 500: the client should come back later;
// so is the batcher's full queue (--max-queued-items) and a passed --encode-deadline-seconds.
// Work that can never fit, even on an empty device, is not worth coming back for: a model larger
// than the device is 507 (the server's problem), an encode whose cheapest item cannot fit is 413
// (the request's), neither with Retry-After. A text too large to encode even alone is 413, naming
// it.
// What reaches these endpoints passed http_front.hpp's checks (framing, Origin, access, UTF-8,
// JSON depth, numbers), over connections.hpp's rules (a thread per connection up to a cap,
// deadlines): hostile requests are answered there, with a JSON error, before the model is involved.
#pragma once

#include "batching.hpp"
#include "encoder.hpp"
#include "http_front.hpp"
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
    // On a simulated device (hold_device_bytes): what each batch takes from it while it runs, its
    // activations, bytes_per_batch + bytes_per_token x its padded tokens. The probe sees them, as
    // it sees a real device's, so the guard learns them. 0 and 0 = nothing.
    std::uint64_t simulate_bytes_per_batch = 0;
    std::uint64_t simulate_bytes_per_token = 0;
    // How /encode runs its texts (batching.hpp): one Batcher for every request (default), or one
    // Guard::encode per request.
    Batching batching = Batching::batcher;
    // The batcher's queue bound: a request that would queue more texts beside the queued ones is
    // a 503 with Retry-After (vramguard::Overloaded). A request alone is always queued.
    std::size_t max_queued_items = 4096;
    // A request gives up after this long in the batcher (on the guard's clock): 503 with
    // Retry-After. 0 = never.
    std::chrono::milliseconds encode_deadline{0};
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
    // Tests: while this file exists (up to 60 s of real time), a batch waits before it runs (its
    // request holds the lease, its activations are taken), so a test can keep a request in flight,
    // and the batcher busy, for as long as it needs.
    std::string hold_encodes_while_file_exists;
};

namespace wire {

inline json to_json(const vramguard::MemoryInfo& memory) {
    return {{"free_bytes", memory.free_bytes},
            {"total_bytes", memory.total_bytes},
            {"free", vramguard::format_bytes(memory.free_bytes)},
            {"total", vramguard::format_bytes(memory.total_bytes)}};
}

// Every counter of vramguard::Stats or RegistryStats, as vramguard::for_each_counter lists them
// (the same list /metrics shows).
template <class Counters>
inline json counters_json(const Counters& counters) {
    json out = json::object();
    vramguard::for_each_counter(counters, [&out](const char* name, const char*,
                                                 std::uint64_t value) { out[name] = value; });
    return out;
}
inline json to_json(const vramguard::Stats& s) { return counters_json(s); }
inline json to_json(const vramguard::RegistryStats& s) { return counters_json(s); }

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

}  // namespace wire

// One encoder behind a guard, a registry and an HTTP server. Probe is the guard's probe type
// (LimitedProbe<HostProbe> or LimitedProbe<torch::Probe>).
template <class Probe>
class Server : public Endpoints {
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
        if (config_.batching == Batching::batcher) {
            vramguard::BatcherOptions options;
            options.max_queued_items = config_.max_queued_items;
            batcher_.emplace(guard_, encode_key_, RunQueued{this},
                             vramguard::padded(TokensOfQueued{}), options);
        }
    }

    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    // The routes and the request checks (http_front.hpp) in front of this server's endpoints.
    void install(HardenedServer& http) {
        FrontConfig front;
        front.max_body_bytes = config_.max_body_bytes;
        front.max_texts = config_.max_texts;
        front.unload_token = config_.unload_token;
        front.default_min_idle = config_.default_min_idle;
        install_routes(http, *this, front);
        http_ = &http;
    }

    json status() override {
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
        // The reference's types: whole minutes (rounded up: the model never stays longer than
        // it says), and idle_seconds a number only while a model is loaded.
        const long long idle_unload_minutes =
            (std::chrono::ceil<std::chrono::seconds>(config_.idle_unload).count() + 59) / 60;
        json connections = json::object();
        if (http_ != nullptr) {
            const ConnectionStats c = http_->stats();
            connections = {{"open", c.open},
                           {"max", c.max},
                           {"refused_503", c.refused_503},
                           {"late_408", c.late_408}};
        }
        return {
            // The seeds' /status fields, for services written to that protocol.
            {"status", "ok"},
            {"model_loaded", model.loaded},
            {"idle_seconds", model.loaded ? json(model.idle_seconds) : json(nullptr)},
            {"auto_unload_enabled", config_.idle_unload.count() > 0},
            {"auto_unload_minutes", idle_unload_minutes},
            {"connections", std::move(connections)},
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
              {"memory", wire::to_json(registry.memory)},
              {"limit_bytes", guard.probe().limit() ? json(*guard.probe().limit()) : json(nullptr)},
              {"simulated_other_process_bytes", guard.probe().other_process_bytes()}}},
            {"encode",
             {{"key", encode_key_.hex()},
              {"learned_batch_ceiling", guard.learned_batch_ceiling(encode_key_)},
              {"learned_weight_budget", guard.learned_weight_budget(encode_key_)},
              {"weight", "padded tokens"}}},
            {"batching", batching_json()},
            {"guard", wire::to_json(guard_.stats())},
            {"registry", wire::to_json(registry.stats)},
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

    // Endpoints: the request passed http_front.hpp's checks.
    void on_encode_request() override { encode_requests_.fetch_add(1, std::memory_order_relaxed); }
    void on_bad_request(bool unload) override {
        bad_requests_.fetch_add(1, std::memory_order_relaxed);
        if (unload) unload_bad_.fetch_add(1, std::memory_order_relaxed);
    }
    void on_unload_refused() override { unload_refused_.fetch_add(1, std::memory_order_relaxed); }

    void encode(std::vector<std::string> texts, httplib::Response& res) override {
        if (texts.empty()) {
            encoded_ok_.fetch_add(1, std::memory_order_relaxed);
            wire::reply(res, 200,
                        json{{"embeddings", json::array()}, {"dim", model_.dim}, {"batches", 0}});
            return;
        }
        std::vector<Tokens> tokens;
        tokens.reserve(texts.size());
        for (const std::string& text : texts) tokens.push_back(config_.tokenizer(text));

        bool loaded = false;  // past the load: an InsufficientMemory now is the encode's
        try {
            // The lease keeps the model loaded for this request: request-unload and the idle
            // reaper answer "busy" until it ends.
            vramguard::Lease<HeldEncoder> model = slot_->acquire();
            loaded = true;
            const std::int64_t dim = model->dim();
            unsigned batches = 0;
            std::vector<Embedding> embeddings =
                batcher_ ? encode_in_batcher(std::move(tokens), std::move(model), batches)
                         : encode_alone(tokens, *model, batches);
            texts_encoded_.fetch_add(texts.size(), std::memory_order_relaxed);
            encoded_ok_.fetch_add(1, std::memory_order_relaxed);
            wire::reply(
                res, 200,
                json{{"embeddings", std::move(embeddings)}, {"dim", dim}, {"batches", batches}});
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
                wire::reply(res, loaded ? 413 : 507, body);
                return;
            }
            reply_come_back(res, std::move(body), e.retry_after());
        } catch (const vramguard::OomExhausted& e) {
            json body{{"error", e.what()}, {"attempts", e.attempts()}};
            if (e.item_index()) {
                // One text does not fit even alone: this request can never succeed here.
                exhausted_.fetch_add(1, std::memory_order_relaxed);
                body["item_index"] = *e.item_index();
                wire::reply(res, 413, body);
            } else {
                // The load ran out of memory on every attempt: the device is busy, come back.
                reply_come_back(res, std::move(body), guard_.options().retry_delay);
            }
        } catch (const vramguard::Overloaded& e) {
            // The batcher's queue is full: come back when what is queued has likely run.
            reply_come_back(res, json{{"error", e.what()}, {"queue_full", true}}, e.retry_after());
        } catch (const vramguard::DeadlinePassed& e) {
            // --encode-deadline-seconds: the texts waited too long behind others'; the device is
            // busy, not broken, so 503 (not 504) with the guard's retry delay.
            reply_come_back(res, json{{"error", e.what()}, {"deadline_passed", true}},
                            guard_.options().retry_delay);
        } catch (const vramguard::BatcherClosed& e) {
            // The server is stopping; another instance may answer.
            reply_come_back(res, json{{"error", e.what()}}, guard_.options().retry_delay);
        } catch (const c10::Error& e) {
            failed_.fetch_add(1, std::memory_order_relaxed);
            wire::reply_error(res, 500, e.what_without_backtrace());
        } catch (const std::exception& e) {
            failed_.fetch_add(1, std::memory_order_relaxed);
            wire::reply_error(res, 500, e.what());
        }
    }

    // 503 with Retry-After (whole seconds, rounded up, at least 1) in the header and the body.
    void reply_come_back(httplib::Response& res, json body, std::chrono::milliseconds after) {
        rejected_.fetch_add(1, std::memory_order_relaxed);
        const long long retry = wire::retry_after_seconds(after);
        res.set_header("Retry-After", std::to_string(retry));
        body["retry_after_seconds"] = retry;
        wire::reply(res, 503, body);
    }

    // --batching per-request: this request's texts alone, through Guard::encode.
    std::vector<Embedding> encode_alone(const std::vector<Tokens>& tokens, HeldEncoder& model,
                                        unsigned& batches) {
        return guard_.encode(
            encode_key_, tokens,
            [&](const auto& batch) {
                ++batches;  // batches of one request run one after another
                return run_batch(model, batch);
            },
            vramguard::padded(
                [](const Tokens& t) { return static_cast<std::uint64_t>(t.size()); }));
    }

    // --batching batcher: this request's texts queued with every other request's; they hold the
    // lease until they have run (QueuedRequest).
    std::vector<Embedding> encode_in_batcher(std::vector<Tokens> tokens,
                                             vramguard::Lease<HeldEncoder> model,
                                             unsigned& batches) {
        auto request = std::make_shared<QueuedRequest>(std::move(model));
        std::vector<QueuedText> queued;
        queued.reserve(tokens.size());
        for (Tokens& t : tokens) queued.push_back({std::move(t), request});
        vramguard::EncodeOptions call;
        if (config_.encode_deadline.count() > 0)
            call.deadline = guard_.options().clock() + config_.encode_deadline;
        std::vector<Embedding> embeddings;
        try {
            embeddings = batcher_->encode(std::move(queued), call);
        } catch (const vramguard::DeadlinePassed&) {
            throw;  // its texts may be running: they keep the lease until they end
        } catch (...) {
            request->model.release();
            throw;
        }
        // Every text has run: the lease ends with the answer, not when the batcher lets go of
        // the texts (the leader's turn may last a moment longer).
        request->model.release();
        batches = request->batches.load();
        return embeddings;
    }

    // The batcher's batch_fn: texts of any requests, each holding a lease on the one model
    // loaded (a model with leases is never unloaded, so they all hold the same).
    struct RunQueued {
        Server* server;
        template <class View>
        std::vector<Embedding> operator()(const View& view) const {
            std::vector<Tokens> batch;
            batch.reserve(view.size());
            std::vector<QueuedRequest*> requests;
            for (const QueuedText& text : view) {
                batch.push_back(text.tokens);
                requests.push_back(text.request.get());
            }
            std::sort(requests.begin(), requests.end());
            requests.erase(std::unique(requests.begin(), requests.end()), requests.end());
            HeldEncoder& model = *requests.front()->model;
            for (const QueuedRequest* request : requests)
                if (request->model.get() != &model)
                    throw std::logic_error("torch_server: one batch held texts for two models");
            std::vector<Embedding> out = server->run_batch(model, batch);
            for (QueuedRequest* request : requests)
                request->batches.fetch_add(1, std::memory_order_relaxed);
            return out;
        }
    };

    // One batch through the model, as the simulated device would run it: over
    // --simulate-oom-above-tokens it fails; on a simulated device its activations take
    // --simulate-bytes-per-batch + --simulate-bytes-per-token x its padded tokens while it runs
    // (or fail with the device's out-of-memory error when they do not fit).
    template <class Batch>
    std::vector<Embedding> run_batch(HeldEncoder& model, const Batch& batch) const {
        std::size_t longest = 0;
        for (const Tokens& t : batch) longest = std::max(longest, t.size());
        const std::uint64_t padded = longest * batch.size();
        const std::uint64_t oom_above = config_.simulate_oom_above_tokens;
        if (oom_above > 0 && padded > oom_above)
            throw vramguard::OutOfMemory(
                "simulated out of memory: a batch of " + std::to_string(batch.size()) +
                " texts padded to " + std::to_string(longest) + " tokens (" +
                std::to_string(padded) + " > --simulate-oom-above-tokens " +
                std::to_string(oom_above) + ")");
        std::shared_ptr<void> activations;
        const std::uint64_t per_batch = config_.simulate_bytes_per_batch;
        const std::uint64_t per_token = config_.simulate_bytes_per_token;
        if (config_.hold_device_bytes && (per_batch > 0 || per_token > 0))
            activations = config_.hold_device_bytes(per_batch + per_token * padded);
        hold_while_file_exists();
        return model.encode(batch);
    }

    json batching_json() const {
        json out{{"mode", to_string(config_.batching)}};
        if (!batcher_) return out;
        json stats = json::object();
        for (const BatcherCounter& counter : batcher_counters(batcher_->stats()))
            stats[counter.name] = counter.value;
        out["max_queued_items"] = batcher_->options().max_queued_items;
        out["stats"] = std::move(stats);
        return out;
    }

    // The seeds' protocol: {"status": "ok"|"busy", "unloaded", "message", "idle_seconds"}, with
    // this server's own fields besides ("result", "freed_bytes", "leases", "min_idle_seconds",
    // "loading"). Only this server's model is unloaded: a request is never passed on to its peers.
    // Refused callers and bad parameters were answered before (http_front.hpp).
    void request_unload(const UnloadRequest& request, httplib::Response& res) override {
        const double min_idle = request.min_idle_seconds;
        const auto min_idle_duration = std::chrono::duration_cast<vramguard::Duration>(
            std::chrono::duration<double>(min_idle));
        const std::uint64_t wanted_bytes =
            request.wanted_bytes.value_or(std::numeric_limits<std::uint64_t>::max());

        // The registry-wide form: busy (loading) while this server loads its own model, so two
        // servers asking each other do not trade the device back and forth.
        const vramguard::UnloadResult result =
            registry_.request_unload(min_idle_duration, wanted_bytes);
        json answer{{"status", result.busy() ? "busy" : "ok"},
                    {"unloaded", result.unloaded()},
                    {"result", wire::outcome_name(result.outcome)},
                    {"min_idle_seconds", min_idle},
                    {"leases", result.leases},
                    {"loading", result.loading},
                    {"freed_bytes", result.unloaded() ? result.bytes : 0}};
        // The reference leaves idle_seconds out when no model is loaded.
        if (result.outcome != vramguard::UnloadOutcome::not_loaded)
            answer["idle_seconds"] = result.idle_seconds;
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
        wire::reply(res, 200, answer);
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

    void metrics(httplib::Response& res) override {
#if TORCH_SERVER_HAS_PROMETHEUS
        try {
            const Counts requests{{"ok", encoded_ok_.load()},
                                  {"rejected_503", rejected_.load()},
                                  {"bad_request_400", bad_requests_.load() - unload_bad_.load()},
                                  {"oom_413", exhausted_.load()},
                                  {"never_fits_507", never_fits_.load()},
                                  { "failed_500",
                                    failed_.load() }};
            res.status = 200;
            const std::vector<BatcherCounter> batcher =
                batcher_ ? batcher_counters(batcher_->stats()) : std::vector<BatcherCounter>{};
            res.set_content(metrics_.render(requests, unload_answers(), batcher),
                            "text/plain; version=0.0.4; charset=utf-8");
        } catch (const std::exception& e) {
            wire::reply_error(res, 500, e.what());
        }
#else
        wire::reply_error(res, 404,
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

    ServerConfig config_;
    ModelSource model_;  // what the registry loads
    vramguard::Guard<Probe> guard_;
    vramguard::ModelRegistry<Probe> registry_;  // after the guard: destroyed first
    vramguard::Key load_key_;
    vramguard::Key encode_key_;
    std::shared_ptr<vramguard::ModelSlot<HeldEncoder>> slot_;
    const HardenedServer* http_ = nullptr;  // for /status's connection counts
    std::atomic<std::uint64_t> encode_requests_{0}, texts_encoded_{0}, rejected_{0},
        bad_requests_{0}, exhausted_{0}, never_fits_{0}, failed_{0}, encoded_ok_{0};
    // POST /request-unload answers: unloaded, busy, not_loaded, refused (401/403), bad (400).
    std::atomic<std::uint64_t> unload_unloaded_{0}, unload_busy_{0}, unload_not_loaded_{0},
        unload_refused_{0}, unload_bad_{0};
    // --batching batcher: one for the encode key, whatever model is loaded (each queued text
    // holds its request's lease). Destroyed before the registry and the guard: the requests
    // still queued then get BatcherClosed (503).
    std::optional<
        vramguard::Batcher<QueuedText, Probe, RunQueued, vramguard::Padded<TokensOfQueued>>>
        batcher_;
#if TORCH_SERVER_HAS_PROMETHEUS
    Metrics metrics_{guard_, registry_, encode_key_, config_.device_name};  // destroyed first
#endif
};

}  // namespace torch_server
