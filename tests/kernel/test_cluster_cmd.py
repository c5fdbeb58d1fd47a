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


def cluster(*args, timeout=TIMEOUT, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(BIN), "cluster", *map(str, args)],
        env=child_env(),
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
        kernels = tree([*engines])  # the engines' Python subprocesses
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
