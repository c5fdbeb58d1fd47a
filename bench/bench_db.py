#!/usr/bin/env python3
"""Task database benchmark (issue 14): load-balanced throughput and hub memory
per task database, the stock ipyparallel Client driving every hub.

Configurations (each a fresh hub in a fresh profile, 2 engines):

  parallax --dictdb | --nodb | --sqlitedb   ($PARALLAX_BIN hub)
  ipcontroller --dictdb | --sqlitedb        (with --include-ipcontroller)

Engines: Parallax engines for every hub (``--engine-kind ipengine`` for stock
ones), so only the hub and its database differ. Workload per round:
``lview.map_async(noop, range(N), chunksize=1)`` then wait -> tasks/s. The
clusters are up side by side and the rounds alternate between them, so the
noise of a shared machine hits all alike. Hub memory: RSS of the hub process
(ipcontroller: its whole process tree, which forks schedulers) after the
rounds. The markdown table goes to stdout.

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_db.py \
        [--tasks 3000] [--rounds 3] [--include-ipcontroller] [--million [N]]

``--million`` adds the hub-bound run: N (default 1,000,000) load-balanced
tasks through each Parallax hub's task scheduler from the Rust load
generator (``parallax bench engines -n 16 --tasks N``: fake engines that
answer at once, so the hub and its database set the pace, not Python), every
reply counted (0 lost) and the hub's RSS sampled every N/10 tasks (flat
memory). The stock Client cannot push a million tasks in reasonable time
(~500/s), so ipcontroller is not in this part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def noop(x):
    return x


class Cluster:
    def __init__(self, label, hub_cmd, db_args, engine_cmd, root):
        self.label = label
        self.dir = Path(tempfile.mkdtemp(prefix="db-", dir=root))
        self.profile = self.dir / "profile"
        self.profile.mkdir()
        self.cid = f"db{uuid.uuid4().hex[:8]}"
        common = [f"--profile-dir={self.profile}", f"--cluster-id={self.cid}"]
        self.hub = subprocess.Popen(
            hub_cmd + common + ["--ip=127.0.0.1", "--log-level=WARN"] + db_args,
            stdout=open(self.dir / "hub.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client_file = self.profile / "security" / f"ipcontroller-{self.cid}-client.json"
        deadline = time.monotonic() + 60
        while not client_file.exists():
            if self.hub.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label}: hub did not start: {(self.dir / 'hub.log').read_text()}")
            time.sleep(0.05)
        self.engines = [
            subprocess.Popen(
                engine_cmd + common + ["--log-level=WARN"],
                stdout=open(self.dir / f"engine{i}.log", "wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for i in range(2)
        ]
        import ipyparallel as ipp

        self.rc = ipp.Client(profile_dir=str(self.profile), cluster_id=self.cid, timeout=30)
        self.rc.wait_for_engines(2, timeout=60)
        self.lview = self.rc.load_balanced_view()
        self.lview.map_async(noop, range(50), chunksize=1).get(60)

    def round(self, n):
        t0 = time.perf_counter()
        self.lview.map_async(noop, range(n), chunksize=1).get(60 + n / 50)
        dt = time.perf_counter() - t0
        self.rc.purge_local_results("all")
        return n / dt

    def hub_rss_mib(self):
        p = psutil.Process(self.hub.pid)
        procs = [p] + p.children(recursive=True)
        return sum(q.memory_info().rss for q in procs) / 2**20

    def stop(self):
        try:
            self.rc.close()
        except Exception:
            pass
        for p in self.engines + [self.hub]:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--include-ipcontroller", action="store_true")
    ap.add_argument("--engine-kind", choices=["parallax", "ipengine"], default="parallax")
    ap.add_argument("--million", type=int, nargs="?", const=1_000_000, default=0,
                    help="also push N load-balanced tasks through each Parallax hub (default 1,000,000)")
    args = ap.parse_args()
    binary = os.environ.get("PARALLAX_BIN", str(REPO / "target/release/parallax"))
    if args.million:
        million(binary, args.million)
    if args.engine_kind == "parallax":
        engine = [binary, "engine", f"--python={sys.executable}"]
    else:
        engine = [str(VENV_BIN / "ipengine")]
    configs = [
        ("parallax --dictdb", [binary, "hub"], ["--dictdb"]),
        ("parallax --nodb", [binary, "hub"], ["--nodb"]),
        ("parallax --sqlitedb", [binary, "hub"], ["--sqlitedb"]),
    ]
    if args.include_ipcontroller:
        ipc = [str(VENV_BIN / "ipcontroller")]
        configs += [
            ("ipcontroller --dictdb", ipc, ["--dictdb"]),
            ("ipcontroller --sqlitedb", ipc, ["--sqlitedb"]),
        ]
    root = Path(tempfile.mkdtemp(prefix="parallax-bench-db-"))
    clusters = []
    try:
        for label, hub, db in configs:
            print(f"starting {label}", file=sys.stderr)
            clusters.append(Cluster(label, hub, db, engine, root))
        rates = {c.label: [] for c in clusters}
        for r in range(args.rounds):
            order = clusters if r % 2 == 0 else clusters[::-1]
            for c in order:
                n = args.tasks if c.label.startswith("parallax") else max(500, args.tasks // 6)
                rate = c.round(n)
                rates[c.label].append(rate)
                print(f"round {r}: {c.label}: {rate:.0f} tasks/s ({n} tasks)", file=sys.stderr)
        base = statistics.median(rates["parallax --dictdb"])
        print(f"| hub and task database | tasks/s (median of {args.rounds}) | vs parallax --dictdb | hub RSS after (MiB) |")
        print("|---|---|---|---|")
        for c in clusters:
            m = statistics.median(rates[c.label])
            print(f"| {c.label} | {m:.0f} | {m / base:.2f}x | {c.hub_rss_mib():.1f} |")
    finally:
        for c in clusters:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


def million(binary, n):
    """N tasks through each Parallax hub from the load generator."""
    import json

    rows = []
    for db in ("--dictdb", "--nodb", "--sqlitedb"):
        print(f"{n} load-balanced tasks through parallax hub {db}", file=sys.stderr)
        r = subprocess.run(
            [binary, "bench", "engines", "-n", "16", "--rounds", "1", "--idle", "0",
             "--tasks", str(n), f"--hub-arg={db}", "--json"],
            capture_output=True, text=True, timeout=max(600, n / 500),
        )
        if r.returncode != 0:
            raise SystemExit(f"parallax bench engines ({db}) failed:\n{r.stdout}{r.stderr}")
        t = json.loads(r.stdout)["tasks"]
        rss = [m for _, m in t["hub_rss_mib"]]
        rows.append((db, t, rss))
    base = rows[0][1]["per_second"]
    print(f"| parallax hub, {n:,} load-balanced tasks | tasks/s | vs --dictdb | replies (lost) | hub CPU µs/task | hub RSS at 10% → 100% (min–max) MiB |")
    print("|---|---|---|---|---|---|")
    for db, t, rss in rows:
        print(f"| {db} | {t['per_second']:.0f} | {t['per_second'] / base:.2f}x | {t['replies']:,} ({n - t['replies']}) "
              f"| {t.get('hub_cpu_us_per_task', float('nan')):.0f} | {rss[0]:.1f} → {rss[-1]:.1f} ({min(rss):.1f}–{max(rss):.1f}) |")
    print()


if __name__ == "__main__":
    main()
