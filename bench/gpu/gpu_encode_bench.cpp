// SPDX-License-Identifier: MIT
// Real GPU: a LibTorch transformer encoder on a skewed stream under a memory cap (the caching
// allocator's memory fraction), run with
//   vramguard            Guard::encode, count-based
//   vramguard-weighted   Guard::encode with item weights (tokens)
//   fixed-conservative   one batch size safe for a batch of the longest items
//   fixed-best           the best of a sweep of fixed sizes (hand-tuned: it saw the stream first)
// Every batch is padded to its longest item, as encoders do. Wall-clock items per second, OOMs, and
// the ratio to fixed-best, as JSON (--out=PATH, default stdout). bench/gpu/run_gpu_bench.sh runs
// this and bench/gpu/accelerate_baseline.py (the same model and stream in PyTorch with accelerate's
// find_executable_batch_size) in one command.
//
// The guards use the library's own probes: vramguard::torch::Probe on the GPU (its memory() counts
// the allocator's cache and the memory-fraction cap), vramguard::torch::HostProbe for the CPU
// smoke. Builds against any LibTorch (CPU-only included); the GPU part needs a CUDA LibTorch
// (VRAMGUARD_TORCH_CUDA, detected by <vramguard/torch.hpp>) and a GPU. Without one it says so and
// exits 0; --cpu-smoke runs a tiny configuration on the CPU (no cap, no OOM) to check that
// everything runs end to end.
//
// Flags: --calls=N (200) --layers=N (4) --d-model=N (512) --heads=N (8) --fraction=F (0.25)
//        --seed=N --out=PATH --cpu-smoke

#include <vramguard/torch.hpp>
#include <vramguard/vramguard.hpp>

#include "../cost_model.hpp"

#include <torch/torch.h>

#if VRAMGUARD_TORCH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Config {
    // The cost model's skewed stream: 200 calls, no squeeze; accelerate_baseline.py draws it too.
    vgbench::StreamSpec stream = [] {
        vgbench::StreamSpec spec;
        spec.calls = 200;
        return spec;
    }();
    std::int64_t layers = 4, d_model = 512, heads = 8, vocab = 30522;
    double fraction = 0.25;
    std::string out;
    bool cpu_smoke = false;
};

// The cost model's stream, with lengths as LibTorch wants them (int64, for from_blob).
struct Stream {
    std::vector<std::int64_t> lengths;
    std::vector<std::size_t> call_begin;
};

Stream torch_stream(const vgbench::StreamSpec& spec) {
    const vgbench::Stream generated = vgbench::make_stream(spec);
    return {std::vector<std::int64_t>(generated.tokens.begin(), generated.tokens.end()),
            generated.call_begin};
}

struct EncoderImpl : torch::nn::Module {
    EncoderImpl(const Config& c)
        : embed(register_module("embed", torch::nn::Embedding(c.vocab, c.d_model))),
          encoder(register_module(
              "encoder",
              torch::nn::TransformerEncoder(torch::nn::TransformerEncoderOptions(
                  torch::nn::TransformerEncoderLayerOptions(c.d_model, c.heads), c.layers)))) {}
    // tokens [batch, len], mask [batch, len] (true = padding) -> [batch, d_model] (mean of tokens)
    torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& padding) {
        auto x = embed(tokens).transpose(0, 1);  // [len, batch, d]
        x = encoder->forward(x, /*src_mask=*/torch::Tensor(), /*src_key_padding_mask=*/padding)
                .transpose(0, 1);
        auto keep = (~padding).unsqueeze(-1).to(x.dtype());
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1);
    }
    torch::nn::Embedding embed;
    torch::nn::TransformerEncoder encoder;
};
TORCH_MODULE(Encoder);

struct Runner {
    const Config& config;
    const Stream& stream;
    Encoder model;
    torch::Device device;
    std::function<void()> empty_cache;  // what a hand-written OOM handler calls before retrying
    std::uint64_t ooms = 0, batches = 0;

    // One padded batch of items [first, last).
    void run_batch(std::size_t first, std::size_t last) {
        std::int64_t longest = 0;
        for (std::size_t i = first; i < last; ++i) longest = std::max(longest, stream.lengths[i]);
        const auto n = static_cast<std::int64_t>(last - first);
        auto lengths = torch::from_blob(const_cast<std::int64_t*>(stream.lengths.data() + first),
                                        {n}, torch::kInt64)
                           .to(device);
        auto positions =
            torch::arange(longest, torch::TensorOptions().dtype(torch::kInt64).device(device));
        auto padding = positions.unsqueeze(0) >= lengths.unsqueeze(1);
        auto tokens = torch::randint(1, config.vocab, {n, longest},
                                     torch::TensorOptions().dtype(torch::kInt64).device(device));
        ++batches;
        torch::NoGradGuard no_grad;
        auto out = model->forward(tokens, padding).to(torch::kCPU);  // results leave the device
        (void)out;
    }
    // Fixed size: on OOM, split the chunk (and count it).
    void run_fixed(std::size_t first, std::size_t last) {
        try {
            run_batch(first, last);
        } catch (const c10::Error&) {
            if (!vramguard::is_oom(std::current_exception()) || last - first == 1) throw;
            ++ooms;
            empty_cache();
            const std::size_t mid = first + (last - first) / 2;
            run_fixed(first, mid);
            run_fixed(mid, last);
        }
    }
};

struct Result {
    std::string policy;
    double seconds = 0;
    std::uint64_t items = 0, ooms = 0, batches = 0;
    std::string note;
};

template <class PerCall>
Result timed(const std::string& name, Runner& runner, PerCall&& per_call) {
    runner.ooms = runner.batches = 0;
    if (runner.device.is_cuda()) torch::cuda::synchronize();
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t c = 0; c + 1 < runner.stream.call_begin.size(); ++c)
        per_call(runner.stream.call_begin[c], runner.stream.call_begin[c + 1]);
    if (runner.device.is_cuda()) torch::cuda::synchronize();
    Result r;
    r.policy = name;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.items = runner.stream.lengths.size();
    r.ooms = runner.ooms;
    r.batches = runner.batches;
    return r;
}

Result fixed(Runner& runner, std::size_t size, const std::string& name) {
    Result r = timed(name, runner, [&](std::size_t first, std::size_t last) {
        for (std::size_t pos = first; pos < last; pos += std::min(size, last - pos))
            runner.run_fixed(pos, pos + std::min(size, last - pos));
    });
    r.note = "batch " + std::to_string(size);
    return r;
}

template <class Probe>
Result guarded(Runner& runner, Probe& probe, bool weighted) {
    vramguard::Options options;
    options.persist = false;
    options.log = [](vramguard::Level, std::string_view) {};
    vramguard::Guard<Probe> guard(probe, options);
    const auto key = vramguard::Key::of("gpu-encoder", {{"weighted", weighted ? "1" : "0"}});
    Result r = timed(weighted ? "vramguard-weighted" : "vramguard", runner,
                     [&](std::size_t first, std::size_t last) {
                         std::vector<std::size_t> items(last - first);
                         for (std::size_t i = 0; i < items.size(); ++i) items[i] = first + i;
                         auto batch = [&](const auto& view) {
                             runner.run_batch(view[0], view[0] + view.size());
                         };
                         if (weighted)
                             guard.encode(key, items, batch, [&](std::size_t i) {
                                 return static_cast<std::uint64_t>(runner.stream.lengths[i]);
                             });
                         else
                             guard.encode(key, items, batch);
                     });
    r.ooms = guard.stats().ooms;
    r.note = "learned " + std::to_string(weighted ? guard.learned_weight_budget(key)
                                                  : guard.learned_batch_ceiling(key));
    return r;
}

std::string json(const Config& c, const std::string& device_name,
                 const std::vector<Result>& results, double best) {
    std::ostringstream o;
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
    o << "{\n  \"bench\": \"gpu_encode_bench\",\n  \"date\": \"" << date << "\",\n  \"device\": \""
      << device_name << "\",\n  \"memory_fraction\": " << c.fraction
      << ",\n  \"model\": {\"layers\": " << c.layers << ", \"d_model\": " << c.d_model
      << ", \"heads\": " << c.heads << "},\n  \"calls\": " << c.stream.calls
      << ",\n  \"results\": [";
    for (std::size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        const double ips = r.seconds > 0 ? static_cast<double>(r.items) / r.seconds : 0;
        o << (i ? ",\n" : "\n") << "    {\"policy\": \"" << r.policy
          << "\", \"items_per_s\": " << ips
          << ", \"ratio_to_fixed_best\": " << (best > 0 ? ips / best : 0)
          << ", \"ooms\": " << r.ooms << ", \"batches\": " << r.batches
          << ", \"seconds\": " << r.seconds << ", \"note\": \"" << r.note << "\"}";
    }
    o << "\n  ]\n}\n";
    return o.str();
}

bool flag(const char* arg, const char* name, std::string& value) {
    const std::size_t n = std::strlen(name);
    if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
    value = arg + n + 1;
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    Config c;
    for (int i = 1; i < argc; ++i) {
        std::string v;
        if (std::strcmp(argv[i], "--cpu-smoke") == 0)
            c.cpu_smoke = true;
        else if (flag(argv[i], "--calls", v))
            c.stream.calls = std::stoul(v);
        else if (flag(argv[i], "--layers", v))
            c.layers = std::stol(v);
        else if (flag(argv[i], "--d-model", v))
            c.d_model = std::stol(v);
        else if (flag(argv[i], "--heads", v))
            c.heads = std::stol(v);
        else if (flag(argv[i], "--fraction", v))
            c.fraction = std::stod(v);
        else if (flag(argv[i], "--seed", v))
            c.stream.seed = std::stoull(v);
        else if (flag(argv[i], "--out", v))
            c.out = v;
        else {
            std::fprintf(stderr, "gpu_encode_bench: unknown argument %s\n", argv[i]);
            return 2;
        }
    }

    std::string device_name = "cpu";
    torch::Device device(torch::kCPU);
    vramguard::torch::HostProbe host_probe;
#if VRAMGUARD_TORCH_CUDA
    std::unique_ptr<vramguard::torch::Probe> gpu_probe;
    const bool have_gpu = torch::cuda::is_available();
#else
    const bool have_gpu = false;
#endif
    if (!have_gpu && !c.cpu_smoke) {
        std::printf("gpu_encode_bench: skipped: %s (run with --cpu-smoke for a CPU check)\n",
#if VRAMGUARD_TORCH_CUDA
                    "no CUDA device visible"
#else
                    "this LibTorch has no CUDA support"
#endif
        );
        return 0;
    }
    if (have_gpu) {
#if VRAMGUARD_TORCH_CUDA
        device = torch::Device(torch::kCUDA, 0);
        gpu_probe = std::make_unique<vramguard::torch::Probe>(0);
        gpu_probe->set_memory_fraction(c.fraction);
        device_name = at::cuda::getDeviceProperties(0)->name;
#endif
    } else {
        c.stream.calls = std::min<std::size_t>(c.stream.calls, 4);
        c.layers = 1;
        c.d_model = 64;
        c.heads = 4;
        c.stream.min_call = 8;
        c.stream.max_call = 24;
        c.stream.short_max = 32;
        c.stream.long_factor = 4;
    }
    torch::manual_seed(1);
    const Stream stream = torch_stream(c.stream);
    Runner runner{c, stream, Encoder(c), device, [] {}};
#if VRAMGUARD_TORCH_CUDA
    if (gpu_probe) runner.empty_cache = [&] { gpu_probe->release_cached(); };
#endif
    runner.model->to(device);
    runner.model->eval();

    std::vector<Result> results;
    // Warm-up (kernels, cuBLAS handles), not timed.
    runner.run_batch(0, std::min<std::size_t>(8, stream.lengths.size()));

    // Conservative: a batch of the longest possible items must fit; measured, not guessed: the
    // largest power of two that runs a batch of longest items.
    const auto longest = static_cast<std::int64_t>(c.stream.longest_item());
    std::size_t conservative = 1;
    if (have_gpu) {
        for (std::size_t size = 1; size <= 1024; size *= 2) {
            try {
                const auto n = static_cast<std::int64_t>(size);
                auto tokens =
                    torch::randint(1, c.vocab, {n, longest},
                                   torch::TensorOptions().dtype(torch::kInt64).device(device));
                auto padding = torch::zeros(
                    {n, longest}, torch::TensorOptions().dtype(torch::kBool).device(device));
                torch::NoGradGuard no_grad;
                runner.model->forward(tokens, padding);
                torch::cuda::synchronize();
                conservative = size;
            } catch (const c10::Error&) {
                break;
            }
        }
        runner.empty_cache();
    } else {
        conservative = 4;
    }
    results.push_back(fixed(runner, conservative, "fixed-conservative"));

    // Hand-tuned: the best of a sweep (the tuner saw the stream; no server operator does).
    Result best;
    for (std::size_t size :
         {conservative * 2, conservative * 4, conservative * 8, conservative * 16}) {
        Result r = fixed(runner, size, "fixed-best");
        if (best.seconds == 0 || r.seconds < best.seconds) best = r;
    }
    results.push_back(best);
    for (const bool weighted : {false, true}) {
#if VRAMGUARD_TORCH_CUDA
        if (gpu_probe) {
            results.push_back(guarded(runner, *gpu_probe, weighted));
            continue;
        }
#endif
        results.push_back(guarded(runner, host_probe, weighted));
    }

    const double best_ips = static_cast<double>(best.items) / best.seconds;
    const std::string text = json(c, device_name, results, best_ips);
    if (c.out.empty()) {
        std::cout << text;
    } else {
        std::ofstream(c.out) << text;
        std::cout << text;
    }
    return 0;
}
