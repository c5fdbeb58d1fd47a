"""Helpers of the launcher tests: the parallax binary, a per-test profile
whose processes are all reaped at the end, the environment OpenMPI needs
as root. (A uniquely named module: `pytest tests` imports every test
directory's conftest, so shared helpers cannot live in one.)

PARALLAX_BIN: the binary (default target/release/parallax in the repo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PARALLAX_BIN", ROOT / "target" / "release" / "parallax"))
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 90

#: OpenMPI refuses to run as root, and to place more ranks than cores,
#: without these. Test environment only: the product never sets them.
OPENMPI_AS_ROOT = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def child_env(extra: dict | None = None) -> dict:
    e = os.environ.copy()
    # engines run user code with the first python3 on PATH: the venv's
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    for k in ("IPP_PROFILE_DIR", "IPP_CLUSTER_ID", "IPP_CONNECTION_INFO", "PARALLAX_LOG"):
        e.pop(k, None)
    e["RUST_BACKTRACE"] = "0"
    if os.geteuid() == 0:
        e.update(OPENMPI_AS_ROOT)
    e.update(extra or {})
    return e


def gone(pid: int) -> bool:
    """Dead or a zombie (pid 1 here may never reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def procs_mentioning(text: str) -> set[int]:
    found = set()
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in (p.info["cmdline"] or [])):
                found.add(p.info["pid"])
        except psutil.Error:
            pass
    return found


def tree(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.add(pid)
            out.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not gone(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


class Profile:
    """A profile dir and cluster id of one test; `cluster(...)` runs
    `parallax cluster` on it."""

    def __init__(self, tmp_path: Path, extra_env: dict | None = None):
        self.dir = tmp_path / "profile"
        self.cluster_id = f"t{uuid.uuid4().hex[:8]}"
        self.security = self.dir / "security"
        self.cluster_file = self.security / f"cluster-{self.cluster_id}.json"
        self.client_file = self.security / f"ipcontroller-{self.cluster_id}-client.json"
        self.extra_env = extra_env or {}
        self.seen: set[int] = set()

    def cluster(self, *args, timeout=TIMEOUT, check=True) -> subprocess.CompletedProcess:
        argv = [str(BIN), "cluster", *map(str, args)]
        if args and args[0] in ("start", "stop"):
            argv += ["--profile-dir", str(self.dir), "--cluster-id", self.cluster_id]
        # in the test's temp dir: a scheduler's default output files land
        # in the submitter's working directory
        r = subprocess.run(argv, env=child_env(self.extra_env), capture_output=True, text=True, timeout=timeout,
                           cwd=self.dir.parent)
        self.remember()
        if check and r.returncode != 0:
            raise AssertionError(f"parallax cluster {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def state(self) -> dict:
        return json.loads(self.cluster_file.read_text())

    def remember(self):
        if self.cluster_file.exists():
            try:
                d = self.state()
                pids = [d["controller"]["state"].get("pid", -1)]
                pids += [s.get("pid", -1) for s in d["engines"]["sets"].values()]
                self.seen |= tree(p for p in pids if p > 0)
            except (ValueError, KeyError):
                pass
        self.seen |= tree(procs_mentioning(str(self.dir)))

    def left_running(self) -> list[str]:
        """Processes of this profile still running (none after a stop)."""
        self.remember()
        left = wait_gone(self.seen | procs_mentioning(str(self.dir)), 15)
        out = []
        for p in left:
            try:
                out.append(" ".join(psutil.Process(p).cmdline()))
            except psutil.Error:
                pass
        return out

    def reap(self):
        self.remember()
        for pid in self.seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        wait_gone(self.seen, 10)


def mpich_library() -> Path | None:
    """Debian's MPICH runtime library (libmpich.so.12), if installed."""
    r = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30)
    for line in r.stdout.splitlines():
        if line.strip().startswith("libmpich.so.12 ") and "=>" in line:
            return Path(line.split("=>", 1)[1].strip())
    return None


def client(profile: Profile, n: int):
    import ipyparallel as ipp

    # ipyparallel 9 takes the connection file as its first argument
    rc = ipp.Client(str(profile.client_file), timeout=20)
    rc.wait_for_engines(n, timeout=30)
    return rc


