// SPDX-License-Identifier: MIT
// One outgoing HTTP call (cpp-httplib's Client) held to a total deadline and a byte allowance,
// from a thread of its own that the call joins. cpp-httplib bounds each read, not the call: a
// peer dripping a byte at a time (headers included) would hold the call, and the thread of a
// caller that gave up, for as long as it liked; and it keeps every header line it is sent, so an
// endless header would grow the process by hundreds of MB a second. The watchdog reads how much
// the call has read from its socket (Linux: TCP_INFO's bytes received minus what still waits in
// the receive queue) and, at the deadline or past the allowance, shuts the socket down
// (shutdown(2) on its own duplicate of the descriptor: safe from another thread, and the call's
// blocked poll or read returns at once). A socket still connecting, or not yet made, cannot be
// shut yet, so this is repeated every few milliseconds until the call returns.
//
// Part of vramguard::peers only (its socket hook is cpp-httplib's Client::set_socket_options).
#pragma once

#include <vramguard/protocol.hpp>
#include <vramguard/version.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

VRAMGUARD_BEGIN_NAMESPACE
namespace peers {
namespace detail {

// Bytes this process has read from a TCP socket: what TCP received minus what still waits in the
// receive queue. None where the kernel does not say (not Linux, or older than 4.1).
inline std::optional<std::uint64_t> bytes_read_from(int fd) noexcept {
#if defined(__linux__) && defined(TCP_INFO)
    // struct tcp_info of <linux/tcp.h> (uapi: fields are only ever appended): the u64
    // tcpi_bytes_received sits at offset 128. glibc's own struct stops before it.
    constexpr socklen_t received_at = 128;
    unsigned char info[received_at + 8] = {};
    socklen_t length = sizeof info;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &length) != 0 || length < sizeof info)
        return std::nullopt;
    std::uint64_t received = 0;
    std::memcpy(&received, info + received_at, sizeof received);
    int waiting = 0;  // read after: a late arrival only makes the result smaller
    if (::ioctl(fd, FIONREAD, &waiting) != 0 || waiting < 0) return std::nullopt;
    const auto queued = static_cast<std::uint64_t>(waiting);
    return received > queued ? received - queued : 0;
#else
    (void)fd;
    return std::nullopt;
#endif
}

class CallWatchdog {
   public:
    enum class Cut { no, deadline, headers_too_large, too_large };

    // Reading more than this before the headers are complete cuts the call (status line, headers
    // and "100 Continue" lines; a little of the body may be buffered with them).
    static constexpr std::uint64_t header_allowance = protocol::max_header_bytes;
    // After them: the body (itself capped exactly by the caller) and its chunk framing.
    static constexpr std::uint64_t body_allowance =
        protocol::max_header_bytes +
        2 * static_cast<std::uint64_t>(protocol::max_peer_answer_bytes);

    explicit CallWatchdog(std::chrono::steady_clock::time_point deadline)
        : deadline_(deadline), thread_([this] { run(); }) {}
    CallWatchdog(const CallWatchdog&) = delete;
    CallWatchdog& operator=(const CallWatchdog&) = delete;
    ~CallWatchdog() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            done_ = true;
        }
        woken_.notify_all();
        thread_.join();
        if (fd_ >= 0) ::close(fd_);
    }

    // httplib's socket-options hook: the call's socket, watched from now on. A duplicate, so that
    // a number closed and reused by another thread is never read.
    void watch(int fd) {
        const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
        std::lock_guard<std::mutex> lock(mutex_);
        if (fd_ >= 0) ::close(fd_);
        fd_ = copy;
    }
    // The headers are in: the body's allowance applies from now on.
    void headers_read() {
        std::lock_guard<std::mutex> lock(mutex_);
        headers_read_ = true;
    }
    // Whether and why the call was cut.
    Cut cut() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return cut_;
    }

   private:
    void run() {
        std::unique_lock<std::mutex> lock(mutex_);
        while (!done_ && cut_ == Cut::no) {
            const auto now = std::chrono::steady_clock::now();
            if (now >= deadline_) {
                cut_ = Cut::deadline;
            } else if (over_allowance()) {
                cut_ = headers_read_ ? Cut::too_large : Cut::headers_too_large;
            } else {
                woken_.wait_until(lock, std::min(deadline_, now + std::chrono::milliseconds(5)),
                                  [this] { return done_; });
            }
        }
        while (!done_) {
            if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
            woken_.wait_for(lock, std::chrono::milliseconds(5), [this] { return done_; });
        }
    }

    bool over_allowance() const {
        if (fd_ < 0) return false;
        const std::optional<std::uint64_t> read = bytes_read_from(fd_);
        return read && *read > (headers_read_ ? body_allowance : header_allowance);
    }

    const std::chrono::steady_clock::time_point deadline_;
    mutable std::mutex mutex_;
    std::condition_variable woken_;
    bool done_ = false;
    bool headers_read_ = false;
    int fd_ = -1;
    Cut cut_ = Cut::no;
    std::thread thread_;  // last: starts once the rest exists
};

}  // namespace detail
}  // namespace peers
VRAMGUARD_END_NAMESPACE
