// SPDX-License-Identifier: MIT
// Work in a forked child process, for tests that need a real process boundary (a second process
// on the ledger, an rlimit that must not reach the test runner). The child never returns into the
// test framework: it leaves with _exit, so no atexit handler or static destructor of the runner's
// copy runs twice, and no gtest assertion runs in it; it reports through its exit status or a
// pipe. Every wait for it is bounded: a hung child is killed (SIGKILL) and reaped (POSIX).
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <thread>

namespace vramguard_test {

// Runs `body` in a forked child, which _exits with body's return value (97 when it throws).
// Returns the child's pid, or -1 when fork fails.
inline pid_t spawn_child(const std::function<int()>& body) {
    const pid_t pid = ::fork();
    if (pid == 0) {
        int code = 97;
        try {
            code = body();
        } catch (...) {
        }
        ::_exit(code);
    }
    return pid;
}

// Waits up to `timeout` for the child `pid`; its raw wait status, or nothing when it cannot be
// waited for or had to be killed (SIGKILL, then reaped) once the timeout passed.
inline std::optional<int> wait_child_status(pid_t pid, std::chrono::milliseconds timeout) {
    // Never pid <= 0: waitpid and kill would then reach other processes (a failed fork's -1).
    if (pid <= 0) return std::nullopt;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    for (;;) {
        const pid_t done = ::waitpid(pid, &status, WNOHANG);
        if (done == pid) return status;
        if (done < 0) return std::nullopt;
        if (std::chrono::steady_clock::now() >= deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            return std::nullopt;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
}

// The child's exit status; -1 when it died of a signal or had to be killed after `timeout`.
inline int wait_child(pid_t pid, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    const std::optional<int> status = wait_child_status(pid, timeout);
    return status && WIFEXITED(*status) ? WEXITSTATUS(*status) : -1;
}

// Runs `body` in a forked child and returns what it reported: "" when all went well, else body's
// text, the exception it threw, or how the child died. The default timeout stays well under the
// 300 s ctest limit, so a hung child fails its own test with a message.
inline std::string run_in_child(const std::function<std::string()>& body,
                                std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    int fds[2];
    if (::pipe(fds) != 0) return std::string("pipe: ") + std::strerror(errno);
    const pid_t pid = spawn_child([&]() -> int {
        ::close(fds[0]);
        std::string report;
        try {
            report = body();
        } catch (const std::exception& e) {
            report = std::string("exception: ") + e.what();
        } catch (...) {
            report = "unknown exception";
        }
        if (!report.empty() && ::write(fds[1], report.data(), report.size()) < 0) return 3;
        return report.empty() ? 0 : 1;
    });
    if (pid < 0) {
        const int error = errno;
        ::close(fds[0]);
        ::close(fds[1]);
        return std::string("fork: ") + std::strerror(error);
    }
    ::close(fds[1]);
    // Read until the child closes its end (it exits), or until the deadline.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::string report;
    bool timed_out = false;
    char buffer[4096];
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            timed_out = true;
            break;
        }
        pollfd item{fds[0], POLLIN, 0};
        const int ready = ::poll(&item, 1, static_cast<int>(left.count()));
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) {
            timed_out = ready == 0;
            break;
        }
        const ssize_t n = ::read(fds[0], buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        report.append(buffer, static_cast<std::size_t>(n));
    }
    ::close(fds[0]);
    // After end of file the child is exiting: give it the rest of the timeout, at least a second.
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    const std::optional<int> status =
        wait_child_status(pid, timed_out ? std::chrono::milliseconds(0)
                                         : std::max(left, std::chrono::milliseconds(1000)));
    if (timed_out || !status)
        return "child did not finish within " + std::to_string(timeout.count()) +
               " ms (killed) or could not be waited for" +
               (report.empty() ? std::string() : ": " + report);
    if (WIFSIGNALED(*status))
        return "child killed by signal " + std::to_string(WTERMSIG(*status)) + ": " + report;
    if (!WIFEXITED(*status) || WEXITSTATUS(*status) != 0)
        return report.empty() ? "child failed without a report" : report;
    return report;
}

}  // namespace vramguard_test
