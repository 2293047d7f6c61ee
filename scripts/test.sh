#!/usr/bin/env bash
# The one test command: installs the test prerequisites, builds the vmesh binary the end-to-end
# tests start, then runs every test of the workspace (two test binaries at a time) and, after
# them, the bounded fuzz run of the upstream HTTP/1.1 client. Extra arguments make it a filtered
# `cargo test` run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

# One build per run: incremental compilation's caches would add half again to target/debug
# (2.6 GiB instead of 1.7) and buy nothing on a fresh clone (a CI run once filled its disk). Set
# CARGO_INCREMENTAL=1 to keep them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Free bytes on the filesystem that holds target/, in GiB.
free_gib() {
    mkdir -p target
    df -Pk target | awk 'NR == 2 { printf "%d", $4 / 1048576 }'
}
echo "test.sh: $(free_gib) GiB free for target/ at the start"

bash scripts/install-test-deps.sh
bash scripts/install-packaging-deps.sh
bash scripts/install-ansible-deps.sh
# A real Nautobot for the CMDB tests: installed and migrated once (minutes on a new machine),
# started in seconds afterwards, seeded with the test VMs through its REST API.
bash scripts/nautobot.sh install
bash scripts/nautobot.sh start
bash scripts/nautobot.sh seed
# The downloaded .deb files are not needed once installed.
apt-get clean 2>/dev/null || true
cargo build --workspace
if [ "$#" -gt 0 ]; then
    # A filtered run (e.g. `bash scripts/test.sh --test shift`): cargo's own runner.
    cargo test --workspace --no-fail-fast "$@"
else
    # Everything: the doc tests, then every test binary, two at a time (scripts/run-tests.py):
    # the end-to-end tests mostly wait on real processes, so the suite takes about half as long.
    status=0
    cargo test --workspace --doc || status=1
    python3 scripts/run-tests.py || status=1
    # Then the bounded fuzz run of the upstream HTTP/1.1 client (scripts/fuzz.sh: 45 s per
    # target after a build of a few minutes), after the tests so that it loads no timing margin.
    mkdir -p target/test-logs
    # The fuzz build (the agent again, with coverage instrumentation: about 2.5 GiB) needs room.
    # On a disk with less than FUZZ_MIN_FREE_GIB free, the builds the tests used go first: the
    # debug build and the release build the packaging tests made.
    min_free="${FUZZ_MIN_FREE_GIB:-8}"
    if [ "$(free_gib)" -lt "$min_free" ]; then
        echo "test.sh: $(free_gib) GiB free, less than $min_free: removing target/debug and target/release before the fuzz build"
        rm -rf target/debug target/release
    fi
    echo "test.sh: $(free_gib) GiB free for the fuzz build"
    if bash scripts/fuzz.sh 45 > target/test-logs/fuzz.log 2>&1; then
        tail -n 1 target/test-logs/fuzz.log
    else
        echo "===== fuzz failed: target/test-logs/fuzz.log =====" >&2
        tail -n 60 target/test-logs/fuzz.log >&2
        status=1
    fi
    # The last line of the run: every test binary's result summed in cargo test's own form.
    cat target/test-logs/summary.txt 2>/dev/null || echo "test result: FAILED. no summary from scripts/run-tests.py"
    exit "$status"
fi
