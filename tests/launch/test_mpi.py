"""`parallax cluster start --engines mpi`: engines as the ranks of one
mpiexec (OpenMPI, and MPICH with the LD_LIBRARY_PATH set-up the README
gives), ids equal to ranks, mpi4py working on the engines, and `stop`
leaving nothing behind. Checked with the stock ipyparallel Client
and `Cluster.from_file`."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from launch_harness import client, gone, wait_gone

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not shutil.which("mpiexec"), reason="mpiexec is not installed (Debian openmpi-bin)"),
]


#: run on every engine: its id, its MPI rank and world size, and a collective
MPI_CELL = """
import os
from mpi4py import MPI
c = MPI.COMM_WORLD
info = (int(os.environ["PARALLAX_ENGINE_ID"]), c.rank, c.size, c.allreduce(c.rank))
"""


def test_engines_are_ranks_and_mpi4py_works(profile):
    t0 = time.monotonic()
    r = profile.cluster("start", "-n", 4, "--engines", "MPI", "--daemonize")
    assert "4 engines registered" in r.stdout, r.stdout + r.stderr
    startup = time.monotonic() - t0
    d = profile.state()
    assert d["engines"]["class"] == "mpi"
    (engine_set,) = d["engines"]["sets"].values()
    assert engine_set["n"] == 4 and engine_set["state"] == "running"
    mpiexec = engine_set["pid"]
    assert not gone(mpiexec)

    rc = client(profile, 4)
    try:
        assert sorted(rc.ids) == [0, 1, 2, 3]
        view = rc[:]
        view.execute(MPI_CELL, block=True)
        out = view.pull("info", block=True)
        # engine id == rank, one world of 4, the same sum everywhere
        assert sorted(out) == [(i, i, 4, 6) for i in range(4)], out
        by_id = dict(zip(rc.ids, out))
        assert all(by_id[i][0] == i for i in rc.ids)
    finally:
        rc.close()

    # ipyparallel reads the cluster file as its own MPI launcher's state
    import ipyparallel as ipp

    c = ipp.Cluster.from_file(profile_dir=str(profile.dir), cluster_id=profile.cluster_id)
    assert type(next(iter(c.engines.values()))).__name__ == "MPIEngineSetLauncher"

    profile.cluster("stop")
    assert gone(mpiexec)
    assert profile.left_running() == []
    assert not profile.cluster_file.exists()
    assert list((profile.dir / "log").glob("*")) == []
    print(f"mpi -n 4: all registered {startup:.2f} s after start")


def test_many_ranks_register_without_stalling(profile):
    n = 16
    t0 = time.monotonic()
    profile.cluster("start", "-n", n, "--engines", "mpi", "--daemonize", "--timeout", 120, timeout=150)
    print(f"mpi -n {n}: all registered in {time.monotonic() - t0:.2f} s")
    rc = client(profile, n)
    try:
        assert sorted(rc.ids) == list(range(n))
    finally:
        rc.close()
    profile.cluster("stop")
    assert profile.left_running() == []


def test_print_script_shows_the_command_and_starts_nothing(profile):
    r = profile.cluster("start", "-n", 3, "--engines", "mpi", "--mpi-args=--bind-to none", "--print-script")
    line = r.stdout.strip()
    assert line.startswith("mpiexec -n 3 --bind-to none ")
    assert " engine --file=" in line and "--n-engines=3" in line
    assert not profile.cluster_file.exists()
    assert profile.left_running() == []


def test_an_mpiexec_failure_is_reported_at_once(profile):
    t0 = time.monotonic()
    r = profile.cluster("start", "-n", 4, "--engines", "mpi", "--mpi-args=--no-such-option", "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30
    # the launcher's state and mpiexec's own words
    assert "mpiexec (pid" in r.stderr and "exit status: 1" in r.stderr, r.stderr
    assert 'unknown option "--no-such-option"' in r.stderr, r.stderr
    assert profile.left_running() == []
    assert not profile.cluster_file.exists()


def test_unknown_launcher_is_refused(profile):
    r = profile.cluster("start", "-n", 1, "--engines", "torque", check=False)
    assert r.returncode != 0
    assert "unknown launcher" in r.stderr and "slurm" in r.stderr


#: on every engine, under MPICH: the rank environment hydra gave the rank
#: (the engine's Python is the rank's child: it must see it, and the PMI
#: socket must still be open there) and mpi4py over it
MPICH_CELL = """
import os, stat
from mpi4py import MPI
c = MPI.COMM_WORLD
env = {k: os.environ.get(k) for k in ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")}
pmi_fd_is_socket = stat.S_ISSOCK(os.fstat(int(os.environ["PMI_FD"])).st_mode)
info = (int(os.environ["PARALLAX_ENGINE_ID"]), env, pmi_fd_is_socket, c.rank, c.size, c.allreduce(c.rank),
        MPI.Get_library_version().split()[0])
"""


@pytest.mark.parametrize("how", ["environment", "genv"])
def test_mpich_ranks_are_engine_ids_and_mpi4py_works(profile, mpich_abi_dir, how):
    """MPICH's hydra sets PMI_RANK (not OMPI_*): engine ids follow it, the
    engine's Python inherits the rank's environment, and with the
    LD_LIBRARY_PATH set-up the mpi4py wheel runs on MPICH: in the
    environment of `start` (hydra forwards it to the ranks), or given to
    the ranks only with hydra's `-genv`."""
    args = ["start", "-n", 3, "--engines", "mpi", "--mpi-cmd", "mpiexec.mpich", "--daemonize"]
    if how == "environment":
        profile.extra_env["LD_LIBRARY_PATH"] = str(mpich_abi_dir)
    else:
        args.append(f"--mpi-args=-genv LD_LIBRARY_PATH {mpich_abi_dir}")
    profile.cluster(*args)
    rc = client(profile, 3)
    try:
        view = rc[:]
        view.execute(MPICH_CELL, block=True)
        out = sorted(view.pull("info", block=True))
        assert out == [
            (i, {"PMI_RANK": str(i), "PMI_SIZE": "3", "MPI_LOCALRANKID": str(i)}, True, i, 3, 3, "MPICH")
            for i in range(3)
        ], out
    finally:
        rc.close()
    profile.cluster("stop")
    assert profile.left_running() == []


def test_connection_info_through_the_environment(profile):
    """--connection-info env: engines read $IPP_CONNECTION_INFO (no --file),
    and the key is on no command line."""
    import json

    import psutil

    profile.cluster("start", "-n", 2, "--engines", "mpi", "--connection-info", "env", "--daemonize")
    (s,) = profile.state()["engines"]["sets"].values()
    assert "--file=" not in " ".join(psutil.Process(s["pid"]).cmdline())
    key = json.loads(profile.client_file.read_text())["key"]
    for p in psutil.process_iter(["cmdline"]):
        assert key not in " ".join(p.info["cmdline"] or [])
    rc = client(profile, 2)
    try:
        assert sorted(rc.ids) == [0, 1]
    finally:
        rc.close()
    profile.cluster("stop")
    assert profile.left_running() == []


#: run on every engine: its interpreter's parent and that parent's command line
PARENT_CELL = """
import os
ppid = os.getppid()
with open("/proc/%d/cmdline" % ppid, "rb") as f:
    parent = (ppid, f.read().split(b"\\0"))
"""


def interpreters_parents(profile, n: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of each engine's interpreter's parent."""
    rc = client(profile, n)
    try:
        view = rc[:]
        view.execute(PARENT_CELL, block=True)
        return [(ppid, [a.decode() for a in argv if a]) for ppid, argv in view.pull("parent", block=True)]
    finally:
        rc.close()


def test_ranks_share_one_host_zygote_that_leaves_with_them(profile):
    """mpiexec's ranks on one host fork their interpreters from one zygote
    (started by the first rank, in a session of its own), which exits on
    its own once the ranks are gone; `--zygote=false` gives each rank its
    own Python."""
    import psutil

    profile.cluster("start", "-n", 4, "--engines", "mpi", "--daemonize")
    parents = interpreters_parents(profile, 4)
    pids = {p for p, _ in parents}
    assert len(pids) == 1, parents
    (zygote,) = pids
    argv = parents[0][1]
    assert "--parallax-zygote" in argv and "--host-lock" in argv, argv
    (s,) = profile.state()["engines"]["sets"].values()
    engines = [p for p in psutil.Process(s["pid"]).children(recursive=True) if "engine" in p.cmdline()]
    assert len(engines) == 4 and zygote not in {p.pid for p in engines}, engines
    assert os.getsid(zygote) == zygote, "the zygote leads a session of its own"

    profile.cluster("stop")
    # gone by itself a few seconds after the last rank
    assert wait_gone([zygote], 15) == []
    assert profile.left_running() == []

    # each rank with its own Python: the interpreter's parent is its engine
    profile.cluster("start", "-n", 2, "--engines", "mpi", "--zygote=false", "--daemonize")
    parents = interpreters_parents(profile, 2)
    profile.cluster("stop")
    for _, argv in parents:
        assert "engine" in argv and "--parallax-zygote" not in argv and "--host-zygote" not in argv, argv
    assert profile.left_running() == []

