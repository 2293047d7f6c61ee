#!/usr/bin/env bash
# Runs every cargo-fuzz target of vmesh's own HTTP/1.1 code (agent/fuzz/fuzz_targets: the upstream
# client's response head parser and body framing, the downstream server's request head parser with
# the body after it) for a bounded time each, and fails on any finding.
#
#   bash scripts/fuzz.sh [SECONDS]     # per target, default 60
#
# Works on the stable toolchain: with no sanitizer (`-s none`) cargo-fuzz passes only stable rustc
# options (the coverage passes, `--cfg fuzzing`), so neither nightly nor RUSTC_BOOTSTRAP is
# needed; the code under test has no unsafe, and what the targets look for (panics, overflows,
# disagreements between split and whole input) needs no sanitizer. Release build with debug
# assertions and overflow checks (cargo-fuzz's default). Installs cargo-fuzz when it is missing.
# Builds go to target/fuzz/ (not under agent/, whose sources tests/tests/invariants.rs reads).
# The corpus grows in agent/fuzz/corpus/<target>/ (seeded from agent/fuzz/seeds/<target>/); a
# crashing input is kept in agent/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../agent/fuzz"

seconds="${1:-60}"
case "$seconds" in
    '' | *[!0-9]*) echo "fuzz.sh: seconds must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=$(cargo fuzz list)
for target in $targets; do
    mkdir -p "corpus/$target"
    echo "fuzz.sh: $target for ${seconds}s"
    # -max_total_time bounds the run; libFuzzer exits non-zero on a crash, a panic or a timeout.
    cargo fuzz run -s none --target-dir ../../target/fuzz "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz.sh: no finding in $(echo $targets | wc -w) targets, ${seconds}s each"
