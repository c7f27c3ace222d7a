// SPDX-License-Identifier: MIT
// The server's model: a small sentence-embedding encoder built in code (no TorchScript file to
// ship), and a toy tokenizer for it.
//
// Token embedding + learned positions -> a two-layer transformer encoder that ignores padding ->
// mean over the real tokens -> L2 normalisation. The weights are random but deterministic
// (torch::manual_seed), so every run of the server, and every load after an unload, gives the
// same embedding for the same text. Padding is masked out of attention and out of the mean, so a
// text's embedding does not depend on what else was in its batch (up to float rounding).
// builtin_model() describes it to the server as a ModelSource (embedding_model.hpp).
#pragma once

#include "embedding_model.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace torch_server {

struct EncoderConfig {
    std::int64_t vocab = 8192;       // hashed word ids; 0 is padding, 1 starts every text
    std::int64_t dim = 64;           // embedding width
    std::int64_t heads = 4;          // attention heads (dim must divide by it)
    std::int64_t feedforward = 128;  // hidden width of each layer's feed-forward block
    std::int64_t layers = 2;
    std::int64_t max_tokens = 128;  // longer texts are cut (the start token included)
    std::uint64_t seed = 20240917;  // the weights are a function of this
};

inline constexpr std::int64_t padding_id = 0;
inline constexpr std::int64_t start_id = 1;

// Lower-cased, whitespace-separated words hashed (FNV-1a, 64 bit) into [2, vocab): deterministic
// on every platform and run. Every text starts with start_id, so an empty text still has a token.
inline Tokens tokenize(std::string_view text, const EncoderConfig& config) {
    Tokens tokens{start_id};
    std::size_t i = 0;
    while (i < text.size() && static_cast<std::int64_t>(tokens.size()) < config.max_tokens) {
        while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
        if (i == text.size()) break;
        std::uint64_t hash = 14695981039346656037ull;
        while (i < text.size() && !std::isspace(static_cast<unsigned char>(text[i]))) {
            hash ^= static_cast<unsigned char>(std::tolower(static_cast<unsigned char>(text[i])));
            hash *= 1099511628211ull;
            ++i;
        }
        const auto range = static_cast<std::uint64_t>(config.vocab - 2);
        tokens.push_back(static_cast<std::int64_t>(hash % range) + 2);
    }
    return tokens;
}

class EncoderImpl : public torch::nn::Module {
   public:
    explicit EncoderImpl(const EncoderConfig& config)
        : config_(config),
          tokens_(register_module(
              "tokens",
              torch::nn::Embedding(
                  torch::nn::EmbeddingOptions(config.vocab, config.dim).padding_idx(padding_id)))),
          positions_(
              register_module("positions", torch::nn::Embedding(config.max_tokens, config.dim))),
          layers_(register_module(
              "layers", torch::nn::TransformerEncoder(torch::nn::TransformerEncoderOptions(
                            torch::nn::TransformerEncoderLayerOptions(config.dim, config.heads)
                                .dim_feedforward(config.feedforward)
                                .dropout(0.0)
                                .activation(torch::kGELU),
                            config.layers)))) {}

    // ids, mask: [batch, length] (int64; mask 0 on the padding after each text's end); returns
    // [batch, dim], unit rows.
    torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask) {
        const torch::Tensor padding = mask.eq(0);  // [batch, length], true = ignore
        const auto length = ids.size(1);
        const torch::Tensor where = torch::arange(length, ids.options());
        torch::Tensor x = tokens_(ids) + positions_(where).unsqueeze(0);  // [batch, length, dim]
        // LibTorch's TransformerEncoder wants [length, batch, dim].
        x = layers_->forward(x.transpose(0, 1), /*src_mask=*/{}, /*src_key_padding_mask=*/padding)
                .transpose(0, 1);
        const torch::Tensor keep = padding.logical_not().unsqueeze(-1).to(x.dtype());
        const torch::Tensor mean = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0);
        return torch::nn::functional::normalize(
            mean, torch::nn::functional::NormalizeFuncOptions().dim(1));
    }

    const EncoderConfig& config() const noexcept { return config_; }

   private:
    EncoderConfig config_;
    torch::nn::Embedding tokens_;
    torch::nn::Embedding positions_;
    torch::nn::TransformerEncoder layers_;
};
TORCH_MODULE(Encoder);

// The module on its device, ready for inference.
class EncoderModel : public EmbeddingModel {
   public:
    EncoderModel(const EncoderConfig& config, torch::Device device) : device_(device) {
        {
            // manual_seed sets the process-wide generator: two loads at once (two registries,
            // say) would interleave their draws.
            static std::mutex seed_mutex;
            std::lock_guard<std::mutex> lock(seed_mutex);
            torch::manual_seed(config.seed);
            module_ = Encoder(config);
        }
        module_->eval();
        module_->to(device_);
    }

    // Parameter bytes of a model built from `config` (what a load is declared to need), without
    // building one.
    static std::uint64_t parameter_bytes(const EncoderConfig& c) {
        const std::int64_t d = c.dim, f = c.feedforward;
        const std::int64_t per_layer = (3 * d * d + 3 * d)          // attention in-projection
                                       + (d * d + d)                // attention out-projection
                                       + (d * f + f) + (f * d + d)  // feed-forward
                                       + 2 * (2 * d);               // two layer norms
        const std::int64_t parameters = c.vocab * d + c.max_tokens * d + c.layers * per_layer;
        return static_cast<std::uint64_t>(parameters) * sizeof(float);
    }

    torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& mask) override {
        return module_->forward(ids, mask);
    }
    torch::Device device() const override { return device_; }

   private:
    torch::Device device_;
    Encoder module_{nullptr};
};

// The built-in encoder as the server sees it: declared at its parameter bytes, keyed as before
// TorchScript files existed (profiles learned then stay valid).
inline ModelSource builtin_model(const EncoderConfig& config) {
    ModelSource source;
    source.key_params = {{"model", "toy-encoder"},
                         {"dim", std::to_string(config.dim)},
                         {"layers", std::to_string(config.layers)}};
    source.description = "built-in encoder (encoder.hpp)";
    source.declared_bytes = EncoderModel::parameter_bytes(config);
    source.parameter_bytes = EncoderModel::parameter_bytes(config);
    source.dim = config.dim;
    source.padding_id = padding_id;
    source.load = [config](torch::Device device) -> std::unique_ptr<EmbeddingModel> {
        return std::make_unique<EncoderModel>(config, device);
    };
    return source;
}

}  // namespace torch_server
