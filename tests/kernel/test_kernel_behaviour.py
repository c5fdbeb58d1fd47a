"""Behaviour of the Parallax kernel, as data: the iopub messages and replies
a frontend sees for `%%px` output formats, magics, interrupts, engine death,
kernel restart/shutdown/kill, `%cluster`, a busy kernel's control and
heartbeat channels, and a forged message.

The expected formats are ipyparallel's `%%px` in a notebook:

* engine stdout: one display_data per engine, text/plain "[stdout:N] …",
  transient display_id "{engine request msg_id}-stdout"; later chunks as
  update_display_data carrying the whole text so far;
* results: display_data "\\x1b[0;31mOut[N:C]: \\x1b[0m<repr>" (C = that
  engine's execution count; a multi-line repr starts on a new line);
* rich output: display_data "[output:N]", then the engine's display_data
  with metadata.engine = N;
* errors: stderr stream "[N:execute]\\n<traceback>\\n" per failing engine
  (after the fourth: "[N:execute] Ename: evalue\\n"), and the cell's reply is
  an error AlreadyDisplayedError "K errors";
* --no-stream: stream messages "[stdout:N] \\n<text>" grouped by
  --group-outputs, errors in the reply as a CompositeError.

Arrival order across engines varies, so multi-engine checks compare sets or
per-engine maps; within one engine the order is checked.

Kernels: one module-scoped kernel with 4 engines (`k4`) for everything that
leaves no lasting trace (tests that change settings restore them), and
function-scoped kernels for what changes the engine set or kills processes.
Every wait has a timeout; every process a kernel started is reaped by
`Kernel.stop` and checked by conftest's orphan check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import time
import uuid

import psutil
import pytest
import zmq

from kernel_harness import NORMAL, RED, Kernel, Result, gone, wait_for, wait_gone

pytestmark = pytest.mark.timeout(60)

ENGINES = [0, 1, 2, 3]
#: a cell whose reply should come back at once
QUICK = 30


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def fresh4(kernel_env):
    """A kernel of its own (4 engines) for tests that change the engine set."""
    k = Kernel(engines=4)
    try:
        yield k
    finally:
        k.stop()


# ---------------------------------------------------------------- helpers


def ok(k: Kernel, code: str, timeout: float = QUICK) -> Result:
    r = k.execute(code, timeout=timeout)
    assert r.status == "ok", f"{code!r} failed:\n{r.describe()}"
    # output of an earlier cell must not trickle in after that cell's idle
    late = [
        m
        for m in r.strays
        if m["msg_type"] != "status" and m["parent_header"].get("msg_type") == "execute_request"
    ]
    assert not late, f"while running {code!r}, output of other cells arrived:\n{late}"
    return r


def error(k: Kernel, code: str, timeout: float = QUICK) -> Result:
    r = k.execute(code, timeout=timeout)
    assert r.status == "error", f"{code!r} should fail:\n{r.describe()}"
    # the error is also published on iopub, with the reply's name and value
    errs = r.of_type("error")
    assert [(e["content"]["ename"], e["content"]["evalue"]) for e in errs] == [
        (r.content["ename"], r.content["evalue"])
    ], r.describe()
    return r


def stdout_map(k: Kernel, code: str) -> dict[int, str]:
    """Run `code`; engine id → its final stdout (the "[stdout:N] " prefix removed)."""
    return ok(k, code).stdout_by_engine()


def out_prefix(eid: int, count: int) -> str:
    return f"{RED}Out[{eid}:{count}]: {NORMAL}"


def normalize_counts(s: str) -> str:
    return re.sub(r"Out\[(\d+):\d+\]", r"Out[\1:C]", s)


def render(r: Result) -> list[tuple]:
    """The outputs of a cell as comparable tuples, execution counts as C."""
    out = []
    for m in r.outputs():
        c = m["content"]
        t = m["msg_type"]
        if t == "stream":
            out.append(("stream", c["name"], c["text"]))
        elif t in ("display_data", "update_display_data"):
            data = c["data"]
            text = data.get("text/html") or data.get("text/plain", "")
            out.append((t, normalize_counts(text), c["metadata"].get("engine")))
        else:
            out.append((t,))
    return out


def engines_table(k: Kernel) -> dict[int, dict]:
    """`%engines` parsed: id → {uuid, status, queue, tasks, completed, pid}."""
    r = ok(k, "%engines")
    text = r.stdout()
    lines = text.splitlines()
    assert re.match(r"ID\s+UUID\s+STATUS\s+QUEUE\s+TASKS\s+COMPLETED\s+PID$", lines[0]), text
    rows = {}
    for line in lines[1:]:
        m = re.match(r"(\d+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+|-)$", line)
        if m:
            rows[int(m[1])] = dict(
                uuid=m[2],
                status=m[3],
                queue=int(m[4]),
                tasks=int(m[5]),
                completed=int(m[6]),
                pid=int(m[7]) if m[7] != "-" else None,
            )
    return rows


def python_pids(k: Kernel) -> dict[int, int]:
    """engine id → pid of the Python process running its code."""
    got = stdout_map(k, 'import os; print(os.getpid(), os.getppid())')
    return {eid: int(t.split()[0]) for eid, t in got.items()}


# ============================================================ 1. output formats


@pytest.mark.timeout(30)
def test_stdout_is_one_display_per_engine_updated_in_place(k4):
    r = ok(k4, 'print("a", flush=True); import time; time.sleep(0.5); print("b")')
    assert r.of_type("stream") == [], r.describe()
    first: dict[int, str] = {}  # engine → display id of its first display
    for m in r.of_type("display_data", "update_display_data"):
        text = m["content"]["data"]["text/plain"]
        did = m["content"]["transient"]["display_id"]
        if did.endswith("-progress"):
            continue  # the progress bar of a cell slower than 2 s (a loaded machine)
        eid = int(re.match(r"\[stdout:(\d+)\] ", text)[1])
        if m["msg_type"] == "display_data":
            assert eid not in first, f"two displays for engine {eid}:\n{r.describe()}"
            first[eid] = did
            assert text == f"[stdout:{eid}] a\n", r.describe()
        else:
            assert first.get(eid) == did, f"update before/unlike the display of engine {eid}:\n{r.describe()}"
            assert text == f"[stdout:{eid}] a\nb\n", r.describe()
    assert sorted(first) == ENGINES
    ids = list(first.values())
    assert len(set(ids)) == 4 and all(i.endswith("-stdout") for i in ids), ids
    # an engine's request msg_id, not the cell's
    assert not any(i.startswith(r.msg_id) for i in ids), ids
    updates = [m for m in r.of_type("update_display_data")
               if not m["content"]["transient"]["display_id"].endswith("-progress")]
    assert len(updates) == 4, "the second chunk should arrive as an update:\n" + r.describe()
    assert r.stdout_by_engine() == {e: "a\nb\n" for e in ENGINES}


def test_engine_environment(k4):
    got = stdout_map(
        k4, 'import os; print(os.environ["PARALLAX_ENGINE_ID"], os.environ["PARALLAX_N_ENGINES"])'
    )
    assert got == {e: f"{e} 4\n" for e in ENGINES}


def test_results_have_prefix_and_engine_execution_count(k4):
    # while a cell runs, the engine's shell knows its own execution count
    # (once the shell exists: see test_engine_shell_count_on_first_use)
    ok(k4, "get_ipython();")
    r = ok(k4, "get_ipython().execution_count")
    counts = {}
    for t in r.plain("display_data"):
        m = re.fullmatch(re.escape(RED) + r"Out\[(\d+):(\d+)\]: " + re.escape(NORMAL) + r"(\d+)", t)
        assert m, f"not an Out[N:C] result: {t!r}"
        eid, c, value = int(m[1]), int(m[2]), int(m[3])
        assert c == value, f"Out[{eid}:{c}] but the engine's count is {value}"
        counts[eid] = c
    assert sorted(counts) == ENGINES
    assert r.of_type("execute_result") == [], "the %px cell itself has no value"
    # the next cell: each engine's count goes up by one
    r = ok(k4, "6 * 7")
    assert sorted(r.plain("display_data")) == sorted(out_prefix(e, counts[e] + 1) + "42" for e in ENGINES)


def test_engine_shell_count_on_first_use(kernel_env):
    """The IPython shell an engine creates on the first get_ipython() has
    the execution count of the cell that is running."""
    with Kernel(engines=1) as k:
        ok(k, "x = 1")
        ok(k, "y = 2")
        r = ok(k, "get_ipython().execution_count")
        assert r.plain("display_data") == [out_prefix(0, 3) + "3"], r.describe()


def test_multiline_repr_starts_on_its_own_line(k4):
    r = ok(k4, 'class R:\n    def __repr__(self):\n        return "line1\\nline2"\nR()')
    texts = [normalize_counts(t) for t in r.plain("display_data")]
    assert sorted(texts) == sorted(f"{RED}Out[{e}:C]: {NORMAL}\nline1\nline2" for e in ENGINES)


def test_rich_display_is_labelled_with_its_engine(k4):
    r = ok(k4, 'from IPython.display import HTML, display\ndisplay(HTML("<b>hi</b>"))')
    outs = r.outputs()
    htmls = [i for i, m in enumerate(outs) if "text/html" in m["content"].get("data", {})]
    assert len(htmls) == 4, r.describe()
    seen = set()
    for i in htmls:
        m = outs[i]
        eid = m["content"]["metadata"]["engine"]
        assert m["msg_type"] == "display_data" and m["content"]["data"]["text/html"] == "<b>hi</b>"
        label = outs[i - 1]
        assert (label["msg_type"], label["content"]["data"]) == (
            "display_data",
            {"text/plain": f"[output:{eid}]"},
        ), f"no [output:{eid}] before engine {eid}'s display:\n{r.describe()}"
        seen.add(eid)
    assert sorted(seen) == ENGINES
    assert len(outs) == 8, r.describe()


NO_STREAM_CELL = (
    "%%px --no-stream --group-outputs {g}\n"
    "import sys\n"
    "from IPython.display import HTML, display\n"
    'print("a")\n'
    'print("e", file=sys.stderr)\n'
    'display(HTML("<i>1</i>"))\n'
    'display(HTML("<i>2</i>"))\n'
    '"r"'
)


def _expected_no_stream(group: str) -> list[tuple]:
    def res(e):
        return ("display_data", f"{RED}Out[{e}:C]: {NORMAL}'r'", None)

    def label(e):
        return ("display_data", f"[output:{e}]", None)

    def html(e, i):
        return ("display_data", f"<i>{i}</i>", e)

    if group == "engine":
        exp = []
        for e in ENGINES:
            exp += [
                ("stream", "stdout", f"[stdout:{e}] \na\n"),
                ("stream", "stderr", f"[stderr:{e}] \ne\n"),
                label(e),
                html(e, 1),
                html(e, 2),
                res(e),
            ]
        return exp
    exp = [("stream", "stdout", f"[stdout:{e}] \na\n") for e in ENGINES]
    exp += [("stream", "stderr", f"[stderr:{e}] \ne\n") for e in ENGINES]
    if group == "type":
        for e in ENGINES:
            exp += [label(e), html(e, 1), html(e, 2)]
    else:  # order: the i-th display of every engine together
        for i in (1, 2):
            for e in ENGINES:
                exp += [label(e), html(e, i)]
    exp += [res(e) for e in ENGINES]
    return exp


@pytest.mark.parametrize("group", ["type", "engine", "order"])
def test_no_stream_group_outputs(k4, group):
    r = ok(k4, NO_STREAM_CELL.format(g=group))
    assert render(r) == _expected_no_stream(group), r.describe()


def test_no_stream_single_target_has_no_prefix(k4):
    r = ok(k4, '%%px --no-stream --targets 1\nprint("single")')
    assert render(r) == [("stream", "stdout", "single\n")]
    r = ok(k4, '%%px --no-stream --targets [1]\nprint("list")')
    assert render(r) == [("stream", "stdout", "[stdout:1] \nlist\n")]


def test_progress_display(k4):
    r = ok(k4, "%%px --progress-after 0\nimport time\ntime.sleep(0.6)")
    bars = [
        m for m in r.of_type("display_data", "update_display_data")
        if m["content"]["transient"].get("display_id", "").endswith("-progress")
    ]
    assert bars and bars[0]["msg_type"] == "display_data", r.describe()
    assert re.match(r"%px:\s+0%\|\s+\| 0/4 \[", bars[0]["content"]["data"]["text/plain"]), r.describe()
    assert len({m["content"]["transient"]["display_id"] for m in bars}) == 1
    r = ok(k4, "%%px --progress-after -1\nimport time\ntime.sleep(0.3)")
    assert r.outputs() == [], r.describe()


def test_one_engine_error_is_streamed_and_the_others_output_arrives(k4):
    r = error(
        k4,
        'import os\nif os.environ["PARALLAX_ENGINE_ID"] == "1":\n    1/0\nprint("fine")',
    )
    assert (r.content["ename"], r.content["evalue"]) == ("AlreadyDisplayedError", "1 errors")
    errs = r.streams("stderr")
    assert len(errs) == 1, r.describe()
    assert errs[0].startswith("[1:execute]\nTraceback (most recent call last):\n"), errs[0]
    assert errs[0].endswith("ZeroDivisionError: division by zero\n"), errs[0]
    assert r.streams("stdout") == []
    assert r.stdout_by_engine() == {0: "fine\n", 2: "fine\n", 3: "fine\n"}


@pytest.mark.timeout(60)
def test_six_engine_errors_collapse_after_four(kernel_env):
    with Kernel(engines=6) as k:
        r = error(k, "1/0")
        assert (r.content["ename"], r.content["evalue"]) == ("AlreadyDisplayedError", "6 errors")
        errs = r.streams("stderr")
        assert len(errs) == 6, r.describe()
        full, short = errs[:4], errs[4:]
        eids = []
        for t in full:
            m = re.match(r"\[(\d+):execute\]\nTraceback \(most recent call last\):\n", t)
            assert m and t.endswith("\nZeroDivisionError: division by zero\n"), t
            eids.append(int(m[1]))
        for t in short:
            m = re.fullmatch(r"\[(\d+):execute\] ZeroDivisionError: division by zero\n", t)
            assert m, f"after four full tracebacks, one line per error: {t!r}"
            eids.append(int(m[1]))
        assert sorted(eids) == list(range(6))


def test_no_stream_errors_are_a_composite_error(k4):
    r = error(
        k4,
        "%%px --no-stream\n"
        "import os\n"
        'eid = os.environ["PARALLAX_ENGINE_ID"]\n'
        'if eid in ("1", "3"):\n'
        '    raise ValueError("bad " + eid)\n'
        'print("fine")',
    )
    c = r.content
    assert c["ename"] == "CompositeError"
    assert c["evalue"].startswith("one or more exceptions raised in: %px\n"), c["evalue"]
    assert c["evalue"].splitlines()[1:] == [
        "[1:execute]ValueError: bad 1",
        "[3:execute]ValueError: bad 3",
    ], c["evalue"]
    tb = "\n".join(c["traceback"])
    assert "[1:execute]:" in tb and "[3:execute]:" in tb and "ValueError: bad 3" in tb, tb
    # not streamed: the other engines' output is grouped, no [N:execute] on stderr
    assert r.streams("stderr") == []
    assert r.streams("stdout") == ["[stdout:0] \nfine\n", "[stdout:2] \nfine\n"], r.describe()


# ============================================================ 2. magics


@pytest.mark.parametrize(
    "spec, engines",
    [
        ("::2", [0, 2]),
        ("1", [1]),
        ("[0,3]", [0, 3]),
        ("0,3", [0, 3]),
        ("-1", [3]),
        ("1:3", [1, 2]),
        ("all", ENGINES),
    ],
)
def test_targets(k4, spec, engines):
    got = stdout_map(k4, f'%%px --targets {spec}\nprint("t")')
    assert got == {e: "t\n" for e in engines}


def test_px_line_magic(k4):
    assert stdout_map(k4, '%px print("line")') == {e: "line\n" for e in ENGINES}


def test_pxconfig_targets_apply_to_plain_cells(k4):
    try:
        r = ok(k4, "%pxconfig --targets 1")
        assert r.outputs() == []
        assert stdout_map(k4, 'print("only one")') == {1: "only one\n"}
        assert "targets: 1\n" in ok(k4, "%pxconfig").stdout()
    finally:
        ok(k4, "%pxconfig --targets all")
    assert stdout_map(k4, 'print("all again")') == {e: "all again\n" for e in ENGINES}


def test_noblock_then_pxresult(k4):
    r = ok(k4, '%%px --noblock\nimport time\ntime.sleep(0.5)\nprint("late")\n"done"')
    assert r.elapsed < 0.5, "a --noblock cell returns at once"
    assert [m["content"]["data"] for m in r.of_type("execute_result")] == [
        {"text/plain": "<AsyncResult(%px): pending>"}
    ], r.describe()
    assert [m for m in r.outputs() if m["msg_type"] != "execute_result"] == [], r.describe()
    r = ok(k4, "%pxresult")
    exp = [("stream", "stdout", f"[stdout:{e}] \nlate\n") for e in ENGINES]
    exp += [("display_data", f"{RED}Out[{e}:C]: {NORMAL}'done'", None) for e in ENGINES]
    assert render(r) == exp, r.describe()


def test_out_name_and_pxresult_out(k4):
    ok(k4, '%%px --out saved --targets [0,1]\nimport os\n"v" + os.environ["PARALLAX_ENGINE_ID"]')
    ok(k4, '%px "something else"')  # the last result is no longer "saved"
    r = ok(k4, "%pxresult --out saved")
    assert render(r) == [
        ("display_data", f"{RED}Out[0:C]: {NORMAL}'v0'", None),
        ("display_data", f"{RED}Out[1:C]: {NORMAL}'v1'", None),
    ], r.describe()
    r = error(k4, "%pxresult --out nosuchname")
    assert r.content["ename"] == "UsageError"
    assert "nosuchname" in r.content["evalue"] and "saved" in r.content["evalue"], r.content


def _autopx_enabled(k: Kernel) -> bool:
    text = ok(k, "%pxconfig").stdout()
    m = re.search(r"^autopx: (true|false)$", text, re.M)
    assert m, text
    return m[1] == "true"


def test_autopx_toggles_fan_out_of_unmarked_cells(k4):
    try:
        r = ok(k4, "%autopx")
        assert render(r) == [("stream", "stdout", "%autopx disabled\n")]
        # unmarked cells run in the kernel's local interpreter, plainly
        r = ok(k4, 'autopx_marker = 1\nprint("at home")')
        assert render(r) == [("stream", "stdout", "at home\n")], r.describe()
        assert stdout_map(k4, '%px print("px works")') == {e: "px works\n" for e in ENGINES}
        r = ok(k4, "%autopx")
        assert render(r) == [("stream", "stdout", "%autopx enabled\n")]
    finally:
        if not _autopx_enabled(k4):
            ok(k4, "%autopx")
    got = stdout_map(k4, 'print("autopx_marker" in globals())')
    assert got == {e: "False\n" for e in ENGINES}


def test_engines_table(k4):
    rows = engines_table(k4)
    assert sorted(rows) == ENGINES
    engine_procs = {p.pid: p for p in psutil.Process(k4.pid).children()}
    for eid, row in rows.items():
        assert row["status"] == "idle" and row["queue"] == 0, row
        assert row["pid"] in engine_procs, f"engine {eid}: pid {row['pid']} is not a child of the kernel"
        assert f"--id={eid}" in engine_procs[row["pid"]].cmdline(), engine_procs[row["pid"]].cmdline()
    assert len({r["uuid"] for r in rows.values()}) == 4
    assert "4 engines registered" in ok(k4, "%engines").stdout()


BAD_CELLS = [
    # (cell, what the message must mention)
    # misspelt Parallax magics (other %magics go to the engines' IPython:
    # test_engine_ipython_syntax.py)
    ("%pxconfg --no-stream\nbad_marker = 1", ["%pxconfg", "Did you mean %pxconfig?", "%autopx"]),
    ("bad_marker = 1\n%clster", ["%clster", "Did you mean %cluster?"]),
    ("%%pxx\nbad_marker = 1", ["%%pxx", "Did you mean %%px?"]),
    ("%%px --group-outputs=bogus\nbad_marker = 1", ["bogus", "engine", "order", "type"]),
    ("%%px --frobnicate\nbad_marker = 1", ["--frobnicate", "--targets", "--noblock"]),
    ("%%px --targets 9\nbad_marker = 1", ["9", "[0, 1, 2, 3]"]),
    ("%pxconfig --targets 9\nbad_marker = 1", ["9", "[0, 1, 2, 3]"]),
    ("%%px --targets\nbad_marker = 1", ["--targets", "expected one argument"]),
    ("bad_marker = 1\n%%px\nx = 2", ["%%px", "first line"]),
]


@pytest.mark.parametrize("cell, mentions", BAD_CELLS, ids=[c.split("\n")[0] for c, _ in BAD_CELLS])
def test_bad_magic_is_a_usage_error_and_runs_nothing(k4, cell, mentions):
    r = error(k4, cell)
    c = r.content
    assert c["ename"] == "UsageError", f"{cell!r}: {c['ename']}: {c['evalue']}"
    for word in mentions:
        assert word in c["evalue"], f"{cell!r}: {word!r} not in {c['evalue']!r}"
    assert [m["msg_type"] for m in r.outputs()] == ["error"], r.describe()
    got = stdout_map(k4, 'print("bad_marker" in globals())')
    assert got == {e: "False\n" for e in ENGINES}, f"{cell!r} ran on the engines"


@pytest.mark.parametrize("cell", ["", "   \n\n", "%%px\n", "%%px --targets 1\n  \n"])
def test_empty_cell_is_a_no_op(k4, cell):
    before = ok(k4, "pass").content["execution_count"]
    r = ok(k4, cell)
    assert r.outputs() == [], r.describe()
    assert [m["msg_type"] for m in r.iopub] == ["status", "execute_input", "status"]
    if not cell.strip():
        # IPython: a blank cell does not count (a lone %%px line does)
        assert r.content["execution_count"] == before


# ============================================================ 3. interrupt


def _interrupt(k: Kernel, how: str) -> None:
    if how == "signal":
        k.km.interrupt_kernel()  # SIGINT to the kernel (interrupt_mode "signal")
    else:
        r = k.control_request("interrupt_request", timeout=2)
        assert r["content"]["status"] == "ok", r["content"]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["signal", "control"])
def test_interrupt_stops_the_cell_and_keeps_namespaces(k4, how):
    ok(k4, f'keep = "{how}"')
    msg_id = k4.send_execute("import time\ntime.sleep(30)")
    time.sleep(0.5)
    t0 = time.monotonic()
    _interrupt(k4, how)
    r = k4.collect(msg_id, timeout=15)
    waited = time.monotonic() - t0
    assert waited < 2, f"reply {waited:.2f} s after the interrupt"
    assert r.status == "error" and r.content["ename"] == "KeyboardInterrupt", r.describe()
    tracebacks = {}
    for t in r.streams("stderr"):
        m = re.match(r"\[(\d+):execute\]\n", t)
        if m:
            tracebacks[int(m[1])] = t
    assert sorted(tracebacks) == ENGINES, r.describe()
    for t in tracebacks.values():
        assert "time.sleep(30)" in t and t.endswith("KeyboardInterrupt\n"), t
    assert stdout_map(k4, "print(keep)") == {e: f"{how}\n" for e in ENGINES}


# ============================================================ 4. engine death


@pytest.mark.timeout(60)
def test_engine_killed_between_cells(fresh4):
    k = fresh4
    pids = {eid: row["pid"] for eid, row in engines_table(k).items()}
    os.kill(pids[3], signal.SIGKILL)
    assert wait_gone([pids[3]], 5) == []
    # the kernel notices between cells: the next cell runs on the others
    got = wait_for(lambda: sorted(engines_table(k)) == [0, 1, 2], 5)
    assert got, engines_table(k)
    assert stdout_map(k, 'print("three")') == {e: "three\n" for e in (0, 1, 2)}


@pytest.mark.timeout(90)
def test_engine_death_mid_cell(fresh4):
    k = fresh4
    engine_pids = {eid: row["pid"] for eid, row in engines_table(k).items()}
    pys = python_pids(k)
    assert pys[2] in k.engine_tree()[engine_pids[2]], "the Python worker is engine 2's"
    msg_id = k.send_execute(
        'import os, signal\nif os.environ["PARALLAX_ENGINE_ID"] == "2":\n'
        f"    os.kill({engine_pids[2]}, signal.SIGKILL)\n"
        "else:\n"
        '    print("alive")'
    )
    # the engine's Python worker does not outlive its engine
    assert wait_gone([engine_pids[2]], 10) == [], "engine 2 was not killed"
    assert wait_gone([pys[2]], 5) == [], "the killed engine's python is still running"
    # the cell ends (no waiting for heartbeats to lapse) with engine 2's error
    r = k.collect(msg_id, timeout=10)
    assert r.status == "error", r.describe()
    assert r.stdout_by_engine() == {0: "alive\n", 1: "alive\n", 3: "alive\n"}, r.describe()
    err = [t for t in r.streams("stderr") if t.startswith("[2:execute]")]
    assert len(err) == 1 and "EngineError" in r.stderr(), r.describe()
    assert (r.content["ename"], r.content["evalue"]) == ("AlreadyDisplayedError", "1 errors")
    # the kernel goes on with the three others
    assert stdout_map(k, 'print("next")') == {e: "next\n" for e in (0, 1, 3)}
    r = ok(k, "%cluster add 1")
    assert r.stdout() == "Started engines [4]; now 4 engines\n", r.describe()
    assert stdout_map(k, 'print("back")') == {e: "back\n" for e in (0, 1, 3, 4)}


# ============================================================ 5. restart, shutdown, kill


def _check_tree(k: Kernel) -> list[int]:
    """4 engine processes, each with one Python worker (its child, or forked
    by the kernel's zygote); returns all pids, the zygote's included."""

    def complete():
        t = k.engine_tree()
        return t if len(t) == 4 and all(len(c) == 1 for c in t.values()) else None

    tree = wait_for(complete, 10)
    assert tree, f"expected 4 engines with one python each: {k.engine_tree()}"
    pids = [k.pid]
    for engine, kids in tree.items():
        assert "engine" in psutil.Process(engine).cmdline(), psutil.Process(engine).cmdline()
        pids += [engine, *kids]
    zyg = k.zygote()
    if zyg is not None:
        pids.append(zyg.pid)
    assert sorted(p.pid for p in k.descendants()) == sorted(pids[1:])
    return pids


@pytest.mark.timeout(60)
def test_restart_and_shutdown_leave_no_processes(kernel_env):
    k = Kernel(engines=4)
    try:
        ok(k, "x = 1")
        old = _check_tree(k)
        zyg = k.zygote()
        assert zyg is not None and zyg.pid in old, "the engines' interpreters come from a zygote"
        k.restart()
        assert k.pid != old[0]
        assert wait_gone(old, 5) == [], [psutil.Process(p).cmdline() for p in old if not gone(p)]
        assert stdout_map(k, 'print("x" in globals())') == {e: "False\n" for e in ENGINES}
        new = _check_tree(k)
        k.km.shutdown_kernel(now=False)
        assert wait_gone(new, 5) == [], "processes left after shutdown_kernel"
    finally:
        k.stop()


@pytest.mark.timeout(60)
def test_sigkilled_kernel_takes_its_engines_down(kernel_env):
    k = Kernel(engines=4)
    try:
        ok(k, "x = 1")
        pids = _check_tree(k)
        assert k.zygote() is not None and k.zygote().pid in pids
        os.kill(k.pid, signal.SIGKILL)
        left = wait_gone(pids, 5)
        assert left == [], "still running 5 s after the kernel was killed: " + "; ".join(
            " ".join(psutil.Process(p).cmdline()) for p in left if not gone(p)
        )
    finally:
        k.stop()


# ============================================================ 6. %cluster


def _cluster_pids(k: Kernel) -> dict[int, int]:
    text = ok(k, "%cluster").stdout()
    m = re.search(r"^engine processes: (.*)$", text, re.M)
    assert m, text
    return {int(a): int(b) for a, b in re.findall(r"(\d+) \(pid (\d+)\)", m[1])}


@pytest.mark.timeout(60)
def test_cluster_magic(fresh4):
    k = fresh4
    text = ok(k, "%cluster").stdout()
    assert "engines: [0, 1, 2, 3]\n" in text and "embedded cluster" in text, text
    pids = _cluster_pids(k)
    assert sorted(pids) == ENGINES
    assert sorted(pids.values()) == sorted(p.pid for p in k.engine_processes())

    ok(k, 'ns_marker = "kept"')
    r = ok(k, "%cluster add 2")
    assert r.stdout() == "Started engines [4, 5]; now 6 engines\n"
    six = list(range(6))
    assert stdout_map(k, 'print("six")') == {e: "six\n" for e in six}
    pids = _cluster_pids(k)
    assert sorted(pids) == six

    r = ok(k, "%cluster stop 4 5")
    assert r.stdout() == "Stopped engines [4, 5]; 4 engines left\n"
    assert wait_gone([pids[4], pids[5]], 5) == []
    assert stdout_map(k, 'print("four")') == {e: "four\n" for e in ENGINES}

    r = ok(k, "%cluster restart 0")
    assert r.stdout() == "Restarted engines [0] (fresh namespaces)\n"
    assert wait_gone([pids[0]], 5) == []
    after = _cluster_pids(k)
    assert sorted(after) == ENGINES and after[0] != pids[0]
    assert {e: after[e] for e in (1, 2, 3)} == {e: pids[e] for e in (1, 2, 3)}
    got = stdout_map(k, 'print(globals().get("ns_marker"))')
    assert got == {0: "None\n", 1: "kept\n", 2: "kept\n", 3: "kept\n"}

    r = error(k, "%cluster stop 7")
    assert r.content["ename"] == "UsageError" and "7" in r.content["evalue"], r.content


# ============================================================ 7. busy kernel


@pytest.mark.timeout(30)
def test_control_and_heartbeat_answer_while_a_cell_runs(k4):
    info = k4.km.get_connection_info()
    msg_id = k4.send_execute("import time\ntime.sleep(3)")
    time.sleep(0.5)
    t0 = time.monotonic()
    r = k4.control_request("kernel_info_request", timeout=5)
    took = time.monotonic() - t0
    assert took < 0.5, f"kernel_info on control took {took:.2f} s"
    assert r["content"]["status"] == "ok" and r["content"]["implementation"] == "parallax"

    ctx = zmq.Context.instance()
    hb = ctx.socket(zmq.REQ)
    hb.linger = 0
    try:
        hb.connect(f"tcp://{info['ip']}:{info['hb_port']}")
        t0 = time.monotonic()
        hb.send(b"ping")
        assert hb.poll(500), "no heartbeat echo within 0.5 s while busy"
        assert hb.recv() == b"ping"
    finally:
        hb.close()
    assert k4.kc.is_alive()
    r = k4.collect(msg_id, timeout=15)
    assert r.status == "ok", r.describe()


# ============================================================ 8. forged messages


def _frames(key: bytes, code: str, signature: bytes | None = None) -> list[bytes]:
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": "execute_request",
        "username": "mallory",
        "session": uuid.uuid4().hex,
        "date": "2026-01-01T00:00:00.000000Z",
        "version": "5.3",
    }
    parts = [
        json.dumps(header).encode(),
        b"{}",
        b"{}",
        json.dumps({"code": code, "silent": False, "store_history": True}).encode(),
    ]
    if signature is None:
        h = hmac.new(key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        signature = h.hexdigest().encode()
    return [b"<IDS|MSG>", signature, *parts]


@pytest.mark.timeout(30)
def test_badly_signed_messages_are_ignored(k4):
    info = k4.km.get_connection_info()
    key = info["key"] if isinstance(info["key"], bytes) else info["key"].encode()
    assert key, "the test needs a signing key"
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    try:
        s.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        s.send_multipart(_frames(b"not the key", "forged_marker = 1"))
        s.send_multipart(_frames(key, "forged_marker = 2", signature=b""))
        s.send_multipart(_frames(key, "forged_marker = 3", signature=b"0" * 64))
        s.send_multipart([b"<IDS|MSG>", b"garbage"])
        s.send_multipart([b"no delimiter at all"])
        assert not s.poll(1000), f"a reply to a forged message: {s.recv_multipart()}"
        # the same socket with the right key is answered: the kernel is fine
        s.send_multipart(_frames(key, "signed_marker = 1"))
        assert s.poll(10_000), "no reply to a correctly signed message"
        reply = s.recv_multipart()
        i = reply.index(b"<IDS|MSG>")
        assert json.loads(reply[i + 2])["msg_type"] == "execute_reply"
        assert json.loads(reply[i + 5])["status"] == "ok"
    finally:
        s.close()
    time.sleep(0.2)
    k4.drain_iopub()  # the signed request's own busy/execute_input/idle
    assert k4.kc.kernel_info(reply=True, timeout=5)["content"]["status"] == "ok"
    got = stdout_map(k4, 'print("forged_marker" in globals(), "signed_marker" in globals())')
    assert got == {e: "False True\n" for e in ENGINES}


def test_noblock_failure_aborts_the_cells_queued_behind_it(k4):
    """Issue 13: the kernel asks engines for ipykernel's stop_on_error, so a
    --noblock cell that fails aborts the cells already queued behind it on
    each engine (state does not diverge: `b *= 2` never runs); cells sent
    after that run normally."""
    ok(k4, "%px b = 1")
    ok(k4, "%%px --noblock\nimport time\ntime.sleep(1.0)\nb / 0")
    ok(k4, "%%px --noblock\nb *= 2")
    r = k4.execute("%px print(b)", timeout=QUICK)  # queued too: aborted
    assert r.status == "error", r.describe()
    assert r.content["evalue"] == f"{len(ENGINES)} errors", r.describe()
    assert not [m for m in r.of_type("stream") if "ZeroDivision" in str(m)], r.describe()
    shown = "".join(r.streams("stderr"))
    assert shown.count("TaskAborted: the request was aborted before it ran") == len(ENGINES), shown
    assert stdout_map(k4, "%px print(b)") == {e: "1\n" for e in ENGINES}


@pytest.mark.parametrize("magic", ["%matplotlib inline", "%pylab inline"])
def test_matplotlib_magics_through_px(k4, magic):
    """Issue 13: `%matplotlib inline` / `%pylab inline` on the engines (an
    IPython magic, not a kernel one) used to fail with "Implement enable_gui
    in a subclass"; figures come back as PNG display_data from each engine."""
    ok(k4, f"%px {magic}", timeout=60)
    r = ok(k4, "%%px --targets [0,1]\nimport matplotlib.pyplot as plt\n"
               "plt.figure()\nplt.plot([1, 3, 2])\nNone", timeout=60)
    pngs = [m for m in r.of_type("display_data") if "image/png" in m["content"]["data"]]
    assert len(pngs) == 2, r.describe()
