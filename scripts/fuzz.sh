#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each, one after the
# other, and prints a line per target: executions, seconds, corpus size. Used by .ci/run for a
# smoke run (5 s each) and by hand for a campaign (docs/reliability.md, "Fuzzing").
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # default: 5 s, every target
#
# New inputs go to fuzz/work/<target>/ (not committed); the committed seeds in
# fuzz/corpus/<target>/ and fuzz/regressions/<target>/ are read, never written. A crash
# leaves its input in fuzz/artifacts/<target>/ and fails the script.
#
# cargo-fuzz passes flags that only a nightly compiler accepts. This uses the default
# toolchain with RUSTC_BOOTSTRAP=1 (which lets a stable compiler accept them), or the nightly
# toolchain when that fails. When cargo-fuzz is not installed or neither toolchain builds the
# targets, it says so and exits 0: the same targets then run over their corpora as ordinary
# tests (`cargo test -p portcullis-fuzz-targets`), so CI never depends on a nightly compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-5}
shift || true
if (($# > 0)); then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do
    t=${f##*/}
    targets+=("${t%.rs}")
  done
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: skipped: cargo-fuzz is not installed (cargo install cargo-fuzz)"
  exit 0
fi

# No sanitizer: the code under test is safe Rust, and without ASan each target runs about
# twice as fast. Debug assertions and overflow checks stay on (cargo-fuzz's default).
build_flags=(-s none --codegen-units 16)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
toolchain=()
if RUSTC_BOOTSTRAP=1 cargo fuzz build "${build_flags[@]}" >"$log" 2>&1; then
  export RUSTC_BOOTSTRAP=1
elif rustup run nightly rustc --version >/dev/null 2>&1 &&
  cargo +nightly fuzz build "${build_flags[@]}" >"$log" 2>&1; then
  toolchain=(+nightly)
else
  echo "fuzz: skipped: neither RUSTC_BOOTSTRAP=1 nor a nightly toolchain builds the targets:"
  tail -n 20 "$log"
  exit 0
fi

printf '%-16s %12s %8s %8s\n' target executions seconds corpus
failed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/work/$t"
  extra=()
  case $t in
    # Long enough for chunk extensions and trailers past the guards' line limits.
    smuggle_guard | chunked) extra=(-max_len=20000) ;;
  esac
  if ! cargo "${toolchain[@]}" fuzz run "${build_flags[@]}" "$t" \
    "fuzz/work/$t" "fuzz/corpus/$t" $([[ -d fuzz/regressions/$t ]] && echo "fuzz/regressions/$t") \
    -- -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    failed+=("$t")
    echo "fuzz: $t FAILED:"
    tail -n 40 "$log"
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  size=$(find "fuzz/work/$t" -type f | wc -l)
  printf '%-16s %12s %8s %8s\n' "$t" "${runs:-?}" "${took:-?}" "$size"
done
if ((${#failed[@]})); then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
