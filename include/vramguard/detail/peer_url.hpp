// SPDX-License-Identifier: MIT
// A peer's configured url, split into what a cpp-httplib Client needs (scheme, host, port) and the
// path prefix its calls start with. Part of vramguard::peers (peers_http.hpp).
#pragma once

#include <vramguard/version.hpp>

#include <cstdlib>
#include <stdexcept>
#include <string>

VRAMGUARD_BEGIN_NAMESPACE
namespace peers {
namespace detail {

// http(s)://host[:port][/prefix], split; throws std::invalid_argument (configuration time).
struct Url {
    std::string scheme, host, prefix;
    int port = 0;

    static Url parse(const std::string& text) {
        Url url;
        const std::size_t colon = text.find("://");
        if (colon == std::string::npos)
            throw std::invalid_argument("vramguard::peers: url \"" + text +
                                        "\" must start with http:// or https://");
        url.scheme = text.substr(0, colon);
        if (url.scheme != "http" && url.scheme != "https")
            throw std::invalid_argument("vramguard::peers: url \"" + text +
                                        "\": only http and https are supported");
        std::string rest = text.substr(colon + 3);
        const std::size_t slash = rest.find('/');
        if (slash != std::string::npos) {
            url.prefix = rest.substr(slash);
            rest.resize(slash);
            while (!url.prefix.empty() && url.prefix.back() == '/') url.prefix.pop_back();
        }
        url.port = url.scheme == "https" ? 443 : 80;
        const std::size_t port_colon = rest.rfind(':');
        if (port_colon != std::string::npos && rest.find(']', port_colon) == std::string::npos) {
            const std::string port = rest.substr(port_colon + 1);
            char* end = nullptr;
            const long value = std::strtol(port.c_str(), &end, 10);
            if (port.empty() || *end != '\0' || value <= 0 || value > 65535)
                throw std::invalid_argument("vramguard::peers: url \"" + text +
                                            "\" has a bad port");
            url.port = static_cast<int>(value);
            rest.resize(port_colon);
        }
        if (rest.empty())
            throw std::invalid_argument("vramguard::peers: url \"" + text + "\" has no host");
        url.host = rest;
        return url;
    }
    std::string origin() const { return scheme + "://" + host + ":" + std::to_string(port); }
    std::string host_port() const { return host + ":" + std::to_string(port); }
};

}  // namespace detail
}  // namespace peers
VRAMGUARD_END_NAMESPACE
