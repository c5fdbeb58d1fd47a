"""Parallax for Jupyter and ipyparallel, as installed from the wheel.

The wheel puts the ``parallax`` binary into the environment's scripts
directory (``bin/``) and the ``parallax-python`` kernelspec into its
``share/jupyter/kernels``. This package is the small Python side:

* ``python -m parallax_jupyter ARGS`` runs ``parallax ARGS`` with the
  engines on this environment's Python (what the kernelspec starts);
* :mod:`parallax_jupyter.launchers` — ipyparallel launchers, registered as
  ``controller="parallax"`` / ``engines="parallax"``.
"""

import os
import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

DIST = "parallax-jupyter"
EXE = "parallax.exe" if os.name == "nt" else "parallax"


def _installed_with_this_package():
    """The binary this distribution's RECORD lists (wherever pip put the
    scripts: a venv, --user, --prefix)."""
    try:
        files = metadata.distribution(DIST).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == EXE and f.parent.name in ("bin", "Scripts"):
            return Path(os.path.normpath(f.locate()))
    return None


def binary() -> str:
    """The path of the ``parallax`` executable installed with this package;
    ``PARALLAX_BIN`` overrides it."""
    override = os.environ.get("PARALLAX_BIN")
    candidates = [Path(override)] if override else []
    recorded = _installed_with_this_package()
    if recorded is not None:
        candidates.append(recorded)
    candidates.append(Path(sysconfig.get_path("scripts")) / EXE)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(EXE)
    if found:
        return found
    raise FileNotFoundError(
        f"the parallax binary was not found (looked at {', '.join(map(str, candidates))} "
        f"and PATH); reinstall {DIST} or set PARALLAX_BIN"
    )


def exec_parallax(args):
    """Replace this process by ``parallax ARGS`` (the kernel keeps this PID, so
    Jupyter's interrupt and shutdown signals reach it). Its engines run this
    environment's Python unless ``PARALLAX_PYTHON`` says otherwise."""
    exe = binary()
    os.environ.setdefault("PARALLAX_PYTHON", sys.executable)
    os.execv(exe, [exe, *args])
