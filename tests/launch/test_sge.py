"""`parallax cluster start --engines sge` against a real Son of Grid Engine
(sge_qmaster + sge_execd started by the session fixture): engines as the
tasks of a job array, code run on them with the stock Client, a rejected
submission reported with qsub's words, and `stop` leaving no job and no
process."""

from __future__ import annotations

import sys

import pytest

from launch_harness import client

pytestmark = pytest.mark.timeout(180)

#: SGE's job shell resets PATH: the engines are told which Python to run
PYTHON = f"--engine-args=--python={sys.executable}"


def test_engines_run_as_an_sge_job_array(sge_profile, sge):
    p = sge_profile
    r = p.cluster("start", "-n", 3, "--engines", "SGE", PYTHON, "--daemonize")
    assert "3 engines registered" in r.stdout, r.stdout + r.stderr
    d = p.state()
    assert d["engines"]["class"] == "sge"
    (s,) = d["engines"]["sets"].values()
    job = s["job_id"]
    assert f"Submitted job {job} (3 engines)" in r.stdout
    assert sge.jobs() == [job]
    rc = client(p, 3)
    try:
        view = rc[:]
        view.execute("import os; j = (os.environ['JOB_ID'], int(os.environ['SGE_TASK_ID']))", block=True)
        assert sorted(view.pull("j", block=True)) == [(job, t) for t in (1, 2, 3)]
    finally:
        rc.close()

    import ipyparallel as ipp

    c = ipp.Cluster.from_file(profile_dir=str(p.dir), cluster_id=p.cluster_id)
    assert type(next(iter(c.engines.values()))).__name__ == "SGEEngineSetLauncher"

    r = p.cluster("stop")
    assert f"Cancelling job {job}" in r.stdout
    assert sge.jobs() == []
    assert p.left_running() == []
    assert not p.cluster_file.exists()


def test_a_rejected_submission_fails_with_qsubs_words(sge_profile, sge):
    p = sge_profile
    r = p.cluster("start", "-n", 2, "--engines", "sge", "--queue", "no_such_queue", "--daemonize", check=False)
    assert r.returncode != 0
    assert "qsub" in r.stderr and "no_such_queue" in r.stderr, r.stderr
    assert sge.jobs() == []
    assert p.left_running() == []
    assert not p.cluster_file.exists()
