#!/usr/bin/env python3
"""timbridge's load harness driver; `bench/run.sh [--quick]` builds and runs it.

It starts the mock Kafka broker in a process of its own, then alternates
the floor (bench/src/floor.rs) and the gateway, one fsync mode at a time
(floor, gateway/interval, floor, gateway/always, floor, gateway/never),
for two rounds or more, with the same load from bench/src/loadgen.rs, on
127.0.0.1 only. Each gateway figure is divided by the one of the floor run
just before it. A gateway run whose accepted callbacks are not all in
Kafka afterwards (topic high watermarks) is reported as INVALID and makes
the harness exit non-zero. Then the drain test: 100k events spooled while
the broker is down, timed until the spool is empty once it is back.

Python standard library only. Every child gets PR_SET_PDEATHSIG, so none
outlives the driver, and all are killed on exit, error or signal.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime
import json
import os
import platform
import re
import resource
import urllib.error
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "target" / "release"
GATEWAY = RELEASE / "timbridge"
FLOOR = RELEASE / "floor"
LOADGEN = RELEASE / "loadgen"
BROKER = RELEASE / "mock_broker"

GROUP_TOPIC = "tim.group.read_receipts"
C2C_TOPIC = "tim.c2c.read_receipts"
TOPICS = (GROUP_TOPIC, C2C_TOPIC)
PARTITIONS = 3
SIGNED_APP, TOKEN, UNSIGNED_APP = 1400000001, "bench-token", 1400000002
MODES = ("interval", "always", "never")

# Seconds. `full` is about 9 minutes on the 2-core machine, `quick` about 3.
PROFILES = {
    "full": dict(
        rounds=2, closed_warmup=1.5, closed=6, open_warmup=1, open=8,
        search_steps=6, search_warmup=0.5, search=2.0, drain_events=100_000,
    ),
    "quick": dict(
        rounds=2, closed_warmup=0.5, closed=2, open_warmup=0.5, open=3,
        search_steps=3, search_warmup=0.3, search=1.0, drain_events=100_000,
    ),
}
OPEN_RATE = 2000
CONNECTIONS = 32
# The closed loop gets two load-generator threads (it drives the floor
# harder than one); the open loop one (fewer cross-thread wake-ups, which
# would be counted against the server).
CLOSED_THREADS = 2
OPEN_THREADS = 1
P99_LIMIT_MS = 1.0

# The wrk load mode (see bench/README.md): the measurement issue #11 calls
# "the independent run", built into the harness so both views come from the
# same build, broker and machine state.
WRK_SCRIPT = ROOT / "bench" / "wrk" / "callbacks.lua"
WRK_THREADS = 1
WRK_SECONDS = 6
WRK_ROUNDS = 3
WRK_MODES = ("interval", "always")
# Items per wrk request (the script sends group receipts with 2 items).
WRK_ITEMS = 2

# What differs from the gateway as built, for trying a change: another
# binary, librdkafka properties, spool settings, environment (LD_PRELOAD).
VARIANT: dict = {"binary": GATEWAY, "kafka_properties": [], "spool_options": [], "env": []}

CHILDREN: list[subprocess.Popen] = []
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], preexec_fn=_die_with_parent, **kw)
    CHILDREN.append(p)
    return p


def kill_all() -> None:
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def on_signal(signum, _frame):
    kill_all()
    sys.exit(128 + signum)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


class Broker:
    def __init__(self) -> None:
        args = [BROKER]
        for t in TOPICS:
            args += ["--topic", f"{t}:{PARTITIONS}"]
        self.proc = spawn(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("BOOTSTRAP="):
            raise RuntimeError(f"mock_broker said {line!r}")
        self.bootstrap = line.split("=", 1)[1]

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"mock_broker {cmd!r}: {answer!r}")

    def watermarks(self) -> dict[str, int]:
        out = subprocess.run(
            [LOADGEN, "watermarks", "--brokers", self.bootstrap, *TOPICS],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return json.loads(out.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of every series of `name` in a Prometheus exposition."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total


class Server:
    """The floor or the gateway, under test."""

    def __init__(self, kind: str, workdir: Path, broker: Broker, fsync: str | None,
                 wrapper: list[str] | None = None, binary: Path | None = None) -> None:
        self.kind, self.fsync = kind, fsync
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
        self.log = open(self.dir / "stderr.log", "w")
        if kind == "floor":
            self.proc = spawn([FLOOR, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                              stderr=self.log, text=True)
            line = self.proc.stdout.readline().strip()
            if not line.startswith("LISTEN="):
                raise RuntimeError(f"floor said {line!r}")
            self.addr = line.split("=", 1)[1]
        else:
            self.addr = f"127.0.0.1:{free_port()}"
            binary = binary or VARIANT["binary"]
            kafka_props = "".join(f'"{k}" = "{v}"\n' for k, v in VARIANT["kafka_properties"])
            spool_extra = "".join(f"{k} = {v}\n" for k, v in VARIANT["spool_options"])
            config = self.dir / "config.toml"
            config.write_text(
                f"""[server]
listen = "{self.addr}"
shutdown_timeout = "5s"

[[apps]]
sdk_app_id = {SIGNED_APP}
token = "{TOKEN}"

[[apps]]
sdk_app_id = {UNSIGNED_APP}

[kafka]
brokers = "{broker.bootstrap}"
group_topic = "{GROUP_TOPIC}"
c2c_topic = "{C2C_TOPIC}"

[kafka.properties]
{kafka_props}
[spool]
dir = "{self.dir / 'spool'}"
fsync = "{fsync}"
{spool_extra}
[log]
level = "warn"
"""
            )
            env = dict(os.environ, **dict(VARIANT["env"]))
            self.proc = spawn([*(wrapper or []), binary, "serve", "--config", config],
                              stdout=self.log, stderr=self.log, env=env)
            deadline = time.monotonic() + (120 if wrapper else 30)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"timbridge exited: {(self.dir / 'stderr.log').read_text()}")
                try:
                    if http_get(f"http://{self.addr}/healthz", 1)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("timbridge did not answer /healthz in time")
                time.sleep(0.05)
        self.url = f"http://{self.addr}/callback"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        return http_get(f"http://{self.addr}/metrics")[1]

    def vm_hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def loadgen(mode: str, server: Server, broker: Broker, run_id: str, **opts) -> dict:
    args = [LOADGEN, mode, "--url", server.url, "--run-id", run_id,
            "--signed-app", SIGNED_APP, "--token", TOKEN, "--unsigned-app", UNSIGNED_APP,
            "--watch", f"server={server.pid}", "--watch", f"broker={broker.proc.pid}"]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", v]
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                         timeout=600, preexec_fn=_die_with_parent)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------
# One server run: closed loop, open loop at 2,000/s, the p99 < 1 ms search
# ---------------------------------------------------------------------------


def others_pct(r: dict) -> float | None:
    """CPU that processes outside the test used during the window, as a
    percentage of the whole machine (plus time stolen by the hypervisor)."""
    m = r["processes"]["machine"]
    if m["others_s"] is None:
        return None
    return 100 * (m["others_s"] + (m["steal_s"] or 0)) / r["window"]["seconds"] / (os.cpu_count() or 1)


def sync_window(before: dict | None, after: dict | None) -> dict | None:
    """The spool's fdatasyncs between two `Run.sync_buckets`: how many, how
    many took over 10 ms, and the bound the slowest was under (a disk that
    stalls shows here, where the callbacks' p99 only shows that something
    did)."""
    if not before or not after:
        return None
    d = {le: after[le] - before.get(le, 0) for le in after}
    n = d.get("+Inf", 0)
    bounds = sorted((float(le), v) for le, v in d.items() if le != "+Inf")
    slowest = next((le for le, v in bounds if v == n), None) if n else None
    over_10ms = n - next((v for le, v in bounds if le >= 0.01), n)
    return {"count": n, "over_10ms": over_10ms, "slowest_le_ms": None if slowest is None else slowest * 1000}


class Run:
    seq = 0

    def __init__(self, server: Server, broker: Broker, prof: dict) -> None:
        self.server, self.broker, self.prof = server, broker, prof
        self.loads: list[dict] = []

    def load(self, mode: str, **opts) -> dict:
        Run.seq += 1
        r = loadgen(mode, self.server, self.broker, f"r{os.getpid()}n{Run.seq}", **opts)
        self.loads.append(r)
        return r

    def sync_buckets(self) -> dict[str, float] | None:
        """The gateway's spool sync histogram (segment and directory syncs
        together): cumulative count by bucket bound (None for the floor, or
        a build without it)."""
        if self.server.kind != "gateway":
            return None
        try:
            text = self.server.metrics()
        except OSError:
            return None
        b: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("timbridge_spool_sync_duration_seconds_bucket{"):
                le = re.search(r'le="([^"]+)"', line).group(1)
                b[le] = b.get(le, 0) + float(line.rsplit(" ", 1)[1])
        return b or None

    def open_at(self, rate: float, warmup: float, seconds: float) -> dict:
        return self.load("open", rate=rate, warmup=f"{warmup}s", duration=f"{seconds}s",
                         connections=CONNECTIONS, threads=OPEN_THREADS)

    def execute(self) -> dict:
        p = self.prof
        # Latency first, on a server that has not just absorbed a closed-loop
        # burst (whose disk writeback would land in the open-loop window),
        # then the search, then the closed loop.
        syncs_before = self.sync_buckets()
        at2k = self.open_at(OPEN_RATE, p["open_warmup"], p["open"])
        syncs_2k = sync_window(syncs_before, self.sync_buckets())
        max_rate, tried = self.search(at2k)
        closed = self.load("closed", connections=CONNECTIONS, threads=CLOSED_THREADS,
                           warmup=f"{p['closed_warmup']}s", duration=f"{p['closed']}s")
        cw, ow = closed["window"], at2k["window"]
        res = {
            "closed_rps": cw["requests_per_s"],
            "closed_eps": cw["events_per_s"],
            "p50": at2k["latency_ms"]["p50"],
            "p99": at2k["latency_ms"]["p99"],
            "p999": at2k["latency_ms"]["p999"],
            "max_rate_p99_1ms": max_rate,
            "search": tried,
            "rss_mib": self.server.vm_hwm_kib() / 1024,
            "cpu_per_1k_closed": 1000 * closed["processes"]["server"]["cpu_s"] / max(cw["requests"], 1),
            "cpu_per_1k_2k": 1000 * at2k["processes"]["server"]["cpu_s"] / max(ow["requests"], 1),
            "broker_cpu_per_1k_closed": 1000 * closed["processes"]["broker"]["cpu_s"] / max(cw["requests"], 1),
            "loadgen_cpu_per_1k_closed": 1000 * closed["processes"]["loadgen"]["cpu_s"] / max(cw["requests"], 1),
            "p99_service": at2k["service_ms"]["p99"],
            "syncs_2k": syncs_2k,
            "others_pct_closed": others_pct(closed),
            "others_pct_2k": others_pct(at2k),
            "failures": sum(r["failures"] for r in self.loads),
            "accepted": sum(r["accepted"] for r in self.loads),
        }
        return res

    def search(self, at2k: dict) -> tuple[float, list]:
        """The highest open-loop rate with p99 < 1 ms and no failures: up by
        doubling from 2,000/s while it passes, then bisection. A rate that
        fails gets a second try (the machine is shared: one burst of someone
        else's work should not decide it); a pass is final."""
        p = self.prof
        tried = [(OPEN_RATE, at2k["latency_ms"]["p99"])]

        def passes(r: dict) -> bool:
            return r["latency_ms"]["p99"] < P99_LIMIT_MS and r["failures"] == 0

        def attempt(rate: float) -> bool:
            for _ in range(2):
                r = self.open_at(rate, p["search_warmup"], p["search"])
                tried.append((rate, r["latency_ms"]["p99"]))
                if passes(r):
                    return True
            return False

        lo: float = 0.0
        hi: float | None = OPEN_RATE
        if passes(at2k):
            lo, hi = OPEN_RATE, None
        for _ in range(p["search_steps"]):
            if hi is None:
                # Doubling: rates past what the closed loop reaches fail by
                # themselves (requests queue up), so no cap is needed.
                rate = lo * 2
            else:
                rate = round((lo + hi) / 2 / 100) * 100
            if rate <= lo or (hi is not None and rate >= hi):
                break
            if attempt(rate):
                lo = rate
            else:
                hi = rate
        return lo, tried


def verify_kafka(server: Server, broker: Broker, before: dict, loads: list[dict],
                 in_flight_at_end: bool = False) -> dict:
    """Every record of every accepted callback must be in Kafka.

    `in_flight_at_end`: the load stopped with requests in flight (wrk closes
    its connections when its time is up), so the gateway may have spooled
    more than the `200`s the client saw; then everything it spooled must be
    in Kafka, and at least the records of those `200`s."""
    expected = {
        GROUP_TOPIC: sum(r["expected_records"]["group"] for r in loads),
        C2C_TOPIC: sum(r["expected_records"]["c2c"] for r in loads),
    }
    deadline = time.monotonic() + 120
    while True:
        text = server.metrics()
        pending = metric(text, "timbridge_spool_events")
        if pending == 0:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    spooled = metric(text, "timbridge_events_total")
    dups = metric(text, "timbridge_duplicate_events_total")
    after = broker.watermarks()
    found = {t: after[t] - before[t] for t in TOPICS}
    lost = sum(max(0, expected[t] - found[t]) for t in TOPICS)
    return {
        "expected": sum(expected.values()),
        "found": sum(found.values()),
        "spooled": spooled,
        "duplicates_dropped": dups,
        "pending_left": pending,
        "valid": lost == 0 and pending == 0 and dups == 0 and (
            spooled >= sum(expected.values()) and sum(found.values()) >= spooled
            if in_flight_at_end else spooled == sum(expected.values())),
    }


# ---------------------------------------------------------------------------
# The wrk load mode
# ---------------------------------------------------------------------------


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """Busy plus stolen CPU seconds of the whole machine since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is in user)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def wrk_load(server: Server, broker: Broker, run_id: str, seconds: int) -> dict:
    """One wrk run against `server`: its count of 200s, the records they
    must have produced, and the CPU the server, the broker, wrk and everyone
    else used meanwhile."""
    args = [wrk_binary(), f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s",
            "--timeout", "5s", "-s", WRK_SCRIPT, server.url, "--", run_id, UNSIGNED_APP]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server0, broker0, busy0 = proc_cpu_s(server.pid), proc_cpu_s(broker.proc.pid), machine_busy_s()
    t0 = time.monotonic()
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                         timeout=seconds + 60, preexec_fn=_die_with_parent)
    wall = time.monotonic() - t0
    server_cpu = proc_cpu_s(server.pid) - server0
    broker_cpu = proc_cpu_s(broker.proc.pid) - broker0
    busy = machine_busy_s() - busy0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {out.returncode}): {out.stdout}\n{out.stderr}")
    r = json.loads(line.split(" ", 1)[1])
    e = r["errors"]
    # wrk counts a non-2xx/3xx answer in errors.status; our script counts
    # every answer that is not 200 (not_ok). Socket errors and timeouts are
    # requests that got no answer: all of these fail the run.
    r["failures"] = r["not_ok"] + e["connect"] + e["read"] + e["write"] + e["timeout"]
    r["seconds"] = r["duration_us"] / 1e6
    r["requests_per_s"] = r["ok"] / r["seconds"]
    r["expected_records"] = {"group": WRK_ITEMS * r["ok"], "c2c": 0}
    r["cpu_s"] = {"server": server_cpu, "broker": broker_cpu, "wrk": wrk_cpu}
    r["others_pct"] = 100 * max(0.0, busy - server_cpu - broker_cpu - wrk_cpu) / wall / (os.cpu_count() or 1)
    return r


def wrk_session(broker: Broker, workdir: Path, modes: list[str], rounds: int,
                seconds: int) -> tuple[list[dict], bool]:
    """Floor, gateway/mode, for each mode, `rounds` times; each gateway run
    compared with the floor run just before it."""
    runs: list[dict] = []
    invalid = False
    for rnd in range(1, rounds + 1):
        for mode in modes:
            floor_run = None
            for kind in ("floor", "gateway"):
                server = Server(kind, workdir, broker, None if kind == "floor" else mode)
                try:
                    before = broker.watermarks() if kind == "gateway" else None
                    Run.seq += 1
                    r = wrk_load(server, broker, f"w{os.getpid()}n{Run.seq}", seconds)
                    res = {
                        "server": kind, "fsync": server.fsync, "round": rnd,
                        "rps": r["requests_per_s"], "ok": r["ok"], "failures": r["failures"],
                        "rss_mib": server.vm_hwm_kib() / 1024,
                        "cpu_per_1k": 1000 * r["cpu_s"]["server"] / max(r["ok"], 1),
                        "broker_cpu_per_1k": 1000 * r["cpu_s"]["broker"] / max(r["ok"], 1),
                        "wrk_cpu_per_1k": 1000 * r["cpu_s"]["wrk"] / max(r["ok"], 1),
                        "others_pct": r["others_pct"],
                        "latency_ms": r["latency_ms"], "wrk": r,
                    }
                    if kind == "gateway":
                        res["kafka"] = verify_kafka(server, broker, before, [r], in_flight_at_end=True)
                        res["floor"] = floor_run
                        res["ratio"] = ratio(res["rps"], floor_run["rps"])
                        if not res["kafka"]["valid"] or res["failures"]:
                            invalid = True
                            log(f"INVALID wrk gateway run: {res['kafka']}, failures {res['failures']}")
                    else:
                        floor_run = res
                    runs.append(res)
                    log(f"wrk round {rnd} {kind:7} {mode:8}: {res['rps']:8,.0f} req/s, "
                        f"RSS {res['rss_mib']:.1f} MiB, CPU/1k {res['cpu_per_1k']:.3f} s, "
                        f"others {res['others_pct']:.0f}%")
                finally:
                    server.stop()
    return runs, invalid


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def wrk_table(runs: list[dict], modes: list[str]) -> str:
    floors = [r for r in runs if r["server"] == "floor"]
    gw = lambda m: [r for r in runs if r["server"] == "gateway" and r["fsync"] == m]  # noqa: E731
    lines = [
        "| figure (median of the runs) | floor | " + " | ".join(f"fsync={m} | ratio" for m in modes) + " |",
        "|---|---:|" + "---:|---:|" * len(modes),
    ]
    rows = [
        ("requests/s (wrk, 1 thread, 32 conns)", "rps", "{:,.0f}"),
        ("events/s (2 per request)", None, "{:,.0f}"),
        ("peak RSS (VmHWM), MiB", "rss_mib", "{:.1f}"),
        ("CPU s per 1k requests", "cpu_per_1k", "{:.3f}"),
    ]
    for label, key, f in rows:
        get = (lambda r: WRK_ITEMS * r["rps"]) if key is None else (lambda r, k=key: r[k])
        cells = [fmt(f, median(get(r) for r in floors))]
        for m in modes:
            cells.append(fmt(f, median(get(r) for r in gw(m))))
            cells.append(fmt("{:.2f}×", median(ratio(get(r), get(r["floor"])) for r in gw(m))))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = ["—"]
    for m in modes:
        cells.append(fmt("{:.1f}", max((r["rss_mib"] for r in gw(m)), default=None)))
        cells.append("")
    lines.append("| peak RSS, worst run, MiB | " + " | ".join(cells) + " |")
    cells = ["—"]
    for m in modes:
        exp = sum(r["kafka"]["expected"] for r in gw(m))
        found = sum(r["kafka"]["found"] for r in gw(m))
        ok = all(r["kafka"]["valid"] for r in gw(m))
        cells += [f"{found:,} / {exp:,}", "ok" if ok else "**LOST**"]
    lines.append("| records in Kafka / from the 200s (all runs) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wrk_targets(runs: list[dict], modes: list[str]) -> str:
    want = {"interval": 0.6, "always": 0.5}
    rows = []
    for m in modes:
        gw = [r for r in runs if r["server"] == "gateway" and r["fsync"] == m]
        thr = median(r["ratio"] for r in gw)
        if m in want and thr is not None:
            rows.append((f"wrk throughput, fsync={m} ≥ {want[m]} × floor", f"{thr:.2f}×", thr >= want[m]))
    rss = max((r["rss_mib"] for r in runs if r["server"] == "gateway"), default=None)
    if rss is not None:
        rows.append(("peak RSS ≤ 30 MiB (worst wrk gateway run)", f"{rss:.1f} MiB", rss <= 30.0))
    lines = ["| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in rows]
    return "\n".join(lines)


def wrk_runs_table(runs: list[dict]) -> str:
    lines = [
        "| # | server | fsync | req/s | 200s | ratio | RSS MiB | CPU s/1k | wrk p99 ms "
        "| others' CPU % | failures | records in Kafka / from 200s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        k = r.get("kafka")
        records = "—" if k is None else f"{k['found']:,} / {k['expected']:,}"
        lines.append(
            f"| {i} | {r['server']} | {r['fsync'] or '—'} | {r['rps']:,.0f} | {r['ok']:,} "
            f"| {fmt('{:.2f}×', r.get('ratio'))} | {r['rss_mib']:.1f} | {r['cpu_per_1k']:.3f} "
            f"| {r['latency_ms']['p99']:.3f} | {r['others_pct']:.0f} | {r['failures']} "
            f"| {records} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The drain test
# ---------------------------------------------------------------------------


def drain_test(broker: Broker, workdir: Path, events: int) -> dict:
    requests = events // 2
    before = broker.watermarks()
    broker.command("down 1")
    server = Server("gateway", workdir, broker, "interval")
    try:
        r = loadgen("closed", server, broker, f"d{os.getpid()}", requests=requests, mix="group",
                    items=2, warmup="0s", duration="300s", connections=CONNECTIONS,
                    threads=CLOSED_THREADS)
        spooled = metric(server.metrics(), "timbridge_spool_events")
        t_up = time.monotonic()
        broker.command("up 1")
        t_first = None
        deadline = t_up + 180
        while True:
            pending = metric(server.metrics(), "timbridge_spool_events")
            now = time.monotonic()
            if t_first is None and pending < spooled:
                t_first = now
            if pending == 0 or now > deadline:
                break
            time.sleep(0.02)
        t_zero = time.monotonic()
        check = verify_kafka(server, broker, before, [r])
        return {
            "events": spooled,
            "accepted_requests": r["accepted"],
            "failures": r["failures"],
            "fill_rps": r["window"]["requests_per_s"],
            "seconds_from_up": t_zero - t_up,
            "seconds_from_first_delivery": t_zero - (t_first or t_up),
            "events_per_s": spooled / (t_zero - t_up),
            "events_per_s_after_reconnect": spooled / max(t_zero - (t_first or t_up), 1e-9),
            "rss_mib": server.vm_hwm_kib() / 1024,
            "kafka": check,
            "valid": pending == 0 and check["valid"] and spooled == events and r["failures"] == 0,
        }
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

FIGURES = [
    # key, label, format, higher is better
    ("closed_rps", f"closed loop, requests/s ({CONNECTIONS} conns)", "{:,.0f}"),
    ("closed_eps", "closed loop, events/s", "{:,.0f}"),
    ("p50", f"open loop {OPEN_RATE:,}/s: p50 ms", "{:.3f}"),
    ("p99", f"open loop {OPEN_RATE:,}/s: p99 ms", "{:.3f}"),
    ("p999", f"open loop {OPEN_RATE:,}/s: p99.9 ms", "{:.3f}"),
    ("max_rate_p99_1ms", "highest rate with p99 < 1 ms, req/s", "{:,.0f}"),
    ("rss_mib", "peak RSS (VmHWM), MiB", "{:.1f}"),
    ("cpu_per_1k_closed", "CPU s per 1k requests, closed loop", "{:.3f}"),
    ("cpu_per_1k_2k", f"CPU s per 1k requests, at {OPEN_RATE:,}/s", "{:.3f}"),
]


def fmt(f: str, v: float | None) -> str:
    return "n/a" if v is None else f.format(v)


def fmt_rate(runs: list[dict]) -> str:
    """The search's answer; 0 means that even the lowest rate tried failed."""
    v = mean(r["max_rate_p99_1ms"] for r in runs)
    if v == 0:
        lowest = min(rate for r in runs for rate, _ in r["search"])
        return f"none ≥ {lowest:,.0f}"
    return fmt("{:,.0f}", v)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def ratio(g, f):
    return g / f if f else None


def table(runs: list[dict]) -> str:
    floors = [r for r in runs if r["server"] == "floor"]
    lines = [
        "| figure | floor | " + " | ".join(f"fsync={m} | ratio" for m in MODES) + " |",
        "|---|---:|" + "---:|---:|" * len(MODES),
    ]
    modes = [m for m in MODES if any(r["fsync"] == m for r in runs)]
    lines[0] = "| figure | floor | " + " | ".join(f"fsync={m} | ratio" for m in modes) + " |"
    lines[1] = "|---|---:|" + "---:|---:|" * len(modes)
    for key, label, f in FIGURES:
        cells = [fmt(f, mean(r[key] for r in floors))]
        for m in modes:
            gw = [r for r in runs if r["server"] == "gateway" and r["fsync"] == m]
            if key == "max_rate_p99_1ms":
                cells.append(fmt_rate(gw))
            else:
                cells.append(fmt(f, mean(r[key] for r in gw)))
            cells.append(fmt("{:.2f}×", mean(ratio(r[key], r["floor"][key]) for r in gw)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = ["—"]
    for m in modes:
        gw = [r for r in runs if r["server"] == "gateway" and r["fsync"] == m]
        exp = sum(r["kafka"]["expected"] for r in gw)
        found = sum(r["kafka"]["found"] for r in gw)
        ok = all(r["kafka"]["valid"] for r in gw)
        cells += [f"{found:,} / {exp:,}", "ok" if ok else "**LOST**"]
    lines.append("| records in Kafka / expected (all runs) | " + " | ".join(cells) + " |")
    cells = ["—"]
    for m in modes:
        gw = [r for r in runs if r["server"] == "gateway" and r["fsync"] == m]
        cells += [fmt("{:.3f}", mean(r["broker_cpu_per_1k_closed"] for r in gw)), ""]
    lines.append("| mock broker CPU s per 1k requests, closed loop | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(runs: list[dict]) -> str:
    lines = [
        "| # | server | fsync | req/s | p99 ms @2k (service) | max rate p99<1ms | RSS MiB "
        "| CPU s/1k (closed) | others' CPU % (closed / 2k) | syncs @2k: > 10 ms / all (slowest ≤ ms) "
        "| failures |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        sw = r.get("syncs_2k")
        syncs = "—" if not sw else "0 / 0" if not sw["count"] else (
            f"{sw['over_10ms']:,.0f} / {sw['count']:,.0f} ("
            + ("> 30000" if sw["slowest_le_ms"] is None else f"{sw['slowest_le_ms']:g}") + ")")
        lines.append(
            f"| {i} | {r['server']} | {r['fsync'] or '—'} | {r['closed_rps']:,.0f} "
            f"| {r['p99']:.3f} ({r['p99_service']:.3f}) "
            f"| {r['max_rate_p99_1ms']:,.0f} | {r['rss_mib']:.1f} | {r['cpu_per_1k_closed']:.3f} "
            f"| {fmt('{:.0f}', r['others_pct_closed'])} / {fmt('{:.0f}', r['others_pct_2k'])} "
            f"| {syncs} | {r['failures']} |"
        )
    return "\n".join(lines)


def targets(runs: list[dict], drain: dict | None, modes: list[str]) -> str:
    gw = lambda m: [r for r in runs if r["server"] == "gateway" and r["fsync"] == m]  # noqa: E731
    rows = []
    if "interval" in modes:
        thr = mean(ratio(r["closed_rps"], r["floor"]["closed_rps"]) for r in gw("interval"))
        p99_i = mean(r["p99"] for r in gw("interval"))
        rows += [
            ("throughput, fsync=interval ≥ 0.6 × floor", f"{thr:.2f}×", thr >= 0.6),
            ("p99 at 2,000/s, interval ≤ 1 ms", f"{p99_i:.3f} ms", p99_i <= 1.0),
        ]
    if "always" in modes:
        p99_a = mean(r["p99"] for r in gw("always"))
        rows.append(("p99 at 2,000/s, always ≤ 10 ms", f"{p99_a:.3f} ms", p99_a <= 10.0))
    rss = max(r["rss_mib"] for r in runs if r["server"] == "gateway")
    rows.append(("peak RSS ≤ 30 MiB (worst gateway run, drain test included)",
                 f"{max(rss, drain['rss_mib'] if drain else 0):.1f} MiB",
                 max(rss, drain["rss_mib"] if drain else 0) <= 30.0))
    if drain:
        rows.append(("drain ≥ 50,000 events/s (from `up 1`)", f"{drain['events_per_s']:,.0f} events/s",
                     drain["events_per_s"] >= 50_000))
    lines = ["| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in rows]
    return "\n".join(lines)


def jitter() -> dict:
    """The machine's wake-up lateness for 500 µs sleeps, nothing of ours running."""
    out = subprocess.run([LOADGEN, "jitter", "--duration", "2s"], check=True,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)["late_ms"]


def jitter_text(j: dict) -> str:
    return f"p99 {j['p99']:.2f} ms, p99.9 {j['p999']:.2f} ms, max {j['max']:.2f} ms"


def source_state() -> str:
    """Which timbridge was measured: the commit, and any uncommitted change
    under src/ (the tree may move while the harness runs; it builds first)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.rstrip() if r.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "src", "Cargo.toml",
                                  "Cargo.lock").splitlines()]
    return head + (f" + uncommitted {', '.join(dirty)}" if dirty else "")


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return (f"{os.cpu_count()} CPUs ({model}), {int(mem) / 2**20:.0f} GiB, "
            f"Linux {platform.release()}")


def loadgen_report(runs: list[dict], drain: dict | None, modes: list[str]) -> list[str]:
    """The loadgen mode's tables, as markdown lines."""
    return [
        table(runs),
        "",
        "" if drain is None else (f"Drain: {drain['events']:,.0f} events spooled while the broker was down "
         f"(filled at {drain['fill_rps']:,.0f} req/s), empty {drain['seconds_from_up']:.2f} s after "
         f"`up 1`: **{drain['events_per_s']:,.0f} events/s** "
         f"({drain['events_per_s_after_reconnect']:,.0f} events/s from the first delivery; "
         f"{drain['kafka']['found']:,} records in Kafka, {drain['kafka']['expected']:,} expected; "
         f"peak RSS {drain['rss_mib']:.1f} MiB)."),
        "",
        targets(runs, drain, modes),
        "",
        "Every run:",
        "",
        runs_table(runs),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (about 3 minutes)")
    ap.add_argument("--rounds", type=int, help="floor/gateway rounds per fsync mode (default 2)")
    ap.add_argument("--modes", help="fsync modes, comma-separated (default: "
                    f"{','.join(MODES)} for loadgen, {','.join(WRK_MODES)} for wrk)")
    ap.add_argument("--load", choices=("loadgen", "wrk", "both"), default="loadgen",
                    help="which load: our loadgen (default), Debian's wrk, or both side by side")
    ap.add_argument("--wrk-rounds", type=int, default=WRK_ROUNDS,
                    help=f"floor/gateway rounds per fsync mode with wrk (default {WRK_ROUNDS})")
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "bench",
                    help="where the JSON results and the markdown go")
    ap.add_argument("--no-drain", action="store_true", help="skip the drain test")
    ap.add_argument("--gateway-bin", type=Path, help="another timbridge binary to measure")
    ap.add_argument("--kafka-property", action="append", default=[], metavar="KEY=VALUE",
                    help="add to the gateway's [kafka.properties] (repeatable)")
    ap.add_argument("--spool-option", action="append", default=[], metavar="KEY=TOML",
                    help='add to the gateway\'s [spool], e.g. dedup_window=\'"0s"\' (repeatable)')
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment for the gateway, e.g. LD_PRELOAD=... (repeatable)")
    args = ap.parse_args()

    def pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
        out = []
        for item in items:
            if "=" not in item:
                ap.error(f"{flag} wants KEY=VALUE, got {item!r}")
            out.append(tuple(item.split("=", 1)))
        return out

    if args.gateway_bin:
        VARIANT["binary"] = args.gateway_bin.resolve()
    VARIANT["kafka_properties"] = pairs(args.kafka_property, "--kafka-property")
    VARIANT["spool_options"] = pairs(args.spool_option, "--spool-option")
    VARIANT["env"] = pairs(args.gateway_env, "--gateway-env")
    variant_text = ", ".join(
        [f"binary {args.gateway_bin}"] * bool(args.gateway_bin)
        + [f"kafka.properties {k}={v}" for k, v in VARIANT["kafka_properties"]]
        + [f"spool.{k}={v}" for k, v in VARIANT["spool_options"]]
        + [f"env {k}={v}" for k, v in VARIANT["env"]]
    )
    prof = dict(PROFILES["quick" if args.quick else "full"])
    if args.rounds:
        prof["rounds"] = max(2, args.rounds)
    modes = [m for m in (args.modes or ",".join(MODES)).split(",") if m]
    wrk_modes = [m for m in (args.modes or ",".join(WRK_MODES)).split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown fsync mode {m!r}")
    use_loadgen, use_wrk = args.load in ("loadgen", "both"), args.load in ("wrk", "both")
    if use_wrk and wrk_binary() is None:
        ap.error("--load wrk needs wrk 4 (with Lua scripting) on PATH: "
                 "on Debian or Ubuntu, `apt-get install -y wrk`; elsewhere build it from "
                 "its sources (github.com/wg/wrk)")
    if args.wrk_rounds < 1:
        ap.error("--wrk-rounds wants 1 or more")
    for b in (VARIANT["binary"], FLOOR, LOADGEN, BROKER):
        if not b.exists():
            ap.error(f"{b} is missing: cargo build --release --workspace --bins")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(kill_all)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    atexit.register(shutil.rmtree, workdir, True)

    started = time.monotonic()
    source = source_state()
    jitter_before = jitter()
    broker = Broker()
    log(f"mock broker at {broker.bootstrap} (pid {broker.proc.pid})")
    runs: list[dict] = []
    invalid = False
    for rnd in range(1, prof["rounds"] + 1 if use_loadgen else 1):
        for mode in modes:
            floor_run = None
            for kind in ("floor", "gateway"):
                server = Server(kind, workdir, broker, None if kind == "floor" else mode)
                try:
                    before = broker.watermarks() if kind == "gateway" else None
                    run = Run(server, broker, prof)
                    res = run.execute()
                    res.update(server=kind, fsync=server.fsync, round=rnd)
                    if kind == "gateway":
                        res["kafka"] = verify_kafka(server, broker, before, run.loads)
                        res["floor"] = floor_run
                        if not res["kafka"]["valid"] or res["failures"]:
                            invalid = True
                            log(f"INVALID gateway run: {res['kafka']}, failures {res['failures']}")
                    else:
                        floor_run = res
                    runs.append(res)
                    log(f"round {rnd} {kind:7} {mode:8}: {res['closed_rps']:8,.0f} req/s, "
                        f"p99@2k {res['p99']:.3f} ms, max rate {res['max_rate_p99_1ms']:,.0f}, "
                        f"RSS {res['rss_mib']:.1f} MiB, CPU/1k {res['cpu_per_1k_closed']:.3f} s, "
                        f"others {fmt('{:.0f}', res['others_pct_closed'])}%")
                finally:
                    server.stop()

    wrk_runs: list[dict] = []
    if use_wrk:
        wrk_runs, wrk_invalid = wrk_session(broker, workdir, wrk_modes, args.wrk_rounds, WRK_SECONDS)
        invalid = invalid or wrk_invalid

    drain = None
    if use_loadgen and not args.no_drain:
        log(f"drain test: {prof['drain_events']:,} events spooled with the broker down")
        drain = drain_test(broker, workdir, prof["drain_events"])
        if not drain["valid"]:
            invalid = True
            log(f"INVALID drain test: {drain}")
    broker.command("quit")
    jitter_after = jitter()
    elapsed = time.monotonic() - started

    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = "`" + " ".join(["bench/run.sh", *sys.argv[1:]]) + "`"
    md = [
        f"Results of {head}, {when}, timbridge {source}, {machine()}; "
        + (f"{prof['rounds']} round(s) with loadgen, " if use_loadgen else "")
        + (f"{args.wrk_rounds} round(s) with wrk, " if use_wrk else "")
        + f"{elapsed / 60:.1f} min."
        + (f" Gateway variant: {variant_text}." if variant_text else ""),
        "",
        ("Machine noise (how late a thread wakes from a 500 µs sleep, nothing of ours running): "
         f"before {jitter_text(jitter_before)}; after {jitter_text(jitter_after)}."),
        "",
    ]
    if use_loadgen:
        md += loadgen_report(runs, drain, modes)
    if use_wrk:
        md += [""] * use_loadgen + [
            f"wrk ({WRK_THREADS} thread, {CONNECTIONS} connections, {WRK_SECONDS} s per run, "
            "bench/wrk/callbacks.lua: distinct unsigned group receipts, 2 items each):",
            "",
            wrk_table(wrk_runs, wrk_modes),
            "",
            wrk_targets(wrk_runs, wrk_modes),
            "",
            "Every wrk run:",
            "",
            wrk_runs_table(wrk_runs),
        ]
    if invalid:
        md += ["", "**INVALID: records were lost or requests failed; see the JSON.**"]
    text = "\n".join(md)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"results-{stamp}.json").write_text(
        json.dumps({"profile": prof, "runs": runs, "wrk_runs": wrk_runs, "drain": drain,
                    "machine": machine(),
                    "jitter": {"before": jitter_before, "after": jitter_after},
                    "source": source,
                    "when": when}, indent=1, default=str))
    (args.out / f"results-{stamp}.md").write_text(text + "\n")
    print(text)
    log(f"written to {args.out}/results-{stamp}.{{json,md}}")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
