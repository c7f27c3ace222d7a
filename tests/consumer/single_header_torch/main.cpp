// SPDX-License-Identifier: MIT
// The forwarding header alone brings in the single header with its LibTorch backend.
#include <vramguard/torch.hpp>

#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

#if !defined(VRAMGUARD_SINGLE_HEADER_HPP)
#error "expected the generated single header, got the split headers"
#endif

namespace vg = vramguard;

std::string other_translation_unit();  // other.cpp: the other include order

int main() {
    vg::torch::HostProbe probe;
    vg::Options options;
    options.persist = false;
    vg::Guard<vg::torch::HostProbe> guard(probe, options);
    ::torch::nn::Linear model =
        guard.load(vg::Key::of("linear", {{"shape", "4x2"}}), 64 * vg::KiB,
                   [] { return ::torch::nn::Linear(::torch::nn::LinearOptions(4, 2)); });
    const std::vector<::torch::Tensor> items(6, ::torch::ones({4}));
    const std::vector<::torch::Tensor> out =
        guard.encode(vg::Key::of("linear-encode"), items, [&](const auto& batch) {
            const ::torch::Tensor y = model->forward(
                ::torch::stack(std::vector<::torch::Tensor>(batch.begin(), batch.end())));
            std::vector<::torch::Tensor> rows;
            for (std::int64_t i = 0; i < y.size(0); ++i) rows.push_back(y[i]);
            return rows;
        });
    // The LibTorch classifier is registered by the backend: a c10 OOM is recognised.
    const bool c10_oom_known = vg::is_oom(std::make_exception_ptr(::c10::Error(
        "DefaultCPUAllocator: not enough memory: you tried to allocate 1024 bytes.", "")));
    const std::string other = other_translation_unit();
    std::printf("single header + LibTorch %s: %zu results, c10 OOM known: %d, %s\n", TORCH_VERSION,
                out.size(), static_cast<int>(c10_oom_known), other.c_str());
    return out.size() == items.size() && c10_oom_known && other == "HostProbe" ? 0 : 1;
}
