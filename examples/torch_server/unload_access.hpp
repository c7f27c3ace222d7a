// SPDX-License-Identifier: MIT
// Who may call POST /request-unload: it unloads the model, so anyone who can reach it can make the
// next request slow (a reload) or, called in a loop, keep the server from serving. Loopback callers
// (the services sharing this machine's GPU) may; a remote caller only with the token the server was
// started with (--unload-token), sent as "Authorization: Bearer <token>" (the scheme in any
// case). A pure function, so every
// case is tested with a table; the server answers its status and reason as they are.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace torch_server {

// True for 127.0.0.0/8, ::1 and IPv4-mapped 127.x (::ffff:127.0.0.1): what cpp-httplib reports as
// Request::remote_addr for a caller on this machine.
inline bool is_loopback(std::string_view address) {
    const std::string text(address);
    in_addr v4{};
    if (::inet_pton(AF_INET, text.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
    in6_addr v6{};
    if (::inet_pton(AF_INET6, text.c_str(), &v6) != 1) return false;
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
}

// Compares without stopping at the first difference, so the time taken does not tell a remote
// caller how much of a guessed token was right.
inline bool same_secret(std::string_view a, std::string_view b) noexcept {
    unsigned char difference = a.size() == b.size() ? 0 : 1;
    for (std::size_t i = 0; i < a.size(); ++i)
        difference |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
    return difference == 0;
}

// The credentials of "Bearer <token>": the scheme in any case (RFC 9110 11.1: "bearer",
// "BEARER"), then one or more spaces; trailing spaces and tabs are not part of the token. nullopt
// for another scheme or an empty token.
inline std::optional<std::string_view> bearer_credentials(std::string_view authorization) {
    constexpr std::string_view scheme = "bearer";
    if (authorization.size() <= scheme.size()) return std::nullopt;
    for (std::size_t i = 0; i < scheme.size(); ++i) {
        const char c = authorization[i];
        if ((c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c) != scheme[i])
            return std::nullopt;
    }
    std::size_t start = scheme.size();
    if (authorization[start] != ' ') return std::nullopt;
    while (start < authorization.size() && authorization[start] == ' ') ++start;
    std::size_t end = authorization.size();
    while (end > start && (authorization[end - 1] == ' ' || authorization[end - 1] == '\t')) --end;
    if (end == start) return std::nullopt;
    return authorization.substr(start, end - start);
}

struct UnloadAccess {
    bool allowed = false;
    int status = 200;    // 200 when allowed; 401 (no or wrong token: send one) or 403 (refused)
    std::string reason;  // for the refusal's JSON body
};

// remote_addr: the caller's address; token: --unload-token ("" = none configured);
// authorization: the Authorization header ("" = none sent).
//   - a caller that presents the configured token is allowed from anywhere;
//   - a caller that presents a different one is refused (401), from loopback too: a client sending
//     a stale token is misconfigured, and saying so beats a silent success;
//   - otherwise loopback callers are allowed, remote ones refused: 401 when a token is configured
//     (send it), 403 when none is (the operator has not opened the endpoint to the network).
inline UnloadAccess decide_unload_access(std::string_view remote_addr, std::string_view token,
                                         std::string_view authorization) {
    const bool presented = !authorization.empty();
    if (!token.empty() && presented) {
        const std::optional<std::string_view> credentials = bearer_credentials(authorization);
        if (credentials && same_secret(*credentials, token)) return {true, 200, ""};
        return {false, 401,
                "the Authorization header does not carry this server's --unload-token (expected "
                "\"Authorization: Bearer <token>\")"};
    }
    if (is_loopback(remote_addr)) return {true, 200, ""};
    if (token.empty())
        return {false, 403,
                "/request-unload is accepted only from loopback (this caller is " +
                    std::string(remote_addr) +
                    "); start the server with --unload-token and send \"Authorization: Bearer "
                    "<token>\" to allow remote callers"};
    return {false, 401,
            "/request-unload from " + std::string(remote_addr) +
                " needs \"Authorization: Bearer <token>\" with this server's --unload-token"};
}

}  // namespace torch_server
