"""First apply on fresh engines (issue 13, point 5).

Starts `parallax hub` + N engines (Parallax engines with and without the
background import warm-up, and stock ipengine for reference), connects the
stock Client, and times the first `rc[:].apply_sync(lambda: 1)` right after
the engines registered, then a second one; also the engines' idle memory.

    PARALLAX_BIN=target/release/parallax .venv/bin/python bench/first_apply.py [--rounds 3] [--engines 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from interop.harness import HubCluster  # noqa: E402

BIN = os.environ.get("PARALLAX_BIN") or str(REPO / "target" / "release" / "parallax")


def one_round(kind: str, n: int, idle: float) -> tuple[float, float, float]:
    cmd = [] if kind == "ipengine" else [BIN, "engine"]
    args = ["--warm-imports=false"] if kind == "parallax-cold" else []
    c = HubCluster(Path(tempfile.mkdtemp()), engines=n, label=kind, engine_cmd=cmd,
                   engine_args=args)
    c.start()
    try:
        rc = c.client
        time.sleep(idle)
        t0 = time.perf_counter()
        rc[:].apply_sync(lambda: 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        rc[:].apply_sync(lambda: 1)
        second = time.perf_counter() - t0
        time.sleep(1.0)
        rss = 0
        for p in c.engines:
            procs = [psutil.Process(p.popen.pid)] + psutil.Process(p.popen.pid).children(True)
            rss += sum(q.memory_info().rss for q in procs)
        return first * 1e3, second * 1e3, rss / n / 2**20
    finally:
        c.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--idle", type=float, default=0.0,
                    help="seconds between registration and the first apply")
    a = ap.parse_args()
    print(f"{a.engines} engines, first apply {a.idle:.1f} s after registration, "
          f"{a.rounds} rounds (medians)")
    print(f"{'engines':16} {'first ms':>9} {'second ms':>10} {'RSS/engine MiB':>15}")
    for kind in ("parallax-cold", "parallax-warm", "ipengine"):
        rows = []
        while len(rows) < a.rounds:
            try:
                rows.append(one_round(kind, a.engines, a.idle))
            except Exception as e:  # noqa: BLE001
                # the stock Client can miss a registration notification
                # racing its connection_reply (engines register in ~50 ms)
                print(f"  (round retried: {str(e).splitlines()[0][:100]})", flush=True)
        med = [statistics.median(col) for col in zip(*rows)]
        print(f"{kind:16} {med[0]:9.1f} {med[1]:10.1f} {med[2]:15.1f}", flush=True)


if __name__ == "__main__":
    main()
