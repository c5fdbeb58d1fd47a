"""`parallax cluster start --engines slurm` with Slurm's nodes on other
hosts: slurmctld here, a slurmd in each of two network namespace hosts
(their own network stacks and host names, this machine's file system; the
`slurm_netns` fixture). The hub binds the bridge address; the engines of
one job land on both hosts, run code for the stock ipyparallel Client, and
`stop` leaves no job and no process on any host. A hub left on loopback
fails `start` at once with the engines' own explanation."""

from __future__ import annotations

import time

import pytest

from launch_harness import client, wait_gone

pytestmark = pytest.mark.timeout(120)

#: on every engine: its id, the node Slurm ran it on, the host name it
#: sees, its job
HOST_CELL = """
import os, socket
info = (int(os.environ["PARALLAX_ENGINE_ID"]), os.environ["SLURMD_NODENAME"], socket.gethostname(),
        os.environ["SLURM_JOB_ID"], os.getpid())
"""


#: on every engine: its node and whether its interpreter was forked by a
#: host zygote (which one)
ZYGOTE_CELL = """
import os
with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
    argv = f.read().split(b"\\0")
forked = (os.environ["SLURMD_NODENAME"], os.getppid(), b"--parallax-zygote" in argv and b"--host-lock" in argv)
"""


def assert_one_host_zygote_per_node(view, nodes):
    view.execute(ZYGOTE_CELL, block=True)
    forked = view.pull("forked", block=True)
    assert all(f for _, _, f in forked), forked
    by_node = {}
    for node, ppid, _ in forked:
        by_node.setdefault(node, set()).add(ppid)
    assert sorted(by_node) == sorted(nodes) and all(len(v) == 1 for v in by_node.values()), by_node


def left_on_hosts(slurm_netns, timeout=20.0) -> dict:
    """What still runs on each host but its slurmd, once jobs had
    `timeout` seconds to end (KillWait is 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {slurm_netns.nodes[i]: slurm_netns.pids_in(i) for i in range(len(slurm_netns.nodes))}
        if not any(left.values()) or time.monotonic() > deadline:
            return {k: v for k, v in left.items() if v}
        time.sleep(0.2)


def test_engines_of_one_job_on_two_hosts(slurm_netns_profile, slurm_netns):
    p = slurm_netns_profile
    hub_ip = slurm_netns.hosts.hub_ip
    t0 = time.monotonic()
    r = p.cluster("start", "-n", 4, "--engines", "slurm", "--ip", hub_ip, "--daemonize")
    startup = time.monotonic() - t0
    assert "4 engines registered" in r.stdout, r.stdout + r.stderr
    (s,) = p.state()["engines"]["sets"].values()
    job = s["job_id"]
    assert slurm_netns.jobs() == [job]
    assert p.state()["cluster"]["controller_ip"] == hub_ip

    rc = client(p, 4)
    try:
        view = rc[:]
        view.execute(HOST_CELL, block=True)
        out = sorted(view.pull("info", block=True))
        n1, n2 = slurm_netns.nodes
        # 2 CPUs per node: tasks 0-1 on the first node, 2-3 on the second;
        # each engine sees its node's host name, not this machine's
        assert [(e, node, host, j) for e, node, host, j, _ in out] == [
            (0, n1, n1, job), (1, n1, n1, job), (2, n2, n2, job), (3, n2, n2, job)], out
        # and runs in that host's network namespace
        for e, _, _, _, pid in out:
            assert pid in slurm_netns.pids_in(e // 2), (e, pid)
        assert view.apply_sync(abs, -42) == [42] * 4
        # the engines of each node fork their interpreters from that node's zygote
        assert_one_host_zygote_per_node(view, slurm_netns.nodes)
    finally:
        rc.close()

    r = p.cluster("stop")
    assert f"Cancelling job {job}" in r.stdout
    assert slurm_netns.jobs() == []
    assert left_on_hosts(slurm_netns) == {}
    assert p.left_running() == []
    assert not p.cluster_file.exists()
    print(f"slurm across 2 namespace hosts, -n 4: all registered {startup:.2f} s after start")


def test_a_loopback_hub_with_engines_on_other_hosts_fails_at_once(slurm_netns_profile, slurm_netns):
    """The hub on 127.0.0.1 (the default) and the job's nodes elsewhere:
    each engine sees a loopback hub on another host and stops at once
    saying so, the job fails, and `start` reports it with the job's
    output, instead of waiting out its timeout."""
    p = slurm_netns_profile
    t0 = time.monotonic()
    r = p.cluster("start", "-n", 2, "--engines", "slurm", "--daemonize", "--timeout", 60, check=False)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 20, elapsed
    assert "0 of 2 engines registered" in r.stderr, r.stderr
    assert "(loopback)" in r.stderr and f'"{slurm_netns.nodes[0]}"' in r.stderr, r.stderr
    assert "--ip=0.0.0.0" in r.stderr, r.stderr
    assert slurm_netns.jobs() == []
    assert left_on_hosts(slurm_netns) == {}
    assert p.left_running() == []
    assert not p.cluster_file.exists()


#: on every engine: its id, its host, and mpi4py's world
MPI_CELL = """
import os, socket
from mpi4py import MPI
c = MPI.COMM_WORLD
info = (int(os.environ["PARALLAX_ENGINE_ID"]), socket.gethostname(), c.rank, c.size, c.allreduce(c.rank),
        MPI.Get_library_version().split()[0])
"""


def test_mpi4py_across_hosts_with_srun_pmi2(slurm_netns_profile, slurm_netns, mpich_abi_dir):
    """The default template's `srun` with PMI-2 (`SLURM_MPI_TYPE=pmi2` in
    the submitting environment, which `--export=ALL` hands to the job's
    srun) and the MPICH set-up: one MPI world across both hosts, engine
    ids = ranks (PMI_RANK), the same allreduce everywhere."""
    p = slurm_netns_profile
    p.extra_env.update({"SLURM_MPI_TYPE": "pmi2", "LD_LIBRARY_PATH": str(mpich_abi_dir)})
    r = p.cluster("start", "-n", 4, "--engines", "slurm", "--ip", slurm_netns.hosts.hub_ip, "--daemonize")
    assert "4 engines registered" in r.stdout, r.stdout + r.stderr
    rc = client(p, 4)
    try:
        view = rc[:]
        view.execute(MPI_CELL, block=True)
        out = sorted(view.pull("info", block=True))
        n1, n2 = slurm_netns.nodes
        assert out == [(i, host, i, 4, 6, "MPICH") for i, host in enumerate([n1, n1, n2, n2])], out
        # forked interpreters: PMI-2's PMI_FD was passed on to them
        assert_one_host_zygote_per_node(view, slurm_netns.nodes)
    finally:
        rc.close()
    p.cluster("stop")
    assert slurm_netns.jobs() == []
    assert left_on_hosts(slurm_netns) == {}
    assert p.left_running() == []
