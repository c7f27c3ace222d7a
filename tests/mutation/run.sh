#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The mutation run of issue 18: twelve one-line changes to the code that once survived every test.
# Each is applied to its file (by its text: the script fails loudly when the text is no longer
# there exactly once), the test binaries that should catch it are rebuilt in BUILD_DIR and run,
# and the mutation is reported "killed" (a test failed) or "survived". The file is restored from a
# copy afterwards (also on Ctrl-C), never through git, so uncommitted work is safe.
# The mutants live in the source tree while they run: build nothing else from it meanwhile (another
# build directory would compile a mutant).
#
#   tests/mutation/run.sh [BUILD_DIR] [MUTATION_NUMBER...]
#
# BUILD_DIR defaults to build/ (configured, e.g. cmake --preset dev). Exit status: 0 when every
# mutation was killed, 1 when one survived, 2 on a usage or setup error or a mutant that does
# not compile.
set -u
cd "$(dirname "$0")/../.." || exit 2
build=${1:-build}
shift || true
[ -f "$build/CMakeCache.txt" ] || { echo "run.sh: $build is not a configured build directory" >&2; exit 2; }
jobs=${MUTATION_JOBS:-2}
per_binary_timeout=${MUTATION_TIMEOUT:-300}

# One mutation: number, file, the text changed (exactly once in the file), what it becomes, the
# test targets that must catch it, what it breaks. Perl string escapes in the texts: \n, \&.
mutations=()
mutation() { mutations+=("$#"); mutations+=("$@"); }
mutation 1 include/vramguard/policy.hpp \
  'largest = std::min(largest, planned_size);' 'largest = std::max(largest, planned_size);' \
  cost_model_test "fit_cost: near the planned size"
mutation 2 include/vramguard/policy.hpp \
  'report->requested_bytes <= *report->free_bytes;' 'report->requested_bytes < *report->free_bytes;' \
  cost_model_test "failure_was_transient: requested == free"
mutation 3 include/vramguard/policy.hpp \
  'return measurements_taken < cost_window / 2;' 'return measurements_taken < cost_window / 8;' \
  decisions_test "the measure-every-chunk phase"
mutation 4 include/vramguard/policy.hpp \
  'facts.spoiled >= spoiled_before_exclusive;' 'facts.spoiled >= spoiled_before_exclusive \&\& false;' \
  decisions_test "the exclusive measurement turn"
mutation 5 include/vramguard/policy.hpp \
  'if (failure_was_transient(report)) return std::nullopt;' 'if (!failure_was_transient(report)) return std::nullopt;' \
  decisions_test "the transient item-OOM retry"
mutation 6 include/vramguard/policy.hpp \
  'if (failure_was_transient(report)) return 0;' 'if (false) return 0;' \
  decisions_test "no lower bound from a transient OOM"
mutation 7 include/vramguard/detail/chunk_planner.hpp \
  'policy::encode_reserve_bytes(seen.free_bytes, options().encode_reserve)' \
  'policy::encode_reserve_bytes(seen.total_bytes, options().encode_reserve)' \
  decisions_test "the reserve: a share of what is free"
mutation 8 include/vramguard/policy.hpp \
  'return !exclusive_held \&\& !inside_another_run \&\& others_running;' 'return false;' \
  decisions_test "an item OOM beside others: retry alone"
mutation 9 include/vramguard/detail/run_tracker.hpp \
  'tracker_.starts_.added() == starts_seen_;' 'true;' \
  learner_test "no run started during a measurement"
mutation 10 include/vramguard/detail/run_tracker.hpp \
  'solo_ = tracker.running_.sum() <= 1;' 'solo_ = tracker.running_.sum() <= 2;' \
  learner_test "nothing running when a measurement starts"
mutation 11 include/vramguard/detail/peer_call.hpp \
  'std::shared_ptr<std::mutex> existing = locks[device].lock();' 'std::shared_ptr<std::mutex> existing;' \
  peer_relief_test "one peer relief per device"
mutation 12 include/vramguard/peers_http.hpp \
  'if (queue.running + queue.pending > 0)' 'if (queue.running > 0)' \
  peers_http_test "ComfyUI: pending prompts are busy"

# Replaces the one occurrence of $1 by $2 in file $3 (Perl string escapes: \n, \&); status 3 when
# the text is there zero or several times (the file is then left as it was).
apply() {
  FROM="$1" TO="$2" perl -0777 -e '
    my ($from, $to) = map { my $s = $_; $s =~ s/\\n/\n/g; $s =~ s/\\&/&/g; $s } ($ENV{FROM}, $ENV{TO});
    my $path = $ARGV[0];
    open(my $in, "<", $path) or die "$path: $!";
    local $/; my $text = <$in>; close $in;
    my $count = () = $text =~ /\Q$from\E/g;
    if ($count != 1) { print STDERR "  the text is there $count times, not once\n"; exit 3; }
    $text =~ s/\Q$from\E/$to/;
    open(my $out, ">", $path) or die "$path: $!";
    print $out $text; close $out;' "$3"
}

backup=""
target_file=""
restore() {
  if [ -n "$backup" ]; then
    cp -p "$backup" "$target_file" && rm -f "$backup"
    touch "$target_file"  # newer than the mutant's objects: the next build recompiles
    backup=""
  fi
}
trap 'restore; exit 2' INT TERM
trap restore EXIT

wanted=" $* "
survived=0
errors=0
i=0
while [ "$i" -lt "${#mutations[@]}" ]; do
  number=${mutations[$((i + 1))]} file=${mutations[$((i + 2))]} from=${mutations[$((i + 3))]}
  to=${mutations[$((i + 4))]} targets=${mutations[$((i + 5))]} what=${mutations[$((i + 6))]}
  i=$((i + 1 + ${mutations[$i]}))
  [ "$wanted" = "  " ] || [[ "$wanted" == *" $number "* ]] || continue
  target_file=$file
  backup=$(mktemp "/tmp/mutation.$number.XXXXXX") && cp -p "$file" "$backup" || exit 2
  if ! apply "$from" "$to" "$file"; then
    echo "mutation $number ($file): the code's text is no longer there exactly once: update run.sh" >&2
    restore
    exit 2
  fi
  verdict=survived
  log="/tmp/mutation.$number.$$.log"
  if ! cmake --build "$build" --target $targets -j"$jobs" >"$log" 2>&1; then
    verdict="ERROR: the mutant does not compile (see $log)"
    errors=$((errors + 1))
  else
    for t in $targets; do
      if ! timeout "$per_binary_timeout" "$build/tests/$t" >>"$log" 2>&1; then
        failed=$(grep -E '^\[  FAILED  \] [A-Za-z]' "$log" | grep -v 'listed below' | sed 's/^\[  FAILED  \] //; s/ (.*//' | sort -u | tr '\n' ' ')
        verdict="killed by ${failed:-$t (crashed or timed out)}"
        break
      fi
    done
  fi
  restore
  [ "$verdict" = survived ] && survived=$((survived + 1))
  printf '%2s %-40s %s\n' "$number" "$what" "$verdict"
  [ "${verdict#ERROR}" = "$verdict" ] && rm -f "$log"
done
# Rebuild what the mutants left behind, so that the build directory holds the real code again.
cmake --build "$build" --target cost_model_test decisions_test learner_test peer_relief_test \
  peers_http_test -j"$jobs" >/dev/null 2>&1 || true
[ "$errors" -eq 0 ] || exit 2
[ "$survived" -eq 0 ]
