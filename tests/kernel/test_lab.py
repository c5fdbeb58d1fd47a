"""The Parallax kernel in JupyterLab, driven by a real browser.

Starts `jupyter lab` from the venv (loopback, a free port, a token, a
temporary root dir, no news/update checks, settings and workspaces in
temporary dirs) with the test kernelspec on JUPYTER_PATH, writes a notebook
whose kernel is parallax-python, and runs tests/lab/lab_test.js: headless
Debian chromium (playwright-core) opens the notebook, runs the first cell (a
`%local` line, then code for the engines) and waits for the local output
`home 42` and `[stdout:0]` … `[stdout:3]`. The screenshot is kept in
tests/artifacts/jupyterlab.png. The server is always shut down, and the
conftest's orphan check runs after it.

Needs /usr/bin/chromium and tests/lab/node_modules (`make lab-deps`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import KERNEL_NAME, N_ENGINES, REPO, venv_bin

LAB_DIR = REPO / "tests/lab"
ARTIFACTS = REPO / "tests/artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SERVER_START_TIMEOUT = 90
NODE_TIMEOUT = 150
# a local line (the kernel's own Python, issue 12), then code for the engines
CELL = '%local print("home", 6 * 7)\nimport os; print("engine", os.environ["PARALLAX_ENGINE_ID"])'

pytestmark = pytest.mark.timeout(SERVER_START_TIMEOUT + NODE_TIMEOUT + 90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


class Lab:
    """A JupyterLab server in its own session, logs in a file."""

    def __init__(self, root: Path, state: Path):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        settings = state / "settings"
        notif = settings / "@jupyterlab/apputils-extension/notification.jupyterlab-settings"
        notif.parent.mkdir(parents=True)
        # no news, no update check, no toasts over the notebook
        notif.write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
        )
        env = dict(os.environ)
        env.update(
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
            JUPYTER_RUNTIME_DIR=str(state / "runtime"),
            JUPYTER_CONFIG_DIR=str(state / "config"),
            JUPYTER_DATA_DIR=str(state / "data"),
        )
        self.log_path = state / "jupyterlab.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                venv_bin("jupyter"),
                "lab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root}",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
                # no PyPI queries from the extension manager
                "--LabApp.extension_manager=readonly",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", timeout: float = 5):
        req = urllib.request.Request(
            f"{self.base}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if body else None

    def wait_up(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                self.api("/api/status")
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.25)
        raise AssertionError(f"jupyter lab not up within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """Ask the server to shut down (it shuts its kernels down first);
        signals if it does not."""
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", method="POST")
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(self.proc, grace=10)
        self.log.close()


@pytest.fixture
def lab(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: run `make lab-deps`")
    if not (LAB_DIR / "node_modules/playwright-core").is_dir():
        pytest.fail("tests/lab/node_modules missing: run `make lab-deps`")
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH")
    root = tmp_path / "root"
    root.mkdir()
    server = Lab(root, tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_notebook_in_jupyterlab(lab):
    nb = new_notebook(cells=[new_code_cell(CELL)])
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": "Parallax Python",
        "language": "python",
    }
    nbformat.write(nb, lab.root / "lab-check.ipynb")

    up = lab.wait_up(SERVER_START_TIMEOUT)
    specs = lab.api("/api/kernelspecs")["kernelspecs"]
    assert KERNEL_NAME in specs, f"JupyterLab does not see {KERNEL_NAME}: {sorted(specs)}"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "jupyterlab.png"
    if shot.exists():
        shot.unlink()
    env = dict(os.environ)
    env.update(
        LAB_URL=f"{lab.base}/lab/tree/lab-check.ipynb?token={lab.token}",
        LAB_EXPECT=json.dumps(["home 42"] + [f"[stdout:{i}] engine {i}" for i in range(N_ENGINES)]),
        LAB_SCREENSHOT=str(shot),
        LAB_TIMEOUT_MS="90000",
        CHROMIUM=CHROMIUM,
    )
    t0 = time.monotonic()
    node = subprocess.Popen(
        ["node", "lab_test.js"],
        cwd=LAB_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = node.communicate(timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(node, grace=5)
        out, _ = node.communicate()
        out += f"\n(lab_test.js killed after {NODE_TIMEOUT} s)"
    finally:
        kill_group(node, grace=5)  # chromium helpers, if any were left
    took = time.monotonic() - t0
    print(f"jupyter lab up in {up:.1f} s; lab_test.js took {took:.1f} s\n{out}")

    sessions = lab.api("/api/sessions")
    assert node.returncode == 0, f"lab_test.js failed ({node.returncode}):\n{out}\n--- jupyter lab log:\n{lab.logs()}"
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    assert [s["kernel"]["name"] for s in sessions] == [KERNEL_NAME], sessions
