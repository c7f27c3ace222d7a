// SPDX-License-Identifier: MIT
// Step-by-step interleavings of real threads without sleeps: each thread marks what it reached on
// a Board and waits for what another marked. The wait's bound is only a safety net (a test that
// hangs because of a bug fails instead); no outcome depends on it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <set>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace vramguard_test {

class Board {
   public:
    static constexpr std::chrono::seconds safety_net{60};

    void mark(const std::string& step) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            marked_.insert(step);
        }
        changed_.notify_all();
    }
    bool marked(const std::string& step) const {
        std::lock_guard<std::mutex> lock(mutex_);
        return marked_.count(step) != 0;
    }
    // Waits until `step` was marked; false only when the safety net ran out.
    bool wait_for(const std::string& step) {
        std::unique_lock<std::mutex> lock(mutex_);
        return changed_.wait_for(lock, safety_net, [&] { return marked_.count(step) != 0; });
    }
    // Waits until either step was marked; returns the first of them that was (or "").
    std::string wait_for_either(const std::string& one, const std::string& other) {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait_for(lock, safety_net,
                          [&] { return marked_.count(one) != 0 || marked_.count(other) != 0; });
        return marked_.count(one) ? one : marked_.count(other) ? other : std::string();
    }

   private:
    mutable std::mutex mutex_;
    std::condition_variable changed_;
    std::set<std::string> marked_;
};

#if defined(__linux__)
// This thread's kernel id, for thread_is_blocked().
inline long this_thread_id() { return static_cast<long>(::syscall(SYS_gettid)); }

// Whether a thread of this process is blocked in the kernel (state S or D in
// /proc/self/task/<tid>/stat): how a test sees that another thread waits for something it cannot
// observe otherwise (a turn inside the library). A running or runnable thread reads R.
inline bool thread_is_blocked(long tid) {
    std::ifstream stat("/proc/self/task/" + std::to_string(tid) + "/stat");
    std::string text;
    if (!std::getline(stat, text)) return false;
    const std::size_t end_of_name = text.rfind(')');
    if (end_of_name == std::string::npos || end_of_name + 2 >= text.size()) return false;
    const char state = text[end_of_name + 2];
    return state == 'S' || state == 'D';
}
#endif

}  // namespace vramguard_test
