// SPDX-License-Identifier: MIT
// The seeds' signalling protocol (POST /request-unload, GET /status) in one public place: its
// defaults, and the limits every byte that comes from the network or a peer is held to before it is
// parsed. Both sides use it: the HTTP peer adapters (peers_http.hpp) that read other services'
// answers, and a server that answers them (examples/torch_server). Standard library only.
//
// Why the checks live here and not in a JSON library's options: nlohmann/json parses any depth
// with its own stack, but serialising or destroying a 1M-deep value recurses and overflows the
// thread's stack; and a strict serialiser throws on invalid UTF-8 it was handed. Checking the raw
// bytes first (one linear scan, no allocation) keeps every later step safe.
#pragma once

#include <vramguard/version.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

VRAMGUARD_BEGIN_NAMESPACE

namespace protocol {

// POST /request-unload without min_idle_seconds: a model is given up only when unused this long,
// so two servers taking turns never unload a model the other used a second ago.
inline constexpr std::chrono::seconds default_min_idle{30};

// Nesting deeper than this is refused before parsing. The protocol's messages nest two or three
// levels; Ollama's /api/ps and ComfyUI's /queue about five. 64 leaves room for any honest service
// and keeps a recursive walk far from any thread's stack limit.
inline constexpr std::size_t max_json_depth = 64;

// An answer from a peer larger than this is cut off and counted as an error: the biggest honest
// one (Ollama's /api/ps with dozens of models, vLLM's /metrics) is a few hundred KiB.
inline constexpr std::size_t max_peer_answer_bytes = 4u << 20;

// An HTTP message's start line and headers, together, larger than this are refused: honest ones
// are a few hundred bytes, and a parser that keeps every header line would otherwise grow without
// bound on an endless header.
inline constexpr std::size_t max_header_bytes = 64u << 10;

// Whether the JSON text nests arrays and objects at most max_depth deep. Brackets inside strings
// do not count (escapes are honoured); anything else is left to the parser.
inline bool json_depth_within(std::string_view text, std::size_t max_depth) noexcept {
    std::size_t depth = 0;
    bool in_string = false;
    bool escaped = false;
    for (const char c : text) {
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
            continue;
        }
        if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth) return false;
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
    return true;
}

// Whether the bytes are well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
// above U+10FFFF), which is what a strict JSON serialiser accepts.
inline bool is_valid_utf8(std::string_view text) noexcept {
    const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
    const std::size_t size = text.size();
    std::size_t i = 0;
    while (i < size) {
        const unsigned char lead = bytes[i];
        std::size_t length = 0;
        unsigned char low = 0x80;  // the second byte's allowed range
        unsigned char high = 0xBF;
        if (lead < 0x80)
            length = 1;
        else if (lead >= 0xC2 && lead <= 0xDF)
            length = 2;
        else if (lead == 0xE0)
            length = 3, low = 0xA0;
        else if (lead >= 0xE1 && lead <= 0xEC)
            length = 3;
        else if (lead == 0xED)
            length = 3, high = 0x9F;
        else if (lead >= 0xEE && lead <= 0xEF)
            length = 3;
        else if (lead == 0xF0)
            length = 4, low = 0x90;
        else if (lead >= 0xF1 && lead <= 0xF3)
            length = 4;
        else if (lead == 0xF4)
            length = 4, high = 0x8F;
        else
            return false;
        if (size - i < length) return false;
        for (std::size_t k = 1; k < length; ++k) {
            const unsigned char next = bytes[i + k];
            const unsigned char lo = k == 1 ? low : 0x80;
            const unsigned char hi = k == 1 ? high : 0xBF;
            if (next < lo || next > hi) return false;
        }
        i += length;
    }
    return true;
}

// The text with every byte that is not part of well-formed UTF-8 replaced by '?' and cut to
// max_bytes: safe to echo in an error message or a log line, whatever a client or peer sent.
inline std::string printable_excerpt(std::string_view text, std::size_t max_bytes = 200) {
    std::string out;
    out.reserve(text.size() < max_bytes ? text.size() : max_bytes);
    std::size_t i = 0;
    while (i < text.size() && out.size() < max_bytes) {
        std::size_t length = 1;
        const auto lead = static_cast<unsigned char>(text[i]);
        if (lead >= 0xC2 && lead <= 0xF4) length = lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
        const std::string_view piece = text.substr(i, length);
        const bool control = lead < 0x20 || lead == 0x7F;
        if (piece.size() == length && is_valid_utf8(piece) && !control) {
            if (out.size() + length > max_bytes) break;
            out.append(piece);
            i += length;
        } else {
            out.push_back('?');
            i += 1;
        }
    }
    if (i < text.size()) out.append("...");
    return out;
}

}  // namespace protocol

VRAMGUARD_END_NAMESPACE
