// SPDX-License-Identifier: MIT
// vram_manager: watches one GPU and asks the services on it to give memory back.
//
//   vram_manager --device cuda:0 --peer ollama=http://127.0.0.1:11434
//                --peer comfyui=http://127.0.0.1:8188 --peer vramguard=http://127.0.0.1:8081
//   vram_manager --device simulated:16:13 --peer ollama=http://127.0.0.1:11434 --steps 1
//
// Above --relieve-at (75 %) of the device in use it asks the peers, in order, for idle models and
// caches; above --unload-at (85 %), for unloads; at most once per --rate-limit (30 s). Each line
// it logs says what it read, what it asked, who answered what, and what the device showed after.
#include "manager.hpp"

#ifdef VRAMGUARD_WITH_CUDA
#include <vramguard/cuda.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

const char* const usage_text =
    "usage: vram_manager [options]\n"
    "  --device KIND          cuda[:N] (needs a CUDA build) or simulated:TOTAL_GIB[:USED_GIB]\n"
    "                         (default simulated:16:0, a demo device nothing else uses)\n"
    "  --peer KIND=URL        a service to ask, in order; KIND is vramguard, ollama, comfyui,\n"
    "                         llamacpp or vllm (vLLM's sleep aborts its requests: opt-in)\n"
    "  --token TOKEN          bearer token for the --peer before it\n"
    "  --relieve-at PERCENT   ask for idle models and caches above this (default 75)\n"
    "  --unload-at PERCENT    ask for unloads above this (default 85)\n"
    "  --interval SECONDS     between readings (default 5)\n"
    "  --rate-limit SECONDS   at most one round of asks per window (default 30)\n"
    "  --timeout MS           per peer asked (default 2000)\n"
    "  --steps N              stop after N readings (default 0: run until SIGINT/SIGTERM)\n"
    "  --verbose              log every reading, not only those above a threshold\n";

[[noreturn]] void usage_error(const std::string& message) {
    std::fprintf(stderr, "vram_manager: %s\n%s", message.c_str(), usage_text);
    std::exit(2);
}

double number(const std::string& flag, const std::string& text) {
    char* end = nullptr;
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !(value >= 0) || value > 1e9)
        usage_error(flag + " wants a number >= 0, got \"" + text + "\"");
    return value;
}

vramguard::Duration seconds(double value) {
    return std::chrono::duration_cast<vramguard::Duration>(std::chrono::duration<double>(value));
}

struct Arguments {
    std::string device = "simulated:16:0";
    std::vector<std::shared_ptr<vramguard::peers::HttpPeer>> peers;
    vram_manager::Config config;
    std::size_t steps = 0;
    bool verbose = false;
};

Arguments parse(int argc, char** argv) {
    Arguments args;
    std::string pending_spec;
    vramguard::peers::HttpPeerOptions pending_options;
    auto flush_peer = [&] {
        if (pending_spec.empty()) return;
        try {
            args.peers.push_back(vramguard::peers::parse_http_peer(pending_spec, pending_options));
        } catch (const std::exception& e) {
            usage_error(e.what());
        }
        pending_spec.clear();
        pending_options = {};
    };
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::fputs(usage_text, stdout);
            std::exit(0);
        }
        if (flag == "--verbose") {
            args.verbose = true;
            continue;
        }
        if (i + 1 >= argc) usage_error(flag + " needs a value");
        const std::string value = argv[++i];
        if (flag == "--device") {
            args.device = value;
        } else if (flag == "--peer") {
            flush_peer();
            pending_spec = value;
        } else if (flag == "--token") {
            if (pending_spec.empty()) usage_error("--token comes after the --peer it is for");
            pending_options.bearer_token = value;
        } else if (flag == "--relieve-at") {
            args.config.relieve_threshold = number(flag, value) / 100;
        } else if (flag == "--unload-at") {
            args.config.unload_threshold = number(flag, value) / 100;
        } else if (flag == "--interval") {
            args.config.interval = seconds(number(flag, value));
        } else if (flag == "--rate-limit") {
            args.config.rate_limit = seconds(number(flag, value));
        } else if (flag == "--timeout") {
            args.config.peer_timeout = seconds(number(flag, value) / 1000);
        } else if (flag == "--steps") {
            args.steps = static_cast<std::size_t>(number(flag, value));
        } else {
            usage_error("unknown flag " + flag);
        }
    }
    flush_peer();
    try {
        args.config.validate();
    } catch (const std::exception& e) {
        usage_error(e.what());
    }
    return args;
}

// One line per event, with the local time: what an operator greps.
vramguard::LogSink stdout_sink(bool verbose) {
    return [verbose](vramguard::Level level, std::string_view message) {
        if (level == vramguard::Level::debug && !verbose) return;
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        ::localtime_r(&now, &tm);
        char stamp[32];
        std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
        std::printf("%s %-5s %.*s\n", stamp, vramguard::to_string(level),
                    static_cast<int>(message.size()), message.data());
        std::fflush(stdout);
    };
}

volatile std::sig_atomic_t interrupted = 0;

template <class Probe>
int watch(Probe& probe, const Arguments& args, const std::string& what) {
    vramguard::Options options;
    options.log = stdout_sink(args.verbose);
    vram_manager::Manager<Probe> manager(probe, args.peers, args.config, options);
    options.log(vramguard::Level::info,
                "vram_manager: watching " + what + " with " + std::to_string(args.peers.size()) +
                    " peer(s): relieve above " +
                    vram_manager::percent(args.config.relieve_threshold) + ", unload above " +
                    vram_manager::percent(args.config.unload_threshold));
    for (const auto& peer : args.peers) {
        const vramguard::peers::Holding held = peer->holding(args.config.peer_timeout);
        options.log(vramguard::Level::info,
                    "vram_manager:   " + peer->name() + " holds " +
                        (held.bytes ? vramguard::format_bytes(*held.bytes) : std::string("?")) +
                        (held.detail.empty() ? "" : " (" + held.detail + ")"));
    }
    for (std::size_t done = 0; !interrupted && (args.steps == 0 || done < args.steps); ++done) {
        if (done > 0) {
            // Sleeps in short slices so that SIGINT stops it within a quarter second.
            const auto until = std::chrono::steady_clock::now() + args.config.interval;
            while (!interrupted && std::chrono::steady_clock::now() < until)
                std::this_thread::sleep_for(std::min<vramguard::Duration>(
                    std::chrono::milliseconds(250), until - std::chrono::steady_clock::now()));
            if (interrupted) break;
        }
        manager.step();
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const Arguments args = parse(argc, argv);
    std::signal(SIGINT, [](int) { interrupted = 1; });
    std::signal(SIGTERM, [](int) { interrupted = 1; });
    try {
        if (args.device.rfind("simulated", 0) == 0) {
            double total = 16, used = 0;
            if (args.device.size() > 9) {
                if (args.device[9] != ':') usage_error("--device simulated:TOTAL_GIB[:USED_GIB]");
                const std::string rest = args.device.substr(10);
                const std::size_t colon = rest.find(':');
                total = number("--device", rest.substr(0, colon));
                if (colon != std::string::npos) used = number("--device", rest.substr(colon + 1));
            }
            if (!(total > 0) || used > total)
                usage_error("--device simulated: USED must fit TOTAL");
            vramguard::SimulatedDevice device(static_cast<std::uint64_t>(total * (1ull << 30)));
            device.set_external_usage(static_cast<std::uint64_t>(used * (1ull << 30)));
            return watch(
                device, args,
                "a simulated " + vramguard::format_bytes(device.total_bytes()) + " device");
        }
        if (args.device.rfind("cuda", 0) == 0) {
#ifdef VRAMGUARD_WITH_CUDA
            const int index = args.device.size() > 5 && args.device[4] == ':'
                                  ? static_cast<int>(number("--device", args.device.substr(5)))
                                  : 0;
            vramguard::cuda::Probe probe(index);
            return watch(probe, args, "cuda:" + std::to_string(index));
#else
            usage_error("this build has no CUDA: use --device simulated:TOTAL_GIB[:USED_GIB]");
#endif
        }
        usage_error("unknown device \"" + args.device + "\"");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "vram_manager: %s\n", e.what());
        return 1;
    }
}
