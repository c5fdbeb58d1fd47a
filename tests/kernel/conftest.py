"""Fixtures for the Parallax Jupyter kernel's tests (conformance, notebooks,
JupyterLab in a browser).

* The kernelspec `parallax-python` (4 engines) is installed once per session
  into a temporary prefix with `parallax kernelspec install --prefix P
  --engines 4`, and JUPYTER_PATH points there while these tests run, so
  jupyter_client, nbclient and JupyterLab all find it.
* The venv's bin directory is first on PATH: engines run user code with the
  first `python3` on PATH, which must have IPython/matplotlib/numpy.
* Every test is checked for orphans: processes started under these tests
  carry a marker in their environment (PARALLAX_TEST_RUN), and after each
  test (and each module, after its kernels are shut down) no marked process
  may be left whose parent is gone — a kernel or engine outliving the
  process that started it is a bug. Leftovers are killed and reported.

PARALLAX_BIN selects the binary (default: target/release/parallax).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PARALLAX_BIN = Path(os.environ.get("PARALLAX_BIN") or REPO / "target/release/parallax").resolve()
KERNEL_NAME = "parallax-python"
N_ENGINES = 4
#: per-test time limit unless a test says otherwise (kernel start included)
DEFAULT_TIMEOUT = 180
#: how long leftover processes get to exit on their own after a test
ORPHAN_GRACE = 10.0
#: one marker per pytest run, inherited by everything the tests start
RUN_MARK = uuid.uuid4().hex
MARK_VAR = "PARALLAX_TEST_RUN"


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            here = Path(str(item.path)).resolve().is_relative_to(HERE)
        except (AttributeError, ValueError):
            here = False
        if here and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


def pytest_report_header(config):
    return [f"parallax kernel tests: {PARALLAX_BIN} (kernel {KERNEL_NAME}, {N_ENGINES} engines)"]


def _has_kernelspec_command() -> bool:
    try:
        r = subprocess.run(
            [str(PARALLAX_BIN), "kernelspec", "install", "--help"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.fixture(scope="session")
def parallax_bin() -> Path:
    if not PARALLAX_BIN.is_file():
        pytest.fail(f"{PARALLAX_BIN} missing: run `cargo build --release` (or set PARALLAX_BIN)")
    return PARALLAX_BIN


@pytest.fixture(scope="session")
def kernelspec_prefix(parallax_bin, tmp_path_factory) -> Path:
    """A prefix P with P/share/jupyter/kernels/parallax-python/kernel.json."""
    prefix = tmp_path_factory.mktemp("kernelspec-prefix")
    kdir = prefix / "share/jupyter/kernels" / KERNEL_NAME
    if _has_kernelspec_command():
        r = subprocess.run(
            [
                str(parallax_bin),
                "kernelspec",
                "install",
                "--prefix",
                str(prefix),
                "--engines",
                str(N_ENGINES),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"kernelspec install failed:\n{r.stdout}\n{r.stderr}"
    else:
        # fallback while `parallax kernelspec install` does not exist yet:
        # the kernel.json it is specified to write
        kdir.mkdir(parents=True)
        spec = {
            "argv": [
                str(parallax_bin),
                "kernel",
                "-f",
                "{connection_file}",
                "--engines",
                str(N_ENGINES),
                "--language",
                "python",
            ],
            "display_name": f"Parallax Python ({N_ENGINES} engines)",
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {"debugger": False},
        }
        (kdir / "kernel.json").write_text(json.dumps(spec, indent=1))
    spec = json.loads((kdir / "kernel.json").read_text())
    assert spec["argv"][1:3] == ["kernel", "-f"], spec
    return prefix


@pytest.fixture(scope="module", autouse=True)
def kernel_env(kernelspec_prefix):
    """JUPYTER_PATH → the test kernelspec, venv first on PATH, the orphan
    marker; restored after the module."""
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PATH", MARK_VAR)}
    jp = str(kernelspec_prefix / "share/jupyter")
    os.environ["JUPYTER_PATH"] = jp + (os.pathsep + saved["JUPYTER_PATH"] if saved["JUPYTER_PATH"] else "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + (saved["PATH"] or "")
    os.environ[MARK_VAR] = RUN_MARK
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def k4(kernel_env):
    """One Parallax Python kernel with 4 engines, shared by a module's tests."""
    from kernel_harness import Kernel

    k = Kernel(engines=4)
    try:
        yield k
    finally:
        k.stop()


# ---------------------------------------------------------------- orphans


#: the Rust kernel's tests: 2 engines keep its CPU on 2 cores bounded
RUST_KERNEL_NAME = "parallax-rust"
RUST_ENGINES = 2


@pytest.fixture(scope="module")
def rust_kernelspec(kernel_env, parallax_bin, tmp_path_factory):
    """parallax-rust (RUST_ENGINES engines) in a prefix of its own, first on
    JUPYTER_PATH for the module (the Rust notebook and conformance tests)."""
    prefix = tmp_path_factory.mktemp("rust-kernelspec")
    r = subprocess.run(
        [str(parallax_bin), "kernelspec", "install", "--prefix", str(prefix),
         "--language", "rust", "--engines", str(RUST_ENGINES)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, f"kernelspec install failed:\n{r.stdout}\n{r.stderr}"
    spec = json.loads((prefix / "share/jupyter/kernels" / RUST_KERNEL_NAME / "kernel.json").read_text())
    assert spec["language"] == "rust" and spec["argv"][-2:] == ["--language", "rust"], spec
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(prefix / "share/jupyter") + (os.pathsep + saved if saved else "")
    yield prefix
    if saved is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = saved


def _marked(p: psutil.Process) -> bool:
    try:
        return p.environ().get(MARK_VAR) == RUN_MARK
    except (psutil.Error, OSError):
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} ppid {p.ppid()} {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def _is_parallax(p: psutil.Process) -> bool:
    try:
        exe = p.exe()
    except (psutil.Error, OSError):
        return False
    exe = exe.removesuffix(" (deleted)")
    return exe == str(PARALLAX_BIN) or os.path.basename(exe) == "parallax"


def find_orphans() -> list[psutil.Process]:
    """Marked processes whose parent is gone: the parent is init (or a
    subreaper) — not this test process and not another marked process."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter():
        if p.pid == me or not _marked(p):
            continue
        try:
            parent = p.parent()
        except psutil.Error:
            continue  # exited meanwhile
        if parent is not None and (parent.pid == me or _marked(parent)):
            continue
        out.append(p)
    return out


def check_orphans(grace: float = ORPHAN_GRACE) -> list[str]:
    """Wait up to `grace` s for orphans to exit; kill and describe the rest."""
    deadline = time.monotonic() + grace
    orphans = find_orphans()
    while orphans and time.monotonic() < deadline:
        time.sleep(0.25)
        orphans = find_orphans()
    if not orphans:
        return []
    found = [("parallax " if _is_parallax(p) else "") + _describe(p) for p in orphans]
    for p in orphans:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(orphans, timeout=5)
    return found


@pytest.fixture(autouse=True)
def no_orphans_after_test(kernel_env):
    yield
    found = check_orphans()
    assert not found, "processes outlived their parent (killed now):\n" + "\n".join(found)


@pytest.fixture(scope="module", autouse=True)
def no_orphans_after_module(kernel_env):
    """Module-scoped kernels (jupyter_kernel_test's setUpClass, the executed
    notebook) are shut down after the last test's own check: check again."""
    yield
    found = check_orphans()
    assert not found, "processes outlived their parent (killed now):\n" + "\n".join(found)


# ---------------------------------------------------------------- helpers


def venv_bin(name: str) -> str:
    """A console script of this venv (jupyter, …)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)
