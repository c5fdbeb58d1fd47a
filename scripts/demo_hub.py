#!/usr/bin/env python3
"""`make run` demo: an ipyparallel cluster made of `parallax hub` and
`parallax engine`s.

Starts the hub and 4 Parallax engines through ipyparallel's own `Cluster`
(controller and engine launcher commands set to `parallax hub` and
`parallax engine`), runs the tutorial's first steps with the stock Client,
prints what comes back, and stops everything.
"""

import os
import socket
import sys
import tempfile
import time

import ipyparallel as ipp

PARALLAX = os.environ.get("PARALLAX_BIN") or os.path.abspath("target/release/parallax")
N = int(os.environ.get("PARALLAX_ENGINES", "4"))


def where():
    import os
    import socket

    return f"pid {os.getpid()} on {socket.gethostname()}"


def main() -> int:
    profile = tempfile.mkdtemp(prefix="parallax-demo-")
    cluster = ipp.Cluster(n=N, profile_dir=profile, cluster_id="demo", log_level=30)
    cluster.config.LocalControllerLauncher.controller_cmd = [PARALLAX, "hub"]
    cluster.config.LocalEngineSetLauncher.engine_cmd = [PARALLAX, "engine", f"--python={sys.executable}"]
    t0 = time.perf_counter()
    with cluster as rc:
        rc.wait_for_engines(N, timeout=60)
        print(f"cluster of {N} engines ready in {time.perf_counter() - t0:.2f} s "
              f"({PARALLAX} hub + {N} x {PARALLAX} engine)")
        print("engine ids:", rc.ids)
        dv = rc[:]
        for eid, w in zip(rc.ids, dv.apply_sync(where)):
            print(f"  engine {eid}: {w}")
        dv.execute("import math; rank = None", block=True)
        dv.scatter("rank", rc.ids, flatten=True, block=True)
        print("rank on each engine:", dv["rank"])
        lv = rc.load_balanced_view()
        squares = lv.map_sync(lambda x: x * x, range(16))
        print("load-balanced squares:", squares)
        ar = dv.execute("print(f'hello from engine {rank}')", block=True)
        for eid, out in zip(rc.ids, ar.stdout):
            print(f"[stdout:{eid}] {out}", end="")
        t1 = time.perf_counter()
        n = 1000
        lv.map_sync(lambda x: x, range(n))
        dt = time.perf_counter() - t1
        print(f"{n} load-balanced tasks in {dt:.2f} s ({n / dt:.0f} tasks/s)")
        print("queue status:", rc.queue_status())
    print("cluster stopped on", socket.gethostname())
    return 0


if __name__ == "__main__":
    sys.exit(main())
