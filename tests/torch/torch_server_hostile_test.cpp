// SPDX-License-Identifier: MIT
// Hostile clients against the examples/torch_server binary (issue 19, items 1, 2, 4, 5, 6, 8, 9,
// 10, 11): raw bytes over loopback sockets, so a test can send what no well-behaved client
// library would (invalid UTF-8 in a path, a TLS hello, Content-Length: -5, a byte at a time).
// Each test checks the answer (a 4xx or 503 with a JSON body that says what happened) and that
// the server is still there and unharmed afterwards. Then the request layer in process
// (http_front.hpp over a memory connection): the same rules without a socket or a model.
//
// Bounded: every socket read has a deadline, at most 200 client connections at once, every
// server started is killed when its test ends.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "server_process.hpp"

#include "../../examples/torch_server/http_front.hpp"
#include "../../examples/torch_server/unload_access.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// A started server, killed (not asked to stop) when the test ends: slow clients may still hold
// connections open.
struct Child : vramguard_test::RunningServer {
    explicit Child(std::vector<std::string> args) : RunningServer(std::move(args)) {}
    ~Child() { process->kill(); }
    // Whether the process is still running (not aborted, not crashed).
    bool alive() const { return process->alive(); }
};

int connect_to(int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<std::uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0)
        throw std::runtime_error(std::string("connect: ") + std::strerror(errno));
    return fd;
}

struct Answer {
    int status = 0;  // 0: no answer
    std::string head;
    std::string body;
    double seconds = 0;  // from the request's first byte to the whole answer
    json parsed() const { return json::parse(body, nullptr, false); }
    bool json_error() const {
        const json j = parsed();
        return j.is_object() && j.contains("error") && j["error"].is_string();
    }
};

// Reads one answer (headers and Content-Length bytes of body) within `timeout`.
Answer read_answer(int fd, Clock::time_point started, Clock::duration timeout) {
    Answer answer;
    std::string data;
    const auto deadline = started + timeout;
    for (;;) {
        const std::size_t end = data.find("\r\n\r\n");
        if (end != std::string::npos) {
            answer.head = data.substr(0, end);
            std::size_t length = 0;
            const std::size_t at = answer.head.find("Content-Length: ");
            if (at != std::string::npos) length = std::stoul(answer.head.substr(at + 16));
            if (data.size() >= end + 4 + length) {
                answer.body = data.substr(end + 4, length);
                std::sscanf(answer.head.c_str(), "HTTP/1.%*d %d", &answer.status);
                break;
            }
        }
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() <= 0) break;
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
        char buffer[65536];
        const ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
        if (n <= 0) break;
        data.append(buffer, static_cast<std::size_t>(n));
    }
    answer.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    return answer;
}

// Sends `request` as it is on a new connection and reads the answer.
Answer send_raw(int port, const std::string& request, Clock::duration timeout = 30s) {
    const int fd = connect_to(port);
    const auto started = Clock::now();
    std::size_t sent = 0;
    while (sent < request.size()) {
        const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
        if (n <= 0) break;  // the server may answer and close before reading everything
        sent += static_cast<std::size_t>(n);
    }
    Answer answer = read_answer(fd, started, timeout);
    ::close(fd);
    return answer;
}

std::string post(const std::string& target, const std::string& body,
                 const std::string& headers = "Content-Type: application/json\r\n") {
    return "POST " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers +
           "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

json status_of(int port) {
    const Answer a = send_raw(port, "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    if (a.status != 200) throw std::runtime_error("GET /status: " + a.head);
    return a.parsed();
}

bool model_loaded(int port) { return status_of(port).at("model_loaded").get<bool>(); }

void load_model(int port) {
    const Answer a = send_raw(port, post("/encode", R"({"texts": ["hello"]})"));
    ASSERT_EQ(a.status, 200) << a.head << a.body;
    ASSERT_TRUE(model_loaded(port));
}

// Item 1: a path that is not UTF-8 (escaped or raw) is a 404 naming it safely, not an abort.
TEST(TorchServerHostile, InvalidUtf8PathIsA404WithJsonNotAnAbort) {
    Child server({});
    for (const std::string path : {"/%FF", "/\xff", "/encode/%C3", "/%C3%28?x=%FF", "/\x1b[2J"}) {
        const Answer a = send_raw(server.port(), "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n");
        EXPECT_EQ(a.status, 404) << path << ": " << a.head;
        EXPECT_TRUE(a.json_error()) << path << ": " << a.body;
        EXPECT_EQ(a.head.find("EXCEPTION_WHAT"), std::string::npos);
        ASSERT_TRUE(server.alive()) << "the server died on GET " << path;
    }
    EXPECT_EQ(status_of(server.port()).at("status"), "ok");
}

// Item 2: nesting deeper than vramguard::protocol::max_json_depth is a 400 before any parse.
TEST(TorchServerHostile, DeeplyNestedJsonIsA400NotACrash) {
    Child server({});
    const std::size_t depth = 1000000;
    const std::string deep = std::string(depth, '[') + std::string(depth, ']');
    for (const std::string& body :
         {"{\"min_idle_seconds\": " + deep + "}", "{\"texts\": " + deep + "}"}) {
        for (const char* target : {"/request-unload", "/encode"}) {
            const Answer a = send_raw(server.port(), post(target, body));
            EXPECT_EQ(a.status, 400) << target << ": " << a.head;
            EXPECT_NE(a.body.find("deeper than"), std::string::npos) << a.body;
            ASSERT_TRUE(server.alive()) << "the server died on a deep body to " << target;
        }
    }
    // 64 levels is still JSON this server reads (and refuses for its types, not its depth).
    const Answer ok = send_raw(
        server.port(),
        post("/encode", "{\"texts\": " + std::string(63, '[') + std::string(63, ']') + "}"));
    EXPECT_EQ(ok.status, 400);
    EXPECT_NE(ok.body.find("not a string"), std::string::npos) << ok.body;
}

// Item 4: invalid UTF-8 in a body or a query value is a 400 with a JSON body.
TEST(TorchServerHostile, InvalidUtf8InBodyOrQueryIsA400WithJson) {
    Child server({});
    const std::vector<std::string> requests = {
        post("/encode", "{\"texts\": [\"\xff\xfe\"]}"),
        post("/encode", "{\"texts\": [\"a\"], \"\xc3\": 1}"),
        post("/request-unload", "{\"min_idle_seconds\": \"\xff\"}"),
        post("/request-unload?min_idle_seconds=%FF", ""),
        post("/request-unload?wanted_bytes=%C3%28", ""),
    };
    for (const std::string& request : requests) {
        const Answer a = send_raw(server.port(), request);
        EXPECT_EQ(a.status, 400) << request << "\n" << a.head;
        EXPECT_TRUE(a.json_error()) << a.body;
        EXPECT_EQ(a.head.find("EXCEPTION_WHAT"), std::string::npos) << a.head;
    }
    EXPECT_TRUE(server.alive());
}

// Item 5: min_idle_seconds that is empty, garbage, negative, NaN or huge is a 400, never 0.
TEST(TorchServerHostile, EmptyOrGarbageMinIdleIsA400AndUnloadsNothing) {
    Child server({});
    load_model(server.port());
    for (const std::string value : {"", "%20", "+0", "-0", "-1", "nan", "NaN", "inf", "1e999",
                                    "0x10", "1e10", "5s", "%200", "0,5", "."}) {
        const Answer a =
            send_raw(server.port(), post("/request-unload?min_idle_seconds=" + value, ""));
        EXPECT_EQ(a.status, 400) << "min_idle_seconds=" << value << ": " << a.body;
        EXPECT_TRUE(a.json_error());
    }
    const Answer twice = send_raw(
        server.port(), post("/request-unload?min_idle_seconds=0&min_idle_seconds=3600", ""));
    EXPECT_EQ(twice.status, 400) << twice.body;
    EXPECT_TRUE(model_loaded(server.port())) << "a bad request unloaded the model";
    // The numbers it takes still work.
    const Answer zero = send_raw(server.port(), post("/request-unload?min_idle_seconds=0.0", ""));
    EXPECT_EQ(zero.status, 200) << zero.body;
    EXPECT_EQ(zero.parsed().value("result", ""), "unloaded") << zero.body;
}

// Item 6: 200 connections that send a request a byte at a time do not keep /status from
// answering within a second.
TEST(TorchServerHostile, TwoHundredSlowClientsDoNotStopStatus) {
    Child server({});
    std::vector<int> slow;
    for (int i = 0; i < 200; ++i) {
        slow.push_back(connect_to(server.port()));
        ::send(slow.back(), "G", 1, MSG_NOSIGNAL);
    }
    const std::string request = "ET /status HTTP/1.1\r\nX-Slow: ";
    for (int round = 0; round < 3; ++round) {
        for (const int fd : slow) ::send(fd, &request[round], 1, MSG_NOSIGNAL);  // drip
        const Answer a = send_raw(server.port(), "GET /status HTTP/1.1\r\nHost: x\r\n\r\n", 5s);
        ASSERT_EQ(a.status, 200) << "round " << round << ": " << a.head;
        EXPECT_LT(a.seconds, 1.0) << "round " << round << " with 200 slow connections open";
        // The slow ones are all there (held by the server, not queued), and this probe too.
        EXPECT_GE(a.parsed().at("connections").at("open").get<int>(), 201) << "round " << round;
        std::this_thread::sleep_for(300ms);
    }
    for (const int fd : slow) ::close(fd);
}

// Item 6: a request that has not arrived whole by its deadline is answered 408 and closed.
TEST(TorchServerHostile, ALateRequestIsA408AfterItsDeadline) {
    Child server({"--request-deadline-seconds", "1"});
    const int fd = connect_to(server.port());
    const auto started = Clock::now();
    const std::string partial = "GET /status HTTP/1.1\r\nX-Slow: ";
    for (const char c : partial) {  // a byte every 50 ms: each read is quick, the whole is not
        ::send(fd, &c, 1, MSG_NOSIGNAL);
        std::this_thread::sleep_for(50ms);
    }
    const Answer a = read_answer(fd, started, 30s);
    ::close(fd);
    EXPECT_EQ(a.status, 408) << a.head;
    EXPECT_TRUE(a.json_error()) << a.body;
    EXPECT_GE(a.seconds, 0.9);
    EXPECT_LT(a.seconds, 20.0);
}

// Item 6: past --max-connections a connection is answered 503 at once, and once the slow ones
// are gone the server serves again.
TEST(TorchServerHostile, ConnectionsOverTheCapAreA503AtOnce) {
    Child server({"--max-connections", "4"});
    std::vector<int> held;
    for (int i = 0; i < 4; ++i) {
        held.push_back(connect_to(server.port()));
        ::send(held.back(), "G", 1, MSG_NOSIGNAL);
    }
    std::this_thread::sleep_for(200ms);  // the four are accepted and hold their threads
    const int extra = connect_to(server.port());
    const Answer a = read_answer(extra, Clock::now(), 10s);
    ::close(extra);
    EXPECT_EQ(a.status, 503) << a.head;
    EXPECT_NE(a.head.find("Retry-After: 1"), std::string::npos) << a.head;
    EXPECT_TRUE(a.json_error()) << a.body;
    EXPECT_LT(a.seconds, 5.0);
    for (const int fd : held) ::close(fd);
    // Closed connections free their threads as soon as the server notices (a read returns 0).
    const auto deadline = Clock::now() + 20s;
    int status = 0;
    while (Clock::now() < deadline && status != 200) {
        status = send_raw(server.port(), "GET /status HTTP/1.1\r\nHost: x\r\n\r\n", 5s).status;
        if (status != 200) std::this_thread::sleep_for(100ms);
    }
    EXPECT_EQ(status, 200);
    EXPECT_GE(status_of(server.port()).at("connections").at("refused_503").get<int>(), 1);
}

// Item 8: /status and /request-unload carry the reference protocol's fields and types.
TEST(TorchServerHostile, StatusAndUnloadCarryTheReferenceFields) {
    Child server({"--idle-unload-seconds", "90"});
    json status = status_of(server.port());
    EXPECT_EQ(status.at("status"), "ok");
    EXPECT_TRUE(status.at("idle_seconds").is_null()) << "no model loaded";
    EXPECT_TRUE(status.at("auto_unload_minutes").is_number_integer()) << status.dump();
    EXPECT_EQ(status.at("auto_unload_minutes").get<int>(), 2) << "90 s, rounded up";
    EXPECT_TRUE(status.contains("model")) << "the extra fields stay";
    const Answer none = send_raw(server.port(), post("/request-unload", ""));
    ASSERT_EQ(none.status, 200);
    EXPECT_FALSE(none.parsed().contains("idle_seconds")) << none.body;
    EXPECT_EQ(none.parsed().at("status"), "ok");
    load_model(server.port());
    status = status_of(server.port());
    EXPECT_TRUE(status.at("idle_seconds").is_number()) << status.dump();
    EXPECT_GE(status.at("idle_seconds").get<double>(), 0.0);
    const Answer busy = send_raw(server.port(), post("/request-unload", ""));
    EXPECT_TRUE(busy.parsed().at("idle_seconds").is_number()) << busy.body;
}

// Item 9: the Bearer scheme is case-insensitive (RFC 9110 11.1).
TEST(TorchServerHostile, BearerSchemeInAnyCase) {
    using torch_server::decide_unload_access;
    for (const char* header : {"Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR s3cret",
                               "Bearer   s3cret", "Bearer s3cret  "})
        EXPECT_TRUE(decide_unload_access("10.0.0.5", "s3cret", header).allowed) << header;
    for (const char* header : {"Bearers3cret", "Basic s3cret", "bearer", "bearer ", "Bearer S3CRET",
                               "bearer s3cret2", "Bearer\ts3cret"})
        EXPECT_EQ(decide_unload_access("10.0.0.5", "s3cret", header).status, 401) << header;

    Child server({"--unload-token", "s3cret"});
    const Answer a =
        send_raw(server.port(), post("/request-unload", "", "Authorization: bearer s3cret\r\n"));
    EXPECT_EQ(a.status, 200) << a.body;
}

// Item 10: a web page cannot unload the model: a foreign Origin, or a body type a page can send
// without asking (text/plain, a form), is refused.
TEST(TorchServerHostile, CrossSiteRequestsAreRefused) {
    Child server({});
    load_model(server.port());
    const std::string target = "/request-unload?min_idle_seconds=0";
    const Answer evil =
        send_raw(server.port(),
                 post(target, "{}", "Origin: http://evil.example\r\nContent-Type: text/plain\r\n"));
    EXPECT_EQ(evil.status, 403) << evil.body;
    const Answer evil_json = send_raw(
        server.port(),
        post(target, "", "Origin: http://evil.example\r\nContent-Type: application/json\r\n"));
    EXPECT_EQ(evil_json.status, 403) << evil_json.body;
    const Answer rebound = send_raw(  // a DNS-rebinding name: same origin, still foreign
        server.port(), "POST " + target +
                           " HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\n"
                           "Content-Length: 0\r\n\r\n");
    EXPECT_EQ(rebound.status, 403) << rebound.body;
    for (const char* type :
         {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"}) {
        const Answer a = send_raw(server.port(),
                                  post(target, "", std::string("Content-Type: ") + type + "\r\n"));
        EXPECT_EQ(a.status, 415) << type << ": " << a.body;
    }
    const Answer encode = send_raw(
        server.port(), post("/encode", R"({"texts": ["x"]})", "Origin: http://evil.example\r\n"));
    EXPECT_EQ(encode.status, 403) << encode.body;
    EXPECT_TRUE(model_loaded(server.port())) << "a cross-site request unloaded the model";
    EXPECT_EQ(status_of(server.port()).at("unload_requests").at("refused").get<int>(), 6);

    // Programs send no Origin; a bare POST (no body, no type) is fine, as is this server's own.
    const std::string own = "127.0.0.1:" + std::to_string(server.port());
    const Answer same = send_raw(
        server.port(), "POST " + target + " HTTP/1.1\r\nHost: " + own + "\r\nOrigin: http://" +
                           own + "\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n");
    EXPECT_EQ(same.status, 200) << same.body;
    load_model(server.port());
    const Answer bare =
        send_raw(server.port(), "POST " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    EXPECT_EQ(bare.status, 200) << bare.body;
    EXPECT_EQ(bare.parsed().value("result", ""), "unloaded") << bare.body;
}

// Item 11: framing errors are answered at once and say what is wrong.
TEST(TorchServerHostile, BadFramingIsAnsweredAtOnceAndTruthfully) {
    Child server({});
    struct Case {
        std::string request;
        int status;
        const char* says;
    };
    const std::string tls_hello("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11);
    const std::vector<Case> cases = {
        {"POST /encode HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"},
        {"POST /encode HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n", 400,
         "Content-Length"},
        {"POST /encode HTTP/1.1\r\nContent-Length: 5x\r\n\r\n", 400, "Content-Length"},
        {"POST /encode HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n", 413,
         "larger than"},
        {"POST /encode HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
         "more than one"},
        {"POST /encode HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "chunked"},
        {tls_hello, 400, "TLS"},
        {"GET /status HTTP/1.1\r\nX-Big: " + std::string(100 << 10, 'a') + "\r\n\r\n", 431,
         "larger than"},
        {"GET /status HTTP/1.1\r\nX-Long: " + std::string(9000, 'a') + "\r\n\r\n", 431,
         "longer than 8192"},
        {"GET /status HTTP/1.1 extra\r\n\r\n", 400, "malformed"},
    };
    for (const Case& c : cases) {
        const Answer a = send_raw(server.port(), c.request, 30s);
        const std::string shown = c.request.substr(0, 60);
        EXPECT_EQ(a.status, c.status) << shown << "\n" << a.head;
        EXPECT_TRUE(a.json_error()) << shown << "\n" << a.body;
        EXPECT_NE(a.body.find(c.says), std::string::npos) << shown << "\n" << a.body;
        EXPECT_LT(a.seconds, 4.0) << shown << ": cpp-httplib's read timeout is 5 s";
    }
    // A POST with no length has no body (RFC 9112): answered at once, not after a timeout.
    const Answer bare =
        send_raw(server.port(), "POST /request-unload HTTP/1.1\r\nHost: x\r\n\r\n", 30s);
    EXPECT_EQ(bare.status, 200) << bare.body;
    EXPECT_LT(bare.seconds, 4.0);
    EXPECT_TRUE(server.alive());
}

// In process, no socket, no model: the request layer over a memory connection.
class Recorder : public torch_server::Endpoints {
   public:
    void encode(std::vector<std::string> texts, httplib::Response& res) override {
        encoded += texts.size();
        torch_server::wire::reply(res, 200, json{{"embeddings", json::array()}});
    }
    void request_unload(const torch_server::UnloadRequest& request,
                        httplib::Response& res) override {
        min_idle.push_back(request.min_idle_seconds);
        torch_server::wire::reply(res, 200, json{{"status", "ok"}});
    }
    json status() override { return {{"status", "ok"}}; }
    void metrics(httplib::Response& res) override { res.set_content("", "text/plain"); }
    std::size_t encoded = 0;
    std::vector<double> min_idle;
};

std::vector<int> statuses_of(const std::string& output) {
    std::vector<int> statuses;
    for (std::size_t at = output.find("HTTP/1.1 "); at != std::string::npos;
         at = output.find("HTTP/1.1 ", at + 1))
        statuses.push_back(std::atoi(output.c_str() + at + 9));
    return statuses;
}

std::string serve_in_memory(Recorder& recorder, const std::string& input,
                            const std::string& remote = "127.0.0.1") {
    torch_server::HardenedServer http;
    torch_server::install_routes(http, recorder, torch_server::FrontConfig{});
    torch_server::MemoryMeteredStream stream(input, remote, http.limits());
    http.serve(stream);
    return stream.output();
}

TEST(TorchServerHostile, PipelinedRequestsAreServedInOrderAndAnUnreadBodyEndsTheConnection) {
    Recorder recorder;
    const std::string output = serve_in_memory(
        recorder, post("/request-unload?min_idle_seconds=2", "") +
                      post("/encode", R"({"texts": ["a", "b"]})") +
                      post("/request-unload", "{\"min_idle_seconds\": 3}", "Origin: http://x\r\n") +
                      post("/request-unload?min_idle_seconds=4", ""));
    EXPECT_EQ(statuses_of(output), (std::vector<int>{200, 200, 403})) << output;
    EXPECT_EQ(recorder.encoded, 2u);
    EXPECT_EQ(recorder.min_idle, (std::vector<double>{2}))
        << "the refused request's body must not be read as the next request";
    EXPECT_NE(output.find("Connection: close"), std::string::npos);
}

TEST(TorchServerHostile, ChunkedBodiesAreCappedLikeOthers) {
    Recorder recorder;
    torch_server::HardenedServer http;
    torch_server::FrontConfig config;
    config.max_body_bytes = 1000;
    torch_server::install_routes(http, recorder, config);
    std::string chunked = "POST /encode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 10; ++i) chunked += "c8\r\n" + std::string(200, ' ') + "\r\n";
    chunked += "0\r\n\r\n";
    torch_server::MemoryMeteredStream stream(chunked, "127.0.0.1", http.limits());
    http.serve(stream);
    EXPECT_EQ(statuses_of(stream.output()), (std::vector<int>{413})) << stream.output();
    EXPECT_EQ(recorder.encoded, 0u);
}

}  // namespace
