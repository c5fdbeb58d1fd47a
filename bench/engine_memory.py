"""Engine memory and first-apply latency (issue 11, "engines stay light").

For each N in --engines: ``parallax cluster start -n N --daemonize`` (local
engines, or ``--launcher mpi``: mpiexec's ranks, which share a host
zygote; ``--zygote on|off`` picks forked interpreters or one spawned Python
per engine), the stock Client, then

* the first ``dv.apply_sync(os.getpid)`` right after all engines registered
  (``--idle`` seconds later), timed;
* PSS (``/proc/PID/smaps_rollup``) of the engine processes (Rust), their
  Python interpreters and the zygote (when there is one), per engine;
* five more applies (``dv.apply_sync(f, x)`` with a small list argument),
  then PSS again.

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/engine_memory.py \
        --engines 16,64 --zygote on,off --rounds 3

Prints one line per run and a markdown table of medians (min–max) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("PARALLAX_BIN") or REPO / "target/release/parallax").resolve()
VENV_BIN = Path(sys.executable).parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def zygote_pid(profile: Path) -> int | None:
    """The cluster's zygote: `… --parallax-zygote SOCKET --owner <cluster file>`.
    The interpreters it forked carry the same command line; the zygote is
    the one whose parent is not one of them."""
    found = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        a = p.info["cmdline"] or []
        if "--parallax-zygote" in a and any(str(profile) in x for x in a):
            found[p.info["pid"]] = p.info["ppid"]
    roots = [pid for pid, ppid in found.items() if ppid not in found]
    return roots[0] if roots else None


def memory(profile: Path, n: int) -> dict:
    """PSS per engine of the engine processes (Rust), their interpreters and
    the zygotes. The cluster file names local engines' pids, or a launcher's
    (mpiexec): the engines are then the `parallax engine` processes below
    it. A host zygote is a child of the engine that started it."""
    top = []
    for f in (profile / "security").glob("cluster-*.json"):
        d = json.loads(f.read_text())

        def walk(v):
            if isinstance(v, dict):
                if isinstance(v.get("pid"), int) and v["pid"] > 0:
                    top.append(v["pid"])
                for x in v.values():
                    walk(x)

        walk(d.get("engines", {}))
    engines, below = [], set()
    for pid in top:
        for q in [pid] + descendants(pid):
            try:
                a = psutil.Process(q).cmdline()
            except psutil.Error:
                continue
            if len(a) > 1 and Path(a[0]).name.startswith("parallax") and a[1] == "engine":
                engines.append(q)
    for e in engines:
        below |= set(descendants(e))
    zygotes = set()
    local = zygote_pid(profile)
    if local:
        zygotes.add(local)
        below |= set(descendants(local))
    for q in below:
        try:
            p = psutil.Process(q)
            if "--parallax-zygote" in p.cmdline() and p.ppid() in engines:
                zygotes.add(q)  # a host zygote
        except psutil.Error:
            pass
    py_pids = below - zygotes - set(engines)
    rust = sum(pss_kib(p) for p in engines)
    zyg = sum(pss_kib(p) for p in zygotes)
    py = sum(pss_kib(p) for p in py_pids)
    mib = 1024.0
    return {
        "engines": len(engines), "pythons": len(py_pids), "zygotes": len(zygotes),
        "rust_mib": rust / mib / n, "python_mib": py / mib / n, "zygote_mib": zyg / mib / n,
        "total_mib": (rust + py + zyg) / mib / n,
    }


def f(x):
    return [v * 2 for v in x]


def one(n: int, zygote: str, idle: float, timeout: float, launcher: str = "local") -> dict:
    root = Path(tempfile.mkdtemp(prefix="plx-mem-"))
    profile = root / "profile"
    profile.mkdir()
    env = dict(os.environ, IPYTHONDIR=str(root / "ipython"))
    if launcher == "mpi":
        # OpenMPI refuses root unless told, and more ranks than cores
        env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(BIN), "cluster", "start", "-n", str(n), "--daemonize",
           f"--profile-dir={profile}", f"--timeout={timeout}",
           f"--engines={launcher}", f"--engine-args=--python={VENV_BIN / 'python3'}"]
    if zygote != "default":
        cmd.append(f"--zygote={'true' if zygote == 'on' else 'false'}")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 60)
    if r.returncode != 0:
        raise RuntimeError(f"start failed: {r.stderr[-2000:]}")
    import ipyparallel as ipp

    rec: dict = {"engines": n, "zygote": zygote, "launcher": launcher}
    try:
        rc = ipp.Client(str(profile / "security/ipcontroller-client.json"), timeout=timeout)
        rc.wait_for_engines(n, timeout=timeout)
        time.sleep(idle)
        dv = rc[:]
        t = time.perf_counter()
        dv.apply_sync(os.getpid)
        rec["first_apply_s"] = time.perf_counter() - t
        time.sleep(1.0)
        rec["after_first"] = memory(profile, n)
        for i in range(5):
            dv.apply_sync(f, list(range(100 * i)))
        time.sleep(1.0)
        rec["after_six"] = memory(profile, n)
        rc.close()
    finally:
        subprocess.run([str(BIN), "cluster", "stop", f"--profile-dir={profile}"], env=env,
                       capture_output=True, timeout=120)
    return rec


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="16,64")
    ap.add_argument("--zygote", default="on,off", help="on, off or default (no option passed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--launcher", default="local",
                    help="local, or mpi (mpiexec's ranks; their zygote is the host zygote they share)")
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.engines.split(",")]:
        for z in a.zygote.split(","):
            recs = []
            for _ in range(a.rounds):
                rec = one(n, z, a.idle, a.timeout, a.launcher)
                log(json.dumps(rec))
                recs.append(rec)
            rows.append((n, z, recs))
    print(f"launcher: {a.launcher}")
    print("| engines | zygote | first apply (s) | PSS/engine after 1st apply: rust + python + zygote = total (MiB) | after 6 applies: total (MiB) |")
    print("|---|---|---|---|---|")
    for n, z, recs in rows:
        a1 = [r["after_first"] for r in recs]
        a6 = [r["after_six"] for r in recs]
        print(f"| {n} | {z} | {med([r['first_apply_s'] for r in recs])} | "
              f"{statistics.median(x['rust_mib'] for x in a1):.1f} + "
              f"{statistics.median(x['python_mib'] for x in a1):.1f} + "
              f"{statistics.median(x['zygote_mib'] for x in a1):.1f} = "
              f"{med([x['total_mib'] for x in a1])} | {med([x['total_mib'] for x in a6])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
