#!/usr/bin/env python3
"""payload-guard load benchmark: loopback only, bounded in time, Python standard library only.

Builds payload-guard, examples/bench_receiver and examples/bare_hyper_proxy in release mode, then runs each workload
against each target one at a time, interleaved (A B C A B C ...) over the repetitions:

  targets    direct (the receiver itself), payload-guard, nginx (proxy_request_buffering on,
             the default), nginx-nobuf (proxy_request_buffering off), haproxy, and hyper-floor
             (examples/bare_hyper_proxy: hyper's HTTP/1 server and client on one thread and
             nothing else, the least a proxy on hyper can spend; 2 KiB, 1 MiB and the upload,
             no checks). nginx and HAProxy columns are skipped when the binaries are missing.
  workloads  2 KiB JSON POSTs and 1 MiB POSTs (wrk -t1 -c32), 5 MiB Synthflow-shaped POSTs
             forwarded untrimmed (wrk -t1 -c8), the same 5 MiB payloads on payload-guard's trim
             route to a receiver that takes 1 MiB, 200 MiB uploads (curl -T, no Expect), each
             through a proxy paired with one straight to the receiver, back to back.
  checks     40 MiB with Content-Length -> 413, 40 MiB chunked -> 413 (the proxy's own limit);
             8 MiB to a receiver that answers 413 early and then drains the body in a lingering
             close like nginx (receiver (c) of issue #17) -> the sender gets that 413; 40 MiB to
             "receiver (a)" (bench_receiver --mode reset-413: 413 from the request head, closed
             at once with the body unread, so its kernel resets the connection) -> the sender
             gets the receiver's own 413, status and body. Content-Length and chunked each.
             Every outcome other than the expected answer is counted and shown (502, a reset,
             a 413 with someone else's body, ...).

Every proxy is restarted for each measurement; its CPU time comes from /proc/PID/stat
(utime+stime) and its peak RSS from VmHWM, reset after the warm-up (clear_refs 5).
payload-guard runs as a user gets it (no RUST_LOG: text lines, one INFO access line per request,
stderr to a file) and, on 2 KiB requests, also quiet (RUST_LOG=warn), to compare like for like
with nginx and HAProxy (no access log in their configurations here) and to price the access line.

Targets (issue #15; medians of per-repetition ratios): proxy CPU per request (user + kernel from
/proc/PID/stat) on 2 KiB POSTs <= 1.0x HAProxy's and <= 1.1x nginx's, p99 <= nginx's; on 1 MiB and
5 MiB POSTs <= 0.9x HAProxy's; the default access line <= 10% of the 2 KiB CPU per request; the
200 MiB upload <= 1.15x direct with peak RSS <= 16 MiB; the trim route <= 1.5x the CPU of
forwarding the same 5 MiB, with peak RSS <= 40 MiB for 8 concurrent 5 MiB payloads.

Needs: python3, cargo, curl, wrk; optional: nginx, haproxy. Nothing is installed by this script:
    apt-get update && apt-get install -y wrk curl nginx-light haproxy

    python3 benches/load/run.py --quick      # smoke: 1 repetition, 2 s runs, 3 tries per check
    python3 benches/load/run.py              # full: 3 repetitions, 5 s runs, 20 tries per check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
KIB = 1024
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
APT_LINE = "apt-get update && apt-get install -y wrk curl nginx-light haproxy"

FLOOR = "hyper-floor"
ALL_TARGETS = ["direct", "payload-guard", "payload-guard-quiet", "nginx", "nginx-nobuf", "haproxy", FLOOR]
# The quiet configuration is measured on 2 KiB requests only: that is where a log line per
# request weighs (see the logging target).
LOUD_TARGETS = [t for t in ALL_TARGETS if t != "payload-guard-quiet"]
# The floor is a reference for the CPU of small and medium requests, not a product: it is not
# run on the 5 MiB, upload or correctness workloads.
PRODUCT_TARGETS = [t for t in LOUD_TARGETS if t != FLOOR]
TARGET_LABEL = {
    "direct": "direct (receiver)",
    "payload-guard": "payload-guard",
    "payload-guard-quiet": "payload-guard (RUST_LOG=warn)",
    "nginx": "nginx (buffering on)",
    "nginx-nobuf": "nginx (buffering off)",
    "haproxy": "HAProxy",
    FLOOR: "bare hyper proxy (floor)",
}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# processes: everything started here is in its own process group and is killed on exit


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM, grace=3.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        else:
            # The leader is gone; make sure nothing of its group is left (nginx workers).
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p, grace=2.0)


PROCS = Procs()


def on_signal(signum, _frame):
    log(f"signal {signum}: stopping everything this run started")
    PROCS.stop_all()
    sys.exit(130)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def proc_stat(pid: int) -> tuple[int, int]:
    """(utime + stime in clock ticks, ppid) of a whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[1])


def cpu_ticks(pid: int) -> int:
    return proc_stat(pid)[0]


def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) in clock ticks: user space and kernel."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def machine_busy() -> tuple[int, int]:
    """(busy, steal) clock ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def children_ticks() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * CLK_TCK


class Background:
    """CPU used on the machine during a measurement by processes this run did not start."""

    def __init__(self, ours: list[int]) -> None:
        self.ours = ours
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = machine_busy()
        self.mine0 = self.mine()

    def mine(self) -> float:
        total = children_ticks()
        for pid in self.ours:
            try:
                total += cpu_ticks(pid)
            except OSError:
                pass
        return total

    def done(self) -> dict:
        wall = max(1e-6, time.monotonic() - self.t0) * CLK_TCK
        busy, steal = machine_busy()
        other = (busy - self.busy0) - (self.mine() - self.mine0)
        return {"background_cores": max(0.0, other / wall), "steal_cores": (steal - self.steal0) / wall}


def reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if proc_stat(int(entry))[1] == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


# ---------------------------------------------------------------------------------------------
# payloads: seeded, shaped like the Synthflow post-call fixture, long call.transcript

WORDS = (
    "appointment confirm Thursday Friday morning insurance cleaning dentist schedule "
    "reschedule available perfect thanks please could would calendar reminder text message "
    "address parking receptionist invoice copay coverage x-ray hygienist whitening "
    "café naïve Müller Zürich Ångström résumé São Paulo Łódź — … “quoted” 日本語 한국어 "
    "🙂 👍 tooth crown filling 9:30 11:00 10 a.m. $45.00 50% ok yes no maybe"
).split()
BOT_OPENERS = ["Sure,", "Of course.", "Great!", "I see.", "Let me check.", "Understood."]
HUMAN_OPENERS = ["Yes,", "No,", "Hmm,", "Actually,", "Okay,", "Well,"]


def load_fixture(path: str | None) -> dict:
    candidates = [path] if path else [
        "/work/shared/fixtures/synthflow-post-call.json",
        os.path.join(REPO, "src/trim/synthflow-post-call.json"),
    ]
    for c in candidates:
        if c and os.path.exists(c):
            with open(c, encoding="utf-8") as f:
                return json.load(f)
    raise SystemExit(f"fixture not found (tried {candidates}); pass --fixture")


def encode_str(text: str) -> str:
    """The JSON string body (no quotes), with some non-ASCII written as \\uXXXX escapes."""
    s = json.dumps(text, ensure_ascii=False)[1:-1]
    return s.replace("ü", "\\u00fc").replace("é", "\\u00e9")


def synthflow_payload(fixture: dict, size: int, seed: int) -> bytes:
    """A Synthflow-shaped payload of exactly `size` bytes; call.transcript fills it."""
    rng = random.Random(seed)
    doc = json.loads(json.dumps(fixture))
    call = doc.setdefault("call", {})
    call["call_id"] = f"{1732630000000 + seed}x{rng.randrange(10**17, 10**18)}"
    call["duration"] = max(1, size // 1000 * 60 // 1000)
    analysis = doc.setdefault("analysis", {})
    if size >= MIB:
        for key in list(analysis):
            if key.endswith("_feedback"):
                analysis[key] = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(200, 2000)))
    call["transcript"] = "@@TRANSCRIPT@@"
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    head, tail = text.split('"@@TRANSCRIPT@@"')
    overhead = len(head.encode()) + len(tail.encode()) + 2
    room = size - overhead
    if room < 0:
        raise SystemExit(f"fixture too large for a {size}-byte payload")
    parts: list[str] = []
    used = 0
    turn = 0
    while True:
        who = "bot" if turn % 2 == 0 else "human"
        opener = rng.choice(BOT_OPENERS if who == "bot" else HUMAN_OPENERS)
        n = rng.randrange(4, 40) if rng.random() > 0.05 else rng.randrange(200, 800)
        line = encode_str(f"\n{who}: {opener} " + " ".join(rng.choice(WORDS) for _ in range(n)))
        b = len(line.encode())
        if used + b > room:
            if room - used > 120:
                continue  # try a shorter turn
            break
        parts.append(line)
        used += b
        turn += 1
    parts.append("." * (room - used))
    body = (head + '"' + "".join(parts) + '"' + tail).encode()
    assert len(body) == size, (len(body), size)
    json.loads(body)  # valid JSON
    return body


# ---------------------------------------------------------------------------------------------
# tools and builds


def check_tools(want_targets: list[str]) -> tuple[dict, list[str]]:
    tools = {}
    missing = []
    for name in ["cargo", "curl", "wrk", "nginx", "haproxy"]:
        path = shutil.which(name) or (
            f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
        )
        tools[name] = path
        if not path:
            missing.append(name)
    required = [t for t in ("curl", "wrk") if not tools[t]]
    if required:
        raise SystemExit(f"missing required tools: {', '.join(required)}\ninstall: {APT_LINE}")
    targets = []
    for t in want_targets:
        if t.startswith("nginx") and not tools["nginx"]:
            continue
        if t == "haproxy" and not tools["haproxy"]:
            continue
        targets.append(t)
    for name in ("nginx", "haproxy"):
        if not tools[name]:
            log(f"{name} not found: its columns are skipped (install: {APT_LINE})")
    return tools, targets


def build(args) -> tuple[str, str, str]:
    target_dir = args.target_dir or os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    pg = os.path.join(target_dir, "release", "payload-guard")
    recv = os.path.join(target_dir, "release", "examples", "bench_receiver")
    floor = os.path.join(target_dir, "release", "examples", "bare_hyper_proxy")
    if not args.no_build:
        # Two builds: examples (and benches) are built with the dev-dependencies' features too
        # (tokio's test-util among them), and a binary built in the same command shares that
        # library; the binary measured must be the one `cargo build --release` gives a user.
        env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
        for cmd in (["cargo", "build", "--release", "--bin", "payload-guard"],
                    ["cargo", "build", "--release", "--example", "bench_receiver",
                     "--example", "bare_hyper_proxy"]):
            log(f"building: CARGO_TARGET_DIR={target_dir} {' '.join(cmd)}")
            subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=1800)
    for path in (pg, recv, floor):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing (build it, or drop --no-build)")
    return pg, recv, floor


def version_of(argv) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        out = (r.stdout + r.stderr).strip().splitlines()
        return out[0] if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "memory": mem,
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


# ---------------------------------------------------------------------------------------------
# the receivers and the proxies


class Bench:
    def __init__(self, args, tools, pg_bin, recv_bin, floor_bin, run_dir):
        self.args = args
        self.tools = tools
        self.pg_bin = pg_bin
        self.recv_bin = recv_bin
        self.floor_bin = floor_bin
        self.run_dir = run_dir
        self.recv = {}
        self.recv_pids: list[int] = []

    def start_receiver(self, name: str, extra: list[str]) -> int:
        argv = [self.recv_bin, "--listen", "127.0.0.1:0", "--threads", str(self.args.receiver_threads)] + extra
        err = open(os.path.join(self.run_dir, f"receiver-{name}.log"), "wb")
        p = PROCS.start(argv, stdout=subprocess.PIPE, stderr=err)
        line = p.stdout.readline().decode().strip()
        m = re.match(r"listening 127\.0\.0\.1:(\d+)", line)
        if not m:
            raise RuntimeError(f"receiver {name}: unexpected first line {line!r}")
        port = int(m.group(1))
        self.recv[name] = port
        self.recv_pids.append(p.pid)
        log(f"receiver {name}: 127.0.0.1:{port} {' '.join(extra)}")
        return port

    def start_receivers(self) -> None:
        self.start_receiver("main", [])
        self.start_receiver("1m", ["--limit", str(MIB)])
        self.start_receiver("early", ["--limit", str(MIB), "--early-close"])
        self.start_receiver("32m", ["--limit", str(32 * MIB)])
        self.start_receiver("reset", ["--limit", str(MIB), "--mode", "reset-413"])

    def render(self, template: str, out: str, values: dict) -> str:
        with open(os.path.join(HERE, template)) as f:
            text = f.read()
        for k, v in values.items():
            text = text.replace("{{" + k + "}}", str(v))
        left = re.findall(r"\{\{[A-Z_]+\}\}", text)
        if left:
            raise RuntimeError(f"{template}: unfilled placeholders {left}")
        path = os.path.join(self.run_dir, out)
        with open(path, "w") as f:
            f.write(text)
        return path

    def values(self, port: int) -> dict:
        return {
            "LISTEN_PORT": port,
            "RUN_DIR": self.run_dir,
            "RECV_PORT": self.recv["main"],
            "RECV_1M_PORT": self.recv["1m"],
            "RECV_EARLY_PORT": self.recv["early"],
            "RECV_RESET_PORT": self.recv["reset"],
        }

    def start_target(self, target: str):
        """Starts a proxy; returns (process or None, pid to measure or None, base URL)."""
        if target == "direct":
            return None, None, None
        port = free_port()
        values = self.values(port)
        if target.startswith("payload-guard"):
            cfg = self.render("payload-guard.toml.tmpl", "payload-guard.toml", values)
            # What a user gets: no RUST_LOG (INFO, one access line per request), text lines,
            # stderr to a file. The quiet configuration logs warnings only.
            env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
            if target == "payload-guard-quiet":
                env["RUST_LOG"] = "warn"
            err_path = os.path.join(self.run_dir, f"{target}.log")
            err = open(err_path, "ab")
            p = PROCS.start([self.pg_bin, "--config", cfg, "run"],
                            stdout=subprocess.DEVNULL, stderr=err, env=env)
            wait_port(port, p)
            return p, p.pid, f"http://127.0.0.1:{port}"
        if target.startswith("nginx"):
            values["REQUEST_BUFFERING"] = "off" if target == "nginx-nobuf" else "on"
            values["USER_DIRECTIVE"] = "user root;" if os.geteuid() == 0 else ""
            cfg = self.render("nginx.conf.tmpl", f"{target}.conf", values)
            p = PROCS.start([self.tools["nginx"], "-p", self.run_dir, "-c", cfg,
                             "-e", os.path.join(self.run_dir, "nginx-stderr.log")],
                            stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(self.run_dir, "nginx-start.log"), "ab"))
            wait_port(port, p)
            deadline = time.monotonic() + 5
            workers = []
            while not workers and time.monotonic() < deadline:
                workers = children(p.pid)
                if not workers:
                    time.sleep(0.02)
            if len(workers) != 1:
                raise RuntimeError(f"nginx: expected one worker, found {workers}")
            return p, workers[0], f"http://127.0.0.1:{port}"
        if target == FLOOR:
            p = PROCS.start([self.floor_bin, "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{self.recv['main']}"],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.run_dir, "floor.log"), "ab"))
            wait_port(port, p)
            return p, p.pid, f"http://127.0.0.1:{port}"
        if target == "haproxy":
            cfg = self.render("haproxy.cfg.tmpl", "haproxy.cfg", values)
            p = PROCS.start([self.tools["haproxy"], "-f", cfg, "-db"], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(self.run_dir, "haproxy.log"), "ab"))
            wait_port(port, p)
            return p, p.pid, f"http://127.0.0.1:{port}"
        raise ValueError(target)

    def url(self, target: str, base: str | None, path: str) -> str:
        if target != "direct":
            return base + path
        port = {"/early": self.recv["early"], "/limit": self.recv["32m"],
                "/trim": self.recv["1m"], "/reset": self.recv["reset"]}.get(path, self.recv["main"])
        return f"http://127.0.0.1:{port}{path}"


# ---------------------------------------------------------------------------------------------
# measurements

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> dict:
    def grab(pattern, cast=float, default=None):
        m = re.search(pattern, out)
        return cast(m.group(1)) if m else default

    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": grab(r"(\d+) requests in", int, 0),
        "seconds": grab(r"requests in ([\d.]+)s", float, 0.0),
        "rps": grab(r"Requests/sec:\s+([\d.]+)", float, 0.0),
        "p99_ms": float(p99.group(1)) * UNIT[p99.group(2)] if p99 else None,
        "non2xx": grab(r"Non-2xx or 3xx responses: (\d+)", int, 0),
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def run_wrk(url: str, files: list[str], conns: int, seconds: int) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "--latency",
            "-s", os.path.join(HERE, "post.lua"), url, "--"] + files
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip()}")
    res = parse_wrk(r.stdout)
    res["raw"] = r.stdout
    return res


def curl_post(url: str, path: str, chunked: bool, max_time=60) -> tuple[str, int, float, str, str]:
    """(status, curl exit code, seconds, body head, curl's error message or "")."""
    argv = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{time_total}", "-X", "POST",
            "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
            "--max-time", str(max_time)]
    if chunked:
        argv += ["-H", "Transfer-Encoding: chunked", "-T", "-", url]
        with open(path, "rb") as f:
            r = subprocess.run(argv, stdin=f, capture_output=True, timeout=max_time + 10)
    else:
        argv += ["-T", path, url]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=max_time + 10)
    out = r.stdout.decode(errors="replace")
    body, _, tail = out.rpartition("\n")
    parts = tail.split()
    status = parts[0] if parts else "000"
    secs = float(parts[1]) if len(parts) > 1 else 0.0
    err = r.stderr.decode(errors="replace").strip().splitlines()
    return status, r.returncode, secs, body[:200], (err[-1] if err else "")


def measure(bench: Bench, target: str, wl: dict, args) -> dict:
    p, pid, base = bench.start_target(target)
    try:
        url = bench.url(target, base, wl["path"])
        if wl["kind"] == "wrk":
            run_wrk(url, wl["files"], wl["conns"], args.warmup)
        else:
            status, _, _, _, _ = curl_post(url, wl["small"], chunked=False)
            if status != "200":
                raise RuntimeError(f"{target} warm-up answered {status}")
        ours = bench.recv_pids + ([pid] if pid else [])
        if p is not None and pid != p.pid:
            ours.append(p.pid)  # nginx's master
        if pid:
            if not reset_hwm(pid):
                log(f"cannot reset VmHWM of {pid}: peak RSS includes start-up")
            t0 = cpu_ticks(pid)
            split0 = cpu_split(pid)
        recv0 = sum(cpu_ticks(r) for r in bench.recv_pids)
        gen0 = children_ticks()
        bg = Background(ours)
        if wl["kind"] == "wrk":
            res = run_wrk(url, wl["files"], wl["conns"], args.duration)
        else:
            # Each upload through the proxy is paired with one straight to the receiver, the
            # two back to back (in turn which goes first), so that a ratio compares uploads
            # that met the same machine. Uploads on two cores vary by half from one to the
            # next (where the scheduler puts curl, the receiver and the proxy), and measuring
            # all of one target and then all of the next let that decide the verdict.
            direct_url = bench.url("direct", None, wl["path"]) if target != "direct" else None
            times, direct_times, bad, statuses = [], [], 0, []
            recv_spent = gen_spent = 0.0

            def upload(to: str) -> tuple[str, int, float, str]:
                status, code, secs, body, _ = curl_post(to, wl["file"], chunked=False, max_time=300)
                return status, code, secs, body

            for i in range(args.uploads):
                if direct_url and i % 2 == 0:
                    direct_times.append(upload(direct_url)[2])
                r0, g0 = sum(cpu_ticks(r) for r in bench.recv_pids), children_ticks()
                status, code, secs, body = upload(url)
                recv_spent += sum(cpu_ticks(r) for r in bench.recv_pids) - r0
                gen_spent += children_ticks() - g0
                if direct_url and i % 2 == 1:
                    direct_times.append(upload(direct_url)[2])
                ok = status == "200" and f'"bytes":{wl["size"]}' in body.replace(" ", "")
                bad += (not ok) or code != 0
                times.append(secs)
                statuses.append(status)
            secs = statistics.median(times)
            res = {"requests": len(times), "seconds": sum(times), "rps": 1 / secs if secs else 0.0,
                   "p99_ms": None, "non2xx": bad, "socket_errors": 0,
                   "status": ",".join(sorted(set(statuses))), "time_s": secs, "times": times,
                   "best_s": min(times)}
            if direct_times:
                res.update(paired_direct_times=direct_times,
                           paired_direct_s=statistics.median(direct_times),
                           paired_direct_best_s=min(direct_times))
        res.update(bg.done())
        per_req = 1e6 / CLK_TCK / max(1, res["requests"])
        # The other processes on the request path: the receivers, and the load generator
        # (wrk or curl, this script's children, reaped within the measurement). For uploads,
        # only during the target's own uploads, not the paired direct ones.
        if wl["kind"] == "wrk" or target == "direct":
            recv_spent = sum(cpu_ticks(r) for r in bench.recv_pids) - recv0
            gen_spent = children_ticks() - gen0
        res["receiver_us_per_req"] = recv_spent * per_req
        res["loadgen_us_per_req"] = gen_spent * per_req
        if pid:
            res["cpu_us_per_req"] = (cpu_ticks(pid) - t0) * per_req
            user, sys_ = cpu_split(pid)
            res["cpu_user_us_per_req"] = (user - split0[0]) * per_req
            res["cpu_sys_us_per_req"] = (sys_ - split0[1]) * per_req
            res["hwm_kib"] = vm_hwm_kib(pid)
        else:
            res["cpu_us_per_req"] = None
            res["hwm_kib"] = None
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{target} exited during the test ({p.returncode})")
        return res
    finally:
        if p is not None:
            PROCS.stop(p)


# What bench_receiver --mode reset-413 --limit 1MiB answers: the receiver's own 413 body.
RESET_413_BODY = '{"error":"payload_too_large","limit":%d,"receiver":"reset-413"}' % MIB


def check_outcome(status: str, code: int, body: str, err: str, want: str,
                  want_body: str | None) -> tuple[bool, str]:
    """(got the expected answer, how to count this try). With `want_body`, a `want` status with
    another body (a proxy's own page) does not count. A complete expected answer followed by a
    curl error (a reset after the response) counts, and is listed as such."""
    if status == want and (want_body is None or body.strip() == want_body):
        return True, want if code == 0 else f"{want}, then curl exit {code}"
    if status == want:
        return False, f"{status} with another body"
    if status == "000":
        # curl's own words, e.g. "(55) Send failure: Broken pipe". curl does not read the
        # response after a failed send, so this is "no status seen by curl", not proof that
        # nothing was answered.
        reason = err.removeprefix("curl: ").strip() or f"exit {code}"
        return False, f"no status, curl {reason}"
    return False, status + (f", then curl exit {code}" if code else "")


def run_checks(bench: Bench, targets: list[str], files: dict, tries: int) -> dict:
    # (name, proxy path, receiver path for "direct", payload, chunked, status, body or None)
    checks = [
        ("40 MiB Content-Length -> 413", "/bench", "/limit", files["40m"], False, "413", None),
        ("40 MiB chunked -> 413", "/bench", "/limit", files["40m"], True, "413", None),
        ("early 413 + lingering close, 8 MiB Content-Length -> 413", "/early", "/early",
         files["8m"], False, "413", None),
        ("early 413 + lingering close, 8 MiB chunked -> 413", "/early", "/early",
         files["8m"], True, "413", None),
        ("receiver (a) 413 + reset, 40 MiB Content-Length -> its 413", "/reset", "/reset",
         files["40m"], False, "413", RESET_413_BODY),
        ("receiver (a) 413 + reset, 40 MiB chunked -> its 413", "/reset", "/reset",
         files["40m"], True, "413", RESET_413_BODY),
    ]
    out: dict = {}
    for target in targets:
        p, _, base = bench.start_target(target)
        try:
            for name, path, direct_path, file, chunked, want, want_body in checks:
                url = bench.url(target, base, direct_path if target == "direct" else path)
                seen: dict = {}
                samples: dict = {}
                ok = 0
                for _ in range(tries):
                    status, code, secs, body, err = curl_post(url, file, chunked)
                    good, key = check_outcome(status, code, body, err, want, want_body)
                    seen[key] = seen.get(key, 0) + 1
                    samples.setdefault(key, body[:160])
                    ok += good
                out.setdefault(name, {})[target] = {"ok": ok, "tries": tries, "seen": seen,
                                                    "want": want, "samples": samples}
                log(f"check {target:14s} {name}: {ok}/{tries} {seen}")
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{target} exited during the checks")
        finally:
            if p is not None:
                PROCS.stop(p)
    return out


# ---------------------------------------------------------------------------------------------
# report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0, suffix=""):
    if x is None:
        return "—"
    return f"{x:,.{digits}f}{suffix}"


def spread(xs):
    xs = [x for x in xs if x]
    if len(xs) < 2:
        return "—"
    m = statistics.median(xs)
    return f"{min(xs):,.0f}–{max(xs):,.0f} (±{(max(xs) - min(xs)) / 2 / m * 100:.1f}%)"


def ratio_per_rep(results, wl, target, ref, key, reps, invert=False):
    rs = []
    # Uploads are compared with the direct uploads paired with the target's own (`measure`).
    paired = {"time_s": "paired_direct_s", "best_s": "paired_direct_best_s"}.get(key)
    for rep in range(reps):
        row = results.get((wl, target, rep), {})
        a = row.get(key)
        b = results.get((wl, ref, rep), {}).get(key)
        if ref == "direct" and paired and row.get(paired):
            b = row[paired]
        if a and b:
            rs.append(b / a if invert else a / b)
    return med(rs), rs


def cpu_breakdown(results, wl, targets, reps) -> list[str]:
    """Where each request's CPU went on the machine: the proxy (user space and kernel), the
    receiver and the load generator. With every core busy, req/s is about cores ÷ their sum."""
    rows = []
    for t in targets:
        rs = [results[(wl, t, r)] for r in range(reps) if (wl, t, r) in results]
        if not rs or "receiver_us_per_req" not in rs[0]:
            continue
        user = med([r.get("cpu_user_us_per_req") for r in rs])
        sys_ = med([r.get("cpu_sys_us_per_req") for r in rs])
        recv = med([r["receiver_us_per_req"] for r in rs])
        gen = med([r["loadgen_us_per_req"] for r in rs])
        total = sum(x for x in (user, sys_, recv, gen) if x is not None)
        rows.append(f"| {TARGET_LABEL[t]} | {fmt(user, 1)} | {fmt(sys_, 1)} | {fmt(recv, 1)} | "
                    f"{fmt(gen, 1)} | {fmt(total, 1)} |")
    if not rows:
        return []
    return ["CPU µs per request by process (medians; user and kernel time from /proc):\n",
            "| target | proxy, user space | proxy, kernel | receiver | load generator | all |",
            "|---|---:|---:|---:|---:|---:|"] + rows + [""]


def report(results, workloads, targets, checks, reps, meta) -> tuple[str, list]:
    lines = []
    verdicts = []
    have = set(targets)
    for wl in workloads:
        name = wl["name"]
        wl_targets = [t for t in targets if t in wl["targets"]]
        if not any((name, t, 0) in results for t in wl_targets):
            continue
        lines.append(f"### {wl['title']}\n")
        if wl["kind"] == "wrk":
            lines.append("| target | req/s (median) | req/s min–max | p99 ms | CPU µs/req | peak RSS MiB "
                         "| req/s ÷ nginx | req/s ÷ HAProxy | req/s ÷ direct | p99 ÷ nginx | errors |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        else:
            lines.append("| target | time s (median) | time s min–max (all uploads) | paired direct s (median) "
                         "| CPU ms/upload | peak RSS MiB | time ÷ direct | time ÷ nginx | time ÷ HAProxy "
                         "| best ÷ direct's best | errors |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in wl_targets:
            rows = [results[(name, t, r)] for r in range(reps) if (name, t, r) in results]
            if not rows:
                continue
            hwm = max((r["hwm_kib"] or 0) for r in rows) / 1024 if rows[0]["hwm_kib"] else None
            cpu = med([r["cpu_us_per_req"] for r in rows])
            errors = sum(r["non2xx"] + r["socket_errors"] for r in rows)
            if wl["kind"] == "wrk":
                rps = [r["rps"] for r in rows]
                vs = {ref: ratio_per_rep(results, name, t, ref, "rps", reps)[0]
                      for ref in ("nginx", "haproxy", "direct")}
                p99n = ratio_per_rep(results, name, t, "nginx", "p99_ms", reps)[0]
                lines.append(
                    f"| {TARGET_LABEL[t]} | {fmt(med(rps))} | {spread(rps)} | "
                    f"{fmt(med([r['p99_ms'] for r in rows]), 2)} | {fmt(cpu)} | {fmt(hwm, 1)} | "
                    f"{fmt(vs['nginx'], 2, '×') if 'nginx' in have and t != 'nginx' else '—'} | "
                    f"{fmt(vs['haproxy'], 2, '×') if 'haproxy' in have and t != 'haproxy' else '—'} | "
                    f"{fmt(vs['direct'], 2, '×') if t != 'direct' else '—'} | "
                    f"{fmt(p99n, 2, '×') if 'nginx' in have and t != 'nginx' else '—'} | {errors} |")
            else:
                ts = [r["time_s"] for r in rows]
                every = [x for r in rows for x in r.get("times", [r["time_s"]])]
                vs = {ref: ratio_per_rep(results, name, t, ref, "time_s", reps)[0]
                      for ref in ("direct", "nginx", "haproxy")}
                paired = [x for r in rows for x in r.get("paired_direct_times", [])]
                lines.append(
                    f"| {TARGET_LABEL[t]} | {fmt(med(ts), 3)} | "
                    f"{fmt(min(every), 3)}–{fmt(max(every), 3)} | "
                    f"{fmt(med(paired), 3) if paired else '—'} | "
                    f"{fmt(cpu / 1000 if cpu is not None else None, 0)} | {fmt(hwm, 1)} | "
                    f"{fmt(vs['direct'], 2, '×') if t != 'direct' else '—'} | "
                    f"{fmt(vs['nginx'], 2, '×') if 'nginx' in have and t != 'nginx' else '—'} | "
                    f"{fmt(vs['haproxy'], 2, '×') if 'haproxy' in have and t != 'haproxy' else '—'} | "
                    f"{fmt(ratio_per_rep(results, name, t, 'direct', 'best_s', reps)[0], 2, '×') if t != 'direct' else '—'} | "
                    f"{errors} |")
        lines.append("")
        if wl["kind"] == "wrk":
            lines += cpu_breakdown(results, name, wl_targets, reps)

    # trim vs forward, within each repetition
    trim_rows = [results.get(("5m-trim", "payload-guard", r)) for r in range(reps)]
    fwd_rows = [results.get(("5m", "payload-guard", r)) for r in range(reps)]
    trim_ratio = None
    if all(trim_rows) and all(fwd_rows) and trim_rows:
        per = [t["cpu_us_per_req"] / f["cpu_us_per_req"] for t, f in zip(trim_rows, fwd_rows)
               if t["cpu_us_per_req"] and f["cpu_us_per_req"]]
        trim_ratio = med(per)
        trim_per = per
        lines.append("### payload-guard: 5 MiB trimmed to 1 MiB vs the same 5 MiB forwarded\n")
        lines.append("| | req/s | p99 ms | CPU µs/req | peak RSS MiB |")
        lines.append("|---|---:|---:|---:|---:|")
        for label, rows in (("forward (untrimmed)", fwd_rows), ("trim route", trim_rows)):
            lines.append(f"| {label} | {fmt(med([r['rps'] for r in rows]))} | "
                         f"{fmt(med([r['p99_ms'] for r in rows]), 2)} | "
                         f"{fmt(med([r['cpu_us_per_req'] for r in rows]))} | "
                         f"{fmt(max(r['hwm_kib'] for r in rows) / 1024, 1)} |")
        lines.append(f"\nCPU per request, trim ÷ forward (median of per-repetition ratios): "
                     f"**{fmt(trim_ratio, 2, '×')}** (per repetition: "
                     f"{', '.join(f'{x:.2f}' for x in per)})\n")

    if checks:
        lines.append("### Correctness checks (tries that got the expected answer)\n")
        cts = [t for t in targets if any(t in v for v in checks.values())]
        lines.append("| check | " + " | ".join(TARGET_LABEL[t] for t in cts) + " |")
        lines.append("|---|" + "---:|" * len(cts))
        for name, per in checks.items():
            cells = []
            for t in cts:
                c = per.get(t)
                if not c:
                    cells.append("—")
                    continue
                cell = f"{c['ok']}/{c['tries']}"
                other = {k: v for k, v in c["seen"].items() if k != c.get("want", "413")}
                if other:
                    cell += " (" + ", ".join(f"{k}×{v}" for k, v in other.items()) + ")"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if any(name.startswith("receiver (a)") for name in checks):
            lines.append("Receiver (a) is `bench_receiver --mode reset-413 --limit 1MiB`: it answers "
                         "`413` with its own JSON body from the request head (a chunked body is "
                         "refused unread too) and closes at once, so its kernel resets the "
                         "connection. A try counts only when the sender gets that status and that "
                         "body; in brackets, every other outcome, and a complete answer followed by "
                         "a curl error. \"no status, curl (55) Send failure\" means curl's upload "
                         "failed (the peer closed or reset) and curl, which does not read after a "
                         "failed send, saw no status: a response may still have been in its socket "
                         "(for the direct receiver it is: the receiver always writes its 413 "
                         "first).\n")

    # targets
    per_rep: dict = {}
    if trim_ratio is not None:
        per_rep[trim_ratio] = trim_per

    def v(wl, t, ref, key="rps", invert=False):
        x, rs = ratio_per_rep(results, wl, t, ref, key, reps, invert)
        per_rep[x] = rs
        return x

    pg = "payload-guard"

    def verdict(text, x, shown, ok):
        if x is None:
            verdicts.append(f"- [not measured] {text}")
        else:
            rs = per_rep.get(x) if isinstance(x, float) else None
            extra = f" (per repetition: {', '.join(f'{r:.2f}' for r in rs)})" if rs and len(rs) > 1 else ""
            mark = "info" if ok is None else ("met" if ok else "MISSED")
            verdicts.append(f"- [{mark}] {text}: {shown}{extra}")

    # CPU the proxy process spends per request (user + kernel, /proc), as ratios to the other
    # proxies measured in the same repetition. nginx and HAProxy write no access log here, so
    # they are compared like for like with payload-guard's quiet configuration; the cost of
    # payload-guard's default access line is judged on its own.
    cpu = "cpu_us_per_req"
    quiet = "payload-guard-quiet"
    if "haproxy" in have:
        x = v("2k", quiet, "haproxy", cpu)
        verdict("2 KiB CPU/req ≤ 1.0× HAProxy's (RUST_LOG=warn; no access log on either)", x,
                fmt(x, 2, "×"), x is not None and x <= 1.0)
        x = v("2k", pg, "haproxy", cpu)
        verdict("2 KiB CPU/req ≤ 1.0× HAProxy's, default logging (informational)", x, fmt(x, 2, "×"),
                x is not None and x <= 1.0)
        for wl, label in (("1m", "1 MiB"), ("5m", "5 MiB")):
            x = v(wl, pg, "haproxy", cpu)
            verdict(f"{label} CPU/req ≤ 0.9× HAProxy's", x, fmt(x, 2, "×"), x is not None and x <= 0.9)
    # The floor: how much of payload-guard's CPU is hyper and tokio themselves (no target).
    if FLOOR in have:
        x = v("2k", quiet, FLOOR, cpu)
        verdict("2 KiB CPU/req ÷ the bare hyper proxy's (RUST_LOG=warn; informational)", x,
                fmt(x, 2, "×"), None)
        if "haproxy" in have:
            x = v("2k", FLOOR, "haproxy", cpu)
            verdict("the bare hyper proxy's 2 KiB CPU/req ÷ HAProxy's (what hyper itself allows; "
                    "informational)", x, fmt(x, 2, "×"), None)
            x = v("1m", FLOOR, "haproxy", cpu)
            verdict("the bare hyper proxy's 1 MiB CPU/req ÷ HAProxy's (informational)", x,
                    fmt(x, 2, "×"), None)
    if "nginx" in have:
        x = v("2k", quiet, "nginx", cpu)
        verdict("2 KiB CPU/req ≤ 1.1× nginx's (RUST_LOG=warn; no access log on either)", x,
                fmt(x, 2, "×"), x is not None and x <= 1.1)
        x = v("2k", pg, "nginx", "p99_ms")
        verdict("2 KiB p99 ≤ nginx's", x, fmt(x, 2, "× nginx's p99"), x is not None and x <= 1.0)
    x = v("2k", pg, quiet, cpu)
    verdict("default logging (one INFO access line per request) costs ≤ 10% of the 2 KiB CPU/req",
            x, f"+{(x - 1) * 100:.1f}% over RUST_LOG=warn" if x is not None else "—",
            x is not None and x <= 1.10)
    x = v("upload", pg, "direct", "time_s")
    verdict("200 MiB upload time ≤ 1.15× direct (medians; each upload paired with a direct one)",
            x, fmt(x, 2, "×"), x is not None and x <= 1.15)
    if FLOOR in have:
        x = v("upload", FLOOR, "direct", "time_s")
        verdict("the bare hyper proxy's 200 MiB upload time ÷ direct (what hyper itself allows; "
                "informational)", x, fmt(x, 2, "×"), None)
    hw = [results[("upload", pg, r)]["hwm_kib"] for r in range(reps) if ("upload", pg, r) in results]
    x = max(hw) / 1024 if hw else None
    verdict("200 MiB upload peak RSS ≤ 16 MiB", x, fmt(x, 1, " MiB"), x is not None and x <= 16)
    verdict("trim route 5 MiB→1 MiB CPU/req ≤ 1.5× forwarding the same 5 MiB", trim_ratio,
            fmt(trim_ratio, 2, "×"), trim_ratio is not None and trim_ratio <= 1.5)
    hw = [results[("5m-trim", pg, r)]["hwm_kib"] for r in range(reps) if ("5m-trim", pg, r) in results]
    x = max(hw) / 1024 if hw else None
    verdict("trim route peak RSS, 8 concurrent 5 MiB payloads ≤ 40 MiB", x, fmt(x, 1, " MiB"),
            x is not None and x <= 40)
    if checks:
        per = [c for per in checks.values() for t, c in per.items() if t == pg]
        ok = sum(c["ok"] for c in per)
        n = sum(c["tries"] for c in per)
        verdict("payload-guard correctness checks 100%", n or None, f"{ok}/{n}", n > 0 and ok == n)
    errs = sum(r["non2xx"] + r["socket_errors"] for (w, t, _), r in results.items() if t.startswith(pg))
    verdict("payload-guard: no error answers under load", errs, f"{errs} errors", errs == 0)

    return "\n".join(lines), verdicts


def short_version(text: str) -> str:
    for cut in (" (", " [", " - ", " Copyright"):
        text = text.split(cut)[0]
    return text


def render(saved: dict) -> str:
    """The markdown report of a run saved as JSON (see --json and --report)."""
    meta, checks = saved["meta"], saved["checks"]
    a = meta["args"]
    results = {(r["workload"], r["target"], r["rep"]): r for r in saved["results"]}
    for r in results.values():
        if "times" in r:
            r.setdefault("best_s", min(r["times"]))
    table, verdicts = report(results, meta["workloads"], meta["targets"], checks, a["reps"], meta)
    m = meta["machine"]
    bgs = [r["background_cores"] for r in results.values()]
    steal = [r["steal_cores"] for r in results.values()]
    header = [
        f"Run {meta['date']}, {a['reps']} repetition(s), wrk runs of {a['duration']} s after a "
        f"{a['warmup']} s warm-up, {a['uploads']} upload(s) per repetition, {a['tries']} tries per "
        f"check; took {meta['elapsed_s'] / 60:.1f} min.",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, "
        f"load average at start {' '.join(m['loadavg_at_start'])}, at end {' '.join(m['loadavg_at_end'])}.",
        (f"Shared machine: CPU used by processes this run did not start, during the measurements: "
         f"median {statistics.median(bgs):.2f} cores, max {max(bgs):.2f} cores (of {m['nproc']}); "
         f"steal median {statistics.median(steal):.2f} cores.") if bgs else "",
        "Versions: " + "; ".join(f"{k}: {short_version(v)}" for k, v in meta["versions"].items() if v),
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(header) + "\n" + table + "\n### Targets\n\n" + "\n".join(verdicts) + "\n"


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 2 s runs, 3 tries per check")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up per run (default 1)")
    ap.add_argument("--tries", type=int, help="tries per correctness check (default 20; --quick 3)")
    ap.add_argument("--uploads", type=int, help="200 MiB uploads per measurement, median taken "
                    "(default 9; --quick 1)")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated subset")
    ap.add_argument("--workloads", default="2k,1m,5m,5m-trim,upload", help="comma-separated subset")
    ap.add_argument("--no-checks", action="store_true", help="skip the correctness checks")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--target-dir", help="cargo target dir (default $CARGO_TARGET_DIR or target/)")
    ap.add_argument("--fixture", help="Synthflow payload to take the shape from")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--receiver-threads", type=int, default=1)
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (payloads, logs)")
    ap.add_argument("--report", metavar="JSON", help="only print the report of a run saved with --json")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            text = render(json.load(f))
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    args.reps = args.reps or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 5)
    args.tries = args.tries or (3 if args.quick else 20)
    args.uploads = args.uploads or (1 if args.quick else 9)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    tools, targets = check_tools([t for t in args.targets.split(",") if t])
    pg_bin, recv_bin, floor_bin = build(args)
    run_dir = tempfile.mkdtemp(prefix="payload-guard-load-")
    log(f"run directory {run_dir}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": {
            "payload-guard": version_of([pg_bin, "--version"]),
            "git": version_of(["git", "-C", REPO, "describe", "--always", "--dirty"]),
            "nginx": version_of([tools["nginx"], "-v"]) if tools["nginx"] else None,
            "haproxy": version_of([tools["haproxy"], "-v"]) if tools["haproxy"] else None,
            "wrk": version_of(["wrk", "-v"]),
            "curl": version_of(["curl", "--version"]),
        },
        "args": vars(args),
        "command": " ".join([os.path.basename(sys.executable)] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }
    try:
        # payloads, generated into the run directory (never committed)
        fixture = load_fixture(args.fixture)
        pay = os.path.join(run_dir, "payloads")
        os.makedirs(pay)

        def write(name, data):
            path = os.path.join(pay, name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        log("generating payloads")
        files = {
            "2k": [write("2k.json", synthflow_payload(fixture, 2 * KIB, args.seed))],
            "1m": [write("1m.json", synthflow_payload(fixture, MIB, args.seed + 1))],
            "5m": [write(f"5m-{i}.json", synthflow_payload(fixture, 5 * MIB, args.seed + 10 + i))
                   for i in range(4)],
        }
        rng = random.Random(args.seed)
        block = rng.randbytes(MIB)
        for name, size in (("upload", 200 * MIB), ("40m", 40 * MIB), ("8m", 8 * MIB)):
            path = os.path.join(pay, f"{name}.bin")
            with open(path, "wb") as f:
                for _ in range(size // MIB):
                    f.write(block)
            files[name] = path

        workloads = [
            {"name": "2k", "title": "2 KiB JSON POSTs (wrk -t1 -c32)", "kind": "wrk", "path": "/bench",
             "files": files["2k"], "conns": 32, "targets": ALL_TARGETS},
            {"name": "1m", "title": "1 MiB JSON POSTs (wrk -t1 -c32)", "kind": "wrk", "path": "/bench",
             "files": files["1m"], "conns": 32, "targets": LOUD_TARGETS},
            {"name": "5m", "title": "5 MiB Synthflow payloads forwarded untrimmed (wrk -t1 -c8)",
             "kind": "wrk", "path": "/bench", "files": files["5m"], "conns": 8, "targets": PRODUCT_TARGETS},
            {"name": "5m-trim", "title": "5 MiB Synthflow payloads on the trim route to a 1 MiB receiver (wrk -t1 -c8)",
             "kind": "wrk", "path": "/trim", "files": files["5m"], "conns": 8, "targets": ["payload-guard"]},
            {"name": "upload", "title": f"200 MiB upload (curl -T, Content-Length, no Expect; median of {args.uploads} per repetition, each paired with one straight to the receiver)",
             "kind": "curl", "path": "/upload", "file": files["upload"], "small": files["2k"][0],
             "size": 200 * MIB, "targets": LOUD_TARGETS},
        ]
        chosen = set(args.workloads.split(","))
        workloads = [w for w in workloads if w["name"] in chosen]

        bench = Bench(args, tools, pg_bin, recv_bin, floor_bin, run_dir)
        bench.start_receivers()
        results: dict = {}
        for rep in range(args.reps):
            for wl in workloads:
                for target in [t for t in targets if t in wl["targets"]]:
                    res = measure(bench, target, wl, args)
                    results[(wl["name"], target, rep)] = res
                    if wl["kind"] == "wrk":
                        log(f"rep {rep + 1}/{args.reps} {wl['name']:8s} {target:14s} "
                            f"{res['rps']:10.1f} req/s  p99 {fmt(res['p99_ms'], 2)} ms  "
                            f"cpu {fmt(res['cpu_us_per_req'])} µs/req  hwm {fmt((res['hwm_kib'] or 0) / 1024, 1)} MiB"
                            f"  non2xx {res['non2xx']} sockerr {res['socket_errors']}"
                            f"  background {res['background_cores']:.2f} cores")
                    else:
                        log(f"rep {rep + 1}/{args.reps} {wl['name']:8s} {target:14s} "
                            f"{res['time_s']:.3f} s  status {res['status']}  "
                            f"cpu {fmt((res['cpu_us_per_req'] or 0) / 1000)} ms/upload  hwm {fmt((res['hwm_kib'] or 0) / 1024, 1)} MiB"
                            f"  background {res['background_cores']:.2f} cores")
        checks = {} if args.no_checks else run_checks(
            bench, [t for t in targets if t != FLOOR], files, args.tries)
        meta["elapsed_s"] = time.monotonic() - started
        meta["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
        meta["targets"] = targets
        meta["workloads"] = [{k: w[k] for k in ("name", "title", "kind", "targets")} for w in workloads]
        saved = {"meta": meta, "checks": checks,
                 "results": [{"workload": w, "target": t, "rep": r,
                              **{k: v for k, v in res.items() if k != "raw"}}
                             for (w, t, r), res in results.items()]}
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(saved, f, indent=1)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(saved, f, indent=1)
        text = render(saved)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    finally:
        PROCS.stop_all()
        if args.keep:
            log(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
