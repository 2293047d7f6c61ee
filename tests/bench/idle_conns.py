#!/usr/bin/env python3
"""Memory of a proxy holding many client connections, for tests/bench/run.sh (stdlib only).

  idle_conns.py idle --port P --pid PID [--conns 10000] [--concurrency 64] [--idle-s 3]
                     [--no-request]
      Opens CONNS keep-alive connections to 127.0.0.1:P and sends one `GET /` on each (at most
      CONCURRENCY requests at a time, so the proxy's upstream pool stays as small as that),
      reads each whole response, then keeps every connection open and idle for IDLE_S seconds
      (the same for every proxy: an idle connection is one that has been idle a while; vmesh
      parks a connection idle for 1 s, proxy.idle_park_after), waits for the RSS of PID's
      process tree to settle and measures it. --no-request (a diagnostic) opens the
      connections and sends nothing: the cost of an accepted connection alone.
  idle_conns.py slow --port P --pid PID --upstream U [--requests 1000]
      Opens REQUESTS connections to 127.0.0.1:P, each sending `GET /gate`, which
      tests/fixtures/upstream.py (listening on 127.0.0.1:U) holds until it is released. They go
      out in batches of CONCURRENCY, each batch once the upstream reports the ones before it in
      flight (/__stats): the fixture's accept backlog is 128, and a burst of 1000 new upstream
      connections overflows it, so a proxy with a short connect timeout (vmesh: 1 s, one SYN
      retransmission) would fail requests that a patient one only delays. Then waits for the
      RSS to settle and measures it, releases them (/__control?release=1) and checks every answer.

Prints one line of key=value pairs: rss_before_kib (the tree's RSS before the first connection),
rss_kib (with the connections held), the count asked for, failed (connections or requests that
could not be set up), open (connections still open when measured: a proxy that closed idle
connections early is caught here), ok (2xx answers; slow mode), setup_s. The RSS is VmRSS summed
over PID and its descendants (nginx master + worker), as tests/bench/run.sh measures it.
Exits 1 when nothing could be measured; every wait is bounded.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request

REQUEST = b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n"
SETTLE_STEP_S = 0.2
SETTLE_LIMIT_S = 5.0
SETTLE_KIB = 64  # samples within this of each other count as settled


def tree_rss_kib(root):
    """VmRSS in KiB summed over `root` and all its descendants."""
    parent = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    members = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    total = 0
    for pid in members:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


async def settled_rss(root):
    """The tree's RSS once three samples in a row lie within SETTLE_KIB (or after SETTLE_LIMIT_S)."""
    samples = [tree_rss_kib(root)]
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_STEP_S)
        samples.append(tree_rss_kib(root))
        last = samples[-3:]
        if len(last) == 3 and max(last) - min(last) <= SETTLE_KIB:
            break
    return samples[-1]


async def read_response(reader):
    """Reads one HTTP/1.1 response (Content-Length or chunked); returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            await reader.readexactly(size + 2)
    elif length:
        await reader.readexactly(length)
    return status


def still_open(conns):
    """Connections the proxy has not closed (EOF not seen)."""
    return sum(1 for reader, _ in conns if not reader.at_eof())


async def close_all(conns):
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


def upstream_json(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as resp:
        return json.loads(resp.read())


async def idle(args):
    before = tree_rss_kib(args.pid)
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
            if args.no_request:
                return reader, writer
            try:
                writer.write(REQUEST % b"/")
                status = await read_response(reader)
            except BaseException:
                writer.close()
                raise
            if not 200 <= status < 300:
                writer.close()
                raise RuntimeError("status %d" % status)
            return reader, writer

    results = await asyncio.wait_for(
        asyncio.gather(*(one() for _ in range(args.conns)), return_exceptions=True), args.timeout
    )
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    setup_s = time.monotonic() - t0
    await asyncio.sleep(args.idle_s)
    rss = await settled_rss(args.pid)
    await asyncio.sleep(0)  # let pending EOFs land before counting
    fields = {
        "mode": "idle-no-request" if args.no_request else "idle",
        "conns": args.conns,
        "failed": len(errors),
        "open": still_open(conns),
        "rss_before_kib": before,
        "rss_kib": rss,
        "setup_s": "%.1f" % setup_s,
    }
    if errors:
        fields["first_error"] = '"%s"' % repr(errors[0]).replace('"', "'")
    await close_all(conns)
    return fields


async def slow(args):
    base = upstream_json(args.upstream, "/__stats")["in_flight"]
    before = tree_rss_kib(args.pid)
    connect_sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()

    async def send():
        async with connect_sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
        writer.write(REQUEST % b"/gate")
        await writer.drain()
        return reader, writer

    async def held():
        return (await asyncio.to_thread(upstream_json, args.upstream, "/__stats"))["in_flight"] - base

    conns, errors = [], []
    in_flight = 0
    deadline = time.monotonic() + args.timeout
    for start in range(0, args.requests, args.concurrency):
        batch = min(args.concurrency, args.requests - start)
        results = await asyncio.wait_for(
            asyncio.gather(*(send() for _ in range(batch)), return_exceptions=True),
            max(1.0, deadline - time.monotonic()),
        )
        conns += [r for r in results if not isinstance(r, BaseException)]
        errors += [r for r in results if isinstance(r, BaseException)]
        # Observable state, not a sleep: the upstream counts the held requests. A request the
        # proxy failed never arrives; the batch wait ends at the deadline and the count says so.
        while time.monotonic() < deadline:
            in_flight = await held()
            if in_flight >= len(conns):
                break
            await asyncio.sleep(0.02)
    setup_s = time.monotonic() - t0
    rss = await settled_rss(args.pid)
    await asyncio.sleep(0)
    open_now = still_open(conns)
    await asyncio.to_thread(upstream_json, args.upstream, "/__control?release=1")
    statuses = await asyncio.wait_for(
        asyncio.gather(*(read_response(r) for r, _ in conns), return_exceptions=True), args.timeout
    )
    ok = sum(1 for s in statuses if isinstance(s, int) and 200 <= s < 300)
    fields = {
        "mode": "slow",
        "requests": args.requests,
        "failed": len(errors),
        "in_flight": in_flight,
        "open": open_now,
        "ok": ok,
        "rss_before_kib": before,
        "rss_kib": rss,
        "setup_s": "%.1f" % setup_s,
    }
    if errors:
        fields["first_error"] = '"%s"' % repr(errors[0]).replace('"', "'")
    await close_all(conns)
    return fields


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["idle", "slow"])
    p.add_argument("--port", type=int, required=True, help="the proxy's port on 127.0.0.1")
    p.add_argument("--pid", type=int, required=True, help="the proxy's process (tree root)")
    p.add_argument("--conns", type=int, default=10000, help="idle: connections to hold")
    p.add_argument("--requests", type=int, default=1000, help="slow: requests to hold in flight")
    p.add_argument("--upstream", type=int, help="slow: port of tests/fixtures/upstream.py")
    p.add_argument("--concurrency", type=int, default=64, help="connections opened at once")
    p.add_argument("--idle-s", type=float, default=3.0, help="idle: seconds the connections are held idle before the RSS is sampled")
    p.add_argument("--no-request", action="store_true", help="idle: open the connections, send nothing")
    p.add_argument("--timeout", type=float, default=120.0, help="bound of each phase, seconds")
    args = p.parse_args()
    if args.mode == "slow" and not args.upstream:
        p.error("slow needs --upstream")
    try:
        fields = asyncio.run(idle(args) if args.mode == "idle" else slow(args))
    except (OSError, asyncio.TimeoutError, ValueError, KeyError) as e:
        print("idle_conns: %s: %r" % (args.mode, e), file=sys.stderr)
        return 1
    print(" ".join("%s=%s" % kv for kv in fields.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
