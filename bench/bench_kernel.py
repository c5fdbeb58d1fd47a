#!/usr/bin/env python3
"""Kernel benchmark: the Parallax Jupyter kernel vs ipykernel + ipyparallel's ``%%px``.

Both sides run in the same invocation, on the same work, driven by jupyter_client's
blocking client exactly as a notebook frontend drives a kernel:

  ipyparallel  a stock ipykernel (``<venv python> -m ipykernel_launcher -f {connection_file}``)
               in which a setup cell runs ``import ipyparallel as ipp;
               cluster = ipp.Cluster(n=4); rc = cluster.start_and_connect_sync(activate=True)``;
               cells are ``%%px\\nprint("hi")``.
  parallax     ``$PARALLAX_BIN kernel -f {connection_file} --engines 4 --python <venv python>
               --log-level INFO`` (hub task inside the kernel process + 4 engine processes);
               cells are ``print("hi")`` (every cell runs on all engines) and, as a second
               series, ``%%px\\nprint("hi")`` (the same thing).

Measurements
  latency  cell latency: ``time.perf_counter()`` just before ``kc.execute(code)`` to the
           receipt of the ``status: idle`` on iopub whose parent is that request (other
           parents are ignored).  Every cell is checked: it must produce one
           ``[stdout:N] hi`` per engine (N = 0..3) and an ``ok`` reply; cells that do not
           are counted as failures.  The kernels of both sides are up side by side and the
           series alternate in chunks of --chunk cells (ABBA), after --warmup cells each.
           Also: CPU per cell of each kernel's whole process tree and of this client,
           and a ``kernel_info_request`` round trip (the protocol floor: no engines).
  start    kernel launch (``km.start_kernel``) -> kernel_info reply -> first parallel cell
           answered by all 4 engines, in a fresh kernel each time, sides alternating.
           ipyparallel: the setup cell is timed inside the kernel too
           (``import ipyparallel`` and ``Cluster(n=4).start_and_connect_sync()`` until
           ``len(rc.ids) == 4``).  Parallax: the kernel's own log line
           ``cluster ready engines=4 elapsed_ms=...``.  Then stop: ipyparallel's
           ``cluster.stop_cluster_sync()`` cell, and kernel shutdown -> process tree gone.
  cli      ``ipcluster start -n 4 --daemonize`` vs ``parallax cluster start -n 4 --daemonize``
           (fresh profile dir each): launch -> the stock ``ipyparallel.Client`` sees 4
           engines; the command's own return time; then ``ipcluster stop`` /
           ``parallax cluster stop`` -> every process gone.
  mem      RSS / PSS / USS of each kernel's process tree (kernel + controller + engines)
           after the latency run.

Every process started here carries a marker in its environment; every wait has a timeout;
at the end the script looks for marked processes still alive (also daemonized clusters),
kills them and reports them.

Output: progress on stderr; a markdown report on stdout; raw samples + summary in
``bench/results/kernel-<timestamp>.json`` (and the markdown next to it).

Usage (from the repository root)::

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_kernel.py
    PARALLAX_BIN=... .venv/bin/python bench/bench_kernel.py --quick
    PARALLAX_BIN=... .venv/bin/python bench/bench_kernel.py --parts latency --cells 500
    make bench BENCH=kernel
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (helpers shared with bench_rust.py)
from bench_hub import (  # noqa: E402  (shared helpers of the hub benchmark)
    CpuSnap,
    cpu_delta,
    log,
    merge_deltas,
    stats,
)
from common import (  # noqa: E402
    MARK_VAR,
    REPO,
    RESULTS_DIR,
    RUN_MARK,
    BenchError,
    bench_payload,
    kill_procs,
    marked,
    proc_mem,
    reply_error,
    tail,
    wait_gone,
)
from common import display_path as _display_path  # noqa: E402
from common import maybe_wait_idle as _maybe_wait_idle  # noqa: E402
from common import med as _med  # noqa: E402
from common import ratio as _ratio  # noqa: E402

PARTS = ("latency", "start", "cli", "mem")
SIDES = ("ipyparallel", "parallax")
SIDE_LABEL = {"ipyparallel": "ipykernel + ipyparallel", "parallax": "Parallax kernel"}

HI = 'print("hi")'
PX_HI = '%%px\nprint("hi")'
# one engine's output, or identical output of several shown once with their
# ranges ([stdout:0-63] hi, [stdout:0-3,5] hi)
STDOUT_RE = re.compile(r"\[stdout:([\d,-]+)\] hi")


def expand_ids(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi) + 1) if hi.isdigit() else [int(lo)])
    return out

# the ipyparallel side's setup cell: timed inside the kernel as well
IPP_SETUP = """\
import time as _bt, json as _bj
_bt0 = _bt.perf_counter()
import ipyparallel as ipp
_bt1 = _bt.perf_counter()
cluster = ipp.Cluster(n={n})
rc = cluster.start_and_connect_sync(activate=True)
rc.wait_for_engines({n}, timeout={timeout}, interactive=False)
_bt2 = _bt.perf_counter()
assert len(rc.ids) == {n}, rc.ids
print("BENCH " + _bj.dumps({{"import_s": _bt1 - _bt0, "start_s": _bt2 - _bt1, "ids": rc.ids,
                           "profile_dir": cluster.profile_dir, "cluster_id": cluster.cluster_id}}))
"""
IPP_STOP = """\
import time as _bt, contextlib as _bc, io as _bio
_bt0 = _bt.perf_counter()
rc.close()
with _bc.redirect_stdout(_bio.StringIO()), _bc.redirect_stderr(_bio.StringIO()):
    cluster.stop_cluster_sync()
print("BENCH %.6f" % (_bt.perf_counter() - _bt0))
"""


class Kernel(common.Kernel):
    """ipykernel, or the Parallax kernel with its embedded cluster."""

    def __init__(self, side: str, cfg: "Config", tag: str):
        if side == "parallax":
            argv = [cfg.parallax_bin, "kernel", "-f", "{connection_file}", "--engines", str(cfg.n),
                    "--python", cfg.python, "--log-level", "INFO"]
        else:
            argv = [cfg.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        super().__init__(side, cfg, tag, argv)


def engines_seen(outs: list[dict]) -> list[int]:
    """Engine ids with a '[stdout:N] hi' among a cell's outputs (display/update/stream)."""
    seen = set()
    for m in outs:
        c = m["content"]
        if m["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            text = c.get("data", {}).get("text/plain", "")
        elif m["msg_type"] == "stream":
            text = c.get("text", "")
        else:
            continue
        for spec in STDOUT_RE.findall(text if isinstance(text, str) else "".join(text)):
            seen.update(expand_ids(spec))
    return sorted(seen)


class Cell:
    """The verified parallel cell of a series (through the kernel's jupyter_client, or a LeanClient)."""

    def __init__(self, kernel: Kernel, code: str, n: int, client: "LeanClient | None" = None):
        self.k = kernel
        self.code = code
        self.n = n
        self.client = client
        self.bad = 0
        self.first_bad: str | None = None
        self.msgs: list[int] = []

    def run(self) -> float:
        dt, outs, reply = (self.client or self.k).execute(self.code)
        err = reply_error(reply, outs)
        seen = engines_seen(outs)
        self.msgs.append(len(outs))
        if err or seen != list(range(self.n)):
            self.bad += 1
            if self.first_bad is None:
                self.first_bad = err or f"engines with '[stdout:N] hi': {seen}; outputs: " + repr(
                    [(m["msg_type"], m["content"]) for m in outs])[:1500]
        return dt


class LeanClient:
    """A minimal frontend for the diagnostic series: pyzmq sockets on the kernel's connection
    file, requests signed by jupyter_client's Session, but replies read without Session's
    deserialization (no signature check, no date parsing): only the frames it needs are
    JSON-decoded.  What a cell costs the kernel side, with less of the client in it."""

    DELIM = b"<IDS|MSG>"

    def __init__(self, kernel: Kernel):
        import zmq
        from jupyter_client.session import Session

        self.k = kernel
        info = json.loads(Path(kernel.km.connection_file).read_text())
        self.session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"],
                               username="bench")
        self.ctx = zmq.Context()
        url = f"{info['transport']}://{info['ip']}:"
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.linger = 0
        self.shell.connect(url + str(info["shell_port"]))
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.linger = 0
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(url + str(info["iopub_port"]))
        self.zmq = zmq

    def _recv(self, sock, deadline: float) -> list[bytes]:
        left = deadline - time.perf_counter()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            raise BenchError(f"{self.k.side} (lean client): timed out")
        return sock.recv_multipart()

    def wait_subscribed(self, timeout: float) -> None:
        """kernel_info requests until one's iopub status arrives (the SUB socket is connected)."""
        deadline = time.perf_counter() + timeout
        while True:
            msg = self.session.msg("kernel_info_request", content={})
            self.session.send(self.shell, msg)
            t = time.perf_counter() + 0.5
            got = False
            while time.perf_counter() < min(t, deadline):
                if self.iopub.poll(50):
                    f = self.iopub.recv_multipart()
                    i = f.index(self.DELIM)
                    got |= json.loads(f[i + 3]).get("msg_id") == msg["header"]["msg_id"]
                while self.shell.poll(0):
                    self.shell.recv_multipart()
                if got:
                    return
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.k.side} (lean client): iopub never subscribed")

    def drain(self) -> None:
        for sock in (self.iopub, self.shell):
            while sock.poll(5):
                sock.recv_multipart()

    def execute(self, code: str) -> tuple[float, list[dict], dict]:
        timeout = self.k.cfg.timeout
        t0 = time.perf_counter()
        msg = self.session.msg("execute_request", content={
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        msg_id = msg["header"]["msg_id"]
        self.session.send(self.shell, msg)
        deadline = t0 + timeout
        outs = []
        while True:
            f = self._recv(self.iopub, deadline)
            i = f.index(self.DELIM)
            if json.loads(f[i + 3]).get("msg_id") != msg_id:
                continue
            mt = json.loads(f[i + 2])["msg_type"]
            content = json.loads(f[i + 5])
            if mt == "status" and content.get("execution_state") == "idle":
                dt = time.perf_counter() - t0
                break
            outs.append({"msg_type": mt, "content": content})
        while True:
            f = self._recv(self.shell, deadline + 5)
            i = f.index(self.DELIM)
            if json.loads(f[i + 3]).get("msg_id") == msg_id:
                return dt, outs, {"content": json.loads(f[i + 5])}

    def close(self) -> None:
        self.shell.close(0)
        self.iopub.close(0)
        self.ctx.term()


def setup_ipp(k: Kernel, cfg: "Config") -> dict:
    dt, outs, reply = k.execute(IPP_SETUP.format(n=cfg.n, timeout=cfg.timeout), timeout=cfg.timeout + 30)
    err = reply_error(reply, outs)
    if err:
        raise BenchError(f"ipyparallel setup cell failed: {err}")
    payload = bench_payload(outs)
    if payload is None:
        raise BenchError(f"ipyparallel setup cell printed nothing: {[m['msg_type'] for m in outs]}")
    d = json.loads(payload)
    d["cell_s"] = dt
    return d


def stop_ipp(k: Kernel) -> dict:
    dt, outs, reply = k.execute(IPP_STOP, timeout=k.cfg.timeout)
    err = reply_error(reply, outs)
    p = bench_payload(outs)
    return {"cell_s": dt, "stop_s": float(p) if p else None, "error": err}


# --------------------------------------------------------------------------
# configuration


class Config:
    def __init__(self, args, workroot: Path):
        q = args.quick
        self.quick = q
        self.workroot = workroot
        self.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        for p in self.parts:
            if p not in PARTS:
                raise SystemExit(f"unknown part {p!r}; choose from {','.join(PARTS)}")
        self.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        for s in self.sides:
            if s not in SIDES:
                raise SystemExit(f"unknown side {s!r}; choose from {','.join(SIDES)}")
        self.sides = [s for s in SIDES if s in self.sides]
        self.n = args.engines
        self.cells = args.cells or (50 if q else 200)
        self.warmup = args.warmup if args.warmup is not None else (10 if q else 20)
        self.chunk = max(1, args.chunk)
        self.lean = not args.no_lean
        self.info_samples = args.info_samples if args.info_samples is not None else (50 if q else 200)
        self.start_repeat = args.start_repeat or (2 if q else 5)
        self.cli_repeat = args.cli_repeat or (1 if q else 3)
        self.timeout = args.timeout
        self.stop_grace = args.stop_grace
        self.wait_idle = args.wait_idle
        bindir = Path(args.venv_bin)
        self.bindir = bindir
        self.python = str(bindir / "python")
        self.parallax_bin = os.environ.get("PARALLAX_BIN", "")
        self.parallax_bin_source = self.parallax_bin
        self.child_env = common.child_env(workroot, bindir)

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items() if k != "child_env"}


# --------------------------------------------------------------------------
# noise accounting


def role_cpu(k: "Kernel") -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds (user + system) of each process of a kernel's tree, with its role."""
    out = {}
    procs = k.processes()
    for i, p in enumerate(procs):
        try:
            role = "kernel process" if i == 0 else _role(p.cmdline())
            if role == "other" and _role(p.parent().cmdline()) == "engines (Rust part)":
                role = "engines (Python part)"
            ct = p.cpu_times()
            out[(p.pid, p.create_time())] = (role, ct.user + ct.system)
        except psutil.Error:
            continue
    return out


class Acct:
    """CPU accounting around measurement windows: every kernel tree that is up, and this client."""

    def __init__(self, kernels: dict[str, Kernel]):
        self.kernels = kernels
        self.deltas: dict[str, list[dict]] = {}
        self.roles: dict[str, dict[str, float]] = {}
        self.client_cpu: dict[str, float] = {}

    def groups(self) -> dict[str, list[psutil.Process]]:
        g = {"client": [psutil.Process()]}
        for key, k in self.kernels.items():
            g[f"kernel/{key}"] = k.processes()
        return g

    @contextlib.contextmanager
    def window(self, key: str, kernel: "Kernel | None" = None):
        """CPU of everything over the window; with `kernel`, also that kernel's CPU by process role."""
        gc.collect()
        a = CpuSnap(self.groups())
        ra = role_cpu(kernel) if kernel else None
        # this process's own CPU, exactly (CLOCK_PROCESS_CPUTIME_ID, all threads), without the cost of
        # the psutil snapshots around the window (which the tick-based group figures include)
        c0 = time.process_time()
        try:
            yield
        finally:
            c1 = time.process_time()
            self.client_cpu[key] = self.client_cpu.get(key, 0.0) + (c1 - c0)
            b = CpuSnap(self.groups())
            self.deltas.setdefault(key, []).append(cpu_delta(a, b))
            if kernel:
                rb = role_cpu(kernel)
                acc = self.roles.setdefault(key, {})
                for pid, (role, t) in rb.items():
                    acc[role] = acc.get(role, 0.0) + max(0.0, t - ra.get(pid, (role, 0.0))[1])

    def merged(self, key: str) -> dict | None:
        ds = self.deltas.get(key)
        return merge_deltas(ds) if ds else None


# --------------------------------------------------------------------------
# parts


def run_series(cfg: Config, series: list[tuple[str, Cell]], acct: Acct, out: dict, noise: list,
               what: str) -> None:
    """Warm-up, then the series alternate in chunks of cfg.chunk cells (ABBA) until each has cfg.cells."""
    log(f"{what}: warm-up {cfg.warmup} cells per series")
    for _, cell in series:
        for _ in range(cfg.warmup):
            cell.run()
        cell.bad = 0
        cell.first_bad = None
        cell.msgs = []
    samples = {name: [] for name, _ in series}
    log(f"{what}: {cfg.cells} cells per series ({', '.join(n for n, _ in series)}), "
        f"alternating in chunks of {cfg.chunk}")
    t0 = time.perf_counter()
    r = 0
    while any(len(samples[n]) < cfg.cells for n, _ in series):
        _maybe_wait_idle(cfg)
        for name, cell in (series if r % 2 == 0 else series[::-1]):
            m = min(cfg.chunk, cfg.cells - len(samples[name]))
            if m <= 0:
                continue
            with acct.window(name, cell.k):
                for _ in range(m):
                    samples[name].append(cell.run() * 1e3)
        r += 1
    log(f"{what}: done in {time.perf_counter() - t0:.1f}s")
    for name, cell in series:
        d = acct.merged(name)
        side = cell.k.side
        grp = d["cpu_s_by_group"] if d else {}
        n = len(samples[name])
        out[name] = {
            "side": side,
            "client": "lean" if cell.client else "jupyter_client",
            "code": cell.code,
            "ms": stats(samples[name]),
            "samples_ms": samples[name],
            "bad_cells": cell.bad,
            "first_bad": cell.first_bad,
            "iopub_msgs_per_cell": statistics.fmean(cell.msgs) if cell.msgs else None,
            "kernel_tree_cpu_ms_per_cell": 1e3 * grp.get(f"kernel/{side}", 0.0) / n if n else None,
            "cpu_ms_per_cell_by_role": {r: 1e3 * v / n for r, v in acct.roles.get(name, {}).items()} if n else {},
            "client_cpu_ms_per_cell": 1e3 * acct.client_cpu.get(name, 0.0) / n if n else None,
            "cpu": d,
        }
        if d:
            d = dict(d)
            d["block"] = f"latency: {name}"
            noise.append(d)
        ms = out[name]["ms"]
        log(f"  {name}: p50 {ms.get('median', float('nan')):.2f} ms, p90 {ms.get('p90', float('nan')):.2f} ms"
            + (f"; {cell.bad} cell(s) without the expected outputs; first: {cell.first_bad}" if cell.bad else ""))


def part_latency(cfg: Config, res: dict, noise: list) -> None:
    """Both kernels up side by side; the series alternate in chunks (ABBA)."""
    kernels: dict[str, Kernel] = {}
    out = res.setdefault("latency", {})
    try:
        for side in cfg.sides:
            _maybe_wait_idle(cfg)
            log(f"latency: starting the {SIDE_LABEL[side]} with {cfg.n} engines")
            k = Kernel(side, cfg, "lat")
            kernels[side] = k
            k.start()
            if side == "ipyparallel":
                out["ipyparallel_setup"] = setup_ipp(k, cfg)
                log(f"  ipyparallel cluster up: setup cell {out['ipyparallel_setup']['cell_s']:.2f}s")
            else:
                # the cluster may still be coming up: the first cell waits for it
                Cell(k, HI, cfg.n).run()
                out["parallax_cluster_ready_ms"] = _float(k.log_value(r"cluster ready engines=\d+ elapsed_ms=(\d+)"))
        acct = Acct(kernels)
        # 1. the headline: jupyter_client's blocking client, as a notebook frontend
        series = []
        if "ipyparallel" in kernels:
            series.append(("ipyparallel %%px", Cell(kernels["ipyparallel"], PX_HI, cfg.n)))
        if "parallax" in kernels:
            series.append(("parallax", Cell(kernels["parallax"], HI, cfg.n)))
            series.append(("parallax %%px", Cell(kernels["parallax"], PX_HI, cfg.n)))
        run_series(cfg, series, acct, out, noise, "latency")
        # 2. kernel_info round trips: the shell path without engines (the protocol floor)
        info = {side: [] for side in kernels}
        for i in range(cfg.info_samples):
            for side in (list(kernels) if i % 2 == 0 else list(kernels)[::-1]):
                info[side].append(kernels[side].kernel_info_rtt() * 1e3)
        out["kernel_info_ms"] = {side: stats(v) for side, v in info.items()}
        # 3. memory of each kernel's process tree after the run
        if "mem" in cfg.parts:
            mem = res.setdefault("mem", {})
            for side, k in kernels.items():
                mem[side] = tree_memory(k)
        # 4. diagnostic: the same cells through a lean client (jupyter_client's channels closed meanwhile,
        #    so that nothing queues up in them)
        if cfg.lean:
            lean: dict[str, LeanClient] = {}
            try:
                for side, k in kernels.items():
                    k.kc.stop_channels()
                    lean[side] = LeanClient(k)
                    lean[side].wait_subscribed(cfg.timeout)
                    lean[side].drain()
                series = []
                if "ipyparallel" in lean:
                    series.append(("lean client: ipyparallel %%px",
                                   Cell(kernels["ipyparallel"], PX_HI, cfg.n, lean["ipyparallel"])))
                if "parallax" in lean:
                    series.append(("lean client: parallax", Cell(kernels["parallax"], HI, cfg.n, lean["parallax"])))
                run_series(cfg, series, acct, out, noise, "latency, lean client")
            finally:
                for side, lc in lean.items():
                    with contextlib.suppress(Exception):
                        lc.close()
                for side, k in kernels.items():
                    if k.kc is not None and not k.kc.channels_running:
                        k.kc = k.km.blocking_client()
                        k.kc.start_channels()
                        with contextlib.suppress(RuntimeError):
                            k.kc.wait_for_ready(timeout=cfg.timeout)
                        k.drain_iopub()
    finally:
        for side, k in kernels.items():
            try:
                if side == "ipyparallel" and k.alive() and "ipyparallel_setup" in out:
                    out["ipyparallel_stop"] = stop_ipp(k)
            except Exception as e:
                out["ipyparallel_stop"] = {"error": repr(e)}
            out.setdefault("stop", {})[side] = k.stop()


def _float(x):
    return float(x) if x is not None else None


def tree_memory(k: Kernel) -> dict:
    procs = k.processes()
    if not procs:
        return {"error": "kernel process gone"}
    root, kids = procs[0], procs[1:]
    roles: dict[str, list[psutil.Process]] = {}
    for p in kids:
        try:
            role = _role(p.cmdline())
            if role == "other":
                # the parallax engines' Python subprocesses
                if _role(p.parent().cmdline()) == "engines (Rust part)":
                    role = "engines (Python part)"
        except psutil.Error:
            continue
        roles.setdefault(role, []).append(p)
    out = {"kernel_process": proc_mem([root]), "tree": proc_mem(procs),
           "by_role": {r: proc_mem(ps) for r, ps in roles.items()}}
    try:
        out["cmdlines"] = [" ".join(p.cmdline())[:200] for p in procs]
    except psutil.Error:
        pass
    return out


def _role(argv: list[str]) -> str:
    """What a process of a kernel's tree is, from its command line."""
    mod = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if mod == "ipyparallel.controller" or any(a.endswith("/ipcontroller") for a in argv[:2]):
        return "controller (process + forked schedulers)"
    if mod == "ipyparallel.engine.nanny":
        return "engine nannies"
    if mod == "ipyparallel.engine" or any(a.endswith("/ipengine") for a in argv[:2]):
        return "engines"
    if len(argv) > 1 and os.path.basename(argv[0]) == "parallax" and argv[1] == "engine":
        return "engines (Rust part)"
    return "other"


def part_start(cfg: Config, res: dict, noise: list) -> None:
    """Fresh kernel per start; sides alternate (ABBA)."""
    out = res.setdefault("start", {side: [] for side in cfg.sides})
    for r in range(cfg.start_repeat):
        order = cfg.sides if r % 2 == 0 else cfg.sides[::-1]
        for side in order:
            _maybe_wait_idle(cfg)
            k = Kernel(side, cfg, f"start{r}")
            rec: dict = {"rep": r}
            acct = Acct({side: k})
            try:
                with acct.window("start"):
                    k.start()
                    rec["kernel_ready_s"] = k.timings["kernel_ready_s"]
                    if side == "ipyparallel":
                        rec["setup"] = setup_ipp(k, cfg)
                        cell = Cell(k, PX_HI, cfg.n)
                    else:
                        cell = Cell(k, HI, cfg.n)
                    cell.run()
                    rec["first_cell_s"] = time.perf_counter() - k.t_launch
                if cell.bad:
                    rec["first_cell_error"] = cell.first_bad
                    raise BenchError(f"first cell on {side}: {cell.first_bad}")
                if side == "parallax":
                    rec["cluster_ready_ms"] = _float(k.log_value(r"cluster ready engines=\d+ elapsed_ms=(\d+)"))
                    rec["hub_ready_log"] = k.log_value(r"(hub ready[^\n]*)") is not None
                rec["tree_nprocs"] = len(k.processes())
                if side == "ipyparallel":
                    rec["stop_cell"] = stop_ipp(k)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc()
                log(f"  start {side} #{r}: FAILED: {rec['error'][:300]}")
            finally:
                rec["stop"] = k.stop()
            d = acct.merged("start")
            if d:
                d = dict(d)
                d["block"] = f"start: {side} #{r}"
                noise.append(d)
                rec["cpu"] = d
            out[side].append(rec)
            log(f"  start {side} #{r}: kernel ready {rec.get('kernel_ready_s', float('nan')):.3f}s, "
                f"first cell {rec.get('first_cell_s', float('nan')):.3f}s"
                + (f", Cluster start {rec['setup']['start_s']:.3f}s" if "setup" in rec else "")
                + (f", cluster ready {rec['cluster_ready_ms']:.0f} ms" if rec.get("cluster_ready_ms") else "")
                + f", stop -> tree gone {rec['stop'].get('tree_gone_s', float('nan')):.2f}s")


def _client_sees(client_file: Path, n: int, deadline: float) -> tuple[float, list[int]]:
    """Wait for the connection file, connect the stock Client, wait for n engines."""
    import ipyparallel as ipp

    while not _json_ok(client_file):
        if time.perf_counter() > deadline:
            raise BenchError(f"no {client_file.name} before the deadline")
        time.sleep(0.01)
    rc = ipp.Client(str(client_file), timeout=max(1.0, deadline - time.perf_counter()))
    try:
        rc.wait_for_engines(n, timeout=max(1.0, deadline - time.perf_counter()), interactive=False)
        return time.perf_counter(), list(rc.ids)
    finally:
        rc.close(linger=0)


def _json_ok(path: Path) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
        return isinstance(d, dict) and bool(d)
    except (OSError, ValueError):
        return False


def part_cli(cfg: Config, res: dict, noise: list) -> None:
    """`ipcluster start -n N --daemonize` vs `parallax cluster start -n N --daemonize`."""
    out = res.setdefault("cli", {side: [] for side in cfg.sides})
    for r in range(cfg.cli_repeat):
        order = cfg.sides if r % 2 == 0 else cfg.sides[::-1]
        for side in order:
            _maybe_wait_idle(cfg)
            d = Path(tempfile.mkdtemp(prefix=f"cli-{side}-{r}-", dir=cfg.workroot))
            prof = d / "profile"
            prof.mkdir()
            cid = f"bench{uuid.uuid4().hex[:8]}"
            mark = f"{RUN_MARK}:cli-{side}-{r}:"
            env = dict(cfg.child_env)
            env[MARK_VAR] = mark
            if side == "parallax":
                start = [cfg.parallax_bin, "cluster", "start", "-n", str(cfg.n), "--daemonize",
                         f"--profile-dir={prof}", f"--cluster-id={cid}", f"--engine-args=--python={cfg.python}",
                         f"--timeout={int(cfg.timeout)}"]
                stop = [cfg.parallax_bin, "cluster", "stop", f"--profile-dir={prof}", f"--cluster-id={cid}"]
            else:
                start = [str(cfg.bindir / "ipcluster"), "start", f"--n={cfg.n}", "--daemonize",
                         f"--profile-dir={prof}", f"--cluster-id={cid}"]
                stop = [str(cfg.bindir / "ipcluster"), "stop", f"--profile-dir={prof}", f"--cluster-id={cid}"]
            client_file = prof / "security" / f"ipcontroller-{cid}-client.json"
            rec: dict = {"rep": r, "start_cmd": start, "stop_cmd": stop}
            logf = open(d / "start.log", "wb")
            try:
                t0 = time.perf_counter()
                p = subprocess.Popen(start, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     env=env, cwd=d, start_new_session=True)
                deadline = t0 + cfg.timeout
                t_seen, ids = _client_sees(client_file, cfg.n, deadline)
                rec["client_sees_n_s"] = t_seen - t0
                rec["ids"] = ids
                try:
                    rc_ = p.wait(timeout=max(1.0, deadline - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    raise BenchError(f"`{' '.join(start[:3])} ... --daemonize` did not return within {cfg.timeout}s")
                rec["returncode"] = rc_
                rec["processes"] = len(marked(mark))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                log(f"  cli {side} #{r}: FAILED: {rec['error'][:300]}\n{tail(d / 'start.log', 15)}")
            finally:
                t1 = time.perf_counter()
                try:
                    sp = subprocess.run(stop, stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=d,
                                        timeout=cfg.timeout)
                    rec["stop_returncode"] = sp.returncode
                    if sp.returncode:
                        rec["stop_output"] = (sp.stdout + sp.stderr).decode(errors="replace")[-1500:]
                except subprocess.TimeoutExpired:
                    rec["stop_error"] = f"stop command did not return within {cfg.timeout}s"
                rec["stop_command_s"] = time.perf_counter() - t1
                waited, left = wait_gone(mark, cfg.stop_grace)
                rec["stop_tree_gone_s"] = time.perf_counter() - t1
                if left:
                    rec["leftovers"] = [f"{q.pid} {' '.join(q.cmdline())[:160]}" for q in left if q.is_running()]
                    rec["leftovers_sigkilled"] = kill_procs(left, grace=2.0)
                    log(f"  cli {side} #{r}: {len(left)} process(es) left {cfg.stop_grace:.0f}s after stop: "
                        f"{rec['leftovers']}")
                with contextlib.suppress(Exception):
                    if p.poll() is None:
                        p.kill()
                        p.wait(5)
                logf.close()
                rec["start_log_tail"] = tail(d / "start.log", 8)
            out[side].append(rec)
            log(f"  cli {side} #{r}: Client sees {cfg.n} engines {rec.get('client_sees_n_s', float('nan')):.3f}s, "
                f"stop -> gone {rec.get('stop_tree_gone_s', float('nan')):.2f}s")
    # the parallax command's own return time (it returns once every engine is registered): one more
    # measurement per repeat, timed on the command alone
    if "parallax" in cfg.sides:
        for r in range(cfg.cli_repeat):
            _maybe_wait_idle(cfg)
            d = Path(tempfile.mkdtemp(prefix=f"cli-ret-{r}-", dir=cfg.workroot))
            prof = d / "profile"
            prof.mkdir()
            cid = f"bench{uuid.uuid4().hex[:8]}"
            mark = f"{RUN_MARK}:cli-ret-{r}:"
            env = dict(cfg.child_env)
            env[MARK_VAR] = mark
            start = [cfg.parallax_bin, "cluster", "start", "-n", str(cfg.n), "--daemonize", f"--profile-dir={prof}",
                     f"--cluster-id={cid}", f"--engine-args=--python={cfg.python}", f"--timeout={int(cfg.timeout)}"]
            stop = [cfg.parallax_bin, "cluster", "stop", f"--profile-dir={prof}", f"--cluster-id={cid}"]
            rec = {"rep": r}
            try:
                t0 = time.perf_counter()
                sp = subprocess.run(start, stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=d,
                                    timeout=cfg.timeout, start_new_session=True)
                rec["command_returned_s"] = time.perf_counter() - t0
                rec["returncode"] = sp.returncode
                if sp.returncode:
                    rec["output"] = (sp.stdout + sp.stderr).decode(errors="replace")[-1500:]
            except subprocess.TimeoutExpired:
                rec["error"] = f"did not return within {cfg.timeout}s"
            finally:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(stop, stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=d,
                                   timeout=cfg.timeout)
                _, left = wait_gone(mark, cfg.stop_grace)
                if left:
                    rec["leftovers_sigkilled"] = kill_procs(left, grace=2.0)
            res["cli"].setdefault("parallax_command", []).append(rec)
            log(f"  cli parallax #{r}: `parallax cluster start -n {cfg.n} --daemonize` returned after "
                f"{rec.get('command_returned_s', float('nan')):.3f}s (rc {rec.get('returncode')})")


# --------------------------------------------------------------------------
# summary and report


def summarize(cfg: Config, res: dict) -> list[dict]:
    """Rows: (measurement, unit, ipyparallel value, parallax value, ratio ipp/parallax (>1 = Parallax better))."""
    rows = []

    def add(what, unit, a, b, note=""):
        rows.append({"measurement": what, "unit": unit, "ipyparallel": a, "parallax": b,
                     "ratio": _ratio(a, b), "note": note})

    lat = res.get("latency", {})
    ipp = lat.get("ipyparallel %%px", {})
    qn = {"median": "p50", "p90": "p90", "mean": "mean", "min": "min"}
    for name, label, qs in (("parallax", 'Parallax `print("hi")`', ("median", "p90", "mean", "min")),
                            ("parallax %%px", 'Parallax `%%px print("hi")`', ("median", "p90", "mean"))):
        px = lat.get(name, {})
        if not (ipp or px):
            continue
        for q in qs:
            add(f"{'**' if q == 'median' else ''}cell latency {qn[q]}{'**' if q == 'median' else ''}, {cfg.n} engines: "
                f"ipyparallel `%%px print(\"hi\")` vs {label}", "ms", ipp.get("ms", {}).get(q), px.get("ms", {}).get(q))
        if name == "parallax":
            add(f"CPU per cell: kernel process tree (kernel + controller + engines), {label}", "ms",
                ipp.get("kernel_tree_cpu_ms_per_cell"), px.get("kernel_tree_cpu_ms_per_cell"))
            add(f"CPU per cell: this client (jupyter_client), {label}", "ms",
                ipp.get("client_cpu_ms_per_cell"), px.get("client_cpu_ms_per_cell"))
    li, lp = lat.get("lean client: ipyparallel %%px", {}), lat.get("lean client: parallax", {})
    if li or lp:
        for q in ("median", "p90"):
            add(f"diagnostic: cell latency {qn[q]} through a lean pyzmq client (no Session deserialization)", "ms",
                li.get("ms", {}).get(q), lp.get("ms", {}).get(q))
        add("diagnostic: CPU per cell, the lean client", "ms",
            li.get("client_cpu_ms_per_cell"), lp.get("client_cpu_ms_per_cell"))
    ki = lat.get("kernel_info_ms", {})
    if ki:
        add("kernel_info round trip (shell only, no engines) p50", "ms",
            ki.get("ipyparallel", {}).get("median"), ki.get("parallax", {}).get("median"))
    st = res.get("start", {})
    if st:
        ok = {s: [r for r in st.get(s, []) if "error" not in r] for s in SIDES}
        add("kernel launch → kernel_info reply", "s",
            _med([r.get("kernel_ready_s") for r in ok["ipyparallel"]]),
            _med([r.get("kernel_ready_s") for r in ok["parallax"]]))
        add(f"**kernel launch → first parallel cell answered by {cfg.n} engines**", "s",
            _med([r.get("first_cell_s") for r in ok["ipyparallel"]]),
            _med([r.get("first_cell_s") for r in ok["parallax"]]),
            "ipyparallel: launch, setup cell (import + Cluster start), first `%%px` cell")
        add(f"**cluster start → {cfg.n} engines**: `Cluster(n={cfg.n}).start_and_connect_sync()` (import excluded) vs "
            "`cluster ready elapsed_ms` (kernel log)", "s",
            _med([r.get("setup", {}).get("start_s") for r in ok["ipyparallel"]]),
            _med([(r.get("cluster_ready_ms") or 0) / 1e3 or None for r in ok["parallax"]]))
        add("`import ipyparallel` in the kernel", "s",
            _med([r.get("setup", {}).get("import_s") for r in ok["ipyparallel"]]), None)
        add("stop: `cluster.stop_cluster_sync()` cell + kernel shutdown → every process gone", "s",
            _med([(r.get("stop_cell", {}).get("cell_s") or 0) + r["stop"].get("tree_gone_s", 0)
                  for r in ok["ipyparallel"]]),
            _med([r["stop"].get("tree_gone_s") for r in ok["parallax"]]),
            "Parallax: kernel shutdown only (it stops its engines)")
    cli = res.get("cli", {})
    if cli:
        ok = {s: [r for r in cli.get(s, []) if "error" not in r] for s in SIDES}
        add("`ipcluster start -n 4 --daemonize` vs `parallax cluster start -n 4 --daemonize`: launch → stock "
            f"Client sees {cfg.n} engines", "s",
            _med([r.get("client_sees_n_s") for r in ok["ipyparallel"]]),
            _med([r.get("client_sees_n_s") for r in ok["parallax"]]))
        add("… `parallax cluster start` command returns (engines registered)", "s", None,
            _med([r.get("command_returned_s") for r in cli.get("parallax_command", []) if "error" not in r]))
        add("`ipcluster stop` vs `parallax cluster stop` → every process gone", "s",
            _med([r.get("stop_tree_gone_s") for r in ok["ipyparallel"]]),
            _med([r.get("stop_tree_gone_s") for r in ok["parallax"]]))
    mem = res.get("mem", {})
    if mem:
        a, b = mem.get("ipyparallel", {}), mem.get("parallax", {})
        for k_, label in (("pss_mib", "PSS"), ("rss_mib", "RSS"), ("uss_mib", "USS")):
            add(f"memory after the latency run: kernel process tree {label}", "MiB",
                a.get("tree", {}).get(k_), b.get("tree", {}).get(k_))
        add("memory: the kernel process alone, RSS", "MiB",
            a.get("kernel_process", {}).get("rss_mib"), b.get("kernel_process", {}).get("rss_mib"),
            "Parallax: includes the hub")
        add("processes in the kernel's tree", "", a.get("tree", {}).get("nprocs"), b.get("tree", {}).get("nprocs"))
    return rows


def _fmt(x, unit):
    if x is None:
        return "—"
    if unit == "ms":
        return f"{x:.2f}" if x < 10 else f"{x:.1f}"
    if unit == "s":
        return f"{x:.3f}" if x < 1 else f"{x:.2f}"
    if unit == "MiB":
        return f"{x:.1f}"
    return f"{x:g}"


def _mem3(m: dict) -> str:
    return f"{m['rss_mib']:.1f} / {m['pss_mib']:.1f} / {m['uss_mib']:.1f} ({m['nprocs']})"


def markdown(cfg: Config, env: dict, rows: list[dict], res: dict, noise: list, meta: dict) -> str:
    L = []
    L.append(f"## Kernel benchmark — {meta['date']}")
    L.append("")
    L.append(f"Command: `{' '.join(meta['argv_display'])}`. ipyparallel {env['ipyparallel']}, ipykernel "
             f"{env['ipykernel']}, jupyter_client {env['jupyter_client']}, Python {env['python']}, "
             f"{env['cpus']} CPUs ({env.get('cpu_model')}). Parallax binary: {env.get('parallax_bin')} "
             f"(built {env.get('parallax_bin_mtime')}), git {env.get('git_head')}"
             f"{' (dirty tree)' if env.get('git_dirty') else ''}.")
    L.append("")
    lat = res.get("latency", {})
    px = lat.get("parallax", {}).get("ms", {}).get("median")
    rdy = [r.get("cluster_ready_ms") for r in res.get("start", {}).get("parallax", []) if r.get("cluster_ready_ms")]
    fc = [r.get("first_cell_s") for r in res.get("start", {}).get("parallax", []) if r.get("first_cell_s")]
    tg = []
    if px is not None:
        tg.append(f"cell latency p50 ≤ 1.5 ms: **{px:.2f} ms — {'met' if px <= 1.5 else 'NOT met'}**")
    if rdy:
        m = statistics.median(rdy) / 1e3
        tg.append(f"cluster start ≤ 0.3 s: **{m:.3f} s (kernel log) — {'met' if m <= 0.3 else 'NOT met'}**"
                  + (f"; kernel launch → first cell with 4 outputs {statistics.median(fc):.3f} s" if fc else ""))
    if tg:
        L.append("Targets (reported, not asserted): " + "; ".join(tg) + ".")
        L.append("")
    L.append("Ratio = ipyparallel ÷ Parallax: **> 1 means Parallax is better** (faster, less CPU, less memory).")
    L.append("")
    L.append("| measurement | unit | ipykernel + ipyparallel | Parallax kernel | ratio | note |")
    L.append("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.1f}×" if r["ratio"] >= 10 else f"{r['ratio']:.2f}×"
        L.append(f"| {r['measurement']} | {r['unit']} | {_fmt(r['ipyparallel'], r['unit'])} | "
                 f"{_fmt(r['parallax'], r['unit'])} | {ratio} | {r['note']} |")
    L.append("")
    cpu_lines = []
    for name, v in lat.items():
        if isinstance(v, dict) and v.get("cpu_ms_per_cell_by_role"):
            parts = ", ".join(f"{r} {x:.2f}" for r, x in sorted(v["cpu_ms_per_cell_by_role"].items(),
                                                                key=lambda kv: -kv[1]) if x >= 0.005)
            total = sum(v["cpu_ms_per_cell_by_role"].values()) + (v.get("client_cpu_ms_per_cell") or 0)
            cores = env.get("cpus") or os.cpu_count() or 1
            floor = total / cores
            p50 = (v.get("ms") or {}).get("median")
            vs = f"; latency p50 {p50:.1f} ms = {p50 / floor:.2f}× the floor" if p50 and floor else ""
            cpu_lines.append(f"- {name}: {parts}; client {v.get('client_cpu_ms_per_cell') or 0:.2f}; "
                             f"CPU floor (all of it ÷ {cores} cores) {floor:.1f} ms{vs}")
    if cpu_lines:
        L.append("CPU per cell by process role (ms; CPU-seconds over the timed cells ÷ cells, 10 ms clock ticks):")
        L.append("")
        L += cpu_lines
        L.append("")
    mem = res.get("mem", {})
    if mem:
        L.append("Memory after the latency run, by process role (RSS / PSS / USS MiB, processes):")
        L.append("")
        for side in SIDES:
            m = mem.get(side)
            if not m or "tree" not in m:
                continue
            parts = [f"kernel process {_mem3(m['kernel_process'])}"]
            parts += [f"{role} {_mem3(v)}" for role, v in sorted(m.get("by_role", {}).items())]
            L.append(f"- {SIDE_LABEL[side]}: " + "; ".join(parts) + f"; **tree {_mem3(m['tree'])}**")
        L.append("")
    counts = []
    if lat:
        counts.append(f"latency {cfg.cells} cells per series after {cfg.warmup} warm-up, series alternating in "
                      f"chunks of {cfg.chunk} with both kernels up; kernel_info {cfg.info_samples} round trips")
        bad = {k: v.get("bad_cells") for k, v in lat.items() if isinstance(v, dict) and "bad_cells" in v}
        counts.append("cells without one `[stdout:N] hi` per engine: "
                      + ", ".join(f"{k} {v}" for k, v in bad.items()))
        msgs = {k: v.get("iopub_msgs_per_cell") for k, v in lat.items() if isinstance(v, dict) and "bad_cells" in v}
        counts.append("iopub messages per cell (excluding idle): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in msgs.items() if v is not None))
    if res.get("start"):
        counts.append(f"start: {cfg.start_repeat} fresh kernels per side (median)")
    if res.get("cli"):
        counts.append(f"cli: {cfg.cli_repeat} clusters per side (median)")
    if counts:
        L.append("Counts: " + "; ".join(counts) + ".")
        L.append("")
    errs = []
    for part in ("start", "cli"):
        for side, recs in res.get(part, {}).items():
            for r in recs if isinstance(recs, list) else []:
                if "error" in r:
                    errs.append(f"- {part} {side} #{r.get('rep')}: {r['error'][:300]}")
                if r.get("leftovers") or r.get("stop", {}).get("leftovers"):
                    errs.append(f"- {part} {side} #{r.get('rep')}: processes left after stop: "
                                f"{r.get('leftovers') or r['stop']['leftovers']}")
    for e in res.get("errors", []):
        errs.append(f"- {e['part']}: {e['error'][:300]}")
    if meta.get("leftover_processes_killed_at_end"):
        errs.append(f"- processes still alive at the end (killed): {meta['leftover_processes_killed_at_end']}")
    if errs:
        L.append("**Failures / warnings:**")
        L.append("")
        L += errs
        L.append("")
    L += common.noise_markdown(noise, meta)
    return "\n".join(L) + "\n"


def versions(cfg: Config) -> dict:
    import ipykernel
    import ipyparallel
    import IPython
    import jupyter_client

    v = common.base_versions({
        "ipyparallel": ipyparallel.__version__,
        "ipykernel": ipykernel.__version__,
        "jupyter_client": jupyter_client.__version__,
        "IPython": IPython.__version__,
    })
    if "parallax" in cfg.sides:
        common.parallax_versions(v, cfg.parallax_bin, cfg.parallax_bin_source)
    return v


def preflight(cfg: Config) -> None:
    if not os.access(cfg.python, os.X_OK):
        raise SystemExit(f"error: {cfg.python} not found (run `make venv`, or pass --venv-bin)")
    if "parallax" in cfg.sides:
        b = cfg.parallax_bin
        if not b or not (os.path.isfile(b) and os.access(b, os.X_OK)):
            raise SystemExit("error: set PARALLAX_BIN to the parallax binary (`make build`; then "
                             "`PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_kernel.py`), "
                             "or run `--sides ipyparallel`")
        subs = ["kernel"] + (["cluster"] if "cli" in cfg.parts else [])
        for sub in subs:
            r = subprocess.run([b, sub, "--help"], capture_output=True, text=True, timeout=15)
            if r.returncode != 0:
                if sub == "cluster":
                    log("`parallax cluster` is missing: skipping the cli part")
                    cfg.parts.remove("cli")
                    continue
                raise SystemExit(f"error: `{b} {sub} --help` exited with {r.returncode}:\n{r.stderr[-1500:]}")
    if "ipyparallel" in cfg.sides and "cli" in cfg.parts and not os.access(cfg.bindir / "ipcluster", os.X_OK):
        raise SystemExit(f"error: {cfg.bindir / 'ipcluster'} not found")


# --------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run (~1 min)")
    ap.add_argument("--parts", default=",".join(PARTS), help="subset of latency,start,cli,mem (default all)")
    ap.add_argument("--sides", default=",".join(SIDES), help="ipyparallel, parallax or both (default both)")
    ap.add_argument("--engines", type=int, default=4, help="engines per kernel/cluster (default 4)")
    ap.add_argument("--cells", type=int, help="timed cells per latency series (default 200; quick 50)")
    ap.add_argument("--warmup", type=int, help="warm-up cells per series (default 20; quick 10)")
    ap.add_argument("--chunk", type=int, default=10, help="cells per series before switching (default 10)")
    ap.add_argument("--no-lean", action="store_true",
                    help="skip the diagnostic latency series through a lean pyzmq client")
    ap.add_argument("--info-samples", type=int, help="kernel_info round trips per side (default 200; quick 50)")
    ap.add_argument("--start-repeat", type=int, help="fresh kernels per side for start-up (default 5; quick 2)")
    ap.add_argument("--cli-repeat", type=int, help="clusters per side for the cli part (default 3; quick 1)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds for any single wait (default 90)")
    ap.add_argument("--stop-grace", type=float, default=15.0,
                    help="seconds for processes to exit after a stop before they are killed (default 15)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each kernel/cluster start and each round of latency chunks, wait up to "
                         "SECONDS for machine CPU < 10%% busy over 1 s (for a shared box; default 0 = don't wait)")
    ap.add_argument("--venv-bin", default=str(REPO / ".venv" / "bin"), help="venv bin dir (python, ipcluster)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON/markdown results go")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary directory (kernel logs)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    workroot = Path(tempfile.mkdtemp(prefix="parallax-bench-kernel-"))
    cfg = Config(args, workroot)
    try:
        preflight(cfg)
    except SystemExit:
        shutil.rmtree(workroot, ignore_errors=True)
        raise
    if "parallax" in cfg.sides:
        # a private copy, so a rebuild during the run cannot mix binaries (the kernel starts its engines
        # from its own executable)
        cfg.parallax_bin = common.private_binary(cfg.parallax_bin, workroot)
    common.use_private_dirs(cfg.child_env)
    common.on_term_raise_keyboard_interrupt()

    env = versions(cfg)
    stamp = _dt.datetime.now()
    meta = {"date": stamp.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": list(os.getloadavg()), "argv": sys.argv,
            "argv_display": [_display_path(sys.executable), _display_path(sys.argv[0])] + sys.argv[1:],
            "run_mark": RUN_MARK}
    log(f"sides: {', '.join(cfg.sides)}; parts: {', '.join(cfg.parts)}; {cfg.n} engines; work dir {workroot}; "
        f"load average {os.getloadavg()[0]:.2f}")
    res: dict = {"errors": []}
    noise: list[dict] = []
    interrupted = False
    funcs = {"latency": part_latency, "start": part_start, "cli": part_cli}
    try:
        for part in ("latency", "start", "cli"):
            # memory is measured on the latency run's kernels
            if part not in cfg.parts and not (part == "latency" and "mem" in cfg.parts):
                continue
            log(f"part: {part}")
            try:
                funcs[part](cfg, res, noise)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                res["errors"].append({"part": part, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()})
                log(f"part {part} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up and writing partial results")
    finally:
        common.kill_leftovers(meta)
        if not args.keep_work:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            log(f"kept {workroot}")
    meta["loadavg_end"] = list(os.getloadavg())
    meta["runtime_s"] = time.perf_counter() - t_run
    meta["interrupted"] = interrupted
    rows = summarize(cfg, res)
    md = markdown(cfg, env, rows, res, noise, meta)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = stamp.strftime("%Y%m%d-%H%M%S")
    jpath = out_dir / f"kernel-{tag}.json"
    jpath.write_text(json.dumps({"meta": meta, "config": cfg.as_dict(), "env": env, "summary": rows,
                                 "results": res, "noise": noise}, indent=1, default=str))
    (out_dir / f"kernel-{tag}.md").write_text(md)
    print(md, flush=True)
    log(f"wrote {jpath} (and .md); runtime {meta['runtime_s']:.0f}s")
    failed = bool(res["errors"]) or any(
        "error" in r for part in ("start", "cli") for recs in res.get(part, {}).values()
        if isinstance(recs, list) for r in recs) or any(
        v.get("bad_cells") for v in res.get("latency", {}).values() if isinstance(v, dict) and "bad_cells" in v)
    return 130 if interrupted else (1 if failed or meta.get("leftover_processes_killed_at_end") else 0)


if __name__ == "__main__":
    sys.exit(main())
