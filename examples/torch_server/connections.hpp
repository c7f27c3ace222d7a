// SPDX-License-Identifier: MIT
// The connection layer under the server's endpoints: what a client has to do to hold one of its
// threads, and for how long. cpp-httplib 0.11's own loop runs connections on a fixed pool and reads
// with a per-read timeout only, so eight clients sending one byte a second held the eight threads
// for ever (slowloris) and every other caller queued behind them. Here, three rules together:
//   - a thread per connection, up to max_connections (512); past that a connection is answered
//     503 (Retry-After: 1) at once by the accepting thread and closed, unread: a flood costs no
//     thread and never queues the connections under the cap (/status, a peer's /request-unload);
//   - a request's line and headers must arrive within header_deadline (10 s) of its first byte,
//     the whole request within request_deadline (60 s), and the client must take the answer within
//     response_deadline (60 s): a late request is closed (408 when its headers were late);
//   - the header section is capped (64 KiB: 431, read no further), and a request that does not
//     begin like an HTTP method (a TLS handshake sent to this plain-HTTP port) is a 400 at once.
// Why all three: more threads alone still run out (a slow client keeps its thread for ever); a
// deadline alone lets eight slow clients make everyone else wait out that deadline; a cap alone
// makes the cap the attacker's goal. Together a slow client holds one thread for a bounded time
// and, meanwhile, everyone else is served by a thread of their own.
//
// The request loop also runs over any MeteredStream, without a socket: the HTTP fuzzer
// (tests/fuzz/fuzz_http_server.cpp) feeds it bytes from memory.
#pragma once

#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>

namespace torch_server {

struct ConnectionLimits {
    std::size_t max_connections = 512;  // open at once; more are answered 503 and closed
    std::chrono::milliseconds header_deadline{std::chrono::seconds(10)};
    std::chrono::milliseconds request_deadline{std::chrono::seconds(60)};  // line + headers + body
    std::chrono::milliseconds response_deadline{std::chrono::seconds(60)};
    std::chrono::milliseconds keep_alive{std::chrono::seconds(5)};  // idle between requests
    std::size_t max_requests_per_connection = 100;
    std::size_t max_header_bytes = 64u << 10;  // request line and headers together
};

// What the stream saw of the request being served, for the answer to say what went wrong: the
// error handler of cpp-httplib only learns "400". One per request, reached through
// current_request() on the thread serving it (cpp-httplib calls every handler on that thread).
struct RequestFacts {
    bool not_http = false;           // its first byte cannot begin an HTTP method
    bool headers_too_large = false;  // the line and headers passed max_header_bytes
    bool late = false;               // a deadline passed while reading it
    bool headers_complete = false;
    std::size_t longest_line = 0;  // of the request line and header lines, in bytes
    bool close_after = false;      // the answer ends the connection (set by handlers too)
    std::size_t max_header_bytes = 0;
    std::chrono::milliseconds header_deadline{0};
};

namespace wire {
inline RequestFacts*& current_request_slot() {
    thread_local RequestFacts* facts = nullptr;
    return facts;
}
}  // namespace wire

// The facts of the request this thread is serving, or nullptr outside one.
inline RequestFacts* current_request() { return wire::current_request_slot(); }

// A Stream that meters what it hands cpp-httplib: it finds where the headers end, caps them,
// spots a request that is not HTTP, and applies the request's deadlines. Subclasses only move
// bytes (receive, send_some); a receive that fails or passes its deadline ends the request.
class MeteredStream : public httplib::Stream {
   public:
    using Clock = std::chrono::steady_clock;

    explicit MeteredStream(const ConnectionLimits& limits) : limits_(limits) {}

    // Starts metering the next request on this connection (its bytes may be buffered already).
    void begin_request(RequestFacts& facts) {
        facts_ = &facts;
        facts.max_header_bytes = limits_.max_header_bytes;
        facts.header_deadline = limits_.header_deadline;
        header_bytes_ = 0;
        line_ = 0;
        tail_ = 0;
        started_ = Clock::now();
        answering_ = false;
    }
    void end_request() { facts_ = nullptr; }

    // Whether a next request has begun to arrive within `wait` (buffered bytes count).
    bool wait_for_request(std::chrono::milliseconds wait) {
        if (begin_ < end_) return true;
        const ssize_t n = receive(buffer_, sizeof buffer_, Clock::now() + wait);
        if (n <= 0) return false;
        begin_ = 0;
        end_ = static_cast<std::size_t>(n);
        return true;
    }

    ssize_t read(char* ptr, std::size_t size) override {
        if (facts_ == nullptr || size == 0) return -1;
        const bool in_headers = !facts_->headers_complete;
        // In the headers a failure reads as the end of the stream: cpp-httplib then parses the
        // partial line, fails, and answers 400, which the error handler turns into the truth.
        // In the body it is an error: an end would make a body without a length look complete.
        const ssize_t fail = in_headers ? 0 : -1;
        if (facts_->not_http || facts_->headers_too_large) return fail;
        if (begin_ == end_ && !refill(in_headers)) return fail;
        std::size_t n = std::min(size, end_ - begin_);
        if (in_headers) n = meter_headers(n);
        std::memcpy(ptr, buffer_ + begin_, n);
        begin_ += n;
        return static_cast<ssize_t>(n);
    }

    ssize_t write(const char* ptr, std::size_t size) override {
        if (!answering_) {
            answering_ = true;
            answer_started_ = Clock::now();
        }
        return send_some(ptr, size, answer_started_ + limits_.response_deadline);
    }

    bool is_readable() const override { return begin_ < end_; }
    bool is_writable() const override { return true; }

   protected:
    // Up to `size` bytes, 0 at the end of the stream, -1 on an error or at `deadline`.
    virtual ssize_t receive(char* buffer, std::size_t size, Clock::time_point deadline) = 0;
    // Writes some of the bytes by `deadline`; -1 when none could be.
    virtual ssize_t send_some(const char* data, std::size_t size, Clock::time_point deadline) = 0;

   private:
    bool refill(bool in_headers) {
        Clock::time_point deadline = started_ + limits_.request_deadline;
        if (in_headers) deadline = std::min(deadline, started_ + limits_.header_deadline);
        if (Clock::now() >= deadline) {
            facts_->late = true;
            return false;
        }
        const ssize_t n = receive(buffer_, sizeof buffer_, deadline);
        if (n <= 0) {
            if (Clock::now() >= deadline) facts_->late = true;
            return false;
        }
        begin_ = 0;
        end_ = static_cast<std::size_t>(n);
        return true;
    }

    // How many of the next n buffered bytes to hand out: stops right after the blank line that
    // ends the headers (the body is not metered), and at the first byte that shows the request is
    // not HTTP or too large.
    std::size_t meter_headers(std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) {
            const auto c = static_cast<unsigned char>(buffer_[begin_ + i]);
            if (header_bytes_ == 0 && !(c >= 'A' && c <= 'Z')) {
                facts_->not_http = true;  // methods are upper-case tokens; a TLS hello is 0x16
                facts_->close_after = true;
                return i + 1;  // the byte that shows it, so the parse fails on it at once
            }
            if (++header_bytes_ > limits_.max_header_bytes) {
                facts_->headers_too_large = true;
                facts_->close_after = true;
                return i;
            }
            line_ = c == '\n' ? 0 : line_ + 1;
            facts_->longest_line = std::max(facts_->longest_line, line_);
            tail_ = (tail_ << 8) | c;
            if (tail_ == 0x0D0A0D0Au) {
                facts_->headers_complete = true;
                return i + 1;
            }
        }
        return n;
    }

    const ConnectionLimits limits_;
    RequestFacts* facts_ = nullptr;
    char buffer_[4096];
    std::size_t begin_ = 0, end_ = 0;
    std::size_t header_bytes_ = 0, line_ = 0;
    std::uint32_t tail_ = 0;  // the last four header bytes, to find "\r\n\r\n"
    Clock::time_point started_{};
    Clock::time_point answer_started_{};
    bool answering_ = false;
};

// A connected socket; every wait is a poll() bounded by the request's deadline.
class SocketMeteredStream : public MeteredStream {
   public:
    SocketMeteredStream(int fd, const ConnectionLimits& limits) : MeteredStream(limits), fd_(fd) {}

    void get_remote_ip_and_port(std::string& ip, int& port) const override {
        sockaddr_storage address{};
        socklen_t length = sizeof address;
        if (::getpeername(fd_, reinterpret_cast<sockaddr*>(&address), &length) == 0)
            describe(address, ip, port);
    }
    void get_local_ip_and_port(std::string& ip, int& port) const override {
        sockaddr_storage address{};
        socklen_t length = sizeof address;
        if (::getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) == 0)
            describe(address, ip, port);
    }
    socket_t socket() const override { return fd_; }

   protected:
    ssize_t receive(char* buffer, std::size_t size, Clock::time_point deadline) override {
        if (!wait_until(POLLIN, deadline)) return -1;
        for (;;) {
            const ssize_t n = ::recv(fd_, buffer, size, MSG_DONTWAIT);
            if (n < 0 && errno == EINTR) continue;
            return n;
        }
    }
    ssize_t send_some(const char* data, std::size_t size, Clock::time_point deadline) override {
        if (!wait_until(POLLOUT, deadline)) return -1;
        for (;;) {
            const ssize_t n = ::send(fd_, data, size, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            return n;
        }
    }

   private:
    bool wait_until(short events, Clock::time_point deadline) const {
        for (;;) {
            // Rounded up: poll() must not wake before the deadline, or a late request would not
            // read as late.
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
            if (left.count() <= 0) return false;
            pollfd p{fd_, events, 0};
            const int ready =
                ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1000)));
            if (ready < 0 && errno != EINTR) return false;
            if (ready > 0) return true;  // readable, writable, or an error recv/send reports
        }
    }
    static void describe(const sockaddr_storage& address, std::string& ip, int& port) {
        char text[INET6_ADDRSTRLEN] = {};
        if (address.ss_family == AF_INET) {
            const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
            ::inet_ntop(AF_INET, &v4.sin_addr, text, sizeof text);
            port = ntohs(v4.sin_port);
        } else if (address.ss_family == AF_INET6) {
            const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
            ::inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof text);
            port = ntohs(v6.sin6_port);
        }
        ip = text;
    }

    int fd_;
};

// The bytes of one connection from memory, the answers to memory: the fuzzer's and unit tests'
// connection. remote_addr is what the server sees as the caller.
class MemoryMeteredStream : public MeteredStream {
   public:
    MemoryMeteredStream(std::string input, std::string remote_addr, const ConnectionLimits& limits)
        : MeteredStream(limits), input_(std::move(input)), remote_(std::move(remote_addr)) {}

    const std::string& output() const { return output_; }

    void get_remote_ip_and_port(std::string& ip, int& port) const override {
        ip = remote_;
        port = 40000;
    }
    void get_local_ip_and_port(std::string& ip, int& port) const override {
        ip = "127.0.0.1";
        port = 8080;
    }
    socket_t socket() const override { return INVALID_SOCKET; }

   protected:
    ssize_t receive(char* buffer, std::size_t size, Clock::time_point) override {
        const std::size_t n = std::min(size, input_.size() - read_);
        std::memcpy(buffer, input_.data() + read_, n);
        read_ += n;
        return static_cast<ssize_t>(n);
    }
    ssize_t send_some(const char* data, std::size_t size, Clock::time_point) override {
        output_.append(data, size);
        return static_cast<ssize_t>(size);
    }

   private:
    std::string input_;
    std::size_t read_ = 0;
    std::string remote_;
    std::string output_;
};

// Counts of what the connection layer did, for /status.
struct ConnectionStats {
    std::uint64_t open = 0;
    std::uint64_t max = 0;
    std::uint64_t refused_503 = 0;  // over max_connections
    std::uint64_t late_408 = 0;     // requests closed at a deadline
};

// An httplib::Server whose connections follow the rules at the top of this file.
class HardenedServer : public httplib::Server {
   public:
    explicit HardenedServer(ConnectionLimits limits = {})
        : limits_(limits), state_(std::make_shared<State>()) {
        state_->max = std::max<std::size_t>(1, limits_.max_connections);
        set_keep_alive_max_count(limits_.max_requests_per_connection);
        // Called as listening starts, after the bind: cpp-httplib listens with a backlog of 5, so
        // a burst of connections (the slow ones and a /status among them) had SYNs dropped and
        // retried a second or more later. A second listen() only widens the queue.
        new_task_queue = [this] {
            if (svr_sock_ != INVALID_SOCKET) ::listen(svr_sock_, SOMAXCONN);
            return new ConnectionThreads(state_);
        };
    }

    const ConnectionLimits& limits() const { return limits_; }

    // Serves the requests that arrive on one connection until it ends, as a connection thread
    // does. The way in for the fuzzer and for tests, without a socket. True when it ended with
    // an answer that closes it early: bytes the client sent may be left unread.
    bool serve(MeteredStream& stream) {
        for (std::size_t n = 0; n < limits_.max_requests_per_connection; ++n) {
            if (state_->stopping.load()) return false;
            if (!stream.wait_for_request(limits_.keep_alive)) return false;
            RequestFacts facts;
            stream.begin_request(facts);
            wire::current_request_slot() = &facts;
            bool closed = false;
            const bool last = n + 1 == limits_.max_requests_per_connection;
            const bool ok = process_request(stream, last, closed, nullptr);
            wire::current_request_slot() = nullptr;
            stream.end_request();
            if (facts.late) state_->late.fetch_add(1, std::memory_order_relaxed);
            if (facts.close_after || facts.late) return true;
            if (!ok || closed) return false;
        }
        return false;
    }

    ConnectionStats stats() const {
        std::lock_guard<std::mutex> lock(state_->mutex);
        return {state_->active, state_->max, state_->refused.load(), state_->late.load()};
    }

   private:
    struct State {
        mutable std::mutex mutex;
        std::condition_variable idle;
        std::size_t active = 0;
        std::size_t max = 1;
        std::set<int> sockets;
        std::atomic<bool> stopping{false};
        std::atomic<std::uint64_t> refused{0}, late{0};
    };

    // cpp-httplib's task queue, replaced: a thread per connection under the cap; over it, the
    // task runs on the accepting thread, which sees over_capacity() and answers 503.
    class ConnectionThreads : public httplib::TaskQueue {
       public:
        explicit ConnectionThreads(std::shared_ptr<State> state) : state_(std::move(state)) {}
        void enqueue(std::function<void()> fn) override {
            {
                std::lock_guard<std::mutex> lock(state_->mutex);
                if (state_->active < state_->max) {
                    ++state_->active;
                    try {
                        std::thread([state = state_, fn]() mutable {
                            fn();
                            fn = nullptr;
                            std::lock_guard<std::mutex> lock(state->mutex);
                            --state->active;
                            state->idle.notify_all();
                        }).detach();
                        return;
                    } catch (const std::system_error&) {
                        --state_->active;  // no thread to be had: answered as over the cap
                    }
                }
            }
            over_capacity() = true;
            fn();
            over_capacity() = false;
        }
        // After the listening socket closed: wakes every connection blocked on its client and
        // waits for their threads (a handler in progress finishes first; its own waits are
        // bounded).
        void shutdown() override {
            std::unique_lock<std::mutex> lock(state_->mutex);
            state_->stopping = true;
            for (const int fd : state_->sockets) ::shutdown(fd, SHUT_RDWR);
            state_->idle.wait(lock, [&] { return state_->active == 0; });
        }

       private:
        std::shared_ptr<State> state_;
    };

    static bool& over_capacity() {
        thread_local bool over = false;
        return over;
    }

    bool process_and_close_socket(socket_t sock) override {
        if (over_capacity() || sock >= FD_SETSIZE) {
            refuse(sock);
            return true;
        }
        {
            std::lock_guard<std::mutex> lock(state_->mutex);
            state_->sockets.insert(sock);
        }
        bool unread = false;
        {
            SocketMeteredStream stream(sock, limits_);
            unread = serve(stream);
        }
        if (unread) drain(sock);
        {
            std::lock_guard<std::mutex> lock(state_->mutex);
            state_->sockets.erase(sock);
        }
        ::shutdown(sock, SHUT_RDWR);
        ::close(sock);
        return true;
    }

    // After an answer that left the request unread (a 413 before the body, a 431): closing now
    // with bytes unread would reset the connection, and the client could lose the answer. Says
    // "no more" and discards what still comes, for at most half a second and 1 MiB.
    static void drain(socket_t sock) {
        ::shutdown(sock, SHUT_WR);
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
        char discard[16384];
        for (std::size_t total = 0; total < (1u << 20);) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            pollfd p{sock, POLLIN, 0};
            if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return;
            const ssize_t n = ::recv(sock, discard, sizeof discard, MSG_DONTWAIT);
            if (n <= 0) return;
            total += static_cast<std::size_t>(n);
        }
    }

    // Over the cap: 503 without reading the request (a client that already sent one may see the
    // connection reset instead, which it treats as the same "come back later").
    void refuse(socket_t sock) {
        state_->refused.fetch_add(1, std::memory_order_relaxed);
        const std::string body = "{\"error\":\"this server has " + std::to_string(state_->max) +
                                 " connections open, its limit: come back in a second\"}";
        const std::string answer =
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            "Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
            std::to_string(body.size()) + "\r\n\r\n" + body;
        (void)::send(sock, answer.data(), answer.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        ::shutdown(sock, SHUT_WR);
        char drain[4096];
        for (int i = 0; i < 16 && ::recv(sock, drain, sizeof drain, MSG_DONTWAIT) > 0; ++i) {
        }
        ::close(sock);
    }

    ConnectionLimits limits_;
    std::shared_ptr<State> state_;
};

}  // namespace torch_server
