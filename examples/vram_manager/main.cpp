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
// Every flag is also read from the environment: --device from VRAMGUARD_MANAGER_DEVICE, and so
// on (the command line wins); --help lists them.
#include "../cli_flags.hpp"
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

const std::string program = "vram_manager";

[[noreturn]] void usage_error(const std::string& message) {
    example_cli::usage_error(program, message);
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

// Each --token is for the --peer before it: CLI11 keeps every flag's values apart, so the pairing
// is read back from the order the flags were parsed in. A token from the environment (no --token
// on the command line) is for every peer.
std::vector<std::shared_ptr<vramguard::peers::HttpPeer>> make_peers(
    const CLI::App& app, const CLI::Option* peer_flag, const std::vector<std::string>& specs,
    const std::vector<std::string>& tokens) {
    std::vector<vramguard::peers::HttpPeerOptions> options(specs.size());
    const CLI::Option* token_flag = app.get_option("--token");
    const std::vector<CLI::Option*>& order = app.parse_order();  // the command line's flags only
    if (!tokens.empty() && std::find(order.begin(), order.end(), token_flag) == order.end()) {
        for (auto& o : options) o.bearer_token = tokens.back();  // from the environment
    } else {
        std::size_t peers_seen = 0, tokens_seen = 0;
        for (const CLI::Option* flag : order) {
            if (flag == peer_flag) {
                ++peers_seen;
            } else if (flag == token_flag) {
                if (peers_seen == 0) usage_error("--token comes after the --peer it is for");
                options[peers_seen - 1].bearer_token = tokens.at(tokens_seen++);
            }
        }
    }
    std::vector<std::shared_ptr<vramguard::peers::HttpPeer>> peers;
    for (std::size_t i = 0; i < specs.size(); ++i) {
        try {
            peers.push_back(vramguard::peers::parse_http_peer(specs[i], options[i]));
        } catch (const std::exception& e) {
            usage_error(std::string("--peer ") + specs[i] + ": " + e.what());
        }
    }
    return peers;
}

Arguments parse(int argc, char** argv) {
    Arguments args;
    CLI::App app{
        "Watches one GPU and asks the services on it to give memory back. Every flag is "
        "also read from the environment variable shown with it; the command line wins.",
        program};
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    app.get_formatter()->column_width(34);
    std::vector<std::string> specs, tokens;
    double relieve = 75, unload = 85, interval = 5, rate_limit = 30, timeout_ms = 2000;
    const auto wanted = CLI::Range(0.0, 1e9);
    app.add_option("--device", args.device,
                   "cuda[:N] (needs a CUDA build) or simulated:TOTAL_GIB[:USED_GIB] (a demo "
                   "device nothing else uses)")
        ->capture_default_str();
    auto* peer_flag =
        app.add_option("--peer", specs,
                       "a service to ask, in order; KIND is vramguard, ollama, comfyui, llamacpp "
                       "or vllm (vLLM's sleep aborts its requests: opt-in); in the variable: "
                       "KIND=URL separated by spaces")
            ->type_name("KIND=URL")
            ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    app.add_option("--token", tokens,
                   "bearer token for the --peer before it; in the variable: for every peer")
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    app.add_option("--relieve-at", relieve, "ask for idle models and caches above PERCENT")
        ->check(wanted)
        ->capture_default_str();
    app.add_option("--unload-at", unload, "ask for unloads above PERCENT")
        ->check(wanted)
        ->capture_default_str();
    app.add_option("--interval", interval, "SECONDS between readings")
        ->check(wanted)
        ->capture_default_str();
    app.add_option("--rate-limit", rate_limit, "at most one round of asks per SECONDS")
        ->check(wanted)
        ->capture_default_str();
    app.add_option("--timeout", timeout_ms, "MS per peer asked")
        ->check(wanted)
        ->capture_default_str();
    app.add_option("--steps", args.steps, "stop after N readings (0: run until SIGINT/SIGTERM)")
        ->capture_default_str()
        ->check(example_cli::no_sign());
    app.add_flag("--verbose", args.verbose, "log every reading, not only those above a threshold");
    example_cli::env_for_every_option(app, "VRAMGUARD_MANAGER_");
    example_cli::parse_or_exit(app, argc, argv);

    args.config.relieve_threshold = relieve / 100;
    args.config.unload_threshold = unload / 100;
    args.config.interval = seconds(interval);
    args.config.rate_limit = seconds(rate_limit);
    args.config.peer_timeout = seconds(timeout_ms / 1000);
    const auto& order = app.parse_order();
    if (specs.size() == 1 && std::find(order.begin(), order.end(), peer_flag) == order.end())
        specs = example_cli::split_on_spaces(specs.front());  // VRAMGUARD_MANAGER_PEER
    args.peers = make_peers(app, peer_flag, specs, tokens);
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
