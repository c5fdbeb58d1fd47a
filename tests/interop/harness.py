"""Process harness for the interoperability suite.

Starts a hub (the Rust ``parallax hub`` or, for validating the tests
themselves, stock ``ipcontroller``) plus stock ``ipengine`` processes,
connects stock ``ipyparallel.Client`` objects, and reaps everything again.

Selecting the hub:

* ``PARALLAX_HUB_CMD``: shell-like command string (split with shlex), e.g.
  ``/work/main/.venv/bin/ipcontroller``.
* otherwise ``[$PARALLAX_BIN, "hub"]`` with ``PARALLAX_BIN`` defaulting to
  ``<repo>/target/release/parallax``.

The hub gets ipcontroller's own command line options (``--name=value``).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parents[1]
# the venv's bin dir; don't resolve symlinks (that would leave the venv)
VENV_BIN = Path(sys.executable).parent

# default time limits (seconds)
HUB_START_TIMEOUT = 20
ENGINE_START_TIMEOUT = 45
REPLY_TIMEOUT = 15


def hub_command() -> list[str]:
    cmd = os.environ.get("PARALLAX_HUB_CMD", "").strip()
    if cmd:
        return shlex.split(cmd)
    binary = os.environ.get("PARALLAX_BIN") or str(
        REPO / "target" / "release" / "parallax"
    )
    return [binary, "hub"]


def _is_ipcontroller(cmd: list[str]) -> bool:
    for tok in cmd:
        base = os.path.basename(tok)
        if base.startswith("ipcontroller") or tok == "ipyparallel.controller":
            return True
    return False


HUB_CMD = hub_command()
#: True when the suite runs against stock ipcontroller (used for xfail marks
#: documenting genuine ipcontroller bugs/omissions)
HUB_IS_IPCONTROLLER = _is_ipcontroller(HUB_CMD)


def engine_command() -> list[str] | None:
    """`PARALLAX_ENGINES=parallax` runs our Rust engines instead of stock
    ipengine (`PARALLAX_ENGINE_CMD` overrides the command)."""
    cmd = os.environ.get("PARALLAX_ENGINE_CMD", "").strip()
    if cmd:
        return shlex.split(cmd)
    if os.environ.get("PARALLAX_ENGINES", "").strip() == "parallax":
        binary = os.environ.get("PARALLAX_BIN") or str(REPO / "target" / "release" / "parallax")
        return [binary, "engine"]
    return None


ENGINE_CMD = engine_command()
#: True when the engines are Parallax engines rather than stock ipengine
ENGINES_ARE_PARALLAX = ENGINE_CMD is not None

_counter = itertools.count()

# every HubCluster that is currently running, for log dumps on failure and
# for last-resort cleanup at session end
LIVE: list["HubCluster"] = []
# every process this harness started or saw as a descendant of one
_ALL_PROCS: dict[int, psutil.Process] = {}


class HarnessError(RuntimeError):
    pass


def tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf8", "replace")
    except FileNotFoundError:
        return "<no log file>"
    return "\n".join(data.splitlines()[-lines:])


def wait_until(predicate, timeout: float, interval: float = 0.05, msg: str = ""):
    """Poll ``predicate`` until truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(msg or f"condition not met within {timeout}s")
        time.sleep(interval)


def within(timeout: float, fn, *args, **kwargs):
    """Run a blocking client call in a helper thread, with a time limit.

    Many ipyparallel Client methods (queue_status, db_query, hub_history,
    shutdown, blocking pulls...) wait forever for the hub's reply; this turns
    a missing reply into a prompt TimeoutError instead of a hang.
    """
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in caller
            box["error"] = e

    name = getattr(fn, "__name__", repr(fn))
    t = threading.Thread(target=run, name=f"within:{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{name}() got no reply within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _remember(proc: psutil.Process):
    try:
        proc.create_time()  # cache create_time so pid reuse is detected
    except psutil.Error:
        return
    _ALL_PROCS[proc.pid] = proc


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_procs(procs, popens=(), timeout: float = 10.0):
    """SIGKILL process groups of ``popens`` and every process in ``procs``."""
    for p in popens:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    alive = []
    for proc in procs:
        try:
            if proc.is_running():
                proc.kill()
                alive.append(proc)
        except psutil.Error:
            pass
    # reap our direct children first, so their orphans get reaped by init
    for p in popens:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # orphans may linger as zombies until init reaps them: treat as gone
    try:
        wait_until(lambda: not any(is_alive(p) for p in alive), timeout, 0.02)
    except TimeoutError:
        pass


def is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cleanup_everything():
    """Last resort: kill whatever this harness ever started."""
    for c in list(LIVE):
        try:
            c.stop()
        except Exception:
            pass
    kill_procs(list(_ALL_PROCS.values()))


class Proc:
    """A spawned process in its own session / process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict):
        self.name = name
        self.argv = argv
        self.log = log
        with open(log, "ab") as f, open(os.devnull, "rb") as devnull:
            self.popen = subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)
        _remember(self.ps)
        self.seen: dict[int, psutil.Process] = {}

    def snapshot(self):
        """Remember current descendants (e.g. the engine's nanny, which runs in
        its own session and so is not in our process group)."""
        for d in descendants(self.pid):
            self.seen[d.pid] = d
            _remember(d)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self):
        self.snapshot()
        kill_procs(list(self.seen.values()), [self.popen])

    def leftover(self) -> list[psutil.Process]:
        return [p for p in [self.ps, *self.seen.values()] if is_alive(p)]


class HubCluster:
    """hub + N stock ipengines + stock Clients, all on 127.0.0.1."""

    def __init__(
        self,
        root: Path,
        *,
        engines: int = 2,
        hub_args=(),
        scheme: str | None = None,
        ping_ms: int = 200,
        label: str = "cluster",
        engine_cmd: list[str] | None = None,
        engine_args=(),
    ):
        self.root = Path(root)
        self.n_engines = engines
        self.scheme = scheme
        self.ping_ms = ping_ms
        self.extra_hub_args = list(hub_args)
        self.label = label
        # None: the suite-wide choice (ENGINE_CMD, or stock ipengine);
        # []: stock ipengine whatever the suite runs (side-by-side tests)
        self.engine_cmd = engine_cmd if engine_cmd is not None else ENGINE_CMD
        self.engine_args = list(engine_args)
        self.cluster_id = f"plx{os.getpid()}x{next(_counter)}"
        self.profile_dir = self.root / "profile"
        self.log_dir = self.root / "logs"
        self.ipython_dir = self.root / "ipython"
        for d in (self.profile_dir, self.log_dir, self.ipython_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.hub: Proc | None = None
        self.engines: list[Proc] = []
        self.clients = []
        self._client = None
        self.env = dict(os.environ)
        self.env.update(
            IPYTHONDIR=str(self.ipython_dir),
            PYTHONUNBUFFERED="1",
            # engines unpickle functions defined in test modules by importing
            # them (``interop.test_x``), so the tests dir must be importable
            PYTHONPATH=os.pathsep.join(
                [str(TESTS_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
            ),
        )
        # the cluster's own launch env must not leak into ours
        for k in ("IPP_CONNECTION_INFO", "IPP_CLUSTER_ID", "IPP_PROFILE_DIR"):
            self.env.pop(k, None)

    # ------------------------------------------------------------------ paths
    @property
    def security_dir(self) -> Path:
        return self.profile_dir / "security"

    def connection_file(self, kind: str) -> Path:
        return self.security_dir / f"ipcontroller-{self.cluster_id}-{kind}.json"

    def hub_argv(self) -> list[str]:
        args = [
            f"--profile-dir={self.profile_dir}",
            f"--cluster-id={self.cluster_id}",
            "--ip=127.0.0.1",
            f"--ping={self.ping_ms}",
            "--log-level=DEBUG",
        ]
        if self.scheme:
            args.append(f"--scheme={self.scheme}")
        return HUB_CMD + args + self.extra_hub_args

    # ------------------------------------------------------------------ start
    def start(self, connect: bool = True):
        LIVE.append(self)
        try:
            self.start_hub()
            if self.n_engines:
                self.start_engines(self.n_engines)
            if connect and self.scheme == "pure":
                # The stock client disables task farming for good under the
                # 'pure' scheme as soon as its engine ids are not exactly
                # 0..n-1 (it takes that as "an engine was unregistered"),
                # which happens if engine 1 registers before engine 0 while
                # it watches. So wait with a throwaway client and connect the
                # real one once every engine is registered.
                probe = self.connect()
                self.wait_for_engines(self.n_engines, rc=probe)
                within(10, probe.close, linger=0)
                self.clients.remove(probe)
                assert self.client.ids == list(range(self.n_engines))
            elif connect:
                self.wait_for_engines(self.n_engines, rc=self.client)
        except BaseException as e:
            msg = f"failed to start {self.label}: {e!r}\n{self.log_report()}"
            self.stop()
            raise HarnessError(msg) from e
        return self

    def start_hub(self):
        binary = Path(self.hub_argv()[0])
        if binary.is_absolute() and not binary.exists():
            raise HarnessError(
                f"hub executable {binary} does not exist (build it, or set "
                "PARALLAX_BIN / PARALLAX_HUB_CMD)"
            )
        self.hub = Proc("hub", self.hub_argv(), self.log_dir / "hub.log", self.env)
        files = [self.connection_file("client"), self.connection_file("engine")]

        def ready():
            if not self.hub.alive():
                raise HarnessError(
                    f"hub exited with {self.hub.popen.returncode} before writing "
                    "its connection files"
                )
            for f in files:
                try:
                    with open(f) as fh:
                        info = json.load(fh)
                except (FileNotFoundError, ValueError):
                    return False
                if "registration" not in info or "key" not in info:
                    return False
            return True

        wait_until(
            ready,
            HUB_START_TIMEOUT,
            msg=f"hub did not write {[f.name for f in files]} in {HUB_START_TIMEOUT}s",
        )

    def engine_argv(self) -> list[str]:
        if self.engine_cmd:
            python = [] if any(a.startswith("--python") for a in self.engine_args) else [
                f"--python={sys.executable}"
            ]
            return self.engine_cmd + [
                f"--profile-dir={self.profile_dir}",
                f"--cluster-id={self.cluster_id}",
                "--log-level=DEBUG",
                "--timeout=20",
            ] + python + self.engine_args
        return [
            str(VENV_BIN / "ipengine"),
            f"--profile-dir={self.profile_dir}",
            f"--cluster-id={self.cluster_id}",
            "--log-level=DEBUG",
            # registration reply timeout (s); generous for a 2-core box
            "--timeout=20",
        ] + self.engine_args

    def start_engines(self, n: int) -> list[Proc]:
        new = []
        for _ in range(n):
            k = len(self.engines)
            p = Proc(
                f"engine-{k}",
                self.engine_argv(),
                self.log_dir / f"engine-{k}.log",
                self.env,
            )
            self.engines.append(p)
            new.append(p)
        return new

    def connect(self, **kwargs):
        """A new Client (new session) connected to this cluster."""
        import ipyparallel as ipp

        kwargs.setdefault("timeout", 10)
        rc = ipp.Client(
            profile_dir=str(self.profile_dir), cluster_id=self.cluster_id, **kwargs
        )
        self.clients.append(rc)
        return rc

    @property
    def client(self):
        if self._client is None:
            self._client = self.connect()
        return self._client

    def wait_for_engines(self, n: int, rc=None, timeout: float = ENGINE_START_TIMEOUT):
        rc = self.client if rc is None else rc
        rc.wait_for_engines(n, timeout=timeout)
        for p in self.engines:
            p.snapshot()
        if self.hub:
            self.hub.snapshot()

    def engine_pids(self, rc=None) -> dict[int, int]:
        """{engine id: pid of the engine process}, as reported by the engines.

        A Parallax engine runs user code in a Python subprocess it owns, so
        the engine process is that subprocess's parent."""
        rc = self.client if rc is None else rc
        ar = rc[:].apply_async(os.getppid if ENGINES_ARE_PARALLAX else os.getpid)
        pids = ar.get(timeout=REPLY_TIMEOUT)
        return dict(zip(ar.engine_id, pids))

    def engine_proc(self, pid: int) -> Proc:
        for p in self.engines:
            if p.pid == pid:
                return p
        raise KeyError(f"no engine process with pid {pid}")

    # ------------------------------------------------------------------ stop
    def close_clients(self):
        for rc in self.clients:
            try:
                within(10, rc.close, linger=0)
            except Exception:
                pass
        self.clients = []
        self._client = None

    def stop(self):
        self.close_clients()
        procs = []
        popens = []
        for p in self.engines + ([self.hub] if self.hub else []):
            if p.alive():
                p.snapshot()
            procs.extend(p.seen.values())
            popens.append(p.popen)
        kill_procs(procs, popens)
        if self in LIVE:
            LIVE.remove(self)

    # ------------------------------------------------------------------ logs
    def log_report(self, hub_lines: int = 80, engine_lines: int = 30) -> str:
        parts = [f"--- {self.label}: hub command: {shlex.join(self.hub_argv())}"]
        if self.hub:
            parts.append(
                f"--- hub log ({self.hub.log}), rc={self.hub.popen.poll()}, "
                f"last {hub_lines} lines:\n{tail(self.hub.log, hub_lines)}"
            )
        for p in self.engines:
            parts.append(
                f"--- {p.name} log ({p.log}), pid={p.pid}, rc={p.popen.poll()}, "
                f"last {engine_lines} lines:\n{tail(p.log, engine_lines)}"
            )
        return "\n".join(parts)


def connection_file_mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------
# remote-error helpers
# ---------------------------------------------------------------------------


def remote_errors(exc) -> list:
    """Flatten an exception from ipyparallel into its RemoteErrors."""
    from ipyparallel import error

    if isinstance(exc, error.AlreadyDisplayedError):
        exc = exc.original_error
    if isinstance(exc, error.CompositeError):
        out = []
        for ename, evalue, tb, info in exc.elist:
            e = error.RemoteError(ename, evalue, tb, info)
            out.append(e)
        return out
    if isinstance(exc, error.RemoteError):
        return [exc]
    return []


class raises_remote:
    """``with raises_remote("ValueError") as info:`` - the block must raise a
    RemoteError (possibly inside a CompositeError) whose ename matches
    (``None``: any ename). ``info.errors`` holds the flattened RemoteErrors
    afterwards."""

    def __init__(self, ename: str | None):
        self.ename = ename
        self.errors = []

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if exc is None:
            raise AssertionError(f"expected a remote {self.ename}, nothing raised")
        errors = remote_errors(exc)
        if not errors:
            return False  # not a remote error: let it propagate
        self.errors = errors
        names = [e.ename for e in errors]
        assert self.ename is None or all(n == self.ename for n in names), (
            f"expected remote {self.ename}, got {names}: {exc}"
        )
        return True


# ---------------------------------------------------------------------------
# gates: make "this task is still running" deterministic instead of relying
# on sleeps (the CI box has 2 cores and may be busy)
# ---------------------------------------------------------------------------


class Gate:
    """A file-based gate that remote tasks can block on.

    ``gate.wait_remote`` (a plain function, importable on engines) blocks
    until the test calls ``gate.open()`` (or ``limit`` seconds pass, so a
    failing test never leaves an engine stuck), writing ``started`` first.
    """

    _n = itertools.count()

    def __init__(self, directory: Path):
        n = next(self._n)
        self.path = str(Path(directory) / f"gate-{os.getpid()}-{n}")
        self.started = self.path + ".started"

    def open(self):
        Path(self.path).touch()

    def wait_started(self, timeout: float = REPLY_TIMEOUT) -> int:
        """Wait until a task entered the gate; return that engine's pid."""
        wait_until(
            lambda: os.path.exists(self.started),
            timeout,
            msg="gated task never started",
        )
        return int(Path(self.started).read_text() or 0)

    def args(self, limit: float = 30.0):
        return (self.path, limit)


def gated(path: str, limit: float = 30.0, result=None):
    """Remote side of Gate: announce, then wait for the gate to open."""
    import os
    import time

    with open(path + ".started", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return result
