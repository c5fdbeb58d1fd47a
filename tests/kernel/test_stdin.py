"""input() on an engine, through the real Parallax kernel under
jupyter_client: a cell that targets one engine, sent with allow_stdin,
forwards input()/getpass() to the frontend's stdin channel (input_request
parented to the frontend's execute_request; the client's input_reply is
relayed back to the engine); any other cell gets a StdinNotImplementedError
naming why, and nothing waits forever (an interrupt ends the wait).
"""

from __future__ import annotations

import re
import time
from queue import Empty

import pytest

from kernel_harness import Kernel, Result

pytestmark = pytest.mark.timeout(90)

ENGINES = [0, 1, 2, 3]
WHERE = "is forwarded to the notebook only"


def stdin_msg(k: Kernel, timeout: float = 20) -> dict:
    return k.kc.get_stdin_msg(timeout=timeout)


def no_stdin_msg(k: Kernel, quiet: float = 0.5) -> None:
    try:
        m = k.kc.get_stdin_msg(timeout=quiet)
    except Empty:
        return
    raise AssertionError(f"unexpected stdin message: {m['msg_type']} {m['content']}")


def stdout_text(r: Result) -> list[str]:
    return [t for t in r.final_texts() if t.startswith("[stdout:")]


def engine_errors(r: Result) -> dict[int, str]:
    """engine id → its `[N:execute]` traceback text on stderr."""
    out = {}
    for t in r.streams("stderr"):
        m = re.match(r"\[(\d+):execute\]\n", t)
        if m:
            out[int(m[1])] = t
    return out


def test_input_on_one_engine_asks_the_frontend(k4):
    code = '%%px --targets 0\nx = input("name? ")\nprint(x.upper())'
    msg_id = k4.send_execute(code, allow_stdin=True)
    req = stdin_msg(k4)
    assert req["msg_type"] == "input_request", req
    assert req["content"] == {"prompt": "name? ", "password": False}, req["content"]
    # parented to the frontend's request, as ipykernel's are
    assert req["parent_header"]["msg_id"] == msg_id
    k4.kc.input("ada")
    r = k4.collect(msg_id, timeout=30)
    assert r.status == "ok", r.describe()
    assert stdout_text(r) == ["[stdout:0] ADA\n"], r.describe()
    # the value is the engine's, in its namespace
    r = k4.execute("%%px --targets 0\nprint(repr(x))", allow_stdin=True)
    assert stdout_text(r) == ["[stdout:0] 'ada'\n"], r.describe()


def test_getpass_asks_for_a_password(k4):
    code = '%%px --targets 2\nimport getpass\npw = getpass.getpass("pw: ")\nprint(len(pw), pw[::-1])'
    msg_id = k4.send_execute(code, allow_stdin=True)
    req = stdin_msg(k4)
    assert req["content"] == {"prompt": "pw: ", "password": True}, req["content"]
    k4.kc.input("s3cret")
    r = k4.collect(msg_id, timeout=30)
    assert r.status == "ok", r.describe()
    assert stdout_text(r) == ["[stdout:2] 6 terc3s\n"], r.describe()


def test_two_inputs_in_one_cell_and_output_between(k4):
    code = (
        "%%px --targets 1\n"
        'a = input("a? ")\nprint("got", a, flush=True)\n'
        'b = input("b? ")\nprint(a + b)'
    )
    msg_id = k4.send_execute(code, allow_stdin=True)
    assert stdin_msg(k4)["content"]["prompt"] == "a? "
    k4.kc.input("x")
    assert stdin_msg(k4)["content"]["prompt"] == "b? "
    k4.kc.input("y")
    r = k4.collect(msg_id, timeout=30)
    assert r.status == "ok", r.describe()
    assert stdout_text(r) == ["[stdout:1] got x\nxy\n"], r.describe()


def test_several_targets_get_a_clear_error_on_every_engine(k4):
    t0 = time.monotonic()
    r = k4.execute('input("name? ")', allow_stdin=True, timeout=30)
    assert time.monotonic() - t0 < 15
    no_stdin_msg(k4)
    assert r.status == "error", r.describe()
    errs = engine_errors(r)
    assert sorted(errs) == ENGINES, r.describe()
    want = (
        f"StdinNotImplementedError: input() {WHERE} when a cell targets one engine; "
        "this cell targets 4 engines (use %%px --targets 0)"
    )
    for t in errs.values():
        assert want in t, t
    r = k4.execute('%%px --targets 1:3\nimport getpass\ngetpass.getpass()', allow_stdin=True)
    errs = engine_errors(r)
    assert sorted(errs) == [1, 2], r.describe()
    for t in errs.values():
        assert "getpass() " + WHERE + " when a cell targets one engine; this cell targets 2 engines (use %%px --targets 1)" in t, t


def test_allow_stdin_false_is_a_clear_error(k4):
    r = k4.execute('%%px --targets 0\ninput("name? ")', allow_stdin=False, timeout=30)
    no_stdin_msg(k4)
    assert r.status == "error", r.describe()
    assert sorted(engine_errors(r)) == [0], r.describe()
    text = "".join(r.streams("stderr")) + "\n".join(r.content.get("traceback", []))
    assert f"input() {WHERE} when the frontend accepts input; this execute_request has allow_stdin false" in text, r.describe()


def test_noblock_cell_refuses_input(k4):
    r = k4.execute('%%px --targets 0 --noblock\ninput("later? ")', allow_stdin=True)
    assert r.status == "ok", r.describe()
    r = k4.execute("%pxresult", allow_stdin=True, timeout=30)
    no_stdin_msg(k4)
    assert r.status == "error", r.describe()
    text = "".join(r.streams("stderr")) + "\n".join(r.content.get("traceback", []))
    assert f"input() {WHERE} when a cell blocks; this cell runs with --noblock" in text, r.describe()


@pytest.mark.parametrize("how", ["control", "signal"])
def test_interrupt_ends_a_wait_for_input(k4, how):
    msg_id = k4.send_execute('%%px --targets 0\nkept = input("never answered? ")', allow_stdin=True)
    req = stdin_msg(k4)
    assert req["content"]["prompt"] == "never answered? "
    time.sleep(0.2)
    t0 = time.monotonic()
    if how == "signal":
        k4.km.interrupt_kernel()
    else:
        r = k4.control_request("interrupt_request", timeout=5)
        assert r["content"]["status"] == "ok", r["content"]
    r = k4.collect(msg_id, timeout=15)
    assert time.monotonic() - t0 < 3, r.describe()
    assert r.status == "error" and r.content["ename"] == "KeyboardInterrupt", r.describe()
    # a late answer to the withdrawn question is dropped, not taken by the
    # next input()
    k4.kc.input("late")
    time.sleep(0.3)
    msg_id = k4.send_execute('%%px --targets 0\nkept = input("again? ")\nprint(kept)', allow_stdin=True)
    req = stdin_msg(k4)
    assert req["content"]["prompt"] == "again? ", req
    k4.kc.input("fresh")
    r = k4.collect(msg_id, timeout=30)
    assert r.status == "ok", r.describe()
    assert stdout_text(r) == ["[stdout:0] fresh\n"], r.describe()
