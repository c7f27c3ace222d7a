// SPDX-License-Identifier: MIT
// libvramguard_sentencepiece_shim.so: SentencePiece behind a C interface (sentencepiece_shim.h
// says why torch_server does not link SentencePiece itself).
#include "sentencepiece_shim.h"

#include <sentencepiece_processor.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

void copy_message(const std::string& message, char* error, size_t error_size) {
    if (error && error_size > 0) std::snprintf(error, error_size, "%s", message.c_str());
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* vg_spm_load(const char* path, char* error,
                                                         size_t error_size) {
    try {
        auto* processor = new sentencepiece::SentencePieceProcessor();
        const auto status = processor->Load(path);
        if (status.ok()) return processor;
        copy_message(status.ToString(), error, error_size);
        delete processor;
    } catch (const std::exception& e) {
        copy_message(e.what(), error, error_size);
    }
    return nullptr;
}

__attribute__((visibility("default"))) long vg_spm_encode(void* model, const char* text,
                                                          size_t size, int* ids, size_t capacity) {
    try {
        std::vector<int> pieces;
        const auto* processor = static_cast<const sentencepiece::SentencePieceProcessor*>(model);
        if (!processor->Encode(std::string(text, size), &pieces).ok()) return -1;
        for (size_t i = 0; i < pieces.size() && i < capacity; ++i) ids[i] = pieces[i];
        return static_cast<long>(pieces.size());
    } catch (const std::exception&) {
        return -1;
    }
}

__attribute__((visibility("default"))) int vg_spm_piece_size(void* model) {
    return static_cast<const sentencepiece::SentencePieceProcessor*>(model)->GetPieceSize();
}

__attribute__((visibility("default"))) int vg_spm_unk_id(void* model) {
    return static_cast<const sentencepiece::SentencePieceProcessor*>(model)->unk_id();
}

__attribute__((visibility("default"))) void vg_spm_free(void* model) {
    delete static_cast<sentencepiece::SentencePieceProcessor*>(model);
}

}  // extern "C"
