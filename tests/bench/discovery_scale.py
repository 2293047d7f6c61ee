#!/usr/bin/env python3
"""Helper of tests/bench/discovery-scale.sh (Python 3 stdlib only; loopback only).

    discovery_scale.py ports N
    discovery_scale.py etcd-load URL FROM TO            services [FROM, TO) x 10 instances
    discovery_scale.py consul-load URL FROM TO          the same through /v1/catalog/register
    discovery_scale.py consul-probe URL SERVICE         ms per /v1/health/service answer (10 reads)
    discovery_scale.py config --registry etcd|consul --address URL --services N --admin ADDR
                              --shared ADDR --data-dir DIR [--max-watches M]
    discovery_scale.py measure --registry etcd|consul --url URL --admin ADDR --pid PID
                               --started EPOCH --services N [--registry-pid PID] [...]
    discovery_scale.py table [--md] RESULT.json...      the table (text or markdown) and the targets

Data (the same in both registries): service svc-NNNN (N = 0..services-1) has instances
inst-0..inst-9 at 127.0.0.1:(10000 + 10*N + K), weight 100, env vm. A "change" adds an 11th
endpoint 127.0.0.2:(10000 + 10*N) to a random service, or deletes it again: changes come in
add/delete pairs on the same service, so every service is back to 10 endpoints afterwards.

etcd: keys /vmesh/services/svc-NNNN/inst-K, values
{"address":"127.0.0.1","port":P,"weight":100,"meta":{"env":"vm"}}, loaded through the v3 JSON
gateway (POST /v3/kv/txn, 128 puts per txn, 4 connections in parallel).
Consul: one catalog node per instance number (vm-0..vm-9, address 127.0.0.1), service ID
svc-NNNN-K, Meta vmesh-env=vm, one passing check service:svc-NNNN-K (every instance vmesh
registers carries its TTL check); the added endpoint is on node vm-extra. Registered with one
keep-alive connection (TCP_NODELAY; TCP_QUICKACK too, harmless now that the double sets
TCP_NODELAY on its side).
"""

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

ENDPOINTS = 10
BASE_PORT = 10000
EXTRA_IP = "127.0.0.2"


def svc(n):
    return "svc-%04d" % n


def port_of(n, k):
    return BASE_PORT + ENDPOINTS * n + k


def extra_addr(n):
    return "%s:%d" % (EXTRA_IP, port_of(n, 0))


def host_port(addr):
    if "://" in addr:
        addr = addr.split("://", 1)[1]
    host, port = addr.rstrip("/").rsplit(":", 1)
    return host, int(port)


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects once on a broken connection."""

    def __init__(self, addr, timeout=60.0):
        self.host, self.port = host_port(addr)
        self.timeout = timeout
        self.conn = None

    def _connect(self):
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        c.connect()
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = c

    def request(self, method, path, body=None):
        data = None if body is None else (body if isinstance(body, bytes) else body.encode())
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self._connect()
                c = self.conn
                c.putrequest(method, path, skip_accept_encoding=True)
                if data is not None:
                    c.putheader("Content-Type", "application/json")
                    c.putheader("Content-Length", str(len(data)))
                c.endheaders(data)  # head and body in one send
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                r = c.getresponse()
                out = r.read()
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                return r.status, out
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method, path, body=None, ok=(200,)):
        status, out = self.request(method, path, body)
        if status not in ok:
            raise RuntimeError("%s %s -> %d: %s" % (method, path, status, out[:300]))
        return json.loads(out) if out else None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def b64(s):
    return base64.b64encode(s.encode()).decode()


# === registries ===============================================================================


class Etcd:
    def __init__(self, url):
        self.url = url
        self.c = Client(url)

    @staticmethod
    def key(n, inst):
        return "/vmesh/services/%s/%s" % (svc(n), inst)

    @staticmethod
    def value(ip, port):
        return json.dumps({"address": ip, "port": port, "weight": 100, "meta": {"env": "vm"}},
                          separators=(",", ":"))

    def load(self, start, end, workers=4):
        puts = [(self.key(n, "inst-%d" % k), self.value("127.0.0.1", port_of(n, k)))
                for n in range(start, end) for k in range(ENDPOINTS)]
        batches = [puts[i:i + 128] for i in range(0, len(puts), 128)]
        local = threading.local()

        def send(batch):
            if not hasattr(local, "c"):
                local.c = Client(self.url)
            body = json.dumps({"success": [{"requestPut": {"key": b64(k), "value": b64(v)}}
                                           for k, v in batch]})
            local.c.json("POST", "/v3/kv/txn", body)
            return len(batch)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(send, batches))

    def add(self, n):
        body = json.dumps({"key": b64(self.key(n, "inst-extra")),
                           "value": b64(self.value(EXTRA_IP, port_of(n, 0)))})
        self.c.json("POST", "/v3/kv/put", body)

    def delete(self, n):
        self.c.json("POST", "/v3/kv/deleterange", json.dumps({"key": b64(self.key(n, "inst-extra"))}))


class Consul:
    def __init__(self, url):
        self.url = url
        self.c = Client(url)

    def register(self, node, n, sid, ip, port):
        # One passing check per instance, as every instance vmesh registers has its TTL check
        # (service:<id>): the checks are what the agent's catalog mode watches.
        body = json.dumps({"Node": node, "Address": "127.0.0.1",
                           "Service": {"ID": sid, "Service": svc(n), "Address": ip, "Port": port,
                                       "Meta": {"vmesh-env": "vm"}},
                           "Check": {"CheckID": "service:%s" % sid, "Name": "vmesh: application health",
                                     "ServiceID": sid, "Status": "passing"}})
        self.c.json("PUT", "/v1/catalog/register", body)

    def load(self, start, end):
        count = 0
        for k in range(ENDPOINTS):
            for n in range(start, end):
                self.register("vm-%d" % k, n, "%s-%d" % (svc(n), k), "127.0.0.1", port_of(n, k))
                count += 1
        return count

    def add(self, n):
        self.register("vm-extra", n, "%s-extra" % svc(n), EXTRA_IP, port_of(n, 0))

    def delete(self, n):
        self.c.json("PUT", "/v1/catalog/deregister",
                    json.dumps({"Node": "vm-extra", "ServiceID": "%s-extra" % svc(n)}))


def registry(kind, url):
    return Etcd(url) if kind == "etcd" else Consul(url)


# === /proc ====================================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    """utime + stime of PID (all its threads), in clock ticks."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(rest[11]) + int(rest[12])


def status_kib(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]  # total, idle + iowait


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def busy_neighbours():
    """Compilers and the like running now, as "name(pid)"."""
    names = ("cargo", "rustc", "cc1", "cc1plus", "ld", "clippy-driver", "cargo-clippy")
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/comm" % d) as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm in names:
                out.append("%s(%s)" % (comm, d))
    return out


# === measurement ==============================================================================


def clusters_of(admin, n):
    """The endpoint addresses of svc-n as the agent's /clusters shows them, or None."""
    doc = admin.json("GET", "/clusters?service=%s" % svc(n))
    cl = doc.get("clusters") or []
    if not cl:
        return None
    return [e["address"] for e in cl[0].get("endpoints") or []]


def complete(admin, n):
    return len(clusters_of(admin, n) or []) == ENDPOINTS


def wait_sync(admin, n_services, started, timeout, pid, seed):
    """Seconds from `started` until every service shows its 10 endpoints in /clusters.

    vmesh_discovery_updates_total cannot tell (the first, empty set counts too) and /metrics is
    ~14 KB per service, so: poll a sample (the last 10 services of the config, which Consul
    watches start last, and 10 random ones) every 50 ms until all of it is complete, then check
    every service once; those still incomplete are polled until they are. The sync time is when
    the last one was seen complete (the sample's time when the full check found nothing missing).
    """
    deadline = started + timeout
    rng = random.Random(seed)
    sample = sorted(set(range(max(0, n_services - 10), n_services))
                    | set(rng.sample(range(n_services), min(10, n_services))))
    pending = list(sample)
    last_report = time.time()
    while pending:
        if cpu_ticks(pid) is None:
            raise RuntimeError("the agent exited during the sync")
        pending = [n for n in pending if not complete(admin, n)]
        now = time.time()
        if not pending:
            break
        if now > deadline:
            raise RuntimeError("not synced after %.0f s: %d of %d sampled services still lack their "
                               "%d endpoints" % (timeout, len(pending), len(sample), ENDPOINTS))
        if now - last_report >= 15:
            last_report = now
            log("  sync: %d of %d sampled services complete after %.0f s"
                % (len(sample) - len(pending), len(sample), now - started))
        time.sleep(0.05)
    t_done = time.time()
    missing = [n for n in range(n_services) if n not in sample and not complete(admin, n)]
    if missing:
        log("  sync: sample complete after %.1f s, %d other services not yet" % (t_done - started, len(missing)))
    while missing:
        if time.time() > deadline:
            raise RuntimeError("%d services lack their %d endpoints after %.0f s (e.g. %s)"
                               % (len(missing), ENDPOINTS, timeout, svc(missing[0])))
        time.sleep(0.05)
        missing = [n for n in missing if not complete(admin, n)]
        t_done = time.time()
    return t_done - started


def metrics_probe(admin):
    """Size (bytes) and time (s) of one GET /metrics."""
    t = time.time()
    status, body = admin.request("GET", "/metrics")
    return (len(body) if status == 200 else None), time.time() - t


def idle_window(pid, registry_pid, seconds):
    """CPU % of one core of the agent (and of the registry) over `seconds` with no change."""
    a0, r0, m0, w0 = cpu_ticks(pid), cpu_ticks(registry_pid) if registry_pid else None, machine_ticks(), time.time()
    time.sleep(seconds)
    a1, r1, m1, w1 = cpu_ticks(pid), cpu_ticks(registry_pid) if registry_pid else None, machine_ticks(), time.time()
    wall = w1 - w0
    agent = 100.0 * (a1 - a0) / CLK_TCK / wall
    reg = 100.0 * (r1 - r0) / CLK_TCK / wall if r0 is not None and r1 is not None else None
    total, idle = m1[0] - m0[0], m1[1] - m0[1]
    ncpu = os.cpu_count() or 1
    # Machine busy, in % of one core (2 CPUs fully busy = 200), minus the agent and registry.
    machine = 100.0 * ncpu * (total - idle) / total if total else 0.0
    others = machine - agent - (reg or 0.0)
    return agent, reg, max(0.0, others)


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    i = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[i]


def run_changes(kind, url, admin_addr, n_services, pairs, concurrency, timeout, poll, budget, seed):
    """`pairs` adds of an 11th endpoint to distinct random services, then the `pairs` deletes
    in a random order; each timed from the registry write's return until /clusters shows it.

    Adds and deletes are separate phases so that a delete does not follow its add at once (a
    source that batches or paces its queries would always see the two in one cycle). Returns
    (latencies ms by kind, timeouts, changes done)."""
    rng = random.Random(seed)
    picks = rng.sample(range(n_services), min(pairs, n_services))
    lock = threading.Lock()
    results = []  # (op, ms or None)
    added = []  # services whose add was seen

    def observe(admin, n, want_present, t0):
        addr = extra_addr(n)
        nxt = t0
        while True:
            eps = clusters_of(admin, n) or []
            now = time.time()
            if (addr in eps) == want_present:
                return (now - t0) * 1000.0
            if now - t0 > timeout:
                return None
            nxt += poll
            pause = nxt - time.time()
            if pause > 0:
                time.sleep(pause)

    def phase(op, todo, present):
        # Each phase may start changes for half the budget; those started finish (bounded).
        stop_at = time.time() + budget / 2.0

        def worker():
            reg = registry(kind, url)
            admin = Client(admin_addr)
            while True:
                with lock:
                    if not todo or time.time() > stop_at:
                        return
                    n = todo.pop()
                getattr(reg, op)(n)
                t0 = time.time()  # the registry's write has returned
                ms = observe(admin, n, present, t0)
                with lock:
                    results.append((op, ms))
                    if op == "add":
                        added.append(n)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(budget / 2.0 + timeout + 30)

    phase("add", list(picks), True)
    deletes = list(added)
    rng.shuffle(deletes)
    phase("delete", deletes, False)
    # Whatever the budget cut off: delete untimed, so every service is back to 10 endpoints.
    reg = registry(kind, url)
    for n in deletes:
        reg.delete(n)
    lat = {"add": [ms for op, ms in results if op == "add" and ms is not None],
           "delete": [ms for op, ms in results if op == "delete" and ms is not None]}
    timeouts = sum(1 for _, ms in results if ms is None)
    return lat, timeouts, len(results)


def perf_profile(pid, seconds, out):
    """perf record -e cpu-clock -g on the agent for `seconds`; the report head into `out`."""
    data = out + ".data"
    try:
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-g", "-p", str(pid), "-o", data,
                        "--", "sleep", str(seconds)], check=True, timeout=seconds + 60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                              "--percent-limit", "1"], capture_output=True, text=True,
                             timeout=300).stdout
        with open(out, "w") as f:
            f.write("\n".join(rep.splitlines()[:400]) + "\n")
        return True
    except (OSError, subprocess.SubprocessError) as e:
        with open(out, "w") as f:
            f.write("perf failed: %r\n" % (e,))
        return False
    finally:
        try:
            os.unlink(data)
        except OSError:
            pass


def log(text):
    sys.stderr.write("discovery-scale: %s\n" % text)
    sys.stderr.flush()


def cmd_measure(a):
    admin = Client(a.admin)
    res = {"registry": a.registry, "services": a.services, "endpoints": a.services * ENDPOINTS,
           "max_watches": a.max_watches, "label": a.label or "", "notes": []}
    log("%s%s, %d services: waiting for the sync (bound %d s)"
        % (a.registry, " " + a.label if a.label else "", a.services, a.sync_timeout))
    try:
        res["sync_s"] = wait_sync(admin, a.services, a.started, a.sync_timeout, a.pid, a.seed)
        log("  synced in %.1f s" % res["sync_s"])
    except RuntimeError as e:
        res["sync_s"] = None
        res["sync_error"] = str(e)
        res["agent_error"] = last_warning(a.agent_log)
        log("  NOT SYNCED: %s" % e)
        if res["agent_error"]:
            log("  the agent's last warning: %s" % res["agent_error"])
        if cpu_ticks(a.pid) is None:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
            return
    time.sleep(a.settle)
    res["rss_mib"] = (status_kib(a.pid, "VmRSS") or 0) / 1024.0
    res["threads"] = None
    try:
        res["threads"] = len(os.listdir("/proc/%d/task" % a.pid))
    except OSError:
        pass
    res["load_before"] = loadavg()
    log("  RSS %.1f MiB; idle CPU over %d s ..." % (res["rss_mib"], a.idle))
    agent, reg, others = idle_window(a.pid, a.registry_pid, a.idle)
    res["idle_cpu_pct"] = agent
    res["registry_idle_cpu_pct"] = reg
    res["others_cpu_pct"] = others
    res["neighbours"] = busy_neighbours()
    log("  idle CPU %.2f%% (registry %s%%, rest of the machine %.0f%% of a core)"
        % (agent, "-" if reg is None else "%.1f" % reg, others))
    if a.perf and agent >= a.perf_min_cpu:
        res["perf"] = a.perf
        log("  perf record -e cpu-clock -g -p %d for %d s -> %s" % (a.pid, a.perf_seconds, a.perf))
        perf_profile(a.pid, a.perf_seconds, a.perf)
    if res["sync_s"] is None:
        res["changes"] = res["change_timeouts"] = 0
        res["change_timeout_s"] = a.change_timeout
        res["p50_ms"] = res["p99_ms"] = res["max_ms"] = None
        res["load_after"] = loadavg()
        res["metrics_bytes"], res["metrics_s"] = metrics_probe(admin)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    pairs = a.changes // 2
    log("  %d changes (%d adds, then their deletes; %d at a time, poll %d ms, bound %d s each, "
        "changes started for at most %.0f s per phase)"
        % (2 * pairs, pairs, a.concurrency, a.poll_ms, a.change_timeout, a.change_budget / 2.0))
    c0 = cpu_ticks(a.pid)
    t0 = time.time()
    by_op, timeouts, done = run_changes(a.registry, a.url, a.admin, a.services, pairs, a.concurrency,
                                        a.change_timeout, a.poll_ms / 1000.0, a.change_budget, a.seed)
    lat = by_op["add"] + by_op["delete"]
    for op in ("add", "delete"):
        res[op + "_p50_ms"] = percentile(by_op[op], 50)
        res[op + "_max_ms"] = max(by_op[op]) if by_op[op] else None
    res["changes_s"] = time.time() - t0
    res["changes_cpu_pct"] = 100.0 * (cpu_ticks(a.pid) - c0) / CLK_TCK / res["changes_s"]
    res["changes"] = done
    res["change_timeouts"] = timeouts
    res["change_timeout_s"] = a.change_timeout
    res["concurrency"] = a.concurrency
    # A change not seen within the bound counts as +inf: a percentile that lands on one is
    # reported as "> bound" (None here).
    full = lat + [float("inf")] * timeouts
    for key, p in (("p50_ms", 50), ("p99_ms", 99), ("max_ms", 100)):
        v = percentile(full, p)
        res[key] = None if v is None or v == float("inf") else v
    res["p50_observed_ms"] = percentile(lat, 50)
    res["max_observed_ms"] = max(lat) if lat else None
    res["mean_ms"] = statistics.mean(lat) if lat else None
    res["rss_after_mib"] = (status_kib(a.pid, "VmRSS") or 0) / 1024.0
    res["hwm_mib"] = (status_kib(a.pid, "VmHWM") or 0) / 1024.0
    res["load_after"] = loadavg()
    # Last, as it allocates the whole text at once: what one Prometheus scrape costs.
    res["metrics_bytes"], res["metrics_s"] = metrics_probe(admin)
    res["rss_after_scrape_mib"] = (status_kib(a.pid, "VmRSS") or 0) / 1024.0
    if done < 2 * pairs:
        res["notes"].append("%d of %d changes done: each phase (adds, deletes) starts changes for "
                            "at most %.0f s" % (done, 2 * pairs, a.change_budget / 2.0))
    if lat and lat_first_poll(lat, a.poll_ms):
        res["notes"].append("most changes were already visible at the first poll (right after the "
                            "write returned): latencies are the poll's round trip, an upper bound")
    log("  changes: %d done, %d over %d s; p50 %s ms, p99 %s ms, max %s ms"
        % (done, timeouts, a.change_timeout, fmt_ms(res["p50_ms"]), fmt_ms(res["p99_ms"]),
           fmt_ms(res["max_ms"])))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


def lat_first_poll(lat, poll_ms):
    return percentile(lat, 50) < poll_ms / 2.0


def last_warning(path):
    """The last WARN/ERROR line of the agent's log (without the timestamp), or None."""
    if not path:
        return None
    last = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if (" WARN " in line or " ERROR " in line) and "no endpoints yet" not in line:
                    last = line.strip()
    except OSError:
        return None
    if last and "Z " in last[:40]:
        last = last.split("Z ", 1)[1].strip()
    return last[:600] if last else None


def fmt_ms(v):
    return "-" if v is None else "%.0f" % v


# === table ====================================================================================


def row_cells(r):
    over = r.get("change_timeout_s", 30) * 1000
    failed = r.get("sync_s") is None

    def lat(v):
        if failed:
            return "-"
        return (">%d" % over) if v is None else "%.0f" % v

    name = r["registry"]
    if r.get("label"):
        name += " " + r["label"]
    mb = r.get("metrics_bytes")
    return [
        name,
        "%d" % r["services"],
        "%d" % r["endpoints"],
        "FAILED" if failed else "%.1f" % r["sync_s"],
        "-" if r.get("rss_mib") is None else "%.1f" % r["rss_mib"],
        "-" if r.get("idle_cpu_pct") is None else "%.2f" % r["idle_cpu_pct"],
        "-" if r.get("registry_idle_cpu_pct") is None else "%.1f" % r["registry_idle_cpu_pct"],
        "-" if failed else "%d/%d" % (r["changes"] - r["change_timeouts"], r["changes"]),
        lat(r.get("p50_ms")),
        lat(r.get("p99_ms")),
        lat(r.get("max_ms")),
        "-" if mb is None else "%.1f" % (mb / 1048576.0),
        "-" if r.get("others_cpu_pct") is None else "%.0f%%" % r["others_cpu_pct"],
        r.get("load_before", ""),
    ]


HEADERS = ["registry", "services", "endpoints", "sync s", "RSS MiB", "idle CPU %",
           "registry CPU %", "changes seen", "p50 ms", "p99 ms", "max ms", "/metrics MiB",
           "rest of machine", "load 1/5/15"]


def cmd_table(a):
    rows = []
    for path in a.results:
        with open(path) as f:
            rows.append(json.load(f))
    cells = [row_cells(r) for r in rows]
    if a.md:
        print("| " + " | ".join(HEADERS) + " |")
        print("|:--|" + "--:|" * (len(HEADERS) - 1))
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]

        def line(c):
            return "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths)))

        print(line(HEADERS))
        for c in cells:
            print(line(c))
    print()
    targets = []
    for r in rows:
        name = r["registry"] + (" " + r["label"] if r.get("label") else "")
        if r.get("sync_s") is None:
            targets.append("- %s %d services: NOT SYNCED: %s" % (name, r["services"], r.get("sync_error")))
            if r.get("agent_error"):
                targets.append("  - the agent's last warning: %s" % r["agent_error"])
            if r.get("rss_mib") is not None:
                targets.append("  - while retrying: RSS %.1f MiB, CPU %.2f%% of a core"
                               % (r["rss_mib"], r["idle_cpu_pct"]))
            continue
        p99 = r["p99_ms"]
        targets.append("- %s %d services: RSS %.1f MiB (< 200: %s), idle CPU %.2f%% (< 1%%: %s), "
                       "change-to-proxy p99 %s (< 1 s: %s); add p50 %s ms, delete p50 %s ms" % (
                           name, r["services"], r["rss_mib"], "met" if r["rss_mib"] < 200 else "MISSED",
                           r["idle_cpu_pct"], "met" if r["idle_cpu_pct"] < 1 else "MISSED",
                           ("%.0f ms" % p99) if p99 is not None else "> %d s" % r["change_timeout_s"],
                           "met" if p99 is not None and p99 < 1000 else "MISSED",
                           fmt_ms(r.get("add_p50_ms")), fmt_ms(r.get("delete_p50_ms"))))
        if r.get("change_timeouts"):
            targets.append("  - %d of %d changes not seen within %d s"
                           % (r["change_timeouts"], r["changes"], r["change_timeout_s"]))
        for n in r.get("notes") or []:
            targets.append("  - note: %s" % n)
        if r.get("perf"):
            targets.append("  - idle profile (perf, 10 s): target/bench/%s" % os.path.basename(r["perf"]))
        if r.get("neighbours"):
            targets.append("  - busy neighbours during the idle window: %s" % " ".join(r["neighbours"][:8]))
    print("\n".join(targets))


# === main =====================================================================================


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ports")
    s.add_argument("n", type=int)
    for name in ("etcd-load", "consul-load"):
        s = sub.add_parser(name)
        s.add_argument("url")
        s.add_argument("start", type=int)
        s.add_argument("end", type=int)
    s = sub.add_parser("consul-probe")
    s.add_argument("url")
    s.add_argument("service")
    s = sub.add_parser("config")
    s.add_argument("--registry", required=True, choices=("etcd", "consul"))
    s.add_argument("--address", required=True)
    s.add_argument("--services", type=int, required=True)
    s.add_argument("--admin", required=True)
    s.add_argument("--shared", required=True)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--max-watches", type=int, default=None)
    s.add_argument("--watch-wait", default=None)
    s = sub.add_parser("measure")
    s.add_argument("--registry", required=True, choices=("etcd", "consul"))
    s.add_argument("--url", required=True)
    s.add_argument("--admin", required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--registry-pid", type=int, default=None)
    s.add_argument("--started", type=float, required=True)
    s.add_argument("--services", type=int, required=True)
    s.add_argument("--max-watches", type=int, default=None)
    s.add_argument("--label", default="")
    s.add_argument("--sync-timeout", type=int, default=300)
    s.add_argument("--settle", type=float, default=5.0)
    s.add_argument("--idle", type=int, default=30)
    s.add_argument("--changes", type=int, default=100)
    s.add_argument("--concurrency", type=int, default=1)
    s.add_argument("--change-timeout", type=int, default=30)
    s.add_argument("--change-budget", type=int, default=180)
    s.add_argument("--poll-ms", type=int, default=10)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--perf", default="")
    s.add_argument("--perf-seconds", type=int, default=10)
    s.add_argument("--perf-min-cpu", type=float, default=0.0)
    s.add_argument("--agent-log", default="")
    s.add_argument("--out", required=True)
    s = sub.add_parser("table")
    s.add_argument("--md", action="store_true", help="a markdown table")
    s.add_argument("results", nargs="+")
    a = p.parse_args()

    if a.cmd == "ports":
        socks = []
        for _ in range(a.n):
            so = socket.socket()
            so.bind(("127.0.0.1", 0))
            socks.append(so)
        for so in socks:
            print(so.getsockname()[1])
    elif a.cmd == "etcd-load":
        print(Etcd(a.url).load(a.start, a.end))
    elif a.cmd == "consul-load":
        print(Consul(a.url).load(a.start, a.end))
    elif a.cmd == "consul-probe":
        c = Client(a.url)
        t = time.time()
        for _ in range(10):
            c.json("GET", "/v1/health/service/%s?passing=1" % a.service)
        print("%.1f" % ((time.time() - t) * 100.0))
    elif a.cmd == "config":
        out = ['[agent]', 'node = "bench-caller"', 'data_dir = "%s"' % a.data_dir,
               'admin_listen = "%s"' % a.admin, '', '[registry]', 'kind = "%s"' % a.registry,
               'address = "%s"' % a.address]
        if a.max_watches is not None:
            out.append("max_watches = %d" % a.max_watches)
        if a.watch_wait is not None:
            out.append('watch_wait = "%s"' % a.watch_wait)
        out += ['', '[proxy]', 'shared_outbound_listen = "%s"' % a.shared, '', '[telemetry]',
                'access_log = "off"']
        for n in range(a.services):
            out += ['', '[[outbound]]', 'service = "%s"' % svc(n), 'sources = ["%s"]' % a.registry]
        print("\n".join(out))
    elif a.cmd == "measure":
        cmd_measure(a)
    elif a.cmd == "table":
        cmd_table(a)


if __name__ == "__main__":
    main()
