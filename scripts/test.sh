#!/usr/bin/env bash
# The one test command: installs the test prerequisites, builds the vmesh binary the end-to-end
# tests start, then runs every test of the workspace (two test binaries at a time) and, after
# them, the bounded fuzz run of the upstream HTTP/1.1 client. Extra arguments make it a filtered
# `cargo test` run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
bash scripts/install-packaging-deps.sh
bash scripts/install-ansible-deps.sh
# A real Nautobot for the CMDB tests: installed and migrated once (minutes on a new machine),
# started in seconds afterwards, seeded with the test VMs through its REST API.
bash scripts/nautobot.sh install
bash scripts/nautobot.sh start
bash scripts/nautobot.sh seed
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
