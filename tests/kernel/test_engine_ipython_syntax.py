"""Issue 12: IPython syntax in engine cells of the Parallax Python kernel.

A `%magic`/`%%magic` at column 0 that is not a Parallax magic, `?obj`,
`obj??` and `!cmd` go to the target engines' IPython, as ipyparallel's
`%autopx` sends them; Parallax magics keep priority and a slip of one is
still a UsageError naming the near magic (test_kernel_behaviour's
BAD_CELLS). Real kernel under jupyter_client, real hub and engines.
"""

from __future__ import annotations

import re

import pytest

from kernel_harness import Kernel, strip_ansi

pytestmark = pytest.mark.timeout(120)

ENGINES = [0, 1, 2, 3]


def ok(k: Kernel, code: str, timeout: float = 60):
    r = k.execute(code, timeout=timeout)
    assert r.status == "ok", f"{code!r} failed:\n{r.describe()}"
    return r


def test_timeit_and_time_run_on_every_engine(k4):
    out = ok(k4, "%timeit -n 3 -r 2 sum(range(100))").stdout_by_engine()
    assert sorted(out) == ENGINES, out
    for e, text in out.items():
        assert re.search(r"per loop \(mean ± std\. dev\. of 2 runs, 3 loops each\)", text), (e, text)
    out = ok(k4, "%%time\nengine_time_marker = sum(range(10))").stdout_by_engine()
    assert all("Wall time" in t for t in out.values()) and sorted(out) == ENGINES, out
    # the cell body ran in the engine's namespace
    assert ok(k4, "print(engine_time_marker)").stdout_by_engine() == {e: "45\n" for e in ENGINES}


def test_bash_cell_and_shell_escape(k4):
    out = ok(k4, "%%bash\necho from-bash-$PARALLAX_ENGINE_ID").stdout_by_engine()
    assert out == {e: f"from-bash-{e}\n" for e in ENGINES}, out
    # IPython runs `!cmd` on a pty (as under ipykernel), hence the \r\n
    out = ok(k4, "!echo bang-$PARALLAX_ENGINE_ID").stdout_by_engine()
    assert out == {e: f"bang-{e}\r\n" for e in ENGINES}, out
    out = ok(k4, "files = !echo captured\nprint(files)").stdout_by_engine()
    assert out == {e: "['captured']\n" for e in ENGINES}, out


def test_env_magic_then_code_in_one_cell(k4):
    cell = "%env PARALLAX_SYNTAX_T=42\nimport os\nprint(os.environ['PARALLAX_SYNTAX_T'])"
    out = ok(k4, cell).stdout_by_engine()
    assert out == {e: "env: PARALLAX_SYNTAX_T=42\n42\n" for e in ENGINES}, out


def test_question_mark_help_on_the_engines(k4):
    r = ok(k4, "?len")
    # all four engines agree: their answer is shown once, as [stdout:0-3]
    (final,) = [strip_ansi(t) for t in r.final_texts()]
    assert final.startswith("[stdout:0-3] "), r.describe()
    assert final.count("Return the number of items in a container") == 1, final
    # engines that disagree are shown apart, grouped
    ok(k4, "import os\nhelp_val = int(os.environ['PARALLAX_ENGINE_ID']) % 2")
    (final,) = [strip_ansi(t) for t in ok(k4, "help_val?").final_texts()]
    assert "[stdout:0,2] " in final and "[stdout:1,3] " in final, final
    assert "String form: 0" in final and "String form: 1" in final, final
    r = ok(k4, "help_target = 3\nhelp_target?")
    assert "int" in r.describe(), r.describe()


def test_unknown_engine_magic_is_the_engines_usage_error(k4):
    r = k4.execute("%nosuchmagic_xyz\nbad_marker = 1", timeout=60)
    assert r.status == "error", r.describe()
    text = r.describe()
    assert "nosuchmagic_xyz" in text and "UsageError" in text, text
    out = ok(k4, 'print("bad_marker" in globals())').stdout_by_engine()
    assert out == {e: "False\n" for e in ENGINES}, out


def test_magic_with_autopx_off_runs_locally(k4):
    ok(k4, "%autopx")
    try:
        # unmarked cells go to the kernel's local interpreter (test_local.py)
        r = ok(k4, "%timeit -n 1 -r 1 1")
        assert "per loop" in r.stdout() and "[stdout:" not in r.stdout(), r.describe()
        out = ok(k4, "%px %timeit -n 1 -r 1 1").stdout_by_engine()
        assert sorted(out) == ENGINES, out
    finally:
        ok(k4, "%autopx")
