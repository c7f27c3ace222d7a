// SPDX-License-Identifier: MIT
// --model PATH: a TorchScript file (torch.jit.trace / torch.jit.script, saved with .save()) as
// the server's model. The contract, checked when the server starts (docs/torch_server.md):
//
//   forward(input_ids: Tensor[B,T] int64, attention_mask: Tensor[B,T] int64)
//       -> Tensor[B,D]    pooled embeddings, used as they are
//       -> Tensor[B,T,D]  per-token states, mean-pooled over the mask by the server
//
// inspect_torchscript() loads the file once on the CPU, checks forward's schema and runs it on a
// small mixed-length batch (the output's shape, its width D), and hashes the file's content for
// the profile key. What it finds wrong is a ModelFileError: one line naming the file and what it
// found, no c10 backtrace. The registry's loads (through the guard) load it again on the device.
#pragma once

#include "embedding_model.hpp"

#include <torch/script.h>
#include <torch/torch.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace torch_server {

// A model or tokenizer file that cannot be served: the message is one line, for the log and for
// the server's exit at start.
class ModelFileError : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
};

inline constexpr const char* torchscript_contract =
    "torch_server needs forward(input_ids: Tensor[B,T] int64, attention_mask: Tensor[B,T] int64) "
    "-> Tensor[B,D] or Tensor[B,T,D] (docs/torch_server.md)";

// c10 messages carry the C++ frames of where they were thrown and span lines: keep the first.
inline std::string first_line(const std::string& text) {
    const std::size_t end = text.find('\n');
    return end == std::string::npos ? text : text.substr(0, end);
}

// The line that says what went wrong: the first, except after the TorchScript interpreter's
// traceback, where it is the last ("RuntimeError: index out of range in self").
inline std::string one_line(const std::string& text) {
    if (text.rfind("The following operation failed in the TorchScript interpreter", 0) != 0)
        return first_line(text);
    std::string last, line;
    std::istringstream in(text);
    while (std::getline(in, line))
        if (line.find_first_not_of(" \t") != std::string::npos) last = line;
    return last;
}

// What tells two versions of a file apart without reading it: checked before every load, so the
// file loaded is the one whose content was hashed.
struct FileStamp {
    std::uint64_t size = 0;
    std::int64_t mtime_ns = 0;
    bool operator==(const FileStamp& o) const { return size == o.size && mtime_ns == o.mtime_ns; }
};

inline FileStamp stamp_of(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw ModelFileError(path + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw ModelFileError(path + ": not a regular file");
    return {static_cast<std::uint64_t>(st.st_size),
            static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

// A 128-bit hash of the file's bytes, as 32 hex digits. Not cryptographic: it tells exports apart
// for the profile keys (a re-export must not inherit its predecessor's learned costs), it does
// not authenticate them. Two splitmix64-mixed lanes over 8-byte words, the length folded in.
inline std::string content_hash(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw ModelFileError(path + ": cannot read: " + std::strerror(errno));
    auto mix = [](std::uint64_t x) {
        x += 0x9e3779b97f4a7c15ull;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        return x ^ (x >> 31);
    };
    std::uint64_t a = 0x6a09e667f3bcc908ull, b = 0xbb67ae8584caa73bull, length = 0;
    std::vector<char> buffer(1 << 20);
    while (in) {
        in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
        const auto got = static_cast<std::size_t>(in.gcount());
        if (got == 0) break;
        std::memset(buffer.data() + got, 0, (8 - got % 8) % 8);  // a short tail word: zeros
        for (std::size_t i = 0; i < got; i += 8) {
            std::uint64_t word = 0;
            std::memcpy(&word, buffer.data() + i, 8);
            a = mix(a ^ word);
            b = mix(b + word + 0x632be59bd9b4e019ull);
        }
        length += got;
    }
    if (in.bad()) throw ModelFileError(path + ": read failed: " + std::strerror(errno));
    char hex[33];
    std::snprintf(hex, sizeof hex, "%016llx%016llx",
                  static_cast<unsigned long long>(mix(a ^ length)),
                  static_cast<unsigned long long>(mix(b + length)));
    return hex;
}

inline std::string shape_of(const torch::Tensor& t) {
    std::ostringstream out;
    out << "Tensor" << t.sizes() << " " << t.dtype();
    return out.str();
}

// forward's schema, as the contract wants it: two Tensor arguments after self (any more must have
// defaults), one Tensor returned.
inline void check_signature(const torch::jit::Module& module, const std::string& path) {
    const auto method = module.find_method("forward");
    if (!method)
        throw ModelFileError(path + ": the module has no forward(); " + torchscript_contract);
    const c10::FunctionSchema& schema = method->function().getSchema();
    const auto& args = schema.arguments();
    bool ok = args.size() >= 3 && schema.returns().size() == 1 &&
              schema.returns()[0].type()->isSubtypeOf(*c10::TensorType::get());
    for (std::size_t i = 1; ok && i < args.size(); ++i)
        ok = i < 3 ? args[i].type()->isSubtypeOf(*c10::TensorType::get())
                   : args[i].default_value().has_value();
    if (ok) return;
    std::ostringstream found;
    found << schema;
    throw ModelFileError(path + ": its forward is " + found.str() + "; " + torchscript_contract);
}

// forward's output as [B, D] float32: used as it is, or the mean of the real tokens' rows of a
// [B, T, D] output (masked_fill, not a multiplication: a NaN on padding stays out of the mean).
inline torch::Tensor pool_output(const c10::IValue& value, const torch::Tensor& mask,
                                 const std::string& path) {
    if (!value.isTensor())
        throw ModelFileError(path + ": forward returned " + value.tagKind() + ", not a Tensor; " +
                             torchscript_contract);
    const torch::Tensor out = value.toTensor();
    const std::int64_t batch = mask.size(0), length = mask.size(1);
    const bool floating = out.is_floating_point();
    if (floating && out.dim() == 2 && out.size(0) == batch && out.size(1) > 0)
        return out.to(torch::kFloat32);
    if (floating && out.dim() == 3 && out.size(0) == batch && out.size(1) == length &&
        out.size(2) > 0) {
        const torch::Tensor states =
            out.to(torch::kFloat32).masked_fill(mask.eq(0).unsqueeze(-1), 0.0);
        const torch::Tensor count = mask.sum(1, /*keepdim=*/true).clamp_min(1).to(torch::kFloat32);
        return states.sum(1) / count;
    }
    throw ModelFileError(path + ": forward returned " + shape_of(out) + " for input_ids of [" +
                         std::to_string(batch) + ", " + std::to_string(length) + "]; " +
                         torchscript_contract);
}

// Floating parameters and buffers to `dtype`; integer ones (position ids, say) stay as they are
// (torch::jit::Module::to(dtype) would convert those too).
inline void convert_floating(torch::jit::Module& module, torch::Dtype dtype) {
    for (torch::Tensor t : module.parameters())
        if (t.is_floating_point()) t.set_data(t.to(dtype));
    for (torch::Tensor t : module.buffers())
        if (t.is_floating_point()) t.set_data(t.to(dtype));
}

// Bytes of the parameters and buffers once floating ones are `dtype`.
inline std::uint64_t state_bytes(const torch::jit::Module& module, torch::Dtype dtype) {
    std::uint64_t bytes = 0;
    auto count = [&](const torch::Tensor& t) {
        const std::size_t element =
            t.is_floating_point() ? c10::elementSize(dtype) : t.element_size();
        bytes += static_cast<std::uint64_t>(t.numel()) * element;
    };
    for (const torch::Tensor& t : module.parameters()) count(t);
    for (const torch::Tensor& t : module.buffers()) count(t);
    return bytes;
}

inline torch::jit::Module load_module(const std::string& path, torch::Device device) {
    try {
        return torch::jit::load(path, device);
    } catch (const c10::Error& e) {
        throw ModelFileError(path + ": not a TorchScript file torch::jit::load can read: " +
                             first_line(e.what_without_backtrace()));
    }
}

class TorchScriptModel : public EmbeddingModel {
   public:
    TorchScriptModel(const std::string& path, FileStamp expected, torch::Dtype dtype,
                     torch::Device device)
        : path_(path), device_(device) {
        if (!(stamp_of(path) == expected))
            throw ModelFileError(path +
                                 " changed since the server started (its profile key is the "
                                 "content read then): restart torch_server to serve the new file");
        module_ = load_module(path, device);
        module_.eval();
        convert_floating(module_, dtype);
    }

    torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& mask) override {
        return pool_output(module_.forward({ids, mask}), mask, path_);
    }
    torch::Device device() const override { return device_; }

   private:
    std::string path_;
    torch::Device device_;
    torch::jit::Module module_;
};

struct TorchScriptOptions {
    std::string path;
    torch::Dtype dtype = torch::kFloat32;
    std::optional<std::uint64_t> declared_bytes;  // none: the file's parameter and buffer bytes
    bool measure = false;                         // declare nothing: the guard measures the load
    std::int64_t padding_id = 0;
};

// Checks the file (see the top of this header) and describes it to the server. `probe` is a few
// tokenized texts of different lengths, run once on the CPU in the file's own dtype.
inline ModelSource inspect_torchscript(const TorchScriptOptions& options,
                                       const std::vector<Tokens>& probe) {
    const std::string& path = options.path;
    const FileStamp stamp = stamp_of(path);
    const std::string hash = content_hash(path);
    torch::jit::Module module = load_module(path, torch::Device(torch::kCPU));
    module.eval();
    check_signature(module, path);
    std::int64_t dim = 0;
    {
        auto [ids, mask] = pad_batch(probe, options.padding_id);
        torch::InferenceMode inference;
        c10::IValue out;
        try {
            out = module.forward({ids, mask});
        } catch (const c10::Error& e) {
            throw ModelFileError(path + ": forward failed on a probe batch of " + shape_of(ids) +
                                 " (on the CPU): " + one_line(e.what_without_backtrace()));
        } catch (const std::exception& e) {  // the interpreter's (torch::jit::JITException)
            throw ModelFileError(path + ": forward failed on a probe batch of " + shape_of(ids) +
                                 " (on the CPU): " + one_line(e.what()));
        }
        dim = pool_output(out, mask, path).size(1);
    }
    ModelSource source;
    source.key_params = {{"model", "torchscript"},
                         {"content", hash},
                         {"dtype", std::string(c10::toString(options.dtype))}};
    source.description = path + " (TorchScript, content " + hash.substr(0, 12) + ")";
    source.parameter_bytes = state_bytes(module, options.dtype);
    if (!options.measure)
        source.declared_bytes = options.declared_bytes.value_or(source.parameter_bytes);
    if (source.declared_bytes && *source.declared_bytes == 0) source.declared_bytes = 1;
    source.dim = dim;
    source.padding_id = options.padding_id;
    source.load = [path, stamp,
                   dtype = options.dtype](torch::Device device) -> std::unique_ptr<EmbeddingModel> {
        return std::make_unique<TorchScriptModel>(path, stamp, dtype, device);
    };
    return source;
}

}  // namespace torch_server
