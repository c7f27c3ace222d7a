#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds the libFuzzer targets with clang (-fsanitize=fuzzer,address,undefined) and runs each for
# ${FUZZ_SECONDS:-60} seconds over a scratch copy of its seed corpus. Fails on any crash, leak,
# sanitizer report, invariant violation or timeout; the reproducer is kept in the artifacts folder.
#
#   tests/fuzz/run.sh                      # every fuzzer, 60 s each
#   FUZZ_SECONDS=600 tests/fuzz/run.sh fuzz_key
#   FUZZ_JOBS=2 ...                        # libFuzzer workers per target (default 1)
#
# Environment: CXX (default clang++), FUZZ_BUILD_DIR (default build-fuzz), FUZZ_SECONDS,
# FUZZ_JOBS, FUZZ_MAX_LEN (default 4096), FUZZ_ARTIFACTS (default $FUZZ_BUILD_DIR/artifacts).
# A new crash: minimise it (./fuzz_x -minimize_crash=1 crash-...), add it to corpus/<target>/ and
# a test to tests/unit/regression_test.cpp.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${FUZZ_BUILD_DIR:-$root/build-fuzz}"
seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-1}"
max_len="${FUZZ_MAX_LEN:-4096}"
artifacts="${FUZZ_ARTIFACTS:-$build/artifacts}"
cxx="${CXX:-clang++}"
if [[ "$cxx" != *clang* ]]; then
    echo "run.sh: CXX=$cxx is not clang; using clang++ (libFuzzer is clang's)" >&2
    cxx=clang++
fi

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S "$root" -B "$build" "${generator[@]}" \
    -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DVRAMGUARD_BUILD_FUZZERS=ON -DVRAMGUARD_BUILD_TESTS=OFF \
    -DVRAMGUARD_BUILD_EXAMPLES=OFF -DVRAMGUARD_BUILD_BENCH=OFF -DVRAMGUARD_INSTALL=OFF \
    -DVRAMGUARD_USE_CUDA_IF_AVAILABLE=OFF -DVRAMGUARD_USE_TORCH_IF_AVAILABLE=OFF >/dev/null

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    for source in "$root"/tests/fuzz/fuzz_*.cpp; do
        name="$(basename "$source" .cpp)"
        targets+=("$name")
    done
fi
cmake --build "$build" --target "${targets[@]}"

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$artifacts"
failed=()
for name in "${targets[@]}"; do
    binary="$build/tests/fuzz/$name"
    seeds="$root/tests/fuzz/corpus/$name"
    work="$build/corpus/$name"
    rm -rf "$work"
    mkdir -p "$work"
    if [[ -d "$seeds" ]]; then cp -R "$seeds"/. "$work"/; fi
    echo "== $name: ${seconds}s, $(find "$work" -type f | wc -l) seeds"
    log="$build/$name.log"
    status=0
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a runaway allocation is a bug too.
    parallel=()
    if [[ "$jobs" -gt 1 ]]; then parallel=(-jobs="$jobs" -workers="$jobs"); fi
    (cd "$build" && "$binary" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 "${parallel[@]}" \
        -artifact_prefix="$artifacts/$name-" "$work") >"$log" 2>&1 || status=$?
    if [[ "$jobs" -gt 1 ]]; then cat "$build"/fuzz-*.log >>"$log" 2>/dev/null || true; rm -f "$build"/fuzz-*.log; fi
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::|Done [0-9]+ runs)' "$log" || tail -n 5 "$log"
    if [[ $status -ne 0 ]] || grep -qE 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|runtime error:|invariant violated' "$log"; then
        echo "!! $name failed (exit $status); log: $log; artifacts: $artifacts" >&2
        tail -n 60 "$log" >&2
        failed+=("$name")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzzers failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzzers passed: ${targets[*]} (${seconds}s each)"
