#!/usr/bin/env python3
"""Instructions per request under callgrind: issue #15's ratios in a measure the host does not move.

run.py measures CPU time, which on these shared virtual machines moves with the host: on one host
HAProxy took 13 µs per 2 KiB request, on the next 27, and user time rose more than kernel time, so
ratios between workloads of different user/kernel mixes (the trim route against forwarding, the
access line) changed with the host while the code did not. This script counts the instructions
the proxy process executes in user space (valgrind's callgrind), which do not depend on the host
(on one binary they move from run to run only with how reads and wakes fall: about 2% for the
floor, 0.3% for payload-guard; the median of --reps runs is used), and reports the ratios #15 is
about:

  2 KiB    payload-guard (RUST_LOG=warn) ÷ the bare hyper proxy (examples/bare_hyper_proxy, the
           least a proxy on hyper spends), and the default access line (no RUST_LOG) ÷ quiet;
  5 MiB    what the trim route (5 MiB Synthflow payloads trimmed for a 1 MiB receiver) spends
           beyond forwarding the same payloads untrimmed, per payload byte, both quiet. Not a
           ratio: forwarding is nearly all kernel work, a few hundred thousand instructions of
           user space for 5 MiB, so trim ÷ forward in instructions is over 100×.

Each measurement starts the proxy under callgrind, sends warm-up requests on one keep-alive
connection, zeroes the counters (callgrind_control -z), sends the measured requests on the same
connection, dumps the counters (callgrind_control -d) and stops the proxy. The client is this
script (Python's http.client), outside the count. What it does not see: kernel time (about half
of a 2 KiB request's CPU on these machines, and most of forwarding 5 MiB), and the cost of an
instruction (cache misses, SIMD width: valgrind has no AVX-512, so the string scan runs its AVX2
variant here). It is a measure to decide targets by, next to run.py's, not a replacement.

Needs: python3, cargo, valgrind (apt-get install -y valgrind). Builds like run.py unless
--no-build:

    python3 benches/load/instructions.py              # 2,000 small and 20 large requests each
    python3 benches/load/instructions.py --no-build --small 500 --large 8
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the load benchmark: payloads, builds, receivers, processes)

# Starting under valgrind reads the binary's line tables first: seconds, not milliseconds.
START_TIMEOUT_S = 120.0
# Each measurement's callgrind files get their own name (so its one dump is OUT.1).
RUN_NUMBER = itertools.count(1)


def callgrind_total(path: str) -> int:
    """The instruction count of a callgrind dump (its `summary:` or `totals:` line)."""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"{path}: no summary line")


def post_all(port: int, path: str, bodies: list[bytes], count: int, conn=None):
    """Sends `count` POSTs (cycling through `bodies`) on one keep-alive connection; every
    answer must be 200. Returns the connection, to go on with it."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(count):
        conn.request("POST", path, bodies[i % len(bodies)], {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: {resp.status} (request {i + 1} of {count})")
    return conn


def measure(bench: run.Bench, valgrind: str, label: str, argv: list[str], env: dict, port: int,
            path: str, bodies: list[bytes], warmup: int, count: int) -> dict:
    """Instructions per request of the proxy started by `argv`, listening on `port`."""
    out = os.path.join(bench.run_dir, f"{label.replace(' ', '-')}.{next(RUN_NUMBER)}.callgrind")
    err = open(os.path.join(bench.run_dir, f"{label}.log"), "ab")
    p = run.PROCS.start([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"] + argv,
                        stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        run.wait_port(port, p, timeout=START_TIMEOUT_S)
        conn = post_all(port, path, bodies, warmup)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        conn = post_all(port, path, bodies, count, conn)
        # The first dump of a run goes to OUT.1 (callgrind_control returns once it is written).
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
        conn.close()
        total = callgrind_total(f"{out}.1")
    finally:
        run.PROCS.stop(p)
        err.close()
    per_request = total / count
    run.log(f"{label:26s} {per_request:12,.0f} instructions a request ({count} requests)")
    return {"label": label, "requests": count, "instructions": total, "per_request": per_request}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=2000, help="measured 2 KiB requests (default 2000)")
    ap.add_argument("--large", type=int, default=20, help="measured 5 MiB requests (default 20)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each measurement (default 3)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--target-dir", help="cargo target dir (default $CARGO_TARGET_DIR or target/)")
    ap.add_argument("--fixture", help="Synthflow payload to take the shape from")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.receiver_threads = 1
    valgrind = shutil.which("valgrind")
    if not valgrind or not shutil.which("callgrind_control"):
        raise SystemExit("valgrind is missing (install: apt-get install -y valgrind)")
    if min(args.small, args.large, args.reps) < 1:
        raise SystemExit("--small, --large and --reps must be at least 1")

    pg_bin, recv_bin, floor_bin = run.build(args)
    run_dir = tempfile.mkdtemp(prefix="payload-guard-instructions-")
    try:
        fixture = run.load_fixture(args.fixture)
        small = [run.synthflow_payload(fixture, 2 * run.KIB, args.seed)]
        large = [run.synthflow_payload(fixture, 5 * run.MIB, args.seed + 10 + i) for i in range(4)]
        bench = run.Bench(args, {}, pg_bin, recv_bin, floor_bin, run_dir)
        bench.start_receivers()
        base = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        quiet = dict(base, RUST_LOG="warn")

        def pg(label, env, path, bodies, warmup, count):
            port = run.free_port()
            cfg = bench.render("payload-guard.toml.tmpl", f"{label}.toml", bench.values(port))
            return measure(bench, valgrind, label, [pg_bin, "--config", cfg, "run"], env, port,
                           path, bodies, warmup, count)

        def floor(label, env, path, bodies, warmup, count):
            port = run.free_port()
            return measure(bench, valgrind, label,
                           [floor_bin, "--listen", f"127.0.0.1:{port}",
                            "--upstream", f"127.0.0.1:{bench.recv['main']}"],
                           env, port, path, bodies, warmup, count)

        plan = [
            (floor, "floor 2k", base, "/bench", small, 200, args.small),
            (pg, "payload-guard 2k quiet", quiet, "/bench", small, 200, args.small),
            (pg, "payload-guard 2k default", base, "/bench", small, 200, args.small),
            (pg, "payload-guard 5m forward", quiet, "/bench", large, 4, args.large),
            (pg, "payload-guard 5m trim", quiet, "/trim", large, 4, args.large),
        ]
        # Interleaved repetitions; the median of each is used. The count of one binary moves
        # from run to run only with how reads and wakes fall (about 2% for the floor, 0.3% for
        # payload-guard), not with the host.
        runs: dict[str, list[float]] = {label: [] for _, label, *_ in plan}
        for _ in range(args.reps):
            for start, label, *rest in plan:
                runs[label].append(start(label, *rest)["per_request"])
        rows = [{"label": label, "requests": count, "per_request": statistics.median(values),
                 "min": min(values), "max": max(values), "runs": values}
                for (_, label, _, _, _, _, count), values in zip(plan, runs.values())]
        floor_2k, quiet_2k, default_2k, forward_5m, trim_5m = rows

        ratios = {
            "2k quiet / floor": quiet_2k["per_request"] / floor_2k["per_request"],
            "2k access line (default / quiet)": default_2k["per_request"] / quiet_2k["per_request"],
        }
        # Forwarding 5 MiB is nearly all kernel work (copies between sockets), so a ratio of
        # user-space instructions between the two routes says little; what the trim route adds
        # is per byte of payload.
        extra_per_byte = (trim_5m["per_request"] - forward_5m["per_request"]) / (5 * run.MIB)
        git = run.version_of(["git", "-C", run.REPO, "describe", "--always", "--dirty"])
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        lines = [f"Instructions per request in user space (callgrind), git {git}, {date}, "
                 f"{args.reps} run(s) of each:", "",
                 "| measurement | requests a run | instructions a request (median) | min–max |",
                 "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['requests']} | {r['per_request']:,.0f} | "
                  f"{r['min']:,.0f}–{r['max']:,.0f} |" for r in rows]
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f}× |" for k, v in ratios.items()]
        lines += [f"| 5m trim route beyond forwarding, instructions a payload byte | {extra_per_byte:.2f} |"]
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"git": git, "date": date, "rows": rows, "ratios": ratios,
                           "trim_extra_per_byte": extra_per_byte}, f, indent=1)
        return 0
    finally:
        run.PROCS.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
