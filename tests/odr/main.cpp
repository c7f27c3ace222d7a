// SPDX-License-Identifier: MIT
// Links a.cpp and b.cpp (each including the whole library) into one program, and checks that
// both see the same library.
#include <vramguard/vramguard.hpp>

#include <cstdio>
#include <string>

std::string odr_format_in_a();
std::string odr_format_in_b();

int main() {
    const std::string a = odr_format_in_a();
    const std::string b = odr_format_in_b();
    if (a != b || a != vramguard::format_bytes(6 * vramguard::GiB)) {
        std::fprintf(stderr, "odr_test: translation units disagree: '%s' vs '%s'\n", a.c_str(),
                     b.c_str());
        return 1;
    }
    std::printf("odr_test: both translation units print %s\n", a.c_str());
    return 0;
}
