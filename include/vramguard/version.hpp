// SPDX-License-Identifier: MIT
// Version, C++-level detection and the versioned inline namespace, in one place.
#pragma once

#define VRAMGUARD_VERSION_MAJOR 0
#define VRAMGUARD_VERSION_MINOR 1
#define VRAMGUARD_VERSION_PATCH 0

#define VRAMGUARD_DETAIL_CONCAT3(a, b, c) v##a##_##b##_##c
#define VRAMGUARD_DETAIL_ABI(a, b, c) VRAMGUARD_DETAIL_CONCAT3(a, b, c)
// Two copies of different versions in one program (a copied single header beside an installed
// one) get different mangled names instead of silently mixing their layouts.
#define VRAMGUARD_ABI_NAMESPACE \
    VRAMGUARD_DETAIL_ABI(VRAMGUARD_VERSION_MAJOR, VRAMGUARD_VERSION_MINOR, VRAMGUARD_VERSION_PATCH)

#define VRAMGUARD_BEGIN_NAMESPACE \
    namespace vramguard {         \
    inline namespace VRAMGUARD_ABI_NAMESPACE {
#define VRAMGUARD_END_NAMESPACE \
    }                           \
    }

// An optional user tweak header, found without any build-system help.
#if defined(__has_include)
#if __has_include(<vramguard_user_config.hpp>)
#include <vramguard_user_config.hpp>
#endif
#endif

// Marks a slow path (taken rarely) so the fast path around it stays small enough to inline.
#if defined(__GNUC__) || defined(__clang__)
#define VRAMGUARD_NOINLINE __attribute__((noinline))
#else
#define VRAMGUARD_NOINLINE
#endif

#if defined(__cpp_lib_semaphore) || \
    (__cplusplus >= 202002L && defined(__has_include) && __has_include(<semaphore>))
#define VRAMGUARD_HAS_STD_SEMAPHORE 1
#else
#define VRAMGUARD_HAS_STD_SEMAPHORE 0
#endif
