"""Fixtures for the launcher tests: a per-test profile whose processes are
all reaped at the end, and batch systems started once per session (Slurm:
slurmctld + slurmd, and slurmctld + a slurmd in each of two network
namespace hosts; Grid Engine: sge_qmaster + sge_execd; PBS: Slurm's PBS
wrappers; sshd in network namespace hosts).

PARALLAX_BIN: the binary (default target/release/parallax in the repo).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from launch_harness import ROOT, Profile, child_env, mpich_library
from launch_services import GridEngine, Slurm, SlurmNetns, SshHosts


@pytest.fixture
def profile(tmp_path):
    p = Profile(tmp_path)
    yield p
    p.reap()


@pytest.fixture
def mpich_abi_dir(tmp_path):
    """The site set-up README gives for mpi4py under Debian's MPICH: the
    wheel's MPICH build loads `libmpi.so.12` (the MPICH ABI name), which
    Debian ships as `libmpich.so.12`; a directory with that link, on
    LD_LIBRARY_PATH."""
    if not shutil.which("mpiexec.mpich"):
        pytest.skip("MPICH is not installed (Debian mpich)")
    lib = mpich_library()
    if lib is None:
        pytest.skip("libmpich.so.12 is not installed (Debian libmpich12)")
    d = tmp_path / "mpich-abi"
    d.mkdir()
    (d / "libmpi.so.12").symlink_to(lib)
    return d


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """slurmctld + slurmd (one node advertising 32 CPUs), for the session."""
    for cmd in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not shutil.which(cmd) and not Path(f"/usr/sbin/{cmd}").exists():
            pytest.skip(f"{cmd} is not installed (make test installs Debian's Slurm)")
    s = Slurm(tmp_path_factory.mktemp("slurm"), cpus=32).start()
    try:
        yield s
    finally:
        s.cancel_all()
        s.stop()


@pytest.fixture
def slurm_profile(tmp_path, slurm):
    """A profile whose commands see the session's Slurm; its jobs are
    cancelled at the end."""
    p = Profile(tmp_path, {"SLURM_CONF": str(slurm.conf)})
    yield p
    p.reap()
    slurm.cancel_all()


@pytest.fixture(scope="session")
def sge(tmp_path_factory):
    """sge_qmaster + sge_execd (Debian's Son of Grid Engine, one queue of 16
    slots on this host), for the session."""
    if not Path("/usr/sbin/sge_qmaster").exists() or not shutil.which("qsub"):
        pytest.skip("Grid Engine is not installed (Debian gridengine-master/-exec/-client)")
    g = GridEngine(tmp_path_factory.mktemp("sge")).start()
    try:
        yield g
    finally:
        g.cancel_all()
        g.stop()


@pytest.fixture
def sge_profile(tmp_path, sge):
    """A profile whose commands see the session's Grid Engine."""
    p = Profile(tmp_path, {"SGE_ROOT": str(sge.root), "SGE_CELL": "default"})
    yield p
    p.reap()
    sge.cancel_all()


#: Slurm's PBS wrappers (Debian slurm-wlm-torque, unpacked by the Makefile
#: into .stamps/torque: installing the package would remove Grid Engine,
#: which owns /usr/bin/qsub too)
TORQUE_BIN = Path(os.environ.get("PARALLAX_TORQUE_BIN", ROOT / ".stamps" / "torque" / "usr" / "bin"))


@pytest.fixture(scope="session")
def pbs_bin(tmp_path_factory):
    """A bin dir with the PBS commands (qsub, qstat, qdel) of Slurm's PBS
    wrappers and the Slurm commands they call (they look next to
    themselves)."""
    if not (TORQUE_BIN / "qsub").exists():
        pytest.skip(f"Slurm's PBS wrappers are not unpacked in {TORQUE_BIN} (make test does it)")
    d = tmp_path_factory.mktemp("pbs-bin")
    for f in TORQUE_BIN.iterdir():
        shutil.copy(f, d / f.name)
    for cmd in ("sbatch", "salloc", "srun", "squeue", "scancel", "scontrol", "sinfo"):
        path = shutil.which(cmd)
        if path:
            (d / cmd).symlink_to(path)
    return d


@pytest.fixture
def pbs_profile(tmp_path, slurm, pbs_bin):
    """A profile whose commands see PBS (over the session's Slurm)."""
    p = Profile(tmp_path, {"SLURM_CONF": str(slurm.conf), "PATH": f"{pbs_bin}{os.pathsep}{child_env()['PATH']}"})
    yield p
    p.reap()
    slurm.cancel_all()


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory):
    """Two hosts with sshd in network namespaces (and an sshd on loopback),
    for the session."""
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh"):
        pytest.skip("OpenSSH is not installed (Debian openssh-server; make test installs it)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    h = SshHosts(tmp_path_factory.mktemp("ssh"), n=2)
    try:
        yield h.start()
    finally:
        h.stop()


@pytest.fixture(scope="session")
def slurm_netns(tmp_path_factory):
    """Slurm across two hosts, for the session: slurmctld here on a bridge
    address, a slurmd in each of two network namespace hosts (2 CPUs
    each). Everything it made goes at the end, also when it failed to
    start."""
    for cmd in ("slurmctld", "slurmd", "sbatch", "munged", "nsenter", "unshare"):
        if not shutil.which(cmd) and not Path(f"/usr/sbin/{cmd}").exists():
            pytest.skip(f"{cmd} is not installed (make test installs Debian's Slurm)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    s = SlurmNetns(tmp_path_factory.mktemp("slurm-netns"), n=2, cpus=2)
    try:
        yield s.start()
    finally:
        try:
            s.cancel_all()
        finally:
            s.stop()


@pytest.fixture
def slurm_netns_profile(tmp_path, slurm_netns):
    """A profile whose commands see the two-host Slurm; its jobs are
    cancelled at the end."""
    p = Profile(tmp_path, {"SLURM_CONF": str(slurm_netns.conf)})
    yield p
    p.reap()
    slurm_netns.cancel_all()
