// SPDX-License-Identifier: MIT
// A pre-forking toy server: the parent forks workers that each load their own copy of a 4 GiB
// "model" through a Guard onto one 16 GiB device, all at the same moment, as gunicorn-style
// servers do at start-up. The device is simulated in shared memory so that every worker sees the
// same bytes. Run twice:
//   - host mode off: every worker sees 16 GiB free, every worker is admitted, and the device is
//     asked for more than it has: some loads die of OOM;
//   - host mode on (Options::coordinator = HostLedger::open(...)): admission is check-and-reserve
//     across processes; three models load (3 x 4 GiB beside the 1.6 GiB safety margin) and the
//     others are refused up front with InsufficientMemory (a server would answer 503).
// POSIX only. Finishes in about 3 seconds.
#include <vramguard/vramguard.hpp>

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

using namespace vramguard::literals;
using namespace std::chrono_literals;

namespace {

constexpr int workers = 6;
constexpr std::uint64_t device_bytes = 16_GiB;
constexpr std::uint64_t model_bytes = 4_GiB;

enum Outcome : int { pending, loaded, refused, out_of_memory };

// What every process shares: the device's used bytes, the highest demand it ever saw, and each
// worker's outcome.
struct SharedState {
    std::atomic<std::uint64_t> used{0};
    std::atomic<std::uint64_t> peak_demand{0};
    std::atomic<int> finished{0};
    std::atomic<int> outcome[workers];
};

// A device in shared memory: allocate() takes bytes or throws the OOM a real device would.
class ToyDevice {
   public:
    explicit ToyDevice(SharedState& state) : state_(state) {}
    vramguard::MemoryInfo memory() const {
        const std::uint64_t used = state_.used.load();
        return {used < device_bytes ? device_bytes - used : 0, device_bytes};
    }
    void release_cached() {}

    void allocate(std::uint64_t bytes) {
        std::uint64_t used = state_.used.load();
        for (;;) {
            const std::uint64_t demand = used + bytes;
            std::uint64_t peak = state_.peak_demand.load();
            while (demand > peak && !state_.peak_demand.compare_exchange_weak(peak, demand)) {
            }
            if (demand > device_bytes)
                throw vramguard::OutOfMemory("toy device: out of memory allocating " +
                                             vramguard::format_bytes(bytes));
            if (state_.used.compare_exchange_weak(used, demand)) return;
        }
    }
    void free(std::uint64_t bytes) { state_.used.fetch_sub(bytes); }

   private:
    SharedState& state_;
};

// One worker: load the model through the guard, stay up until every worker has tried.
int worker(int index, SharedState& state,
           const std::shared_ptr<vramguard::Coordinator>& coordinator) {
    ToyDevice device(state);
    vramguard::Options options;
    options.persist = false;
    options.log = nullptr;  // the parent prints the summary
    options.load_attempts = 1;
    options.admission_wait = 1s;  // a worker may wait this long for memory before giving up
    options.poll_interval = 10ms;
    options.coordinator = coordinator;  // null: in-process admission only
    vramguard::Guard<ToyDevice> guard(device, options);

    std::uint64_t held = 0;
    Outcome outcome = loaded;
    try {
        guard.load(vramguard::Key::of("toy-model", {}), model_bytes, [&] {
            std::this_thread::sleep_for(100ms);  // reading the weights from disk
            device.allocate(model_bytes / 2);    // then copying them to the device, in parts
            held += model_bytes / 2;
            std::this_thread::sleep_for(20ms);
            device.allocate(model_bytes / 2);
            held += model_bytes / 2;
        });
    } catch (const vramguard::InsufficientMemory&) {
        outcome = refused;
    } catch (const std::exception&) {
        outcome = out_of_memory;
    }
    if (outcome != loaded) device.free(held);
    state.outcome[index] = outcome;
    state.finished.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (state.finished.load() < workers && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
    return 0;
}

// Forks the workers, waits for them (killing any still running after 8 s) and prints what
// happened. Returns whether the device was over-committed.
bool serve(bool host_mode, const std::string& ledger_directory) {
    void* memory = ::mmap(nullptr, sizeof(SharedState), PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        std::perror("mmap");
        std::exit(2);
    }
    auto* state = new (memory) SharedState{};

    std::shared_ptr<vramguard::Coordinator> coordinator;
    if (host_mode) {
        vramguard::HostOptions host;
        host.directory = ledger_directory;  // by default /dev/shm; a private one for the demo
        coordinator = vramguard::HostLedger::open("toy-gpu-0", host);
    }

    std::vector<pid_t> children;
    for (int i = 0; i < workers; ++i) {
        const pid_t pid = ::fork();
        if (pid == 0) ::_exit(worker(i, *state, coordinator));
        if (pid > 0) children.push_back(pid);
    }
    const auto deadline = std::chrono::steady_clock::now() + 8s;
    for (const pid_t child : children) {
        int status = 0;
        while (::waitpid(child, &status, WNOHANG) == 0) {
            if (std::chrono::steady_clock::now() > deadline) {
                ::kill(child, SIGKILL);
                ::waitpid(child, &status, 0);
                break;
            }
            std::this_thread::sleep_for(2ms);
        }
    }

    int counts[4] = {0, 0, 0, 0};
    std::printf("host mode %s:\n", host_mode ? "on" : "off");
    for (int i = 0; i < workers; ++i) {
        const int outcome = state->outcome[i].load();
        ++counts[outcome];
        static const char* const names[] = {
            "did not finish", "loaded", "refused up front (InsufficientMemory: 503, retry later)",
            "OUT OF MEMORY in the middle of its load"};
        std::printf("  worker %d: %s\n", i, names[outcome]);
    }
    const std::uint64_t peak = state->peak_demand.load();
    const bool over_committed = peak > device_bytes;
    std::printf("  %d loaded, %d refused, %d out of memory; peak demand %s on a %s device%s\n\n",
                counts[loaded], counts[refused], counts[out_of_memory],
                vramguard::format_bytes(peak).c_str(),
                vramguard::format_bytes(device_bytes).c_str(),
                over_committed ? ": OVER-ADMITTED" : ": never over-committed");
    ::munmap(memory, sizeof(SharedState));
    return over_committed;
}

}  // namespace

int main() {
    char directory[] = "/tmp/vramguard-prefork-XXXXXX";
    if (::mkdtemp(directory) == nullptr) {
        std::perror("mkdtemp");
        return 2;
    }
    std::printf("%d pre-forked workers, each loading a %s model onto one %s device at once\n\n",
                workers, vramguard::format_bytes(model_bytes).c_str(),
                vramguard::format_bytes(device_bytes).c_str());
    std::fflush(stdout);  // children must not inherit (and print again) what is buffered

    const bool off_over_committed = serve(false, directory);
    std::fflush(stdout);
    const bool on_over_committed = serve(true, directory);

    const vramguard::MemoryInfo gpu{device_bytes, device_bytes};
    std::printf("recommended_workers: %zu for this GPU and model (CPU formula on 16 cores: %zu)\n",
                vramguard::recommended_workers(gpu, model_bytes, 0.10, 16),
                vramguard::recommended_workers(std::nullopt, 0, 0.10, 16));

    const std::string ledger =
        std::string(directory) + "/" + vramguard::HostLedger::file_name("toy-gpu-0");
    for (const char* suffix : {"", ".single", ".turnstile"}) ::unlink((ledger + suffix).c_str());
    ::rmdir(directory);
    if (!off_over_committed)
        std::printf("(this run happened not to over-commit without host mode: timing)\n");
    return on_over_committed ? 1 : 0;
}
