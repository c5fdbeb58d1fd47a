"""notebooks/rust-overview.ipynb executed headless (nbclient) with the
Parallax Rust kernel (`parallax-rust`, 2 engines running evcxr), its outputs
checked as data — what a saved notebook holds after a run in JupyterLab.

The kernelspec is installed here with `parallax kernelspec install --prefix P
--language rust --engines 2` (conftest.py installs only parallax-python) and
P is put first on JUPYTER_PATH for this module. The notebook is run once
(module fixture); each test checks one cell's outputs.

nbclient applies update_display_data to the outputs with the same
display_id, so each engine's stdout ends up as one display_data output
`[stdout:N] <all its text>`.
"""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, RUST_ENGINES as N_ENGINES, RUST_KERNEL_NAME as KERNEL_NAME
from kernel_harness import cell, engine_list, errors, results, stdout_displays, text_of

NOTEBOOK = REPO / "notebooks/rust-overview.ipynb"
ENGINES = set(range(N_ENGINES))
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: the rank split's N
N = 1000

# the first Rust cell warms evcxr on every engine; `:dep` may download a crate
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def executed(rust_kernelspec, tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == KERNEL_NAME
    assert nb.metadata.kernelspec.language == "rust"
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, (
                "the committed notebook must not carry outputs"
            )
    workdir = tmp_path_factory.mktemp("rust-overview")
    client = NotebookClient(
        nb,
        timeout=120,
        startup_timeout=60,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError on an untagged error
    nbformat.write(nb, workdir / "rust-overview.ipynb")
    return nb


# ---------------------------------------------------------------- helpers


def stderr_stream(c) -> str:
    return "".join(text_of(o) for o in c.outputs if o.output_type == "stream" and o.name == "stderr")


def block(e: int) -> tuple[int, int, int]:
    """(lo, hi, sum) of engine e's share of 1..=N."""
    lo, hi = e * N // N_ENGINES + 1, (e + 1) * N // N_ENGINES
    return lo, hi, sum(range(lo, hi + 1))


def assert_clean(c):
    """No error and no engine stderr in a cell that should just work."""
    assert not errors(c), c.outputs
    assert not stderr_stream(c), c.outputs
    assert not stdout_displays(c, "stderr"), c.outputs


# ---------------------------------------------------------------- tests


def test_engines_magic(executed):
    c = cell(executed, "%engines")
    text = "".join(text_of(o) for o in c.outputs)
    rows = [line for line in text.splitlines() if re.match(r"\d+\s+[0-9a-f]{8}\s", line)]
    assert {int(r.split()[0]) for r in rows} == ENGINES, text
    assert f"{N_ENGINES} engines registered" in text, text
    assert not errors(c)


def test_rank_split(executed):
    c = cell(executed, "let id: u64 = std::env::var(")
    expected = {}
    for e in ENGINES:
        lo, hi, part = block(e)
        expected[e] = f"engine {e} of {N_ENGINES}: sum of {lo}..={hi} = {part}\n"
    assert stdout_displays(c) == expected, c.outputs
    assert sum(block(e)[2] for e in ENGINES) == N * (N + 1) // 2
    assert not results(c), "a cell ending in `;` has no value"
    assert_clean(c)


def test_dep_crate(executed):
    c = cell(executed, ':dep itoa = "1"')
    assert results(c) == {e: f'"{block(e)[2]}"' for e in ENGINES}, c.outputs
    assert_clean(c)


def test_struct_defined_then_used(executed):
    definition = cell(executed, "#[derive(Debug)]\nstruct Particle")
    assert not definition.outputs, definition.outputs
    c = cell(executed, "let mut p = Particle {")
    assert results(c) == {
        e: f"Particle {{ engine: {e}, x: {5.0 * (e + 1)}, v: {float(e + 1)} }}" for e in ENGINES
    }, c.outputs
    raw = [o.data["text/plain"] for o in c.outputs if "Out[" in text_of(o)]
    assert all(r.startswith("\x1b[0;31mOut[") for r in raw), raw
    assert_clean(c)


def test_compile_error_is_shown_once_for_all_engines(executed):
    c = cell(executed, "let label: String = part;")
    assert "raises-exception" in c.metadata.tags
    stderr = stderr_stream(c)
    header = f"[{engine_list(ENGINES)}:execute] CompileError on all {N_ENGINES} engines\n"
    assert stderr.startswith(header), stderr
    assert stderr.count("mismatched types") == 1, stderr
    assert "expected `String`, found `u64`" in stderr, stderr
    for e in ENGINES:
        assert f"[{e}:execute]" not in stderr, stderr
    errs = errors(c)
    assert len(errs) == 1 and c.outputs[-1] is errs[0], c.outputs
    assert (errs[0].ename, errs[0].evalue) == ("AlreadyDisplayedError", f"{N_ENGINES} errors")
    assert not stdout_displays(c) and not results(c), "a cell that does not compile runs nowhere"


def test_panic_on_engine_one_only(executed):
    c = cell(executed, "%%px\nlet checked = part * 2;")
    assert "raises-exception" in c.metadata.tags
    stderr = stderr_stream(c)
    assert "[1:execute]" in stderr, c.outputs
    assert "panicked at" in stderr and "engine 1 refuses to go on" in stderr, stderr
    assert "(variables defined by this cell were dropped; earlier ones are kept)" in stderr
    for e in ENGINES - {1}:
        assert f"[{e}:execute]" not in stderr, stderr
    assert stdout_displays(c) == {e: f"engine {e}: checked = {2 * block(e)[2]}\n" for e in ENGINES - {1}}, (
        c.outputs
    )
    # the panic message is the error, not engine stderr as well
    assert stdout_displays(c, "stderr") == {}, c.outputs
    errs = errors(c)
    assert len(errs) == 1 and c.outputs[-1] is errs[0], c.outputs
    assert (errs[0].ename, errs[0].evalue) == ("AlreadyDisplayedError", "1 errors")


def test_engines_still_work_after_the_panic(executed):
    c = cell(executed, 'println!("engine {id} still has')
    assert stdout_displays(c) == {
        e: f"engine {e} still has part = {block(e)[2]} and p.x = {5 * (e + 1)}\n" for e in ENGINES
    }, c.outputs
    assert_clean(c)


def test_html_display_per_engine(executed):
    c = cell(executed, "let html = format!(")
    labels = []
    for i, o in enumerate(c.outputs):
        if o.output_type == "display_data" and "text/html" in o.data:
            assert i > 0, "HTML without an [output:N] header"
            m = re.fullmatch(r"\[output:(\d+)\]\s*", text_of(c.outputs[i - 1]))
            assert m, f"HTML preceded by {c.outputs[i - 1]!r}, not [output:N]"
            e = int(m.group(1))
            labels.append(e)
            assert o.metadata.get("engine") == e, o
            lo, hi, part = block(e)
            html = o.data["text/html"]
            assert html.startswith("<table>") and html.endswith("</table>"), html
            assert f"<tr><td>{e}</td><td>{lo}..={hi}</td><td>{part}</td></tr>" in html, html
    assert sorted(labels) == sorted(ENGINES), c.outputs
    assert not stdout_displays(c), "the EVCXR_BEGIN_CONTENT block leaked into stdout"
    assert_clean(c)
