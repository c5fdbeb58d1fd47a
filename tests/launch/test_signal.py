"""`parallax cluster signal` (ipyparallel's `Cluster.signal_engines`) and
the JOBS column of `parallax cluster list`: SIGINT reaches the engines
through their launcher — local processes, a Slurm job (scancel -s) — and
interrupts what they run, which the client sees as KeyboardInterrupt; the
engines live on, and idle ones ignore it."""

from __future__ import annotations

import time

import ipyparallel as ipp
import pytest

from launch_harness import client

pytestmark = pytest.mark.timeout(180)


def interrupted_by_signal(p, rc, n):
    ar = rc[:].execute("import time; time.sleep(60)", block=False)
    time.sleep(1.5)  # running, not queued
    t0 = time.monotonic()
    r = p.cluster("signal", "--profile-dir", p.dir, "--cluster-id", p.cluster_id, "--signal", "SIGINT")
    assert "Sent signal 2 to " in r.stdout, r.stdout + r.stderr
    with pytest.raises(ipp.error.CompositeError) as e:
        ar.get(timeout=30)
    assert time.monotonic() - t0 < 20
    assert [x[0] for x in e.value.elist] == ["KeyboardInterrupt"] * n, e.value.elist
    # the engines live on, namespaces kept
    assert rc[:].apply_sync(pow, 2, 3) == [8] * n
    return r


def test_sigint_interrupts_local_engines(profile):
    profile.cluster("start", "-n", 2, "--daemonize")
    rc = client(profile, 2)
    try:
        r = interrupted_by_signal(profile, rc, 2)
        assert r.stdout.count("(pid ") == 2
        # idle engines ignore SIGINT, as ipengine does: nothing to interrupt
        profile.cluster("signal", "--profile-dir", profile.dir, "--cluster-id", profile.cluster_id, "--signal", "INT")
        time.sleep(1)
        assert rc[:].apply_sync(pow, 3, 2) == [9, 9]
        assert len(rc.ids) == 2
    finally:
        rc.close()
    profile.cluster("stop")
    assert profile.left_running() == []


def test_sigint_reaches_a_slurm_job_and_list_shows_its_state(slurm_profile, slurm):
    p = slurm_profile
    p.cluster("start", "-n", 2, "--engines", "slurm", "--time", "10", "--daemonize")
    (job,) = slurm.jobs()
    out = p.cluster("list", "--profile-dir", p.dir).stdout.splitlines()
    assert out[0].split()[-1] == "JOBS"
    (row,) = [line for line in out if p.cluster_id in line]
    assert row.split()[1:5] == [p.cluster_id, "True", "2", "Slurm"] and f"job {job} RUNNING" in row, row
    rc = client(p, 2)
    try:
        r = interrupted_by_signal(p, rc, 2)
        assert f"job {job}" in r.stdout
    finally:
        rc.close()
    p.cluster("stop")
    assert slurm.jobs() == []


def test_bad_signals_are_clear_errors(profile):
    r = profile.cluster("signal", "--profile-dir", profile.dir, "--cluster-id", profile.cluster_id, check=False)
    assert r.returncode != 0 and "no cluster" in r.stderr, r.stderr
    r = profile.cluster("signal", "--signal", "SIGFOO", check=False)
    assert r.returncode != 0 and "unknown signal" in r.stderr, r.stderr
