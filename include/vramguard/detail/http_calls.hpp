// SPDX-License-Identifier: MIT
// The HTTP calls of one peer request (HttpCalls), all within one budget on the steady clock:
// resolving, connecting, sending and reading, each ended by the deadline and capped in bytes.
// What every adapter in peers_http.hpp talks through. Part of vramguard::peers.
#pragma once

#include <vramguard/clock.hpp>
#include <vramguard/detail/call_watchdog.hpp>
#include <vramguard/detail/peer_answers.hpp>
#include <vramguard/detail/peer_resolve.hpp>
#include <vramguard/detail/peer_url.hpp>
#include <vramguard/peers_http_options.hpp>
#include <vramguard/protocol.hpp>
#include <vramguard/version.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE
namespace peers {
namespace detail {

inline long long to_ms(Duration d) {
    return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

// What one HTTP call got: a status and a body, or why not.
struct HttpAnswer {
    int status = 0;
    std::string body;
    std::string error;  // network failure, timeout, HTTP error: a short reason
    bool ok() const noexcept { return error.empty(); }
};

// Why a body was refused before all of it was read.
enum class Refused { no, too_large, bad_length };

// The calls of one relieve(), all within one budget on the steady clock (a registry's injected
// clock may be a ManualClock that never moves: the network runs on real time). Each call ends by
// the budget's deadline, however the peer drips, and keeps at most max_peer_answer_bytes of body.
class HttpCalls {
   public:
    HttpCalls(const Url& url, const HttpPeerOptions& options, Duration budget)
        : url_(url),
          options_(options),
          budget_(budget),
          deadline_(std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(budget)) {}

    HttpAnswer get(const std::string& path) { return call("GET", path, nullptr); }
    HttpAnswer post(const std::string& path, const nlohmann::json& body) {
        return call("POST", path, &body);
    }
    HttpAnswer post(const std::string& path) {
        static const nlohmann::json no_body;
        return call("POST", path, &no_body);
    }
    bool time_left() const { return std::chrono::steady_clock::now() < deadline_; }

   private:
    HttpAnswer call(const char* method, const std::string& path, const nlohmann::json* body) {
        HttpAnswer answer;
        const auto started = std::chrono::steady_clock::now();
        httplib::Client client(url_.origin());
        answer.error = prepare(client, method, path);
        if (!answer.error.empty()) return answer;
        httplib::Request request = make_request(method, path, body);
        Refused refused = Refused::no;
        CallWatchdog::Cut cut = CallWatchdog::Cut::no;
        const httplib::Result result = [&] {
            CallWatchdog watchdog(deadline_);
            client.set_socket_options([&watchdog](socket_t fd) { watchdog.watch(fd); });
            request.response_handler = [&](const httplib::Response& response) {
                watchdog.headers_read();
                refused = length_refused(response);
                return refused == Refused::no;
            };
            request.content_receiver = [&](const char* data, std::size_t size, std::uint64_t,
                                           std::uint64_t) {
                if (size > protocol::max_peer_answer_bytes - answer.body.size()) {
                    refused = Refused::too_large;
                    return false;
                }
                answer.body.append(data, size);
                return true;
            };
            httplib::Result sent = client.send(request);
            client.set_socket_options(nullptr);  // it named the watchdog, which goes now
            cut = watchdog.cut();
            return sent;
        }();
        finish(answer, method, path, result, refused, cut, started);
        return answer;
    }

    // The answer's error, if any, from what the call got and why it may have been cut.
    void finish(HttpAnswer& answer, const char* method, const std::string& path,
                const httplib::Result& result, Refused refused, CallWatchdog::Cut cut,
                std::chrono::steady_clock::time_point started) const {
        const std::string what = std::string(method) + " " + path + ": ";
        if (cut == CallWatchdog::Cut::too_large) refused = Refused::too_large;
        if (refused != Refused::no || cut == CallWatchdog::Cut::headers_too_large) {
            answer.body.clear();
            answer.error =
                what + (refused == Refused::bad_length ? std::string("bad Content-Length")
                        : refused == Refused::too_large
                            ? "answer larger than " +
                                  std::to_string(protocol::max_peer_answer_bytes) + " bytes"
                            : "headers larger than " + std::to_string(protocol::max_header_bytes) +
                                  " bytes");
            return;
        }
        const auto now = std::chrono::steady_clock::now();
        if (!result) {
            // select() may wake a little before the deadline: a read that ran out of it is late.
            const bool late =
                cut == CallWatchdog::Cut::deadline || now >= deadline_ - (deadline_ - started) / 10;
            answer.error = what + failure_text(result.error(), late) + " after " +
                           std::to_string(to_ms(now - started)) + " ms";
            return;
        }
        answer.status = result->status;
        if (answer.status < 200 || answer.status > 299)
            answer.error =
                what + "HTTP " + std::to_string(answer.status) + error_message(answer.body);
    }

    httplib::Request make_request(const char* method, const std::string& path,
                                  const nlohmann::json* body) const {
        httplib::Request request;
        request.method = method;
        request.path = url_.prefix + path;
        if (body) {
            request.body = body->is_null() ? std::string() : body->dump();
            if (!request.body.empty()) request.set_header("Content-Type", "application/json");
        }
        return request;
    }

    // A declared Content-Length over the cap is refused before a byte of the body is read.
    static Refused length_refused(const httplib::Response& response) {
        if (!response.has_header("Content-Length")) return Refused::no;
        const std::string length = response.get_header_value("Content-Length");
        if (length.empty() || length.size() > 19 ||
            length.find_first_not_of("0123456789") != std::string::npos)
            return Refused::bad_length;
        return std::stoull(length) > protocol::max_peer_answer_bytes ? Refused::too_large
                                                                     : Refused::no;
    }

    std::chrono::microseconds time_left_from(std::chrono::steady_clock::time_point now) const {
        return std::chrono::duration_cast<std::chrono::microseconds>(deadline_ - now);
    }

    // Resolves the host within the time left (httplib's own lookup has no timeout) and bounds the
    // client's connect, write and read by what is left after: "", or why the call cannot be made.
    std::string prepare(httplib::Client& client, const char* method,
                        const std::string& path) const {
        if (time_left_from(std::chrono::steady_clock::now()).count() <= 0)
            return no_time_left(method, path);
        if (!client.is_valid()) return "cannot make a client for " + url_.origin();
        if (!is_numeric_host(url_.host)) {
            const Resolved resolved = resolve_within(
                options_.resolve, url_.host, time_left_from(std::chrono::steady_clock::now()));
            if (!resolved.error.empty())
                return std::string(method) + " " + path + ": " + resolved.error;
            client.set_hostname_addr_map({{url_.host, resolved.address}});
        }
        const auto left = time_left_from(std::chrono::steady_clock::now());
        if (left.count() <= 0) return no_time_left(method, path);
        client.set_connection_timeout(std::min<std::chrono::microseconds>(
            left, std::chrono::duration_cast<std::chrono::microseconds>(options_.connect_timeout)));
        client.set_read_timeout(left);
        client.set_write_timeout(left);
        client.set_keep_alive(false);
        client.set_follow_location(false);  // a redirect is an error answer, never followed
        if (!options_.bearer_token.empty()) client.set_bearer_token_auth(options_.bearer_token);
        return {};
    }

    std::string no_time_left(const char* method, const std::string& path) const {
        return "no time left for " + std::string(method) + " " + path + " (timeout " +
               std::to_string(to_ms(budget_)) + " ms)";
    }

    static std::string failure_text(httplib::Error error, bool out_of_time) {
        if (out_of_time) return "no answer in time";
        switch (error) {
            case httplib::Error::Connection: return "cannot connect";
            case httplib::Error::ConnectionTimeout: return "connect timed out";
            case httplib::Error::Read: return "connection closed without an answer";
            case httplib::Error::Write: return "could not send the request";
            case httplib::Error::SSLConnection:
            case httplib::Error::SSLServerVerification: return "TLS failed";
            default: return "failed (" + httplib::to_string(error) + ")";
        }
    }

    const Url& url_;
    const HttpPeerOptions& options_;
    const Duration budget_;
    const std::chrono::steady_clock::time_point deadline_;
};

}  // namespace detail
}  // namespace peers
VRAMGUARD_END_NAMESPACE
