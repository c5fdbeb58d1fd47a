"""`parallax cluster start|stop|list` against real processes, checked with
the stock ipyparallel Client, `ipcluster list` and `Cluster.from_file`.

Every test uses its own profile dir and cluster id; every process a test
may have caused (found by pid from the cluster file and by command line
mentioning the profile dir, plus their children) is killed at the end.

PARALLAX_BIN: the binary (default target/release/parallax in the repo).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PARALLAX_BIN", ROOT / "target" / "release" / "parallax"))
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 60


def child_env() -> dict:
    e = os.environ.copy()
    # engines run user code with the first python3 on PATH: the venv's
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    for k in ("IPP_PROFILE_DIR", "IPP_CLUSTER_ID", "IPP_CONNECTION_INFO", "PARALLAX_LOG"):
        e.pop(k, None)
    e["RUST_BACKTRACE"] = "0"
    return e


def cluster(*args, timeout=TIMEOUT, check=True, extra_env=None, cwd=None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(BIN), "cluster", *map(str, args)],
        env={**child_env(), **(extra_env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"parallax cluster {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def gone(pid: int) -> bool:
    """Dead or a zombie (pid 1 in a container may never reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not gone(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


def tree(pids) -> set[int]:
    """pids and all their live descendants."""
    out = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.add(pid)
            out.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return out


def procs_mentioning(text: str) -> set[int]:
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])):
                found.add(p.info["pid"])
        except psutil.Error:
            pass
    return found


def zygote_of(cluster_file: Path) -> tuple[int, Path] | None:
    """The local engines' zygote (pid, socket): the process whose command
    line is `… --parallax-zygote SOCKET --owner CLUSTER_FILE`."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        a = p.info["cmdline"] or []
        if "--parallax-zygote" in a and str(cluster_file) in a:
            return p.info["pid"], Path(a[a.index("--parallax-zygote") + 1])
    return None


def zygote_pid(cluster_file: Path) -> int | None:
    z = zygote_of(cluster_file)
    return z[0] if z else None


def cluster_pids(cluster_file: Path) -> tuple[int, list[int]]:
    d = json.loads(cluster_file.read_text())
    hub = d["controller"]["state"]["pid"]
    engines = [
        e["pid"]
        for s in d["engines"]["sets"].values()
        for e in s["engines"].values()
    ]
    return hub, engines


class Env:
    def __init__(self, tmp_path: Path):
        self.profile_dir = tmp_path / "profile"
        self.cluster_id = f"t{uuid.uuid4().hex[:10]}"
        self.security = self.profile_dir / "security"
        self.cluster_file = self.security / f"cluster-{self.cluster_id}.json"
        self.client_file = self.security / f"ipcontroller-{self.cluster_id}-client.json"
        self.engine_file = self.security / f"ipcontroller-{self.cluster_id}-engine.json"
        self.seen: set[int] = set()

    @property
    def args(self):
        return ["--profile-dir", self.profile_dir, "--cluster-id", self.cluster_id]

    def remember(self):
        """Note every process of the cluster (and children) for the final reap."""
        if self.cluster_file.exists():
            hub, engines = cluster_pids(self.cluster_file)
            self.seen |= tree([hub, *engines])
        z = zygote_pid(self.cluster_file)
        if z:
            self.seen |= tree([z])
        self.seen |= tree(procs_mentioning(str(self.profile_dir)))
        return self.seen

    def reap(self):
        self.remember()
        for pid in self.seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        wait_gone(self.seen, 10)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.reap()


def assert_all_stopped(env: Env, pids):
    left = wait_gone(pids)
    assert not left, f"still running: {[psutil.Process(p).cmdline() for p in left if not gone(p)]}"
    assert not any(not gone(p) for p in procs_mentioning(str(env.profile_dir)))
    assert not env.cluster_file.exists()
    assert not env.client_file.exists() and not env.engine_file.exists()
    assert list((env.profile_dir / "log").glob("*")) == []


def test_daemonized_cluster_client_list_stop(env):
    import ipyparallel as ipp

    t0 = time.monotonic()
    r = cluster("start", "-n", 3, "--daemonize", *env.args)
    elapsed = time.monotonic() - t0
    print(f"cluster start -n 3 --daemonize: {elapsed:.2f} s; {r.stdout.splitlines()[0]}")
    assert "3 engines registered" in r.stdout
    hub, engines = cluster_pids(env.cluster_file)
    assert len(engines) == 3
    assert all(not gone(p) for p in [hub, *engines])
    # `start` returned after the engines registered: a client sees all 3 at once
    # (ipyparallel 9 ignores the old url_file= keyword: the file is positional)
    rc = ipp.Client(str(env.client_file), timeout=10)
    try:
        assert sorted(rc.ids) == [0, 1, 2]
        pids = rc[:].apply_sync(os.getpid)
        assert len(set(pids)) == 3
        # the engines' Python interpreters, forked by the zygote
        z = zygote_pid(env.cluster_file)
        assert z is not None and "--parallax-zygote" in psutil.Process(z).cmdline()
        kernels = tree([*engines, z])
        assert set(pids) <= kernels
    finally:
        rc.close()
    env.remember()

    out = cluster("list", "--profile-dir", env.profile_dir).stdout.splitlines()
    # ipcluster's columns, then the states of the jobs (none: local engines)
    assert out[0].split() == ["PROFILE", "CLUSTER", "ID", "RUNNING", "ENGINES", "LAUNCHER", "JOBS"]
    row = [line for line in out if env.cluster_id in line]
    assert len(row) == 1 and row[0].split()[1:] == [env.cluster_id, "True", "3", "Local", "-"]
    listed = json.loads(cluster("list", "--profile-dir", env.profile_dir, "-o", "json").stdout)
    assert [c["cluster"]["cluster_id"] for c in listed] == [env.cluster_id]

    # ipyparallel's own `ipcluster list` reads our cluster file
    ipc = subprocess.run(
        [str(VENV_BIN / "ipcluster"), "list", f"--profile-dir={env.profile_dir}"],
        capture_output=True, text=True, timeout=TIMEOUT, env=child_env(),
    )
    row = [line for line in ipc.stdout.splitlines() if env.cluster_id in line]
    assert len(row) == 1 and row[0].split()[1:] == [env.cluster_id, "True", "3", "Local"], ipc

    # a second start of the same cluster is refused
    again = cluster("start", "-n", 1, "--daemonize", *env.args, check=False)
    assert again.returncode != 0 and "already running" in again.stderr

    r = cluster("stop", *env.args)
    assert f"Stopped cluster {env.cluster_id}" in r.stdout
    assert_all_stopped(env, env.seen)
    # nothing left to list or stop
    assert env.cluster_id not in cluster("list", "--profile-dir", env.profile_dir).stdout
    assert cluster("stop", *env.args, check=False).returncode != 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_start_stops_on_signal(env, tmp_path, sig):
    out_path = tmp_path / "start.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [str(BIN), "cluster", "start", "-n", "2", *map(str, env.args)],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(),
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while "Press Ctrl-C" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        hub, engines = cluster_pids(env.cluster_file)
        pids = env.remember()
        assert len(engines) == 2 and hub in pids
        assert len(pids) >= 5  # hub, 2 engines, their 2 Pythons
        assert env.cluster_id in cluster("list", "--profile-dir", env.profile_dir).stdout

        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, out_path.read_text()
        assert "Cluster stopped" in out_path.read_text()
        assert_all_stopped(env, pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_foreground_start_exits_when_stopped_elsewhere(env, tmp_path):
    out_path = tmp_path / "start.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [str(BIN), "cluster", "start", "-n", "1", *map(str, env.args)],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(),
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while "Press Ctrl-C" not in out_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        pids = env.remember()
        cluster("stop", *env.args)
        assert proc.wait(timeout=30) == 0, out_path.read_text()
        assert_all_stopped(env, pids | {proc.pid})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cluster_file_is_ipyparallel_compatible(env):
    import ipyparallel as ipp

    cluster("start", "-n", 2, "--daemonize", *env.args)
    pids = env.remember()
    before = env.cluster_file.read_bytes()
    c = ipp.Cluster.from_file(profile_dir=str(env.profile_dir), cluster_id=env.cluster_id)
    # loaded without changes: Cluster.to_dict() == our file, so it was not rewritten
    assert env.cluster_file.read_bytes() == before
    assert c.to_dict() == json.loads(before)
    assert c.controller is not None and c.controller.state == "running"
    assert sum(s.n for s in c.engines.values()) == 2
    rc = c.connect_client_sync()
    try:
        rc.wait_for_engines(2, timeout=10)
        assert len(rc[:].apply_sync(os.getpid)) == 2
    finally:
        rc.close()
    # ipyparallel can stop a Parallax cluster too
    c.stop_cluster_sync()
    left = wait_gone(pids)
    assert not left
    assert not env.cluster_file.exists()


def test_failed_start_cleans_up(env, tmp_path):
    r = cluster(
        "start", "-n", 2, "--daemonize", "--timeout", 20, *env.args,
        f"--engine-args=--python={tmp_path / 'no-such-python'}",
        check=False,
    )
    assert r.returncode != 0
    assert "starting the cluster failed" in r.stderr
    assert wait_gone(procs_mentioning(str(env.profile_dir))) == []
    assert not env.cluster_file.exists()


def test_list_forgets_stale_clusters(env):
    env.security.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {
        "cluster": {"cluster_id": env.cluster_id, "profile_dir": str(env.profile_dir),
                    "class": "ipyparallel.cluster.cluster.Cluster"},
        "controller": {"class": "local", "state": {"pid": dead.pid, "state": "running"}},
        "engines": {"class": "local", "sets": {"1": {"n": 1, "pid": -1, "engines": {
            "0": {"pid": dead.pid, "n": 1, "state": "running"}}}}},
    }
    env.cluster_file.write_text(json.dumps(stale))
    out = cluster("list", "--profile-dir", env.profile_dir).stdout
    assert env.cluster_id not in out
    assert not env.cluster_file.exists()
    # and a start over a stale file works
    env.cluster_file.write_text(json.dumps(stale))
    cluster("start", "-n", 1, "--daemonize", *env.args)
    env.remember()
    cluster("stop", *env.args)
    assert_all_stopped(env, env.seen)


def test_stops_a_cluster_started_by_ipcluster(env):
    """The other direction: ipcluster's cluster file, our list and stop."""
    r = subprocess.run(
        [str(VENV_BIN / "ipcluster"), "start", "-n", "1", "--daemonize",
         f"--profile-dir={env.profile_dir}", f"--cluster-id={env.cluster_id}"],
        capture_output=True, text=True, timeout=TIMEOUT, env=child_env(),
    )
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + TIMEOUT
    while True:  # ipcluster --daemonize returns before the engines start
        if env.cluster_file.exists():
            d = json.loads(env.cluster_file.read_text())
            if d.get("engines", {}).get("sets"):
                break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pids = env.remember()
    out = cluster("list", "--profile-dir", env.profile_dir).stdout
    row = [line for line in out.splitlines() if env.cluster_id in line]
    assert len(row) == 1 and row[0].split()[1:] == [env.cluster_id, "True", "1", "Local", "-"]
    cluster("stop", *env.args)
    assert wait_gone(pids) == []
    assert not env.cluster_file.exists()


def test_start_time_n4(env):
    """Not asserted (performance is measured, not tested): printed with -s."""
    t0 = time.monotonic()
    r = cluster("start", "-n", 4, "--daemonize", *env.args)
    wall = time.monotonic() - t0
    env.remember()
    m = re.search(r"started in ([0-9.]+) s", r.stdout)
    assert m, r.stdout
    print(f"\ncluster start -n 4: {float(m.group(1)):.3f} s to all registered "
          f"({wall:.3f} s wall clock for the command)")
    cluster("stop", *env.args)
    assert_all_stopped(env, env.seen)


# ----------------------------------------------------------------- zygote


def test_zygote_forks_engines_with_their_ids_env_and_cwd(env, tmp_path):
    """Local engines' interpreters are the zygote's children, each with its
    engine's id, the start's environment and working directory, its own
    random state, an IPython shell; stop leaves nothing behind."""
    import ipyparallel as ipp

    # a cell, not a function: a function of this module would be unpickled
    # by importing the module on the engines
    facts_code = """
import os, random, sys
facts = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "id": os.environ.get("PARALLAX_ENGINE_ID"),
    "n": os.environ.get("PARALLAX_N_ENGINES"),
    "mark": os.environ.get("PLX_ZYGOTE_MARK"),
    "cmd_fd": os.environ.get("PARALLAX_CMD_FD"),
    "cwd": os.getcwd(),
    "shell": type(get_ipython()).__name__,
    "random": random.random(),
    "main": sys.modules["__main__"].__dict__ is globals(),
}
"""

    work = tmp_path / "work dir"
    work.mkdir()
    r = cluster("start", "-n", 3, "--daemonize", *env.args,
                extra_env={"PLX_ZYGOTE_MARK": "m-42"}, cwd=work)
    assert "3 engines registered" in r.stdout
    env.remember()
    z = zygote_pid(env.cluster_file)
    assert z is not None and not gone(z)
    socket = zygote_of(env.cluster_file)[1]
    assert socket.exists()
    rc = ipp.Client(str(env.client_file), timeout=10)
    try:
        rc[:].execute(facts_code, block=True)
        facts = dict(zip(rc.ids, rc[:].pull("facts", block=True)))
    finally:
        rc.close()
    assert sorted(facts) == [0, 1, 2]
    for eid, f in facts.items():
        assert f["ppid"] == z, f
        assert f["id"] == str(eid) and f["n"] == "3", f
        assert f["mark"] == "m-42" and f["cmd_fd"] is None, f
        assert f["cwd"] == str(work), f
        assert f["shell"] == "ParallaxShell" and f["main"], f
    assert len({f["pid"] for f in facts.values()}) == 3
    assert len({f["random"] for f in facts.values()}) == 3, "forked children share a random state"
    env.remember()
    cluster("stop", *env.args)
    assert_all_stopped(env, env.seen)
    assert gone(z) and not socket.exists()


def test_zygote_interrupt_crash_and_fallback(env):
    """SIGINT reaches a forked interpreter; a crashed one (os._exit,
    SIGKILL) is reported and replaced by another fork; once the zygote is
    gone a crash is replaced by a directly spawned Python."""
    import ipyparallel as ipp

    cluster("start", "-n", 2, "--daemonize", *env.args)
    env.remember()
    z = zygote_pid(env.cluster_file)
    _, engines = cluster_pids(env.cluster_file)
    rc = ipp.Client(str(env.client_file), timeout=10)
    try:
        e0 = rc[0]
        py0 = e0.apply_sync(os.getpid)
        assert psutil.Process(py0).ppid() == z
        # interrupt: `cluster signal` → engines → their interpreters
        ar = e0.execute("import time; time.sleep(30)", block=False)
        time.sleep(1.0)
        t = time.monotonic()
        cluster("signal", *env.args, "--signal", "INT")
        with pytest.raises(Exception, match="KeyboardInterrupt"):
            ar.get(15)
        assert time.monotonic() - t < 10
        assert e0.apply_sync(os.getpid) == py0, "an interrupt must not cost the interpreter"

        # crashes: described from the zygote's exit report, then a new fork
        with pytest.raises(Exception, match="exited with code 3"):
            e0.apply_sync(os._exit, 3)
        py0b = e0.apply_sync(os.getpid)
        assert py0b != py0 and psutil.Process(py0b).ppid() == z
        with pytest.raises(Exception, match="signal 9"):
            e0.execute("import os; os.kill(os.getpid(), 9)", block=True)
        py0c = e0.apply_sync(os.getpid)
        assert py0c not in (py0, py0b) and psutil.Process(py0c).ppid() == z
        env.remember()

        # the zygote dies: running interpreters go on; the next crash is
        # replaced by a Python the engine spawns itself (and says so)
        before = rc[:].apply_sync(os.getpid)
        os.kill(z, signal.SIGKILL)
        assert wait_gone([z], 5) == []
        assert rc[:].apply_sync(os.getpid) == before, "the running interpreters go on"
        with pytest.raises(Exception, match="exited with code 4|how is unknown"):
            e0.apply_sync(os._exit, 4)
        ppid = e0.apply_sync(os.getppid)
        assert ppid in engines, (ppid, engines)
        env.remember()
        logs = "".join(p.read_text() for p in (env.profile_dir / "log").glob("parallax-engine*.log"))
        assert "starting Python directly" in logs, logs[-2000:]
    finally:
        rc.close()
    cluster("stop", *env.args)
    assert_all_stopped(env, env.seen)


def test_no_zygote_when_asked(env):
    """--zygote=false: every engine starts its own Python, as before."""
    import ipyparallel as ipp

    cluster("start", "-n", 2, "--daemonize", "--zygote=false", *env.args)
    env.remember()
    assert zygote_pid(env.cluster_file) is None
    _, engines = cluster_pids(env.cluster_file)
    rc = ipp.Client(str(env.client_file), timeout=10)
    try:
        assert sorted(rc[:].apply_sync(os.getppid)) == sorted(engines)
    finally:
        rc.close()
    cluster("stop", *env.args)
    assert_all_stopped(env, env.seen)


@pytest.mark.parametrize("zygote", ["--zygote=true", "--zygote=false"])
def test_stop_right_after_start_leaves_nothing(env, zygote):
    """Stopped the moment its engines registered (their Pythons still
    starting and importing): engines that never ran a request drop their
    half-started interpreters instead of waiting for them, and nothing is
    left behind."""
    cluster("start", "-n", 4, "--daemonize", zygote, *env.args)
    env.remember()
    r = cluster("stop", *env.args)
    assert f"Stopped cluster {env.cluster_id}" in r.stdout
    assert "killed" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert_all_stopped(env, env.seen)
