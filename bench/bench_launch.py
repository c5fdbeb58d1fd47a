#!/usr/bin/env python3
"""Launcher benchmark: ``ipcluster``'s launchers vs ``parallax cluster start``
through the same mpiexec and the same Slurm.

For each launcher (mpi, slurm) and N, alternating sides (ipyparallel first
in odd rounds, Parallax first in even ones):

  launch→ready  ipyparallel: ``Cluster(engines=L, n=N).start_and_connect_sync()``
                + ``wait_for_engines(N)``; Parallax: ``parallax cluster start -n N
                --engines L --daemonize`` + ``Client(file).wait_for_engines(N)``.
  stop→gone     ``stop_cluster_sync()`` / ``parallax cluster stop``, until no
                process mentions the profile dir and no Slurm job is queued.

Slurm is started for the run (slurmctld + one slurmd advertising 64 CPUs,
as in tests/launch) and stopped at the end. OpenMPI's run-as-root
variables are set for the run when run as root.

Usage: bench_launch.py [--n 4 16] [--rounds 2] [--launchers mpi slurm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "launch"))
from launch_services import Slurm  # noqa: E402

BIN = os.environ.get("PARALLAX_BIN", str(ROOT / "target" / "release" / "parallax"))


def quiet_gone(marker: str, slurm: Slurm | None, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in p.info["cmdline"] or []):
                    busy = True
                    break
            except psutil.Error:
                pass
        if not busy and not (slurm and slurm.jobs()):
            return
        time.sleep(0.02)
    raise TimeoutError(f"processes of {marker} still running")


def ipyparallel_side(launcher: str, n: int, slurm) -> tuple[float, float]:
    import ipyparallel as ipp

    d = tempfile.mkdtemp(prefix="bench-launch-ipp-")
    t = time.perf_counter()
    c = ipp.Cluster(engines=launcher, n=n, profile_dir=d, cluster_id="b", log_level=40, engine_timeout=300)
    rc = c.start_and_connect_sync()
    rc.wait_for_engines(n, timeout=300)
    up = time.perf_counter() - t
    rc.close()
    t = time.perf_counter()
    c.stop_cluster_sync()
    quiet_gone(d, slurm)
    return up, time.perf_counter() - t


def parallax_side(launcher: str, n: int, slurm) -> tuple[float, float]:
    import ipyparallel as ipp

    d = tempfile.mkdtemp(prefix="bench-launch-px-")
    t = time.perf_counter()
    subprocess.run([BIN, "cluster", "start", "-n", str(n), "--engines", launcher, "--daemonize",
                    "--profile-dir", d, "--timeout", "300"], check=True, capture_output=True)
    rc = ipp.Client(f"{d}/security/ipcontroller-client.json")
    rc.wait_for_engines(n, timeout=300)
    up = time.perf_counter() - t
    rc.close()
    t = time.perf_counter()
    subprocess.run([BIN, "cluster", "stop", "--profile-dir", d], check=True, capture_output=True)
    quiet_gone(d, slurm)
    return up, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--launchers", nargs="+", default=["mpi", "slurm"])
    a = ap.parse_args()
    # ipyparallel writes its batch scripts into the working directory
    os.chdir(tempfile.mkdtemp(prefix="bench-launch-cwd-"))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    if os.geteuid() == 0:
        os.environ.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                          OMPI_MCA_rmaps_base_oversubscribe="1")
    slurm = None
    try:
        if "slurm" in a.launchers:
            slurm = Slurm(Path(tempfile.mkdtemp(prefix="bench-launch-slurm-")), cpus=64).start()
            os.environ["SLURM_CONF"] = str(slurm.conf)
            subprocess.run(["srun", "-n", "1", "true"], check=True)  # the first job is slower
        print("| launcher | N | ipcluster launch→ready | parallax launch→ready | ipcluster stop→gone | parallax stop→gone |")
        print("|---|---|---|---|---|---|")
        for launcher in a.launchers:
            for n in a.n:
                ipp_s, px_s = [], []
                for r in range(a.rounds):
                    sides = [(ipyparallel_side, ipp_s), (parallax_side, px_s)]
                    for fn, out in sides if r % 2 == 0 else sides[::-1]:
                        out.append(fn(launcher, n, slurm))
                med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
                print(f"| {launcher} | {n} | {med(ipp_s, 0):.2f} s | {med(px_s, 0):.2f} s | "
                      f"{med(ipp_s, 1):.2f} s | {med(px_s, 1):.2f} s |", flush=True)
    finally:
        if slurm:
            slurm.cancel_all()
            slurm.stop()


if __name__ == "__main__":
    main()
