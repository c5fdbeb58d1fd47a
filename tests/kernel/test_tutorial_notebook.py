"""Issue 12: notebooks/tutorial.ipynb — the seed tutorial (ipyparallel's
2014 "Overview and getting started") run as written in Python 3 on the
Parallax Python kernel: a Client in the notebook's own namespace, apply on
one engine and on all, map on a load-balanced view, %%px, %%px --local,
push/pull/scatter/gather and a local matplotlib plot of gathered results.
Executed headless by nbclient (4 engines), outputs checked as data.
"""

from __future__ import annotations

import ast
import base64

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import KERNEL_NAME, N_ENGINES, REPO
from kernel_harness import cell, errors, text_of

NOTEBOOK = REPO / "notebooks/tutorial.ipynb"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs, "the committed notebook must not carry outputs"
    workdir = tmp_path_factory.mktemp("tutorial")
    client = NotebookClient(
        nb,
        timeout=60,
        startup_timeout=60,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError on an unexpected error
    return nb


def value(c):
    """The cell's own Out[n] value (a local cell's execute_result), parsed."""
    (r,) = [o for o in c.outputs if o.output_type == "execute_result"]
    assert r.execution_count == c.execution_count
    return ast.literal_eval(text_of(r))


def test_no_cell_failed(executed):
    for c in executed.cells:
        if c.cell_type == "code":
            assert not errors(c), (c.source, c.outputs)


def test_client_and_apply(executed):
    assert value(cell(executed, "%%local\nrc.ids")) == list(range(N_ENGINES))
    assert value(cell(executed, "%%local\nmul(5, 6)")) == 30
    assert value(cell(executed, "%%local\nsummary()['pid'] ==")) is True
    assert value(cell(executed, "%%local\nrc[0].apply(mul")) == 30
    assert value(cell(executed, "%%local\nrc[0].apply(summary)")) is True
    assert value(cell(executed, "%%local\nrc[:].apply(mul")) == [30] * N_ENGINES
    assert value(cell(executed, "%%local\nlen({s['pid']")) == N_ENGINES


def test_map_local_and_load_balanced(executed):
    want = [a * b for a, b in zip(range(1, 10), range(2, 11))]
    assert value(cell(executed, "%%local\nlist(map(")) == want
    assert value(cell(executed, "%%local\nview = rc.load_balanced_view()")) == want


def test_px_and_px_local(executed):
    c = cell(executed, "%%px\nimport os, socket")
    text = "".join(text_of(o) for o in c.outputs)
    for e in range(N_ENGINES):
        assert f"[stdout:{e}] True\nTrue" in text, c.outputs
    c = cell(executed, "%%px --local")
    assert not errors(c), c.outputs


def test_values_move_and_come_home(executed):
    assert value(cell(executed, "%%local\ndview.block = True")) == [10] * N_ENGINES
    c = cell(executed, "local_part = chunk * scale")
    sums = sorted(int(text_of(o).split(": ", 1)[1]) for o in c.outputs if text_of(o).startswith("Out["))
    per_engine = [sum(range(16)[i * 4 : i * 4 + 4]) * 10 for i in range(N_ENGINES)]
    assert sums == sorted(per_engine), c.outputs
    gathered = cell(executed, "%%local\ngathered = dview.gather")
    assert [int(x) for x in value(gathered)] == [x * 10 for x in range(16)]
    ranks = cell(executed, "%%local\ndview.pull('rank')")
    assert value(ranks) == list(range(N_ENGINES))


def test_local_plot_of_gathered_results(executed):
    c = cell(executed, "%%local\n%matplotlib inline")
    pngs = [o for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 1, c.outputs
    assert base64.b64decode(pngs[0].data["image/png"]).startswith(b"\x89PNG")
    # a local display: no engine prefix, no engine metadata
    assert "engine" not in pngs[0].get("metadata", {}), pngs[0]
    assert not any("[output:" in text_of(o) for o in c.outputs), c.outputs
