// SPDX-License-Identifier: MIT
// Second translation unit; see a.cpp.
#include <vramguard/vramguard.hpp>

#include <string>

std::string odr_format_in_b() {
    using namespace vramguard::literals;
    return vramguard::format_bytes(6_GiB);
}
