// SPDX-License-Identifier: MIT
// torch_server_loadtest: N concurrent clients for S seconds against a running torch_server.
//
//   torch_server_loadtest --port 8080 [--clients 64] [--seconds 30] [--max-texts 16]
//                         [--verify 1000] [--seed 1]
//
// Each client sends POST /encode with 1..--max-texts texts, every text unique (its client,
// request and place in it are its first words), 90 % of 8-32 words and 10 % of 64-120 (the
// built-in tokenizer: a token a word, cut at 128). A 503 must carry Retry-After (whole seconds,
// >= 1): the client waits that long and sends the same texts again. When the time is up each
// client finishes the request it has, so every text sent is answered. Then it checks:
//   - every answer was 200, or 503 with Retry-After;
//   - every 200 holds one embedding of the answer's "dim" per text sent, each of unit length;
//   - every text was answered exactly once;
//   - up to --verify texts, re-encoded afterwards alone (one client, a request of 1 text),
//     get the embedding they got under load: no text got another request's or another text's.
// and prints texts/s, p50/p99 latency, the status codes and the server's /status counters.
// Exit status 0 when every check held, 1 otherwise, 2 on a bad flag.
#include "../../cli_flags.hpp"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Flags {
    std::string host = "127.0.0.1";
    int port = 8080;
    std::size_t clients = 64;
    double seconds = 30;
    std::size_t max_texts = 16;
    std::size_t verify = 1000;
    unsigned seed = 1;
};

// What every client saw, merged at the end.
struct Tally {
    std::map<int, std::uint64_t> statuses;        // HTTP status -> answers
    std::uint64_t unavailable_without_retry = 0;  // a 503 without a valid Retry-After
    std::uint64_t transport_errors = 0;           // no answer at all
    std::uint64_t bad_answers = 0;                // a 200 whose embeddings do not match the texts
    std::uint64_t texts_sent = 0, texts_answered = 0;
    std::vector<double> latency_ok;      // seconds, each 200 exchange
    std::vector<double> until_answered;  // seconds, first send to the 200 (retries in)
    // Each request's first text and the embedding it got, for the check afterwards.
    std::vector<std::pair<std::string, std::vector<float>>> samples;

    void merge(Tally&& other) {
        for (const auto& [status, n] : other.statuses) statuses[status] += n;
        unavailable_without_retry += other.unavailable_without_retry;
        transport_errors += other.transport_errors;
        bad_answers += other.bad_answers;
        texts_sent += other.texts_sent;
        texts_answered += other.texts_answered;
        latency_ok.insert(latency_ok.end(), other.latency_ok.begin(), other.latency_ok.end());
        until_answered.insert(until_answered.end(), other.until_answered.begin(),
                              other.until_answered.end());
        for (auto& sample : other.samples) samples.push_back(std::move(sample));
    }
};

Flags parse_flags(int argc, char** argv) {
    Flags f;
    CLI::App app{"N concurrent clients for S seconds against a running torch_server",
                 "torch_server_loadtest"};
    app.option_defaults()->always_capture_default();
    app.add_option("--host", f.host, "the server's address");
    app.add_option("--port", f.port, "the server's port")->check(CLI::Range(1, 65535));
    app.add_option("--clients", f.clients, "clients at once")->check(CLI::Range(1, 4096));
    app.add_option("--seconds", f.seconds, "how long they send new requests")
        ->check(CLI::Range(0.1, 3600.0));
    app.add_option("--max-texts", f.max_texts, "texts per request, at most")
        ->check(CLI::Range(1, 1024));
    app.add_option("--verify", f.verify, "texts re-encoded alone afterwards (0: none)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--seed", f.seed, "the texts are a function of this");
    example_cli::parse_or_exit(app, argc, argv);
    return f;
}

std::unique_ptr<httplib::Client> client_of(const Flags& flags) {
    auto client = std::make_unique<httplib::Client>(flags.host, flags.port);
    client->set_connection_timeout(10, 0);
    client->set_read_timeout(300, 0);
    client->set_write_timeout(10, 0);
    client->set_keep_alive(true);
    return client;
}

// A unique text: its id first, then words from a small vocabulary.
std::string make_text(std::mt19937& rng, std::size_t client, std::uint64_t request,
                      std::size_t index) {
    static const char* const words[] = {"memory", "device", "batch",  "token", "model", "guard",
                                        "server", "queue",  "learns", "fits",  "over",  "under",
                                        "small",  "large",  "text",   "vector"};
    const bool long_text = std::uniform_int_distribution<int>(0, 9)(rng) == 0;
    const int count = long_text ? std::uniform_int_distribution<int>(64, 120)(rng)
                                : std::uniform_int_distribution<int>(8, 32)(rng);
    std::string text = "c" + std::to_string(client) + " r" + std::to_string(request) + " t" +
                       std::to_string(index);
    for (int i = 0; i < count; ++i) text += std::string(" ") + words[rng() % 16];
    return text;
}

// Retry-After as whole seconds >= 1, or 0 when absent or malformed.
long retry_after_of(const httplib::Result& res) {
    const std::string value = res->get_header_value("Retry-After");
    if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos) return 0;
    return std::stol(value);
}

// Whether a 200's body holds one unit-length embedding of "dim" floats per text.
bool answer_matches(const json& body, std::size_t texts) {
    if (!body.contains("embeddings") || !body.contains("dim")) return false;
    const json& rows = body["embeddings"];
    const auto dim = body["dim"].get<std::size_t>();
    if (!rows.is_array() || rows.size() != texts) return false;
    for (const json& row : rows) {
        if (!row.is_array() || row.size() != dim) return false;
        double norm = 0;
        for (const json& x : row) norm += x.get<double>() * x.get<double>();
        if (std::fabs(std::sqrt(norm) - 1.0) > 1e-3) return false;
    }
    return true;
}

// One client: requests until `stop`, each sent again after a 503 until it is answered.
Tally run_client(const Flags& flags, std::size_t id, Clock::time_point stop) {
    Tally tally;
    std::mt19937 rng(flags.seed * 7919u + static_cast<unsigned>(id));
    auto client = client_of(flags);
    for (std::uint64_t request = 0; Clock::now() < stop; ++request) {
        const std::size_t n = std::uniform_int_distribution<std::size_t>(1, flags.max_texts)(rng);
        std::vector<std::string> texts;
        for (std::size_t i = 0; i < n; ++i) texts.push_back(make_text(rng, id, request, i));
        tally.texts_sent += n;
        const std::string body = json{{"texts", texts}}.dump();
        const auto first_sent = Clock::now();
        for (int attempt = 0; attempt < 1000; ++attempt) {
            const auto sent = Clock::now();
            auto res = client->Post("/encode", body, "application/json");
            if (!res) {
                ++tally.transport_errors;
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
                continue;
            }
            ++tally.statuses[res->status];
            if (res->status == 503) {
                const long after = retry_after_of(res);
                if (after < 1) ++tally.unavailable_without_retry;
                std::this_thread::sleep_for(std::chrono::seconds(std::max(1L, after)));
                continue;
            }
            if (res->status != 200) break;  // counted; never sent again
            const double took = std::chrono::duration<double>(Clock::now() - sent).count();
            const json answer = json::parse(res->body, nullptr, false);
            if (!answer_matches(answer, n)) {
                ++tally.bad_answers;
                break;
            }
            tally.latency_ok.push_back(took);
            tally.until_answered.push_back(
                std::chrono::duration<double>(Clock::now() - first_sent).count());
            tally.texts_answered += n;
            tally.samples.emplace_back(texts[0], answer["embeddings"][0].get<std::vector<float>>());
            break;
        }
    }
    return tally;
}

double percentile(std::vector<double> values, double p) {
    if (values.empty()) return 0;
    std::sort(values.begin(), values.end());
    const auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(values.size())));
    return values[std::min(values.size() - 1, rank == 0 ? 0 : rank - 1)];
}

struct Verified {
    std::size_t checked = 0, wrong = 0;
    float worst = 0;  // the largest difference in one float
};

// Re-encodes up to `limit` sampled texts (spread over the run) alone; a text whose embedding
// differs from what it got under load by more than float rounding (batches pad differently) got
// another text's.
Verified verify_alone(const Flags& flags, const Tally& tally, std::size_t limit) {
    auto client = client_of(flags);
    Verified verified;
    std::size_t& wrong = verified.wrong;
    float& worst = verified.worst;
    const std::size_t n = std::min(limit, tally.samples.size());
    verified.checked = n;
    for (std::size_t i = 0; i < n; ++i) {
        const auto& [text, under_load] = tally.samples[i * tally.samples.size() / n];
        const std::string body = json{{"texts", json::array({text})}}.dump();
        auto res = client->Post("/encode", body, "application/json");
        for (int attempt = 0; attempt < 100 && res && res->status == 503; ++attempt) {
            std::this_thread::sleep_for(std::chrono::seconds(std::max(1L, retry_after_of(res))));
            res = client->Post("/encode", body, "application/json");
        }
        if (!res || res->status != 200) {
            ++wrong;
            continue;
        }
        const auto alone = json::parse(res->body)["embeddings"][0].get<std::vector<float>>();
        float difference = alone.size() == under_load.size() ? 0.0f : INFINITY;
        for (std::size_t j = 0; j < alone.size() && j < under_load.size(); ++j)
            difference = std::max(difference, std::fabs(alone[j] - under_load[j]));
        worst = std::max(worst, difference);
        if (difference > 1e-3f) ++wrong;
    }
    return verified;
}

}  // namespace

int main(int argc, char** argv) {
    const Flags flags = parse_flags(argc, argv);
    auto probe = client_of(flags);
    const auto before = probe->Get("/status");
    if (!before || before->status != 200) {
        std::fprintf(stderr, "torch_server_loadtest: no /status at %s:%d\n", flags.host.c_str(),
                     flags.port);
        return 1;
    }
    const json status_before = json::parse(before->body);

    const auto start = Clock::now();
    const auto stop = start + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(flags.seconds));
    std::vector<Tally> tallies(flags.clients);
    std::vector<std::thread> clients;
    for (std::size_t id = 0; id < flags.clients; ++id)
        clients.emplace_back([&, id] { tallies[id] = run_client(flags, id, stop); });
    for (std::thread& t : clients) t.join();
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    Tally all;
    for (Tally& t : tallies) all.merge(std::move(t));

    const Verified verified = verify_alone(flags, all, flags.verify);

    const auto after = probe->Get("/status");
    const json status_after = after ? json::parse(after->body, nullptr, false) : json();

    std::uint64_t requests = 0, other_statuses = 0;
    std::string codes;
    for (const auto& [code, n] : all.statuses) {
        requests += n;
        if (code != 200 && code != 503) other_statuses += n;
        codes += (codes.empty() ? "" : ", ") + std::to_string(code) + ": " + std::to_string(n);
    }
    std::printf(
        "mode %s: %zu clients for %.0f s (%.1f s with the last answers), 1-%zu texts a "
        "request\n",
        status_after.value("batching", json::object()).value("mode", "?").c_str(), flags.clients,
        flags.seconds, elapsed, flags.max_texts);
    std::printf("answers: %llu (%s); 503 without Retry-After: %llu; transport errors: %llu\n",
                static_cast<unsigned long long>(requests), codes.c_str(),
                static_cast<unsigned long long>(all.unavailable_without_retry),
                static_cast<unsigned long long>(all.transport_errors));
    std::printf("texts: %llu/%llu answered exactly once, %.0f texts/s; bad 200 answers: %llu\n",
                static_cast<unsigned long long>(all.texts_answered),
                static_cast<unsigned long long>(all.texts_sent), all.texts_answered / elapsed,
                static_cast<unsigned long long>(all.bad_answers));
    std::printf(
        "latency of a 200: p50 %.3f s, p99 %.3f s; until answered (503s retried): p50 "
        "%.3f s, p99 %.3f s\n",
        percentile(all.latency_ok, 0.5), percentile(all.latency_ok, 0.99),
        percentile(all.until_answered, 0.5), percentile(all.until_answered, 0.99));
    std::printf(
        "verified alone afterwards: %zu texts, %zu with another embedding (largest "
        "difference %.2g)\n",
        verified.checked, verified.wrong, verified.worst);
    if (status_after.is_object()) {
        const json guard = status_after.value("guard", json::object());
        const json guard_before = status_before.value("guard", json::object());
        json guard_delta = json::object();
        for (const auto& [name, value] : guard.items())
            if (value.is_number_unsigned())
                guard_delta[name] =
                    value.get<std::uint64_t>() - guard_before.value(name, std::uint64_t{0});
        std::printf("server guard counters during the run: %s\n", guard_delta.dump().c_str());
        std::printf("server batching: %s\n", status_after.value("batching", json()).dump().c_str());
        std::printf("server encode: %s\n", status_after.value("encode", json()).dump().c_str());
    }
    const bool ok = other_statuses == 0 && all.unavailable_without_retry == 0 &&
                    all.transport_errors == 0 && all.bad_answers == 0 &&
                    all.texts_answered == all.texts_sent && verified.wrong == 0;
    std::printf("%s\n", ok ? "PASS: only 200 and 503 with Retry-After, every text answered "
                             "exactly once"
                           : "FAIL");
    return ok ? 0 : 1;
}
