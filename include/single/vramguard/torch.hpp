// SPDX-License-Identifier: MIT
// The single-header edition's vramguard/torch.hpp: copy it beside vramguard/vramguard.hpp, and
// `#include <vramguard/torch.hpp>` works as with the split headers, before or after
// <vramguard/vramguard.hpp>. It turns on the torch backend of the single header (needs
// LibTorch: link torch (CMake: find_package(Torch), target torch)).
#pragma once

#ifndef VRAMGUARD_WITH_TORCH
#define VRAMGUARD_WITH_TORCH
#endif
#include "vramguard.hpp"  // the single header beside this file
