// SPDX-License-Identifier: MIT
// Fake Ollama, ComfyUI, llama.cpp router, vLLM and vramguard servers for the HTTP peer tests: real
// cpp-httplib servers on 127.0.0.1 (ephemeral ports), each holding bytes of a SimulatedDevice the
// test owns and giving them back when asked as the real service would. They answer what the
// services' sources say they answer (peers_http.hpp cites them); a test can make one slow, down,
// garbage-speaking or token-checking.
#pragma once

#include <vramguard/simulated.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <ctime>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace vramguard_test {

using json = nlohmann::json;

// RFC 3339 in UTC, `seconds` from now (Go's time.Time marshalling, as Ollama's expires_at).
inline std::string rfc3339_from_now(double seconds) {
    const double at =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count() +
        seconds;
    const std::time_t whole = static_cast<std::time_t>(at);
    std::tm tm{};
    ::gmtime_r(&whole, &tm);
    char text[64];
    std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &tm);
    return std::string(text) + ".5Z";
}

// A port nothing listens on: bound, then closed.
inline int closed_port() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) throw std::runtime_error("socket failed");
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = 0;
    socklen_t length = sizeof address;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
        ::close(fd);
        throw std::runtime_error("bind failed");
    }
    ::close(fd);
    return ntohs(address.sin_port);
}

// One fake service: routes installed by a subclass, a recorded log of requests, switches for
// slowness, garbage and a required token.
class FakeService {
   public:
    struct Seen {
        std::string method, path, body, authorization;
    };

    explicit FakeService(vramguard::SimulatedDevice& device) : device_(device) {}
    FakeService(const FakeService&) = delete;
    FakeService& operator=(const FakeService&) = delete;
    virtual ~FakeService() { stop(); }

    // Binds 127.0.0.1 on an ephemeral port (listening from here on) and serves on a thread.
    void start() {
        server_.set_pre_routing_handler([this](const httplib::Request& req,
                                               httplib::Response& res) {
            {
                std::lock_guard<std::mutex> lock(mutex_);
                seen_.push_back(
                    {req.method, req.path, req.body, req.get_header_value("Authorization")});
            }
            if (!required_token_.empty() &&
                req.get_header_value("Authorization") != "Bearer " + required_token_) {
                res.status = 401;
                res.set_content(R"({"error": "unauthorized"})", "application/json");
                return httplib::Server::HandlerResponse::Handled;
            }
            if (slow_) {
                std::unique_lock<std::mutex> lock(mutex_);
                // Bounded: released by the test (release()) or after 10 s at most.
                released_cv_.wait_for(lock, std::chrono::seconds(10), [this] { return released_; });
            }
            if (garbage_) {
                res.set_content("<html>not json{", "application/json");
                return httplib::Server::HandlerResponse::Handled;
            }
            return httplib::Server::HandlerResponse::Unhandled;
        });
        install(server_);
        port_ = server_.bind_to_any_port("127.0.0.1");
        if (port_ <= 0) throw std::runtime_error("fake service: bind failed");
        thread_ = std::thread([this] { server_.listen_after_bind(); });
    }

    void stop() {
        release();
        if (thread_.joinable()) {
            server_.stop();
            thread_.join();
        }
    }

    std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
    int port() const { return port_; }

    void make_slow() { slow_ = true; }
    void release() {
        std::lock_guard<std::mutex> lock(mutex_);
        released_ = true;
        released_cv_.notify_all();
    }
    void speak_garbage() { garbage_ = true; }
    void require_token(std::string token) { required_token_ = std::move(token); }

    std::vector<Seen> seen() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return seen_;
    }
    std::size_t count(const std::string& method, const std::string& path) const {
        std::size_t n = 0;
        for (const Seen& s : seen())
            if (s.method == method && s.path == path) ++n;
        return n;
    }

   protected:
    virtual void install(httplib::Server& server) = 0;

    static void reply(httplib::Response& res, const json& body, int status = 200) {
        res.status = status;
        res.set_content(body.dump(), "application/json");
    }

    vramguard::SimulatedDevice& device_;
    mutable std::mutex mutex_;  // seen_, released_, and the subclasses' holdings

   private:
    httplib::Server server_;
    std::thread thread_;
    int port_ = 0;
    std::vector<Seen> seen_;
    std::condition_variable released_cv_;
    bool released_ = false;
    std::atomic<bool> slow_{false}, garbage_{false};
    std::string required_token_;
};

// Ollama: /api/ps lists the held models; /api/generate with keep_alive 0 and no prompt unloads.
class FakeOllama : public FakeService {
   public:
    using FakeService::FakeService;
    ~FakeOllama() override { stop(); }  // before the holdings go

    // A model on the GPU, expiring `expires_in` seconds from now.
    void load(const std::string& name, std::uint64_t bytes, double expires_in) {
        std::lock_guard<std::mutex> lock(mutex_);
        models_[name] = {device_.allocate(bytes), bytes, rfc3339_from_now(expires_in)};
    }
    bool loaded(const std::string& name) const {
        std::lock_guard<std::mutex> lock(mutex_);
        return models_.count(name) > 0;
    }
    // Answers size_vram as a string (wrong type).
    void wrong_types() { wrong_types_ = true; }

   protected:
    void install(httplib::Server& server) override {
        server.Get("/api/ps", [this](const httplib::Request&, httplib::Response& res) {
            std::lock_guard<std::mutex> lock(mutex_);
            json models = json::array();
            for (const auto& [name, model] : models_)
                models.push_back({{"name", name},
                                  {"model", name},
                                  {"size", model.bytes},
                                  {"size_vram", wrong_types_ ? json(std::to_string(model.bytes))
                                                             : json(model.bytes)},
                                  {"expires_at", model.expires_at}});
            reply(res, {{"models", models}});
        });
        server.Post("/api/generate", [this](const httplib::Request& req, httplib::Response& res) {
            const json body = json::parse(req.body, nullptr, false);
            if (!body.is_object() || !body.contains("model") || !body["model"].is_string())
                return reply(res, {{"error", "model is required"}}, 400);
            const std::string name = body["model"];
            std::lock_guard<std::mutex> lock(mutex_);
            if (!models_.count(name))
                return reply(res, {{"error", "model '" + name + "' not found"}}, 404);
            if (body.value("prompt", std::string()).empty() && body.contains("keep_alive") &&
                body["keep_alive"] == 0) {
                models_.erase(name);  // the allocation goes back to the device
                return reply(res, {{"model", name},
                                   {"created_at", rfc3339_from_now(0)},
                                   {"response", ""},
                                   {"done", true},
                                   {"done_reason", "unload"}});
            }
            reply(res, {{"error", "this fake only unloads"}}, 400);
        });
    }

   private:
    struct Model {
        vramguard::SimulatedDevice::Allocation allocation;
        std::uint64_t bytes = 0;
        std::string expires_at;
    };
    std::map<std::string, Model> models_;
    std::atomic<bool> wrong_types_{false};
};

// ComfyUI: /queue, /system_stats (torch_vram_total = what it holds), /free (acts on the flags as
// main.py's worker does: unload_models defaults to free_memory).
class FakeComfyUi : public FakeService {
   public:
    using FakeService::FakeService;
    ~FakeComfyUi() override { stop(); }  // before the holdings go

    void hold(std::uint64_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        models_ = device_.allocate(bytes);
        held_ = bytes;
    }
    std::uint64_t held() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return held_;
    }
    void set_running(int prompts) { running_ = prompts; }
    void set_pending(int prompts) { pending_ = prompts; }
    json last_free() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return last_free_;
    }

   protected:
    void install(httplib::Server& server) override {
        server.Get("/queue", [this](const httplib::Request&, httplib::Response& res) {
            json running = json::array(), pending = json::array();
            for (int i = 0; i < running_; ++i)
                running.push_back({i, "prompt-" + std::to_string(i), json::object()});
            for (int i = 0; i < pending_; ++i)
                pending.push_back({running_ + i, "queued-" + std::to_string(i), json::object()});
            reply(res, {{"queue_running", running}, {"queue_pending", pending}});
        });
        server.Get("/system_stats", [this](const httplib::Request&, httplib::Response& res) {
            std::lock_guard<std::mutex> lock(mutex_);
            reply(res, {{"system", {{"os", "posix"}}},
                        {"devices",
                         {{{"name", "cuda:0 fake"},
                           {"type", "cuda"},
                           {"index", 0},
                           {"vram_total", device_.total_bytes()},
                           {"vram_free", device_.memory().free_bytes},
                           {"torch_vram_total", held_},
                           {"torch_vram_free", 0}}}}});
        });
        server.Post("/free", [this](const httplib::Request& req, httplib::Response& res) {
            const json body = json::parse(req.body, nullptr, false);
            if (!body.is_object()) return reply(res, {{"error", "bad json"}}, 400);
            const bool free_memory = body.value("free_memory", false);
            const bool unload_models = body.value("unload_models", false);
            std::lock_guard<std::mutex> lock(mutex_);
            last_free_ = body;
            // server.py records a flag only when true; main.py: get("unload_models", free_memory).
            if (unload_models || free_memory) {
                models_.release();
                held_ = 0;
            }
            res.status = 200;  // an empty body, as aiohttp's web.Response(status=200)
        });
    }

   private:
    vramguard::SimulatedDevice::Allocation models_;
    std::uint64_t held_ = 0;
    std::atomic<int> running_{0};
    std::atomic<int> pending_{0};
    json last_free_;
};

// llama.cpp in router mode: GET /models, POST /models/unload {"model": M}.
class FakeLlamaRouter : public FakeService {
   public:
    using FakeService::FakeService;
    ~FakeLlamaRouter() override { stop(); }  // before the holdings go

    void load(const std::string& name, std::uint64_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        models_[name] = device_.allocate(bytes);
    }
    void list_unloaded(const std::string& name) {
        std::lock_guard<std::mutex> lock(mutex_);
        unloaded_.push_back(name);
    }
    bool loaded(const std::string& name) const {
        std::lock_guard<std::mutex> lock(mutex_);
        return models_.count(name) > 0;
    }

   protected:
    void install(httplib::Server& server) override {
        server.Get("/models", [this](const httplib::Request&, httplib::Response& res) {
            std::lock_guard<std::mutex> lock(mutex_);
            json data = json::array();
            for (const auto& entry : models_)
                data.push_back({{"id", entry.first}, {"status", {{"value", "loaded"}}}});
            for (const std::string& name : unloaded_)
                data.push_back({{"id", name}, {"status", {{"value", "unloaded"}}}});
            reply(res, {{"data", data}, {"object", "list"}});
        });
        server.Post("/models/unload", [this](const httplib::Request& req, httplib::Response& res) {
            const json body = json::parse(req.body, nullptr, false);
            const std::string name = body.is_object() ? body.value("model", std::string()) : "";
            std::lock_guard<std::mutex> lock(mutex_);
            if (!models_.count(name))
                return reply(res,
                             {{"error",
                               {{"code", 400},
                                {"message", "model is not running"},
                                {"type", "invalid_request_error"}}}},
                             400);
            models_.erase(name);
            reply(res, {{"success", true}});
        });
    }

   private:
    std::map<std::string, vramguard::SimulatedDevice::Allocation> models_;
    std::vector<std::string> unloaded_;
};

// vLLM with sleep mode: /is_sleeping, /metrics, /sleep?level=N.
class FakeVllm : public FakeService {
   public:
    using FakeService::FakeService;
    ~FakeVllm() override { stop(); }  // before the holdings go

    void hold(std::uint64_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        weights_ = device_.allocate(bytes);
    }
    void set_running(int requests) { running_ = requests; }
    bool asleep() const { return asleep_; }
    int level() const { return level_; }

   protected:
    void install(httplib::Server& server) override {
        server.Get("/is_sleeping", [this](const httplib::Request&, httplib::Response& res) {
            reply(res, {{"is_sleeping", asleep_.load()}});
        });
        server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
            res.set_content(
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} " +
                    std::to_string(running_.load()) + ".0\n",
                "text/plain");
        });
        server.Post("/sleep", [this](const httplib::Request& req, httplib::Response& res) {
            level_ = req.has_param("level") ? std::stoi(req.get_param_value("level")) : 1;
            std::lock_guard<std::mutex> lock(mutex_);
            weights_.release();
            asleep_ = true;
            res.status = 200;
        });
    }

   private:
    vramguard::SimulatedDevice::Allocation weights_;
    std::atomic<int> running_{0}, level_{0};
    std::atomic<bool> asleep_{false};
};

// Another vramguard server: the seed protocol, in the new shape ({"status", "unloaded",
// "message", "idle_seconds"}) or today's ({"result", "idle_seconds", "leases", "freed_bytes"}).
class FakeVramguard : public FakeService {
   public:
    using FakeService::FakeService;
    ~FakeVramguard() override { stop(); }  // before the holdings go

    void hold(std::uint64_t bytes, double idle_seconds) {
        std::lock_guard<std::mutex> lock(mutex_);
        model_ = device_.allocate(bytes);
        bytes_ = bytes;
        idle_ = idle_seconds;
    }
    bool loaded() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return static_cast<bool>(model_);
    }
    void answer_like_today() { today_ = true; }
    double last_min_idle() const { return last_min_idle_; }

   protected:
    void install(httplib::Server& server) override {
        server.Post("/request-unload", [this](const httplib::Request& req, httplib::Response& res) {
            const json body = json::parse(req.body, nullptr, false);
            double min_idle = 0;
            if (today_ && req.has_param("min_idle_seconds"))
                min_idle = std::stod(req.get_param_value("min_idle_seconds"));
            else if (body.is_object() && body.contains("min_idle_seconds"))
                min_idle = body["min_idle_seconds"].get<double>();
            last_min_idle_ = min_idle;
            std::lock_guard<std::mutex> lock(mutex_);
            if (!model_) {
                if (today_) return reply(res, {{"result", "not_loaded"}});
                return reply(res,
                             {{"status", "ok"}, {"unloaded", false}, {"message", "not loaded"}});
            }
            if (idle_ < min_idle) {
                if (today_)
                    return reply(res, {{"result", "busy"},
                                       {"idle_seconds", idle_},
                                       {"leases", 0},
                                       {"min_idle_seconds", min_idle}});
                return reply(res, {{"status", "busy"},
                                   {"unloaded", false},
                                   {"message", "idle for less than asked"},
                                   {"idle_seconds", idle_}});
            }
            model_.release();
            if (today_)
                return reply(
                    res,
                    {{"result", "unloaded"}, {"idle_seconds", idle_}, {"freed_bytes", bytes_}});
            reply(res, {{"status", "ok"},
                        {"unloaded", true},
                        {"message", "unloaded encoder"},
                        {"idle_seconds", idle_}});
        });
        server.Get("/status", [this](const httplib::Request&, httplib::Response& res) {
            std::lock_guard<std::mutex> lock(mutex_);
            reply(res, {{"model",
                         {{"name", "encoder"},
                          {"loaded", static_cast<bool>(model_)},
                          {"bytes", model_ ? bytes_ : 0}}}});
        });
    }

   private:
    vramguard::SimulatedDevice::Allocation model_;
    std::uint64_t bytes_ = 0;
    double idle_ = 0;
    std::atomic<bool> today_{false};
    std::atomic<double> last_min_idle_{-1};
};

}  // namespace vramguard_test
