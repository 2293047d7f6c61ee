#!/usr/bin/env bash
# The one test command: installs the test prerequisites, builds the vmesh binary the end-to-end
# tests start, then runs every test of the workspace (two test binaries at a time). Extra
# arguments make it a filtered `cargo test` run instead.
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
    cargo test --workspace --doc
    python3 scripts/run-tests.py
fi
