#!/usr/bin/env python3
"""Where a callback's time goes: the gateway under a profiler for a fixed
number of requests (fsync = interval, the mixed load of the harness).

    bench/profile.sh [--tool callgrind|perf] [--requests N]

callgrind (valgrind): instruction counts per function, inclusive and self,
user space only; the gateway runs ~50x slower and its threads serialize,
so it says what the CPU executes, not how long waits take. perf (Debian's
linux-perf, software cpu-clock sampling since this VM has no hardware
counters): on-CPU time at full speed, kernel included (TCP, futex wake-ups,
write/fdatasync). The gateway is built with line tables into target/prof
so that inlined frames keep their names. Reports go to target/bench/.
"""

from __future__ import annotations

import argparse
import atexit
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402

PERF_HZ = 1000
PROF_BINARY = harness.ROOT / "target" / "prof" / "release" / "timbridge"


# Where a sample's CPU went, by pipeline stage: the first rule whose pattern
# is in the sample's stack (any frame) or thread name wins, in this order.
STAGES = [
    ("intake: SHA-256 (Sign check, event_id)", "frame", ("sha2::",)),
    ("intake: body JSON parse (serde_json + serde_path_to_error)", "frame",
     ("timbridge::tencent::payload::",)),
    ("intake: query string parse", "frame", ("CallbackQuery::parse",)),
    ("intake: normalize + event JSON (serde_json)", "frame", ("timbridge::event::",)),
    ("intake: record encode", "frame", ("timbridge::record::Record::encode",)),
    ("intake: dedup", "frame", ("timbridge::dedup::",)),
    ("metrics (prometheus)", "frame", ("prometheus::",)),
    ("spool writer and syncer threads (appends that found the writer busy, timers, fdatasync)",
     "comm", ("spool-writer", "spool-syncer")),
    ("spool append on the connection thread (record encode, CRC, pwrite)", "frame",
     ("timbridge::spool::Spool::append", "Intake::spool_records")),
    # Before the publisher: the polling thread's frames are in timbridge::publish too.
    ("delivery reports (librdkafka's polling thread, spool acks)", "comm", ("timbridge-kafka",)),
    ("publisher (the spool's in-memory tail or a read-back, rdkafka produce)", "frame",
     ("timbridge::publish::", "timbridge::spool::reader", "timbridge::spool::tail",
      "rd_kafka_produce")),
    ("librdkafka broker thread (batching, LZ4, TCP to the broker)", "comm", ("rdk:",)),
    # hyper polls the route inside its poll_write: what the rules above did
    # not claim of the route's own frames is ours, not the answer's write.
    ("route and intake, the rest (query checks, app and Sign, limits, counting, the answer)",
     "frame", ("timbridge::server::Routes::", "timbridge::intake::")),
    ("HTTP: write the answer (hyper encode + writev)", "frame",
     ("poll_write", "poll_flush", "write_vectored")),
    ("HTTP: read the request (recv + hyper parse)", "frame",
     ("poll_read", "Http1Transaction>::parse", "recv")),
    ("tokio scheduler, epoll, timers, idle wake-ups", "comm", ("tokio-rt-worker", "conn-")),
]
# What the sample was doing at its leaf, whatever the stage.
LEAVES = [
    ("kernel: futex (thread wake-ups and waits)", ("futex",)),
    ("kernel: TCP/loopback (send, receive, softirq)", ("tcp_", "sock_", "net_rx", "ip_", "__dev_queue")),
    ("kernel: file write/sync (ext4)", ("ext4", "vfs_write", "fdatasync", "pwrite", "jbd2", "file_write")),
    ("kernel: epoll", ("epoll",)),
    ("kernel: scheduler / context switch", ("schedule", "finish_task_switch", "try_to_wake_up")),
    ("kernel: other", ("",)),
]
MALLOC = ("malloc", "_int_malloc", "free", "_int_free", "cfree@GLIBC_2.2.5", "cfree", "realloc",
          "_int_realloc", "malloc_consolidate", "unlink_chunk.constprop.0", "calloc",
          "__lll_lock_wait_private", "__lll_lock_wake_private", "__libc_malloc", "__libc_free")


def perf_summary(data: Path, requests: int, hz: int) -> str:
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym", "--no-inline"],
                         capture_output=True, text=True, check=True).stdout
    stages: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for block in out.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        comm = lines[0].rsplit(None, 1)[0].strip()
        frames = []
        for ln in lines[1:]:
            parts = ln.strip().split(None, 1)
            frames.append((parts[0], parts[1] if len(parts) > 1 else ""))
        total += 1
        stage = "other"
        for name, kind, pats in STAGES:
            hay = [comm] if kind == "comm" else [f for _, f in frames]
            if any(p in h for h in hay for p in pats):
                stage = name
                break
        stages[stage] = stages.get(stage, 0) + 1
        addr, leaf = frames[0] if frames else ("0", "")
        if addr.startswith("ffffffff"):
            kernel = " ".join(f for a, f in frames if a.startswith("ffffffff"))
            cls = next(n for n, pats in LEAVES if any(p in kernel for p in pats))
        elif leaf.split("@")[0] in {m.split("@")[0] for m in MALLOC}:
            cls = "user: malloc/free (glibc, incl. arena locks)"
        elif "memmove" in leaf or "memcpy" in leaf or "memset" in leaf:
            cls = "user: memcpy/memset"
        else:
            cls = "user: everything else"
        leaves[cls] = leaves.get(cls, 0) + 1
    cpu_s = total / hz
    per_req = 1e6 * cpu_s / max(requests, 1)
    lines = [f"{total:,} samples at {hz} Hz = {cpu_s:.2f} CPU s for {requests:,} requests "
             f"= {per_req:.1f} µs CPU per request.", "",
             "| stage (inclusive) | share | µs/request |", "|---|---:|---:|"]
    for name, n in sorted(stages.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {100 * n / total:.1f}% | {per_req * n / total:.1f} |")
    lines += ["", "| at the leaf | share |", "|---|---:|"]
    for name, n in sorted(leaves.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {100 * n / total:.1f}% |")
    return "\n".join(lines)


# Frames every sample passes through; they say nothing about where time goes.
CG_PLUMBING = re.compile(
    r"^(tokio::runtime::|std::|core::ops::|<std::|<alloc::boxed|start_thread|clone3|__libc_start|"
    r"main$|<core::future::|<hyper_util::server::graceful|timbridge::server::serve::\{\{closure|"
    r"hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_catch|<tokio::runtime|"
    r"timbridge::main|timbridge::run|_start$|\(below main\)|0x)"
)
CG_LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$")
CG_FILE = re.compile(r"^(?:.*?\.(?:rs|c|h|S|cc|cpp)|\?\?\?):")


def callgrind_summary(report: Path, top: int = 25) -> str:
    """Merges callgrind_annotate's file:function lines (one per inlined
    source file) into one line per function."""
    funcs: dict[str, int] = {}
    total = None
    inclusive = "inclusive" in report.name
    for line in report.read_text().splitlines():
        if line.startswith("-- Auto-annotated") or line.startswith("-- User-annotated"):
            break
        m = CG_LINE.match(line)
        if not m:
            continue
        count, rest = int(m.group(1).replace(",", "")), m.group(2)
        if rest.startswith("PROGRAM TOTALS"):
            total = count
            continue
        rest = re.sub(r" \[[^\]]*\]$", "", rest)
        func = CG_FILE.sub("", rest, count=1)
        if inclusive and CG_PLUMBING.match(func):
            continue
        # Self: an inlined function's cost is spread over the files it
        # came from; add them up. Inclusive: the largest entry is the one
        # that contains the others.
        funcs[func] = max(funcs.get(func, 0), count) if inclusive else funcs.get(func, 0) + count
    rows = sorted(funcs.items(), key=lambda kv: -kv[1])[:top]
    lines = [f"Total {total:,} instructions.", "", "| instructions | share | function |", "|---:|---:|---|"]
    lines += [f"| {n:,} | {100 * n / total:.1f}% | `{f[:110]}` |" for f, n in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=("callgrind", "perf"), default="callgrind")
    ap.add_argument("--requests", type=int, help="default: 20,000 (callgrind), 200,000 (perf)")
    ap.add_argument("--rate", type=float,
                    help="open loop at this many requests/s instead of the closed loop "
                         "(what a request costs at a realistic rate, wake-ups included)")
    ap.add_argument("--out", type=Path, default=harness.ROOT / "target" / "bench")
    args = ap.parse_args()
    requests = args.requests or (20_000 if args.tool == "callgrind" else 200_000)
    signal.signal(signal.SIGTERM, harness.on_signal)
    signal.signal(signal.SIGINT, harness.on_signal)
    atexit.register(harness.kill_all)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="prof-", dir=args.out))
    atexit.register(shutil.rmtree, workdir, True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    harness.log(f"timbridge {harness.source_state()}")
    broker = harness.Broker()
    if args.tool == "callgrind":
        data = args.out / f"callgrind-{stamp}.out"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={data}"]
    else:
        data = args.out / f"perf-{stamp}.data"
        wrapper = ["perf", "record", "-e", "cpu-clock", "-F", str(PERF_HZ), "--call-graph", "dwarf,16384",
                   "-o", str(data), "--"]
    before = broker.watermarks()
    server = harness.Server("gateway", workdir, broker, "interval", wrapper=wrapper,
                            binary=PROF_BINARY)
    # The profiler is the spawned process; the gateway is its child (perf)
    # or the same process (valgrind).
    run_id = f"p{stamp.replace('-', '')}"
    if args.rate:
        harness.log(f"{args.tool}: {requests:,} requests at {args.rate:,.0f}/s")
        r = harness.loadgen("open", server, broker, run_id, rate=args.rate, warmup="0s",
                            duration=f"{requests / args.rate}s", connections=32, threads=1)
    else:
        harness.log(f"{args.tool}: {requests:,} requests, closed loop, 8 connections")
        r = harness.loadgen("closed", server, broker, run_id, requests=requests,
                            warmup="0s", duration="900s", connections=8, threads=1)
    check = harness.verify_kafka(server, broker, before, [r])
    harness.log(f"{r['accepted']:,} accepted at {r['window']['requests_per_s']:,.0f} req/s; kafka {check}")
    server.proc.send_signal(signal.SIGINT if args.tool == "perf" else signal.SIGTERM)
    server.proc.wait(timeout=300)
    broker.command("quit")

    if args.tool == "callgrind":
        for inclusive in ("no", "yes"):
            report = args.out / f"callgrind-{stamp}-{'inclusive' if inclusive == 'yes' else 'self'}.txt"
            with open(report, "w") as f:
                subprocess.run(["callgrind_annotate", f"--inclusive={inclusive}", "--threshold=99", "--auto=no",
                                str(data)], stdout=f, stderr=subprocess.DEVNULL, check=True)
            summary = report.with_suffix(".md")
            summary.write_text(callgrind_summary(report) + "\n")
            print(f"\n## callgrind, {report.stem.rsplit('-', 1)[1]}\n\n{summary.read_text()}")
            harness.log(f"wrote {report} and {summary}")
    else:
        summary = args.out / f"perf-{stamp}-stages.md"
        summary.write_text(perf_summary(data, r["accepted"], PERF_HZ) + "\n")
        print(f"\n## perf, by stage\n\n{summary.read_text()}")
        for mode, extra in (("self", ["--no-children"]), ("inclusive", ["--children"])):
            report = args.out / f"perf-{stamp}-{mode}.txt"
            with open(report, "w") as f:
                subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--percent-limit", "0.5",
                                "-g", "none", "--sort", "symbol", *extra],
                               stdout=f, stderr=subprocess.DEVNULL, check=True)
            harness.log(f"wrote {report}")
    return 0 if check["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
