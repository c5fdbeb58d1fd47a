"""Helpers shared by the kernel benchmarks (``bench_kernel.py``, ``bench_rust.py``).

Processes: every process a benchmark starts carries a marker in its environment
(``MARK_VAR``), so that it can be found, waited for and killed by marker; a kernel
started through jupyter_client's ``KernelManager`` from a private kernelspec and driven
with its blocking client (``Kernel``); the run's environment (private Jupyter and IPython
directories, the venv first on PATH), a private copy of the Parallax binary, version
information, the noise table of the markdown reports, and the clean-up at the end of a run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from bench_hub import _cpu_model, _meminfo_total, _noisy, log, proc_mem, wait_idle  # noqa: F401  (proc_mem: re-exported)

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
MARK_VAR = "PARALLAX_BENCH_KERNEL_MARK"
RUN_MARK = uuid.uuid4().hex[:12]


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# processes


def marked(prefix: str) -> list[psutil.Process]:
    """Live processes whose environment carries a marker starting with `prefix` (not us)."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            v = p.environ().get(MARK_VAR)
            if v is not None and v.startswith(prefix) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def kill_procs(procs: list[psutil.Process], grace: float = 3.0) -> list[int]:
    """SIGTERM, wait up to `grace` s, SIGKILL what is left; returns the pids that needed SIGKILL."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(procs, timeout=grace)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=5)
    return [p.pid for p in still]


def wait_gone(prefix: str, timeout: float) -> tuple[float, list[psutil.Process]]:
    """Wait until no process carries the marker; returns (seconds waited, survivors)."""
    t0 = time.perf_counter()
    while True:
        left = marked(prefix)
        if not left or time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, left
        time.sleep(0.02)


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------
# a kernel driven through jupyter_client


class Kernel:
    """One kernel started by a KernelManager from a private kernelspec (``kernels/bench-<side>``)."""

    def __init__(self, side: str, cfg, tag: str, argv: list[str], language: str = "python",
                 extra_env: dict[str, str] | None = None):
        """`argv`: the kernelspec's argv (with ``{connection_file}``); `extra_env`: added to
        ``cfg.child_env`` for this kernel.  `cfg` needs ``workroot``, ``child_env``, ``timeout``
        and ``stop_grace``."""
        self.side = side
        self.cfg = cfg
        self.tag = tag
        self.mark = f"{RUN_MARK}:{side}-{tag}:"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{side}-{tag}-", dir=cfg.workroot))
        self.name = f"bench-{side}"
        kdir = self.dir / "kernels" / self.name
        kdir.mkdir(parents=True)
        self.argv = argv
        self.extra_env = dict(extra_env or {})
        (kdir / "kernel.json").write_text(json.dumps(
            {"argv": argv, "display_name": self.name, "language": language, "interrupt_mode": "signal"}))
        self.stderr_path = self.dir / "kernel.stderr"
        self.stdout_path = self.dir / "kernel.stdout"
        self.km = None
        self.kc = None
        self.pid: int | None = None
        self.t_launch: float | None = None
        self.timings: dict[str, float] = {}
        self._files = []

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        ksm = KernelSpecManager(kernel_dirs=[str(self.dir / "kernels")])
        km = KernelManager(kernel_name=self.name, kernel_spec_manager=ksm)
        km.connection_file = str(self.dir / "connection.json")
        env = dict(self.cfg.child_env)
        env.update(self.extra_env)
        env[MARK_VAR] = self.mark
        err = open(self.stderr_path, "wb")
        out = open(self.stdout_path, "wb")
        self._files += [err, out]
        self.km = km
        self.t_launch = time.perf_counter()
        km.start_kernel(stderr=err, stdout=out, env=env, cwd=str(self.dir))
        self.pid = km.provisioner.process.pid
        kc = km.blocking_client()
        kc.start_channels()
        self.kc = kc
        try:
            kc.wait_for_ready(timeout=self.cfg.timeout)
        except RuntimeError as e:
            raise BenchError(f"{self.side} kernel not ready within {self.cfg.timeout}s: {e}; "
                             f"stderr:\n{tail(self.stderr_path)}") from e
        self.timings["kernel_ready_s"] = time.perf_counter() - self.t_launch
        # kernel_info's reply may arrive before the kernel's startup iopub noise: drain it
        self.drain_iopub()

    def drain_iopub(self) -> None:
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                return

    def processes(self) -> list[psutil.Process]:
        if self.pid is None:
            return []
        try:
            root = psutil.Process(self.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def execute(self, code: str, timeout: float | None = None) -> tuple[float, list[dict], dict]:
        """Run one cell; returns (seconds execute -> idle, iopub messages of that request, reply)."""
        kc = self.kc
        timeout = timeout or self.cfg.timeout
        t0 = time.perf_counter()
        msg_id = kc.execute(code)
        deadline = t0 + timeout
        outs = []
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"{self.side}: no idle status within {timeout}s for {code!r}; "
                                 f"stderr:\n{tail(self.stderr_path)}")
            try:
                msg = kc.get_iopub_msg(timeout=left)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                dt = time.perf_counter() - t0
                break
            outs.append(msg)
        reply = self.shell_reply(msg_id, max(1.0, deadline - time.perf_counter()))
        return dt, outs, reply

    def shell_reply(self, msg_id: str, timeout: float) -> dict:
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"{self.side}: no shell reply for {msg_id} within {timeout:.0f}s")
            try:
                msg = self.kc.get_shell_msg(timeout=left)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def kernel_info_rtt(self) -> float:
        t0 = time.perf_counter()
        msg_id = self.kc.kernel_info()
        self.shell_reply(msg_id, self.cfg.timeout)
        return time.perf_counter() - t0

    def stop(self) -> dict:
        """shutdown_request (then SIGKILL after jupyter_client's grace) -> every marked process gone."""
        info = {}
        t0 = time.perf_counter()
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=False)
            except Exception as e:
                info["shutdown_error"] = repr(e)
                with contextlib.suppress(Exception):
                    self.km.shutdown_kernel(now=True)
        info["shutdown_call_s"] = time.perf_counter() - t0
        waited, left = wait_gone(self.mark, self.cfg.stop_grace)
        info["tree_gone_s"] = time.perf_counter() - t0
        if left:
            info["leftovers"] = [f"{p.pid} {' '.join(p.cmdline())[:160]}" for p in left if p.is_running()]
            info["leftovers_sigkilled"] = kill_procs(left, grace=2.0)
            log(f"  {self.side}: {len(left)} process(es) outlived the kernel shutdown by "
                f"{self.cfg.stop_grace:.0f}s: {info['leftovers']}")
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()
        with contextlib.suppress(Exception):
            self.km.cleanup_resources()
        self.km = self.kc = None
        return info

    # -- helpers ----------------------------------------------------------
    def log_value(self, pattern: str) -> str | None:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return None
        m = re.search(pattern, text)
        return m.group(1) if m else None



def bench_payload(outs: list[dict]) -> str | None:
    """The 'BENCH ...' line a setup/stop cell printed."""
    for m in outs:
        if m["msg_type"] == "stream" and m["content"].get("name") == "stdout":
            for line in m["content"]["text"].splitlines():
                if line.startswith("BENCH "):
                    return line[6:]
    return None


def reply_error(reply: dict, outs: list[dict]) -> str | None:
    c = reply.get("content", {})
    if c.get("status") == "ok":
        return None
    tb = "\n".join(c.get("traceback", []) or [])
    for m in outs:
        if m["msg_type"] == "error":
            tb = tb or "\n".join(m["content"].get("traceback", []))
    return f"{c.get('status')}: {c.get('ename')}: {c.get('evalue')}\n{tb[-1500:]}"


# --------------------------------------------------------------------------
# the run: environment, binary, versions


def maybe_wait_idle(cfg) -> None:
    if cfg.wait_idle > 0:
        wi = wait_idle(cfg.wait_idle)
        if wi["waited_s"] > 1.5:
            log(f"  waited {wi['waited_s']:.0f}s for an idle machine ({wi['busy_pct']:.0f} % busy)")


def child_env(workroot: Path, bindir: Path) -> dict[str, str]:
    """The environment of every kernel: private IPython/Jupyter dirs under `workroot`, the venv first
    on PATH, no inherited cluster or Parallax settings, and the run's marker."""
    env = os.environ.copy()
    env["IPYTHONDIR"] = str(workroot / "ipythondir")
    env["JUPYTER_CONFIG_DIR"] = str(workroot / "jupyter-config")
    env["JUPYTER_DATA_DIR"] = str(workroot / "jupyter-data")
    env["JUPYTER_RUNTIME_DIR"] = str(workroot / "jupyter-runtime")
    env["PYTHONUNBUFFERED"] = "1"
    # engines run `python3` from PATH unless told otherwise: the venv's
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(bindir.parent)
    for k in ("IPP_CONNECTION_INFO", "IPP_SESSION_KEY", "IPP_PROFILE_DIR", "IPP_CLUSTER_ID",
              "PARALLAX_LOG", "PARALLAX_ENGINES", "PARALLAX_PYTHON"):
        env.pop(k, None)
    env[MARK_VAR] = RUN_MARK
    return env


def use_private_dirs(env: dict[str, str]) -> None:
    """This process (jupyter_client) uses the same private Jupyter/IPython directories as the kernels."""
    for k in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        os.environ[k] = env[k]


def private_binary(path: str, workroot: Path) -> str:
    """A private copy of the Parallax binary, so that a rebuild during the run cannot mix binaries
    (the kernel starts its engines, and evcxr its runtime and rustc wrapper, from its own executable)."""
    snap = workroot / "parallax-bin" / "parallax"
    snap.parent.mkdir()
    shutil.copy2(path, snap)
    return str(snap)


def on_term_raise_keyboard_interrupt() -> None:
    """SIGTERM / SIGHUP end the run like Ctrl-C: clean up, write partial results."""

    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)


def base_versions(modules: dict[str, str]) -> dict:
    """Python and the given modules' versions (name -> version, in order), then jupyter_client's
    transport, the platform and the git state."""
    import zmq

    v = {"python": platform.python_version()}
    v.update(modules)
    v.update({
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "psutil": psutil.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_kib": _meminfo_total(),
    })
    with contextlib.suppress(Exception):
        v["git_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, timeout=5).stdout.strip()
        v["git_dirty"] = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                              "--untracked-files=no"], capture_output=True, text=True,
                                             timeout=5).stdout.strip())
    return v


def parallax_versions(v: dict, binary: str, source: str) -> None:
    """Add the Parallax binary's source path, hash, build time and version to `v`."""
    import hashlib

    v["parallax_bin"] = source
    with contextlib.suppress(Exception):
        v["parallax_bin_sha256"] = hashlib.sha256(Path(binary).read_bytes()).hexdigest()
        v["parallax_bin_mtime"] = _dt.datetime.fromtimestamp(
            os.stat(source).st_mtime).isoformat(timespec="seconds")
        v["parallax"] = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()


def display_path(p: str) -> str:
    try:
        return str(Path(p).absolute().relative_to(Path.cwd()))
    except ValueError:
        return p


def kill_leftovers(meta: dict) -> None:
    """At the end of a run: kill every process still carrying the run's marker; record them in `meta`."""
    left = marked(RUN_MARK)
    if left:
        desc = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                desc.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        log(f"killing {len(left)} leftover process(es): {desc}")
        kill_procs(left, grace=2.0)
        meta["leftover_processes_killed_at_end"] = desc
    meta["leftovers_after_cleanup"] = [p.pid for p in marked(RUN_MARK)]


# --------------------------------------------------------------------------
# report helpers


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(base, cand):
    if base is None or cand is None or cand <= 0:
        return None
    return base / cand


def noise_markdown(noise: list[dict], meta: dict) -> list[str]:
    """The collapsed noise table (one row per measurement block) and the summary line under it."""
    L = []
    L.append("<details><summary>Noise: CPU per measurement block</summary>")
    L.append("")
    L.append("| block | wall s | busy % | CPU s (ours) | foreign % | steal % | load avg |")
    L.append("|---|---|---|---|---|---|---|")
    for d in noise:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["cpu_s_by_group"].items()) if v >= 0.005)
        flag = " ⚠" if _noisy(d) else ""
        L.append(f"| {d['block']} | {d['wall_s']:.1f} | {d['busy_pct']:.0f} | {parts} | "
                 f"{d['foreign_pct']:.1f}{flag} | {d['steal_pct']:.1f} | {d['loadavg_end'][0]:.2f} |")
    L.append("")
    L.append("</details>")
    L.append("")
    worst = max((d["foreign_pct"] for d in noise if d["wall_s"] >= 1.0), default=0.0)
    L.append(f"Max foreign CPU in any block of ≥ 1 s: {worst:.1f} % of the machine"
             + (" — **noisy: rerun before quoting**" if any(_noisy(d) for d in noise) else " (quiet)")
             + f". Load average at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f}. "
             f"Runtime {meta['runtime_s']:.0f} s.")
    return L
