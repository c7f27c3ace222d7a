// SPDX-License-Identifier: MIT
// torch_server: an HTTP embedding server around a LibTorch model, guarded by vramguard.
//
//   torch_server --port 8080 [--model model.pt [--dtype float16] [--model-bytes N|measure]]
//                [--tokenizer spiece.model [--bos-id N] [--eos-id N]] [--max-tokens N]
//                [--device cpu|cuda:N] [--idle-unload-seconds 300] [--peer KIND=URL]...
//                [--unload-token-file FILE] [--batching batcher|per-request]
//                [--max-queued-items N] ... (--help lists every flag)
//
// Every flag is also read from the environment: --unload-token from VRAMGUARD_SERVER_UNLOAD_TOKEN,
// and so on (the command line wins). Without --model it serves the built-in encoder
// (encoder.hpp), without --tokenizer the built-in tokenizer. A --model or --tokenizer that cannot
// be served (missing, corrupt, another forward signature) stops the server before it listens,
// with one line saying why and exit status 1; a bad flag exits 2.
//
// The model loads on the first /encode (admitted by the guard, counted by the registry), stays
// loaded while requests lease it, and is unloaded after --idle-unload-seconds without one or on
// POST /request-unload. With --port 0 the kernel picks a free port; the first line on stdout is
// always "listening on http://HOST:PORT". SIGINT or SIGTERM stops the server cleanly.
// See docs/torch_server.md for a session with curl, and for serving your own model.
#include "../cli_flags.hpp"
#include "peers.hpp"
#include "sentencepiece_tokenizer.hpp"
#include "server.hpp"
#include "shared_device.hpp"
#include "torchscript_encoder.hpp"

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

const std::string program = "torch_server";

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
    std::uint64_t simulate_bytes_per_token = 0;
    std::uint64_t simulate_bytes_per_batch = 0;
    std::string batching = "batcher";
    std::size_t max_queued_items = 4096;
    unsigned long long encode_deadline_seconds = 0;
    std::string unload_token;
    std::vector<std::string> peers;  // KIND=URL, in the order given
    std::string peer_token;
    std::string shared_device;
    std::uint64_t simulated_device_bytes = 0;
    std::string hold_encodes_while_file_exists;
    std::size_t max_connections = 512;
    unsigned long long request_deadline_seconds = 60;
    // The model and its tokenizer (docs/torch_server.md, "Serve your own model").
    std::string model;        // TorchScript file; "" = the built-in encoder
    std::string model_bytes;  // "" = the file's parameter bytes, "measure", or a number
    std::string dtype = "float32";
    std::string tokenizer;  // SentencePiece model; "" = the built-in tokenizer
    std::optional<std::int64_t> bos_id, eos_id, pad_id, max_tokens;
};

// Binds a flag to an optional: set only when the flag (or its variable) was given.
template <class T>
CLI::Option* add_optional(CLI::App& app, const std::string& name, std::optional<T>& target,
                          const std::string& help) {
    return app.add_option_function<T>(
        name, [&target](const T& value) { target = value; }, help);
}

Flags parse_flags(int argc, char** argv) {
    Flags f;
    CLI::App app{
        "An HTTP embedding server around a LibTorch model, guarded by vramguard "
        "(docs/torch_server.md). Every flag is also read from the environment variable "
        "shown with it; the command line wins.",
        program};
    app.option_defaults()->always_capture_default()->multi_option_policy(
        CLI::MultiOptionPolicy::TakeLast);
    app.get_formatter()->column_width(40);
    std::string unload_token_file, peer_token_file;
    std::uint64_t memory_limit = 0;

    app.add_option("--host", f.host, "address to listen on");
    app.add_option("--port", f.port, "port; 0 picks a free one")->check(CLI::Range(0, 65535));
    app.add_option("--device", f.device, "where the model runs: cpu or cuda:N");
    const CLI::Validator unsigned_number = example_cli::no_sign();
    app.add_option("--threads", f.threads,
                   "ignored: each connection has a thread of its own, up to --max-connections "
                   "(kept for old command lines)")
        ->check(unsigned_number);
    app.add_option("--max-connections", f.max_connections,
                   "connections served at once; more are answered 503 at once (0 counts as 1)")
        ->check(unsigned_number);
    app.add_option("--request-deadline-seconds", f.request_deadline_seconds,
                   "a request must arrive whole within N s (at most 86400), its headers within "
                   "min(N, 10) s; a late one is answered 408 and closed")
        ->check(unsigned_number);
    app.add_option("--intra-op-threads", f.intra_op_threads,
                   "LibTorch threads per request (1: requests run in parallel)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--idle-unload-seconds", f.idle_unload_seconds,
                   "unload the model after N s without a request; 0 = never")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--profile-dir", f.profile_dir, "where vramguard keeps what it learned");
    auto* limit = app.add_option("--memory-limit-bytes", memory_limit,
                                 "behave as if the device had N bytes (demos, tests)")
                      ->check(unsigned_number);
    app.add_option("--simulate-other-process-bytes", f.simulate_other_process_bytes,
                   "behave as if another process held N bytes of the device (demos, tests of "
                   "503; 0 = off)")
        ->check(unsigned_number);
    app.add_option("--max-texts", f.max_texts, "texts per /encode request (0 counts as 1)")
        ->check(unsigned_number);
    app.add_option("--simulate-oom-above-tokens", f.simulate_oom_above_tokens,
                   "fault injection: batches over N padded tokens fail with an out-of-memory "
                   "error (0 = off)")
        ->check(unsigned_number);
    auto* per_token =
        app.add_option("--simulate-bytes-per-token", f.simulate_bytes_per_token,
                       "--simulate-shared-device: each batch takes N bytes per padded token from "
                       "the simulated device while it runs (its activations; the guard sees and "
                       "learns them)")
            ->check(unsigned_number);
    auto* per_batch = app.add_option("--simulate-bytes-per-batch", f.simulate_bytes_per_batch,
                                     "--simulate-shared-device: and N bytes more per batch")
                          ->check(unsigned_number);
    app.add_option("--batching", f.batching,
                   "how /encode runs its texts: batcher (the texts of every request in flight "
                   "share batches) or per-request (each request's texts alone)")
        ->check(CLI::IsMember({"batcher", "per-request"}));
    app.add_option("--max-queued-items", f.max_queued_items,
                   "--batching batcher: a request that would queue more texts beside those "
                   "queued is answered 503 with Retry-After (0 counts as 1)")
        ->check(unsigned_number);
    app.add_option("--encode-deadline-seconds", f.encode_deadline_seconds,
                   "--batching batcher: a request whose texts have not run after N s (on the "
                   "guard's clock) is answered 503 with Retry-After; 0 = never")
        ->check(unsigned_number);
    auto* token = app.add_option("--unload-token", f.unload_token,
                                 "let remote callers use /request-unload with \"Authorization: "
                                 "Bearer TOKEN\" (off: loopback only); prefer the variable or "
                                 "--unload-token-file: a flag shows in the process list");
    app.add_option("--unload-token-file,--token-file", unload_token_file,
                   "--unload-token's value, the first line of FILE")
        ->excludes(token);
    app.add_option("--peer", f.peers,
                   "another service on this GPU to ask for memory when the model does not fit "
                   "(repeatable, asked in order; KIND: vramguard, ollama, comfyui, llamacpp or "
                   "vllm; in the variable: KIND=URL separated by spaces)")
        ->type_name("KIND=URL")
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    auto* peer_token = app.add_option("--peer-token", f.peer_token,
                                      "sent to peers as \"Authorization: Bearer TOKEN\"");
    app.add_option("--peer-token-file", peer_token_file,
                   "--peer-token's value, the first line of FILE")
        ->excludes(peer_token);
    auto* shared = app.add_option("--simulate-shared-device", f.shared_device,
                                  "run on a simulated device kept in FILE, shared with every "
                                  "server started on it, with a simulated clock (demos, tests of "
                                  "peers)");
    per_token->needs(shared);
    per_batch->needs(shared);
    app.add_option("--simulated-device-bytes", f.simulated_device_bytes,
                   "its size, when FILE is new")
        ->check(unsigned_number);
    app.add_option("--hold-encodes-while-file-exists", f.hold_encodes_while_file_exists,
                   "tests: an /encode holding the model waits while FILE exists (at most 60 s)");
    // The model and its tokenizer.
    auto* model = app.add_option("--model", f.model,
                                 "a TorchScript file to serve instead of the built-in encoder: "
                                 "forward(input_ids, attention_mask) -> [B,D] or [B,T,D]");
    app.add_option("--model-bytes", f.model_bytes,
                   "what loading --model needs: a number of bytes, or \"measure\" (the guard "
                   "measures the first load); default: its parameters and buffers at --dtype")
        ->needs(model);
    app.add_option("--dtype", f.dtype,
                   "--model's floating parameters as float32, float16 or "
                   "bfloat16 (the built-in encoder is float32)")
        ->check(CLI::IsMember({"float32", "float16", "bfloat16"}));
    auto* tokenizer =
        app.add_option("--tokenizer", f.tokenizer,
                       "a SentencePiece model to tokenize with instead of the built-in tokenizer");
    add_optional(app, "--bos-id", f.bos_id, "--tokenizer: id put before every text (-1: none)")
        ->needs(tokenizer);
    add_optional(app, "--eos-id", f.eos_id, "--tokenizer: id put after every text (-1: none)")
        ->needs(tokenizer);
    add_optional(app, "--pad-id", f.pad_id, "--model: id in input_ids after a text's end (0)")
        ->needs(model);
    add_optional(app, "--max-tokens", f.max_tokens,
                 "tokens per text, special ones included; longer texts are cut (128 for the "
                 "built-in encoder, which cannot take more; 512 with --model)")
        ->check(CLI::PositiveNumber);
    example_cli::env_for_every_option(app, "VRAMGUARD_SERVER_");
    example_cli::parse_or_exit(app, argc, argv);

    if (limit->count() > 0) f.memory_limit_bytes = memory_limit;
    std::vector<std::string> peers;  // VRAMGUARD_SERVER_PEER holds them all, space-separated
    for (const std::string& spec : f.peers)
        for (std::string& one : example_cli::split_on_spaces(spec)) peers.push_back(std::move(one));
    f.peers = std::move(peers);
    f.threads = std::max<std::size_t>(1, f.threads);
    f.intra_op_threads = std::max(1, f.intra_op_threads);
    f.max_texts = std::max<std::size_t>(1, f.max_texts);
    f.max_queued_items = std::max<std::size_t>(1, f.max_queued_items);
    f.max_connections = std::max<std::size_t>(1, f.max_connections);
    f.request_deadline_seconds =
        std::min<unsigned long long>(86400, std::max(1ull, f.request_deadline_seconds));
    if (!unload_token_file.empty())
        f.unload_token =
            example_cli::read_secret_file(program, "--unload-token-file", unload_token_file);
    if (!peer_token_file.empty())
        f.peer_token = example_cli::read_secret_file(program, "--peer-token-file", peer_token_file);
    return f;
}

[[noreturn]] void fail_usage(const std::string& message) {
    example_cli::usage_error(program, message);
}

torch::Dtype parse_dtype(const std::string& name) {
    if (name == "float16") return torch::kFloat16;
    if (name == "bfloat16") return torch::kBFloat16;
    return torch::kFloat32;
}

// The model and tokenizer the flags name, checked before the server listens: a file that cannot
// be served throws ModelFileError (one line), a flag that does not fit the model exits 2.
void choose_model(const Flags& flags, torch_server::ServerConfig& config) {
    using namespace torch_server;
    const bool builtin = flags.model.empty();
    const std::int64_t max_tokens =
        flags.max_tokens.value_or(builtin ? config.encoder.max_tokens : 512);
    if (builtin && max_tokens > config.encoder.max_tokens)
        fail_usage("--max-tokens " + std::to_string(max_tokens) + ": the built-in encoder has " +
                   std::to_string(config.encoder.max_tokens) + " positions");
    if (builtin && flags.dtype != "float32")
        fail_usage("--dtype " + flags.dtype + " needs --model (the built-in encoder is float32)");
    if (!flags.tokenizer.empty()) {
        std::int64_t vocab = 0;
        config.tokenizer = load_sentencepiece(
            {flags.tokenizer, flags.bos_id.value_or(-1), flags.eos_id.value_or(-1), max_tokens},
            &vocab);
        if (builtin && vocab > config.encoder.vocab)
            fail_usage("--tokenizer " + flags.tokenizer + " has " + std::to_string(vocab) +
                       " pieces, more than the built-in encoder's " +
                       std::to_string(config.encoder.vocab) + " ids: give --model too");
    } else {
        EncoderConfig cut = config.encoder;
        cut.max_tokens = max_tokens;
        config.tokenizer = [cut](std::string_view text) { return tokenize(text, cut); };
    }
    if (builtin) return;
    TorchScriptOptions options;
    options.path = flags.model;
    options.dtype = parse_dtype(flags.dtype);
    options.padding_id = flags.pad_id.value_or(0);
    if (flags.model_bytes == "measure") {
        options.measure = true;
    } else if (!flags.model_bytes.empty()) {
        char* end = nullptr;
        errno = 0;
        const unsigned long long bytes = std::strtoull(flags.model_bytes.c_str(), &end, 10);
        if (errno != 0 || *end != '\0' || bytes == 0 || flags.model_bytes[0] == '-')
            fail_usage("--model-bytes wants a number of bytes > 0 or \"measure\", got \"" +
                       flags.model_bytes + "\"");
        options.declared_bytes = bytes;
    }
    // A short text and a longer one: forward must take padding, and its output's shape shows.
    const std::vector<Tokens> probe = {config.tokenizer("probe"),
                                       config.tokenizer("a longer probe text, to pad the first")};
    config.model = inspect_torchscript(options, probe);
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
    try {
        choose_model(flags, config);
    } catch (const c10::Error& e) {
        std::fprintf(stderr, "torch_server: %s\n",
                     torch_server::first_line(e.what_without_backtrace()).c_str());
        return 1;
    } catch (const std::exception& e) {  // ModelFileError: one line already
        std::fprintf(stderr, "torch_server: %s\n", e.what());
        return 1;
    }
    config.device_name = flags.device;
    config.idle_unload = std::chrono::seconds(flags.idle_unload_seconds);
    config.profile_dir = flags.profile_dir;
    config.max_texts = flags.max_texts;
    config.simulate_oom_above_tokens = flags.simulate_oom_above_tokens;
    config.simulate_bytes_per_token = flags.simulate_bytes_per_token;
    config.simulate_bytes_per_batch = flags.simulate_bytes_per_batch;
    config.batching = *torch_server::parse_batching(flags.batching);  // checked by CLI11
    config.max_queued_items = flags.max_queued_items;
    config.encode_deadline = std::chrono::seconds(
        std::min<unsigned long long>(flags.encode_deadline_seconds, 86400ull * 365));
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
