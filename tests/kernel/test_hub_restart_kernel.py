"""Issue 14: the kernel's client reconnects to a restarted hub.

A Parallax hub (`--sqlitedb`) and two Parallax engines run outside the
kernel; the kernel is started on the hub's client file (`--cluster`). The
hub is killed (`kill -9`) and started again with `--restore` on the same
profile: the engines keep their namespaces and re-register, and the kernel
— without being restarted — runs cells on them again, its engine table
current; a cell running when the hub died ends with an error, never a hang.
The local client (`rc`) is bound again to the restarted hub.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import PARALLAX_BIN
from kernel_harness import Kernel, wait_for

pytestmark = pytest.mark.timeout(180)


class Hub:
    def __init__(self, profile: Path, cid: str, log: Path):
        self.profile, self.cid, self.log = profile, cid, log
        self.proc: subprocess.Popen | None = None

    @property
    def client_file(self) -> Path:
        return self.profile / "security" / f"ipcontroller-{self.cid}-client.json"

    @property
    def engine_file(self) -> Path:
        return self.profile / "security" / f"ipcontroller-{self.cid}-engine.json"

    def start(self, *extra: str) -> None:
        before = self.client_file.stat().st_mtime_ns if self.client_file.exists() else None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(PARALLAX_BIN), "hub", f"--profile-dir={self.profile}", f"--cluster-id={self.cid}",
                 "--ip=127.0.0.1", "--sqlitedb", *extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        assert wait_for(
            lambda: self.client_file.exists() and self.client_file.stat().st_mtime_ns != before, 30
        ), self.log.read_text()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def external(tmp_path):
    profile = tmp_path / "profile"
    (profile / "security").mkdir(parents=True)
    hub = Hub(profile, "r" + uuid.uuid4().hex[:6], tmp_path / "hub.log")
    hub.start()
    engines = []
    for i in range(2):
        with open(tmp_path / f"engine{i}.log", "wb") as log:
            engines.append(subprocess.Popen(
                [str(PARALLAX_BIN), "engine", f"--file={hub.engine_file}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
    try:
        yield hub, engines
    finally:
        for p in engines:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        if hub.proc and hub.proc.poll() is None:
            hub.kill()


def ok(k: Kernel, code: str, timeout: float = 60):
    r = k.execute(code, timeout=timeout)
    assert r.status == "ok", f"{code!r} failed:\n{r.describe()}"
    return r


def test_kernel_keeps_working_across_a_hub_restart(external):
    hub, engines = external
    with Kernel(engines=1, extra_args=["--cluster", str(hub.client_file)]) as k:
        assert wait_for(lambda: "2 engines registered" in ok(k, "%engines").stdout(), 30)
        ok(k, "import os\nkept = os.getpid()")
        before = ok(k, "print(kept)").stdout_by_engine()
        assert sorted(before) == [0, 1], before
        assert ok(k, "%local print(sorted(rc.ids))").stdout() == "[0, 1]\n"
        # a cell running when the hub dies
        msg_id = k.send_execute("import time\ntime.sleep(4)\nprint('slept')")
        time.sleep(1)
        hub.kill()
        time.sleep(0.5)
        hub.start("--restore")
        r = k.collect(msg_id, timeout=90)
        # the cell said what happened while it waited
        said = r.stderr()
        assert "[hub] lost the connection to the hub" in said and "[hub] reconnected" in said, r.describe()
        # settled: the engines' result, or the restarted hub's error for a
        # request it could not complete — never a hang
        assert r.status in ("ok", "error"), r.describe()
        if r.status == "error":
            assert "HubRestart" in r.describe() or "Engine" in r.describe(), r.describe()
        # the same engines, namespaces kept, reached through the new hub
        deadline = time.monotonic() + 60
        while True:
            r = k.execute("print(kept)", timeout=60)
            if r.status == "ok" and sorted(r.stdout_by_engine()) == [0, 1]:
                break
            assert time.monotonic() < deadline, r.describe()
            time.sleep(0.5)
        assert r.stdout_by_engine() == before
        assert all(p.poll() is None for p in engines)
        # the local client follows the kernel's link to the new hub
        assert ok(k, "%local print(sorted(rc.ids), len(rc[:].apply_sync(lambda: 1)))").stdout() == "[0, 1] 2\n"
