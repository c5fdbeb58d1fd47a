"""Fixtures for the wheel's tests: the wheel installed into a fresh venv.

PARALLAX_WHEEL names the wheel (`make wheel` builds dist/parallax_jupyter-*.whl;
`make test` passes it); without it the wheel is built here with maturin
into a temporary directory (same target/ as `make build`, so incremental).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent.parent
#: what the venv gets beside the wheel, pinned as in requirements.txt
BESIDE = ["jupyter_client", "nbclient", "nbformat", "ipyparallel", "pyzmq"]


def pins(names):
    want = {n.lower().replace("_", "-") for n in names}
    out = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m and m.group(1).lower().replace("_", "-") in want:
            out.append(f"{m.group(1)}=={m.group(2)}")
    assert len(out) == len(want), f"requirements.txt pins {out}, want {sorted(want)}"
    return out


def run(cmd, *, env, timeout=300, cwd=None):
    p = subprocess.run(
        [str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
        f"--- stdout:\n{p.stdout[-4000:]}\n--- stderr:\n{p.stderr[-4000:]}"
    )
    return p


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("PARALLAX_WHEEL")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    maturin = Path(sys.executable).parent / "maturin"
    run([maturin, "build", "--release", "--locked", "--out", out], env=dict(os.environ),
        cwd=REPO, timeout=1800)
    (whl,) = out.glob("parallax_jupyter-*.whl")
    return whl


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel, jupyter_client, nbclient and ipyparallel,
    and the environment to run it in: not activated (its bin is not on
    PATH), no Jupyter or Parallax variables of ours, its own empty user
    Jupyter dir — what it finds, it found in the venv."""
    root = tmp_path_factory.mktemp("wheel-venv")
    env_dir = root / "venv"
    home = root / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("JUPYTER", "PARALLAX", "IPP_", "PYTHON")) or k in ("VIRTUAL_ENV", "IPYTHONDIR"))
    }
    env.update(
        # no venv's bin (ours runs these tests)
        PATH=os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not (Path(p).parent / "pyvenv.cfg").exists()
        ),
        HOME=str(home),
        JUPYTER_DATA_DIR=str(home / "jupyter-data"),
        JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
        IPYTHONDIR=str(home / "ipython"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    base = getattr(sys, "_base_executable", None) or shutil.which("python3")
    run([base, "-m", "venv", env_dir], env=env)
    py = env_dir / "bin" / "python"
    run([py, "-m", "pip", "install", "--quiet", str(wheel), *pins(BESIDE)], env=env, timeout=600)
    yield {"dir": env_dir, "python": py, "bin": env_dir / "bin", "env": env, "root": root}
    left = [p for p in psutil.process_iter() if _runs_from(p, env_dir)]
    for p in left:
        p.kill()
    assert not left, f"processes of the wheel's venv left running: {left}"


def _runs_from(p: psutil.Process, env_dir: Path) -> bool:
    try:
        return str(env_dir) in " ".join(p.cmdline()[:2])
    except psutil.Error:
        return False
