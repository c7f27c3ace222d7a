// SPDX-License-Identifier: MIT
// The examples/torch_server binary as a child process, for the tests that drive it from outside
// (torch_server_test, torch_server_model_test, torch_server_hostile_test,
// torch_server_batching_test): started on 127.0.0.1
// with a port the kernel picks (the first line of its stdout names it), its stderr kept for the
// test to read and echoed to the test's own stderr (ctest shows it on failure), and stopped when
// the test ends. Then the HTTP client side those tests share. Every wait has a deadline.
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "temp_dir.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifndef VRAMGUARD_TORCH_SERVER_PATH
#error \
    "VRAMGUARD_TORCH_SERVER_PATH must name the torch_server binary (tests/CMakeLists.txt sets it)"
#endif

extern char** environ;

namespace vramguard_test {

class ServerProcess {
   public:
    using Clock = std::chrono::steady_clock;
    using Env = std::map<std::string, std::string>;

    // `args` follow "--host 127.0.0.1 --port 0" (a later --port wins); `env` is added to this
    // process's environment. Waits up to 60 s for the first line.
    explicit ServerProcess(std::vector<std::string> args, const Env& env = {}) {
        std::vector<std::string> all = {VRAMGUARD_TORCH_SERVER_PATH, "--host", "127.0.0.1",
                                        "--port", "0"};
        all.insert(all.end(), args.begin(), args.end());
        std::vector<std::string> environment = environment_with(env);
        // Built before fork(): the child only calls what is safe in a threaded parent.
        std::vector<char*> argv = pointers(all), envp = pointers(environment);
        int out[2], err[2];
        if (::pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error(std::strerror(errno));
        if (::pipe2(err, O_CLOEXEC) != 0) {
            ::close(out[0]);
            ::close(out[1]);
            throw std::runtime_error(std::strerror(errno));
        }
        pid_ = ::fork();
        if (pid_ < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
        if (pid_ == 0) {
            ::dup2(out[1], STDOUT_FILENO);  // dup2 clears O_CLOEXEC on the copy
            ::dup2(err[1], STDERR_FILENO);
            ::execve(argv[0], argv.data(), envp.data());
            static const char failed[] = "execve of the torch_server binary failed\n";
            (void)!::write(STDERR_FILENO, failed, sizeof failed - 1);
            ::_exit(127);
        }
        ::close(out[1]);
        ::close(err[1]);
        stdout_ = out[0];
        // Read all along, so a chatty server never blocks on a full pipe.
        stderr_reader_ = std::thread([this, fd = err[0]] { read_stderr(fd); });
        first_line_ = read_first_line(std::chrono::seconds(60));
    }
    ServerProcess(const ServerProcess&) = delete;
    ServerProcess& operator=(const ServerProcess&) = delete;
    ~ServerProcess() { stop(); }

    // What the server printed first ("listening on http://127.0.0.1:PORT"), or "" when it exited
    // or printed nothing in time.
    const std::string& first_line() const { return first_line_; }

    // The port from the first line, or -1 when the server did not start.
    int port() const {
        const std::string prefix = "listening on http://127.0.0.1:";
        if (first_line_.rfind(prefix, 0) != 0) return -1;
        return std::stoi(first_line_.substr(prefix.size()));
    }

    pid_t pid() const { return pid_; }

    // Whether it still runs (not exited, aborted or crashed).
    bool alive() {
        if (pid_ <= 0) return false;
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) != pid_) return true;
        status_ = status;
        pid_ = -1;
        return false;
    }

    // SIGTERM (unless it exited by itself), up to 20 s, then SIGKILL and a failure. Returns the
    // wait status (the same again once reaped).
    int stop() {
        if (alive()) {
            ::kill(pid_, SIGTERM);
            reap(std::chrono::seconds(20), "did not exit within 20 s of SIGTERM");
        }
        finish();
        return status_;
    }

    // Waits up to 60 s for the process to exit by itself (a failed start); the wait status.
    int wait_exit() {
        if (pid_ > 0) reap(std::chrono::seconds(60), "did not exit by itself within 60 s");
        finish();
        return status_;
    }

    // SIGKILL at once: for a server whose clients may still hold connections open.
    int kill() {
        if (alive()) ::kill(pid_, SIGKILL);
        if (pid_ > 0) reap(std::chrono::seconds(20), "outlived SIGKILL for 20 s");
        finish();
        return status_;
    }

    // Everything it wrote to stderr so far (a copy: the reader thread may still append);
    // complete once it has exited (stop(), wait_exit(), kill()).
    std::string err() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return stderr_text_;
    }

   private:
    static std::vector<std::string> environment_with(const Env& env) {
        std::vector<std::string> environment;
        for (char** entry = environ; *entry != nullptr; ++entry) {
            const std::string text = *entry;
            if (env.count(text.substr(0, text.find('='))) == 0) environment.push_back(text);
        }
        for (const auto& [name, value] : env) environment.push_back(name + "=" + value);
        return environment;
    }

    static std::vector<char*> pointers(std::vector<std::string>& texts) {
        std::vector<char*> result;
        for (auto& text : texts) result.push_back(text.data());
        result.push_back(nullptr);
        return result;
    }

    void read_stderr(int fd) {
        char buffer[4096];
        for (;;) {
            const ssize_t n = ::read(fd, buffer, sizeof buffer);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;  // the server (and every copy of its stderr) is gone
            std::lock_guard<std::mutex> lock(mutex_);
            stderr_text_.append(buffer, static_cast<std::size_t>(n));
        }
        ::close(fd);
    }

    std::string read_first_line(Clock::duration timeout) {
        std::string line;
        const auto deadline = Clock::now() + timeout;
        for (;;) {
            const auto left =
                std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
            if (left.count() <= 0) return "";
            pollfd fd{stdout_, POLLIN, 0};
            const int ready = ::poll(&fd, 1, static_cast<int>(left.count()));
            if (ready < 0 && errno == EINTR) continue;
            if (ready <= 0) return "";
            char c = 0;
            const ssize_t n = ::read(stdout_, &c, 1);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return "";  // the server exited
            if (c == '\n') return line;
            line += c;
        }
    }

    void reap(Clock::duration limit, const char* failure) {
        const auto deadline = Clock::now() + limit;
        int status = 0;
        while (::waitpid(pid_, &status, WNOHANG) != pid_) {
            if (Clock::now() >= deadline) {
                ADD_FAILURE() << "torch_server " << failure << "; killing it";
                ::kill(pid_, SIGKILL);
                ::waitpid(pid_, &status, 0);
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        status_ = status;
        pid_ = -1;
    }

    // After the exit: the pipes closed, stderr read to its end and echoed.
    void finish() {
        if (stdout_ >= 0) {
            ::close(stdout_);
            stdout_ = -1;
        }
        if (!stderr_reader_.joinable()) return;
        stderr_reader_.join();
        const std::string text = err();
        if (!text.empty()) std::fprintf(stderr, "--- torch_server's stderr ---\n%s", text.c_str());
    }

    pid_t pid_ = -1;
    int stdout_ = -1;
    int status_ = -1;
    std::string first_line_;
    std::thread stderr_reader_;
    mutable std::mutex mutex_;  // stderr_text_
    std::string stderr_text_;
};

// A started server with a profile directory of its own; throws when it did not start.
struct RunningServer {
    explicit RunningServer(std::vector<std::string> args = {}) {
        args.insert(args.end(), {"--profile-dir", profiles.path()});
        process = std::make_unique<ServerProcess>(std::move(args));
        if (process->port() <= 0)
            throw std::runtime_error("torch_server did not start: first line was \"" +
                                     process->first_line() + "\"");
    }
    int port() const { return process->port(); }

    TempDir profiles{"torch-server-test-"};
    std::unique_ptr<ServerProcess> process;
};

// ---- the client side --------------------------------------------------------------------------

inline std::unique_ptr<httplib::Client> client_of(int port) {
    auto client = std::make_unique<httplib::Client>("127.0.0.1", port);
    client->set_connection_timeout(10, 0);
    client->set_read_timeout(60, 0);
    client->set_write_timeout(10, 0);
    return client;
}

struct Reply {
    int status = 0;
    nlohmann::json body;
    std::string retry_after;
};

inline Reply post(httplib::Client& client, const std::string& path, const std::string& body,
                  const httplib::Headers& headers = {},
                  const std::string& content_type = "application/json") {
    auto res = client.Post(path.c_str(), headers, body, content_type.c_str());
    if (!res)
        throw std::runtime_error("POST " + path + " failed: " + httplib::to_string(res.error()));
    return {res->status, nlohmann::json::parse(res->body), res->get_header_value("Retry-After")};
}

inline Reply get(httplib::Client& client, const std::string& path) {
    auto res = client.Get(path.c_str());
    if (!res)
        throw std::runtime_error("GET " + path + " failed: " + httplib::to_string(res.error()));
    return {res->status, nlohmann::json::parse(res->body), ""};
}

inline Reply encode(httplib::Client& client, const std::vector<std::string>& texts) {
    return post(client, "/encode", nlohmann::json{{"texts", texts}}.dump());
}

// An /encode answer's embeddings.
inline std::vector<std::vector<float>> embeddings_of(const Reply& reply) {
    return reply.body.at("embeddings").get<std::vector<std::vector<float>>>();
}

// The largest difference between two embeddings; infinite when their sizes differ.
inline float max_difference(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return INFINITY;
    float worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
    return worst;
}

}  // namespace vramguard_test
