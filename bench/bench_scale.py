#!/usr/bin/env python3
"""Scale benchmark: many engines on one hub, Parallax and ipyparallel side by side.

Real engines (``make bench BENCH=scale``): for each N (default 16 and 64 here;
``--engines 16,64,256,1024`` on a big machine), one cluster of each kind, the
same work, the stock ``ipyparallel.Client`` driving both:

  parallax     ``parallax cluster start -n N --daemonize`` (hub + N Rust engines,
               each with its Python subprocess)
  ipyparallel  ``ipcluster start -n N --daemonize`` (ipcontroller + N ipengines)

measured: launch -> all N registered (as the client sees them); the first
``dv.apply_sync(f)`` on the fresh engines; ``dv.execute('a=1')`` p50/p90 over
--repeat; ``rc.broadcast_view().execute('a=1')`` p50; the memory of the engine
processes after that (RSS and PSS summed over every engine process and its
children); stop -> all processes gone.

Then the load generator (``parallax bench engines``: fake engines that register,
heartbeat and answer trivially, so the hub's own limits are measured apart from
Python's): registration storm, hub memory per engine, heartbeat CPU and fan-out
at --fake (default 1000,3000: each fake engine holds a real engine's 6
connections, and the hub as many, so ~3,160 is the most that fits under a
limit of 20,000 open files per process), then with ``--sockets lean`` at
--fake-lean (default 10000:none,9000:mux: N:VIA, each fake engine keeping only
its heartbeat pong and the shell connection VIA measures; pings arrive on one
shared SUB per 500 engines, so the heartbeat CPU undercounts the hub's PUB
side). ipyparallel has no such tool.

Output: a markdown report on stdout (for BENCHMARKS.md), progress on stderr, the
raw figures as JSON in ``bench/results/scale-<timestamp>.json``.

    PARALLAX_BIN=$PWD/target/release/parallax .venv/bin/python bench/bench_scale.py
    ... bench/bench_scale.py --engines 16 --fake 1000 --repeat 5     # quick
    ... bench/bench_scale.py --engines '' --fake '' --fake-lean 200:none  # lean only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from engine_memory import zygote_pid

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("PARALLAX_BIN") or REPO / "target/release/parallax").resolve()
VENV_BIN = Path(sys.executable).parent
def ipcluster() -> str:
    """The venv's ipcluster, else the one on PATH (bench/scale_device.sh installs the wheels
    with `pip --target`, whose scripts are not beside the interpreter)."""
    mine = VENV_BIN / "ipcluster"
    return str(mine) if mine.exists() else (shutil.which("ipcluster") or str(mine))


#: seconds a stop may take before what is left is killed (and the stop is
#: reported as "> STOP_TIMEOUT s")
STOP_TIMEOUT = 120


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))] if xs else float("nan")


def tree_memory(pids: list[int]) -> dict:
    rss = pss = 0
    n = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
        except psutil.Error:
            continue
        for q in procs:
            try:
                m = q.memory_full_info()
                rss += m.rss
                pss += getattr(m, "pss", m.rss)
                n += 1
            except psutil.Error:
                pass
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": n}


class Cluster:
    """One cluster of either kind in a private profile directory."""

    def __init__(self, kind: str, n: int, root: Path):
        self.kind, self.n = kind, n
        self.profile = root / f"{kind}-{n}"
        self.profile.mkdir(parents=True)
        self.env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        IPYTHONDIR=str(root / "ipython"))

    def start(self, timeout: float) -> float:
        t0 = time.perf_counter()
        if self.kind == "parallax":
            cmd = [str(BIN), "cluster", "start", "-n", str(self.n), "--daemonize",
                   f"--profile-dir={self.profile}", f"--timeout={timeout}",
                   f"--engine-args=--python={VENV_BIN / 'python3'}"]
            if HUB_THREADS:
                cmd.append(f"--hub-args=--threads={HUB_THREADS}")
        else:
            cmd = [ipcluster(), "start", "-n", str(self.n), "--daemonize",
                   f"--profile-dir={self.profile}", "--log-level=WARN"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout + 60)
        if r.returncode != 0:
            raise RuntimeError(f"{self.kind} start failed: {r.stderr[-2000:]}")
        import ipyparallel as ipp

        url = self.profile / "security/ipcontroller-client.json"
        deadline = time.monotonic() + timeout
        while not url.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: no client connection file")
            time.sleep(0.05)
        self.rc = ipp.Client(str(url), timeout=timeout)
        self.rc.wait_for_engines(self.n, timeout=timeout)
        return time.perf_counter() - t0

    def engine_pids(self) -> list[int]:
        """The engine processes, from the cluster file both kinds write (ipyparallel's format),
        and Parallax's zygote (whose children are the engines' interpreters)."""
        pids = []

        def walk(v):
            if isinstance(v, dict):
                if isinstance(v.get("pid"), int) and v["pid"] > 0:
                    pids.append(v["pid"])
                for x in v.values():
                    walk(x)

        for f in (self.profile / "security").glob("cluster-*.json"):
            walk(json.loads(f.read_text()).get("engines", {}))
        # Parallax's zygote alone: its children, the interpreters, are summed with it (they
        # carry its command line, so matching that would count each of them twice)
        zygote = zygote_pid(self.profile)
        if zygote is not None:
            pids.append(zygote)
        return pids

    def all_pids(self) -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if str(self.profile) in " ".join(p.info["cmdline"] or [])]

    def stop(self) -> float:
        pids = self.all_pids()
        try:
            self.rc.close()
        except Exception:
            pass
        t0 = time.perf_counter()
        if self.kind == "parallax":
            cmd = [str(BIN), "cluster", "stop", f"--profile-dir={self.profile}"]
        else:
            cmd = [ipcluster(), "stop", f"--profile-dir={self.profile}"]
        try:
            subprocess.run(cmd, env=self.env, capture_output=True, timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"{self.kind} n={self.n}: the stop command did not return within {STOP_TIMEOUT} s")
        procs = []
        for p in pids:
            try:
                procs.append(psutil.Process(p))
            except psutil.Error:
                pass
        left = max(1.0, STOP_TIMEOUT - (time.perf_counter() - t0))
        _, alive = psutil.wait_procs(procs, timeout=left)
        dt = time.perf_counter() - t0
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        # not stopped within the limit: recorded as such, not as a time
        return dt if not alive else float("inf")


def measure(kind: str, n: int, root: Path, repeat: int, timeout: float) -> dict:
    c = Cluster(kind, n, root)
    rec = {"kind": kind, "engines": n}
    try:
        rec["start_s"] = c.start(timeout)
        log(f"{kind} n={n}: {n} engines registered in {rec['start_s']:.2f} s")
        dv = c.rc[:]
        t = time.perf_counter()
        dv.apply_async(os.getpid).get(timeout)
        rec["first_apply_s"] = time.perf_counter() - t
        rec["engine_memory_first_apply"] = tree_memory(c.engine_pids())
        ex = []
        for _ in range(repeat):
            t = time.perf_counter()
            dv.execute("a=1", block=False).get(timeout)
            ex.append(time.perf_counter() - t)
        rec["execute_p50_ms"] = 1e3 * pct(ex, 0.5)
        rec["execute_p90_ms"] = 1e3 * pct(ex, 0.9)
        bv = c.rc.broadcast_view()
        bc = []
        for _ in range(repeat):
            t = time.perf_counter()
            bv.execute("a=1", block=False).get(timeout)
            bc.append(time.perf_counter() - t)
        rec["broadcast_p50_ms"] = 1e3 * pct(bc, 0.5)
        rec["engine_memory"] = tree_memory(c.engine_pids())
        log(f"{kind} n={n}: execute p50 {rec['execute_p50_ms']:.1f} ms, broadcast p50 "
            f"{rec['broadcast_p50_ms']:.1f} ms, first apply {rec['first_apply_s']:.2f} s, "
            f"engines {rec['engine_memory']['pss_mib']:.0f} MiB PSS "
            f"({rec['engine_memory_first_apply']['pss_mib']:.0f} MiB after the first apply)")
    except Exception as e:  # noqa: BLE001 (recorded, the run goes on)
        rec["error"] = f"{type(e).__name__}: {e}"
        log(f"{kind} n={n}: {rec['error']}")
    finally:
        rec["stop_s"] = c.stop()
    return rec


#: `--hub-threads` (0: the hub's default)
HUB_THREADS = 0


def fake(n: int, timeout: float, extra: tuple[str, ...] = ()) -> dict:
    if HUB_THREADS:
        extra = (*extra, f"--hub-arg=--threads={HUB_THREADS}")
    r = subprocess.run([str(BIN), "bench", "engines", "-n", str(n), "--json", "--rounds", "20",
                        "--idle", "10", "--timeout", str(timeout), *extra],
                       capture_output=True, text=True, timeout=timeout + 300)  # fmt: skip
    if r.returncode != 0:
        return {"engines": n, "error": r.stderr.strip()[-500:], "args": list(extra)}
    rec = json.loads(r.stdout)
    log(f"fake n={n} {' '.join(extra)}: {rec}")
    return rec


def parse_lean(spec: str) -> list[tuple[int, str]]:
    """``10000:none,9000:mux`` -> [(10000, 'none'), (9000, 'mux')]."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        n, _, via = item.partition(":")
        via = via or "mux"
        if not n.isdigit() or via not in ("mux", "broadcast", "both", "none"):
            raise SystemExit(f"--fake-lean: {item!r} is not N:VIA (VIA = mux, broadcast, both or none)")
        out.append((int(n), via))
    return out


def fmt_stop(v) -> str:
    if v is None:
        return "–"
    return f"> {STOP_TIMEOUT} s (killed)" if v == float("inf") else f"{v:.2f} s"


def nan(f: dict, k: str) -> float:
    v = f.get(k)
    return float("nan") if v is None else v


def lean_report(leans: list[dict]) -> list[str]:
    lines = ["", "### Load generator, lean sockets (`--sockets lean`: pong + the measured shell connection per engine)", "",
             "| fake engines | via | ping subscribers | all replies | all registered | hub RSS | per engine | hub open files | heartbeat CPU | MUX fan-out p50 / p90 | hub CPU per MUX fan-out |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in leans:
        if "error" in f:
            lines.append(f"| {f['engines']} | {' '.join(f.get('args', []))} | failed: {f['error'][:100]} | | | | | | | | |")
            continue
        fan = (f"{f['fanout_p50_ms']:.1f} / {f['fanout_p90_ms']:.1f} ms | {nan(f, 'hub_cpu_ms_per_fanout'):.1f} ms"
               if "fanout_p50_ms" in f else "– | –")
        lines.append(
            f"| {f['engines']} | {f.get('via')} | {f.get('ping_subscribers')} | {f['registration_replies_s']:.2f} s | "
            f"{f['all_registered_s']:.2f} s | {nan(f, 'hub_rss_registered_mib'):.0f} MiB | "
            f"{nan(f, 'hub_kib_per_engine'):.1f} KiB | {f.get('hub_open_files', '–')} | "
            f"{nan(f, 'hub_heartbeat_cpu_percent'):.1f} % ({f.get('heartbeat_period_ms')} ms period) | {fan} |")
    return lines


def report(real: list[dict], fakes: list[dict], leans: list[dict] | None = None) -> str:
    lines = ["### Real engines (stock ipyparallel Client driving both)", "",
             "| engines | | start → registered | first apply | `dv.execute` p50 / p90 | broadcast p50 | engines' PSS: after 1st apply / after the cells | stop |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["kind"], r["engines"]): r for r in real}
    for n in sorted({r["engines"] for r in real}):
        for kind in ("parallax", "ipyparallel"):
            r = by.get((kind, n))
            if not r:
                continue
            if "skipped" in r:
                lines.append(f"| {n} | {kind} | {r['skipped']} | | | | | |")
                continue
            if "error" in r and "start_s" not in r:
                lines.append(f"| {n} | {kind} | failed: {r['error'][:80]} | | | | | |")
                continue
            m = r.get("engine_memory", {})
            m1 = r.get("engine_memory_first_apply", {}).get("pss_mib", float("nan"))
            lines.append(
                f"| {n} | {kind} | {r.get('start_s', float('nan')):.2f} s | {r.get('first_apply_s', float('nan')):.2f} s | "
                f"{r.get('execute_p50_ms', float('nan')):.1f} / {r.get('execute_p90_ms', float('nan')):.1f} ms | "
                f"{r.get('broadcast_p50_ms', float('nan')):.1f} ms | {m1 / n:.1f} / "
                f"{m.get('pss_mib', float('nan')) / n:.1f} MiB per engine | {fmt_stop(r.get('stop_s'))} |")
        p, i = by.get(("parallax", n)), by.get(("ipyparallel", n))
        if p and i and "start_s" in p and "start_s" in i:
            ratio = lambda k: i.get(k, float("nan")) / p.get(k, float("nan"))  # noqa: E731
            lines.append(f"| {n} | **ipp ÷ parallax** | {ratio('start_s'):.1f}× | {ratio('first_apply_s'):.1f}× | "
                         f"{ratio('execute_p50_ms'):.2f}× | {ratio('broadcast_p50_ms'):.2f}× | | {ratio('stop_s'):.1f}× |")
    if fakes:
        lines += full_report(fakes)
    if leans:
        lines += lean_report(leans)
    return "\n".join(lines)


def full_report(fakes: list[dict]) -> list[str]:
    lines = ["", "### Load generator (`parallax bench engines`: fake engines, the hub alone)", "",
             "| fake engines | all replies | all registered | hub RSS | per engine | heartbeat CPU | MUX fan-out p50 / p90 | hub CPU per MUX fan-out | broadcast p50 / p90 | hub CPU per broadcast |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in fakes:
        if "error" in f:
            lines.append(f"| {f['engines']} | failed: {f['error'][:100]} | | | | | | | | |")
            continue
        lines.append(
            f"| {f['engines']} | {f['registration_replies_s']:.2f} s | {f['all_registered_s']:.2f} s | "
            f"{f.get('hub_rss_registered_mib', float('nan')):.0f} MiB | {f.get('hub_kib_per_engine', float('nan')):.1f} KiB | "
            f"{f.get('hub_heartbeat_cpu_percent', float('nan')):.1f} % ({f.get('heartbeat_period_ms')} ms period) | "
            f"{f['fanout_p50_ms']:.1f} / {f['fanout_p90_ms']:.1f} ms | {f.get('hub_cpu_ms_per_fanout', float('nan')):.1f} ms | "
            f"{f.get('bcast_p50_ms', float('nan')):.1f} / {f.get('bcast_p90_ms', float('nan')):.1f} ms | "
            f"{f.get('hub_cpu_ms_per_bcast', float('nan')):.1f} ms |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="16,64,256", help="real-engine counts (comma-separated)")
    ap.add_argument("--kinds", default="parallax,ipyparallel")
    ap.add_argument("--ipp-max", type=int, default=64,
                    help="run ipyparallel only up to this many engines (on 2 cores, 60 of 256 ipengines "
                         "had registered after 600 s, 2026-12-06: above 64 it only costs the timeout)")
    ap.add_argument("--fake", default="1000,3000",
                    help="load-generator engine counts, full sockets ('' for none)")
    ap.add_argument("--fake-lean", default="10000:none,9000:mux",
                    help="load-generator runs with --sockets lean, N:VIA comma-separated "
                         "(VIA: mux, broadcast, both, none; '' for none)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--hub-threads", type=int, default=0,
                    help="worker threads of Parallax's hub (`parallax hub --threads`; 0: its default, 2)")
    a = ap.parse_args()
    global HUB_THREADS
    HUB_THREADS = a.hub_threads
    lean_runs = parse_lean(a.fake_lean)
    if not BIN.is_file():
        sys.exit(f"{BIN} missing: build first (make build) or set PARALLAX_BIN")
    root = Path(tempfile.mkdtemp(prefix="parallax-bench-scale-"))
    real, fakes, leans = [], [], []
    try:
        for n in [int(x) for x in a.engines.split(",") if x]:
            for kind in a.kinds.split(","):
                if kind == "ipyparallel" and n > a.ipp_max:
                    real.append({"kind": kind, "engines": n, "skipped": f"not run (above --ipp-max {a.ipp_max})"})
                    continue
                real.append(measure(kind, n, root, a.repeat, a.timeout))
        for n in [int(x) for x in a.fake.split(",") if x]:
            fakes.append(fake(n, a.timeout))
        for n, via in lean_runs:
            leans.append(fake(n, a.timeout, ("--sockets", "lean", "--via", via)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    md = report(real, fakes, leans)
    if HUB_THREADS:
        md = f"Parallax hub: --threads={HUB_THREADS}\n\n" + md
    print(md)
    out = REPO / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"scale-{stamp}.json").write_text(json.dumps({"real": real, "fake": fakes, "fake_lean": leans,
                                                          "cpus": os.cpu_count(),
                                                          "hub_threads": HUB_THREADS or 2}, indent=1))
    (out / f"scale-{stamp}.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
