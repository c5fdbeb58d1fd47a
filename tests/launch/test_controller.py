"""`parallax cluster start --controller slurm|mpi`: the hub launched like
engines are — inside a Slurm job (listening on all interfaces, its
connection files read from the profile by clients here), or under
mpiexec — and `stop` cancelling its job after the engines'."""

from __future__ import annotations

import json

import pytest

from launch_harness import client

pytestmark = pytest.mark.timeout(180)


def test_a_hub_inside_a_slurm_job_with_slurm_engines(slurm_profile, slurm):
    p = slurm_profile
    r = p.cluster("start", "-n", 2, "--controller", "slurm", "--engines", "slurm", "--time", "10", "--daemonize")
    assert "Launched the hub: job " in r.stdout, r.stdout + r.stderr
    state = p.state()
    assert state["controller"]["class"] == "slurm"
    hub_job = state["controller"]["state"]["job_id"]
    (engine_job,) = [s["job_id"] for s in state["engines"]["sets"].values()]
    assert sorted(slurm.jobs()) == sorted([hub_job, engine_job])
    info = json.loads(p.client_file.read_text())
    # the hub listens on all interfaces of its node and names that node
    assert info["interface"] == "tcp://0.0.0.0" and info["location"], info
    assert state["cluster"]["controller_ip"] == "0.0.0.0"
    rc = client(p, 2)
    try:
        assert sorted(rc.ids) == [0, 1]
        assert rc[:].apply_sync(pow, 2, 5) == [32, 32]
    finally:
        rc.close()
    listed = p.cluster("list", "--profile-dir", p.dir).stdout
    assert p.cluster_id in listed and "True" in listed, listed
    r = p.cluster("stop")
    assert f"Cancelling the hub's job {hub_job}" in r.stdout, r.stdout
    assert slurm.jobs() == []
    assert not p.cluster_file.exists() and not p.client_file.exists()
    assert p.left_running() == []


def test_a_failing_hub_job_fails_the_start_with_its_output(slurm_profile, slurm):
    p = slurm_profile
    r = p.cluster("start", "-n", 1, "--controller", "slurm", "--engines", "slurm", "--time", "10",
                  "--hub-args=--no-such-hub-option", "--daemonize", check=False)
    assert r.returncode != 0
    assert "the hub exited (job " in r.stderr and "--no-such-hub-option" in r.stderr, r.stderr
    assert slurm.jobs() == []
    assert not p.cluster_file.exists()
    assert p.left_running() == []


def test_a_hub_under_mpiexec_with_local_engines(profile):
    r = profile.cluster("start", "-n", 2, "--controller", "mpi", "--daemonize")
    assert "Launched the hub: mpiexec (pid" in r.stdout, r.stdout + r.stderr
    assert profile.state()["controller"]["class"] == "mpi"
    rc = client(profile, 2)
    try:
        assert sorted(rc.ids) == [0, 1]
    finally:
        rc.close()
    profile.cluster("stop")
    assert not profile.cluster_file.exists()
    assert profile.left_running() == []


def test_an_ssh_controller_without_its_host_is_refused_at_once(profile):
    # every launcher can start a hub; ssh's own tests are test_ssh_controller.py
    r = profile.cluster("start", "-n", 1, "--controller", "ssh", check=False)
    assert r.returncode != 0 and "--controller-host" in r.stderr, r.stderr
    assert not profile.cluster_file.exists()
