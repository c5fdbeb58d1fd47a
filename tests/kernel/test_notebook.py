"""notebooks/overview.ipynb executed headless (nbclient) with the Parallax
kernel (4 engines), its outputs checked as data — what a saved notebook
holds after a run in JupyterLab.

nbclient applies update_display_data to the outputs with the same
display_id, so each engine's stdout ends up as one display_data output
`[stdout:N] <all its text>`.
"""

from __future__ import annotations

import ast
import base64
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import KERNEL_NAME, N_ENGINES, REPO
from kernel_harness import cell, errors, results, stdout_displays, text_of

NOTEBOOK = REPO / "notebooks/overview.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ENGINES = set(range(N_ENGINES))

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs, "the committed notebook must not carry outputs"
    workdir = tmp_path_factory.mktemp("overview")
    client = NotebookClient(
        nb,
        timeout=60,
        startup_timeout=60,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError on an unexpected error
    nbformat.write(nb, workdir / "overview.ipynb")
    return nb


def stdout_any(c) -> dict[int, str]:
    """Like stdout_displays, but also accepts ipyparallel's non-streaming
    form, a stdout stream `[stdout:N] text` (what stock %pxresult prints
    for output that finished before it was asked for)."""
    out = stdout_displays(c)
    stream = "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
    parts = re.split(r"\[stdout:(\d+)\] ?", ANSI.sub("", stream))
    for eid, text in zip(parts[1::2], parts[2::2]):
        eid = int(eid)
        assert eid not in out, f"engine {eid}'s stdout shown twice: {c.outputs}"
        out[eid] = text.removeprefix("\n")
    return out


def test_engines_magic(executed):
    c = cell(executed, "%engines")
    assert c.outputs, "%engines printed nothing"
    assert not errors(c), c.outputs


def test_engine_ids(executed):
    c = cell(executed, "import os\nprint(os.environ[")
    assert stdout_displays(c) == {e: f"{e}\n" for e in ENGINES}, c.outputs
    assert not errors(c)


def test_function_on_every_engine(executed):
    c = cell(executed, "rank = int(")
    assert results(c) == {e: str(5 * (e + 1)) for e in ENGINES}, c.outputs
    raw = [o.data["text/plain"] for o in c.outputs if "Out[" in text_of(o)]
    assert all(r.startswith("\x1b[0;31mOut[") for r in raw), raw


def test_pid_and_hostname(executed):
    c = cell(executed, "summary()")
    infos = {e: ast.literal_eval(r) for e, r in results(c).items()}
    assert set(infos) == ENGINES, c.outputs
    assert all(info["engine"] == e for e, info in infos.items()), infos
    assert len({info["pid"] for info in infos.values()}) == N_ENGINES, "engines share a pid"
    assert len({info["hostname"] for info in infos.values()}) == 1


def test_targets_slice(executed):
    c = cell(executed, "%%px --targets ::2")
    assert stdout_displays(c) == {0: "even engine 0\n", 2: "even engine 2\n"}, c.outputs
    assert not results(c) and not errors(c)


def test_targets_one(executed):
    c = cell(executed, "%%px --targets 1")
    assert results(c) == {1: "42"}, c.outputs
    assert not stdout_displays(c)


def test_px_line_magic(executed):
    assert not errors(cell(executed, "%px squares"))
    c = cell(executed, "squares")
    assert results(c) == {e: repr([i * i for i in range(e + 1)]) for e in ENGINES}, c.outputs


def test_noblock_and_pxresult(executed):
    c = cell(executed, "%%px --noblock")
    assert not errors(c), c.outputs
    assert not stdout_displays(c), "--noblock waited for the engines' output"
    r = cell(executed, "%pxresult")
    assert stdout_any(r) == {e: f"slept on engine {e}\n" for e in ENGINES}, r.outputs
    assert results(r) == {e: str(e * 10) for e in ENGINES}, r.outputs


def test_error_on_one_engine(executed):
    c = cell(executed, "%%px\nif int(")
    assert "raises-exception" in c.metadata.tags
    stderr = "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stderr")
    stderr = ANSI.sub("", stderr)
    assert "[1:execute]" in stderr, c.outputs
    assert "ZeroDivisionError" in stderr, stderr
    for e in ENGINES - {1}:
        assert f"[{e}:execute]" not in stderr
    assert stdout_displays(c) == {e: f"no error on engine {e}\n" for e in ENGINES - {1}}, c.outputs
    errs = errors(c)
    assert len(errs) == 1 and c.outputs[-1] is errs[0], c.outputs
    assert errs[0].ename == "AlreadyDisplayedError"
    assert errs[0].evalue == "1 errors"


def test_plot_per_engine(executed):
    c = cell(executed, "import matplotlib.pyplot as plt")
    assert not errors(c), c.outputs
    labels = []
    for i, o in enumerate(c.outputs):
        if o.output_type == "display_data" and "image/png" in o.data:
            png = base64.b64decode(o.data["image/png"])
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
            assert i > 0, "image without an [output:N] header"
            m = re.fullmatch(r"\[output:(\d+)\]\s*", text_of(c.outputs[i - 1]))
            assert m, f"image preceded by {c.outputs[i - 1]!r}, not [output:N]"
            labels.append(int(m.group(1)))
    assert sorted(labels) == sorted(ENGINES), c.outputs
