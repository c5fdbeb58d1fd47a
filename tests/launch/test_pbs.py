"""`parallax cluster start --engines pbs` through Slurm's PBS-compatible
commands (Debian's slurm-wlm-torque over the session's real Slurm): qsub
with a job array, qstat -f polled, qdel at stop. Real PBS (Torque,
OpenPBS) is not installable here; this checks our script, command lines and
parsers against a real qsub/qstat/qdel."""

from __future__ import annotations

import pytest

from launch_harness import client

pytestmark = pytest.mark.timeout(180)


def test_engines_run_as_a_pbs_job_array(pbs_profile, slurm):
    p = pbs_profile
    r = p.cluster("start", "-n", 3, "--engines", "PBS", "--daemonize")
    assert "3 engines registered" in r.stdout, r.stdout + r.stderr
    d = p.state()
    assert d["engines"]["class"] == "pbs"
    (s,) = d["engines"]["sets"].values()
    job = s["job_id"]
    assert f"Submitted job {job} (3 engines)" in r.stdout
    assert slurm.jobs(), "the array is in Slurm's queue"
    rc = client(p, 3)
    try:
        view = rc[:]
        view.execute("import os; j = os.environ['SLURM_ARRAY_JOB_ID']", block=True)
        assert view.pull("j", block=True) == [job.split(".")[0]] * 3
    finally:
        rc.close()
    r = p.cluster("stop")
    assert f"Cancelling job {job}" in r.stdout
    assert slurm.jobs() == []
    assert p.left_running() == []
    assert not p.cluster_file.exists()
    # nothing in the submitter's working directory (the wrappers' default
    # <script>.o<id>/.e<id>), nothing left in the profile
    stray = [f.name for f in p.dir.parent.iterdir() if f.name != "profile"]
    assert stray == [], stray
    assert [f.name for f in p.dir.rglob("*") if f.is_file()] == []
