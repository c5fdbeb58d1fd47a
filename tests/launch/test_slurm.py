"""`parallax cluster start --engines slurm` against a real Slurm (slurmctld
+ slurmd started by the session fixture): engines as the tasks of an
sbatch job, code run on them with the stock ipyparallel Client, job
state watched while they register, a job that can never run reported at
once with Slurm's reason, and `stop` leaving no job and no process."""

from __future__ import annotations

import time

import pytest

from launch_harness import client

pytestmark = pytest.mark.timeout(180)

#: on every engine: its id, its Slurm job and task
SLURM_CELL = """
import os
info = (int(os.environ["PARALLAX_ENGINE_ID"]), os.environ["SLURM_JOB_ID"], int(os.environ["SLURM_PROCID"]))
"""


def job_ids(profile) -> list[str]:
    return [s["job_id"] for s in profile.state()["engines"]["sets"].values()]


def test_engines_run_as_a_slurm_job(slurm_profile, slurm):
    p = slurm_profile
    t0 = time.monotonic()
    r = p.cluster("start", "-n", 4, "--engines", "Slurm", "--queue", "debug", "--time", "10", "--daemonize")
    startup = time.monotonic() - t0
    assert "4 engines registered" in r.stdout, r.stdout + r.stderr
    (job,) = job_ids(p)
    assert f"Submitted job {job} (4 engines)" in r.stdout
    # progress while the job was pending or starting
    assert "engines registered; job " + job in r.stderr, r.stderr
    assert slurm.jobs() == [job]

    d = p.state()
    assert d["engines"]["class"] == "slurm"
    (s,) = d["engines"]["sets"].values()
    assert s["n"] == 4 and s["queue"] == "debug" and "#SBATCH --time={timelimit}" in s["batch_template"]

    rc = client(p, 4)
    try:
        view = rc[:]
        view.execute(SLURM_CELL, block=True)
        out = view.pull("info", block=True)
        # one job; engine id == the task's SLURM_PROCID
        assert sorted(out) == [(i, job, i) for i in range(4)], out
    finally:
        rc.close()

    import ipyparallel as ipp

    c = ipp.Cluster.from_file(profile_dir=str(p.dir), cluster_id=p.cluster_id)
    launcher = next(iter(c.engines.values()))
    assert type(launcher).__name__ == "SlurmEngineSetLauncher" and launcher.job_id == job

    r = p.cluster("stop")
    assert f"Cancelling job {job}" in r.stdout
    assert slurm.jobs() == []
    assert p.left_running() == []
    assert not p.cluster_file.exists()
    # (README: Cluster.from_file makes the dir an IPython profile)
    leftovers = [f.name for f in p.dir.rglob("*") if f.is_file() and f.name != "README"]
    assert leftovers == [], leftovers
    print(f"slurm -n 4: all registered {startup:.2f} s after start")


def test_a_job_that_can_never_run_fails_at_once(slurm_profile, slurm):
    p = slurm_profile
    t0 = time.monotonic()
    # the partition's one node has 32 CPUs: 40 tasks can never fit
    r = p.cluster("start", "-n", 40, "--engines", "slurm", "--daemonize", "--timeout", 60, check=False)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 20, elapsed
    assert "PENDING (PartitionConfig)" in r.stderr, r.stderr
    assert "0 of 40 engines registered" in r.stderr
    assert slurm.jobs() == []
    assert p.left_running() == []
    assert not p.cluster_file.exists()


def test_print_script_submits_nothing(slurm_profile, slurm):
    p = slurm_profile
    r = p.cluster(
        "start", "-n", 3, "--engines", "slurm", "--queue", "debug", "--account", "proj", "--time", "0:30:00",
        "--qos", "normal", "--extra-directive=--mem=100M", "--print-script",
    )
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/sh"
    for d in ("--ntasks=3", "--partition=debug", "--account=proj", "--qos=normal", "--time=0:30:00", "--mem=100M"):
        assert f"#SBATCH {d}" in lines, r.stdout
    assert lines[-1].startswith("srun ") and " engine --file=" in lines[-1]
    assert slurm.jobs() == []
    assert not p.cluster_file.exists()
    assert p.left_running() == []


def test_template_and_engines_per_job(slurm_profile, slurm, tmp_path):
    p = slurm_profile
    template = tmp_path / "engines.sbatch"
    template.write_text("#!/bin/bash\n#SBATCH --job-name=px-{cluster_id}\n#SBATCH --ntasks={n}\nsrun {program_and_args}\n")
    r = p.cluster("start", "-n", 4, "--engines", "slurm", "--template", template, "--engines-per-job", 2, "--daemonize")
    assert "4 engines registered" in r.stdout, r.stdout + r.stderr
    jobs = job_ids(p)
    assert len(jobs) == 2 and sorted(slurm.jobs()) == sorted(jobs)
    for s in p.state()["engines"]["sets"].values():
        assert s["n"] == 2 and s["batch_template"].startswith("#!/bin/bash\n")
    rc = client(p, 4)
    try:
        view = rc[:]
        view.execute(SLURM_CELL, block=True)
        assert sorted(j for _, j, _ in view.pull("info", block=True)) == sorted(jobs * 2)
    finally:
        rc.close()
    p.cluster("stop")
    assert slurm.jobs() == []
    assert p.left_running() == []


MPI_CELL = """
import os
from mpi4py import MPI
c = MPI.COMM_WORLD
info = (int(os.environ["PARALLAX_ENGINE_ID"]), c.rank, c.size, c.allreduce(c.rank))
"""


def test_mpiexec_inside_a_slurm_job(slurm_profile, slurm, tmp_path):
    """A template that runs the engines with mpiexec inside the allocation:
    ids are MPI ranks and mpi4py works across the job's engines."""
    p = slurm_profile
    template = tmp_path / "mpi.sbatch"
    template.write_text("#!/bin/sh\n#SBATCH --ntasks={n}\n#SBATCH --export=ALL\nmpiexec {program_and_args}\n")
    r = p.cluster("start", "-n", 4, "--engines", "slurm", "--template", template, "--daemonize")
    assert "4 engines registered" in r.stdout, r.stdout + r.stderr
    rc = client(p, 4)
    try:
        view = rc[:]
        view.execute(MPI_CELL, block=True)
        assert sorted(view.pull("info", block=True)) == [(i, i, 4, 6) for i in range(4)]
    finally:
        rc.close()
    p.cluster("stop")
    assert slurm.jobs() == []
    assert p.left_running() == []


def test_add_a_slurm_job_to_a_running_cluster(slurm_profile, slurm):
    p = slurm_profile
    p.cluster("start", "-n", 2, "--engines", "slurm", "--daemonize")
    r = p.cluster("engines", "-n", 2, "--engines", "slurm", "--profile-dir", p.dir, "--cluster-id", p.cluster_id)
    assert "4 registered" in r.stdout, r.stdout + r.stderr
    jobs = job_ids(p)
    assert len(jobs) == 2 and sorted(slurm.jobs()) == sorted(jobs)
    rc = client(p, 4)
    rc.close()
    p.cluster("stop")
    assert slurm.jobs() == []
    assert p.left_running() == []


def test_foreground_start_cancels_its_job_on_ctrl_c(slurm_profile, slurm, tmp_path):
    import signal
    import subprocess

    from launch_harness import BIN, child_env

    p = slurm_profile
    out = open(tmp_path / "out.txt", "w+")
    proc = subprocess.Popen(
        [str(BIN), "cluster", "start", "-n", "2", "--engines", "slurm", "--profile-dir", str(p.dir),
         "--cluster-id", p.cluster_id],
        env=child_env(p.extra_env), stdout=out, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.1)
        assert len(slurm.jobs()) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, (tmp_path / "out.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert slurm.jobs() == []
    assert p.left_running() == []
    assert not p.cluster_file.exists()


def test_ipcluster_stops_a_parallax_slurm_cluster(slurm_profile, slurm):
    """The cluster file is ipyparallel's: `ipcluster stop` cancels the job
    with its own SlurmEngineSetLauncher and stops the hub."""
    import subprocess
    import sys
    from pathlib import Path

    from launch_harness import child_env

    p = slurm_profile
    p.cluster("start", "-n", 2, "--engines", "slurm", "--daemonize")
    (job,) = job_ids(p)
    assert slurm.jobs() == [job]
    ipcluster = Path(sys.executable).parent / "ipcluster"
    r = subprocess.run(
        [str(ipcluster), "stop", f"--profile-dir={p.dir}", f"--cluster-id={p.cluster_id}"],
        env=child_env(p.extra_env), capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 30
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.jobs() == []
    assert p.left_running() == []


def test_slurm_engines_without_a_connection_file(slurm_profile, slurm):
    p = slurm_profile
    r = p.cluster("start", "-n", 2, "--engines", "slurm", "--connection-info", "env", "--print-script")
    assert "--file=" not in r.stdout
    p.cluster("start", "-n", 2, "--engines", "slurm", "--connection-info", "env", "--daemonize")
    rc = client(p, 2)
    rc.close()
    p.cluster("stop")
    assert slurm.jobs() == []
    assert p.left_running() == []


def test_stop_without_the_scheduler_keeps_the_cluster_file(slurm_profile, slurm, tmp_path):
    """If the job cannot be cancelled (here: no Slurm configuration), stop
    says so and keeps the file that knows the job; a later stop finishes."""
    p = slurm_profile
    p.cluster("start", "-n", 1, "--engines", "slurm", "--daemonize")
    (job,) = job_ids(p)
    conf = p.extra_env["SLURM_CONF"]
    p.extra_env["SLURM_CONF"] = str(tmp_path / "missing.conf")
    r = p.cluster("stop", check=False)
    assert r.returncode != 0 and f"job {job} may still be running" in r.stderr, r.stderr
    assert p.cluster_file.exists() and slurm.jobs() == [job]
    p.extra_env["SLURM_CONF"] = conf
    p.cluster("stop")
    assert slurm.jobs() == []
    assert not p.cluster_file.exists()
    assert p.left_running() == []
