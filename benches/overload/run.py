#!/usr/bin/env python3
"""payload-guard under attack and overload: loopback only, bounded in time, standard library only.

Memory (the release binary, one process per load, buffer_budget = 32MiB, a trim route in front
of a receiver that takes 1 MiB):

  chunked   40 concurrent chunked 3.5 MB Synthflow-shaped JSON bodies
  h2        the same bodies over HTTP/2 (h2c): 4 curl processes x 10 parallel uploads. curl
            opens a connection per upload (--parallel-immediate): multiplexed on one
            connection, curl 7.88's h2c uploads failed with "Error in the HTTP2 framing layer"
            (with the code before these benchmarks too), so this is not 4 x 10 streams.
  length    40 concurrent 3.5 MB bodies with Content-Length

  For each: the idle RSS before the load, the peak (VmHWM, reset after start-up), the RSS 10 s
  after the load ended, the statuses, and what payload_guard_buffer_in_use_bytes read at the
  end. Targets (issue #18): peak <= budget + 48 MiB; 10 s later within 16 MiB of the idle RSS.

Shedding (max_connections = 300, body_timeout = "10s"):

  one-address  350 connections from 127.0.0.2 that declare 1000 bytes and send one byte every 2 s
  ten-address  the same spread over 127.0.0.2 ... 127.0.0.11

  2.5 s into the attack, a legitimate sender on 127.0.0.1 posts 20 times, each on a new
  connection; the latencies (target: each 200 in under 500 ms) and the shed counters are printed.

Needs: python3, cargo, curl (with HTTP/2). Nothing is installed by this script:
    apt-get update && apt-get install -y curl

    python3 benches/overload/run.py              # both parts
    python3 benches/overload/run.py --memory     # memory only
    python3 benches/overload/run.py --shedding   # shedding only
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MIB = 1024 * 1024
BODY_BYTES = 3_500_000
FIXTURE = os.path.join(REPO, "src/trim/synthflow-post-call.json")

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
buffer_budget = "32MiB"
max_connections = {max_connections}
body_timeout = "{body_timeout}"

[incidents]
path = "{run_dir}/incidents.jsonl"

[[routes]]
name = "trim"
path_prefix = "/trim"
upstream = "http://127.0.0.1:{recv_port}/trim"
upstream_limit = "1MiB"
on_oversize = "trim"

[[routes.trim]]
path = "call.transcript"
action = "truncate"
keep = "head_tail"

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "http://127.0.0.1:{recv_port}/plain"
"""


def log(msg: str) -> None:
    print(f"[overload] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout=15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def build(args) -> tuple[str, str]:
    target = args.target_dir or os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    pg = os.path.join(target, "release", "payload-guard")
    recv = os.path.join(target, "release", "examples", "bench_receiver")
    if not args.no_build:
        cmd = ["cargo", "build", "--release", "--bin", "payload-guard", "--example", "bench_receiver"]
        log(" ".join(cmd))
        subprocess.run(cmd, cwd=REPO, env=dict(os.environ, CARGO_TARGET_DIR=target), check=True)
    return pg, recv


def payload(seed: int) -> bytes:
    """A Synthflow-shaped JSON body of exactly BODY_BYTES bytes (call.transcript fills it)."""
    with open(FIXTURE, encoding="utf-8") as f:
        doc = json.load(f)
    doc.setdefault("call", {})["call_id"] = f"bench-{seed}"
    doc["call"]["transcript"] = "@@T@@"
    text = json.dumps(doc, separators=(",", ":"))
    head, tail = text.split('"@@T@@"')
    room = BODY_BYTES - len(head.encode()) - len(tail.encode()) - 2
    line = "\\nbot: thanks for calling, how can I help you today? human: my order is late again"
    filler = (line * (room // len(line) + 1))[:room]
    if filler.endswith("\\"):
        filler = filler[:-1] + "."  # not a dangling escape
    body = (head + '"' + filler + '"' + tail).encode()
    assert len(body) == BODY_BYTES
    json.loads(body)
    return body


class Proxy:
    """A receiver and a payload-guard process with the config above."""

    def __init__(self, pg: str, recv: str, run_dir: str, max_connections=4096, body_timeout="5m"):
        self.recv = subprocess.Popen(
            [recv, "--listen", "127.0.0.1:0", "--limit", str(MIB), "--threads", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.recv.stdout.readline().decode()
        m = re.match(r"listening 127\.0\.0\.1:(\d+)", line)
        if not m:
            raise SystemExit(f"receiver: unexpected first line {line!r}")
        self.port, self.admin_port = free_port(), free_port()
        path = os.path.join(run_dir, "proxy.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=self.port, admin_port=self.admin_port, run_dir=run_dir,
                                  recv_port=m.group(1), max_connections=max_connections,
                                  body_timeout=body_timeout))
        env = dict(os.environ, RUST_LOG="warn,payload_guard::server=info")
        self.log = open(os.path.join(run_dir, "proxy.log"), "wb")
        self.proc = subprocess.Popen([pg, "run", "--config", path], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        wait_port(self.port, self.proc)
        wait_port(self.admin_port, self.proc)

    def metrics(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                out[series] = float(value)
        return out

    def stop(self) -> None:
        for p in (self.proc, self.recv):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()


# ------------------------------------------------------------------------------------------
# memory


def post(port: int, body: bytes, chunked: bool) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"content-type": "application/json"}
        if chunked:
            chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
            conn.request("POST", "/trim/hook", body=chunks, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/trim/hook", body=body, headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return 0


def load_threads(port: int, bodies: list[bytes], chunked: bool) -> list[int]:
    statuses = [0] * len(bodies)

    def one(i):
        statuses[i] = post(port, bodies[i], chunked)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def load_h2(port: int, body_file: str) -> list[int]:
    procs = []
    for _ in range(4):
        argv = ["curl", "-s", "--http2-prior-knowledge", "--parallel", "--parallel-immediate",
                "--parallel-max", "10", "-H", "content-type: application/json",
                "--data-binary", f"@{body_file}", "-w", "%{http_code}\\n"]
        for _ in range(10):
            argv += ["-o", "/dev/null", f"http://127.0.0.1:{port}/trim/hook"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    statuses = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        statuses += [int(s) for s in out.split()]
    return statuses


def memory(pg: str, recv: str, run_dir: str) -> list[dict]:
    bodies = [payload(i) for i in range(40)]
    body_file = os.path.join(run_dir, "body.json")
    with open(body_file, "wb") as f:
        f.write(bodies[0])
    rows = []
    for name in ["chunked", "h2", "length"]:
        proxy = Proxy(pg, recv, run_dir)
        pid = proxy.proc.pid
        # Warm up (one small and one trimmed request), then take the idle baseline.
        post(proxy.port, b"{}", False)
        post(proxy.port, bodies[0], False)
        time.sleep(3)
        idle_before = status_kib(pid, "VmRSS")
        reset_hwm(pid)
        started = time.time()
        if name == "h2":
            statuses = load_h2(proxy.port, body_file)
        else:
            statuses = load_threads(proxy.port, bodies, chunked=(name == "chunked"))
        took = time.time() - started
        peak = status_kib(pid, "VmHWM")
        in_use = proxy.metrics().get("payload_guard_buffer_in_use_bytes", -1)
        time.sleep(10)
        idle_after = status_kib(pid, "VmRSS")
        rss_gauge = proxy.metrics().get("payload_guard_process_resident_bytes", -1)
        proxy.stop()
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        row = {
            "load": name, "seconds": round(took, 1), "statuses": counts,
            "idle_before_mib": round(idle_before / 1024, 1),
            "peak_mib": round(peak / 1024, 1),
            "idle_after_10s_mib": round(idle_after / 1024, 1),
            "buffer_in_use_after": in_use,
            "rss_gauge_after_mib": round(rss_gauge / MIB, 1),
        }
        row["peak_ok"] = peak / 1024 <= 32 + 48
        row["idle_ok"] = (idle_after - idle_before) / 1024 <= 16
        log(json.dumps(row))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------
# shedding


def slow_connections(port: int, addresses: list[str], count: int) -> list[socket.socket]:
    socks = []
    head = (b"POST /plain/hook HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n{")
    for i in range(count):
        s = socket.socket()
        s.bind((addresses[i % len(addresses)], 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(head)
        except OSError:
            pass
        s.setblocking(False)
        socks.append(s)
    return socks


def trickle(socks: list[socket.socket], stop: threading.Event) -> None:
    while not stop.wait(2.0):
        for s in socks:
            try:
                s.send(b" ")
            except OSError:
                pass


def legit(port: int) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/plain/hook", body=b'{"ok":1}',
                 headers={"content-type": "application/json", "connection": "close"})
    status = conn.getresponse().status
    conn.close()
    return status, (time.perf_counter() - started) * 1000


def shedding(pg: str, recv: str, run_dir: str) -> list[dict]:
    rows = []
    for name, addresses in [("one-address", ["127.0.0.2"]),
                            ("ten-address", [f"127.0.0.{i}" for i in range(2, 12)])]:
        proxy = Proxy(pg, recv, run_dir, max_connections=300, body_timeout="10s")
        socks = slow_connections(proxy.port, addresses, 350)
        stop = threading.Event()
        t = threading.Thread(target=trickle, args=(socks, stop))
        t.start()
        time.sleep(2.5)
        results = [legit(proxy.port) for _ in range(20)]
        metrics = proxy.metrics()
        stop.set()
        t.join()
        for s in socks:
            s.close()
        proxy.stop()
        ms = [r[1] for r in results]
        shed = {k.split('"')[1]: v for k, v in metrics.items()
                if k.startswith("payload_guard_connections_shed_total") and v}
        row = {
            "attack": name, "statuses": {s: [r[0] for r in results].count(s) for s in {r[0] for r in results}},
            "median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1),
            "all_200_under_500ms": all(r[0] == 200 and r[1] < 500 for r in results),
            "shed": shed,
        }
        log(json.dumps(row))
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", action="store_true", help="only the memory loads")
    ap.add_argument("--shedding", action="store_true", help="only the shedding runs")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--target-dir")
    args = ap.parse_args()
    both = not (args.memory or args.shedding)
    pg, recv = build(args)
    out = {}
    with tempfile.TemporaryDirectory(prefix="pg-overload-") as run_dir:
        if both or args.memory:
            out["memory"] = memory(pg, recv, run_dir)
        if both or args.shedding:
            out["shedding"] = shedding(pg, recv, run_dir)
    print(json.dumps(out, indent=2))
    ok = all(r["peak_ok"] and r["idle_ok"] for r in out.get("memory", [])) and \
        all(r["all_200_under_500ms"] for r in out.get("shedding", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
