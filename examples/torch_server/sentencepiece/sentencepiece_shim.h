// SPDX-License-Identifier: MIT
// The C interface of libvramguard_sentencepiece_shim.so (sentencepiece_shim.cpp), which
// torch_server loads with dlopen(RTLD_LOCAL | RTLD_DEEPBIND) rather than linking SentencePiece.
// Why: Debian's libsentencepiece.so.0 carries its own copy of protobuf-lite and exports its
// symbols, and LibTorch loads the system libprotobuf.so.32; linked into one process, the first
// one found serves both, and libprotobuf's own static initialisation crashes in SentencePiece's
// copy (SIGSEGV before main). Loaded locally and bound deeply, SentencePiece uses its own copy and
// nothing else sees it. Plain C types only across the boundary.
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Loads a SentencePiece model; NULL on failure, with a message in `error`.
typedef void* (*vg_spm_load_fn)(const char* path, char* error, size_t error_size);
// Encodes `text` into ids: writes at most `capacity` of them to `ids` and returns how many there
// are (call again with more room when that is larger), or -1 on failure.
typedef long (*vg_spm_encode_fn)(void* model, const char* text, size_t size, int* ids,
                                 size_t capacity);
typedef int (*vg_spm_int_fn)(void* model);  // pieces in the vocabulary; unk_id
typedef void (*vg_spm_free_fn)(void* model);

#ifdef __cplusplus
}
#endif
