// SPDX-License-Identifier: MIT
// A hostile HTTP peer for the tests: a raw socket on 127.0.0.1 (ephemeral port) that reads each
// request and then runs a script that may answer anything, at any pace: drip a byte at a time,
// stream forever, send garbage, never answer. Every wait in it is sliced so that the destructor
// ends it within ~50 ms; a script's send fails as soon as the client closes its socket.
// Also what a test measures about its own process: resident memory and live threads.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace vramguard_test {

// One accepted connection, as a script sees it.
class HostileConnection {
   public:
    HostileConnection(int fd, const std::atomic<bool>& stop, std::string request)
        : fd_(fd), stop_(stop), request_(std::move(request)) {}

    // The request line: "GET /queue HTTP/1.1".
    const std::string& request() const { return request_; }

    // Sends all of `bytes`; false once the peer is being stopped or the client has gone.
    bool send(std::string_view bytes) {
        while (!bytes.empty()) {
            if (stop_) return false;
            pollfd out{fd_, POLLOUT, 0};
            const int ready = ::poll(&out, 1, 20);
            if (ready < 0) return false;
            if (ready == 0) continue;
            if (out.revents & (POLLERR | POLLHUP)) return false;
            const ssize_t sent = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
            if (sent <= 0) return false;
            bytes.remove_prefix(static_cast<std::size_t>(sent));
        }
        return true;
    }
    // Waits `wait`; false once the peer is being stopped.
    bool pause(std::chrono::milliseconds wait) {
        const auto until = std::chrono::steady_clock::now() + wait;
        while (std::chrono::steady_clock::now() < until) {
            if (stop_) return false;
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        return !stop_;
    }
    // Sends `bytes` one byte every `every`, then true; false when stopped or the client went.
    bool drip(std::string_view bytes, std::chrono::milliseconds every) {
        for (const char byte : bytes)
            if (!pause(every) || !send(std::string_view(&byte, 1))) return false;
        return true;
    }

   private:
    int fd_;
    const std::atomic<bool>& stop_;
    std::string request_;
};

class HostilePeer {
   public:
    using Script = std::function<void(HostileConnection&)>;

    explicit HostilePeer(Script script) : script_(std::move(script)) {
        listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
        if (listener_ < 0) throw std::runtime_error("socket failed");
        const int one = 1;
        ::setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t length = sizeof address;
        if (::bind(listener_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
            ::getsockname(listener_, reinterpret_cast<sockaddr*>(&address), &length) != 0 ||
            ::listen(listener_, 8) != 0) {
            ::close(listener_);
            throw std::runtime_error("bind failed");
        }
        port_ = ntohs(address.sin_port);
        thread_ = std::thread([this] { serve(); });
    }
    HostilePeer(const HostilePeer&) = delete;
    HostilePeer& operator=(const HostilePeer&) = delete;
    ~HostilePeer() {
        stop_ = true;
        thread_.join();
        ::close(listener_);
    }

    std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
    // The request lines seen ("GET /queue HTTP/1.1"), in order.
    std::vector<std::string> requests() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return requests_;
    }

    // A complete answer with a Content-Length.
    static std::string answer(std::string_view body, int status = 200,
                              std::string_view type = "application/json",
                              std::string_view extra_headers = "") {
        return "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: " + std::string(type) +
               "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" +
               std::string(extra_headers) + "Connection: close\r\n\r\n" + std::string(body);
    }

   private:
    void serve() {
        while (!stop_) {
            pollfd in{listener_, POLLIN, 0};
            if (::poll(&in, 1, 20) <= 0) continue;
            const int fd = ::accept(listener_, nullptr, nullptr);
            if (fd < 0) continue;
            HostileConnection connection(fd, stop_, read_request(fd));
            script_(connection);
            ::shutdown(fd, SHUT_RDWR);
            ::close(fd);
        }
    }

    // Reads the request's head and its Content-Length body, for at most a second; its first line.
    std::string read_request(int fd) {
        std::string text;
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(1);
        std::size_t want = std::string::npos;
        while (!stop_ && std::chrono::steady_clock::now() < until && text.size() < want) {
            pollfd in{fd, POLLIN, 0};
            if (::poll(&in, 1, 20) <= 0) continue;
            char buffer[4096];
            const ssize_t got = ::recv(fd, buffer, sizeof buffer, 0);
            if (got <= 0) break;
            text.append(buffer, static_cast<std::size_t>(got));
            const std::size_t head_end = text.find("\r\n\r\n");
            if (head_end == std::string::npos) continue;
            std::size_t length = 0;
            const std::size_t at = text.find("Content-Length: ");
            if (at != std::string::npos && at < head_end)
                length = std::strtoul(text.c_str() + at + 16, nullptr, 10);
            want = head_end + 4 + length;
        }
        std::string line = text.substr(0, text.find("\r\n"));
        std::lock_guard<std::mutex> lock(mutex_);
        requests_.push_back(line);
        return line;
    }

    Script script_;
    int listener_ = -1;
    int port_ = 0;
    std::atomic<bool> stop_{false};
    mutable std::mutex mutex_;
    std::vector<std::string> requests_;
    std::thread thread_;
};

// This process's resident memory in bytes (VmRSS), and its live threads.
inline std::uint64_t resident_bytes() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("VmRSS:", 0) == 0)
            return std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
    return 0;
}
inline int live_threads() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
    return 0;
}

}  // namespace vramguard_test
