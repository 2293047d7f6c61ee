#!/usr/bin/env python3
"""Runs every test binary of the workspace, JOBS at a time (default 2), and reports each.

`cargo test` runs its test binaries one after another; most of vmesh's end-to-end tests wait on
real processes (upstreams, registries, Nautobot, systemd containers) far more than they compute,
so two binaries side by side finish the suite in about half the time on a 2-core machine. Each
binary still runs its own tests in parallel threads, as under `cargo test`, in its package's
directory. The longest binaries (from the last run's timings in target/test-times.json) start
first. Each binary's libtest lines are printed as cargo test prints them, and the last line
sums them all in cargo's "test result:" form (also written to target/test-logs/summary.txt).
Exit 0 only if every binary passed; the output of a failed one is printed in full.

  python3 scripts/run-tests.py [--jobs N] [--only tests:errors,tests:http1]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMES = ROOT / "target" / "test-times.json"
# The lines libtest itself prints: "running N tests", "test name ... ok", "test result: ...".
LIBTEST_LINE = re.compile(r"^(running \d+ tests?$|test .+ \.\.\. |test result: )")
RESULT_LINE = re.compile(
    r"^test result: \w+\. (?P<passed>\d+) passed; (?P<failed>\d+) failed; (?P<ignored>\d+) ignored"
)


def test_binaries():
    """(name, executable, package dir) of every test binary, built if needed."""
    out = subprocess.run(
        ["cargo", "test", "--workspace", "--no-run", "--message-format=json"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    found = []
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("profile", {}).get("test"):
            continue
        exe = msg.get("executable")
        if not exe:
            continue
        target = msg["target"]
        kinds = target.get("kind", [])
        package_dir = str(Path(msg["manifest_path"]).parent)
        pkg = Path(package_dir).name
        name = f"{pkg}:{target['name']}" + (" (unit)" if "lib" in kinds or "bin" in kinds else "")
        found.append((name, exe, package_dir))
    return found


# Binaries that share state outside themselves and must not run at the same time: the test
# Nautobot's VMs (cmdb_nautobot decommissions and edits web-01, which init reads).
EXCLUSIVE = [{"tests:cmdb_nautobot", "tests:init"}]


def conflicts(name, running):
    return any(name in group and running & (group - {name}) for group in EXCLUSIVE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("VMESH_TEST_JOBS", "2")))
    ap.add_argument("--only", default="", help="comma-separated binary names (e.g. tests:errors)")
    args = ap.parse_args()
    binaries = test_binaries()
    if args.only:
        wanted = set(args.only.split(","))
        binaries = [b for b in binaries if b[0] in wanted]
    try:
        last = json.loads(TIMES.read_text())
    except (OSError, ValueError):
        last = {}
    binaries.sort(key=lambda b: -last.get(b[0], 60.0))
    queue = list(binaries)
    lock = threading.Lock()
    results = {}
    logs = ROOT / "target" / "test-logs"
    totals = {"passed": 0, "failed": 0, "ignored": 0}
    logs.mkdir(parents=True, exist_ok=True)

    running = set()
    free = threading.Condition(lock)

    def worker():
        while True:
            with lock:
                while True:
                    if not queue:
                        return
                    # The first queued binary that shares nothing with one running now.
                    pick = next((i for i, b in enumerate(queue) if not conflicts(b[0], running)), None)
                    if pick is not None:
                        break
                    free.wait()
                name, exe, cwd = queue.pop(pick)
                running.add(name)
            log = logs / (name.replace(":", "-").replace(" ", "_") + ".log")
            start = time.monotonic()
            with open(log, "w") as f:
                rc = subprocess.run([exe], cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
            took = time.monotonic() - start
            # libtest's own lines (the count, one line per test, the result), as cargo test
            # prints them, without what the tests themselves wrote in between.
            libtest = [
                line
                for line in log.read_text(errors="replace").splitlines()
                if LIBTEST_LINE.match(line)
            ]
            with lock:
                running.discard(name)
                free.notify_all()
                results[name] = (rc, took, log)
                state = "ok" if rc == 0 else f"FAILED (exit {rc})"
                for line in libtest:
                    m = RESULT_LINE.match(line)
                    if m:
                        for key in totals:
                            totals[key] += int(m.group(key))
                print(f"\n     Running {name} ({exe})", flush=True)
                print("\n".join(libtest), flush=True)
                print(f"[{len(results)}/{len(binaries)}] {name}: {state} in {took:.0f} s", flush=True)

    begin = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last.update({n: round(r[1], 1) for n, r in results.items()})
    TIMES.write_text(json.dumps(last, indent=1, sort_keys=True))
    failed = [(n, r) for n, r in results.items() if r[0] != 0]
    for name, (_, _, log) in failed:
        print(f"\n===== {name} failed: {log} =====")
        print(log.read_text(errors="replace"))
    took = time.monotonic() - begin
    print(
        f"\n{len(results) - len(failed)} of {len(results)} test binaries passed in "
        f"{took:.0f} s ({args.jobs} at a time)"
    )
    # One summary of every binary in cargo test's own form; also kept in a file, which
    # scripts/test.sh prints again as the last line of the whole run.
    overall = (
        f"test result: {'FAILED' if failed else 'ok'}. {totals['passed']} passed; "
        f"{totals['failed']} failed; {totals['ignored']} ignored; 0 measured; "
        f"0 filtered out; finished in {took:.2f}s"
    )
    print(overall, flush=True)
    (logs / "summary.txt").write_text(overall + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
