"""`parallax kernelspec install|remove|list`, checked with Jupyter's own
`jupyter kernelspec list --json`.

PARALLAX_BIN: the binary (default target/release/parallax in the repo).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PARALLAX_BIN", ROOT / "target" / "release" / "parallax"))
JUPYTER = Path(sys.executable).parent / "jupyter"
TIMEOUT = 60


@pytest.fixture
def env(tmp_path):
    """An environment where Jupyter sees nothing of the real user's setup."""
    e = os.environ.copy()
    for k in ("JUPYTER_PATH", "VIRTUAL_ENV", "XDG_DATA_HOME"):
        e.pop(k, None)
    e["JUPYTER_DATA_DIR"] = str(tmp_path / "user-data")
    e["JUPYTER_CONFIG_DIR"] = str(tmp_path / "user-config")
    # in a venv Jupyter would otherwise look in sys.prefix before the user dir
    e["JUPYTER_PREFER_ENV_PATH"] = "0"
    return e


def parallax(env, *args):
    return subprocess.run(
        [str(BIN), "kernelspec", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )


def jupyter_specs(env, data_dir: Path | None = None) -> dict:
    e = dict(env)
    if data_dir is not None:
        e["JUPYTER_PATH"] = str(data_dir)
    out = subprocess.run(
        [str(JUPYTER), "kernelspec", "list", "--json"],
        env=e,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    return json.loads(out)["kernelspecs"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_install_prefix_seen_by_jupyter(tmp_path, env):
    prefix = tmp_path / "prefix"
    r = parallax(env, "install", "--prefix", str(prefix), "--engines", "3")
    kdir = prefix / "share" / "jupyter" / "kernels" / "parallax-python"
    assert r.stdout.strip() == f"Installed kernelspec parallax-python in {kdir}"

    specs = jupyter_specs(env, prefix / "share" / "jupyter")
    assert "parallax-python" in specs
    assert "parallax-rust" not in specs  # only with --language rust / --all
    found = specs["parallax-python"]
    assert Path(found["resource_dir"]) == kdir
    spec = found["spec"]
    assert spec["display_name"] == "Parallax Python (3 engines)"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    assert spec["metadata"] == {"debugger": False}
    argv = spec["argv"]
    exe = Path(argv[0])
    assert exe.is_absolute() and exe.is_file() and os.access(exe, os.X_OK)
    assert exe.resolve() == BIN.resolve()
    assert argv[1:] == [
        "kernel", "-f", "{connection_file}", "--engines", "3", "--language", "python",
    ]

    assert png_size(kdir / "logo-32x32.png") == (32, 32)
    assert png_size(kdir / "logo-64x64.png") == (64, 64)
    svg = (kdir / "logo-svg.svg").read_text()
    assert svg.startswith("<svg") and "</svg>" in svg

    # the raw kernel.json is what Jupyter reported (Jupyter adds defaults)
    raw = json.loads((kdir / "kernel.json").read_text())
    assert {k: spec[k] for k in raw} == raw


def test_all_languages_user_and_sys_prefix(tmp_path, env):
    # --user: $JUPYTER_DATA_DIR
    r = parallax(env, "install", "--user", "--all")
    kernels = Path(env["JUPYTER_DATA_DIR"]) / "kernels"
    assert r.stdout.splitlines() == [
        f"Installed kernelspec parallax-python in {kernels / 'parallax-python'}",
        f"Installed kernelspec parallax-rust in {kernels / 'parallax-rust'}",
    ]
    specs = jupyter_specs(env)
    rust = specs["parallax-rust"]["spec"]
    assert rust["display_name"] == "Parallax Rust (4 engines)"
    assert rust["language"] == "rust"
    assert rust["argv"][-2:] == ["--language", "rust"]
    assert specs["parallax-python"]["spec"]["display_name"] == "Parallax Python (4 engines)"

    # the default location is --user too
    parallax(env, "install", "--engines", "2")
    assert jupyter_specs(env)["parallax-python"]["spec"]["argv"][5] == "2"

    # --sys-prefix: $VIRTUAL_ENV
    venv = tmp_path / "venv"
    e = dict(env, VIRTUAL_ENV=str(venv))
    parallax(e, "install", "--sys-prefix", "--name", "px-one", "--engines", "1",
             "--display-name", "One engine", "--env", "PATH=/opt/x/bin:${PATH}")
    spec = json.loads((venv / "share/jupyter/kernels/px-one/kernel.json").read_text())
    assert spec["display_name"] == "One engine"
    assert spec["env"] == {"PATH": "/opt/x/bin:${PATH}"}
    assert "px-one" in jupyter_specs(env, venv / "share" / "jupyter")

    # our own list finds every Parallax spec on Jupyter's path
    out = parallax(dict(e, JUPYTER_PATH=str(venv / "share/jupyter")), "list", "--json").stdout
    listed = json.loads(out)
    assert {"parallax-python", "parallax-rust", "px-one"} <= set(listed)

    # remove (default names) from --user
    r = parallax(env, "remove", "--user")
    assert "parallax-python" in r.stdout and "parallax-rust" in r.stdout
    assert not (kernels / "parallax-python").exists()
    assert not (kernels / "parallax-rust").exists()
    # (a Jupyter-wide install, e.g. `make run`'s in the venv, may still be listed)
    user_dirs = [
        s["resource_dir"] for s in jupyter_specs(env).values()
        if s["resource_dir"].startswith(str(kernels))
    ]
    assert user_dirs == []


def test_bad_arguments_are_refused(tmp_path, env):
    for args in (
        ["--name", "bad/name"],
        ["--engines", "0"],
        ["--env", "NOEQUALS"],
        ["--user", "--sys-prefix"],
        ["--all", "--name", "x"],
    ):
        r = subprocess.run(
            [str(BIN), "kernelspec", "install", "--prefix", str(tmp_path / "p"), *args],
            env=env, capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert r.returncode != 0, args
    assert not (tmp_path / "p" / "share" / "jupyter" / "kernels" / "bad").exists()
