#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# One command for the real-GPU tests (ctest label `gpu`): configure against the Python torch's
# LibTorch (pip's CUDA build), build the gpu_* tests and run them. On a machine without a GPU they
# skip, each with the reason. The ctest log goes to ${OUT_DIR:-build-gpu-tests}/gpu-tests.log.
# Needs: python3 with a CUDA torch, cmake, the CUDA toolkit, GoogleTest, a C++17 compiler (C++20
# for torch 2.14 and later).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

BUILD_DIR="${BUILD_DIR:-build-gpu-tests}"
OUT_DIR="${OUT_DIR:-${BUILD_DIR}}"
mkdir -p "${OUT_DIR}"

source bench/gpu/python_torch.sh
vramguard_configure_python_torch "${BUILD_DIR}" -DVRAMGUARD_REQUIRE_CUDA=ON \
    -DVRAMGUARD_BUILD_EXAMPLES=OFF -DVRAMGUARD_BUILD_BENCH=OFF
targets=$(cmake --build "${BUILD_DIR}" --target help | sed -n 's/^\(gpu_[a-z_]*_test\):.*/\1/p')
cmake --build "${BUILD_DIR}" -j "${JOBS:-$(nproc)}" --target ${targets}
ctest --test-dir "${BUILD_DIR}" -L gpu --output-on-failure -V 2>&1 | tee "${OUT_DIR}/gpu-tests.log"
