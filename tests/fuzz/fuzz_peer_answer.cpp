// SPDX-License-Identifier: MIT
// libFuzzer target: every HTTP peer adapter's answer parser (include/vramguard/detail/
// peer_answers.hpp), fed arbitrary bytes as the body another service answered: another vramguard
// server's /request-unload and /status, Ollama's /api/ps and /api/generate, ComfyUI's /queue and
// /system_stats, llama.cpp's /models and /models/unload, vLLM's /is_sleeping and /metrics, and
// any service's error answer. Each parser sees every input.
//
// Checks, besides "no crash, no sanitizer report, no exception but FieldError":
//  - parse_json accepts only answers within the protocol's size and depth limits;
//  - every text a parser hands an operator (a reply's detail, an error message, a model's name
//    once excerpted) is valid UTF-8 without control bytes, and short;
//  - every number it returns is in its range: idle seconds within a century, counts within 2^32,
//    a freed claim above zero, requests running finite and non-negative.
#include <vramguard/detail/peer_answers.hpp>

#include "fuzz_check.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

namespace {

namespace answers = vramguard::peers::detail;
using vramguard::PeerAnswer;
using vramguard::PeerReply;

bool printable(const std::string& text, std::size_t limit) {
    if (text.size() > limit || !vramguard::protocol::is_valid_utf8(text)) return false;
    for (const char c : text)
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) return false;
    return true;
}

// Runs one parser; a FieldError is a refused answer, anything else escapes and is a crash.
template <class Parse>
void refused_or(Parse&& parse) {
    try {
        parse();
    } catch (const answers::FieldError& error) {
        FUZZ_CHECK(printable(error.what(), 400));
    }
}

void check_vramguard(const nlohmann::json& json) {
    refused_or([&] {
        const PeerReply reply = answers::vramguard_unload_reply(json, 12345);
        FUZZ_CHECK(printable(reply.detail, 400));
        if (reply.answer == PeerAnswer::freed) FUZZ_CHECK(reply.claimed_bytes > 0);
        if (reply.idle_seconds)
            FUZZ_CHECK(*reply.idle_seconds >= 0 &&
                       *reply.idle_seconds <= answers::max_peer_seconds);
    });
    refused_or([&] {
        const answers::VramguardModel model = answers::vramguard_status_model(json);
        if (!model.loaded) FUZZ_CHECK(model.bytes == 0);
    });
}

void check_others(const nlohmann::json& json) {
    refused_or([&] {
        for (const answers::OllamaModel& model : answers::ollama_models(json, 1.7e9)) {
            FUZZ_CHECK(!model.name.empty());
            FUZZ_CHECK(std::isfinite(model.expires_in));
            FUZZ_CHECK(printable(answers::excerpt(model.name, 60), 63));
        }
    });
    refused_or([&] { FUZZ_CHECK(printable(answers::ollama_unload_refusal(json), 200)); });
    refused_or([&] {
        const answers::ComfyUiQueue queue = answers::comfyui_queue(json);
        FUZZ_CHECK(queue.running + queue.pending >= queue.running);
    });
    refused_or([&] { (void)answers::comfyui_torch_bytes(json); });
    refused_or([&] {
        for (const std::string& id : answers::llamacpp_loaded(json)) FUZZ_CHECK(!id.empty());
    });
    refused_or([&] { (void)answers::llamacpp_unloaded(json); });
    refused_or([&] { (void)answers::vllm_is_sleeping(json); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view body(reinterpret_cast<const char*>(data), size);
    std::string why;
    const std::optional<nlohmann::json> json = answers::parse_json(body, &why);
    if (json) {
        FUZZ_CHECK(size <= vramguard::protocol::max_peer_answer_bytes);
        FUZZ_CHECK(
            vramguard::protocol::json_depth_within(body, vramguard::protocol::max_json_depth));
        check_vramguard(*json);
        check_others(*json);
    } else {
        FUZZ_CHECK(printable(why, 200));
    }
    FUZZ_CHECK(printable(answers::error_message(body), 200));
    refused_or([&] {
        const std::optional<double> running = answers::vllm_requests_running(body);
        if (running)
            FUZZ_CHECK(std::isfinite(*running) && *running >= 0 &&
                       *running <= answers::max_peer_count);
    });
    return 0;
}
