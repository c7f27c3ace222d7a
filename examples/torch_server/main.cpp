// SPDX-License-Identifier: MIT
// torch_server: an HTTP embedding server around a small LibTorch encoder, guarded by vramguard.
//
//   torch_server --port 8080 [--host 127.0.0.1] [--device cpu|cuda:N] [--threads 8]
//                [--idle-unload-seconds 300] [--profile-dir DIR] [--memory-limit-bytes N]
//                [--simulate-other-process-bytes N] [--intra-op-threads 1] [--max-texts 1024]
//                [--simulate-oom-above-tokens N] [--unload-token TOKEN] [--peer KIND=URL]...
//                [--peer-token TOKEN] [--simulate-shared-device FILE [--simulated-device-bytes N]]
//
// The model loads on the first /encode (admitted by the guard, counted by the registry), stays
// loaded while requests lease it, and is unloaded after --idle-unload-seconds without one or on
// POST /request-unload. With --port 0 the kernel picks a free port; the first line on stdout is
// always "listening on http://HOST:PORT". SIGINT or SIGTERM stops the server cleanly.
// See docs/torch_server.md for a session with curl.
#include "peers.hpp"
#include "server.hpp"
#include "shared_device.hpp"

#include <vramguard/torch.hpp>

#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Flags {
    std::string host = "127.0.0.1";
    int port = 8080;
    std::string device = "cpu";
    std::size_t threads = 8;
    int intra_op_threads = 1;
    long long idle_unload_seconds = 300;
    std::string profile_dir;
    std::optional<std::uint64_t> memory_limit_bytes;
    std::uint64_t simulate_other_process_bytes = 0;
    std::size_t max_texts = 1024;
    std::uint64_t simulate_oom_above_tokens = 0;
    std::string unload_token;
    std::vector<std::string> peers;  // KIND=URL, in the order given
    std::string peer_token;
    std::string shared_device;
    std::uint64_t simulated_device_bytes = 0;
    std::string hold_encodes_while_file_exists;
    std::size_t max_connections = 512;
    unsigned long long request_deadline_seconds = 60;
};

constexpr const char* usage =
    "usage: torch_server [options]\n"
    "  --host ADDR                    address to listen on (127.0.0.1)\n"
    "  --port N                       port; 0 picks a free one (8080)\n"
    "  --device cpu|cuda:N            where the model runs (cpu)\n"
    "  --threads N                    ignored: each connection has a thread of its own, up\n"
    "                                 to --max-connections (kept for old command lines)\n"
    "  --max-connections N            connections served at once; more are answered 503 (512)\n"
    "  --request-deadline-seconds N   a request must arrive whole within N s, its headers\n"
    "                                 within min(N, 10) s; a late one is closed (60)\n"
    "  --intra-op-threads N           LibTorch threads per request (1: requests run in parallel)\n"
    "  --idle-unload-seconds N        unload the model after N s without a request; 0 = never "
    "(300)\n"
    "  --profile-dir DIR              where vramguard keeps what it learned (its default)\n"
    "  --memory-limit-bytes N         behave as if the device had N bytes (demos, tests)\n"
    "  --simulate-other-process-bytes N\n"
    "                                 behave as if another process held N bytes of the device\n"
    "                                 (demos, tests of 503; 0 = off)\n"
    "  --max-texts N                  texts per /encode request (1024)\n"
    "  --simulate-oom-above-tokens N  fault injection: batches over N padded tokens fail with an\n"
    "                                 out-of-memory error, as on a device that small (off)\n"
    "  --unload-token TOKEN           let remote callers use /request-unload with\n"
    "                                 \"Authorization: Bearer TOKEN\" (off: loopback only)\n"
    "  --peer KIND=URL                another service on this GPU to ask for memory when the\n"
    "                                 model does not fit (repeatable, asked in order; KIND:\n"
    "                                 vramguard, ollama, comfyui, llamacpp or vllm)\n"
    "  --peer-token TOKEN             sent to peers as \"Authorization: Bearer TOKEN\"\n"
    "  --simulate-shared-device FILE  run on a simulated device kept in FILE, shared with every\n"
    "                                 server started on the same FILE, with a simulated clock\n"
    "                                 (demos, tests of peers)\n"
    "  --simulated-device-bytes N     its size, when FILE is new\n"
    "  --hold-encodes-while-file-exists FILE\n"
    "                                 tests: an /encode holding the model waits while FILE\n"
    "                                 exists (at most 60 s), to keep a request in flight\n";

[[noreturn]] void fail_usage(const std::string& message) {
    std::fprintf(stderr, "torch_server: %s\n%s", message.c_str(), usage);
    std::exit(2);
}

unsigned long long parse_number(const std::string& flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    const unsigned long long value = std::strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-')
        fail_usage(flag + " needs a non-negative integer, got \"" + text + "\"");
    return value;
}

Flags parse_flags(int argc, char** argv) {
    Flags flags;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::fputs(usage, stdout);
            std::exit(0);
        }
        if (i + 1 >= argc) fail_usage(flag == "" ? "empty argument" : flag + " needs a value");
        const char* value = argv[++i];
        if (flag == "--host")
            flags.host = value;
        else if (flag == "--port") {
            const auto port = parse_number(flag, value);
            if (port > 65535) fail_usage("--port must be at most 65535");
            flags.port = static_cast<int>(port);
        } else if (flag == "--device")
            flags.device = value;
        else if (flag == "--threads")
            flags.threads = std::max<std::size_t>(1, parse_number(flag, value));
        else if (flag == "--intra-op-threads")
            flags.intra_op_threads =
                static_cast<int>(std::max<unsigned long long>(1, parse_number(flag, value)));
        else if (flag == "--idle-unload-seconds")
            flags.idle_unload_seconds = static_cast<long long>(parse_number(flag, value));
        else if (flag == "--profile-dir")
            flags.profile_dir = value;
        else if (flag == "--memory-limit-bytes")
            flags.memory_limit_bytes = parse_number(flag, value);
        else if (flag == "--simulate-other-process-bytes")
            flags.simulate_other_process_bytes = parse_number(flag, value);
        else if (flag == "--max-texts")
            flags.max_texts = std::max<std::size_t>(1, parse_number(flag, value));
        else if (flag == "--simulate-oom-above-tokens")
            flags.simulate_oom_above_tokens = parse_number(flag, value);
        else if (flag == "--unload-token")
            flags.unload_token = value;
        else if (flag == "--peer")
            flags.peers.push_back(value);
        else if (flag == "--peer-token")
            flags.peer_token = value;
        else if (flag == "--simulate-shared-device")
            flags.shared_device = value;
        else if (flag == "--simulated-device-bytes")
            flags.simulated_device_bytes = parse_number(flag, value);
        else if (flag == "--max-connections")
            flags.max_connections = std::max<std::size_t>(1, parse_number(flag, value));
        else if (flag == "--request-deadline-seconds")
            flags.request_deadline_seconds =
                std::min<unsigned long long>(86400, std::max(1ull, parse_number(flag, value)));
        else if (flag == "--hold-encodes-while-file-exists")
            flags.hold_encodes_while_file_exists = value;
        else
            fail_usage("unknown option " + flag);
    }
    return flags;
}

// SIGINT/SIGTERM are blocked in every thread (the mask is set before any thread starts) and taken
// by one thread with sigwait(), which stops the HTTP server: no work in a signal handler.
// SIGUSR1 wakes that thread when the server stopped for another reason.
class SignalWatcher {
   public:
    SignalWatcher() {
        sigemptyset(&set_);
        sigaddset(&set_, SIGINT);
        sigaddset(&set_, SIGTERM);
        sigaddset(&set_, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &set_, nullptr);
        std::signal(SIGPIPE, SIG_IGN);  // a client that hangs up must not kill the server
    }
    void start(httplib::Server& http) {
        thread_ = std::thread([this, &http] {
            int signal_number = 0;
            sigwait(&set_, &signal_number);
            if (signal_number == SIGUSR1) return;  // the server already stopped
            std::fprintf(stderr, "torch_server: %s, stopping\n", strsignal(signal_number));
            // stop() does nothing before listen_after_bind() has started: a signal that came
            // right after the bind waits for it (briefly: the listen starts next).
            for (int i = 0; i < 500 && !http.is_running(); ++i)
                std::this_thread::sleep_for(std::chrono::milliseconds(10));
            http.stop();
        });
    }
    ~SignalWatcher() {
        if (!thread_.joinable()) return;
        pthread_kill(thread_.native_handle(), SIGUSR1);
        thread_.join();
    }

   private:
    sigset_t set_;
    std::thread thread_;
};

template <class Inner>
int serve(Inner& inner, const Flags& flags, torch_server::ServerConfig config,
          SignalWatcher& signals) {
    torch_server::LimitedProbe<Inner> probe(inner, flags.memory_limit_bytes,
                                            flags.simulate_other_process_bytes);
    torch_server::Server<torch_server::LimitedProbe<Inner>> server(probe, std::move(config));

    // Slow clients cannot hold its threads: see connections.hpp.
    torch_server::ConnectionLimits limits;
    limits.max_connections = flags.max_connections;
    limits.request_deadline = std::chrono::seconds(flags.request_deadline_seconds);
    limits.header_deadline = std::min(limits.header_deadline, limits.request_deadline);
    torch_server::HardenedServer http(limits);
    http.set_logger([](const httplib::Request& req, const httplib::Response& res) {
        std::fprintf(stderr, "torch_server: %s %s -> %d\n",
                     torch_server::loggable(req.method).c_str(),
                     torch_server::loggable(req.path).c_str(), res.status);
    });
    server.install(http);

    int port = flags.port;
    if (port == 0) {
        port = http.bind_to_any_port(flags.host);
    } else if (!http.bind_to_port(flags.host, port)) {
        port = -1;
    }
    if (port <= 0) {
        std::fprintf(stderr, "torch_server: cannot listen on %s:%d: %s\n", flags.host.c_str(),
                     flags.port, std::strerror(errno));
        return 1;
    }
    std::printf("listening on http://%s:%d\n", flags.host.c_str(), port);
    std::fflush(stdout);
    signals.start(http);
    const bool ok = http.listen_after_bind();
    std::fprintf(stderr, "torch_server: stopped\n");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    SignalWatcher signals;  // first: the mask must be in place before any thread exists
    const Flags flags = parse_flags(argc, argv);

    torch_server::ServerConfig config;
    config.device_name = flags.device;
    config.idle_unload = std::chrono::seconds(flags.idle_unload_seconds);
    config.profile_dir = flags.profile_dir;
    config.max_texts = flags.max_texts;
    config.simulate_oom_above_tokens = flags.simulate_oom_above_tokens;
    config.unload_token = flags.unload_token;
    config.hold_encodes_while_file_exists = flags.hold_encodes_while_file_exists;
    for (const std::string& peer : flags.peers) {
        try {
            config.peers.push_back(torch_server::make_peer_from_flag(peer, flags.peer_token));
        } catch (const std::invalid_argument& e) {
            fail_usage(e.what());
        }
    }
    torch::set_num_threads(flags.intra_op_threads);

    try {
        if (!flags.shared_device.empty()) {
            if (flags.device != "cpu") fail_usage("--simulate-shared-device runs on --device cpu");
            if (flags.memory_limit_bytes)
                fail_usage(
                    "--simulate-shared-device sets the device's size: give "
                    "--simulated-device-bytes, not --memory-limit-bytes");
            // The model runs on the CPU; its bytes are taken from the shared simulated device.
            config.device = torch::Device(torch::kCPU);
            config.device_name = "simulated";
            torch_server::SharedDevice device(flags.shared_device, flags.simulated_device_bytes);
            config.clock = device.clock();
            config.sleep = device.sleep();
            config.hold_device_bytes = [&device](std::uint64_t bytes) {
                return device.allocate(bytes);
            };
            torch_server::SharedDevice::Probe probe(device);
            return serve(probe, flags, std::move(config), signals);
        }
        if (flags.device == "cpu") {
            config.device = torch::Device(torch::kCPU);
            vramguard::torch::HostProbe host;
            return serve(host, flags, std::move(config), signals);
        }
        if (flags.device.rfind("cuda", 0) == 0) {
            config.device =
                torch::Device(flags.device);  // "cuda" or "cuda:N"; throws when malformed
            vramguard::torch::Probe gpu(config.device.has_index() ? config.device.index() : 0);
            return serve(gpu, flags, std::move(config), signals);
        }
        fail_usage("--device must be cpu or cuda:N, got \"" + flags.device + "\"");
    } catch (const vramguard::DeviceUnavailable& e) {
        std::fprintf(stderr, "torch_server: %s\n", e.what());
        return 1;
    } catch (const c10::Error& e) {
        std::fprintf(stderr, "torch_server: %s\n", e.what_without_backtrace());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "torch_server: %s\n", e.what());
        return 1;
    }
}
