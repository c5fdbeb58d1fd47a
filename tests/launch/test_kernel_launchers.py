"""The kernel on a cluster: the real Parallax kernel under jupyter_client
puts engines on the session's real Slurm (the `--launcher` kernel option
a kernelspec carries, and `%cluster start` in a running notebook) and on
mpiexec. Checked: the engines join as they register, `%cluster` shows the
launcher and the job's state, a cancelled job turns its engine's running
cell into an EngineError and `%cluster` shows the job's end, and kernel
shutdown cancels the jobs and removes their logs."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from launch_harness import OPENMPI_AS_ROOT, wait_gone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from kernel_harness import Kernel, strip_ansi  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_env(k: Kernel) -> dict[int, str]:
    """Each engine's SLURM_JOB_ID ('-' outside a job), by engine id."""
    r = k.execute('%px import os; print(os.environ.get("SLURM_JOB_ID", "-"))')
    if r.status != "ok":
        # none registered yet: the kernel says which are pending
        assert "launched engines are pending" in r.content["evalue"], r.describe()
        return {}
    return {eid: text.strip() for eid, text in r.stdout_by_engine().items()}


def test_a_kernel_with_the_slurm_launcher_runs_its_engines_as_a_job(slurm, tmp_path):
    cache = tmp_path / "cache"
    env = {"SLURM_CONF": str(slurm.conf), "XDG_CACHE_HOME": str(cache)}
    # what `parallax kernelspec install --launcher slurm --engines 2
    # --launcher-arg=--time=10` writes into kernel.json's argv
    k = Kernel(engines=2, extra_args=["--launcher=slurm", "--launcher-arg=--time=10"], env=env, ready_timeout=30)
    try:
        # the kernel answers at once; the job's engines join as they register
        jobs = until(slurm.jobs, 30, "the kernel's job")
        assert len(jobs) == 1
        (job,) = jobs
        seen = until(lambda: (lambda e: e if len(e) == 2 else None)(job_env(k)), 60, "2 engines")
        assert set(seen.values()) == {job}, seen
        shown = strip_ansi(k.execute("%cluster").stdout())
        assert re.search(rf"launched: 2 engines via Slurm \(job {job}\): RUNNING", shown), shown
        logs = list(cache.glob("parallax/jobs/*/parallax-engines-*.log"))
        assert logs, list(cache.rglob("*"))
    finally:
        k.stop(timeout=60)
    # shutdown cancelled the job and waited for it, and removed its logs
    assert slurm.jobs() == []
    assert not any(cache.glob("parallax/jobs/*")), list(cache.rglob("*"))


def test_cluster_start_adds_mpi_engines_to_a_running_notebook(tmp_path):
    k = Kernel(engines=2, env={**OPENMPI_AS_ROOT, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        r = k.execute("%cluster start -n 2 --engines mpi", timeout=90)
        out = strip_ansi(r.stdout())
        assert r.status == "ok", r.describe()
        assert "Launched 2 engines: mpiexec (pid" in out, out
        assert "2 engines registered; now 4 engines" in out, out
        r = k.execute("%px import os; print(os.environ.get('OMPI_COMM_WORLD_RANK', 'local'))")
        ranks = sorted(t.strip() for t in r.stdout_by_engine().values())
        assert ranks == ["0", "1", "local", "local"], r.describe()
        mpiexec = [p for p in k.descendants() if p.name().startswith(("mpiexec", "mpirun", "orterun", "prterun"))]
        assert mpiexec
        pids = [p.pid for p in mpiexec] + [c.pid for p in mpiexec for c in p.children(recursive=True)]
    finally:
        k.stop(timeout=60)
    assert wait_gone(pids, 15) == []


def test_bad_cluster_start_options_are_usage_errors():
    with Kernel(engines=1) as k:
        for cell, words in [
            ("%cluster start -n 2 --engines torque", "unknown launcher"),
            ("%cluster start -n 2 --engines slurm --profile-dir /tmp/x", "do not apply"),
            ("%cluster start -n 2", "%cluster add"),
            ("%cluster start -n 2 --engines ssh --hosts 10.9.9.9:2", "loopback"),
        ]:
            r = k.execute(cell)
            assert r.status == "error", (cell, r.describe())
            text = strip_ansi(r.content.get("evalue", "") + r.stderr() + "".join(r.content.get("traceback", [])))
            assert words in text, (cell, text)
        # the kernel still works
        assert k.execute("%px print('alive')").status == "ok"


def test_a_cancelled_job_fails_its_running_cell_and_shows_in_cluster(slurm, tmp_path):
    env = {"SLURM_CONF": str(slurm.conf), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with Kernel(engines=1, env=env) as k:
        r = k.execute("%cluster start -n 1 --engines slurm --time 10", timeout=90)
        assert r.status == "ok", r.describe()
        (job,) = slurm.jobs()
        ids = {eid for eid, j in job_env(k).items() if j == job}
        assert len(ids) == 1
        (eid,) = ids
        msg = k.send_execute(f"%%px --targets {eid}\nimport time\ntime.sleep(120)")
        time.sleep(2)
        t0 = time.monotonic()
        slurm.run("scancel", job)
        r = k.collect(msg, timeout=60)
        took = time.monotonic() - t0
        assert r.status == "error", r.describe()
        assert "EngineError" in strip_ansi(r.describe() + str(r.content)), r.describe()
        assert took < 20, took
        # %cluster shows the job's end (Slurm's last word on it, or GONE once
        # it left the queue); the local engine still runs cells
        ended = re.compile(rf"via Slurm \(job {job}\): (CANCELLED|COMPLETED|FAILED|GONE)")
        until(lambda: ended.search(strip_ansi(k.execute("%cluster").stdout())), 30, "the job's end in %cluster")
        assert k.execute("%px print('still here')").status == "ok"
