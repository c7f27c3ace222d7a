// SPDX-License-Identifier: MIT
// libFuzzer target: the example server's HTTP layer (examples/torch_server: connections.hpp and
// http_front.hpp) fed raw bytes as one connection: request lines (method, path, query), headers,
// bodies, several requests pipelined. The first input byte picks the caller (loopback or remote)
// and whether an --unload-token is set; the rest is the connection.
//
// Covered: cpp-httplib's request parser and routing as the server configures them (it is a
// compiled library here, so it runs but is not coverage-instrumented), the header metering and
// caps, the framing, Origin and Content-Type checks, body reading, the UTF-8 and depth checks,
// JSON and number parsing, the access rule, the error answers. Not covered: the encoder, the
// guard and the registry behind the endpoints (a recorder stands in for them: LibTorch is not in
// the fuzz build; tests/torch/torch_server_hostile_test.cpp runs the real server), sockets and
// deadlines (the memory connection never waits).
//
// Checks, besides "no crash, no sanitizer report":
//  - every answer is a well-formed HTTP/1.1 response; no 5xx but 501 and 503;
//  - every answer with Content-Type application/json has a body that is JSON, and every error
//    answer (4xx) has one with a string "error";
//  - what reaches the endpoints passed the checks: texts are valid UTF-8 and at most max_texts,
//    min_idle_seconds is finite and in [0, 1e9], a remote caller without the token never gets
//    to /request-unload.
#include "../../examples/torch_server/http_front.hpp"

#include "fuzz_check.hpp"

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using json = nlohmann::json;

constexpr std::size_t max_texts = 8;

class Recorder : public torch_server::Endpoints {
   public:
    explicit Recorder(bool may_unload) : may_unload_(may_unload) {}
    void encode(std::vector<std::string> texts, httplib::Response& res) override {
        FUZZ_CHECK(texts.size() <= max_texts);
        for (const std::string& text : texts) FUZZ_CHECK(vramguard::protocol::is_valid_utf8(text));
        json embeddings = json::array();
        for (const std::string& text : texts) embeddings.push_back({text.size()});
        torch_server::wire::reply(res, 200, json{{"embeddings", embeddings}});
    }
    void request_unload(const torch_server::UnloadRequest& request,
                        httplib::Response& res) override {
        FUZZ_CHECK(may_unload_);
        FUZZ_CHECK(std::isfinite(request.min_idle_seconds));
        FUZZ_CHECK(request.min_idle_seconds >= 0 && request.min_idle_seconds <= 1e9);
        torch_server::wire::reply(res, 200, json{{"status", "ok"}, {"unloaded", false}});
    }
    json status() override { return {{"status", "ok"}, {"idle_seconds", nullptr}}; }
    void metrics(httplib::Response& res) override { res.set_content("# none\n", "text/plain"); }

   private:
    bool may_unload_;
};

std::size_t header_value_number(const std::string& head, const std::string& name) {
    const std::size_t at = head.find("\r\n" + name + ": ");
    if (at == std::string::npos) return 0;
    return std::strtoull(head.c_str() + at + name.size() + 4, nullptr, 10);
}

// Every answer in `output`, one after another.
void check_answers(const std::string& output) {
    std::size_t at = 0;
    while (at < output.size()) {
        FUZZ_CHECK(output.compare(at, 9, "HTTP/1.1 ") == 0);
        const std::size_t end = output.find("\r\n\r\n", at);
        FUZZ_CHECK(end != std::string::npos);
        const std::string head = output.substr(at, end - at);
        const int status = std::atoi(head.c_str() + 9);
        FUZZ_CHECK(status >= 100 && status <= 599);
        FUZZ_CHECK(status < 500 || status == 501 || status == 503);
        at = end + 4;
        if (status == 100) continue;  // "Expect: 100-continue", then the answer
        const std::size_t length = header_value_number(head, "Content-Length");
        FUZZ_CHECK(output.size() - at >= length);
        const std::string body = output.substr(at, length);
        at += length;
        const bool is_json = head.find("\r\nContent-Type: application/json") != std::string::npos;
        if (is_json) {
            const json parsed = json::parse(body, nullptr, false);
            FUZZ_CHECK(!parsed.is_discarded());
            if (status >= 400)
                FUZZ_CHECK(parsed.is_object() && parsed.contains("error") &&
                           parsed["error"].is_string());
        } else {
            FUZZ_CHECK(status < 400);  // every error answer is JSON
        }
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const bool remote = (data[0] & 1) != 0;
    const bool token = (data[0] & 2) != 0;
    const std::string input(reinterpret_cast<const char*>(data) + 1, size - 1);
    // A HEAD answer has a Content-Length but no body: the answers could not be told apart.
    if (input.find("HEAD") != std::string::npos) return 0;

    // One server per kind of caller, built once: compiling the routes' regexes per input would
    // cost most of the time.
    struct Setup {
        Recorder recorder;
        torch_server::HardenedServer http;
        Setup(bool remote_caller, bool with_token)
            : recorder(!remote_caller || with_token), http(limits()) {
            torch_server::FrontConfig config;
            config.max_body_bytes = 2048;
            config.max_texts = max_texts;
            if (with_token) config.unload_token = "s3cret";
            torch_server::install_routes(http, recorder, config);
        }
        static torch_server::ConnectionLimits limits() {
            torch_server::ConnectionLimits limits;
            limits.max_header_bytes = 2048;  // small, so the fuzzer reaches it
            return limits;
        }
    };
    static Setup setups[4] = {{false, false}, {true, false}, {false, true}, {true, true}};
    torch_server::HardenedServer& http = setups[(remote ? 1 : 0) + (token ? 2 : 0)].http;
    torch_server::MemoryMeteredStream stream(input, remote ? "10.1.2.3" : "127.0.0.1",
                                             http.limits());
    http.serve(stream);
    check_answers(stream.output());
    return 0;
}
