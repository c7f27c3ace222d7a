// SPDX-License-Identifier: MIT
// What the HTTP peers (peers_http.hpp) read from other services' answers, as pure functions of
// the bytes: no network, so each is fuzzed on its own (tests/fuzz/fuzz_peer_answer.cpp). Every
// answer is held to the protocol's limits (protocol.hpp) before it is parsed: at most
// max_peer_answer_bytes, nesting at most max_json_depth (a deep value is never built, so never
// serialised or destroyed recursively). Every number is range-checked before it is converted;
// every string echoed to an operator goes through printable_excerpt. A wrong type or a number out
// of range throws FieldError, which the adapter turns into an error answer.
//
// Needs nlohmann/json; never part of the core or of the single header.
#pragma once

#include <vramguard/peer.hpp>
#include <vramguard/protocol.hpp>
#include <vramguard/version.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

VRAMGUARD_BEGIN_NAMESPACE
namespace peers {
namespace detail {

// A wrong type, a missing required part or a number out of range in a peer's answer.
struct FieldError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Peer text fit for a log line or an error message: valid UTF-8, no control bytes, cut short.
inline std::string excerpt(std::string_view text, std::size_t limit = 120) {
    return protocol::printable_excerpt(text, limit);
}

// Parses a JSON answer within the protocol's limits; nothing (and `why`) when it is too big, too
// deep or not JSON.
inline std::optional<nlohmann::json> parse_json(std::string_view body, std::string* why = nullptr) {
    auto refuse = [&](std::string reason) -> std::optional<nlohmann::json> {
        if (why) *why = std::move(reason);
        return std::nullopt;
    };
    if (body.size() > protocol::max_peer_answer_bytes)
        return refuse("larger than " + std::to_string(protocol::max_peer_answer_bytes) + " bytes");
    if (!protocol::json_depth_within(body, protocol::max_json_depth))
        return refuse("nested deeper than " + std::to_string(protocol::max_json_depth));
    nlohmann::json json = nlohmann::json::parse(body.begin(), body.end(), nullptr, false);
    if (json.is_discarded()) return refuse("not JSON (\"" + excerpt(body, 40) + "\")");
    return json;
}

inline std::string quoted(const char* name) { return std::string("\"") + name + "\""; }

// Optional typed fields: absent (or null) is fine, a wrong type is garbage.
inline const nlohmann::json* field(const nlohmann::json& object, const char* name) {
    if (!object.is_object()) return nullptr;
    const auto it = object.find(name);
    return it == object.end() || it->is_null() ? nullptr : &*it;
}
inline std::optional<bool> bool_field(const nlohmann::json& object, const char* name) {
    const nlohmann::json* value = field(object, name);
    if (!value) return std::nullopt;
    if (!value->is_boolean()) throw FieldError(quoted(name) + " is not a boolean");
    return value->get<bool>();
}
// A number within [low, high]; anything else (NaN, 1e300, a negative count) is garbage, never
// converted.
inline std::optional<double> number_field(const nlohmann::json& object, const char* name,
                                          double low, double high) {
    const nlohmann::json* value = field(object, name);
    if (!value) return std::nullopt;
    if (!value->is_number()) throw FieldError(quoted(name) + " is not a number");
    const double number = value->get<double>();
    if (!(number >= low && number <= high))
        throw FieldError(quoted(name) + " is out of range");  // NaN fails both comparisons
    return number;
}
inline std::optional<std::string> string_field(const nlohmann::json& object, const char* name) {
    const nlohmann::json* value = field(object, name);
    if (!value) return std::nullopt;
    if (!value->is_string()) throw FieldError(quoted(name) + " is not a string");
    return value->get<std::string>();
}
inline const nlohmann::json* array_field(const nlohmann::json& object, const char* name) {
    const nlohmann::json* value = field(object, name);
    if (value && !value->is_array()) throw FieldError(quoted(name) + " is not a list");
    return value;
}

// Seconds a service says a model has been idle: up to a century; more is garbage.
inline constexpr double max_peer_seconds = 100.0 * 365 * 86400;
// A count a service reports (leases, requests running): up to 2^32; more is garbage.
inline constexpr double max_peer_count = 4294967296.0;

// Bytes: a whole non-negative number below 2^64 (JSON integers, or a float such as 6.4e9).
inline std::optional<std::uint64_t> bytes_field(const nlohmann::json& object, const char* name) {
    const nlohmann::json* value = field(object, name);
    if (!value) return std::nullopt;
    if (value->is_number_unsigned()) return value->get<std::uint64_t>();
    // 2^64 exactly is the first double that does not fit; everything below it converts.
    const std::optional<double> number = number_field(object, name, 0, 18446744073709551615.0);
    if (*number >= 18446744073709551616.0) throw FieldError(quoted(name) + " is out of range");
    return static_cast<std::uint64_t>(*number);
}

inline std::uint64_t add_bytes(std::uint64_t a, std::uint64_t b) noexcept {
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

inline std::string join(const std::vector<std::string>& items) {
    std::string text;
    for (const std::string& item : items) text += (text.empty() ? "" : ", ") + item;
    return text;
}

// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's civil-days algorithm).
inline long long days_from_civil(long long y, unsigned m, unsigned d) noexcept {
    y -= m <= 2;
    const long long era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = static_cast<unsigned>(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + static_cast<long long>(doe) - 719468;
}

// Seconds since the Unix epoch of an RFC 3339 time ("2024-06-04T14:38:31.83753-07:00", "...Z"),
// as Go's time.Time marshals it; none when it does not parse. A double: Ollama's pinned models
// expire in the 2300s, past what a nanosecond system_clock can hold.
inline std::optional<double> parse_rfc3339(const std::string& text) {
    int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0, used = 0;
    if (std::sscanf(text.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &year, &month, &day, &hour, &minute,
                    &second, &used) != 6 ||
        used != 19)
        return std::nullopt;
    if (month < 1 || month > 12 || day < 1 || day > 31 || hour < 0 || hour > 23 || minute < 0 ||
        minute > 59 || second < 0 || second > 60 || year < 0)
        return std::nullopt;
    std::size_t at = 19;
    double fraction = 0;
    if (at < text.size() && text[at] == '.') {
        double scale = 0.1;
        ++at;
        const std::size_t digits_start = at;
        while (at < text.size() && text[at] >= '0' && text[at] <= '9') {
            fraction += (text[at] - '0') * scale;
            scale /= 10;
            ++at;
        }
        if (at == digits_start) return std::nullopt;
    }
    long long offset = 0;
    if (at < text.size() && (text[at] == 'Z' || text[at] == 'z')) {
        ++at;
    } else if (at < text.size() && (text[at] == '+' || text[at] == '-')) {
        int oh = 0, om = 0, n = 0;
        if (std::sscanf(text.c_str() + at + 1, "%2d:%2d%n", &oh, &om, &n) != 2 || n != 5 ||
            oh < 0 || om < 0)
            return std::nullopt;
        offset = (oh * 3600LL + om * 60LL) * (text[at] == '-' ? -1 : 1);
        at += 6;
    } else {
        return std::nullopt;
    }
    if (at != text.size()) return std::nullopt;
    const long long days =
        days_from_civil(year, static_cast<unsigned>(month), static_cast<unsigned>(day));
    return static_cast<double>(days * 86400LL + hour * 3600LL + minute * 60LL + second - offset) +
           fraction;
}

inline double unix_now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// ": <message>" from an error answer's {"error": "..."} or {"error": {"message": "..."}}
// (llama.cpp), else "".
inline std::string error_message(std::string_view body) {
    const std::optional<nlohmann::json> json = parse_json(body);
    if (!json || !json->is_object()) return "";
    const auto error = json->find("error");
    if (error == json->end()) return "";
    if (error->is_string()) return ": " + excerpt(error->get<std::string>());
    if (error->is_object()) {
        const auto message = error->find("message");
        if (message != error->end() && message->is_string())
            return ": " + excerpt(message->get<std::string>());
    }
    return "";
}

// ---- another vramguard server (the seeds' protocol)
// ----------------------------------------------

// POST /request-unload's answer: {"status": "ok"|"busy", "unloaded": bool, "message": str,
// "idle_seconds": s} or, from earlier servers, {"result": "unloaded"|"busy"|"not_loaded",
// "idle_seconds": s, "leases": n, "freed_bytes": b}. `unknown_claim`: the bytes to claim when it
// unloaded without saying how much.
inline PeerReply vramguard_unload_reply(const nlohmann::json& json, std::uint64_t unknown_claim) {
    if (!json.is_object()) return PeerReply::error("garbage answer: not a JSON object");
    const std::optional<std::string> status = string_field(json, "status");
    const std::optional<std::string> result = string_field(json, "result");
    const std::optional<bool> unloaded = bool_field(json, "unloaded");
    const std::optional<double> idle = number_field(json, "idle_seconds", 0, max_peer_seconds);
    const std::optional<double> leases = number_field(json, "leases", 0, max_peer_count);
    const std::string message = excerpt(string_field(json, "message").value_or(""));
    std::optional<std::uint64_t> bytes = bytes_field(json, "freed_bytes");
    if (!bytes) bytes = bytes_field(json, "bytes");
    if (unloaded.value_or(false) || result == std::optional<std::string>("unloaded"))
        return PeerReply::freed(bytes && *bytes > 0 ? *bytes : unknown_claim, message);
    if (status == std::optional<std::string>("busy") ||
        result == std::optional<std::string>("busy")) {
        std::string detail = message;
        if (detail.empty() && leases && *leases >= 1)
            detail = std::to_string(static_cast<std::uint64_t>(*leases)) + " leased";
        return PeerReply::busy(idle, detail);
    }
    if (status == std::optional<std::string>("ok") ||
        result == std::optional<std::string>("not_loaded"))
        return PeerReply::nothing(message);
    return PeerReply::error("unexpected answer: no known \"status\" or \"result\"");
}

// GET /status: the bytes its model holds (0 when none is loaded).
struct VramguardModel {
    bool loaded = false;
    std::uint64_t bytes = 0;
};
inline VramguardModel vramguard_status_model(const nlohmann::json& json) {
    const nlohmann::json* model = field(json, "model");
    if (!model || !model->is_object()) throw FieldError("/status names no model");
    VramguardModel result;
    result.loaded = bool_field(*model, "loaded").value_or(false);
    result.bytes = result.loaded ? bytes_field(*model, "bytes").value_or(0) : 0;
    return result;
}

// ---- Ollama ----------------------------------------------------------------------------------

struct OllamaModel {
    std::string name;
    std::uint64_t vram = 0;
    double expires_in = 0;  // seconds from `now`
};

// GET /api/ps: {"models": [{"name", "size_vram", "expires_at"}, ...]}. A model that does not say
// when it expires counts as pinned, so it is never unloaded on a guess.
inline std::vector<OllamaModel> ollama_models(const nlohmann::json& json, double now) {
    const nlohmann::json* list = array_field(json, "models");
    if (!json.is_object() || !list) throw FieldError("no \"models\" list in /api/ps");
    std::vector<OllamaModel> models;
    for (const nlohmann::json& entry : *list) {
        if (!entry.is_object()) throw FieldError("a model in /api/ps is not an object");
        OllamaModel model;
        model.name =
            string_field(entry, "name").value_or(string_field(entry, "model").value_or(""));
        if (model.name.empty()) throw FieldError("a model in /api/ps has no name");
        model.vram = bytes_field(entry, "size_vram").value_or(0);
        const std::optional<std::string> expires = string_field(entry, "expires_at");
        const std::optional<double> at = expires ? parse_rfc3339(*expires) : std::nullopt;
        if (expires && !at)
            throw FieldError("\"expires_at\" of " + excerpt(model.name, 60) + " is not a time");
        model.expires_in = at ? *at - now : 1e18;
        models.push_back(std::move(model));
    }
    return models;
}

// POST /api/generate {"keep_alive": 0}: unloaded unless it names another done_reason ("" = yes,
// else why not).
inline std::string ollama_unload_refusal(const nlohmann::json& json) {
    const std::optional<std::string> reason = string_field(json, "done_reason");
    if (reason && *reason != "unload")
        return "answered done_reason \"" + excerpt(*reason, 20) + "\", not \"unload\"";
    return {};
}

// ---- ComfyUI ---------------------------------------------------------------------------------

struct ComfyUiQueue {
    std::size_t running = 0, pending = 0;
};

// GET /queue: both lists are required; an object without them is not an idle ComfyUI.
inline ComfyUiQueue comfyui_queue(const nlohmann::json& json) {
    if (!json.is_object()) throw FieldError("/queue is not an object");
    const nlohmann::json* running = array_field(json, "queue_running");
    const nlohmann::json* pending = array_field(json, "queue_pending");
    if (!running || !pending)
        throw FieldError("/queue has no \"queue_running\" and \"queue_pending\" lists");
    return {running->size(), pending->size()};
}

// GET /system_stats: devices[0].torch_vram_total, what its PyTorch allocator holds.
inline std::uint64_t comfyui_torch_bytes(const nlohmann::json& json) {
    const nlohmann::json* devices = array_field(json, "devices");
    if (!devices || devices->empty() || !(*devices)[0].is_object())
        throw FieldError("/system_stats lists no device");
    const std::optional<std::uint64_t> torch = bytes_field((*devices)[0], "torch_vram_total");
    if (!torch) throw FieldError("/system_stats has no torch_vram_total");
    return *torch;
}

// ---- llama.cpp router ------------------------------------------------------------------------

// GET /models: the ids of data[] whose status (or status.value) is "loaded".
inline std::vector<std::string> llamacpp_loaded(const nlohmann::json& json) {
    const nlohmann::json* data = array_field(json, "data");
    if (!data) throw FieldError("no \"data\" list in /models (is it in router mode?)");
    std::vector<std::string> models;
    for (const nlohmann::json& entry : *data) {
        const std::optional<std::string> id = string_field(entry, "id");
        const nlohmann::json* status = field(entry, "status");
        std::optional<std::string> value;
        if (status && status->is_object()) value = string_field(*status, "value");
        if (status && status->is_string()) value = status->get<std::string>();
        if (id && !id->empty() && value == std::optional<std::string>("loaded"))
            models.push_back(*id);
    }
    return models;
}

// POST /models/unload: {"success": true}.
inline bool llamacpp_unloaded(const nlohmann::json& json) {
    return bool_field(json, "success") == std::optional<bool>(true);
}

// ---- vLLM ------------------------------------------------------------------------------------

// GET /is_sleeping: {"is_sleeping": bool}, required.
inline bool vllm_is_sleeping(const nlohmann::json& json) {
    const std::optional<bool> asleep = bool_field(json, "is_sleeping");
    if (!asleep) throw FieldError("/is_sleeping has no \"is_sleeping\"");
    return *asleep;
}

// The sum of the vllm:num_requests_running samples of a Prometheus text exposition; none when
// there is none. A sample that is not a count (NaN, negative, 1e300) is garbage.
inline std::optional<double> vllm_requests_running(std::string_view text) {
    static constexpr std::string_view metric = "vllm:num_requests_running";
    std::optional<double> sum;
    std::size_t at = 0;
    while (at < text.size()) {
        std::size_t end = text.find('\n', at);
        if (end == std::string_view::npos) end = text.size();
        const std::string_view line = text.substr(at, end - at);
        at = end + 1;
        if (line.substr(0, metric.size()) != metric) continue;
        if (line.size() <= metric.size() ||
            (line[metric.size()] != '{' && line[metric.size()] != ' '))
            continue;
        // The value follows the label set; an optional timestamp may follow it.
        std::size_t from = metric.size();
        if (line[from] == '{') {
            from = line.find('}', from);
            if (from == std::string_view::npos) continue;
            ++from;
        }
        while (from < line.size() && line[from] == ' ') ++from;
        const std::size_t until = std::min(line.find(' ', from), line.size());
        if (from >= until) continue;
        const std::string value_text(line.substr(from, until - from));
        char* parsed_end = nullptr;
        const double value = std::strtod(value_text.c_str(), &parsed_end);
        if (parsed_end == value_text.c_str()) continue;
        if (!(value >= 0 && value <= max_peer_count))
            throw FieldError("vllm:num_requests_running is out of range");
        sum = sum.value_or(0) + value;
    }
    if (sum && *sum > max_peer_count) throw FieldError("vllm:num_requests_running is out of range");
    return sum;
}

}  // namespace detail
}  // namespace peers
VRAMGUARD_END_NAMESPACE
