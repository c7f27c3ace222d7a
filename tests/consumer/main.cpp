// SPDX-License-Identifier: MIT
// What a user writes first: include the library the documented way and use it.
#include <vramguard/vramguard.hpp>

#include <cstdio>
#include <string>

#if defined(VRAMGUARD_CONSUMER_EXPECT_SINGLE_HEADER) && !defined(VRAMGUARD_SINGLE_HEADER_HPP)
#error "expected the generated single header, got the split headers"
#endif
#if defined(VRAMGUARD_CONSUMER_EXPECT_CUDA) && !defined(VRAMGUARD_WITH_CUDA)
#error "vramguard::cuda did not define VRAMGUARD_WITH_CUDA"
#endif
#if defined(VRAMGUARD_CONSUMER_EXPECT_TORCH) && !defined(VRAMGUARD_WITH_TORCH)
#error "vramguard::torch did not define VRAMGUARD_WITH_TORCH"
#endif

int main() {
    const std::string text = vramguard::format_bytes(6ull << 30);
    std::printf("vramguard %d.%d.%d: %s\n", VRAMGUARD_VERSION_MAJOR, VRAMGUARD_VERSION_MINOR,
                VRAMGUARD_VERSION_PATCH, text.c_str());
    if (text != "6.00 GiB") {
        std::fprintf(stderr, "expected \"6.00 GiB\", got \"%s\"\n", text.c_str());
        return 1;
    }
    return 0;
}
