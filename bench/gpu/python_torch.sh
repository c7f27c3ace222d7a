# SPDX-License-Identifier: MIT
# Sourced by bench/gpu/run_gpu_bench.sh and tests/gpu/run_gpu_tests.sh: configures a build
# directory against the LibTorch of the Python torch (pip's CUDA build on a GPU machine).
#   vramguard_configure_python_torch <build-dir> [extra cmake arguments...]
# Environment: PYTHON (python3), CXX_STANDARD (17 below torch 2.14, 20 from it: LibTorch 2.14
# headers refuse C++17).
vramguard_configure_python_torch() {
    local build_dir="$1"
    shift
    local python="${PYTHON:-python3}"
    local prefix version standard
    prefix="$("${python}" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
    version="$("${python}" -c 'import torch; print(torch.__version__)')"
    standard="${CXX_STANDARD:-$("${python}" -c '
import torch
major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
print(20 if (major, minor) >= (2, 14) else 17)')}"
    echo "vramguard: LibTorch ${version} from ${prefix}, building as C++${standard}"
    cmake -S . -B "${build_dir}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="${prefix}" \
        -DCMAKE_CXX_STANDARD="${standard}" -DVRAMGUARD_REQUIRE_TORCH=ON "$@"
}
