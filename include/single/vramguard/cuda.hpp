// SPDX-License-Identifier: MIT
// The single-header edition's vramguard/cuda.hpp: copy it beside vramguard/vramguard.hpp, and
// `#include <vramguard/cuda.hpp>` works as with the split headers, before or after
// <vramguard/vramguard.hpp>. It turns on the cuda backend of the single header (needs
// the CUDA Runtime: <cuda_runtime_api.h> on the include path, link -lcudart).
#pragma once

#ifndef VRAMGUARD_WITH_CUDA
#define VRAMGUARD_WITH_CUDA
#endif
#include "vramguard.hpp"  // the single header beside this file
