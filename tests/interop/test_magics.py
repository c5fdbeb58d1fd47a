"""%px / %%px in a real IPython shell (run in a subprocess so the magics'
display machinery doesn't interfere with pytest)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ENGINES = 2
SCRIPT = Path(__file__).with_name("px_session.py")


def split_sections(text):
    sections = {}
    name = None
    for line in text.splitlines(keepends=True):
        m = re.match(r"^=== (\w+)\n$", line)
        if m:
            name = m.group(1)
            sections[name] = ""
        elif name is not None:
            sections[name] += line
    return sections


def stream_by_engine(text, stream="stdout"):
    """'[stdout:N] \\n<lines>' blocks -> {N: [lines]}"""
    out = {}
    current = None
    for line in text.splitlines():
        m = re.match(rf"^\[{stream}:(\d+)\] ?$", line)
        if m:
            current = int(m.group(1))
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line)
    return out


@pytest.fixture(scope="module")
def px_output(cluster):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(cluster.profile_dir), cluster.cluster_id, str(ENGINES)],
        capture_output=True,
        text=True,
        timeout=90,
        env=cluster.env,
    )
    detail = f"rc={proc.returncode}\n--- stdout:\n{proc.stdout}\n--- stderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    out, err = split_sections(proc.stdout), split_sections(proc.stderr)
    assert "end" in out, detail
    return out, err, detail


def test_px_line(px_output):
    out, err, detail = px_output
    assert stream_by_engine(out["line"]) == {0: ["0"], 1: ["1"]}, detail
    assert "\n\n" not in out["line"]


def test_cellpx_streaming(px_output):
    out, err, detail = px_output
    assert stream_by_engine(out["cell"]) == {0: ["x 0", "y 1"], 1: ["x 3", "y 4"]}, detail


def test_cellpx_no_stream_is_grouped_in_engine_order(px_output):
    out, err, detail = px_output
    assert out["nostream"] == "[stdout:0] \nns 0\n[stdout:1] \nns 1\n", detail


def test_cellpx_targets(px_output):
    out, err, detail = px_output
    assert out["targets"] == "[stdout:1] \nonly 1\n", detail


def test_px_results(px_output):
    out, err, detail = px_output
    results = {}
    for line in out["result"].splitlines():
        m = re.match(r"^Out\[(\d+):(\d+)\]: (\d+)$", line)
        assert m, f"unexpected line {line!r}\n{detail}"
        results[int(m.group(1))] = int(m.group(3))
    assert results == {0: 100, 1: 101}, detail


def test_px_stderr(px_output):
    out, err, detail = px_output
    assert stream_by_engine(err["stderr"], "stderr") == {
        0: ["to err 0"],
        1: ["to err 1"],
    }, detail
    assert out["stderr"] == "", detail


def test_px_error(px_output):
    out, err, detail = px_output
    assert out["error"].strip() == "raised AlreadyDisplayedError", detail
    for eid in range(ENGINES):
        assert f"[{eid}:execute]" in err["error"], detail
    assert err["error"].count("ZeroDivisionError") >= ENGINES, detail


def test_px_namespace_persists(px_output):
    out, err, detail = px_output
    assert out["after"].strip() == "x on engines: [0, 3]", detail
