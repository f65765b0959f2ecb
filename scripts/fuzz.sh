#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer) of the wire parsers and the broker's connection state
# machine, on the stable toolchain.
#
#   ./scripts/fuzz.sh [--seconds-per-target N | --runs-per-target N] [--seed S]
#                     [--fresh-corpus] [TARGET...]
#
# Targets (fuzz/fuzz_targets/): frame_decoder, hello, control, ack, batch, delivery,
# record_batch (Kafka record batches), connection; all of them when none is named. Each runs for N seconds (default 60), or for
# exactly N inputs with --runs-per-target, with a 5 s limit per input (a slower input is a
# hang, and fails like a crash). --seed S fixes libFuzzer's random seed (default: a new one
# each run). --fresh-corpus starts from the seed inputs alone (in target/fuzz/fresh-corpus,
# emptied first) instead of the corpus earlier runs grew. test.sh uses all three: the same
# amount of work on any machine, nearly the same inputs (not exactly: the broker's hash maps
# iterate in a per-process order, which shows in the coverage that guides libFuzzer), and
# any crash saved as an input that reproduces it. Corpora persist in
# target/fuzz/corpus/<target>, seeded with valid inputs by fuzz/input's write-seeds; crashing
# and hanging inputs land in target/fuzz/artifacts/<target>/ (reproduce one by passing its
# path to the target binary; once fixed, keep it in fuzz/regressions/<target>/, which every
# run replays). Prints one line per target, writes target/fuzz/summary.json
# (a list of {"target", "seconds", "executions", "seed", "crashes", "timeouts", "coverage"}) and
# exits non-zero on any crash or hang.
#
# No nightly and no cargo-fuzz: the targets are built with stable rustc's own coverage
# instrumentation (the sancov LLVM pass), the flags cargo-fuzz passes with --sanitizer none.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ALL_TARGETS=(frame_decoder hello control ack batch delivery record_batch connection)
seconds=60
runs=
seed=0
corpus_dir=corpus
targets=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --seconds-per-target) seconds=$2; shift 2 ;;
        --runs-per-target) runs=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --fresh-corpus) corpus_dir=fresh-corpus; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: --seconds-per-target needs a positive integer" >&2; exit 2; }
[[ -z $runs || $runs =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: --runs-per-target needs a positive integer" >&2; exit 2; }
[[ $seed =~ ^[0-9]+$ ]] || { echo "fuzz: --seed needs a non-negative integer" >&2; exit 2; }
# -seed=0 lets libFuzzer pick one; -max_total_time=0 means no time limit.
if [[ -n $runs ]]; then
    budget=(-runs="$runs" -max_total_time=0)
else
    budget=(-max_total_time="$seconds")
fi
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")
for target in "${targets[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $target "* ]] || { echo "fuzz: unknown target $target (known: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

ensure_cargo
# libFuzzer is C++ (built by libfuzzer-sys); the broker links xdp-prog, which needs clang and
# libbpf's build dependencies.
. scripts/lab.sh
ensure_xdp_build_deps

out=target/fuzz
# fuzz/Cargo.lock pins what it can; not --locked, so that a dependency added to a crate of
# the main workspace does not break this build until the lock file is refreshed.
host=$(rustc -vV | sed -n 's/^host: //p')
echo "building the seed writer and the instrumented fuzz targets (stable rustc, sancov)"
cargo build --release -q --manifest-path fuzz/Cargo.toml -p fuzz-input \
    --target-dir "$out/seeds"
corpus=$out/$corpus_dir
[[ $corpus_dir == corpus ]] || rm -rf "$corpus"
"$out/seeds/release/write-seeds" "$corpus"
# Inputs that once crashed a target (fuzz/regressions/<target>/, named after the bug) join
# every corpus: libFuzzer runs each corpus input first, so a bug that comes back fails here.
for regressions in fuzz/regressions/*/; do
    mkdir -p "$corpus/$(basename "$regressions")"
    cp "$regressions"* "$corpus/$(basename "$regressions")/"
done
# --target keeps these flags off build scripts and proc macros.
RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cforce-frame-pointers" \
    cargo build --release -q --manifest-path fuzz/Cargo.toml -p embarcadero-fuzz \
    --target "$host" --target-dir "$out/build" --bins
bin=$out/build/$host/release

mkdir -p "$out/logs"
entries=()
failed=0
for target in "${targets[@]}"; do
    artifacts=$out/artifacts/$target
    log=$out/logs/$target.log
    mkdir -p "$artifacts" "$corpus/$target"
    before=$(find "$artifacts" -type f | sort)
    status=0
    started=$SECONDS
    "$bin/$target" "${budget[@]}" -seed="$seed" -timeout=5 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus/$target" >"$log" 2>&1 || status=$?
    elapsed=$((SECONDS - started))
    new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort))
    crashes=$(grep -c -E '/(crash|oom|leak)-' <<<"$new" || true)
    timeouts=$(grep -c -E '/timeout-' <<<"$new" || true)
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # The last "cov: N" libFuzzer printed: the code edges the inputs reached.
    coverage=$(awk '{ for (i = 1; i < NF; i++) if ($i == "cov:") c = $(i + 1) } END { print c + 0 }' "$log")
    executions=${executions:-0}
    # The seed libFuzzer used, so that any run can be repeated.
    used_seed=$(sed -n 's/.*Seed: \([0-9]*\).*/\1/p' "$log" | head -1)
    echo "fuzz $target: ${elapsed} s, $executions executions, seed ${used_seed:-?}, coverage $coverage, $crashes crashes, $timeouts timeouts"
    entries+=("{\"target\": \"$target\", \"seconds\": $elapsed, \"seed\": ${used_seed:-null}, \"executions\": $executions, \"crashes\": $crashes, \"timeouts\": $timeouts, \"coverage\": $coverage}")
    if [[ $crashes -gt 0 || $timeouts -gt 0 ]]; then
        failed=1
        echo "fuzz $target FAILED: input saved as $new (log: $log); reproduce with: $bin/$target $new" >&2
        grep -m1 -A3 -E 'panicked at|ERROR: libFuzzer' "$log" >&2 || true
    elif [[ $status -ne 0 ]]; then
        failed=1
        echo "fuzz $target FAILED: libFuzzer exited with $status without an artifact (log: $log)" >&2
        tail -5 "$log" >&2
    elif [[ $coverage -eq 0 ]]; then
        failed=1
        echo "fuzz $target FAILED: no coverage feedback (is the build instrumented?), log: $log" >&2
    fi
done
{
    echo "["
    for i in "${!entries[@]}"; do
        sep=,
        [[ $i -eq $((${#entries[@]} - 1)) ]] && sep=
        echo "  ${entries[$i]}$sep"
    done
    echo "]"
} >"$out/summary.json"
echo "summary: $out/summary.json"
exit "$failed"
