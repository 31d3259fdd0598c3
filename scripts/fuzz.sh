#!/usr/bin/env bash
# Fuzzes every parser that reads what another party sends (fuzz/fuzz_targets/), with libFuzzer
# through cargo-fuzz on the stable toolchain (no sanitizer: the project has no unsafe code).
#
#   scripts/fuzz.sh [--seconds N | --runs N] [--grow] [TARGET...]
#
# Default: 45 s per target, every target; new inputs go to a scratch directory and the corpus in
# fuzz/corpus/ is only read. --grow adds what the fuzzer finds to fuzz/corpus/ (then minimise it
# with `cargo fuzz cmin`). A crash stops the run with its input under fuzz/artifacts/TARGET/:
# make it a regression test, then fix it. Prints one line per target: runs, runs/s, result.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

limit=(-max_total_time=45) grow=0 targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2" -max_total_time=1800); shift 2 ;;
    --grow) grow=1; shift ;;
    -*) echo "unknown option $1 (use --seconds N, --runs N, --grow)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

TOOLS=$ROOT/target/tools
export PATH=$TOOLS/bin:$PATH
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== cargo install cargo-fuzz (into target/tools)"
  if ! cargo install --quiet --locked --root "$TOOLS" cargo-fuzz@0.13.2; then
    echo "SKIPPED fuzzing: cannot install cargo-fuzz from crates.io (offline?);" \
      "install it with 'cargo install cargo-fuzz' and run scripts/fuzz.sh" >&2
    exit 0
  fi
fi
if ! command -v c++ >/dev/null 2>&1; then
  echo "SKIPPED fuzzing: libFuzzer needs a C++ compiler; apt-get install g++" >&2
  exit 0
fi

cd fuzz
FUZZ=(cargo fuzz)
FLAGS=(--sanitizer none --codegen-units 16 --target-dir "$ROOT/target/fuzz")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <("${FUZZ[@]}" list)
echo "== cargo fuzz build (${#targets[@]} targets)"
"${FUZZ[@]}" build "${FLAGS[@]}"

scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  if [ "$grow" = 1 ]; then dirs=("corpus/$t"); else mkdir -p "$scratch/$t"; dirs=("$scratch/$t" "corpus/$t"); fi
  log=$scratch/$t.log
  if "${FUZZ[@]}" run "${FLAGS[@]}" "$t" "${dirs[@]}" -- "${limit[@]}" -max_len=65536 \
      -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  printf 'fuzz %-18s %12s runs %9s runs/s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "$result"
  if [ "$result" != ok ]; then
    grep -E "panicked|ERROR|SUMMARY|artifact" "$log" | head -20 >&2
    exit 1
  fi
done
