#!/usr/bin/env bash
# The one test command: installs the test prerequisites, builds the vmesh binary the end-to-end
# tests start, then runs every test of the workspace. Extra arguments go to `cargo test`.
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
cargo test --workspace --no-fail-fast "$@"
