// SPDX-License-Identifier: MIT
// Everything the server decides about a request before its model is involved, with no LibTorch:
// the routes, which requests are refused and why, how bodies and parameters are read and checked,
// and the JSON of every error answer. The encoder side implements Endpoints (server.hpp); the HTTP
// fuzzer (tests/fuzz/fuzz_http_server.cpp) drives this layer with a recording Endpoints.
//
// Rules every answer keeps, whatever arrives: a 4xx or 503 with a JSON body, never a crash, never
// an exception out of a handler. Every byte of the request that is echoed goes through
// vramguard::protocol::printable_excerpt; every JSON text is checked for UTF-8 and depth
// (vramguard::protocol, one place for the limits) before it is parsed; every answer is serialised
// with invalid UTF-8 replaced rather than thrown on (cpp-httplib calls the error handler outside
// its try/catch: a throw there aborted the server).
#pragma once

#include "connections.hpp"
#include "unload_access.hpp"

#include <vramguard/protocol.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace torch_server {

using json = nlohmann::json;

struct FrontConfig {
    std::size_t max_body_bytes = 64u << 20;  // a larger body is a 413 before it is read
    std::size_t max_texts = 1024;            // per /encode
    std::string unload_token;                // "" = /request-unload from loopback only
    std::chrono::milliseconds default_min_idle{vramguard::protocol::default_min_idle};
};

// A /request-unload that passed every check.
struct UnloadRequest {
    double min_idle_seconds = 30;
    std::optional<std::uint64_t> wanted_bytes;  // none: as much as there is
};

// What the encoder side provides. Each call gets a request that passed this layer's checks.
class Endpoints {
   public:
    virtual ~Endpoints() = default;
    virtual void encode(std::vector<std::string> texts, httplib::Response& res) = 0;
    virtual void request_unload(const UnloadRequest& request, httplib::Response& res) = 0;
    virtual json status() = 0;
    virtual void metrics(httplib::Response& res) = 0;
    // Counters for /status: an /encode that was read, a 400 (from /request-unload or not), a
    // /request-unload refused (401, 403, 415).
    virtual void on_encode_request() {}
    virtual void on_bad_request(bool /*unload*/) {}
    virtual void on_unload_refused() {}
};

namespace wire {

inline std::string dump_safely(const json& value) {
    return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

inline void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(dump_safely(body), "application/json");
}

inline void reply_error(httplib::Response& res, int status, const std::string& message) {
    reply(res, status, json{{"error", message}});
}

inline std::string excerpt(std::string_view text) {
    return vramguard::protocol::printable_excerpt(text, 200);
}

inline void close_after_answer() {
    if (RequestFacts* facts = current_request()) facts->close_after = true;
}

inline bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(a[i])) !=
            std::tolower(static_cast<unsigned char>(b[i])))
            return false;
    return true;
}

// A non-negative decimal: digits, at most one '.', an optional exponent. Nothing else, not
// empty, not "nan", not "inf", no sign, no spaces: "?min_idle_seconds=" must never read as 0.
inline std::optional<double> parse_decimal(std::string_view text) {
    std::size_t i = 0, digits = 0;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++digits;
    if (i < text.size() && text[i] == '.') {
        ++i;
        while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++digits;
    }
    if (digits == 0) return std::nullopt;
    if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
        ++i;
        if (i < text.size() && (text[i] == '+' || text[i] == '-')) ++i;
        const std::size_t start = i;
        while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
        if (i == start) return std::nullopt;
    }
    if (i != text.size() || text.size() > 64) return std::nullopt;
    const double value = std::strtod(std::string(text).c_str(), nullptr);
    if (!std::isfinite(value)) return std::nullopt;
    return value;
}

// Content-Length as RFC 9110 has it (1*DIGIT), no larger than 2^64-1; nullopt otherwise.
inline std::optional<std::uint64_t> parse_content_length(std::string_view text) {
    if (text.empty() || text.size() > 20) return std::nullopt;
    std::uint64_t value = 0;
    for (const char c : text) {
        if (c < '0' || c > '9') return std::nullopt;
        const auto digit = static_cast<std::uint64_t>(c - '0');
        if (value > (UINT64_MAX - digit) / 10) return std::nullopt;
        value = value * 10 + digit;
    }
    return value;
}

inline bool has_body_framing(const httplib::Request& req) {
    return req.has_header("Content-Length") || req.has_header("Transfer-Encoding");
}

// A browser sends Origin with every cross-site POST; curl, Python and peers send none. Accepted:
// no Origin, or this server itself (http://HOST where Host is an address or localhost, so a DNS
// rebinding name that points here is still foreign).
inline bool origin_allowed(const httplib::Request& req) {
    if (!req.has_header("Origin")) return true;
    const std::string origin = req.get_header_value("Origin");
    const std::string host = req.get_header_value("Host");
    if (host.empty() || !iequals(origin, "http://" + host)) return false;
    std::string name = host.substr(0, host.rfind(':'));
    if (!name.empty() && name.front() == '[') name = name.substr(1, name.size() - 2);
    if (iequals(name, "localhost")) return true;
    unsigned char address[16];
    return ::inet_pton(AF_INET, name.c_str(), address) == 1 ||
           ::inet_pton(AF_INET6, name.c_str(), address) == 1;
}

// application/json (any parameters), or no Content-Type at all (a bare POST).
inline bool json_or_no_content_type(const httplib::Request& req) {
    if (!req.has_header("Content-Type")) return true;
    std::string type = req.get_header_value("Content-Type");
    type = type.substr(0, type.find(';'));
    while (!type.empty() && (type.back() == ' ' || type.back() == '\t')) type.pop_back();
    return iequals(type, "application/json");
}

struct Refusal {
    int status;
    std::string message;
};

// The framing and the origin, checked before any body is read; a refusal closes the connection
// (its body, if any, stays unread).
inline std::optional<Refusal> check_framing(const httplib::Request& req, std::size_t max_body) {
    const std::size_t lengths = req.get_header_value_count("Content-Length");
    if (lengths > 1) return Refusal{400, "more than one Content-Length header"};
    if (lengths == 1) {
        const std::string text = req.get_header_value("Content-Length");
        const auto length = parse_content_length(text);
        if (!length)
            return Refusal{400, "Content-Length must be a decimal number of bytes, got \"" +
                                    excerpt(text) + "\""};
        if (*length > max_body)
            return Refusal{413, "the request body (Content-Length " + std::to_string(*length) +
                                    ") is larger than " + std::to_string(max_body) +
                                    " bytes; send fewer texts per request"};
    }
    if (req.has_header("Transfer-Encoding")) {
        if (!iequals(req.get_header_value("Transfer-Encoding"), "chunked"))
            return Refusal{501, "only Transfer-Encoding: chunked is understood, got \"" +
                                    excerpt(req.get_header_value("Transfer-Encoding")) + "\""};
        if (lengths > 0)
            return Refusal{400, "both Content-Length and Transfer-Encoding: send one of them"};
    }
    if (req.has_header("Content-Encoding") &&
        !iequals(req.get_header_value("Content-Encoding"), "identity"))
        return Refusal{415, "send the body uncompressed (no Content-Encoding)"};
    return std::nullopt;
}

inline bool is_endpoint(const httplib::Request& req) {
    if (req.method == "GET" || req.method == "HEAD")
        return req.path == "/status" || req.path == "/metrics";
    return req.method == "POST" && (req.path == "/encode" || req.path == "/request-unload");
}

inline std::string no_endpoint(const httplib::Request& req) {
    return "no endpoint " + excerpt(req.method) + " " + excerpt(req.path) +
           "; there are POST /encode, POST /request-unload, GET /status, GET /metrics";
}

inline std::optional<Refusal> check_request(const httplib::Request& req, std::size_t max_body) {
    // Before cpp-httplib reads a body for a route that does not exist (a POST without a length
    // it would read until the client closed).
    if (!is_endpoint(req)) return Refusal{404, no_endpoint(req)};
    if (auto refusal = check_framing(req, max_body)) return refusal;
    if (req.method != "POST") return std::nullopt;
    if (!origin_allowed(req))
        return Refusal{
            403, "a request from a web page (Origin: " + excerpt(req.get_header_value("Origin")) +
                     ") is refused: this server changes state on POST and serves no "
                     "pages; call it from a program, which sends no Origin"};
    if (req.path == "/request-unload" && !json_or_no_content_type(req))
        return Refusal{415,
                       "POST /request-unload takes Content-Type: application/json or none "
                       "(a bare POST), got \"" +
                           excerpt(req.get_header_value("Content-Type")) + "\""};
    return std::nullopt;
}

// The whole body, read here rather than by cpp-httplib: it caps a body sent as
// application/x-www-form-urlencoded (curl -d's default) at 8 KB, and a JSON request is JSON
// whatever its Content-Type says. No Content-Length and no chunked encoding: no body (RFC 9112
// 6.3; cpp-httplib would read until the client closes). Chunked bodies are capped here too
// (cpp-httplib checks only Content-Length). False when the read failed: the status is set (413
// over the cap, 400) and the error handler writes the body.
inline bool read_body(const httplib::Request& req, httplib::Response& res,
                      const httplib::ContentReader& content_reader, std::size_t max_body,
                      std::string& body) {
    if (req.is_multipart_form_data()) {
        close_after_answer();  // left unread: the answer says what to send instead
        return true;
    }
    if (!has_body_framing(req)) return true;
    bool too_large = false;
    const bool ok = content_reader([&](const char* data, std::size_t size) {
        if (size > max_body - body.size()) {
            too_large = true;
            return false;
        }
        body.append(data, size);
        return true;
    });
    if (ok) return true;
    close_after_answer();
    if (too_large) res.status = 413;
    if (res.status < 400) res.status = 400;
    return false;
}

// A JSON text checked before it is parsed: UTF-8 and depth. A discarded value when it is not
// JSON; `error` says why.
inline json parse_checked(const std::string& text, std::string& error) {
    if (!vramguard::protocol::is_valid_utf8(text)) {
        error = "the body is not valid UTF-8";
        return json(json::value_t::discarded);
    }
    if (!vramguard::protocol::json_depth_within(text, vramguard::protocol::max_json_depth)) {
        error = "the body nests arrays or objects deeper than " +
                std::to_string(vramguard::protocol::max_json_depth) + " levels";
        return json(json::value_t::discarded);
    }
    try {
        return json::parse(text);
    } catch (const json::exception& e) {
        error = "malformed JSON: " + excerpt(e.what());
        return json(json::value_t::discarded);
    }
}

// {"texts": [string, ...]}; nullopt with `error` on a bad body.
inline std::optional<std::vector<std::string>> parse_texts(const httplib::Request& req,
                                                           const std::string& text,
                                                           std::size_t max_texts,
                                                           std::string& error) {
    if (req.is_multipart_form_data()) {
        error =
            "send the texts as JSON, {\"texts\": [...]} with Content-Type: application/json, not "
            "as a multipart form";
        return std::nullopt;
    }
    const json body = parse_checked(text, error);
    if (body.is_discarded()) return std::nullopt;
    if (!body.is_object())
        return error = "the body must be a JSON object: {\"texts\": [...]}", std::nullopt;
    const auto texts = body.find("texts");
    if (texts == body.end())
        return error = "missing field \"texts\" (an array of strings)", std::nullopt;
    if (!texts->is_array()) return error = "\"texts\" must be an array of strings", std::nullopt;
    if (texts->size() > max_texts) {
        error = "too many texts: " + std::to_string(texts->size()) + " (at most " +
                std::to_string(max_texts) + " per request)";
        return std::nullopt;
    }
    std::vector<std::string> result;
    result.reserve(texts->size());
    for (std::size_t i = 0; i < texts->size(); ++i) {
        const json& item = (*texts)[i];
        if (!item.is_string()) {
            error = "texts[" + std::to_string(i) + "] is " + item.type_name() + ", not a string";
            return std::nullopt;
        }
        result.push_back(item.get<std::string>());
    }
    return result;
}

// A number of seconds or bytes from the query string or the JSON body (the query wins): absent,
// or a number in [0, max]. False with `error` otherwise: an empty value, garbage, a sign, NaN,
// infinity, too large, or the parameter twice.
inline bool read_number(const httplib::Request& req, const json& body, const std::string& name,
                        double max, std::optional<double>& value, std::string& error) {
    if (req.has_param(name)) {
        const std::string text = req.get_param_value(name);
        const auto number = parse_decimal(text);
        if (req.get_param_value_count(name) > 1) {
            error = name + " is given more than once";
            return false;
        }
        if (!number || *number > max) {
            error = name + " must be a number from 0 to " + excerpt(json(max).dump()) + ", got \"" +
                    excerpt(text) + "\"";
            return false;
        }
        value = number;
        return true;
    }
    const auto field = body.is_object() ? body.find(name) : body.end();
    if (!body.is_object() || field == body.end() || field->is_null()) return true;
    if (!field->is_number() || !std::isfinite(field->get<double>()) || field->get<double>() < 0 ||
        field->get<double>() > max) {
        error = name + " must be a number from 0 to " + excerpt(json(max).dump()) + ", got " +
                excerpt(dump_safely(*field));
        return false;
    }
    value = field->get<double>();
    return true;
}

inline std::optional<UnloadRequest> parse_unload(const httplib::Request& req,
                                                 const std::string& text,
                                                 std::chrono::milliseconds default_min_idle,
                                                 std::string& error) {
    json body = json::object();
    if (text.find_first_not_of(" \t\r\n") != std::string::npos) {
        body = parse_checked(text, error);
        if (body.is_discarded()) return std::nullopt;
        if (!body.is_object()) {
            error =
                "the body must be empty or a JSON object ({\"min_idle_seconds\": 30, "
                "\"wanted_bytes\": N}); parameters also go in the query string";
            return std::nullopt;
        }
    }
    std::optional<double> min_idle, wanted;
    if (!read_number(req, body, "min_idle_seconds", 1e9, min_idle, error) ||
        !read_number(req, body, "wanted_bytes", 1.8e19, wanted, error))
        return std::nullopt;
    UnloadRequest request;
    request.min_idle_seconds =
        min_idle.value_or(std::chrono::duration<double>(default_min_idle).count());
    if (wanted) request.wanted_bytes = static_cast<std::uint64_t>(*wanted);
    return request;
}

// What cpp-httplib answers by itself (a request it could not parse, 404, a body it could not
// read) comes with an empty body and often a status that hides the cause: say in JSON what
// happened and what to send. Answers this server wrote already carry a body and are left alone.
inline std::string explain(const httplib::Request& req, int& status) {
    const RequestFacts* facts = current_request();
    const bool unparsed = req.remote_addr.empty();  // set only once the headers were read
    if (facts && facts->not_http)
        return status = 400,
               "this port speaks plain HTTP/1.1 and the request does not begin with a method "
               "(a TLS handshake? use http://, not https://)";
    if (facts && facts->headers_too_large)
        return status = 431, "the request line and headers are larger than " +
                                 std::to_string(facts->max_header_bytes) + " bytes";
    if (facts && facts->late)
        return status = 408, "the request did not arrive in time (its line and headers within " +
                                 std::to_string(facts->header_deadline.count() / 1000) +
                                 " s of its first byte, all of it within the request deadline)";
    if (status == 414) return "the request line is longer than 8192 bytes";
    if (unparsed && facts && facts->longest_line > 8192)
        return status = 431, "a header line is longer than 8192 bytes";
    if (unparsed)
        return status = 400,
               "malformed request: expected \"METHOD /path HTTP/1.1\" and header lines, each "
               "ending in CRLF";
    switch (status) {
        case 404: return no_endpoint(req);
        case 413: return "the request body is larger than the limit; send fewer texts per request";
        case 400:
            return "the request body could not be read (it ended before its Content-Length, or "
                   "its chunked encoding is malformed)";
        case 415: return "send the body uncompressed (no Content-Encoding)";
        case 416: return "Range is not supported";
        default: return "HTTP " + std::to_string(status);
    }
}

// Range is ignored (RFC 9110 14.2 lets a server): cpp-httplib would cut every answer, errors
// included, to the range asked for, and a slice of JSON is not JSON. The Request is cpp-httplib's
// own non-const object, handed to handlers as const.
inline void ignore_ranges(const httplib::Request& req) {
    const_cast<httplib::Request&>(req).ranges.clear();
}

inline httplib::Server::HandlerResponse explain_error(const httplib::Request& req,
                                                      httplib::Response& res) noexcept {
    try {
        ignore_ranges(req);
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        if (req.remote_addr.empty() || res.status == 408) close_after_answer();
        int status = res.status;
        const std::string message = explain(req, status);
        if (status == 408 || status == 431) close_after_answer();
        res.status = status;
        res.set_content(dump_safely(json{{"error", message}}), "application/json");
        return httplib::Server::HandlerResponse::Handled;
    } catch (...) {
        return httplib::Server::HandlerResponse::Unhandled;  // an empty body, never a crash
    }
}

inline void answer_exception(httplib::Response& res, std::exception_ptr error) noexcept {
    std::string message = "internal error";
    try {
        if (error) std::rethrow_exception(error);
    } catch (const std::exception& e) {
        message = "internal error: " + excerpt(e.what());
    } catch (...) {
    }
    try {
        reply_error(res, 500, message);
    } catch (...) {
        res.status = 500;
    }
}

// cpp-httplib writes "Keep-Alive" unless the request said "Connection: close"; an answer that
// ends the connection says so instead.
inline void mark_connection(httplib::Response& res) {
    const RequestFacts* facts = current_request();
    if (!facts || !facts->close_after) return;
    res.headers.erase("Keep-Alive");
    res.set_header("Connection", "close");
}

}  // namespace wire

// Installs the routes and every handler of this layer on `http`. `endpoints` must outlive it.
inline void install_routes(HardenedServer& http, Endpoints& endpoints, const FrontConfig& config) {
    http.set_pre_routing_handler([&endpoints, max_body = config.max_body_bytes](
                                     const httplib::Request& req, httplib::Response& res) {
        wire::ignore_ranges(req);
        auto refusal = wire::check_request(req, max_body);
        if (!refusal) return httplib::Server::HandlerResponse::Unhandled;
        // The body, if any, stays unread; a GET's 404 can keep the connection.
        if (refusal->status != 404 || wire::has_body_framing(req) || req.method != "GET")
            wire::close_after_answer();
        if (req.path == "/request-unload" && (refusal->status == 403 || refusal->status == 415))
            endpoints.on_unload_refused();
        wire::reply_error(res, refusal->status, refusal->message);
        return httplib::Server::HandlerResponse::Handled;
    });
    http.Post("/encode", [&endpoints, config](const httplib::Request& req, httplib::Response& res,
                                              const httplib::ContentReader& reader) {
        std::string body;
        if (!wire::read_body(req, res, reader, config.max_body_bytes, body)) return;
        endpoints.on_encode_request();
        std::string error;
        auto texts = wire::parse_texts(req, body, config.max_texts, error);
        if (!texts) {
            endpoints.on_bad_request(false);
            return wire::reply_error(res, 400, error);
        }
        endpoints.encode(std::move(*texts), res);
    });
    http.Post(
        "/request-unload", [&endpoints, config](const httplib::Request& req, httplib::Response& res,
                                                const httplib::ContentReader& reader) {
            const UnloadAccess access = decide_unload_access(req.remote_addr, config.unload_token,
                                                             req.get_header_value("Authorization"));
            if (!access.allowed) {
                endpoints.on_unload_refused();
                if (wire::has_body_framing(req)) wire::close_after_answer();  // left unread
                if (access.status == 401) res.set_header("WWW-Authenticate", "Bearer");
                return wire::reply(res, access.status,
                                   json{{"status", "refused"},
                                        {"unloaded", false},
                                        {"message", access.reason},
                                        {"error", access.reason}});
            }
            std::string body, error;
            if (!wire::read_body(req, res, reader, config.max_body_bytes, body)) return;
            const auto request = wire::parse_unload(req, body, config.default_min_idle, error);
            if (!request) {
                endpoints.on_bad_request(true);
                return wire::reply_error(res, 400, error);
            }
            endpoints.request_unload(*request, res);
        });
    http.Get("/status", [&endpoints](const httplib::Request&, httplib::Response& res) {
        wire::reply(res, 200, endpoints.status());
    });
    http.Get("/metrics", [&endpoints](const httplib::Request&, httplib::Response& res) {
        endpoints.metrics(res);
    });
    http.set_payload_max_length(config.max_body_bytes);
    http.set_error_handler(httplib::Server::HandlerWithResponse(
        [](const httplib::Request& req, httplib::Response& res) {
            return wire::explain_error(req, res);
        }));
    http.set_exception_handler(
        [](const httplib::Request&, httplib::Response& res, std::exception_ptr error) {
            wire::answer_exception(res, error);
        });
    http.set_post_routing_handler(
        [](const httplib::Request&, httplib::Response& res) { wire::mark_connection(res); });
}

// A request path or other client text made safe for a log line.
inline std::string loggable(std::string_view text) { return wire::excerpt(text); }

}  // namespace torch_server
