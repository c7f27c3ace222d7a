// SPDX-License-Identifier: MIT
// First of two translation units that include the whole library: a function defined in a header
// without `inline` is then defined twice, and the link fails (cpp-httplib's check).
#include <vramguard/vramguard.hpp>

#include <string>

std::string odr_format_in_a() { return vramguard::format_bytes(6ull << 30); }
