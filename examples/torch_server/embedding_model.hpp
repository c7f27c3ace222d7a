// SPDX-License-Identifier: MIT
// What the server serves, whatever it is: a model that maps a padded batch of token ids to one
// embedding per text (EmbeddingModel: the built-in encoder of encoder.hpp, or a TorchScript file,
// torchscript_encoder.hpp), what the server knows of it before any load (ModelSource: its key,
// declared size, width), and the tokenizer in front of it (Tokenizer).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace torch_server {

using Tokens = std::vector<std::int64_t>;
using Embedding = std::vector<float>;

// Text -> token ids, cut to the model's maximum length. Called from many request threads at once.
using Tokenizer = std::function<Tokens(std::string_view text)>;

class EmbeddingModel {
   public:
    virtual ~EmbeddingModel() = default;
    // ids, mask: [batch, length] int64 on device(); mask is 1 on a text's tokens and 0 on the
    // padding after them (where ids hold the padding id). Returns [batch, dim], any float type,
    // any device; a text's row must not depend on the rest of the batch.
    virtual torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& mask) = 0;
    virtual torch::Device device() const = 0;
};

// ids and mask of one padded batch, on the CPU. `batch` is any range of Tokens with size()
// (Guard::encode's BatchView, a std::vector<Tokens>).
template <class Batch>
std::pair<torch::Tensor, torch::Tensor> pad_batch(const Batch& batch, std::int64_t padding_id) {
    const auto n = static_cast<std::int64_t>(batch.size());
    std::int64_t longest = 1;
    for (const Tokens& tokens : batch)
        longest = std::max<std::int64_t>(longest, static_cast<std::int64_t>(tokens.size()));
    torch::Tensor ids = torch::full({n, longest}, padding_id, torch::kInt64);
    torch::Tensor mask = torch::zeros({n, longest}, torch::kInt64);
    auto id_rows = ids.accessor<std::int64_t, 2>();
    auto mask_rows = mask.accessor<std::int64_t, 2>();
    std::int64_t row = 0;
    for (const Tokens& tokens : batch) {
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            id_rows[row][static_cast<std::int64_t>(i)] = tokens[i];
            mask_rows[row][static_cast<std::int64_t>(i)] = 1;
        }
        ++row;
    }
    return {ids, mask};
}

// [batch, dim] -> one float vector per row.
inline std::vector<Embedding> to_embeddings(const torch::Tensor& rows) {
    const torch::Tensor out = rows.to(torch::kCPU, torch::kFloat32).contiguous();
    const std::int64_t n = out.size(0), dim = out.size(1);
    const float* data = out.data_ptr<float>();
    std::vector<Embedding> result;
    result.reserve(static_cast<std::size_t>(n));
    for (std::int64_t r = 0; r < n; ++r) result.emplace_back(data + r * dim, data + (r + 1) * dim);
    return result;
}

// What the server knows of its model before loading it, and how to load it.
struct ModelSource {
    // The profile keys' parameters besides the device: they must change when the costs can
    // (another model, another width, another file), and only then.
    std::vector<std::pair<std::string, std::string>> key_params;
    std::string description;                      // for /status and the log
    std::optional<std::uint64_t> declared_bytes;  // what a load needs; none: the guard measures
    std::uint64_t parameter_bytes = 0;  // what a loaded model holds (taken on a simulated device)
    std::int64_t dim = 0;               // embedding width
    std::int64_t padding_id = 0;        // in ids after each text's end
    std::function<std::unique_ptr<EmbeddingModel>(torch::Device)> load;
};

// What the registry holds: the model and, on a simulated device, the hold on the bytes its
// parameters take there (given back when the registry unloads the model).
class HeldEncoder {
   public:
    HeldEncoder(std::unique_ptr<EmbeddingModel> model, std::int64_t dim, std::int64_t padding_id,
                std::shared_ptr<void> hold)
        : model_(std::move(model)), dim_(dim), padding_id_(padding_id), hold_(std::move(hold)) {}

    // One padded batch through the model, in inference mode.
    template <class Batch>
    std::vector<Embedding> encode(const Batch& batch) {
        auto [ids, mask] = pad_batch(batch, padding_id_);
        torch::InferenceMode inference;
        const torch::Device device = model_->device();
        return to_embeddings(model_->embed(ids.to(device), mask.to(device)));
    }

    std::int64_t dim() const noexcept { return dim_; }

   private:
    std::unique_ptr<EmbeddingModel> model_;
    std::int64_t dim_;
    std::int64_t padding_id_;
    std::shared_ptr<void> hold_;
};

}  // namespace torch_server
