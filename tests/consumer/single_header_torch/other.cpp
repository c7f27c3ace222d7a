// SPDX-License-Identifier: MIT
// The other order: the single header first, without the switch, then the forwarding header. The
// backend must still be compiled in (and, linked with main.cpp, every definition is inline).
#include <vramguard/vramguard.hpp>
#include <vramguard/torch.hpp>

#include <string>

std::string other_translation_unit() {
    vramguard::torch::HostProbe probe;
    return probe.memory().total_bytes > 0 ? "HostProbe" : "HostProbe read no memory";
}
