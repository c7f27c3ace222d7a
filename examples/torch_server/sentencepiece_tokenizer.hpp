// SPDX-License-Identifier: MIT
// --tokenizer PATH: a SentencePiece model (the tokenizer.model / spiece.model that came with the
// TorchScript file) in front of the server's model. Each text becomes [--bos-id] pieces
// [--eos-id], cut to --max-tokens (the end token kept); ids of special tokens come from flags, not
// from the model file, because exports disagree on them (T5 appends </s>, XLM-R shifts every id
// by one and prepends <s>).
//
// SentencePiece is reached through libvramguard_sentencepiece_shim.so, loaded with dlopen
// (sentencepiece/sentencepiece_shim.h says why it is not linked). Built only where SentencePiece
// was found (TORCH_SERVER_HAS_SENTENCEPIECE, libsentencepiece-dev); elsewhere, or when the shim
// cannot be loaded, --tokenizer exits saying so.
#pragma once

#include "embedding_model.hpp"
#include "sentencepiece/sentencepiece_shim.h"
#include "torchscript_encoder.hpp"  // ModelFileError

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace torch_server {

struct SentencePieceOptions {
    std::string path;
    std::int64_t bos_id = -1;  // prepended to every text; -1 = none
    std::int64_t eos_id = -1;  // appended to every text (kept when a text is cut); -1 = none
    std::int64_t max_tokens = 512;
};

// The shim's functions, loaded once per process (never unloaded).
struct SentencePieceLibrary {
    vg_spm_load_fn load = nullptr;
    vg_spm_encode_fn encode = nullptr;
    vg_spm_int_fn piece_size = nullptr;
    vg_spm_int_fn unk_id = nullptr;
    vg_spm_free_fn free = nullptr;

    // Next to the running program first (an installed copy), then where the build put it.
    static const SentencePieceLibrary& get() {
        static const std::pair<SentencePieceLibrary, std::string> loaded = open();
        if (!loaded.second.empty()) throw ModelFileError(loaded.second);
        return loaded.first;
    }

   private:
    static std::pair<SentencePieceLibrary, std::string> open() {
#if TORCH_SERVER_HAS_SENTENCEPIECE
        const char* name = "libvramguard_sentencepiece_shim.so";
        std::vector<std::string> candidates;
        char self[PATH_MAX];
        const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
        if (n > 0) {
            std::string dir(self, static_cast<std::size_t>(n));
            candidates.push_back(dir.substr(0, dir.rfind('/') + 1) + name);
        }
        candidates.emplace_back(TORCH_SERVER_SENTENCEPIECE_SHIM);
        std::string errors;
        for (const std::string& path : candidates) {
            // Local and deep: SentencePiece's protobuf copy serves it alone, and only it.
            void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
            if (!handle) {
                errors += std::string(errors.empty() ? "" : "; ") + ::dlerror();
                continue;
            }
            SentencePieceLibrary lib;
            bool ok = true;
            auto bind = [&](auto& fn, const char* symbol) {
                fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(
                    ::dlsym(handle, symbol));
                ok = ok && fn != nullptr;
            };
            bind(lib.load, "vg_spm_load");
            bind(lib.encode, "vg_spm_encode");
            bind(lib.piece_size, "vg_spm_piece_size");
            bind(lib.unk_id, "vg_spm_unk_id");
            bind(lib.free, "vg_spm_free");
            if (ok) return {lib, ""};
            errors += (errors.empty() ? "" : "; ") + path + ": a symbol is missing";
        }
        return {{}, "--tokenizer: cannot load SentencePiece's shim: " + errors};
#else
        return {{},
                "--tokenizer: this build of torch_server has no SentencePiece (Debian: "
                "libsentencepiece-dev; rebuild after installing it)"};
#endif
    }
};

// A loaded model; Encode is const in SentencePiece and keeps no state: many request threads may
// call encode() at once.
class SentencePieceModel {
   public:
    explicit SentencePieceModel(const std::string& path) : lib_(SentencePieceLibrary::get()) {
        char error[512] = "";
        handle_ = lib_.load(path.c_str(), error, sizeof error);
        if (!handle_)
            throw ModelFileError(path +
                                 ": not a SentencePiece model SentencePieceProcessor::Load can "
                                 "read: " +
                                 first_line(error));
    }
    ~SentencePieceModel() { lib_.free(handle_); }
    SentencePieceModel(const SentencePieceModel&) = delete;
    SentencePieceModel& operator=(const SentencePieceModel&) = delete;

    std::vector<int> encode(std::string_view text) const {
        std::vector<int> ids(64);
        for (;;) {
            const long n = lib_.encode(handle_, text.data(), text.size(), ids.data(), ids.size());
            if (n < 0) return {};  // fails only for a model that did not load
            if (static_cast<std::size_t>(n) <= ids.size()) {
                ids.resize(static_cast<std::size_t>(n));
                return ids;
            }
            ids.resize(static_cast<std::size_t>(n));
        }
    }
    std::int64_t pieces() const { return lib_.piece_size(handle_); }
    std::int64_t unk_id() const { return lib_.unk_id(handle_); }

   private:
    const SentencePieceLibrary& lib_;
    void* handle_ = nullptr;
};

// Loads the model and checks the options against it; the result is a Tokenizer for many threads.
// Also returns the vocabulary size through `vocab_size`.
inline Tokenizer load_sentencepiece(const SentencePieceOptions& options,
                                    std::int64_t* vocab_size = nullptr) {
    auto model = std::make_shared<const SentencePieceModel>(options.path);
    const std::int64_t vocab = model->pieces();
    if (vocab_size) *vocab_size = vocab;
    for (const auto& [flag, id] : {std::pair<const char*, std::int64_t>{"--bos-id", options.bos_id},
                                   {"--eos-id", options.eos_id}})
        if (id < -1 || id >= vocab)
            throw ModelFileError(std::string(flag) + " " + std::to_string(id) +
                                 " is not an id of " + options.path + " (0 to " +
                                 std::to_string(vocab - 1) + ", or -1 for none)");
    const std::int64_t specials = (options.bos_id >= 0) + (options.eos_id >= 0);
    if (options.max_tokens <= specials)
        throw ModelFileError("--max-tokens " + std::to_string(options.max_tokens) +
                             " leaves no room for a text between the special tokens");
    return [model, options](std::string_view text) {
        const std::vector<int> pieces = model->encode(text);
        Tokens tokens;
        tokens.reserve(static_cast<std::size_t>(options.max_tokens));
        if (options.bos_id >= 0) tokens.push_back(options.bos_id);
        const auto room =
            static_cast<std::size_t>(options.max_tokens - (options.eos_id >= 0)) - tokens.size();
        for (std::size_t i = 0; i < pieces.size() && i < room; ++i) tokens.push_back(pieces[i]);
        if (options.eos_id >= 0) tokens.push_back(options.eos_id);
        // Every text has a token (an empty one without special tokens: <unk>), so no row of a
        // batch is all padding.
        if (tokens.empty()) tokens.push_back(model->unk_id());
        return tokens;
    };
}

}  // namespace torch_server
