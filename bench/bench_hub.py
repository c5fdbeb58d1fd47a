#!/usr/bin/env python3
"""Side-by-side benchmark: stock ipyparallel controller vs. the Parallax hub.

The same stock ipyparallel ``Client`` and stock ``ipengine`` processes are run
against two hubs, in one run, on the same workloads:

* ``ipcontroller``  -- ``.venv/bin/ipcontroller`` (ipyparallel's own controller)
* ``parallax``      -- ``$PARALLAX_BIN hub``

Both hubs get identical arguments (``--profile-dir --cluster-id --ip --ping
--log-level`` and optionally ``--scheme`` / ``--hwm``).  Every cluster is
fresh, in a fresh temporary profile directory.  For rtt/fanout/lb both hubs'
clusters (same engine count) are up side by side: latency samples alternate
between them one by one (ABBA order) and throughput runs alternate repeat by
repeat, so that the noise of this shared machine hits both hubs alike.  The
memory run has each hub's cluster up alone, one after the other.

Workloads
  rtt     1 engine: ``rc[0].apply_sync(lambda: None)`` round trip (median, p90,
          min) after a warm-up; the same through a load-balanced view.
  fanout  ``rc[:].execute('a=1', block=True)`` with 1/2/4/8 engines.
  lb      load-balanced throughput with 2 and 4 engines: N x
          ``lview.apply_async(noop)`` then wait, and
          ``lview.map_sync(f, range(N), chunksize=1)`` -> tasks/s.
  mem     hub memory before and during a long run of tiny load-balanced tasks
          (``map_async(chunksize=1)`` in batches, ``rc.purge_everything()``
          after every batch).  ipcontroller: the controller process and its
          whole process tree (it forks 8 children; use PSS for the tree);
          parallax: the hub process (tree too, for symmetry).

Blocking calls are issued as ``*_async(...).get(timeout)`` -- exactly what the
``block=True`` / ``*_sync`` variants do internally, but a broken hub cannot hang
the run.

Output: progress on stderr; a markdown report on stdout (paste into
BENCHMARKS.md); raw samples + summary as JSON in
``bench/results/hub-<timestamp>.json`` (and the markdown next to it).

Usage (from the repository root)::

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_hub.py
    .venv/bin/python bench/bench_hub.py --only ipcontroller --quick
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
WORKLOADS = ("rtt", "fanout", "lb", "mem")
MIB = 1024.0 * 1024.0


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
        "busy_pct": 100.0 * busy / total if total > 0 else 0.0,
        "bench_cpu_s": ours,
        "cpu_s_by_group": per_group,
        "foreign_cpu_s": foreign,
        "foreign_pct": 100.0 * foreign / cap,
        "steal_pct": 100.0 * steal / total if total > 0 else 0.0,
        "loadavg_start": list(a.load),
        "loadavg_end": list(b.load),
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
    """One hub + n stock ipengines + one stock Client, in a fresh profile dir."""

    def __init__(self, hub: str, n: int, cfg: "Config", workroot: Path, tag: str):
        self.hub = hub
        self.n = n
        self.cfg = cfg
        self.dir = Path(tempfile.mkdtemp(prefix=f"{hub}-{tag}-", dir=workroot))
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

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
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
        for i in range(self.n):
            self.engine_popens.append(
                self._spawn(
                    [
                        self.cfg.ipengine,
                        f"--profile-dir={self.profile_dir}",
                        f"--cluster-id={self.cluster_id}",
                        "--log-level=WARN",
                    ],
                    f"engine-{i}.log",
                )
            )
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
                f"{self.n} engines did not register with {self.hub} within {self.cfg.start_timeout}s "
                f"(have {len(self.rc.ids)}): {e!r}; hub log:\n{self.hub_log()}"
                + "".join(f"\nengine-{i}.log:\n{tail(self.dir / f'engine-{i}.log', 10)}" for i in range(self.n))
            ) from e
        t3 = time.perf_counter()
        self.timings["engines_registered_s"] = t3 - t1
        self.timings["start_total_s"] = t3 - t0
        self.refresh_tree()

    def refresh_tree(self) -> None:
        for p in [self.hub_popen] + self.engine_popens:
            if p is not None:
                REAPER.add_tree(p.pid)

    def groups(self) -> dict[str, list[psutil.Process]]:
        """Processes by role, for CPU accounting (client = this process)."""
        out = {"client": [psutil.Process()]}
        for name, pops in ((f"hub/{self.hub}", [self.hub_popen]), (f"engines/{self.hub}", self.engine_popens)):
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
        engine_procs = []
        for p in self.engine_popens:
            try:
                root = psutil.Process(p.pid)
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
        self.stop_info["engine_sigkilled"] = REAPER.kill(engine_procs, grace=2.0)
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
        self.repeat = args.repeat or (1 if q else 3)
        self.tasks = args.tasks or (2000 if q else 100000)
        if args.ipc_full:
            self.ipc_tasks = self.tasks
        else:
            cap = args.ipc_tasks if args.ipc_tasks is not None else (2000 if q else 20000)
            self.ipc_tasks = min(cap, self.tasks)
        self.batch = args.batch or (500 if q else 5000)
        self.ping = args.ping
        self.scheme = args.scheme
        self.hwm = args.hwm
        self.start_timeout = args.start_timeout
        self.wait_idle = args.wait_idle
        self.op_timeout = args.op_timeout
        bindir = Path(args.venv_bin)
        self.ipengine = str(bindir / "ipengine")
        self.hub_cmd = {
            "ipcontroller": [str(bindir / "ipcontroller")],
            "parallax": [os.environ.get("PARALLAX_BIN", ""), "hub"],
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

    def tasks_for(self, hub: str) -> int:
        return self.ipc_tasks if hub == "ipcontroller" else self.tasks

    def as_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k not in ("child_env",)}
        return d


def _intlist(s: str) -> list[int]:
    return sorted({int(x) for x in s.split(",") if x.strip()})


# --------------------------------------------------------------------------
# workloads


class Block:
    """Measurement context: CPU/noise accounting around a workload.

    Every cluster that is up is accounted for (an idle second cluster is ours, not noise).
    """

    def __init__(self, clusters: list[Cluster], name: str, noise: list, hubs: list[str]):
        self.clusters = clusters
        self.name = name
        self.noise = noise
        self.hubs = hubs

    def _groups(self):
        g = {}
        for cl in self.clusters:
            g.update(cl.groups())
        return g

    def __enter__(self):
        gc.collect()
        self.a = CpuSnap(self._groups())
        return self

    def __exit__(self, *exc):
        b = CpuSnap(self._groups())
        d = cpu_delta(self.a, b)
        d["block"] = self.name
        d["hubs"] = self.hubs
        d["engines"] = self.clusters[0].n if self.clusters else None
        d["ok"] = exc[0] is None
        self.noise.append(d)
        self.delta = d
        return False


class Paired:
    """The clusters of one block (one per hub, same engine count), all up at once.

    Latency samples alternate between the hubs one by one (ABBA order), throughput
    measurements repeat by repeat, so that the machine's noise hits both hubs alike.
    A hub that fails is dropped from the rest of the block; the others carry on.
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

    def block(self, name: str, hubs: list[str]) -> Block:
        return Block(list(self.cl.values()), name, self.noise, hubs)

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

    def each(self, name: str, fn, i: int = 0) -> dict:
        """fn(hub, cluster) for every active hub in ABBA order; per-hub results."""
        res = {}
        for h in self.order(i):
            try:
                res[h] = fn(h, self.cl[h])
            except Exception as e:
                self.fail(h, name, e)
        return res


def _per_hub_cpu(delta: dict, hub: str) -> dict:
    g = delta["cpu_s_by_group"]
    return {"hub_cpu_s": g.get(f"hub/{hub}", 0.0), "engines_cpu_s": g.get(f"engines/{hub}", 0.0),
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
        with P.block(f"lb apply_async x{N} n={n} #{r} [{h}]", [h]) as blk:
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
        with P.block(f"lb map_sync x{N} n={n} #{r} [{h}]", [h]) as blk:
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

    for r in range(cfg.repeat):
        for h, v in P.each("lb apply_async", lambda h, cl: apply_run(h, cl, r), r).items():
            res[h]["apply_async"].append(v)
        for h, v in P.each("lb map_sync", lambda h, cl: map_run(h, cl, r), r + 1).items():
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
    """Runs on one cluster alone (no other hub up)."""
    rc = cl.rc
    lview = rc.load_balanced_view()
    total = cfg.tasks_for(cl.hub)
    batch = min(cfg.batch, total) if total else cfg.batch
    to = _lb_timeout(cfg, batch)
    time.sleep(1.0)  # let the hub settle after registration
    points = [{"tasks": 0, "t_s": 0.0, **hub_memory(cl.hub_proc)}]
    log(f"    mem start: hub RSS {points[0].get('proc_rss_mib', 0):.1f} MiB, "
        f"tree RSS {points[0].get('tree_rss_mib', 0):.1f} MiB, PSS {points[0].get('tree_pss_mib', 0):.1f} MiB")
    done = 0
    t_start = time.perf_counter()
    batches = []
    with Block([cl], f"mem {total} tasks n={cl.n} [{cl.hub}]", noise, [cl.hub]) as blk:
        while done < total:
            k = min(batch, total - done)
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
            if done % max(batch, total // 10 or 1) == 0 or done == total:
                log(f"    mem {done}/{total}: hub RSS {pt.get('proc_rss_mib', 0):.1f} MiB, "
                    f"tree PSS {pt.get('tree_pss_mib', 0):.1f} MiB, {k / (t1 - t0):.0f} tasks/s")
    rates = [b["tasks_per_s"] for b in batches]
    return {"tasks": total, "batch": batch, "points": points, "batches": batches,
            "tasks_per_s": stats(rates), "overall_tasks_per_s": total / sum(b["s"] for b in batches),
            "cpu": _per_hub_cpu(blk.delta, cl.hub)}


# --------------------------------------------------------------------------
# plan


def make_plan(cfg: Config) -> list[dict]:
    """Blocks. Paired blocks: one cluster per hub, all up at once, samples interleaved.
    The memory block runs each hub's cluster alone, one after the other."""
    plan = []
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
        log(f"  {cl.hub}: cluster start FAILED: {e}")
        return False
    rec["start"] = dict(cl.timings)
    log(f"  {cl.hub}: {cl.n} engine(s) up in {cl.timings['start_total_s']:.2f}s "
        f"(hub files {cl.timings['hub_files_s']:.2f}s, registration {cl.timings['engines_registered_s']:.2f}s)")
    return True


def _finish(cl: Cluster, rec: dict, cfg: Config, t0: float) -> None:
    try:
        cl.stop()
    except Exception as e:
        rec["errors"].append({"workload": "stop", "error": repr(e), "short": f"stop: {e!r}"})
    rec["stop"] = cl.stop_info
    rec["warnings"] = [f"{k} (x{v})" for k, v in cl.warnings.items()]
    for w in rec["warnings"]:
        log(f"  {cl.hub}: WARNING {w}")
    if cl.stop_info.get("hub_sigkilled"):
        log(f"  {cl.hub}: hub did not exit within 5s of SIGTERM; SIGKILLed")
    rec["block_wall_s"] = time.perf_counter() - t0
    if not cfg.keep_work:
        if rec["errors"]:
            rec["logs"] = {p.name: tail(p, 60) for p in sorted(cl.dir.glob("*.log"))}
        shutil.rmtree(cl.dir, ignore_errors=True)
    else:
        rec["workdir"] = str(cl.dir)


def run_paired_block(blk: dict, hubs: list[str], cfg: Config, workroot: Path, noise: list, idx: int) -> list[dict]:
    n = blk["n"]
    recs = {h: {"hub": h, "n": n, "workloads": {}, "errors": []} for h in hubs}
    wi = _maybe_wait_idle(cfg)
    clusters: dict[str, Cluster] = {}
    t0 = time.perf_counter()
    try:
        for h in hubs:  # hubs is already in this block's ABBA order
            cl = Cluster(h, n, cfg, workroot, f"b{idx}n{n}")
            clusters[h] = cl
            recs[h]["idle_wait"] = wi
            if not _start(cl, recs[h]):
                continue
        up = {h: cl for h, cl in clusters.items() if "start" in recs[h]}
        if up:
            P = Paired(up, cfg, noise)
            for w in blk["workloads"]:
                if not P.active():
                    break
                tw = time.perf_counter()
                try:
                    res = PAIRED_FUNCS[w](P)
                except Exception as e:  # a bug in the harness or both hubs broken
                    for h in P.active():
                        P.fail(h, w, e)
                    res = {}
                for h, d in res.items():
                    recs[h]["workloads"][w] = d
                    log(f"  {h}: {w} n={n}: {_brief(w, d)}")
                for h, (what, e, tb) in list(P.failed.items()):
                    if not any(err.get("_key") == id(e) for err in recs[h]["errors"]):
                        err = _err(what, e, up[h], tb)
                        err["_key"] = id(e)
                        recs[h]["errors"].append(err)
                log(f"  {w} n={n} took {time.perf_counter() - tw:.1f}s")
    finally:
        for h, cl in clusters.items():
            _finish(cl, recs[h], cfg, t0)
        for r in recs.values():
            for err in r["errors"]:
                err.pop("_key", None)
    return [recs[h] for h in hubs]


def run_single_block(hub: str, blk: dict, cfg: Config, workroot: Path, noise: list, idx: int) -> dict:
    rec = {"hub": hub, "n": blk["n"], "workloads": {}, "errors": []}
    rec["idle_wait"] = _maybe_wait_idle(cfg)
    cl = Cluster(hub, blk["n"], cfg, workroot, f"b{idx}n{blk['n']}")
    t0 = time.perf_counter()
    try:
        if _start(cl, rec):
            for w in blk["workloads"]:
                tw = time.perf_counter()
                try:
                    rec["workloads"][w] = w_mem(cl, cfg, noise)
                    log(f"  {hub}: {w} n={blk['n']} done in {time.perf_counter() - tw:.1f}s: "
                        f"{_brief(w, rec['workloads'][w])}")
                except Exception as e:
                    rec["errors"].append(_err(w, e, cl, traceback.format_exc()))
                    log(f"  {hub}: FAILED {w}: {type(e).__name__}: {e}")
    finally:
        _finish(cl, rec, cfg, t0)
    return rec


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
    if "parallax" in cfg.hubs:
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
    for path in (cfg.hub_cmd["ipcontroller"][0], cfg.ipengine):
        if ("ipcontroller" in cfg.hubs or path == cfg.ipengine) and not os.access(path, os.X_OK):
            raise SystemExit(f"error: {path} not found or not executable (run `make venv`, or pass --venv-bin)")
    if "parallax" in cfg.hubs:
        binp = os.environ.get("PARALLAX_BIN", "")
        if not binp:
            raise SystemExit(
                "error: PARALLAX_BIN is not set. Build the hub (`make build`) and run "
                "`PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_hub.py`, "
                "or `make bench`; use `--only ipcontroller` to benchmark the stock controller alone."
            )
        if not (os.path.isfile(binp) and os.access(binp, os.X_OK)):
            raise SystemExit(
                f"error: PARALLAX_BIN={binp} does not exist or is not executable "
                "(run `make build` first, or use `--only ipcontroller`)."
            )
        try:
            r = subprocess.run([binp, "hub", "--help"], capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: `{binp} hub --help` did not return within 15s")
        if r.returncode != 0:
            raise SystemExit(
                f"error: `{binp} hub --help` exited with code {r.returncode}; "
                f"is the hub subcommand implemented?\n{(r.stderr or r.stdout)[-2000:]}"
            )


# --------------------------------------------------------------------------
# summary


def summarize(cfg: Config, recs: list[dict]) -> list[dict]:
    """Rows: workload, metric, unit, better ('lower'|'higher'), values per hub."""
    by = {}
    for r in recs:
        for w, d in r["workloads"].items():
            by[(r["hub"], w, r["n"])] = d

    rows = []

    def add(workload, metric, unit, better, getter, key):
        vals = {}
        for hub in cfg.hubs:
            d = by.get((hub,) + key)
            if d is None:
                continue
            try:
                v = getter(d, hub)
            except (KeyError, IndexError, TypeError):
                v = None
            if v is not None:
                vals[hub] = v
        if vals:
            rows.append({"workload": workload, "metric": metric, "unit": unit, "better": better, "values": vals})

    if "rtt" in cfg.workloads:
        for label, desc in (("direct", "rc[0].apply_sync(lambda: None)"), ("lb", "lview.apply_sync(lambda: None)")):
            for stat in ("median", "p90", "min"):
                add("1. round trip, 1 engine", f"{desc} {stat}", "ms", "lower",
                    lambda d, h, label=label, stat=stat: d[label]["stats"][stat], ("rtt", 1))
            add("1. round trip, 1 engine", f"  hub CPU per 1000 {label} round trips", "CPU s", "lower",
                lambda d, h, label=label: d[label]["cpu"]["hub_cpu_s"] / d[label]["stats"]["count"] * 1000,
                ("rtt", 1))
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
                lambda d, h: _hub_cpu_per_k(d, cfg.lb_tasks), ("lb", n))
    if "mem" in cfg.workloads:
        n = cfg.mem_engines
        checkpoints = sorted({0, cfg.ipc_tasks if "ipcontroller" in cfg.hubs else 0,
                              cfg.tasks // 2, cfg.tasks})
        for cp in checkpoints:
            label = "start" if cp == 0 else f"after {cp:,} tasks"
            add("4. hub memory", f"hub process RSS, {label}", "MiB", "lower",
                lambda d, h, cp=cp: _mem_at(d, cp, "proc_rss_mib"), ("mem", n))
            add("4. hub memory", f"hub process tree RSS, {label}", "MiB", "lower",
                lambda d, h, cp=cp: _mem_at(d, cp, "tree_rss_mib"), ("mem", n))
            add("4. hub memory", f"hub process tree PSS, {label}", "MiB", "lower",
                lambda d, h, cp=cp: _mem_at(d, cp, "tree_pss_mib"), ("mem", n))
        add("4. hub memory", f"throughput during the memory run (map_async chunksize=1, {cfg.batch}/batch)",
            "tasks/s", "higher", lambda d, h: d["overall_tasks_per_s"], ("mem", n))
        add("4. hub memory", "  hub CPU per 1000 tasks in the memory run", "CPU s", "lower",
            lambda d, h: d["cpu"]["hub_cpu_s"] / d["tasks"] * 1000, ("mem", n))
    # cluster start (depends on --ping for ipcontroller: registration completes on a heartbeat)
    for r_n in sorted({r["n"] for r in recs}):
        vals = {}
        for r in recs:
            if r["n"] == r_n and "start" in r and "engines_registered_s" in r["start"]:
                vals.setdefault(r["hub"], []).append(r["start"]["engines_registered_s"])
        if vals:
            rows.append({"workload": "0. start-up (info)",
                         "metric": f"engines launched -> {r_n} registered (ping {cfg.ping} ms)",
                         "unit": "s", "better": "lower", "values": {h: statistics.median(v) for h, v in vals.items()}})
    for row in rows:
        row["ratio"] = _ratio(row)
    return rows


def _hub_cpu_per_k(d, N):
    cpus = [x["cpu"]["hub_cpu_s"] for x in d["apply_async"] + d["map_sync"]]
    runs = len(d["apply_async"]) + len(d["map_sync"])
    return sum(cpus) / (runs * N) * 1000.0


def _mem_at(d, cp, key):
    for p in d["points"]:
        if p["tasks"] == cp:
            return p.get(key)
    return None


def _ratio(row):
    v = row["values"]
    a, b = v.get("ipcontroller"), v.get("parallax")
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
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _noisy(d) -> bool:
    # sub-second blocks are at the mercy of 10 ms tick accounting: require real foreign CPU-seconds too
    return d["foreign_pct"] > 5 and d["foreign_cpu_s"] > 0.25


def markdown(cfg: Config, env: dict, rows: list[dict], recs: list[dict], noise: list, meta: dict) -> str:
    L = []
    L.append(f"### Parallax hub vs ipcontroller — {meta['date']}")
    L.append("")
    L.append(
        f"Stock ipyparallel {env['ipyparallel']} `Client` + stock `ipengine`s against each hub, same run, "
        f"same workloads. Latency/fan-out/throughput: both hubs' clusters up side by side, samples interleaved "
        f"one by one (ABBA), throughput runs alternating; memory: each hub alone. Fresh clusters per block. "
        f"Both hubs: "
        f"`--ip=127.0.0.1 --ping={cfg.ping} --log-level=WARN`"
        + (f" `--scheme={cfg.scheme}`" if cfg.scheme else "")
        + (f" `--hwm={cfg.hwm}`" if cfg.hwm is not None else "")
        + ". Python " + env["python"] + f", pyzmq {env['pyzmq']} (libzmq {env['libzmq']}), "
        + (f"numpy {env['numpy']} installed (ipcontroller imports it at start: +10 MiB RSS), " if env.get("numpy") else "")
        + f"{env['cpus']} CPUs ({env.get('cpu_model') or '?'}), {platform.system()} {platform.release()}."
    )
    if "parallax" in env:
        L.append(f"Parallax: `{env['parallax']}` (git {env.get('git_head', '?')}"
                 f"{', dirty tree' if env.get('git_dirty') else ''}).")
    L.append("")
    L.append("**Ratio** = how many times better Parallax is: for times and memory ipcontroller ÷ parallax, "
             "for throughput parallax ÷ ipcontroller. **> 1 means Parallax is better.**")
    L.append("")
    hubs = cfg.hubs
    hdr = "| workload | measurement | unit | " + " | ".join(hubs) + (" | ratio (>1: Parallax better) |" if len(hubs) == 2 else " |")
    if rows:
        L.append(hdr)
        L.append("|" + "---|" * (3 + len(hubs) + (1 if len(hubs) == 2 else 0)))
    else:
        L.append("**No measurements completed.**")
    for r in rows:
        cells = [r["workload"], r["metric"], r["unit"]] + [_fmt(r["values"].get(h), r["unit"]) for h in hubs]
        if len(hubs) == 2:
            cells.append("—" if r["ratio"] is None else f"{r['ratio']:.2f}×")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    counts = (f"Counts: round trip {cfg.samples} samples (+{cfg.warmup} warm-up) each; fan-out {cfg.fanout_samples} "
              f"(+{cfg.fanout_warmup}); throughput {cfg.repeat} repeat(s) of {cfg.lb_tasks} tasks (tasks/s at the median "
              f"wall time); memory run with {cfg.mem_engines} engines, batches of {cfg.batch} tasks, "
              f"`purge_everything()` after each batch.")
    L.append(counts)
    mem_counts = []
    for r in recs:
        if "mem" in r["workloads"]:
            mem_counts.append(f"{r['hub']} {r['workloads']['mem']['tasks']:,} tasks")
    if mem_counts:
        extra = ""
        if "ipcontroller" in hubs and cfg.ipc_tasks < cfg.tasks:
            extra = (f" ipcontroller was capped at {cfg.ipc_tasks:,} tasks (≈300 tasks/s; `--ipc-full` runs "
                     f"all {cfg.tasks:,}), so its later checkpoints are blank.")
        L.append(f"Memory run: {', '.join(mem_counts)}.{extra} ipcontroller 'process' = the main controller "
                 "process; its tree adds 8 forked children (schedulers, heart monitor, queues) whose RSS double-counts "
                 "pages shared with the parent, so compare the tree by PSS.")
    L.append("")
    # errors
    errs = [(r["hub"], r["n"], e) for r in recs for e in r["errors"]]
    if errs:
        L.append("**Failures:**")
        L.append("")
        for hub, n, e in errs:
            first = e.get("short") or (e["error"].splitlines() or [""])[0]
            L.append(f"- {hub}, {n} engine(s), {e['workload']}: {first}")
        L.append("")
    warns = [(r["hub"], r["n"], w) for r in recs for w in r.get("warnings", [])]
    if warns:
        L.append("**Warnings:**")
        L.append("")
        for hub, n, w in warns:
            L.append(f"- {hub}, {n} engine(s): {w}")
        L.append("")
    # noise
    L.append("<details><summary>Noise: CPU per measurement block</summary>")
    L.append("")
    L.append("busy = machine-wide non-idle CPU; CPU s = CPU-seconds of the client (this script) and of each hub "
             "and its engines (ipc = ipcontroller, plx = parallax; in side-by-side blocks the idle hub's cluster is "
             "counted too); foreign = busy minus everything this benchmark started, in % of all cores; "
             "steal = VM steal.")
    L.append("")
    L.append("| block | hubs | wall s | busy % | CPU s | foreign % | steal % | load avg |")
    L.append("|---|---|---|---|---|---|---|---|")
    short = {"ipcontroller": "ipc", "parallax": "plx"}
    for d in noise:
        parts = []
        for k, v in sorted(d["cpu_s_by_group"].items(), key=lambda kv: (kv[0] != "client", kv[0])):
            role, _, hub = k.partition("/")
            parts.append(f"{short.get(hub, hub) + ' ' if hub else ''}{role} {v:.1f}")
        flag = " ⚠" if _noisy(d) else ""
        L.append(
            f"| {d['block']} | {'+'.join(short.get(h, h) for h in d['hubs'])} | {d['wall_s']:.1f} | "
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
        epilog="Defaults (full run, ~15 min on 2 cores): engines 1,2,4,8; rtt 1000 samples; fan-out 300; "
               "lb 3 x 5000 tasks at 2 and 4 engines; memory 100000 tasks on parallax, 20000 on ipcontroller.",
    )
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run (~1-2 min per hub)")
    ap.add_argument("--only", choices=HUBS, help="benchmark one hub only")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="subset of rtt,fanout,lb,mem (default all)")
    ap.add_argument("--engines", help="engine counts for the fan-out (default 1,2,4,8; quick 1,2)")
    ap.add_argument("--lb-engines", help="engine counts for load-balanced throughput (default 2,4; quick 2)")
    ap.add_argument("--mem-engines", type=int, default=2, help="engines in the memory run (default 2)")
    ap.add_argument("--samples", type=int, help="round-trip samples (default 1000; quick 100)")
    ap.add_argument("--warmup", type=int, help="round-trip warm-up calls (default 50; quick 10)")
    ap.add_argument("--fanout-samples", type=int, help="fan-out samples per engine count (default 300; quick 30)")
    ap.add_argument("--lb-tasks", type=int, help="tasks per throughput measurement (default 5000; quick 500)")
    ap.add_argument("--repeat", type=int, help="repeats of each throughput measurement (default 3; quick 1)")
    ap.add_argument("--tasks", type=int, help="tasks in the memory run (default 100000; quick 2000)")
    ap.add_argument("--ipc-tasks", type=int,
                    help="cap on the memory-run tasks for ipcontroller (default 20000; quick 2000)")
    ap.add_argument("--ipc-full", action="store_true", help="run the full --tasks count on ipcontroller too")
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

    if "parallax" in cfg.hubs:
        # run a private copy, so a rebuild during the run cannot mix two binaries
        src = cfg.hub_cmd["parallax"][0]
        snap = workroot / "parallax-bin" / Path(src).name
        snap.parent.mkdir()
        shutil.copy2(src, snap)
        cfg.parallax_bin_source = src
        cfg.hub_cmd["parallax"][0] = str(snap)

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
            "argv": sys.argv}
    plan = make_plan(cfg)
    log(f"hubs: {', '.join(cfg.hubs)}; ping {cfg.ping} ms; work dir {workroot}")
    for i, b in enumerate(plan):
        log(f"plan {i}: {b['n']} engine(s): {', '.join(b['workloads'])}"
            + (" (hubs side by side, samples interleaved)" if b["paired"] else " (each hub alone)"))
    if "mem" in cfg.workloads:
        log("memory run: " + ", ".join(f"{h} {cfg.tasks_for(h):,} tasks" for h in cfg.hubs))

    recs: list[dict] = []
    noise: list[dict] = []
    interrupted = False
    try:
        for i, b in enumerate(plan):
            order = cfg.hubs if i % 2 == 0 else list(reversed(cfg.hubs))
            if b["paired"]:
                log(f"block {i}: {b['n']} engine(s), {','.join(b['workloads'])}; "
                    + (f"{' + '.join(order)} side by side" if len(order) > 1 else f"on {order[0]}"))
                recs.extend(run_paired_block(b, order, cfg, workroot, noise, i))
            else:
                for hub in order:
                    log(f"block {i}: {b['n']} engine(s), {','.join(b['workloads'])} on {hub} alone")
                    recs.append(run_single_block(hub, b, cfg, workroot, noise, i))
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
