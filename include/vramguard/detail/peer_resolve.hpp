// SPDX-License-Identifier: MIT
// A peer's host name turned into a numeric address within the request's deadline: cpp-httplib's
// own lookup has no timeout, and a resolver stuck on an unreachable DNS server would otherwise cost
// seconds per attempt. Part of vramguard::peers (peers_http.hpp).
#pragma once

#include <vramguard/detail/detached_call.hpp>
#include <vramguard/detail/peer_answers.hpp>
#include <vramguard/version.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <utility>

VRAMGUARD_BEGIN_NAMESPACE
namespace peers {
namespace detail {

// "127.0.0.1", "::1" and "[::1]" need no resolver.
inline bool is_numeric_host(const std::string& host) {
    std::string bare = host;
    if (bare.size() > 2 && bare.front() == '[' && bare.back() == ']')
        bare = bare.substr(1, bare.size() - 2);
    unsigned char address[sizeof(in6_addr)];
    return ::inet_pton(AF_INET, bare.c_str(), address) == 1 ||
           ::inet_pton(AF_INET6, bare.c_str(), address) == 1;
}

// The system's resolver: an IPv4 address when the name has one (the services asked listen on
// 127.0.0.1 by default, and "localhost" may list ::1 first), else an IPv6 one; "" for none.
inline std::string resolve_with_getaddrinfo(const std::string& host) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || !found) return {};
    const addrinfo* chosen = nullptr;
    for (const addrinfo* entry = found; entry; entry = entry->ai_next) {
        if (entry->ai_family == AF_INET) {
            chosen = entry;
            break;
        }
        if (entry->ai_family == AF_INET6 && !chosen) chosen = entry;
    }
    char text[INET6_ADDRSTRLEN] = {};
    bool ok = false;
    if (chosen && chosen->ai_family == AF_INET)
        ok = ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(chosen->ai_addr)->sin_addr,
                         text, sizeof text) != nullptr;
    else if (chosen)
        ok = ::inet_ntop(AF_INET6,
                         &reinterpret_cast<const sockaddr_in6*>(chosen->ai_addr)->sin6_addr, text,
                         sizeof text) != nullptr;
    ::freeaddrinfo(found);
    return ok ? std::string(text) : std::string();
}

// A host's numeric address, or why there is none.
struct Resolved {
    std::string address;
    std::string error;
};

// `resolve(host)`, or the system's resolver when it is empty, on this thread; never throws.
inline Resolved resolve_now(const std::function<std::string(const std::string&)>& resolve,
                            const std::string& host) noexcept {
    Resolved result;
    try {
        result.address = resolve ? resolve(host) : resolve_with_getaddrinfo(host);
        if (result.address.empty()) result.error = "\"" + host + "\" does not resolve";
    } catch (const std::exception& error) {
        result.error = "resolving \"" + host + "\" failed: " + excerpt(error.what());
    } catch (...) {
        result.error = "resolving \"" + host + "\" failed";
    }
    return result;
}

// resolve_now() on a thread of its own, waited for at most `within`: a resolver still running then
// is left to finish alone (its thread owns copies of `resolve` and `host`).
inline Resolved resolve_within(const std::function<std::string(const std::string&)>& resolve,
                               const std::string& host, std::chrono::microseconds within) {
    std::optional<Resolved> resolved;
    try {
        const vramguard::detail::DetachedCall<Resolved> call(
            [resolve, host] { return resolve_now(resolve, host); });
        resolved = call.wait_for(within);
    } catch (const std::exception& error) {
        return {{}, "cannot start a thread to resolve \"" + host + "\": " + error.what()};
    }
    if (resolved) return std::move(*resolved);
    return {
        {},
        "resolving \"" + host + "\" took over " +
            std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(within).count()) +
            " ms"};
}

}  // namespace detail
}  // namespace peers
VRAMGUARD_END_NAMESPACE
