#!/usr/bin/env python3
"""Side-by-side benchmark: stock ipyparallel vs. Parallax (hub and engines).

The stock ipyparallel ``Client`` runs against a matrix of clusters, in one run,
on the same workloads:

  hubs     ``ipcontroller`` (ipyparallel's own controller) | ``parallax`` (``$PARALLAX_BIN hub``)
  engines  ``ipengine`` (stock) | ``parallax`` (``$PARALLAX_BIN engine --python=<venv python>``:
           a Rust process plus the Python subprocess it owns)

Both hubs get identical arguments (``--profile-dir --cluster-id --ip --ping
--log-level`` and optionally ``--scheme`` / ``--hwm``); both engine kinds get
``--profile-dir --cluster-id --log-level=WARN``.  Every cluster is fresh, in a
fresh temporary profile directory.  For rtt/fanout/lb the clusters of every
hub x engine combination (same engine count) are up side by side: latency
samples alternate between them one by one (forward/reverse order) and
throughput runs alternate repeat by repeat, so that the noise of this shared
machine hits all of them alike.  The memory run has each combination's cluster
up alone, one after the other; so does the start-up sweep.

Workloads
  startup  engine start-up on one hub (parallax if selected): launch -> all N
           registered, and -> first ``dv.execute`` answered by all N, for
           N = 1/2/4/8, each engine kind, median over --startup-repeat starts.
  rtt      1 engine: ``rc[0].apply_sync(lambda: None)`` round trip (median, p90,
           min) after a warm-up; the same through a load-balanced view.
  fanout   ``rc[:].execute('a=1', block=True)`` with 1/2/4/8 engines.
  lb       load-balanced throughput with 2 and 4 engines: N x
           ``lview.apply_async(noop)`` then wait, and
           ``lview.map_sync(f, range(N), chunksize=1)`` -> tasks/s.
  mem      hub memory before and during a long run of tiny load-balanced tasks
           (``map_async(chunksize=1)`` in batches, ``rc.purge_everything()``
           after every batch).  ipcontroller: the controller process and its
           whole process tree (it forks 8 children; use PSS for the tree);
           parallax: the hub process (tree too, for symmetry).  The same run
           measures memory per engine (RSS/USS/PSS of each engine process:
           ipengine + its nanny; Rust engine + its Python subprocess) idle after
           start, after --cap-tasks tasks and at the end.

Blocking calls are issued as ``*_async(...).get(timeout)`` -- exactly what the
``block=True`` / ``*_sync`` variants do internally, but a broken hub cannot hang
the run.

Output: progress on stderr; a markdown report on stdout (paste into
BENCHMARKS.md); raw samples + summary as JSON in
``bench/results/hub-<timestamp>.json`` (and the markdown next to it).

Usage (from the repository root)::

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_hub.py
    PARALLAX_BIN=... .venv/bin/python bench/bench_hub.py --engine-kinds ipengine   # hubs only
    .venv/bin/python bench/bench_hub.py --only ipcontroller --engine-kinds ipengine --quick
    .venv/bin/python bench/bench_hub.py --help
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
HUBS = ("ipcontroller", "parallax")
ENGINE_KINDS = ("ipengine", "parallax")
WORKLOADS = ("startup", "rtt", "fanout", "lb", "mem")
MIB = 1024.0 * 1024.0

# A combination is "hub/engine", e.g. "parallax/ipengine".
HUB_LABEL = {"ipcontroller": "ipcontroller", "parallax": "parallax hub"}
ENGINE_LABEL = {"ipengine": "ipengine", "parallax": "parallax engine"}
HUB_SHORT = {"ipcontroller": "ipc", "parallax": "plx"}
ENGINE_SHORT = {"ipengine": "ipe", "parallax": "pxe"}
# (column title, baseline combination, candidate combination): ratio = how many times better
# the candidate is than the baseline (> 1 = the Parallax side is better)
RATIOS = (
    ("hub: parallax ÷ ipcontroller (both ipengine)", "ipcontroller/ipengine", "parallax/ipengine"),
    ("**(a) all Parallax ÷ all ipyparallel**", "ipcontroller/ipengine", "parallax/parallax"),
    ("(b) engine: parallax ÷ ipengine (parallax hub)", "parallax/ipengine", "parallax/parallax"),
    ("(b) engine: parallax ÷ ipengine (ipcontroller)", "ipcontroller/ipengine", "ipcontroller/parallax"),
)


def combo(hub: str, engine: str) -> str:
    return f"{hub}/{engine}"


def split_combo(key: str) -> tuple[str, str]:
    hub, _, engine = key.partition("/")
    return hub, engine


def combo_label(key: str) -> str:
    hub, engine = split_combo(key)
    return f"{HUB_LABEL.get(hub, hub)} + {ENGINE_LABEL.get(engine, engine)}"


def combo_short(key: str) -> str:
    hub, engine = split_combo(key)
    return f"{HUB_SHORT.get(hub, hub)}/{ENGINE_SHORT.get(engine, engine)}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# functions shipped to the engines (defined at module level: pickled by
# ipyparallel's canning of __main__ functions, identically for both hubs)


def noop():
    return None


def ident(x):
    return x


# --------------------------------------------------------------------------
# statistics


def stats(xs):
    xs = [float(x) for x in xs]
    if not xs:
        return {"count": 0}
    s = sorted(xs)

    def q(p):
        if len(s) == 1:
            return s[0]
        k = (len(s) - 1) * p
        lo = math.floor(k)
        hi = math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {
        "count": len(s),
        "median": statistics.median(s),
        "p90": q(0.9),
        "min": s[0],
        "max": s[-1],
        "mean": statistics.fmean(s),
    }


# --------------------------------------------------------------------------
# CPU / noise accounting


def _proc_stat_cpu():
    """Machine-wide jiffies from /proc/stat: (busy excl. steal, idle, steal, total)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    vals = [int(v) for v in parts[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice
    vals += [0] * (10 - len(vals))
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    # guest time is already included in user/nice
    busy = user + nice + system + irq + softirq
    idle_all = idle + iowait
    return busy, idle_all, steal, busy + idle_all + steal


CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


class CpuSnap:
    """Snapshot of machine CPU and per-process CPU of the processes we own."""

    def __init__(self, groups: dict[str, list[psutil.Process]]):
        self.t = time.perf_counter()
        self.machine = _proc_stat_cpu()
        self.load = os.getloadavg()
        self.procs: dict[tuple[int, float], tuple[str, float]] = {}
        for group, procs in groups.items():
            for p in procs:
                try:
                    ct = p.cpu_times()
                    key = (p.pid, p.create_time())
                    self.procs[key] = (group, ct.user + ct.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass


def cpu_delta(a: CpuSnap, b: CpuSnap) -> dict:
    wall = b.t - a.t
    busy = (b.machine[0] - a.machine[0]) / CLK_TCK
    steal = (b.machine[2] - a.machine[2]) / CLK_TCK
    total = (b.machine[3] - a.machine[3]) / CLK_TCK
    per_group: dict[str, float] = {}
    for key, (group, cpu1) in b.procs.items():
        cpu0 = a.procs.get(key, (group, 0.0))[1]  # started mid-block: count all
        per_group[group] = per_group.get(group, 0.0) + max(0.0, cpu1 - cpu0)
    ours = sum(per_group.values())
    foreign = max(0.0, busy - ours)
    cap = wall * NCPU if wall > 0 else 1.0
    return {
        "wall_s": wall,
        "busy_s": busy,
        "steal_s": steal,
        "total_s": total,
        "busy_pct": 100.0 * busy / total if total > 0 else 0.0,
        "bench_cpu_s": ours,
        "cpu_s_by_group": per_group,
        "foreign_cpu_s": foreign,
        "foreign_pct": 100.0 * foreign / cap,
        "steal_pct": 100.0 * steal / total if total > 0 else 0.0,
        "loadavg_start": list(a.load),
        "loadavg_end": list(b.load),
    }


def merge_deltas(ds: list[dict]) -> dict:
    """Several cpu_delta()s (disjoint windows) as one: seconds summed, percentages recomputed."""
    wall = sum(d["wall_s"] for d in ds)
    busy = sum(d["busy_s"] for d in ds)
    steal = sum(d["steal_s"] for d in ds)
    total = sum(d["total_s"] for d in ds)
    per_group: dict[str, float] = {}
    for d in ds:
        for k, v in d["cpu_s_by_group"].items():
            per_group[k] = per_group.get(k, 0.0) + v
    ours = sum(per_group.values())
    foreign = max(0.0, busy - ours)
    cap = wall * NCPU if wall > 0 else 1.0
    return {
        "wall_s": wall, "busy_s": busy, "steal_s": steal, "total_s": total,
        "busy_pct": 100.0 * busy / total if total > 0 else 0.0,
        "bench_cpu_s": ours, "cpu_s_by_group": per_group, "foreign_cpu_s": foreign,
        "foreign_pct": 100.0 * foreign / cap, "steal_pct": 100.0 * steal / total if total > 0 else 0.0,
        "loadavg_start": ds[0]["loadavg_start"] if ds else list(os.getloadavg()),
        "loadavg_end": ds[-1]["loadavg_end"] if ds else list(os.getloadavg()),
        "windows": len(ds),
    }


# --------------------------------------------------------------------------
# memory


def pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def hub_memory(hub_proc: psutil.Process) -> dict:
    """RSS/PSS (MiB) of the hub process and of its whole process tree."""
    out = {}
    try:
        procs = [hub_proc] + hub_proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return {"error": "hub process gone"}
    rss = []
    pss = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
            pss.append(pss_bytes(p.pid) or 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    out["proc_rss_mib"] = rss[0] / MIB if rss else None
    out["proc_pss_mib"] = pss[0] / MIB if pss else None
    out["tree_nprocs"] = len(rss)
    out["tree_rss_mib"] = sum(rss) / MIB
    out["tree_pss_mib"] = sum(pss) / MIB
    out["client_rss_mib"] = psutil.Process().memory_info().rss / MIB
    return out


def proc_mem(procs: list[psutil.Process]) -> dict:
    """Summed RSS/USS/PSS (MiB) of some processes (USS/PSS from /proc/PID/smaps_rollup)."""
    rss = uss = pss = 0
    n = 0
    for p in procs:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += m.rss
        uss += m.uss
        pss += getattr(m, "pss", 0)
        n += 1
    return {"nprocs": n, "rss_mib": rss / MIB, "uss_mib": uss / MIB, "pss_mib": pss / MIB}


# The processes one engine consists of, by role: ipengine = the ipengine process + the nanny it
# starts (ipyparallel.engine.nanny, own session, child of ipengine); parallax = the Rust engine
# + the Python subprocess that runs user code.
ENGINE_PARTS = {"ipengine": ("ipengine", "nanny"), "parallax": ("rust", "python")}
PART_LABEL = {"ipengine": "ipengine process", "nanny": "nanny process", "rust": "Rust engine process",
              "python": "Python subprocess", "total": "whole engine"}


def engine_memory(cl: "Cluster") -> dict:
    """Memory of each engine of a cluster, split by process, and the mean per engine."""
    main_part, child_part = ENGINE_PARTS[cl.engine]
    engines = []
    for pop in cl.engine_popens:
        try:
            root = psutil.Process(pop.pid)
            kids = root.children(recursive=True)
        except psutil.NoSuchProcess:
            engines.append({"error": "engine process gone"})
            continue
        e = {main_part: proc_mem([root]), child_part: proc_mem(kids), "total": proc_mem([root] + kids)}
        try:
            e["child_cmdlines"] = [" ".join(k.cmdline())[:160] for k in kids]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        engines.append(e)
    ok = [e for e in engines if "error" not in e]
    mean = {}
    for part in (main_part, child_part, "total"):
        mean[part] = {k: statistics.fmean(e[part][k] for e in ok) for k in ("rss_mib", "uss_mib", "pss_mib")} if ok else {}
        if ok:
            mean[part]["nprocs"] = statistics.fmean(e[part]["nprocs"] for e in ok)
            mean[part]["max_rss_mib"] = max(e[part]["rss_mib"] for e in ok)
    return {"engine": cl.engine, "n": len(engines), "n_ok": len(ok), "per_engine": engines, "mean": mean}


# --------------------------------------------------------------------------
# processes


class Reaper:
    """Every process this script started (and their descendants), by pid + create time."""

    def __init__(self):
        self.known: dict[int, float] = {}

    def add(self, p: psutil.Process) -> None:
        try:
            self.known[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass

    def add_tree(self, pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self.add(p)
        return procs

    def alive(self) -> list[psutil.Process]:
        out = []
        for pid, ct in self.known.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - ct) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def kill(self, procs: list[psutil.Process], grace: float = 3.0) -> list[int]:
        """SIGTERM, wait up to `grace` s, SIGKILL; returns pids that needed SIGKILL."""
        procs = [p for p in procs if self._ours(p)]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, still = psutil.wait_procs(procs, timeout=grace)
        killed = []
        for p in still:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(still, timeout=5)
        return killed

    def _ours(self, p: psutil.Process) -> bool:
        ct = self.known.get(p.pid)
        try:
            return ct is not None and abs(p.create_time() - ct) < 0.01
        except psutil.NoSuchProcess:
            return False


REAPER = Reaper()


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class ClusterError(RuntimeError):
    pass


class Cluster:
    """One hub + n engines (stock ipengine or parallax engine) + one stock Client, in a fresh profile dir."""

    def __init__(self, hub: str, engine: str, n: int, cfg: "Config", workroot: Path, tag: str):
        self.hub = hub
        self.engine = engine
        self.key = combo(hub, engine)
        self.n = n
        self.cfg = cfg
        self.dir = Path(tempfile.mkdtemp(prefix=f"{hub}-{engine}-{tag}-", dir=workroot))
        self.profile_dir = self.dir / "profile"
        self.profile_dir.mkdir()
        self.cluster_id = f"bench{uuid.uuid4().hex[:8]}"
        self.hub_popen: subprocess.Popen | None = None
        self.engine_popens: list[subprocess.Popen] = []
        self.hub_proc: psutil.Process | None = None
        self.rc = None
        self.timings: dict[str, float] = {}
        self.stop_info: dict = {}
        self.warnings: dict[str, int] = {}
        self._logfiles = []

    # -- helpers ---------------------------------------------------------
    def _spawn(self, argv: list[str], logname: str) -> subprocess.Popen:
        logf = open(self.dir / logname, "wb")
        self._logfiles.append(logf)
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=self.cfg.child_env,
            start_new_session=True,  # own process group (and session)
        )
        REAPER.add_tree(p.pid)
        return p

    def hub_log(self, n: int = 30) -> str:
        return tail(self.dir / "hub.log", n)

    def security_file(self, kind: str) -> Path:
        return self.profile_dir / "security" / f"ipcontroller-{self.cluster_id}-{kind}.json"

    def hub_argv(self) -> list[str]:
        base = self.cfg.hub_cmd[self.hub]
        args = [
            f"--profile-dir={self.profile_dir}",
            f"--cluster-id={self.cluster_id}",
            "--ip=127.0.0.1",
            f"--ping={self.cfg.ping}",
            "--log-level=WARN",
        ]
        if self.cfg.scheme:
            args.append(f"--scheme={self.cfg.scheme}")
        if self.cfg.hwm is not None:
            args.append(f"--hwm={self.cfg.hwm}")
        return base + args

    def engine_argv(self) -> list[str]:
        return self.cfg.engine_cmd[self.engine] + [
            f"--profile-dir={self.profile_dir}",
            f"--cluster-id={self.cluster_id}",
            "--log-level=WARN",
        ]

    # -- lifecycle -------------------------------------------------------
    def start(self, first_execute: bool = False, on_launch=None, on_ready=None) -> None:
        """Hub, then engines, then the Client; waits until all n engines are registered.

        first_execute: also time launch -> a first ``dv.execute`` answered by every engine.
        on_launch() is called just before the engines are launched, on_ready() once they are
        registered (and have answered the first execute).
        """
        import ipyparallel as ipp

        t0 = time.perf_counter()
        self.hub_popen = self._spawn(self.hub_argv(), "hub.log")
        self.hub_proc = psutil.Process(self.hub_popen.pid)
        files = [self.security_file("client"), self.security_file("engine")]
        deadline = t0 + self.cfg.start_timeout
        while True:
            if self.hub_popen.poll() is not None:
                raise ClusterError(
                    f"{self.hub} hub exited with code {self.hub_popen.returncode} before writing "
                    f"its connection files; hub log:\n{self.hub_log()}"
                )
            if all(_json_ok(f) for f in files):
                break
            if time.perf_counter() > deadline:
                raise ClusterError(
                    f"{self.hub} hub wrote no connection files {[f.name for f in files]} within "
                    f"{self.cfg.start_timeout}s; hub log:\n{self.hub_log()}"
                )
            time.sleep(0.01)
        t1 = time.perf_counter()
        self.timings["hub_files_s"] = t1 - t0
        if on_launch is not None:
            on_launch()
            t1 = time.perf_counter()
        for i in range(self.n):
            self.engine_popens.append(self._spawn(self.engine_argv(), f"engine-{i}.log"))
        t2 = time.perf_counter()
        try:
            self.rc = ipp.Client(str(files[0]), timeout=self.cfg.start_timeout)
        except Exception as e:
            raise ClusterError(f"Client could not connect to {self.hub}: {e!r}; hub log:\n{self.hub_log()}") from e
        self.timings["client_connect_s"] = time.perf_counter() - t2
        try:
            self.rc.wait_for_engines(self.n, timeout=self.cfg.start_timeout, interactive=False)
        except Exception as e:
            raise ClusterError(
                f"{self.n} {self.engine} engines did not register with {self.hub} within {self.cfg.start_timeout}s "
                f"(have {len(self.rc.ids)}): {e!r}; hub log:\n{self.hub_log()}"
                + "".join(f"\nengine-{i}.log:\n{tail(self.dir / f'engine-{i}.log', 10)}" for i in range(self.n))
            ) from e
        t3 = time.perf_counter()
        self.timings["engines_registered_s"] = t3 - t1
        self.timings["start_total_s"] = t3 - t0
        if first_execute:
            try:
                self.rc[:].execute("a=1", block=False).get(timeout=self.cfg.start_timeout)
            except Exception as e:
                raise ClusterError(f"first execute on {self.n} {self.engine} engine(s) via {self.hub} failed: {e!r}") from e
            self.timings["first_execute_s"] = time.perf_counter() - t1
        if on_ready is not None:
            on_ready()
        self.refresh_tree()

    def refresh_tree(self) -> None:
        for p in [self.hub_popen] + self.engine_popens:
            if p is not None:
                REAPER.add_tree(p.pid)

    def groups(self) -> dict[str, list[psutil.Process]]:
        """Processes by role, for CPU accounting (client = this process)."""
        out = {"client": [psutil.Process()]}
        for name, pops in ((f"hub/{self.key}", [self.hub_popen]), (f"engines/{self.key}", self.engine_popens)):
            procs = []
            for p in pops:
                if p is None:
                    continue
                try:
                    root = psutil.Process(p.pid)
                    procs += [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
            out[name] = procs
        return out

    def hub_alive(self) -> bool:
        return self.hub_popen is not None and self.hub_popen.poll() is None

    def stop(self) -> None:
        """Close the client, then terminate engines (incl. nannies) and the hub."""
        if self.rc is not None:
            try:
                self.rc.close(linger=0)
            except Exception:
                pass
            self.rc = None
        self.refresh_tree()
        hub_exit = self.hub_popen.poll() if self.hub_popen else None
        self.stop_info["hub_exited_before_stop"] = hub_exit is not None
        if hub_exit is not None:
            self.stop_info["hub_returncode"] = hub_exit
        engine_roots = []
        engine_procs = []
        for p in self.engine_popens:
            try:
                root = psutil.Process(p.pid)
                engine_roots.append(root)
                engine_procs += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        hub_procs = []
        if self.hub_popen is not None:
            try:
                root = psutil.Process(self.hub_popen.pid)
                hub_procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        t = time.perf_counter()
        if self.engine == "parallax":
            # SIGTERM the Rust engines only: each unregisters and stops its own Python
            # subprocess (signalled at the same time, it would count as a crash)
            self.stop_info["engine_sigkilled"] = REAPER.kill(engine_roots, grace=3.0)
            self.stop_info["engine_children_left"] = [p.pid for p in engine_procs
                                                      if p not in engine_roots and _running(p)]
            self.stop_info["engine_sigkilled"] += REAPER.kill(engine_procs, grace=1.0)
        else:
            self.stop_info["engine_sigkilled"] = REAPER.kill(engine_procs, grace=2.0)
        self.stop_info["engines_stop_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.stop_info["hub_sigkilled"] = REAPER.kill(hub_procs, grace=5.0)
        self.stop_info["hub_stop_s"] = time.perf_counter() - t
        # whole process groups too (anything that stayed in a group we created)
        for p in [self.hub_popen] + self.engine_popens:
            if p is None:
                continue
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.hub_popen is not None:
            self.stop_info["hub_returncode"] = self.hub_popen.returncode
        for f in self._logfiles:
            try:
                f.close()
            except Exception:
                pass


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _json_ok(path: Path) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
        return isinstance(d, dict) and bool(d)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------
# configuration


class Config:
    def __init__(self, args: argparse.Namespace, workroot: Path):
        q = args.quick
        self.quick = q
        self.hubs = [args.only] if args.only else list(HUBS)
        self.engine_kinds = [k.strip() for k in args.engine_kinds.split(",") if k.strip()]
        for k in self.engine_kinds:
            if k not in ENGINE_KINDS:
                raise SystemExit(f"unknown engine kind {k!r}; choose from {','.join(ENGINE_KINDS)}")
        self.engine_kinds = [k for k in ENGINE_KINDS if k in self.engine_kinds]
        if not self.engine_kinds:
            raise SystemExit("--engine-kinds: give at least one of ipengine,parallax")
        # every hub x engine combination, stock ipyparallel first, all-Parallax last
        self.keys = [combo(h, e) for e in self.engine_kinds for h in self.hubs]
        self.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        for w in self.workloads:
            if w not in WORKLOADS:
                raise SystemExit(f"unknown workload {w!r}; choose from {','.join(WORKLOADS)}")
        default_engines = "1,2" if q else "1,2,4,8"
        self.engines = _intlist(args.engines or default_engines)
        self.lb_engines = _intlist(args.lb_engines or ("2" if q else "2,4"))
        self.mem_engines = args.mem_engines
        self.samples = args.samples or (100 if q else 1000)
        self.warmup = args.warmup if args.warmup is not None else (10 if q else 50)
        self.fanout_samples = args.fanout_samples or (30 if q else 300)
        self.fanout_warmup = 5 if q else 20
        self.lb_tasks = args.lb_tasks or (500 if q else 5000)
        # 4 combinations x 2 engine counts x (apply_async + map_sync) x ~10 s per run: 2 repeats fit the
        # ~15 min budget; ipcontroller + parallax engine, the least telling combination, gets 1
        self.repeat = args.repeat or (1 if q else 2)
        self.repeat_extra = min(self.repeat, args.repeat_extra if args.repeat_extra is not None else 1)
        self.extra_keys = {combo("ipcontroller", "parallax")}
        self.startup_engines = _intlist(args.startup_engines or ("1,4" if q else "1,2,4,8"))
        self.startup_repeat = args.startup_repeat or (2 if q else 4)
        self.startup_hub = "parallax" if "parallax" in self.hubs else self.hubs[0]
        self.tasks = args.tasks or (2000 if q else 50000)
        cap = args.cap_tasks if args.cap_tasks is not None else (1000 if q else 20000)
        self.cap_tasks = min(cap, self.tasks)
        # the memory run's full count goes to the parallax hub with the newest engine selected
        # (all Parallax when both engine kinds run); every other combination stops at cap_tasks
        self.full_tasks_keys = set(self.keys) if args.mem_full else (
            {combo("parallax", self.engine_kinds[-1])} if "parallax" in self.hubs else set())
        self.batch = args.batch or (500 if q else 5000)
        self.ping = args.ping
        self.scheme = args.scheme
        self.hwm = args.hwm
        self.start_timeout = args.start_timeout
        self.wait_idle = args.wait_idle
        self.op_timeout = args.op_timeout
        bindir = Path(args.venv_bin)
        self.ipengine = str(bindir / "ipengine")
        self.engine_python = args.engine_python or str(bindir / "python")
        self.hub_cmd = {
            "ipcontroller": [str(bindir / "ipcontroller")],
            "parallax": [os.environ.get("PARALLAX_BIN", ""), "hub"],
        }
        self.engine_cmd = {
            "ipengine": [self.ipengine],
            "parallax": [os.environ.get("PARALLAX_BIN", ""), "engine", f"--python={self.engine_python}"],
        }
        # keep IPython/Jupyter state of all children inside the work dir
        env = os.environ.copy()
        env["IPYTHONDIR"] = str(workroot / "ipythondir")
        env["JUPYTER_CONFIG_DIR"] = str(workroot / "jupyter-config")
        env["JUPYTER_DATA_DIR"] = str(workroot / "jupyter-data")
        env["JUPYTER_RUNTIME_DIR"] = str(workroot / "jupyter-runtime")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("IPP_CONNECTION_INFO", None)
        env.pop("IPP_SESSION_KEY", None)
        self.child_env = env

    def needs_parallax_bin(self) -> bool:
        return "parallax" in self.hubs or "parallax" in self.engine_kinds

    def tasks_for(self, key: str) -> int:
        return self.tasks if key in self.full_tasks_keys else self.cap_tasks

    def repeat_for(self, key: str) -> int:
        return self.repeat_extra if key in self.extra_keys else self.repeat

    def as_dict(self) -> dict:
        d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(self).items() if k not in ("child_env",)}
        return d


def _intlist(s: str) -> list[int]:
    return sorted({int(x) for x in s.split(",") if x.strip()})


# --------------------------------------------------------------------------
# workloads


class Block:
    """Measurement context: CPU/noise accounting around a workload.

    Every cluster that is up is accounted for (an idle second cluster is ours, not noise).
    """

    def __init__(self, clusters: list[Cluster], name: str, noise: list, keys: list[str]):
        self.clusters = list(clusters)
        self.name = name
        self.noise = noise
        self.keys = keys

    def _groups(self):
        g = {"client": [psutil.Process()]}
        for cl in self.clusters:
            for name, procs in cl.groups().items():
                g.setdefault(name, []).extend(p for p in procs if p not in g.get(name, []))
        return g

    def __enter__(self):
        gc.collect()
        self.a = CpuSnap(self._groups())
        return self

    def __exit__(self, *exc):
        b = CpuSnap(self._groups())
        d = cpu_delta(self.a, b)
        d["block"] = self.name
        d["combos"] = self.keys
        d["engines"] = self.clusters[0].n if self.clusters else None
        d["ok"] = exc[0] is None
        self.noise.append(d)
        self.delta = d
        return False


class Paired:
    """The clusters of one block (one per hub x engine combination, same engine count), all up at once.

    Keys are combinations ("hub/engine").  Latency samples alternate between them one by one
    (forward, then reverse order), throughput measurements repeat by repeat, so that the
    machine's noise hits all combinations alike.  A combination that fails is dropped from
    the rest of the block; the others carry on.
    """

    def __init__(self, clusters: dict[str, Cluster], cfg: Config, noise: list):
        self.cl = clusters
        self.cfg = cfg
        self.noise = noise
        self.failed: dict[str, tuple[str, Exception, str]] = {}

    def active(self) -> list[str]:
        return [h for h in self.cl if h not in self.failed]

    def order(self, i: int) -> list[str]:
        hubs = self.active()
        return hubs if i % 2 == 0 else hubs[::-1]

    def fail(self, hub: str, what: str, e: Exception) -> None:
        if hub not in self.failed:
            self.failed[hub] = (what, e, traceback.format_exc())
            log(f"  {hub}: FAILED in {what}: {type(e).__name__}: {e}")

    def block(self, name: str, keys: list[str]) -> Block:
        return Block(list(self.cl.values()), name, self.noise, keys)

    def samples(self, name: str, op, warmup: int, n: int) -> tuple[dict[str, list[float]], dict]:
        """op(hub) -> None; returns per-hub latencies (ms) and the CPU block."""
        for h in self.active():
            try:
                for _ in range(warmup):
                    op(h)
            except Exception as e:
                self.fail(h, f"{name} warm-up", e)
        out = {h: [] for h in self.active()}
        with self.block(name, self.active()) as blk:
            for i in range(n):
                for h in self.order(i):
                    t = time.perf_counter()
                    try:
                        op(h)
                    except Exception as e:
                        self.fail(h, name, e)
                        continue
                    out[h].append((time.perf_counter() - t) * 1e3)
        return {h: v for h, v in out.items() if h not in self.failed}, blk.delta

    def each(self, name: str, fn, i: int = 0, keys=None) -> dict:
        """fn(key, cluster) for every active combination (or those in keys) in ABBA order."""
        res = {}
        for h in self.order(i):
            if keys is not None and h not in keys:
                continue
            try:
                res[h] = fn(h, self.cl[h])
            except Exception as e:
                self.fail(h, name, e)
        return res


def _per_hub_cpu(delta: dict, key: str) -> dict:
    g = delta["cpu_s_by_group"]
    return {"hub_cpu_s": g.get(f"hub/{key}", 0.0), "engines_cpu_s": g.get(f"engines/{key}", 0.0),
            "wall_s": delta["wall_s"], "foreign_pct": delta["foreign_pct"]}


def w_rtt(P: Paired) -> dict:
    cfg = P.cfg
    f = lambda: None  # noqa: E731  (the issue's exact workload)
    to = cfg.op_timeout
    out = {h: {} for h in P.active()}
    for label in ("direct", "lb"):
        views = {}
        for h in P.active():
            rc = P.cl[h].rc
            views[h] = rc[0] if label == "direct" else rc.load_balanced_view()

        def op(h):
            r = views[h].apply_async(f).get(timeout=to)
            if r is not None:
                raise AssertionError(f"apply returned {r!r}")

        samples, delta = P.samples(f"rtt {label} n=1", op, cfg.warmup, cfg.samples)
        for h, xs in samples.items():
            out[h][label] = {"samples_ms": xs, "stats": stats(xs), "cpu": _per_hub_cpu(delta, h)}
        P.each("purge", lambda h, cl: purge_all(cl, to))
    return {h: d for h, d in out.items() if h not in P.failed}


def w_fanout(P: Paired) -> dict:
    cfg = P.cfg
    to = cfg.op_timeout
    views = {}
    for h in P.active():
        dv = P.cl[h].rc[:]
        if len(dv.targets) != P.cl[h].n:
            P.fail(h, "fanout", AssertionError(f"direct view has {len(dv.targets)} targets, want {P.cl[h].n}"))
        views[h] = dv

    def op(h):
        views[h].execute("a=1", block=False).get(timeout=to)

    n = next(iter(P.cl.values())).n
    samples, delta = P.samples(f"fanout n={n}", op, cfg.fanout_warmup, cfg.fanout_samples)
    P.each("purge", lambda h, cl: purge_all(cl, to))
    return {h: {"samples_ms": xs, "stats": stats(xs), "cpu": _per_hub_cpu(delta, h)} for h, xs in samples.items()}


def purge_all(cl: Cluster, timeout: float) -> None:
    """``rc.purge_everything()`` with a timeout on the hub's reply (the stock call waits forever).

    A failing hub-side purge is recorded as a warning (the local caches are still
    cleared), not raised: purging is untimed housekeeping between measurements.
    """
    rc = cl.rc
    rc.purge_local_results("all")
    try:
        fut = rc._send(rc._query_stream, "purge_request", content={"engine_ids": [], "msg_ids": "all"})
        reply = fut.result(timeout=timeout)
        content = reply["content"]
        if content.get("status") != "ok":
            raise rc._unwrap_exception(content)
    except Exception as e:
        key = f"hub-side purge (purge_request 'all') failed: {type(e).__name__}: {e}"
        cl.warnings[key] = cl.warnings.get(key, 0) + 1
    rc.history = []
    rc.session.digest_history.clear()


def wait_all(cl: Cluster, what, timeout: float, label: str) -> None:
    """Wait for an AsyncResult or a list of them, failing fast if the hub process dies."""
    deadline = time.perf_counter() + timeout
    while True:
        left = deadline - time.perf_counter()
        if isinstance(what, list):
            done = cl.rc.wait(what, timeout=max(0.0, min(1.0, left)))
        else:
            what.wait(max(0.0, min(1.0, left)))
            done = what.ready()
        if done:
            return
        if not cl.hub_alive():
            raise ClusterError(f"{label}: hub process exited with code {cl.hub_popen.returncode} mid-run")
        if time.perf_counter() >= deadline:
            raise TimeoutError(f"{label}: not done within {timeout:.0f}s")


def _lb_timeout(cfg: Config, n: int) -> float:
    return cfg.op_timeout + n / 50.0  # assumes at least 50 tasks/s


def w_lb(P: Paired) -> dict:
    cfg = P.cfg
    N = cfg.lb_tasks
    to = _lb_timeout(cfg, N)
    n = next(iter(P.cl.values())).n
    lviews = {h: P.cl[h].rc.load_balanced_view() for h in P.active()}

    def warm(h, cl):
        # touch every engine through the scheduler
        lviews[h].map_async(ident, range(4 * cl.n), chunksize=1).get(timeout=cfg.op_timeout)
        purge_all(cl, cfg.op_timeout)

    P.each("lb warm-up", warm)
    res = {h: {"apply_async": [], "map_sync": []} for h in P.active()}

    def apply_run(h, cl, r):
        gc.collect()
        with P.block(f"lb apply_async x{N} n={n} #{r} [{combo_short(h)}]", [h]) as blk:
            t0 = time.perf_counter()
            ars = [lviews[h].apply_async(noop) for _ in range(N)]
            t1 = time.perf_counter()
            wait_all(cl, ars, to, f"{N} x apply_async")
            t2 = time.perf_counter()
        bad = sum(1 for ar in ars if ar.get(timeout=0) is not None)
        if bad:
            raise AssertionError(f"{bad} apply_async results were not None")
        engines_used = sorted({ar.engine_id for ar in ars})
        del ars
        purge_all(cl, cfg.op_timeout)
        return {"total_s": t2 - t0, "submit_s": t1 - t0, "tasks_per_s": N / (t2 - t0),
                "engines_used": engines_used, "cpu": _per_hub_cpu(blk.delta, h)}

    def map_run(h, cl, r):
        gc.collect()
        with P.block(f"lb map_sync x{N} n={n} #{r} [{combo_short(h)}]", [h]) as blk:
            t0 = time.perf_counter()
            amr = lviews[h].map_async(ident, range(N), chunksize=1)
            wait_all(cl, amr, to, f"map_sync of {N}")
            out = amr.get(timeout=0)
            t1 = time.perf_counter()
        if list(out) != list(range(N)):
            raise AssertionError("map_sync returned wrong results")
        del amr, out
        purge_all(cl, cfg.op_timeout)
        return {"total_s": t1 - t0, "tasks_per_s": N / (t1 - t0), "cpu": _per_hub_cpu(blk.delta, h)}

    for r in range(max(cfg.repeat_for(k) for k in P.cl)):
        keys = [k for k in P.cl if cfg.repeat_for(k) > r]
        for h, v in P.each("lb apply_async", lambda h, cl: apply_run(h, cl, r), r, keys).items():
            res[h]["apply_async"].append(v)
        for h, v in P.each("lb map_sync", lambda h, cl: map_run(h, cl, r), r + 1, keys).items():
            res[h]["map_sync"].append(v)
    out = {}
    for h in P.active():
        d = res[h]
        for k in ("apply_async", "map_sync"):
            st = stats([x["total_s"] for x in d[k]])
            d[k + "_stats"] = st
            d[k + "_tasks_per_s_at_median"] = N / st["median"]
            d[k + "_tasks_per_s_best"] = N / st["min"]
        out[h] = d
    return out


def w_mem(cl: Cluster, cfg: Config, noise: list) -> dict:
    """Runs on one cluster alone (no other cluster up).

    Hub memory after every batch; memory of every engine idle after start, after cfg.cap_tasks
    tasks (the count every combination reaches) and at the end."""
    rc = cl.rc
    lview = rc.load_balanced_view()
    total = cfg.tasks_for(cl.key)
    batch = min(cfg.batch, total) if total else cfg.batch
    to = _lb_timeout(cfg, batch)
    time.sleep(1.0)  # let the hub and the engines settle after registration
    points = [{"tasks": 0, "t_s": 0.0, **hub_memory(cl.hub_proc)}]
    eng_points = [{"tasks": 0, **engine_memory(cl)}]
    em = eng_points[0]["mean"].get("total", {})
    log(f"    mem start: hub RSS {points[0].get('proc_rss_mib', 0):.1f} MiB, "
        f"tree RSS {points[0].get('tree_rss_mib', 0):.1f} MiB, PSS {points[0].get('tree_pss_mib', 0):.1f} MiB; "
        f"per {cl.engine} engine: RSS {em.get('rss_mib', 0):.1f} MiB, PSS {em.get('pss_mib', 0):.1f} MiB")
    done = 0
    t_start = time.perf_counter()
    batches = []
    with Block([cl], f"mem {total} tasks n={cl.n} [{combo_short(cl.key)}]", noise, [cl.key]) as blk:
        while done < total:
            k = min(batch, total - done)
            if done < cfg.cap_tasks:
                k = min(k, cfg.cap_tasks - done)  # land on the common checkpoint
            t0 = time.perf_counter()
            amr = lview.map_async(ident, range(done, done + k), chunksize=1)
            wait_all(cl, amr, to, f"map_async batch {done}..{done + k}")
            out = amr.get(timeout=0)
            del amr
            t1 = time.perf_counter()
            if out[0] != done or out[-1] != done + k - 1 or len(out) != k:
                raise AssertionError("map_async returned wrong results")
            del out
            purge_all(cl, cfg.op_timeout)
            done += k
            batches.append({"tasks": k, "s": t1 - t0, "tasks_per_s": k / (t1 - t0)})
            pt = {"tasks": done, "t_s": time.perf_counter() - t_start, **hub_memory(cl.hub_proc)}
            points.append(pt)
            eng_points.append({"tasks": done, **engine_memory(cl)})
            if done in (cfg.cap_tasks, total):
                em = eng_points[-1]["mean"]
                log(f"    mem {done}/{total}: per {cl.engine} engine RSS "
                    + ", ".join(f"{part} {v.get('rss_mib', 0):.1f}" for part, v in em.items()) + " MiB")
            if done % max(batch, total // 10 or 1) == 0 or done == total:
                log(f"    mem {done}/{total}: hub RSS {pt.get('proc_rss_mib', 0):.1f} MiB, "
                    f"tree PSS {pt.get('tree_pss_mib', 0):.1f} MiB, {k / (t1 - t0):.0f} tasks/s")
    rates = [b["tasks_per_s"] for b in batches]
    return {"tasks": total, "batch": batch, "points": points, "batches": batches, "engine_mem": eng_points,
            "tasks_per_s": stats(rates), "overall_tasks_per_s": total / sum(b["s"] for b in batches),
            "cpu": _per_hub_cpu(blk.delta, cl.key)}


# --------------------------------------------------------------------------
# plan


def make_plan(cfg: Config) -> list[dict]:
    """Blocks. Start-up blocks: clusters started and stopped one at a time, engine kinds alternating.
    Paired blocks: one cluster per hub x engine combination, all up at once, samples interleaved.
    The memory block runs each combination's cluster alone, one after the other."""
    plan = []
    if "startup" in cfg.workloads:
        for n in cfg.startup_engines:
            plan.append({"n": n, "workloads": ["startup"], "paired": False, "startup": True})
    eng = list(cfg.engines)
    if "rtt" in cfg.workloads or ("fanout" in cfg.workloads and 1 in eng):
        wl = [w for w in ("rtt", "fanout") if w in cfg.workloads and (w == "rtt" or 1 in eng)]
        plan.append({"n": 1, "workloads": wl, "paired": True})
    ns = sorted(set(n for n in eng if n != 1) | (set(cfg.lb_engines) if "lb" in cfg.workloads else set()))
    for n in ns:
        wl = []
        if "fanout" in cfg.workloads and n in eng:
            wl.append("fanout")
        if "lb" in cfg.workloads and n in cfg.lb_engines:
            wl.append("lb")
        if wl:
            plan.append({"n": n, "workloads": wl, "paired": True})
    if "mem" in cfg.workloads:
        plan.append({"n": cfg.mem_engines, "workloads": ["mem"], "paired": False})
    return plan


PAIRED_FUNCS = {"rtt": w_rtt, "fanout": w_fanout, "lb": w_lb}


def wait_idle(max_wait: float, threshold_pct: float = 10.0) -> dict:
    """Before a cluster starts nothing of ours runs: wait (up to max_wait s) until the
    machine's busy CPU over a 1 s window is below threshold_pct."""
    t0 = time.perf_counter()
    while True:
        a = _proc_stat_cpu()
        time.sleep(1.0)
        b = _proc_stat_cpu()
        tot = b[3] - a[3]
        busy = 100.0 * (b[0] - a[0]) / tot if tot > 0 else 0.0
        waited = time.perf_counter() - t0
        if busy < threshold_pct or waited >= max_wait:
            return {"waited_s": waited, "busy_pct": busy, "idle": busy < threshold_pct}


def _maybe_wait_idle(cfg: Config) -> dict | None:
    if cfg.wait_idle <= 0:
        return None
    wi = wait_idle(cfg.wait_idle)
    if wi["waited_s"] > 1.5:
        log(f"  waited {wi['waited_s']:.0f}s for an idle machine "
            f"({'idle' if wi['idle'] else 'still busy'}: {wi['busy_pct']:.0f} % CPU busy)")
    return wi


def _err(workload: str, e: Exception, cl: Cluster, tb: str) -> dict:
    msg = f"{workload} n={cl.n}: {type(e).__name__}: {e}"
    if not cl.hub_alive() and cl.hub_popen is not None:
        msg += f" (hub process exited with code {cl.hub_popen.returncode})"
    msg += f"\nhub log tail:\n{cl.hub_log(20)}"
    return {"workload": workload, "error": msg, "short": _short(e, cl), "traceback": tb}


def _start(cl: Cluster, rec: dict) -> bool:
    try:
        cl.start()
    except Exception as e:
        rec["errors"].append(_err("start", e, cl, traceback.format_exc()))
        log(f"  {cl.key}: cluster start FAILED: {e}")
        return False
    rec["start"] = dict(cl.timings)
    log(f"  {cl.key}: {cl.n} engine(s) up in {cl.timings['start_total_s']:.2f}s "
        f"(hub files {cl.timings['hub_files_s']:.2f}s, registration {cl.timings['engines_registered_s']:.2f}s)")
    return True


def _finish(cl: Cluster, rec: dict, cfg: Config, t0: float) -> None:
    try:
        cl.stop()
    except Exception as e:
        rec["errors"].append({"workload": "stop", "error": repr(e), "short": f"stop: {e!r}"})
    rec["stop"] = cl.stop_info
    if cl.stop_info.get("engine_children_left"):
        key = "Python subprocess(es) still running after their Rust engine exited on SIGTERM"
        cl.warnings[key] = cl.warnings.get(key, 0) + len(cl.stop_info["engine_children_left"])
    rec["warnings"] = [f"{k} (x{v})" for k, v in cl.warnings.items()]
    for w in rec["warnings"]:
        log(f"  {cl.key}: WARNING {w}")
    if cl.stop_info.get("hub_sigkilled"):
        log(f"  {cl.key}: hub did not exit within 5s of SIGTERM; SIGKILLed")
    if cl.stop_info.get("engine_sigkilled"):
        log(f"  {cl.key}: {len(cl.stop_info['engine_sigkilled'])} engine process(es) SIGKILLed at stop")
    rec["block_wall_s"] = time.perf_counter() - t0
    if not cfg.keep_work:
        if rec["errors"]:
            rec["logs"] = {p.name: tail(p, 60) for p in sorted(cl.dir.glob("*.log"))}
        shutil.rmtree(cl.dir, ignore_errors=True)
    else:
        rec["workdir"] = str(cl.dir)


def _new_rec(key: str, n: int) -> dict:
    hub, engine = split_combo(key)
    return {"key": key, "hub": hub, "engine": engine, "n": n, "workloads": {}, "errors": []}


def run_paired_block(blk: dict, keys: list[str], cfg: Config, workroot: Path, noise: list, idx: int) -> list[dict]:
    n = blk["n"]
    recs = {k: _new_rec(k, n) for k in keys}
    wi = _maybe_wait_idle(cfg)
    clusters: dict[str, Cluster] = {}
    t0 = time.perf_counter()
    try:
        for k in keys:  # keys is already in this block's ABBA order
            cl = Cluster(*split_combo(k), n, cfg, workroot, f"b{idx}n{n}")
            clusters[k] = cl
            recs[k]["idle_wait"] = wi
            if not _start(cl, recs[k]):
                continue
        up = {k: cl for k, cl in clusters.items() if "start" in recs[k]}
        if up:
            P = Paired(up, cfg, noise)
            for w in blk["workloads"]:
                if not P.active():
                    break
                tw = time.perf_counter()
                try:
                    res = PAIRED_FUNCS[w](P)
                except Exception as e:  # a bug in the harness or every cluster broken
                    for k in P.active():
                        P.fail(k, w, e)
                    res = {}
                for k, d in res.items():
                    recs[k]["workloads"][w] = d
                    log(f"  {k}: {w} n={n}: {_brief(w, d)}")
                for k, (what, e, tb) in list(P.failed.items()):
                    if not any(err.get("_key") == id(e) for err in recs[k]["errors"]):
                        err = _err(what, e, up[k], tb)
                        err["_key"] = id(e)
                        recs[k]["errors"].append(err)
                log(f"  {w} n={n} took {time.perf_counter() - tw:.1f}s")
    finally:
        for k, cl in clusters.items():
            _finish(cl, recs[k], cfg, t0)
        for r in recs.values():
            for err in r["errors"]:
                err.pop("_key", None)
    return [recs[k] for k in keys]


def run_single_block(key: str, blk: dict, cfg: Config, workroot: Path, noise: list, idx: int) -> dict:
    rec = _new_rec(key, blk["n"])
    rec["idle_wait"] = _maybe_wait_idle(cfg)
    cl = Cluster(*split_combo(key), blk["n"], cfg, workroot, f"b{idx}n{blk['n']}")
    t0 = time.perf_counter()
    try:
        if _start(cl, rec):
            for w in blk["workloads"]:
                tw = time.perf_counter()
                try:
                    rec["workloads"][w] = w_mem(cl, cfg, noise)
                    log(f"  {key}: {w} n={blk['n']} done in {time.perf_counter() - tw:.1f}s: "
                        f"{_brief(w, rec['workloads'][w])}")
                except Exception as e:
                    rec["errors"].append(_err(w, e, cl, traceback.format_exc()))
                    log(f"  {key}: FAILED {w}: {type(e).__name__}: {e}")
    finally:
        _finish(cl, rec, cfg, t0)
    return rec


def run_startup_block(blk: dict, cfg: Config, workroot: Path, noise: list, idx: int) -> list[dict]:
    """Engine start-up on cfg.startup_hub: for each engine kind, startup_repeat fresh clusters of n
    engines, started one at a time (kinds alternating, ABBA), each stopped before the next starts.
    Times from the moment the engines are launched (hub already up, connection files written)."""
    n = blk["n"]
    hub = cfg.startup_hub
    keys = [combo(hub, k) for k in cfg.engine_kinds]
    recs = {k: _new_rec(k, n) for k in keys}
    for r in recs.values():
        r["starts"] = []
    fails = {k: 0 for k in keys}
    wi = _maybe_wait_idle(cfg)
    t_blk = time.perf_counter()
    windows = []  # CPU accounting: only the measured windows, launch -> first execute
    gc.collect()
    for rep in range(cfg.startup_repeat):
        for k in (keys if rep % 2 == 0 else keys[::-1]):
            if fails[k] >= 2:
                continue
            cl = Cluster(hub, split_combo(k)[1], n, cfg, workroot, f"b{idx}n{n}r{rep}")
            one = {"repeat": rep}
            tmp = {"errors": []}
            snaps = {}

            def on_launch(cl=cl, snaps=snaps):
                snaps["a"] = CpuSnap(cl.groups())

            def on_ready(cl=cl, snaps=snaps):
                snaps["b"] = CpuSnap(cl.groups())

            t0 = time.perf_counter()
            try:
                cl.start(first_execute=True, on_launch=on_launch, on_ready=on_ready)
                one.update(cl.timings)
                d = cpu_delta(snaps["a"], snaps["b"])
                windows.append(d)
                one["engines_cpu_s"] = d["cpu_s_by_group"].get(f"engines/{k}", 0.0)
                one["window_foreign_cpu_s"] = d["foreign_cpu_s"]
            except Exception as e:
                fails[k] += 1
                recs[k]["errors"].append(_err("startup", e, cl, traceback.format_exc()))
                log(f"  {k}: start-up #{rep} with {n} engine(s) FAILED: {e}")
            finally:
                _finish(cl, tmp, cfg, t0)
            one["engines_stop_s"] = cl.stop_info.get("engines_stop_s")
            one["engine_sigkilled"] = len(cl.stop_info.get("engine_sigkilled") or [])
            recs[k]["errors"].extend(tmp["errors"])
            if tmp.get("logs"):
                recs[k].setdefault("logs", {}).update(tmp["logs"])
            recs[k]["starts"].append(one)
            if "engines_registered_s" in one:
                log(f"  {k}: start-up #{rep}, {n} engine(s): registered {one['engines_registered_s']:.3f}s, "
                    f"first execute {one['first_execute_s']:.3f}s after launch, engines' CPU "
                    f"{one['engines_cpu_s']:.2f}s; engines stopped in {one['engines_stop_s']:.2f}s")
    if windows:
        d = merge_deltas(windows)
        d["block"] = f"startup n={n}: {len(windows)} windows launch → first execute"
        d["combos"] = keys
        d["engines"] = n
        d["ok"] = True
        noise.append(d)
    for k, r in recs.items():
        ok = [x for x in r["starts"] if "engines_registered_s" in x]
        if ok:
            r["workloads"]["startup"] = {
                "registered_s": stats([x["engines_registered_s"] for x in ok]),
                "first_execute_s": stats([x["first_execute_s"] for x in ok]),
                "engines_stop_s": stats([x["engines_stop_s"] for x in ok if x.get("engines_stop_s") is not None]),
                "engines_cpu_s": stats([x["engines_cpu_s"] for x in ok]),
                "starts": len(ok),
            }
        r["block_wall_s"] = time.perf_counter() - t_blk
        r["idle_wait"] = wi
    return [recs[k] for k in keys]


def _short(e: Exception, cl: Cluster) -> str:
    """One line for the markdown: the error's first line + the hub's last log line."""
    first = (str(e).splitlines() or [""])[0].removesuffix("; hub log:")
    s = f"{type(e).__name__}: {first}"
    if cl.hub_popen is not None and cl.hub_popen.poll() is not None and "exited" not in s:
        s += f" (hub exited with code {cl.hub_popen.returncode})"
    last = [ln for ln in cl.hub_log(20).splitlines() if ln.strip()]
    if last:
        s += f" — hub log: `{last[-1].strip()[:200]}`"
    return s


def _brief(w: str, r: dict) -> str:
    if w == "startup":
        return (f"launch -> registered median {r['registered_s']['median']:.3f}s, "
                f"-> first execute {r['first_execute_s']['median']:.3f}s ({r['starts']} starts)")
    if w == "rtt":
        return (f"direct median {r['direct']['stats']['median']:.2f} ms, "
                f"lb median {r['lb']['stats']['median']:.2f} ms")
    if w == "fanout":
        return f"median {r['stats']['median']:.2f} ms"
    if w == "lb":
        return (f"apply_async {r['apply_async_tasks_per_s_at_median']:.0f} tasks/s, "
                f"map_sync {r['map_sync_tasks_per_s_at_median']:.0f} tasks/s")
    if w == "mem":
        p0, p1 = r["points"][0], r["points"][-1]
        return (f"{r['tasks']} tasks, hub RSS {p0['proc_rss_mib']:.1f} -> {p1['proc_rss_mib']:.1f} MiB, "
                f"{r['overall_tasks_per_s']:.0f} tasks/s")
    return ""


# --------------------------------------------------------------------------
# environment


def versions(cfg: Config) -> dict:
    import ipyparallel
    import IPython
    import ipykernel
    import jupyter_client
    import tornado
    import traitlets
    import zmq

    v = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "ipyparallel": ipyparallel.__version__,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "jupyter_client": jupyter_client.__version__,
        "ipykernel": ipykernel.__version__,
        "IPython": IPython.__version__,
        "tornado": tornado.version,
        "traitlets": traitlets.__version__,
        "psutil": psutil.__version__,
        "numpy": _optional_version("numpy"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_kib": _meminfo_total(),
        "cpu_model": _cpu_model(),
    }
    try:
        v["git_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        v["git_dirty"] = bool(dirty)
    except Exception:
        pass
    if cfg.needs_parallax_bin():
        binp = cfg.hub_cmd["parallax"][0]
        v["parallax_bin"] = getattr(cfg, "parallax_bin_source", binp)
        try:
            import hashlib

            with open(binp, "rb") as f:
                v["parallax_bin_sha256"] = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(v["parallax_bin"])
            v["parallax_bin_mtime"] = _dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")
            r = subprocess.run([binp, "--version"], capture_output=True, text=True, timeout=10)
            v["parallax"] = (r.stdout.strip() or r.stderr.strip())[:200]
        except Exception as e:
            v["parallax"] = f"unknown ({e!r})"
    return v


def _optional_version(mod: str) -> str | None:
    # ipcontroller's task scheduler imports numpy at start when it is installed (~10 MiB
    # more RSS per controller process): record whether it was there
    # (metadata only: importing numpy here would change the client's own code paths)
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _meminfo_total():
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1])
    except Exception:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return None


def preflight(cfg: Config) -> None:
    needed = []
    if "ipcontroller" in cfg.hubs:
        needed.append(cfg.hub_cmd["ipcontroller"][0])
    if "ipengine" in cfg.engine_kinds:
        needed.append(cfg.ipengine)
    if "parallax" in cfg.engine_kinds:
        needed.append(cfg.engine_python)
    for path in needed:
        if not os.access(path, os.X_OK):
            raise SystemExit(f"error: {path} not found or not executable (run `make venv`, or pass --venv-bin)")
    if cfg.needs_parallax_bin():
        binp = os.environ.get("PARALLAX_BIN", "")
        if not binp:
            raise SystemExit(
                "error: PARALLAX_BIN is not set. Build the hub (`make build`) and run "
                "`PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_hub.py`, "
                "or `make bench`; use `--only ipcontroller --engine-kinds ipengine` to benchmark stock "
                "ipyparallel alone."
            )
        if not (os.path.isfile(binp) and os.access(binp, os.X_OK)):
            raise SystemExit(
                f"error: PARALLAX_BIN={binp} does not exist or is not executable "
                "(run `make build` first, or use `--only ipcontroller`)."
            )
        subs = (["hub"] if "parallax" in cfg.hubs else []) + (["engine"] if "parallax" in cfg.engine_kinds else [])
        for sub in subs:
            try:
                r = subprocess.run([binp, sub, "--help"], capture_output=True, text=True, timeout=15)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"error: `{binp} {sub} --help` did not return within 15s")
            if r.returncode != 0:
                raise SystemExit(
                    f"error: `{binp} {sub} --help` exited with code {r.returncode}; "
                    f"is the {sub} subcommand implemented?\n{(r.stderr or r.stdout)[-2000:]}"
                )


# --------------------------------------------------------------------------
# summary


def summarize(cfg: Config, recs: list[dict]) -> list[dict]:
    """Rows: workload, metric, unit, better ('lower'|'higher'), values per combination ("hub/engine")."""
    by = {}
    for r in recs:
        for w, d in r["workloads"].items():
            by[(r["key"], w, r["n"])] = d

    rows = []
    hub_ratios = ("hub", "a")  # hub-side measurements: the engine-vs-engine ratio says little
    engine_ratios = ("a", "b", "b-ipc")  # engine-side measurements: the hub ratio says little

    def add(workload, metric, unit, better, getter, key, ratios=None):
        vals = {}
        for k in cfg.keys:
            d = by.get((k,) + key)
            if d is None:
                continue
            try:
                v = getter(d, k)
            except (KeyError, IndexError, TypeError, ValueError, statistics.StatisticsError):
                v = None
            if v is not None:
                vals[k] = v
        if vals:
            rows.append({"workload": workload, "metric": metric, "unit": unit, "better": better, "values": vals,
                         "ratios": list(ratios) if ratios else None})

    if "startup" in cfg.workloads:
        hub = HUB_LABEL.get(cfg.startup_hub, cfg.startup_hub)
        for n in cfg.startup_engines:
            add("0. engine start-up", f"launch → all {n} registered, median of {cfg.startup_repeat} ({hub})",
                "s", "lower", lambda d, k: d["registered_s"]["median"], ("startup", n))
            add("0. engine start-up", f"launch → first dv.execute answered by all {n}, median ({hub})",
                "s", "lower", lambda d, k: d["first_execute_s"]["median"], ("startup", n))
        for n in cfg.startup_engines:
            add("0. engine start-up", f"  (info) engines' CPU from launch to first execute, {n} engine(s), median "
                f"({hub})", "CPU s", "lower", lambda d, k: d["engines_cpu_s"]["median"], ("startup", n))
        for n in cfg.startup_engines:
            grace = " / ".join(f"{g} s ({k})" for k, g in (("ipengine", 2), ("parallax", 3)) if k in cfg.engine_kinds)
            add("0. engine start-up", f"  (info) SIGTERM → all processes of {n} engine(s) gone, median; "
                f"SIGKILL after {grace} ({hub})",
                "s", "lower", lambda d, k: d["engines_stop_s"]["median"], ("startup", n))
    if "rtt" in cfg.workloads:
        for label, desc in (("direct", "rc[0].apply_sync(lambda: None)"), ("lb", "lview.apply_sync(lambda: None)")):
            for stat in ("median", "p90", "min"):
                add("1. round trip, 1 engine", f"{desc} {stat}", "ms", "lower",
                    lambda d, h, label=label, stat=stat: d[label]["stats"][stat], ("rtt", 1))
            add("1. round trip, 1 engine", f"  hub CPU per 1000 {label} round trips", "CPU s", "lower",
                lambda d, h, label=label: d[label]["cpu"]["hub_cpu_s"] / d[label]["stats"]["count"] * 1000,
                ("rtt", 1), hub_ratios)
            add("1. round trip, 1 engine", f"  engine CPU per 1000 {label} round trips", "CPU s", "lower",
                lambda d, h, label=label: d[label]["cpu"]["engines_cpu_s"] / d[label]["stats"]["count"] * 1000,
                ("rtt", 1), engine_ratios)
    if "fanout" in cfg.workloads:
        for n in cfg.engines:
            add("2. fan-out", f"dv.execute('a=1', block=True), {n} engine(s), median", "ms", "lower",
                lambda d, h: d["stats"]["median"], ("fanout", n))
    if "lb" in cfg.workloads:
        for n in cfg.lb_engines:
            add("3. load-balanced throughput",
                f"{cfg.lb_tasks} x lview.apply_async(noop) + wait, {n} engines", "tasks/s", "higher",
                lambda d, h: d["apply_async_tasks_per_s_at_median"], ("lb", n))
            add("3. load-balanced throughput",
                f"  submit loop only (client side), {n} engines", "tasks/s", "higher",
                lambda d, h: cfg.lb_tasks / statistics.median(x["submit_s"] for x in d["apply_async"]), ("lb", n))
            add("3. load-balanced throughput",
                f"lview.map_sync(f, range({cfg.lb_tasks}), chunksize=1), {n} engines", "tasks/s", "higher",
                lambda d, h: d["map_sync_tasks_per_s_at_median"], ("lb", n))
            add("3. load-balanced throughput",
                f"  hub CPU per 1000 tasks (apply_async + map_sync), {n} engines", "CPU s", "lower",
                lambda d, h: _cpu_per_k(d, cfg.lb_tasks, "hub_cpu_s"), ("lb", n), hub_ratios)
            add("3. load-balanced throughput",
                f"  engines' CPU per 1000 tasks (all engine processes), {n} engines", "CPU s", "lower",
                lambda d, h: _cpu_per_k(d, cfg.lb_tasks, "engines_cpu_s"), ("lb", n), engine_ratios)
    if "mem" in cfg.workloads:
        n = cfg.mem_engines
        checkpoints = sorted({0, cfg.cap_tasks} | ({cfg.tasks // 2, cfg.tasks} if cfg.full_tasks_keys else set()))
        for cp in checkpoints:
            label = "start" if cp == 0 else f"after {cp:,} tasks"
            add("4. hub memory", f"hub process RSS, {label}", "MiB", "lower",
                lambda d, h, cp=cp: _mem_at(d, cp, "proc_rss_mib"), ("mem", n), hub_ratios)
            add("4. hub memory", f"hub process tree RSS, {label}", "MiB", "lower",
                lambda d, h, cp=cp: _mem_at(d, cp, "tree_rss_mib"), ("mem", n), hub_ratios)
            add("4. hub memory", f"hub process tree PSS, {label}", "MiB", "lower",
                lambda d, h, cp=cp: _mem_at(d, cp, "tree_pss_mib"), ("mem", n), hub_ratios)
        add("4. hub memory", f"throughput during the memory run (map_async chunksize=1, {cfg.batch}/batch)",
            "tasks/s", "higher", lambda d, h: d["overall_tasks_per_s"], ("mem", n))
        add("4. hub memory", "  hub CPU per 1000 tasks in the memory run", "CPU s", "lower",
            lambda d, h: d["cpu"]["hub_cpu_s"] / d["tasks"] * 1000, ("mem", n), hub_ratios)
        add("4. hub memory", "  engines' CPU per 1000 tasks in the memory run", "CPU s", "lower",
            lambda d, h: d["cpu"]["engines_cpu_s"] / d["tasks"] * 1000, ("mem", n), engine_ratios)
        for cp in (0, cfg.cap_tasks):
            label = "idle after start" if cp == 0 else f"after {cp:,} tasks"
            for m, mname in (("rss_mib", "RSS"), ("pss_mib", "PSS"), ("uss_mib", "USS")):
                add("5. engine memory", f"per engine, all its processes, {mname}, {label}", "MiB", "lower",
                    lambda d, h, cp=cp, m=m: _eng_mem_at(d, cp, "total", m), ("mem", n), engine_ratios)
    # cluster start (depends on --ping for ipcontroller: registration completes on a heartbeat)
    for r_n in sorted({r["n"] for r in recs if "start" in r}):
        vals = {}
        for r in recs:
            if r["n"] == r_n and "start" in r and "engines_registered_s" in r["start"]:
                vals.setdefault(r["key"], []).append(r["start"]["engines_registered_s"])
        if vals:
            rows.append({"workload": "0. start-up (info)",
                         "metric": f"cluster blocks: engines launched -> {r_n} registered (ping {cfg.ping} ms)",
                         "unit": "s", "better": "lower", "ratios": None,
                         "values": {h: statistics.median(v) for h, v in vals.items()}})
    for row in rows:
        row["ratio"] = {}
        for rid, (_, base, cand) in ratio_columns(cfg):
            if row["ratios"] is None or rid in row["ratios"]:
                row["ratio"][rid] = _ratio(row, base, cand)
    return rows


def ratio_columns(cfg: Config) -> list[tuple[str, tuple[str, str, str]]]:
    """The ratio columns whose two combinations both run: (id, (title, baseline, candidate))."""
    ids = ("hub", "a", "b", "b-ipc")
    return [(rid, r) for rid, r in zip(ids, RATIOS) if r[1] in cfg.keys and r[2] in cfg.keys]


def _cpu_per_k(d, N, what):
    cpus = [x["cpu"][what] for x in d["apply_async"] + d["map_sync"]]
    runs = len(d["apply_async"]) + len(d["map_sync"])
    return sum(cpus) / (runs * N) * 1000.0


def _mem_at(d, cp, key):
    for p in d["points"]:
        if p["tasks"] == cp:
            return p.get(key)
    return None


def _eng_mem_at(d, cp, part, key):
    for p in d.get("engine_mem", []):
        if p["tasks"] == cp:
            return p["mean"].get(part, {}).get(key)
    return None


def _ratio(row, base, cand):
    v = row["values"]
    a, b = v.get(base), v.get(cand)
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b if row["better"] == "lower" else b / a


def _fmt(x, unit):
    if x is None:
        return "—"
    if unit == "tasks/s":
        return f"{x:,.0f}"
    if unit == "MiB":
        return f"{x:.1f}"
    if unit == "CPU s":
        return f"{x:.3f}"
    if unit == "s" and abs(x) < 10:
        return f"{x:.3f}" if abs(x) < 1 else f"{x:.2f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _noisy(d) -> bool:
    # sub-second blocks are at the mercy of 10 ms tick accounting: require real foreign CPU-seconds too
    return d["foreign_pct"] > 5 and d["foreign_cpu_s"] > 0.25


def _rec(recs, key, w, n):
    for r in recs:
        if r["key"] == key and r["n"] == n and w in r["workloads"]:
            return r["workloads"][w]
    return None


def startup_table(cfg: Config, recs: list[dict]) -> list[str]:
    """Start-up sweep, one row per engine count: median (min–max) per engine kind."""
    hub = cfg.startup_hub
    keys = [combo(hub, k) for k in cfg.engine_kinds]
    if not any(_rec(recs, k, "startup", n) for k in keys for n in cfg.startup_engines):
        return []
    L = [f"**Engine start-up on the {HUB_LABEL.get(hub, hub)}** (clusters started one at a time, engine kinds "
         f"alternating; {cfg.startup_repeat} starts each; seconds from launching the engines, hub already up; "
         "median (min–max)):", ""]
    hdr = ["engines"]
    for k in keys:
        hdr += [f"{combo_label(k)}: → registered", f"{combo_label(k)}: → first execute"]
    pair = len(keys) == 2
    if pair:
        hdr += ["ratio registered (>1: parallax engine better)", "ratio first execute"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    for n in cfg.startup_engines:
        cells = [str(n)]
        meds = {}
        for k in keys:
            d = _rec(recs, k, "startup", n)
            for what in ("registered_s", "first_execute_s"):
                if d is None:
                    cells.append("—")
                    continue
                st = d[what]
                meds[(k, what)] = st["median"]
                cells.append(f"{st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f})")
        if pair:
            for what in ("registered_s", "first_execute_s"):
                a, b = meds.get((keys[0], what)), meds.get((keys[1], what))
                cells.append(f"{a / b:.2f}×" if a and b else "—")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    return L


def engine_memory_table(cfg: Config, recs: list[dict]) -> list[str]:
    """Per-engine memory by process, every combination: idle after start, after cap_tasks, at the end."""
    rows = []
    for k in cfg.keys:
        d = _rec(recs, k, "mem", cfg.mem_engines)
        if not d or not d.get("engine_mem"):
            continue
        hub, engine = split_combo(k)
        pts = {p["tasks"]: p for p in d["engine_mem"]}
        end = d["engine_mem"][-1]
        for part in ENGINE_PARTS[engine] + ("total",):
            cells = [HUB_LABEL[hub], ENGINE_LABEL[engine], PART_LABEL[part]]
            for cp in (0, cfg.cap_tasks):
                m = pts.get(cp, {}).get("mean", {}).get(part)
                cells += [f"{m[x]:.1f}" if m else "—" for x in ("rss_mib", "uss_mib", "pss_mib")]
            m = end["mean"].get(part)
            cells.append(f"{m['rss_mib']:.1f} ({end['tasks']:,})" if m and end["tasks"] != cfg.cap_tasks else "—")
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    L = [f"**Memory per engine** (MiB, mean over the {cfg.mem_engines} engines of the memory run; ipengine = the "
         "ipengine process + the nanny process it starts; parallax engine = the Rust process + the Python subprocess "
         "that runs user code; USS = pages private to the process, PSS = shared pages split among their users):", "",
         f"| hub | engine | process | RSS idle after start | USS | PSS | RSS after {cfg.cap_tasks:,} tasks | USS | PSS "
         "| RSS at the end of a longer run (tasks) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    note = ("The parallax engine's Python subprocess imports ipyparallel's serialization only when the first task "
            "arrives, so its idle-after-start figure is a floor: compare engines after tasks (ipengine has all of "
            "ipyparallel loaded from the start).")
    return L + rows + ["", note, ""]


def targets(cfg: Config, recs: list[dict]) -> list[str]:
    """The issue's targets, reported (not asserted)."""
    L = []
    rust, ipe = [], []
    for k in cfg.keys:
        d = _rec(recs, k, "mem", cfg.mem_engines)
        if not d or not d.get("engine_mem"):
            continue
        pts = d["engine_mem"]
        for p in pts:
            m = p["mean"]
            shown = p["tasks"] in (0, cfg.cap_tasks) or p is pts[-1]
            if "rust" in m and m["rust"]:
                rust.append((k, p["tasks"], m["rust"]["rss_mib"], m["rust"].get("max_rss_mib", m["rust"]["rss_mib"]),
                             shown))
            if "total" in m and m["total"] and split_combo(k)[1] == "ipengine":
                ipe.append((k, p["tasks"], m["total"]["rss_mib"]))
    if rust:
        worst = max(x[3] for x in rust)
        L.append(f"- Rust part of a parallax engine < 10 MiB RSS: "
                 + "; ".join(f"{HUB_LABEL[split_combo(k)[0]]} {'idle' if t == 0 else f'after {t:,} tasks'} "
                             f"{v:.1f} MiB" for k, t, v, _, shown in rust if shown)
                 + f" (largest single engine at any point of the memory run: {worst:.1f} MiB) — "
                 f"**{'met' if worst < 10 else 'not met'}**."
                 + (f" ipengine + nanny for comparison: {min(x[2] for x in ipe):.0f}–{max(x[2] for x in ipe):.0f} MiB "
                    "RSS per engine (issue: ≈ 95 MiB)." if ipe else ""))
    hub = cfg.startup_hub
    d = _rec(recs, combo(hub, "parallax"), "startup", 4)
    if d:
        st = d["registered_s"]
        ipe4 = _rec(recs, combo(hub, "ipengine"), "startup", 4)
        L.append(f"- 4 parallax engines registered within 0.3 s of launch ({HUB_LABEL[hub]}): median "
                 f"{st['median']:.3f} s (min {st['min']:.3f}, max {st['max']:.3f}, {st['count']} starts) — "
                 f"**{'met' if st['median'] <= 0.3 else 'not met'}** (first execute answered by all 4: "
                 f"{d['first_execute_s']['median']:.3f} s)."
                 + (f" 4 ipengines: {ipe4['registered_s']['median']:.3f} s." if ipe4 else ""))
    elif "parallax" in cfg.engine_kinds and "startup" in cfg.workloads:
        L.append("- 4 engines registered within 0.3 s: not measured (4 not in --startup-engines).")
    if L:
        L = ["**Targets from the issue** (reported, not asserted):", ""] + L + [""]
    return L


def markdown(cfg: Config, env: dict, rows: list[dict], recs: list[dict], noise: list, meta: dict) -> str:
    L = []
    L.append(f"### Parallax vs ipyparallel: hubs × engines — {meta['date']}")
    L.append("")
    L.append("Command: `" + " ".join(["PARALLAX_BIN=" + env["parallax_bin"]] if env.get("parallax_bin") else [])
             + (" " if env.get("parallax_bin") else "") + " ".join(meta["argv_display"]) + "`.")
    L.append("")
    L.append(
        f"Stock ipyparallel {env['ipyparallel']} `Client` throughout, against every combination of hub "
        f"({', '.join(cfg.hubs)}) and engine ({', '.join(ENGINE_LABEL[k] for k in cfg.engine_kinds)}): "
        + ", ".join(combo_label(k) for k in cfg.keys) + ". "
        "Latency/fan-out/throughput: all combinations' clusters up side by side, samples interleaved "
        "one by one (forward/reverse order), throughput runs alternating; memory and start-up: each cluster alone. "
        "Fresh clusters per block. Hubs: "
        f"`--ip=127.0.0.1 --ping={cfg.ping} --log-level=WARN`"
        + (f" `--scheme={cfg.scheme}`" if cfg.scheme else "")
        + (f" `--hwm={cfg.hwm}`" if cfg.hwm is not None else "")
        + "; engines: `--log-level=WARN`"
        + (f"; parallax engines `--python={cfg.engine_python}`" if "parallax" in cfg.engine_kinds else "")
        + ". Python " + env["python"] + f", pyzmq {env['pyzmq']} (libzmq {env['libzmq']}), "
        + (f"numpy {env['numpy']} installed (ipcontroller imports it at start: +10 MiB RSS), " if env.get("numpy") else "")
        + f"{env['cpus']} CPUs ({env.get('cpu_model') or '?'}), {platform.system()} {platform.release()}."
    )
    if "parallax" in env:
        L.append(f"Parallax: `{env['parallax']}` (git {env.get('git_head', '?')}"
                 f"{', dirty tree' if env.get('git_dirty') else ''}).")
    L.append("")
    rcols = ratio_columns(cfg)
    if rcols:
        L.append("**Ratios** = how many times better the Parallax side is: for times, memory and CPU baseline ÷ "
                 "candidate, for throughput candidate ÷ baseline. **> 1 means Parallax is better.** "
                 + " ".join(f"{t.replace('**', '')}: {combo_label(c)} vs {combo_label(b)}." for _, (t, b, c) in rcols)
                 + " Hub-side rows (hub memory, hub CPU) carry no engine ratio; engine-side rows (engine memory, "
                 "engine CPU) no hub ratio.")
        L.append("")
    L += targets(cfg, recs)
    keys = cfg.keys
    hdr = ["workload", "measurement", "unit"] + [combo_label(k) for k in keys] + [t for _, (t, _, _) in rcols]
    if rows:
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
    else:
        L.append("**No measurements completed.**")
    for r in rows:
        cells = [r["workload"], r["metric"], r["unit"]] + [_fmt(r["values"].get(k), r["unit"]) for k in keys]
        for rid, _ in rcols:
            x = r["ratio"].get(rid)
            cells.append("" if rid not in r["ratio"] else ("—" if x is None else f"{x:.2f}×"))
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L += startup_table(cfg, recs)
    L += engine_memory_table(cfg, recs)
    reps = ", ".join(f"{combo_label(k)} {cfg.repeat_for(k)}" for k in keys)
    counts = (f"Counts: start-up {cfg.startup_repeat} starts per engine kind and count "
              f"({', '.join(map(str, cfg.startup_engines))} engines); round trip {cfg.samples} samples "
              f"(+{cfg.warmup} warm-up) each; fan-out {cfg.fanout_samples} (+{cfg.fanout_warmup}); throughput "
              f"{cfg.lb_tasks} tasks per run, tasks/s at the median wall time, repeats: {reps}; memory run with "
              f"{cfg.mem_engines} engines, batches of {cfg.batch} tasks, `purge_everything()` after each batch.")
    L.append(counts)
    mem_counts = []
    for r in recs:
        if "mem" in r["workloads"]:
            mem_counts.append(f"{combo_label(r['key'])} {r['workloads']['mem']['tasks']:,} tasks")
    if mem_counts:
        extra = ""
        if len(mem_counts) > 1 and len(set(cfg.tasks_for(k) for k in keys)) > 1:
            extra = (f" Only {', '.join(combo_label(k) for k in sorted(cfg.full_tasks_keys))} runs the full "
                     f"{cfg.tasks:,} tasks (time budget; ipcontroller runs ≈300 tasks/s; `--mem-full` runs it "
                     f"everywhere), so the later checkpoints of the others are blank; compare at {cfg.cap_tasks:,}.")
        L.append(f"Memory run: {', '.join(mem_counts)}.{extra} ipcontroller 'process' = the main controller "
                 "process; its tree adds 8 forked children (schedulers, heart monitor, queues) whose RSS double-counts "
                 "pages shared with the parent, so compare the tree by PSS.")
    L.append("")
    # errors
    errs = [(r["key"], r["n"], e) for r in recs for e in r["errors"]]
    if errs:
        L.append("**Failures:**")
        L.append("")
        for key, n, e in errs:
            first = e.get("short") or (e["error"].splitlines() or [""])[0]
            L.append(f"- {combo_label(key)}, {n} engine(s), {e['workload']}: {first}")
        L.append("")
    warns = [(r["key"], r["n"], w) for r in recs for w in r.get("warnings", [])]
    if warns:
        L.append("**Warnings:**")
        L.append("")
        for key, n, w in warns:
            L.append(f"- {combo_label(key)}, {n} engine(s): {w}")
        L.append("")
    # noise
    L.append("<details><summary>Noise: CPU per measurement block</summary>")
    L.append("")
    L.append("busy = machine-wide non-idle CPU; CPU s = CPU-seconds of the client (this script) and of each "
             "cluster's hub and engines (ipc = ipcontroller, plx = parallax hub; ipe = ipengine, pxe = parallax "
             "engine; in side-by-side blocks the idle clusters are counted too); foreign = busy minus everything "
             "this benchmark started, in % of all cores; steal = VM steal. Start-up rows cover only the measured "
             "windows (engines launched → first execute answered), summed over all starts.")
    L.append("")
    L.append("| block | clusters | wall s | busy % | CPU s | foreign % | steal % | load avg |")
    L.append("|---|---|---|---|---|---|---|---|")
    for d in noise:
        parts = []
        for k, v in sorted(d["cpu_s_by_group"].items(), key=lambda kv: (kv[0] != "client", kv[0])):
            role, _, key = k.partition("/")
            if v < 0.05 and role != "client":
                continue
            parts.append(f"{combo_short(key) + ' ' if key else ''}{role} {v:.1f}")
        flag = " ⚠" if _noisy(d) else ""
        L.append(
            f"| {d['block']} | {'+'.join(combo_short(k) for k in d['combos'])} | {d['wall_s']:.1f} | "
            f"{d['busy_pct']:.0f} | {', '.join(parts)} | {d['foreign_pct']:.1f}{flag} | "
            f"{d['steal_pct']:.1f} | {d['loadavg_end'][0]:.2f} |"
        )
    L.append("")
    L.append("</details>")
    L.append("")
    long_blocks = [d for d in noise if d["wall_s"] >= 2.0]
    worst = max((d["foreign_pct"] for d in long_blocks), default=0.0)
    noisy = [d for d in noise if _noisy(d)]
    L.append(f"Max foreign CPU in any block of ≥ 2 s: {worst:.1f} % of the machine"
             + (f" — **{len(noisy)} noisy block(s) (⚠: > 5 % and > 0.25 CPU-s foreign); rerun those before "
                "quoting them**." if noisy else " (quiet).")
             + f" Load average at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f}. "
             f"Total runtime {meta['runtime_s'] / 60:.1f} min.")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults (full run, ~15 min on 2 cores): hubs ipcontroller,parallax x engines ipengine,parallax; "
               "start-up sweep 1,2,4,8 engines x 4 starts per engine kind; engines 1,2,4,8; rtt 1000 samples; "
               "fan-out 300; lb 2 x 5000 tasks at 2 and 4 engines (1 repeat for ipcontroller + parallax engine); "
               "memory 50000 tasks on parallax hub + parallax engine, 20000 on every other combination.",
    )
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run (~3-4 min for the full matrix)")
    ap.add_argument("--only", choices=HUBS, help="benchmark one hub only")
    ap.add_argument("--engine-kinds", default=",".join(ENGINE_KINDS),
                    help="engines to run against every hub: ipengine, parallax or both (default ipengine,parallax)")
    ap.add_argument("--engine-python", help="--python for parallax engines (default: the venv's python)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="subset of startup,rtt,fanout,lb,mem (default all)")
    ap.add_argument("--startup-engines", help="engine counts for the start-up sweep (default 1,2,4,8; quick 1,4)")
    ap.add_argument("--startup-repeat", type=int, help="starts per engine kind and count (default 4; quick 2)")
    ap.add_argument("--engines", help="engine counts for the fan-out (default 1,2,4,8; quick 1,2)")
    ap.add_argument("--lb-engines", help="engine counts for load-balanced throughput (default 2,4; quick 2)")
    ap.add_argument("--mem-engines", type=int, default=2, help="engines in the memory run (default 2)")
    ap.add_argument("--samples", type=int, help="round-trip samples (default 1000; quick 100)")
    ap.add_argument("--warmup", type=int, help="round-trip warm-up calls (default 50; quick 10)")
    ap.add_argument("--fanout-samples", type=int, help="fan-out samples per engine count (default 300; quick 30)")
    ap.add_argument("--lb-tasks", type=int, help="tasks per throughput measurement (default 5000; quick 500)")
    ap.add_argument("--repeat", type=int, help="repeats of each throughput measurement (default 2; quick 1)")
    ap.add_argument("--repeat-extra", type=int,
                    help="throughput repeats for ipcontroller + parallax engine (default 1; capped at --repeat)")
    ap.add_argument("--tasks", type=int,
                    help="tasks in the memory run on parallax hub + parallax engine (default 50000; quick 2000)")
    ap.add_argument("--cap-tasks", "--ipc-tasks", dest="cap_tasks", type=int,
                    help="memory-run tasks for every other combination (default 20000; quick 1000); engine "
                         "memory is compared at this checkpoint")
    ap.add_argument("--mem-full", "--ipc-full", dest="mem_full", action="store_true",
                    help="run the full --tasks count on every combination")
    ap.add_argument("--batch", type=int, help="tasks per map_async batch in the memory run (default 5000)")
    ap.add_argument("--ping", type=int, default=1000, help="--ping (heartbeat period, ms) for both hubs (default 1000)")
    ap.add_argument("--scheme", help="pass --scheme to both hubs (default: hub default, leastload)")
    ap.add_argument("--hwm", type=int, help="pass --hwm to both hubs (default: hub default, 1)")
    ap.add_argument("--start-timeout", type=float, default=60.0, help="seconds for a cluster to come up")
    ap.add_argument("--op-timeout", type=float, default=30.0, help="seconds for a single blocking call")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each cluster, wait up to SECONDS for machine CPU < 10%% busy "
                         "(for a shared box; default 0 = don't wait)")
    ap.add_argument("--venv-bin", default=str(REPO / ".venv" / "bin"), help="where ipcontroller/ipengine live")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON/markdown results go")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary profile dirs and logs")
    return ap.parse_args(argv)


def _display_path(p: str) -> str:
    try:
        return str(Path(p).absolute().relative_to(Path.cwd()))
    except ValueError:
        return p


def main(argv=None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    workroot = Path(tempfile.mkdtemp(prefix="parallax-bench-"))
    cfg = Config(args, workroot)
    cfg.keep_work = args.keep_work
    try:
        preflight(cfg)
    except SystemExit:
        shutil.rmtree(workroot, ignore_errors=True)
        raise

    if cfg.needs_parallax_bin():
        # run a private copy, so a rebuild during the run cannot mix two binaries
        src = cfg.hub_cmd["parallax"][0]
        snap = workroot / "parallax-bin" / Path(src).name
        snap.parent.mkdir()
        shutil.copy2(src, snap)
        cfg.parallax_bin_source = src
        cfg.hub_cmd["parallax"][0] = str(snap)
        cfg.engine_cmd["parallax"][0] = str(snap)

    # our own process: same isolation as the children
    for k in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        os.environ[k] = cfg.child_env[k]

    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)

    env = versions(cfg)
    start_stamp = _dt.datetime.now()
    meta = {"date": start_stamp.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": list(os.getloadavg()),
            "argv": sys.argv, "argv_display": [_display_path(sys.executable), _display_path(sys.argv[0])] + sys.argv[1:]}
    plan = make_plan(cfg)
    log(f"hubs: {', '.join(cfg.hubs)}; engines: {', '.join(cfg.engine_kinds)}; combinations: "
        f"{', '.join(cfg.keys)}; ping {cfg.ping} ms; work dir {workroot}")
    for i, b in enumerate(plan):
        if b.get("startup"):
            how = (f" on {cfg.startup_hub}: {cfg.startup_repeat} starts per engine kind, one cluster at a time")
        elif b["paired"]:
            how = " (all combinations side by side, samples interleaved)"
        else:
            how = " (each combination alone)"
        log(f"plan {i}: {b['n']} engine(s): {', '.join(b['workloads'])}{how}")
    if "lb" in cfg.workloads:
        log("throughput repeats: " + ", ".join(f"{k} {cfg.repeat_for(k)}" for k in cfg.keys))
    if "mem" in cfg.workloads:
        log("memory run: " + ", ".join(f"{k} {cfg.tasks_for(k):,} tasks" for k in cfg.keys))

    recs: list[dict] = []
    noise: list[dict] = []
    interrupted = False
    try:
        for i, b in enumerate(plan):
            order = cfg.keys if i % 2 == 0 else list(reversed(cfg.keys))
            if b.get("startup"):
                log(f"block {i}: start-up of {b['n']} engine(s) on {cfg.startup_hub}, "
                    f"{cfg.startup_repeat} x {' / '.join(cfg.engine_kinds)}")
                recs.extend(run_startup_block(b, cfg, workroot, noise, i))
            elif b["paired"]:
                log(f"block {i}: {b['n']} engine(s), {','.join(b['workloads'])}; "
                    + (f"{' + '.join(order)} side by side" if len(order) > 1 else f"on {order[0]}"))
                recs.extend(run_paired_block(b, order, cfg, workroot, noise, i))
            else:
                for key in order:
                    log(f"block {i}: {b['n']} engine(s), {','.join(b['workloads'])} on {key} alone")
                    recs.append(run_single_block(key, b, cfg, workroot, noise, i))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up and writing partial results")
    finally:
        leftovers = REAPER.alive()
        if leftovers:
            log(f"killing {len(leftovers)} leftover process(es): {[p.pid for p in leftovers]}")
            REAPER.kill(leftovers, grace=2.0)
        meta["leftover_processes_killed_at_end"] = [p.pid for p in leftovers]
        if not cfg.keep_work:
            shutil.rmtree(workroot, ignore_errors=True)

    meta["loadavg_end"] = list(os.getloadavg())
    meta["runtime_s"] = time.perf_counter() - t_run
    meta["interrupted"] = interrupted
    rows = summarize(cfg, recs)
    md = markdown(cfg, env, rows, recs, noise, meta)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = start_stamp.strftime("%Y%m%d-%H%M%S")
    jpath = out_dir / f"hub-{stamp}.json"
    result = {"meta": meta, "config": cfg.as_dict(), "env": env, "plan": plan, "summary": rows,
              "blocks": recs, "noise": noise}
    jpath.write_text(json.dumps(result, indent=1, default=str))
    (out_dir / f"hub-{stamp}.md").write_text(md)
    print(md, flush=True)
    log(f"wrote {jpath} (and .md); runtime {meta['runtime_s']:.0f}s")
    nerr = sum(len(r["errors"]) for r in recs)
    if nerr:
        log(f"{nerr} failure(s); see the JSON 'blocks[].errors'")
    return 130 if interrupted else (1 if nerr else 0)


if __name__ == "__main__":
    sys.exit(main())
