#!/usr/bin/env python3
"""Rust engines benchmark: the Parallax kernel with 4 Rust engines vs with 1 Rust engine.

ipyparallel cannot run Rust, so there is no ipyparallel side here: the comparison is
**Parallax with N engines (default 4) vs Parallax with 1 engine**, and **the shared rustc
cache on vs off** (``PARALLAX_RUSTC_CACHE=<dir>`` vs ``off``).  Every kernel is
``$PARALLAX_BIN kernel -f {connection_file} --engines N --language rust`` (an embedded hub
plus N ``parallax engine --language rust`` processes, each with its own evcxr context),
started by jupyter_client's ``KernelManager`` from a private kernelspec and driven by its
blocking client, as a notebook frontend drives it.

Parts
  first    kernel launch (``km.start_kernel``) -> the reply of the first cell ``let x = 1;``
           (it waits for the engines' evcxr warm-up), with 1 and N engines, with a warm
           rustc cache (a private cache directory filled once by an unmeasured kernel
           before) and with a cold one (a fresh empty directory per kernel).
  trivial  a trivial cell, ``let a = K + 1; a`` with a different K for every cell (so
           that it really compiles: identical code would hit the rustc cache), on 1 and
           N engines, cache on and off: four kernels up side by side, --warmup cells
           each, then --cells timed cells per series, the series alternating in chunks
           of --chunk (ABBA).  Latency: ``perf_counter()`` before ``kc.execute()`` ->
           the ``status: idle`` of that request on iopub; every cell must show
           ``Out[E:C]: K+1`` from every engine E and an ``ok`` reply.  Before it, as a
           diagnostic, a series of expression cells ``K + 1`` (--expr-cells): they define no
           variable, so every engine compiles the same source.  (evcxr writes the context's
           variables into each cell's code in HashMap order, which differs from process to
           process: with two or more variables the engines' sources, hence their rustc cache
           keys, differ.)
  dep      ``:dep itoa = "1"`` then ``let s = itoa::Buffer::new().format(K).to_string(); s``
           in a fresh kernel, on 1 and N engines, cache on (a fresh cache directory
           holding only the warm-up's entries, so itoa compiles once) and off; timed per
           cell and summed.

Diagnostics, per cell: evcxr's own phases (``:timing`` is switched on after the first cell
unless --no-timing: ``Took``, ``Fallback`` = rust-analyzer + a first compile that fails and
is retried, ``Final compile``, ``Execution``, per engine), the rustc cache log
(``PARALLAX_RUSTC_CACHE_LOG``: each rustc invocation's outcome -- Compiled, Hit,
HitAfterWait -- and milliseconds) and the CPU of the kernel's process tree by role: kernel
process, engine processes (evcxr and its in-process rust-analyzer), cargo + rustc (finished
children of the engines), evcxr runtime processes (where cells run).

Every process started here carries a marker in its environment; every wait has a timeout;
every kernel is shut down and waited for; leftovers are killed and reported.

Output: progress on stderr; a markdown report on stdout; raw samples + summary in
``bench/results/rust-<timestamp>.json`` (and the markdown next to it).

Usage (from the repository root)::

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_rust.py
    PARALLAX_BIN=... .venv/bin/python bench/bench_rust.py --quick
    PARALLAX_BIN=... .venv/bin/python bench/bench_rust.py --parts trivial --cells 20
    make bench BENCH=rust
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (helpers shared with bench_kernel.py)
from bench_hub import CLK_TCK, NCPU, _proc_stat_cpu, log, stats  # noqa: E402
from common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    RUN_MARK,
    BenchError,
    display_path,
    maybe_wait_idle,
    med,
    proc_mem,
    ratio,
    reply_error,
)

PARTS = ("first", "trivial", "dep")
FIRST_CELL = "let x = 1;"
TRIVIAL = "let a = {k} + 1; a"
TRIVIAL_EXPR = "{k} + 1"
DEP = ':dep itoa = "1"'
USE_DEP = "let s = itoa::Buffer::new().format({k}).to_string(); s"

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OUT_RE = re.compile(r"^Out\[(\d+):\d+\]:\s?(.*)$", re.S)
STDOUT_RE = re.compile(r"^\[stdout:(\d+)\] ?(.*)$", re.S)
TOOK_RE = re.compile(r"Took (\d+)ms")
PHASE_RE = re.compile(r"^\s+(.+?): (\d+)ms\s*$", re.M)
LOG_RE = re.compile(r"^(\d+) (\S+) (\S+) (\d+)ms$")

ROLE_KERNEL = "kernel process"
ROLE_ENGINE = "engines (evcxr + rust-analyzer)"
ROLE_BUILD = "cargo + rustc"
ROLE_RUNTIME = "evcxr runtimes"
ROLES = (ROLE_ENGINE, ROLE_BUILD, ROLE_RUNTIME, ROLE_KERNEL)


def cache_label(cache: str) -> str:
    return "cache off" if cache == "off" else "cache on"


# --------------------------------------------------------------------------
# a Rust kernel


class RustKernel(common.Kernel):
    """``parallax kernel --language rust`` with n embedded engines and a given rustc cache."""

    def __init__(self, cfg: "Config", n: int, cache: str, tag: str):
        argv = [cfg.parallax_bin, "kernel", "-f", "{connection_file}", "--engines", str(n),
                "--language", "rust", "--log-level", "INFO"]
        super().__init__(f"rust{n}", cfg, tag, argv, language="rust")
        self.n = n
        self.cache = cache
        self.rc_log = self.dir / "rustc-cache.log"
        self.extra_env["PARALLAX_RUSTC_CACHE"] = cache
        self.extra_env["PARALLAX_RUSTC_CACHE_LOG"] = str(self.rc_log)
        self.label = f"{n} engine{'s' if n > 1 else ''}, {cache_label(cache)}"
        self._log_pos = 0

    def rustc_log_since_last(self) -> list[dict]:
        """The rustc cache log lines written since the last call."""
        try:
            with open(self.rc_log, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except OSError:
            return []
        # only whole lines
        end = data.rfind(b"\n") + 1
        self._log_pos += end
        out = []
        for line in data[:end].decode(errors="replace").splitlines():
            m = LOG_RE.match(line.strip())
            if m:
                how = m.group(3)
                how = how[3:-1] if how.startswith("Ok(") and how.endswith(")") else how
                out.append({"pid": int(m.group(1)), "crate": m.group(2), "outcome": how, "ms": int(m.group(4))})
        return out

    def cluster_ready_ms(self) -> float | None:
        v = self.log_value(r"cluster ready engines=\d+ elapsed_ms=(\d+)")
        return float(v) if v is not None else None


def cell_outputs(outs: list[dict]) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """(Out value per engine, stdout text per engine, error texts) from a cell's iopub messages.
    Displays updated in place (same display_id) keep their last text."""
    by_id: dict[str, str] = {}
    texts: list[str] = []
    errors: list[str] = []
    for m in outs:
        c = m["content"]
        mt = m["msg_type"]
        if mt in ("display_data", "update_display_data", "execute_result"):
            t = c.get("data", {}).get("text/plain", "")
            t = t if isinstance(t, str) else "".join(t)
            did = (c.get("transient") or {}).get("display_id")
            if did:
                by_id[did] = t
            else:
                texts.append(t)
        elif mt == "stream":
            t = c.get("text", "")
            if c.get("name") == "stderr":
                errors.append(t)
            else:
                texts.append(t)
        elif mt == "error":
            errors.append(f"{c.get('ename')}: {c.get('evalue')}")
    values: dict[int, str] = {}
    stdout: dict[int, str] = {}
    for t in list(by_id.values()) + texts:
        t = ANSI_RE.sub("", t)
        mo = OUT_RE.match(t)
        if mo:
            values[int(mo.group(1))] = mo.group(2).strip()
            continue
        ms = STDOUT_RE.match(t)
        if ms:
            stdout[int(ms.group(1))] = stdout.get(int(ms.group(1)), "") + ms.group(2)
    return values, stdout, errors


def evcxr_phases(stdout: dict[int, str]) -> dict[int, dict[str, int]]:
    """evcxr's ``:timing`` report per engine: {"Took": ms, "<phase>": ms, ...}."""
    out = {}
    for e, text in stdout.items():
        m = TOOK_RE.search(text)
        if not m:
            continue
        d = {"Took": int(m.group(1))}
        for name, ms in PHASE_RE.findall(text[m.end():]):
            d[name] = d.get(name, 0) + int(ms)
        out[e] = d
    return out


def rustc_summary(lines: list[dict]) -> dict:
    """Outcome counts of rustc invocations, and the milliseconds of those that compiled."""
    d: dict = {"invocations": len(lines), "outcomes": {}, "compiled_ms": 0, "by_crate": {}}
    for ln in lines:
        d["outcomes"][ln["outcome"]] = d["outcomes"].get(ln["outcome"], 0) + 1
        key = f"{ln['crate']} {ln['outcome']}"
        d["by_crate"][key] = d["by_crate"].get(key, 0) + 1
        if ln["outcome"] == "Compiled":
            d["compiled_ms"] += ln["ms"]
    return d


def merge_rustc(ds: list[dict]) -> dict:
    out: dict = {"invocations": 0, "outcomes": {}, "compiled_ms": 0, "by_crate": {}}
    for d in ds:
        out["invocations"] += d["invocations"]
        out["compiled_ms"] += d["compiled_ms"]
        for f in ("outcomes", "by_crate"):
            for k, v in d[f].items():
                out[f][k] = out[f].get(k, 0) + v
    return out


def run_cell(k: RustKernel, code: str, expect: dict[int, str] | None, timeout: float | None = None) -> dict:
    """One cell, timed and checked: `expect` = the Out value every engine must show (None: just ok)."""
    dt, outs, reply = k.execute(code, timeout=timeout)
    values, stdout, errors = cell_outputs(outs)
    rec = {"code": code, "wall_s": dt, "values": values, "phases": evcxr_phases(stdout),
           "rustc": rustc_summary(k.rustc_log_since_last()), "iopub_msgs": len(outs)}
    err = reply_error(reply, outs)
    if err is None and errors:
        err = "stderr/error output: " + " | ".join(errors)[:1500]
    if err is None and expect is not None and values != expect:
        err = f"expected Out values {expect}, got {values}"
    if err:
        rec["error"] = err
    return rec


# --------------------------------------------------------------------------
# CPU accounting: the kernels' process trees, with the CPU of finished children (cargo, rustc)


def _roles(k: RustKernel) -> list[tuple[psutil.Process, str]]:
    procs = k.processes()
    if not procs:
        return []
    out = [(procs[0], ROLE_KERNEL)]
    cmds = {}
    for p in procs[1:]:
        with contextlib.suppress(psutil.Error):
            cmds[p.pid] = (p, p.cmdline(), p.ppid())
    engines = {pid for pid, (_, cmd, _) in cmds.items() if len(cmd) > 1 and cmd[1] == "engine"}
    for pid, (p, cmd, ppid) in cmds.items():
        if pid in engines:
            role = ROLE_ENGINE
        elif ppid in engines and len(cmd) == 1:
            role = ROLE_RUNTIME  # evcxr re-executes this binary without arguments
        else:
            role = ROLE_BUILD  # cargo / rustc wrapper / rustc still running
        out.append((p, role))
    return out


class TreeSnap:
    def __init__(self, kernels: dict[str, RustKernel]):
        self.t = time.perf_counter()
        self.machine = _proc_stat_cpu()
        self.load = os.getloadavg()
        self.procs: dict[tuple[int, float], tuple[str, str, float, float]] = {}
        for label, k in kernels.items():
            for p, role in _roles(k):
                try:
                    ct = p.cpu_times()
                    self.procs[(p.pid, p.create_time())] = (label, role, ct.user + ct.system,
                                                            ct.children_user + ct.children_system)
                except psutil.Error:
                    continue
        ct = psutil.Process().cpu_times()
        self.client = ct.user + ct.system


def tree_delta(a: TreeSnap, b: TreeSnap, focus: str | None) -> dict:
    """CPU between two snapshots, in bench_hub.cpu_delta's format (for the noise table), plus the
    focus kernel's CPU by role.  Children times (reaped cargo/rustc) count as cargo + rustc."""
    wall = b.t - a.t
    busy = (b.machine[0] - a.machine[0]) / CLK_TCK
    steal = (b.machine[2] - a.machine[2]) / CLK_TCK
    total = (b.machine[3] - a.machine[3]) / CLK_TCK
    groups: dict[str, float] = {"client": max(0.0, b.client - a.client)}
    roles: dict[str, float] = {}
    for key, (label, role, own1, ch1) in b.procs.items():
        _, _, own0, ch0 = a.procs.get(key, (label, role, 0.0, 0.0))  # started in the window: count all
        own, ch = max(0.0, own1 - own0), max(0.0, ch1 - ch0)
        if label == focus or focus is None:
            g_own, g_ch = role, ROLE_BUILD
            roles[role] = roles.get(role, 0.0) + own
            roles[ROLE_BUILD] = roles.get(ROLE_BUILD, 0.0) + ch
        else:
            g_own = g_ch = "other kernels (idle)"
        groups[g_own] = groups.get(g_own, 0.0) + own
        groups[g_ch] = groups.get(g_ch, 0.0) + ch
    ours = sum(groups.values())
    foreign = max(0.0, busy - ours)
    cap = wall * NCPU if wall > 0 else 1.0
    return {
        "wall_s": wall, "busy_s": busy, "steal_s": steal, "total_s": total,
        "busy_pct": 100.0 * busy / total if total > 0 else 0.0,
        "bench_cpu_s": ours, "cpu_s_by_group": groups, "foreign_cpu_s": foreign,
        "foreign_pct": 100.0 * foreign / cap, "steal_pct": 100.0 * steal / total if total > 0 else 0.0,
        "loadavg_start": list(a.load), "loadavg_end": list(b.load), "roles": roles,
    }


def merge_tree_deltas(ds: list[dict]) -> dict:
    out = {"wall_s": 0.0, "busy_s": 0.0, "steal_s": 0.0, "total_s": 0.0, "cpu_s_by_group": {}, "roles": {}}
    for d in ds:
        for f in ("wall_s", "busy_s", "steal_s", "total_s"):
            out[f] += d[f]
        for f in ("cpu_s_by_group", "roles"):
            for k, v in d[f].items():
                out[f][k] = out[f].get(k, 0.0) + v
    ours = sum(out["cpu_s_by_group"].values())
    foreign = max(0.0, out["busy_s"] - ours)
    cap = out["wall_s"] * NCPU if out["wall_s"] > 0 else 1.0
    out.update({
        "busy_pct": 100.0 * out["busy_s"] / out["total_s"] if out["total_s"] > 0 else 0.0,
        "bench_cpu_s": ours, "foreign_cpu_s": foreign, "foreign_pct": 100.0 * foreign / cap,
        "steal_pct": 100.0 * out["steal_s"] / out["total_s"] if out["total_s"] > 0 else 0.0,
        "loadavg_start": ds[0]["loadavg_start"] if ds else list(os.getloadavg()),
        "loadavg_end": ds[-1]["loadavg_end"] if ds else list(os.getloadavg()),
        "windows": len(ds),
    })
    return out


@contextlib.contextmanager
def window(kernels: dict[str, RustKernel], focus: str | None, sink: list):
    a = TreeSnap(kernels)
    try:
        yield
    finally:
        sink.append(tree_delta(a, TreeSnap(kernels), focus))


def _noise(d: dict, block: str) -> dict:
    d = dict(d)
    d.pop("roles", None)
    d["block"] = block
    return d


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
        self.parts = [p for p in PARTS if p in self.parts]
        self.n = args.engines
        self.first_repeat = args.first_repeat or (1 if q else 3)
        self.cells = args.cells or (4 if q else 10)
        self.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
        self.expr_cells = args.expr_cells if args.expr_cells is not None else (2 if q else 6)
        self.chunk = max(1, args.chunk)
        self.dep_repeat = args.dep_repeat or (1 if q else 3)
        self.timing = not args.no_timing
        self.timeout = args.timeout
        self.stop_grace = args.stop_grace
        self.wait_idle = args.wait_idle
        bindir = Path(args.venv_bin)
        self.bindir = bindir
        self.python = str(bindir / "python")
        self.parallax_bin = os.environ.get("PARALLAX_BIN", "")
        self.parallax_bin_source = self.parallax_bin
        self.child_env = common.child_env(workroot, bindir)
        for k in ("PARALLAX_RUSTC_CACHE", "PARALLAX_RUSTC_CACHE_LOG", "PARALLAX_RUSTC_CACHE_MB",
                  "EVCXR_TMPDIR", "RUSTC_WRAPPER"):
            self.child_env.pop(k, None)
        # K values of the cells: unique within the run (caches are private to the run)
        self.k_next = random.randrange(10_000, 90_000) * 100

    def next_k(self) -> int:
        self.k_next += 1
        return self.k_next

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items() if k != "child_env"}


class Caches:
    """The run's private rustc cache directories."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.root = cfg.workroot / "rustc-caches"
        self.root.mkdir()
        self.warm: Path | None = None
        self.count = 0

    def fresh(self, name: str) -> str:
        self.count += 1
        d = self.root / f"{self.count:02d}-{name}"
        d.mkdir()
        return str(d)

    def copy_of_warm(self, name: str) -> str:
        self.count += 1
        d = self.root / f"{self.count:02d}-{name}"
        shutil.copytree(self.warm, d)
        return str(d)


# --------------------------------------------------------------------------
# parts


def start_kernel(cfg: Config, n: int, cache: str, tag: str, kernels: list | None = None) -> tuple[RustKernel, dict]:
    """Start a kernel and run its first cell; returns (kernel, record with kernel_ready_s, first_cell_s)."""
    k = RustKernel(cfg, n, cache, tag)
    if kernels is not None:
        kernels.append(k)
    k.start()
    rec = {"engines": n, "cache": cache_label(cache), "kernel_ready_s": k.timings["kernel_ready_s"]}
    c = run_cell(k, FIRST_CELL, None)
    rec["first_cell_s"] = time.perf_counter() - k.t_launch
    rec["first_cell"] = c
    rec["cluster_ready_ms"] = k.cluster_ready_ms()
    if "error" in c:
        raise BenchError(f"first cell on {k.label}: {c['error']}")
    return k, rec


def timing_on(cfg: Config, k: RustKernel) -> None:
    if not cfg.timing:
        return
    c = run_cell(k, ":timing", None)
    if "error" in c:
        raise BenchError(f":timing on {k.label}: {c['error']}")
    k.rustc_log_since_last()


def prewarm(cfg: Config, caches: Caches, res: dict, noise: list) -> None:
    """Fill the run's warm cache: one unmeasured 1-engine kernel runs the first cell."""
    caches.warm = Path(caches.fresh("warm"))
    maybe_wait_idle(cfg)
    log(f"prewarm: a 1-engine kernel fills the warm rustc cache {caches.warm}")
    started: list = []
    t0 = time.perf_counter()
    rec: dict = {}
    try:
        _, rec = start_kernel(cfg, 1, str(caches.warm), "prewarm", started)
        rec["rustc"] = rec["first_cell"]["rustc"]
    finally:
        for k in started:
            rec["stop"] = k.stop()
    res["prewarm"] = rec
    log(f"  prewarm: first cell {rec['first_cell_s']:.2f}s after launch "
        f"(rustc: {rec['rustc']['outcomes']}); {time.perf_counter() - t0:.1f}s in all")


def part_first(cfg: Config, caches: Caches, res: dict, noise: list) -> None:
    """Fresh kernel per start: 1 and N engines, warm and cold cache, orders alternating (ABBA)."""
    out = res.setdefault("first", [])
    combos = [(1, "warm"), (cfg.n, "warm"), (1, "cold"), (cfg.n, "cold")]
    for r in range(cfg.first_repeat):
        for n, temp in (combos if r % 2 == 0 else combos[::-1]):
            maybe_wait_idle(cfg)
            cache = str(caches.warm) if temp == "warm" else caches.fresh(f"cold-{n}-{r}")
            rec: dict = {"rep": r, "engines": n, "cache": temp}
            k = None
            deltas: list = []
            try:
                holder: list = []
                try:
                    with window({"k": _Lazy(holder)}, "k", deltas):
                        k, start = start_kernel(cfg, n, cache, f"first{r}-{temp}", holder)
                finally:
                    if holder:
                        k = holder[0]
                rec.update({f: start[f] for f in ("kernel_ready_s", "first_cell_s", "cluster_ready_ms")})
                rec["rustc"] = start["first_cell"]["rustc"]
                rec["first_cell_wall_s"] = start["first_cell"]["wall_s"]
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                log(f"  first {n}/{temp} #{r}: FAILED: {rec['error'][:300]}")
            finally:
                if k is not None:
                    rec["stop"] = k.stop()
            if deltas:
                d = deltas[0]
                rec["cpu_s_by_role"] = d["roles"]
                noise.append(_noise(d, f"first: {n} engine(s), {temp} cache #{r}"))
            out.append(rec)
            if "error" not in rec:
                roles = ", ".join(f"{k_} {v:.1f}" for k_, v in sorted(rec.get("cpu_s_by_role", {}).items()))
                log(f"  first {n} engine(s), {temp} cache #{r}: first cell {rec['first_cell_s']:.2f}s after launch "
                    f"(kernel ready {rec['kernel_ready_s']:.2f}s, cluster ready {rec['cluster_ready_ms']} ms); "
                    f"rustc {rec['rustc']['outcomes']}; CPU s: {roles}")


class _Lazy:
    """Stands for a kernel that is being started (for the CPU window around its start)."""

    def __init__(self, holder: list):
        self.holder = holder

    def processes(self):
        return self.holder[0].processes() if self.holder else []


def _series_summary(cells: list[dict], n: int, cpu: dict | None) -> dict:
    ok = [c for c in cells if "error" not in c]
    walls = [c["wall_s"] * 1e3 for c in ok]
    took_max = [max(p["Took"] for p in c["phases"].values()) for c in ok if c["phases"]]
    phase_names = sorted({ph for c in ok for p in c["phases"].values() for ph in p})
    phases = {}
    for ph in phase_names:
        vals = [statistics.fmean(p.get(ph, 0) for p in c["phases"].values()) for c in ok if c["phases"]]
        phases[ph] = statistics.median(vals) if vals else None
    rc = merge_rustc([c["rustc"] for c in ok])
    out = {
        "ms": stats(walls),
        "cells": len(cells),
        "bad_cells": len(cells) - len(ok),
        "first_bad": next((c["error"] for c in cells if "error" in c), None),
        "evcxr_took_max_ms_median": statistics.median(took_max) if took_max else None,
        "evcxr_phase_ms_median_of_engine_mean": phases,
        "rustc": rc,
        "rustc_per_cell": {o: v / len(ok) for o, v in rc["outcomes"].items()} if ok else {},
        "rustc_compiled_ms_per_cell": rc["compiled_ms"] / len(ok) if ok else None,
    }
    if cpu:
        out["cpu"] = {k: v for k, v in cpu.items() if k != "roles"}
        out["cpu_ms_per_cell_by_role"] = {r: 1e3 * v / len(cells) for r, v in cpu["roles"].items()}
        out["client_cpu_ms_per_cell"] = 1e3 * cpu["cpu_s_by_group"].get("client", 0.0) / len(cells)
    return out


def _alternate(cfg: Config, kernels: dict[str, RustKernel], template: str, ncells: int, warmup: int, what: str,
               out: dict, noise: list, block: str) -> None:
    """Warm-up, then a series per kernel, alternating in chunks of cfg.chunk cells (ABBA); a different K every cell."""
    order = list(kernels)
    cells: dict[str, list[dict]] = {s: [] for s in order}
    deltas: dict[str, list[dict]] = {s: [] for s in order}

    def one(label: str) -> dict:
        k = kernels[label]
        kk = cfg.next_k()
        return run_cell(k, template.format(k=kk), {e: str(kk + 1) for e in range(k.n)})

    log(f"{what}: `{template}`, warm-up {warmup} cell(s) per series")
    for label in order:
        for _ in range(warmup):
            c = one(label)
            if "error" in c:
                log(f"  warm-up cell on {label} failed: {c['error'][:300]}")
    log(f"{what}: {ncells} cells per series, alternating in chunks of {cfg.chunk}")
    r = 0
    while any(len(cells[s]) < ncells for s in order):
        maybe_wait_idle(cfg)
        for label in (order if r % 2 == 0 else order[::-1]):
            m = min(cfg.chunk, ncells - len(cells[label]))
            if m <= 0:
                continue
            with window(kernels, label, deltas[label]):
                for _ in range(m):
                    c = one(label)
                    cells[label].append(c)
                    if "error" in c:
                        log(f"  {label}: bad cell: {c['error'][:300]}")
        r += 1
    for label in order:
        cpu = merge_tree_deltas(deltas[label]) if deltas[label] else None
        s = _series_summary(cells[label], kernels[label].n, cpu)
        s["code"] = template
        s["engines"] = kernels[label].n
        s["cache"] = cache_label(kernels[label].cache)
        s["samples"] = cells[label]
        out[label] = s
        if cpu:
            noise.append(_noise(cpu, f"{block}: {label}"))
        ms = s["ms"]
        log(f"  {label}: p50 {ms.get('median', float('nan')):.0f} ms, p90 {ms.get('p90', float('nan')):.0f} ms; "
            f"evcxr Took (slowest engine) p50 {s['evcxr_took_max_ms_median']}; rustc {s['rustc']['outcomes']}")


def part_trivial(cfg: Config, caches: Caches, res: dict, noise: list) -> None:
    """Four kernels up side by side (1/N engines x cache on/off); the series alternate in chunks (ABBA)."""
    out = res.setdefault("trivial", {})
    on_cache = caches.copy_of_warm("trivial")
    combos = [(1, on_cache), (cfg.n, on_cache), (1, "off"), (cfg.n, "off")]
    kernels: dict[str, RustKernel] = {}
    started: list = []
    try:
        for n, cache in combos:
            maybe_wait_idle(cfg)
            k, rec = start_kernel(cfg, n, cache, f"triv-{n}-{cache_label(cache)[6:]}", started)
            kernels[k.label] = k
            timing_on(cfg, k)
            out.setdefault("starts", {})[k.label] = {f: rec[f] for f in ("engines", "cache", "kernel_ready_s",
                                                                          "first_cell_s", "cluster_ready_ms")}
            log(f"trivial: {k.label} up, first cell {rec['first_cell_s']:.2f}s after launch")
        # 1. diagnostic first (the context must hold a single variable, `x`): an expression cell that defines no
        #    variable, so that every engine compiles the same source; 2. the trivial cell proper
        if cfg.expr_cells:
            expr = out.setdefault("expr", {})
            _alternate(cfg, kernels, TRIVIAL_EXPR, cfg.expr_cells, 1, "trivial (expression, diagnostic)", expr, noise,
                       "expr")
        _alternate(cfg, kernels, TRIVIAL, cfg.cells, cfg.warmup, "trivial", out, noise, "trivial")
        # memory of the N-engine kernel with the cache on, after the cells
        big = kernels.get(f"{cfg.n} engines, cache on")
        if big is not None:
            by_role: dict[str, list] = {}
            for p, role in _roles(big):
                by_role.setdefault(role, []).append(p)
            out["memory"] = {"label": big.label, "tree": proc_mem([p for ps in by_role.values() for p in ps]),
                             "by_role": {r_: proc_mem(ps) for r_, ps in by_role.items()}}
    finally:
        for k in started:
            out.setdefault("stop", {})[k.label] = k.stop()


def part_dep(cfg: Config, caches: Caches, res: dict, noise: list) -> None:
    """Fresh kernel per run: `:dep itoa` then a cell using it; 1/N engines x cache on/off; ABBA."""
    out = res.setdefault("dep", [])
    combos = [(1, "on"), (cfg.n, "on"), (1, "off"), (cfg.n, "off")]
    for r in range(cfg.dep_repeat):
        for n, onoff in (combos if r % 2 == 0 else combos[::-1]):
            maybe_wait_idle(cfg)
            cache = caches.copy_of_warm(f"dep-{n}-{r}") if onoff == "on" else "off"
            rec: dict = {"rep": r, "engines": n, "cache": f"cache {onoff}"}
            k = None
            started: list = []
            try:
                k, start = start_kernel(cfg, n, cache, f"dep{r}-{onoff}", started)
                rec["first_cell_s"] = start["first_cell_s"]
                timing_on(cfg, k)
                deltas: list = []
                with window({"k": k}, "k", deltas):
                    dep = run_cell(k, DEP, None, timeout=cfg.timeout)
                    if "error" in dep:
                        raise BenchError(f"{DEP!r}: {dep['error']}")
                    kk = cfg.next_k()
                    use = run_cell(k, USE_DEP.format(k=kk), {e: f'"{kk}"' for e in range(n)})
                    if "error" in use:
                        raise BenchError(f"itoa cell: {use['error']}")
                rec["dep_cell"] = dep
                rec["use_cell"] = use
                rec["dep_s"], rec["use_s"] = dep["wall_s"], use["wall_s"]
                rec["total_s"] = dep["wall_s"] + use["wall_s"]
                rec["cpu_s_by_role"] = deltas[0]["roles"]
                noise.append(_noise(deltas[0], f"dep: {n} engine(s), cache {onoff} #{r}"))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                log(f"  dep {n}/{onoff} #{r}: FAILED: {rec['error'][:300]}")
            finally:
                for kk_ in started:
                    rec["stop"] = kk_.stop()
            out.append(rec)
            if "error" not in rec:
                log(f"  dep {n} engine(s), cache {onoff} #{r}: `:dep` {rec['dep_s']:.2f}s "
                    f"(rustc {rec['dep_cell']['rustc']['by_crate']}), itoa cell {rec['use_s']:.2f}s, "
                    f"sum {rec['total_s']:.2f}s")


# --------------------------------------------------------------------------
# summary and report


def _ms(x):
    return None if x is None else x * 1e3


def summarize(cfg: Config, res: dict) -> list[dict]:
    """Rows: measurement, unit, 1-engine value, N-engine value, ratio N ÷ 1 (target), note."""
    rows = []
    N = cfg.n

    def add(what, unit, one, many, target=None, note=""):
        numbers = isinstance(one, (int, float)) and isinstance(many, (int, float))
        rows.append({"measurement": what, "unit": unit, "one": one, "many": many,
                     "ratio": ratio(many, one) if numbers else None,
                     "target": target, "note": note})

    first = [r for r in res.get("first", []) if "error" not in r]
    for temp in ("warm", "cold"):
        sel = {n: [r for r in first if r["engines"] == n and r["cache"] == temp] for n in (1, N)}
        if not (sel[1] or sel[N]):
            continue
        add(f"**kernel launch → first cell (`{FIRST_CELL}`) replied**, {temp} rustc cache", "s",
            med([r["first_cell_s"] for r in sel[1]]), med([r["first_cell_s"] for r in sel[N]]),
            note=f"median of {len(sel[1])} / {len(sel[N])} kernels; each: "
                 + " / ".join(", ".join(f"{r['first_cell_s']:.1f}" for r in sel[n]) for n in (1, N)))
        add(f"… engines registered (kernel log `cluster ready`), {temp} rustc cache", "ms",
            med([r.get("cluster_ready_ms") for r in sel[1]]), med([r.get("cluster_ready_ms") for r in sel[N]]))
        for role in ROLES:
            a = med([r.get("cpu_s_by_role", {}).get(role) for r in sel[1]])
            b = med([r.get("cpu_s_by_role", {}).get(role) for r in sel[N]])
            if a or b:
                add(f"… CPU in that window: {role}", "s", a, b)
        add("… rustc invocations compiled / cache hits (all engines)", "",
            _outcome_str(sel[1]), _outcome_str(sel[N]))
    off = {n: [st["first_cell_s"] for st in _off_starts(res) if st["engines"] == n] for n in (1, N)}
    if off[1] or off[N]:
        add("kernel launch → first cell replied, **rustc cache off** (the cache-off kernels of the trivial and "
            "dep parts)", "s", med(off[1]), med(off[N]),
            note=f"median of {len(off[1])} / {len(off[N])} kernels")
    triv = res.get("trivial", {})
    for onoff in ("on", "off"):
        a, b = triv.get(f"1 engine, cache {onoff}"), triv.get(f"{N} engines, cache {onoff}")
        if not (a or b):
            continue
        a, b = a or {}, b or {}
        for q in ("median", "p90"):
            add(f"{'**' if q == 'median' else ''}trivial cell `{TRIVIAL.format(k='K')}` "
                f"{'p50' if q == 'median' else 'p90'}, cache {onoff}{'**' if q == 'median' else ''}", "ms",
                a.get("ms", {}).get(q), b.get("ms", {}).get(q), 1.5 if q == "median" and onoff == "on" else None)
        add(f"… evcxr `Took` (slowest engine) p50, cache {onoff}", "ms",
            a.get("evcxr_took_max_ms_median"), b.get("evcxr_took_max_ms_median"))
        phases = sorted(set(a.get("evcxr_phase_ms_median_of_engine_mean", {}))
                        | set(b.get("evcxr_phase_ms_median_of_engine_mean", {})))
        for ph in phases:
            if ph == "Took":
                continue
            add(f"… evcxr phase `{ph}` p50 (mean over engines), cache {onoff}", "ms",
                a.get("evcxr_phase_ms_median_of_engine_mean", {}).get(ph),
                b.get("evcxr_phase_ms_median_of_engine_mean", {}).get(ph))
        for role in ROLES:
            x, y = a.get("cpu_ms_per_cell_by_role", {}).get(role), b.get("cpu_ms_per_cell_by_role", {}).get(role)
            if x or y:
                add(f"… CPU per cell: {role}, cache {onoff}", "ms", x, y)
        if onoff == "on":
            add("… rustc invocations per cell: compiled / hits (log)", "", _per_cell_str(a), _per_cell_str(b))
    expr = triv.get("expr", {})
    for onoff in ("on", "off"):
        a, b = expr.get(f"1 engine, cache {onoff}"), expr.get(f"{N} engines, cache {onoff}")
        if not (a or b):
            continue
        a, b = a or {}, b or {}
        add(f"diagnostic: expression cell `{TRIVIAL_EXPR.format(k='K')}` p50 (defines no variable: every engine "
            f"compiles the same source), cache {onoff}", "ms", a.get("ms", {}).get("median"),
            b.get("ms", {}).get("median"), note=f"{a.get('ms', {}).get('count', 0)} cells per series")
        if onoff == "on":
            add("… rustc invocations per cell: compiled / hits (log)", "", _per_cell_str(a), _per_cell_str(b))
            for role in (ROLE_ENGINE, ROLE_BUILD):
                x, y = a.get("cpu_ms_per_cell_by_role", {}).get(role), b.get("cpu_ms_per_cell_by_role", {}).get(role)
                if x or y:
                    add(f"… CPU per cell: {role}, cache {onoff}", "ms", x, y)
    dep = [r for r in res.get("dep", []) if "error" not in r]
    for onoff in ("on", "off"):
        sel = {n: [r for r in dep if r["engines"] == n and r["cache"] == f"cache {onoff}"] for n in (1, N)}
        if not (sel[1] or sel[N]):
            continue
        for f, what in (("total_s", f"**`{DEP}` + a cell using itoa, cache {onoff}**"),
                        ("dep_s", f"… `{DEP}` cell, cache {onoff}"), ("use_s", f"… itoa cell, cache {onoff}")):
            add(what, "s", med([r[f] for r in sel[1]]), med([r[f] for r in sel[N]]),
                2.0 if f == "total_s" and onoff == "on" else None,
                note=(f"median of {len(sel[1])} / {len(sel[N])} kernels" if f == "total_s" else ""))
        if onoff == "on":
            add("… itoa compiled / cache hits in the `:dep` cell (log)", "",
                _crate_str(sel[1], "itoa"), _crate_str(sel[N], "itoa"))
    return rows


def _off_starts(res: dict) -> list[dict]:
    """First-cell records of the cache-off kernels started by the trivial and dep parts."""
    out = [st for st in res.get("trivial", {}).get("starts", {}).values() if st.get("cache") == "cache off"]
    out += [{"engines": r["engines"], "first_cell_s": r["first_cell_s"]} for r in res.get("dep", [])
            if r.get("cache") == "cache off" and r.get("first_cell_s") is not None]
    return out


def _outcome_str(recs: list[dict]) -> str | None:
    if not recs:
        return None
    rc = merge_rustc([r["rustc"] for r in recs])
    o = rc["outcomes"]
    if not rc["invocations"]:
        return "— (cache off)"
    return f"{o.get('Compiled', 0) / len(recs):g} / {(o.get('Hit', 0) + o.get('HitAfterWait', 0)) / len(recs):g}"


def _per_cell_str(s: dict) -> str | None:
    p = s.get("rustc_per_cell")
    if p is None:
        return None
    return f"{p.get('Compiled', 0):.1f} / {p.get('Hit', 0) + p.get('HitAfterWait', 0):.1f}"


def _crate_str(recs: list[dict], crate: str) -> str | None:
    if not recs:
        return None
    c = h = 0
    for r in recs:
        bc = r["dep_cell"]["rustc"]["by_crate"]
        c += bc.get(f"{crate} Compiled", 0)
        h += bc.get(f"{crate} Hit", 0) + bc.get(f"{crate} HitAfterWait", 0)
    return f"{c / len(recs):g} / {h / len(recs):g}"


def _fmt(x, unit):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if unit == "ms":
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}"
    if unit == "s":
        return f"{x:.2f}" if x < 10 else f"{x:.1f}"
    if unit == "MiB":
        return f"{x:.0f}"
    return f"{x:g}"


def targets(cfg: Config, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["target"] is None:
            continue
        v = r["ratio"]
        what = r["measurement"].replace("**", "")
        if v is None:
            out.append(f"{what}: {cfg.n} engines within {r['target']:g}× of 1 engine — not measured")
        else:
            out.append(f"{what}: {cfg.n} engines ÷ 1 engine = **{v:.2f}× — "
                       f"{'met' if v <= r['target'] else 'NOT met'}** (target ≤ {r['target']:g}×)")
    return out


def markdown(cfg: Config, env: dict, rows: list[dict], res: dict, noise: list, meta: dict) -> str:
    N = cfg.n
    L = []
    L.append(f"## Rust engines benchmark — {meta['date']}")
    L.append("")
    L.append(f"Command: `{' '.join(meta['argv_display'])}`. {env.get('rustc')}, {env.get('cargo')}, evcxr "
             f"{env.get('evcxr')}, jupyter_client {env['jupyter_client']}, Python {env['python']}, {env['cpus']} CPUs "
             f"({env.get('cpu_model')}). Parallax binary: {env.get('parallax_bin')} (built "
             f"{env.get('parallax_bin_mtime')}), git {env.get('git_head')}{' (dirty tree)' if env.get('git_dirty') else ''}.")
    L.append("")
    L.append(f"ipyparallel cannot run Rust, so there is no ipyparallel side: **the comparison is Parallax with {N} "
             f"Rust engines vs Parallax with 1 Rust engine** (`parallax kernel --language rust --engines {N}` vs "
             f"`--engines 1`), and the shared rustc cache on (`PARALLAX_RUSTC_CACHE=<private dir>`) vs off. "
             f"**Ratio = {N} engines ÷ 1 engine: 1.00× means {N} engines cost nothing over 1; above 1 = slower.**")
    L.append("")
    tg = targets(cfg, rows)
    if tg:
        L.append("Targets (reported, not asserted): " + "; ".join(tg) + ".")
        L.append("")
    L.append(f"| measurement | unit | 1 engine | {N} engines | ratio {N} ÷ 1 | note |")
    L.append("|---|---|---|---|---|---|")
    for r in rows:
        rt = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        L.append(f"| {r['measurement']} | {r['unit']} | {_fmt(r['one'], r['unit'])} | {_fmt(r['many'], r['unit'])} "
                 f"| {rt} | {r['note']} |")
    L.append("")
    # cache on vs off
    onoff = []
    triv = res.get("trivial", {})
    for n in (1, N):
        a = triv.get(f"{n} engine{'s' if n > 1 else ''}, cache on", {}).get("ms", {}).get("median")
        b = triv.get(f"{n} engine{'s' if n > 1 else ''}, cache off", {}).get("ms", {}).get("median")
        if a and b:
            onoff.append(f"trivial cell p50 on {n} engine(s): off {b:.0f} ms ÷ on {a:.0f} ms = {b / a:.2f}×")
    dep = [r for r in res.get("dep", []) if "error" not in r]
    for n in (1, N):
        a = med([r["total_s"] for r in dep if r["engines"] == n and r["cache"] == "cache on"])
        b = med([r["total_s"] for r in dep if r["engines"] == n and r["cache"] == "cache off"])
        if a and b:
            onoff.append(f"`:dep` + itoa cell on {n} engine(s): off {b:.2f} s ÷ on {a:.2f} s = {b / a:.2f}×")
    first = [r for r in res.get("first", []) if "error" not in r]
    for n in (1, N):
        a = med([r["first_cell_s"] for r in first if r["engines"] == n and r["cache"] == "warm"])
        b = med([r["first_cell_s"] for r in first if r["engines"] == n and r["cache"] == "cold"])
        if a and b:
            onoff.append(f"first cell after launch on {n} engine(s): cold {b:.1f} s ÷ warm {a:.1f} s = {b / a:.2f}×")
    offs = _off_starts(res)
    for n in (1, N):
        a = med([r["first_cell_s"] for r in first if r["engines"] == n and r["cache"] == "warm"])
        b = med([r["first_cell_s"] for r in offs if r["engines"] == n])
        if a and b:
            onoff.append(f"first cell after launch on {n} engine(s): cache off {b:.1f} s ÷ warm {a:.1f} s = {b / a:.2f}×")
    if onoff:
        L.append("What the shared rustc cache buys (**> 1 = the cache helps**): " + "; ".join(onoff) + ".")
        L.append("")
    mem = triv.get("memory")
    if mem:
        parts = ", ".join(f"{r_} {v['rss_mib']:.0f} / {v['pss_mib']:.0f} ({v['nprocs']})"
                          for r_, v in sorted(mem["by_role"].items()))
        L.append(f"Memory of the {mem['label']} kernel after the trivial cells, RSS / PSS MiB (processes): {parts}; "
                 f"tree {mem['tree']['rss_mib']:.0f} / {mem['tree']['pss_mib']:.0f} ({mem['tree']['nprocs']}).")
        L.append("")
    counts = []
    if res.get("first"):
        counts.append(f"first: {cfg.first_repeat} fresh kernel(s) per engine count and cache state, orders alternating; "
                      f"warm = a private cache filled by one unmeasured 1-engine kernel (prewarm: first cell "
                      f"{res.get('prewarm', {}).get('first_cell_s', float('nan')):.1f} s after launch)")
    if triv:
        bad = {k_: v.get("bad_cells") for k_, v in triv.items() if isinstance(v, dict) and "bad_cells" in v}
        counts.append(f"trivial: {cfg.cells} cells per series after {cfg.warmup} warm-up, the four kernels up side by "
                      f"side, series alternating in chunks of {cfg.chunk}; cells without the expected `Out[E:C]` from "
                      f"every engine: " + ", ".join(f"{k_} {v}" for k_, v in bad.items()))
    if res.get("dep"):
        counts.append(f"dep: {cfg.dep_repeat} fresh kernel(s) per engine count and cache state; cache on = a fresh copy "
                      f"of the warm cache (no itoa in it)")
    counts.append(f"evcxr `:timing` {'on' if cfg.timing else 'off'} after the first cell")
    L.append("Counts: " + "; ".join(counts) + ".")
    L.append("")
    errs = []
    for part in ("first", "dep"):
        for r in res.get(part, []):
            if "error" in r:
                errs.append(f"- {part} {r['engines']} engine(s) {r['cache']} #{r['rep']}: {r['error'][:300]}")
            if r.get("stop", {}).get("leftovers"):
                errs.append(f"- {part} #{r['rep']}: processes left after stop: {r['stop']['leftovers']}")
    for label, v in list(triv.items()) + [(f"expression {k_}", v_) for k_, v_ in triv.get("expr", {}).items()]:
        if isinstance(v, dict) and v.get("first_bad"):
            errs.append(f"- trivial {label}: {v['bad_cells']} bad cell(s); first: {v['first_bad'][:300]}")
    for label, st in triv.get("stop", {}).items():
        if st.get("leftovers"):
            errs.append(f"- trivial {label}: processes left after stop: {st['leftovers']}")
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
    import jupyter_client

    v = common.base_versions({"jupyter_client": jupyter_client.__version__})
    common.parallax_versions(v, cfg.parallax_bin, cfg.parallax_bin_source)
    for tool in ("rustc", "cargo"):
        with contextlib.suppress(Exception):
            v[tool] = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    with contextlib.suppress(Exception):
        lock = (REPO / "Cargo.lock").read_text()
        m = re.search(r'name = "evcxr"\nversion = "([^"]+)"', lock)
        v["evcxr"] = m.group(1) if m else None
    return v


def preflight(cfg: Config) -> None:
    b = cfg.parallax_bin
    if not b or not (os.path.isfile(b) and os.access(b, os.X_OK)):
        raise SystemExit("error: set PARALLAX_BIN to the parallax binary (`make build`; then "
                         "`PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_rust.py`)")
    r = subprocess.run([b, "kernel", "--help"], capture_output=True, text=True, timeout=15)
    if r.returncode != 0 or "rust" not in r.stdout:
        raise SystemExit(f"error: `{b} kernel --help` does not offer `--language rust`:\n{(r.stdout + r.stderr)[-1500:]}")
    for tool in ("rustc", "cargo"):
        if shutil.which(tool, path=cfg.child_env.get("PATH")) is None:
            raise SystemExit(f"error: {tool} is not on PATH (the Rust engines compile cells with it)")


# --------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run (~3 min)")
    ap.add_argument("--parts", default=",".join(PARTS), help="subset of first,trivial,dep (default all)")
    ap.add_argument("--engines", type=int, default=4, help="engines of the many-engine kernels (default 4; vs 1)")
    ap.add_argument("--first-repeat", type=int, help="fresh kernels per engine count and cache state for the "
                                                     "first-cell part (default 3; quick 1)")
    ap.add_argument("--cells", type=int, help="timed trivial cells per series (default 10; quick 4)")
    ap.add_argument("--warmup", type=int, help="warm-up trivial cells per series (default 2; quick 1)")
    ap.add_argument("--expr-cells", type=int,
                    help="diagnostic series first: cells `K + 1` (no new variable) per series (default 6; quick 2; "
                         "0 = skip)")
    ap.add_argument("--chunk", type=int, default=5, help="trivial cells per series before switching (default 5)")
    ap.add_argument("--dep-repeat", type=int, help="fresh kernels per engine count and cache state for the "
                                                   ":dep part (default 3; quick 1)")
    ap.add_argument("--no-timing", action="store_true", help="do not switch on evcxr's :timing after the first cell")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds for any single wait (default 180)")
    ap.add_argument("--stop-grace", type=float, default=15.0,
                    help="seconds for processes to exit after a kernel shutdown before they are killed (default 15)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each kernel start and each round of chunks, wait up to SECONDS for machine CPU "
                         "< 10%% busy over 1 s (for a shared box; default 0 = don't wait)")
    ap.add_argument("--venv-bin", default=str(REPO / ".venv" / "bin"), help="venv bin dir (python)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON/markdown results go")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary directory (kernel logs, caches)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    workroot = Path(tempfile.mkdtemp(prefix="parallax-bench-rust-"))
    cfg = Config(args, workroot)
    try:
        preflight(cfg)
    except SystemExit:
        shutil.rmtree(workroot, ignore_errors=True)
        raise
    cfg.parallax_bin = common.private_binary(cfg.parallax_bin, workroot)
    common.use_private_dirs(cfg.child_env)
    common.on_term_raise_keyboard_interrupt()

    env = versions(cfg)
    stamp = _dt.datetime.now()
    meta = {"date": stamp.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": list(os.getloadavg()), "argv": sys.argv,
            "argv_display": [display_path(sys.executable), display_path(sys.argv[0])] + sys.argv[1:],
            "run_mark": RUN_MARK}
    log(f"parts: {', '.join(cfg.parts)}; 1 vs {cfg.n} engines; work dir {workroot}; "
        f"load average {os.getloadavg()[0]:.2f}")
    res: dict = {"errors": []}
    noise: list[dict] = []
    interrupted = False
    caches = Caches(cfg)
    funcs = {"first": part_first, "trivial": part_trivial, "dep": part_dep}
    try:
        try:
            prewarm(cfg, caches, res, noise)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            res["errors"].append({"part": "prewarm", "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()})
            log(f"prewarm FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        for part in cfg.parts:
            log(f"part: {part}")
            try:
                funcs[part](cfg, caches, res, noise)
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
    jpath = out_dir / f"rust-{tag}.json"
    jpath.write_text(json.dumps({"meta": meta, "config": cfg.as_dict(), "env": env, "summary": rows,
                                 "results": res, "noise": noise}, indent=1, default=str))
    (out_dir / f"rust-{tag}.md").write_text(md)
    print(md, flush=True)
    log(f"wrote {jpath} (and .md); runtime {meta['runtime_s']:.0f}s")
    triv = res.get("trivial", {})
    failed = bool(res["errors"]) or any("error" in r for p in ("first", "dep") for r in res.get(p, [])) or any(
        v.get("bad_cells") for v in list(triv.values()) + list(triv.get("expr", {}).values())
        if isinstance(v, dict) and "bad_cells" in v)
    return 130 if interrupted else (1 if failed or meta.get("leftover_processes_killed_at_end") else 0)


if __name__ == "__main__":
    sys.exit(main())
