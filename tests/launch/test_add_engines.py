"""`parallax cluster engines -n N`: another engine set for a running
cluster, recorded in its cluster file, stopped with it."""

from __future__ import annotations

import shutil

import pytest

from launch_harness import client

pytestmark = pytest.mark.timeout(180)


def test_add_local_engines(profile):
    profile.cluster("start", "-n", 2, "--daemonize")
    r = profile.cluster("engines", "-n", 2, "--profile-dir", profile.dir, "--cluster-id", profile.cluster_id)
    assert "Added 2 engines" in r.stdout and "4 registered" in r.stdout, r.stdout + r.stderr
    d = profile.state()
    assert len(d["engines"]["sets"]) == 2 and d["cluster"]["n"] == 4
    rc = client(profile, 4)
    try:
        assert sorted(rc.ids) == [0, 1, 2, 3]
    finally:
        rc.close()
    profile.cluster("stop")
    assert profile.left_running() == []
    assert not profile.cluster_file.exists()


@pytest.mark.skipif(not shutil.which("mpiexec"), reason="mpiexec is not installed")
def test_a_cluster_file_holds_one_launcher(profile):
    profile.cluster("start", "-n", 1, "--daemonize")
    r = profile.cluster(
        "engines", "-n", 2, "--engines", "mpi", "--profile-dir", profile.dir, "--cluster-id", profile.cluster_id,
        check=False,
    )
    assert r.returncode != 0 and "--engines local" in r.stderr, r.stderr
    assert len(profile.state()["engines"]["sets"]) == 1
    profile.cluster("stop")
    assert profile.left_running() == []


def test_adding_to_no_cluster_is_an_error(profile):
    r = profile.cluster("engines", "-n", 1, "--profile-dir", profile.dir, "--cluster-id", "nope", check=False)
    assert r.returncode != 0 and "no running cluster" in r.stderr
