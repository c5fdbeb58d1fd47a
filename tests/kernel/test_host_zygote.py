"""`parallax engine --host-zygote`: the engines of one cluster on a host
fork their interpreters from one zygote that the first of them starts and
that leaves on its own after the last (what `parallax cluster start` gives
engines a launcher starts). Real hub, real engines, the stock Client."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PARALLAX_BIN", ROOT / "target" / "release" / "parallax"))
PY = Path(sys.executable).parent / "python3"

pytestmark = pytest.mark.timeout(120)

#: on an engine: its interpreter's pid, parent and the parent's command line
WHO = """
import os
with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
    who = (os.getpid(), os.getppid(), [a.decode() for a in f.read().split(b"\\0") if a])
"""


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{PY.parent}{os.pathsep}{e.get('PATH', '')}"
    for k in ("IPP_PROFILE_DIR", "IPP_CLUSTER_ID", "IPP_CONNECTION_INFO", "PMI_FD"):
        e.pop(k, None)
    return e


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Cluster:
    """A hub and engines started by hand, as a launcher's would be."""

    def __init__(self, tmp_path: Path):
        self.profile = tmp_path / "profile"
        self.logs = tmp_path
        self.engines: list[subprocess.Popen] = []
        self.hub = subprocess.Popen(
            [str(BIN), "hub", f"--profile-dir={self.profile}"], env=env(),
            stdout=open(tmp_path / "hub.log", "wb"), stderr=subprocess.STDOUT)
        self.client_file = self.profile / "security" / "ipcontroller-client.json"
        wait_until(self.client_file.exists, 30, "the hub's connection file")
        self.rc = None

    def engine(self, *extra, pass_fds=(), extra_env=None) -> subprocess.Popen:
        i = len(self.engines)
        p = subprocess.Popen(
            [str(BIN), "engine", f"--profile-dir={self.profile}", f"--python={PY}", "--host-zygote", *extra],
            env={**env(), **(extra_env or {})}, pass_fds=pass_fds,
            stdout=open(self.logs / f"engine{i}.log", "wb"), stderr=subprocess.STDOUT)
        self.engines.append(p)
        return p

    def client(self, n: int):
        import ipyparallel as ipp

        if self.rc is None:
            self.rc = ipp.Client(str(self.client_file), timeout=30)
        self.rc.wait_for_engines(n, timeout=60)
        return self.rc

    def who(self, targets=None) -> dict[int, tuple]:
        view = self.rc[targets if targets is not None else self.rc.ids]
        view.execute(WHO, block=True)
        return dict(zip(view.targets, view.pull("who", block=True)))

    def log(self, i: int) -> str:
        return (self.logs / f"engine{i}.log").read_text(errors="replace")

    def close(self):
        if self.rc is not None:
            self.rc.close()
        for p in self.engines + [self.hub]:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def zygote_files(argv: list[str]) -> tuple[Path, Path, Path]:
    sock = Path(argv[argv.index("--parallax-zygote") + 1])
    lock = Path(argv[argv.index("--host-lock") + 1])
    return sock, lock, sock.with_suffix(".log")


def test_engines_share_the_zygote_which_leaves_after_the_last(cluster):
    for _ in range(3):
        cluster.engine()
    rc = cluster.client(3)
    who = cluster.who()
    zygotes = {ppid for _, ppid, _ in who.values()}
    assert len(zygotes) == 1, who
    (z,) = zygotes
    argv = next(iter(who.values()))[2]
    assert "--parallax-zygote" in argv and "--host-lock" in argv, argv
    assert os.getsid(z) == z, "the zygote leads a session of its own"
    assert z not in {e.pid for e in cluster.engines}
    sock, lock, log = zygote_files(argv)
    assert sock.exists() and lock.exists() and log.exists()
    assert sum("started this host's zygote" in cluster.log(i) for i in range(3)) == 1

    # a crashed interpreter is replaced by another fork of the same zygote
    eid = rc.ids[0]
    with pytest.raises(Exception, match="exited with code 7"):
        rc[eid].execute("import os; os._exit(7)", block=True)
    pid, ppid, _ = cluster.who([eid])[eid]
    assert ppid == z and pid != who[eid][0]

    # the engines die without a word (SIGKILL): the zygote kills their
    # interpreters, then leaves, removing its socket and log
    interpreters = [w[0] for w in cluster.who().values()]
    cluster.rc.close()
    cluster.rc = None
    for e in cluster.engines:
        e.kill()
        e.wait(10)
    wait_until(lambda: not alive(z) and not any(alive(p) for p in interpreters), 10,
               "the zygote and its interpreters to end")
    assert not sock.exists() and not log.exists() and not lock.exists()


def test_a_dead_zygote_is_replaced(cluster):
    cluster.engine()
    cluster.client(1)
    (eid,) = cluster.rc.ids
    _, z, argv = cluster.who()[eid]
    sock, _, _ = zygote_files(argv)
    os.kill(z, signal.SIGKILL)
    wait_until(lambda: not alive(z), 10, "the zygote to die")
    assert sock.exists(), "a SIGKILLed zygote leaves its socket behind"
    # the next engine finds nobody listening there and starts a new one
    cluster.engine()
    rc = cluster.client(2)
    new = max(rc.ids)
    _, z2, argv2 = cluster.who([new])[new]
    assert z2 != z and "--host-lock" in argv2 and alive(z2)
    assert "removed a dead zygote's socket" in cluster.log(1)


def test_a_zygote_stopped_from_outside_leaves_no_file_and_engines_recover(cluster):
    """SIGTERM to the zygote (a batch system ending the job, a person): it
    kills the interpreters it forked and removes its socket, log and lock
    file; the engines report their interpreter's end and fork the next one
    from a new zygote, whose files are new ones."""
    cluster.engine()
    rc = cluster.client(1)
    (eid,) = rc.ids
    _, z, argv = cluster.who()[eid]
    sock, lock, log = zygote_files(argv)
    # held open, the zygote's files keep their inodes: unlinked ones then
    # show nlink 0, whatever files are created at their paths meanwhile
    held = {p: os.open(p, os.O_RDONLY) for p in (log, lock)}
    os.kill(z, signal.SIGTERM)
    wait_until(lambda: not alive(z), 10, "the zygote to end")
    with pytest.raises(Exception, match="the Python process ended .*the zygote that forked it is gone.*restarted"):
        rc[eid].execute("x = 1", block=True)
    _, z2, argv2 = cluster.who()[eid]
    assert z2 != z and "--host-lock" in argv2 and alive(z2)
    assert zygote_files(argv2) == (sock, lock, log)
    # removed by the first zygote: the second one created them anew
    try:
        assert {p: os.fstat(fd).st_nlink for p, fd in held.items()} == {log: 0, lock: 0}
        assert lock.exists() and log.exists()
    finally:
        for fd in held.values():
            os.close(fd)


def test_pmi_fd_reaches_the_forked_interpreter(cluster):
    """A process manager's PMI_FD (an inherited socket) is the same socket,
    at the same number, in the forked interpreter."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    assert fd >= 5
    inode = os.fstat(fd).st_ino
    cluster.engine(pass_fds=(fd,), extra_env={"PMI_FD": str(fd)})
    theirs.close()
    rc = cluster.client(1)
    (eid,) = rc.ids
    _, ppid, argv = cluster.who()[eid]
    assert "--host-lock" in argv, "forked by the host zygote"
    # the zygote, which outlives the engine that started it, does not hold
    # that engine's inherited descriptors
    held = []
    for f in os.listdir(f"/proc/{ppid}/fd"):
        try:
            held.append(os.readlink(f"/proc/{ppid}/fd/{f}"))
        except OSError:
            pass
    assert f"socket:[{inode}]" not in held, held
    rc[eid].execute("import os, socket\n"
                    "s = socket.socket(fileno=os.dup(int(os.environ['PMI_FD'])))\n"
                    "s.sendall(b'cmd=init pmi_version=1\\n')\n"
                    "s.close()", block=True)
    ours.settimeout(10)
    assert ours.recv(100) == b"cmd=init pmi_version=1\n"
    ours.close()


def test_an_unusable_pmi_fd_falls_back_to_spawning(cluster):
    """PMI_FD naming one of the interpreter's own descriptors cannot be
    kept by a fork: the engine says so and spawns Python itself."""
    cluster.engine(extra_env={"PMI_FD": "2"})
    rc = cluster.client(1)
    (eid,) = rc.ids
    _, ppid, argv = cluster.who()[eid]
    assert ppid == cluster.engines[0].pid and "--parallax-zygote" not in argv
    log = cluster.log(0)
    assert "PMI_FD is 2, one of the interpreter's own descriptors" in log
    assert "starting Python directly" in log


def test_engines_with_another_python_get_their_own_zygote(cluster, tmp_path):
    """The zygote is per interpreter too: an engine with another `--python`
    (here the same one under another path) gets a zygote of its own rather
    than a refusal and a spawned Python."""
    other = tmp_path / "bin" / "python3"
    other.parent.mkdir()
    other.symlink_to(PY)
    cluster.engine()
    cluster.engine(f"--python={other}")
    rc = cluster.client(2)
    # by execute's stdout: the other path's Python does not find the venv
    # (ipyparallel), which `pull` would need
    parents = {}
    for eid in rc.ids:
        ar = rc[eid].execute(WHO + "print(repr(who))", block=True)
        _, ppid, argv = ast.literal_eval(ar.stdout.strip())
        parents[eid] = (ppid, argv)
    (a, argv_a), (b, argv_b) = parents[rc.ids[0]], parents[rc.ids[1]]
    assert a != b, parents
    assert "--host-lock" in argv_a and "--host-lock" in argv_b
    assert {argv_a[0], argv_b[0]} == {str(PY), str(other)}
    for i in range(2):
        assert "starting Python directly" not in cluster.log(i)


def test_engines_arriving_while_the_zygote_leaves_share_one(cluster):
    """Engines that start around the moment the zygote leaves (its idle time
    is half a second) either keep it or start the next one: each round of
    engines starting together ends up with exactly one zygote, and none of
    them spawns Python itself."""
    first = 0
    for pause in (0.0, 0.45, 0.5, 0.55, 0.7):
        for _ in range(3):
            cluster.engine()
        rc = cluster.client(1)

        def this_round():
            new = [i for i in rc.ids if i >= first]  # ids are never reused
            return new if len(new) == 3 else None

        ids = wait_until(this_round, 60, "the round's engines")
        who = cluster.who(ids)
        parents = {ppid for _, ppid, argv in who.values() if "--host-lock" in argv}
        assert len(parents) == 1 and all("--host-lock" in argv for _, _, argv in who.values()), (pause, who)
        for e in cluster.engines[first:]:
            e.kill()
            e.wait(10)
        first += 3
        time.sleep(pause)
    for i in range(first):
        assert "starting Python directly" not in cluster.log(i), cluster.log(i)
