// SPDX-License-Identifier: MIT
// What one admission check saw and decided (Guard::admission(), the registry's load decisions).
// The check itself, its waits and its refusal live in detail/admission_control.hpp.
#pragma once

#include <vramguard/memory.hpp>
#include <vramguard/policy.hpp>
#include <vramguard/version.hpp>

#include <cstdint>

VRAMGUARD_BEGIN_NAMESPACE

struct Admission {
    bool admitted = false;
    policy::Requirement requirement;
    std::uint64_t margin_bytes = 0;
    MemoryInfo memory;
};

VRAMGUARD_END_NAMESPACE
