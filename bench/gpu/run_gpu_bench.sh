#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# One command for the real-GPU benchmark: configure against the Python torch's LibTorch, build
# gpu_encode_bench, run it and accelerate_baseline.py on the same model and stream, and write
#   ${OUT_DIR:-bench/results}/gpu-<date>.json   (both results and the machine)
# Extra arguments go to both programs (e.g. --calls=100 --fraction=0.3; use the = form).
# Needs: a CUDA GPU, python3 with torch and accelerate, cmake, a C++17 compiler (C++20 for
# torch 2.14 and later), and the CUDA toolkit that pip's torch's CMake files look for.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

BUILD_DIR="${BUILD_DIR:-build-gpu-bench}"
OUT_DIR="${OUT_DIR:-bench/results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "${OUT_DIR}"
stamp="$(date -u +%Y-%m-%d)"

source bench/gpu/python_torch.sh
vramguard_configure_python_torch "${BUILD_DIR}" -DVRAMGUARD_BUILD_TESTS=OFF \
    -DVRAMGUARD_BUILD_EXAMPLES=OFF
cmake --build "${BUILD_DIR}" --target gpu_encode_bench -j "${JOBS:-$(nproc)}"

"${BUILD_DIR}/bench/gpu_encode_bench" "$@" --out="${OUT_DIR}/gpu-encode-${stamp}.json"
py_args=()
for arg in "$@"; do py_args+=("${arg%%=*}" "${arg#*=}"); done
"${PYTHON}" bench/gpu/accelerate_baseline.py "${py_args[@]}" --out "${OUT_DIR}/accelerate-${stamp}.json"

"${PYTHON}" - "${OUT_DIR}" "${stamp}" <<'PY'
import json, os, platform, sys
out_dir, stamp = sys.argv[1], sys.argv[2]
merged = {"date": stamp, "host": platform.node(), "runs": []}
for name in (f"gpu-encode-{stamp}.json", f"accelerate-{stamp}.json"):
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            merged["runs"].append(json.load(f))
path = os.path.join(out_dir, f"gpu-{stamp}.json")
with open(path, "w") as f:
    json.dump(merged, f, indent=2)
print(f"wrote {path}")
PY
