"""The Parallax engine specifically (Rust process + persistent Python
subprocess), driven by the stock ipyparallel Client through a hub: every
output path, buffers, interrupt, a hung controller, the Jupyter requests the
Client has no API for, and an engine Python without ipyparallel.

(The whole interop suite also runs with Parallax engines: `make test` runs it
a second time with PARALLAX_ENGINES=parallax.)
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
import uuid

import pytest
import zmq

from .harness import REPO, REPLY_TIMEOUT, raises_remote, wait_until, within

T = REPLY_TIMEOUT
PARALLAX_BIN = os.environ.get("PARALLAX_BIN") or str(REPO / "target" / "release" / "parallax")
ENGINE = [PARALLAX_BIN, "engine"]


@pytest.fixture(scope="module")
def pcluster(tmp_path_factory):
    from .harness import HubCluster

    c = HubCluster(tmp_path_factory.mktemp("pengine"), engines=2, label="parallax-engine",
                   engine_cmd=ENGINE)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def prc(pcluster):
    return pcluster.client


def test_engine_env_and_identity(prc):
    dv = prc[:]
    env = dv.apply_sync(lambda: (__import__("os").environ.get("PARALLAX_ENGINE_ID"),
                                 __import__("os").environ.get("PARALLAX_ENGINE_UUID")))
    assert [e[0] for e in env] == [str(i) for i in prc.ids]
    assert [e[1] for e in env] == [prc._engines[i] for i in prc.ids]


def test_every_output_path_is_captured(prc):
    code = "\n".join([
        "import os, subprocess, sys",
        "print('py-print', 'ünïcödé ✓')",
        "sys.stdout.write('no newline at end')",
        "sys.stdout.flush()",
        "os.write(1, b'\\nfd-level write\\n')",
        "subprocess.run(['echo', 'child process'], check=True)",
        "print('to stderr', file=sys.stderr)",
        "os.write(2, b'fd2\\n')",
    ])
    ar = prc[0].execute(code, block=False)
    ar.get(T)
    ar.wait_for_output(T)
    out, err = ar.stdout, ar.stderr
    for piece in ["py-print ünïcödé ✓\n", "no newline at end", "fd-level write\n", "child process\n"]:
        assert piece in out, (piece, out)
    # order is preserved
    assert out.index("py-print") < out.index("fd-level") < out.index("child process")
    assert "to stderr\n" in err and "fd2\n" in err


def test_ten_megabyte_print(prc):
    ar = prc[1].execute("print('x' * (10 * 1024 * 1024))", block=False)
    ar.get(30)
    ar.wait_for_output(30)
    assert len(ar.stdout) == 10 * 1024 * 1024 + 1
    assert set(ar.stdout[:-1]) == {"x"}


def test_execute_result_display_and_error(prc):
    ar = prc[0].execute("a = 6\na * 7", silent=False, block=False)
    ar.get(T)
    ar.wait_for_output(T)
    assert ar.execute_result["data"]["text/plain"] == "42"
    ar = prc[0].execute("from IPython.display import HTML, display\ndisplay(HTML('<b>hi</b>'))",
                        block=False)
    ar.get(T)
    ar.wait_for_output(T)
    assert ar.outputs[0]["data"]["text/html"] == "<b>hi</b>"
    with raises_remote("ZeroDivisionError") as info:
        prc[0].execute("def f():\n    return 1/0\nf()", block=True)
    tb = "\n".join(info.errors[0].traceback.splitlines())
    assert "f()" in tb and "division by zero" in tb
    assert "parallax_engine_shim" not in tb


def test_unicode_and_binary_buffers(prc):
    import numpy as np

    data = {
        "blob": bytes(range(256)) * 1000,
        "text": "∑ ünïcödé 🚀 并行",
        "arr": np.arange(100_000, dtype=np.float64),
        "nested": {"b": b"\x00\xff", "l": [1, 2.5, None]},
    }
    dv = prc[:]
    dv.push(data, block=True)
    for name, value in data.items():
        got = dv.pull(name, block=True)
        for g in got:
            if name == "arr":
                assert (g == value).all()
            else:
                assert g == value


def test_interrupt_returns_within_a_second_and_keeps_state(prc):
    e = prc[1]
    e.execute("kept = 'still here'", block=True)
    ar = e.execute("import time; time.sleep(60)", block=False)
    time.sleep(0.5)  # let it start sleeping
    t0 = time.monotonic()
    within(T, prc.send_signal, signal.SIGINT, targets=[prc.ids[1]], block=True)
    with raises_remote("KeyboardInterrupt"):
        ar.get(5)
    assert time.monotonic() - t0 < 1.0
    assert e.pull("kept", block=True) == "still here"


def _raw_request(pcluster, rc, msg_type, content, engine=0):
    """Send a request the Client has no API for, straight to an engine
    through the hub's MUX, signed with the cluster key."""
    from jupyter_client.session import Session

    info = json.load(open(pcluster.connection_file("client")))
    session = Session(key=info["key"].encode(), session=str(uuid.uuid4()))
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"{info['interface']}:{info['mux']}")
    try:
        target = rc._engines[rc.ids[engine]].encode()
        session.send(sock, msg_type, content=content, ident=target)
        assert sock.poll(T * 1000), f"no reply to {msg_type}"
        idents, msg = session.feed_identities(sock.recv_multipart())
        return session.deserialize(msg)
    finally:
        sock.close()


def test_complete_inspect_is_complete_kernel_info(pcluster, prc):
    prc[0].execute("import os\nmy_variable = 1", block=True)
    r = _raw_request(pcluster, prc, "complete_request", {"code": "my_var", "cursor_pos": 6})
    assert r["msg_type"] == "complete_reply"
    assert "my_variable" in r["content"]["matches"]
    r = _raw_request(pcluster, prc, "inspect_request",
                     {"code": "os.path.join", "cursor_pos": 12, "detail_level": 0})
    assert r["content"]["status"] == "ok" and r["content"]["found"]
    assert "join" in r["content"]["data"]["text/plain"]
    r = _raw_request(pcluster, prc, "is_complete_request", {"code": "for i in range(3):"})
    assert r["content"]["status"] == "incomplete"
    r = _raw_request(pcluster, prc, "is_complete_request", {"code": "x = 1"})
    assert r["content"]["status"] == "complete"
    r = _raw_request(pcluster, prc, "kernel_info_request", {})
    assert r["content"]["language_info"]["name"] == "python"
    assert r["content"]["implementation"] == "parallax-engine"


def test_unknown_request_type_gets_an_error_reply(pcluster, prc):
    r = _raw_request(pcluster, prc, "frobnicate_request", {})
    assert r["msg_type"] == "frobnicate_reply"
    assert r["content"]["status"] == "error"
    assert "frobnicate_request" in r["content"]["evalue"]
    # and the engine still works
    assert prc[0].apply_sync(lambda: 7) == 7


def test_apply_without_ipyparallel_in_the_engine_python(make_cluster, tmp_path):
    # A Python that cannot import ipyparallel: the venv's interpreter
    # without site-packages.
    wrapper = tmp_path / "python-no-site"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    c = make_cluster(engines=1, engine_cmd=ENGINE, engine_args=[f"--python={wrapper}"])
    rc = c.client
    with raises_remote("ImportError") as info:
        rc[0].apply_sync(lambda: 1)
    assert "ipyparallel" in info.errors[0].evalue
    # plain execute still works
    ar = rc[0].execute("print(6 * 7)", block=False)
    ar.get(T)
    ar.wait_for_output(T)
    assert ar.stdout == "42\n"


def test_hung_controller_makes_the_engine_exit(make_cluster):
    c = make_cluster(engines=1, engine_cmd=ENGINE, engine_args=["--max-heartbeat-misses=2"])
    rc = c.client
    assert rc[0].apply_sync(lambda: 1) == 1
    engine = c.engines[0]
    hub_pgid = os.getpgid(c.hub.pid)
    os.killpg(hub_pgid, signal.SIGSTOP)
    try:
        # ping 200 ms: 2 misses of (200 + 500) ms, plus slack
        wait_until(lambda: not engine.alive(), 15, msg="engine did not exit when the hub hung")
    finally:
        os.killpg(hub_pgid, signal.SIGCONT)
    assert engine.popen.returncode == 0, "a clean exit"
    log = (c.log_dir / "engine-0.log").read_text()
    assert "stopped sending heartbeats" in log


def started_marker(path):
    """A task that writes its pid (and its parent's) to `path`, then sleeps."""

    def task():
        import os
        import time

        with open(path, "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}")
        time.sleep(60)

    return task


def test_python_crash_is_reported_and_engine_stays(make_cluster, tmp_path):
    """The Python subprocess of a Parallax engine dies mid-task: the task
    fails with an EngineError naming the signal, the engine restarts Python
    with a fresh namespace and stays registered."""
    c = make_cluster(engines=1, engine_cmd=ENGINE)
    rc = c.client
    rc[:].execute("x = 1", block=True)
    marker = str(tmp_path / "started")
    ar = rc[0].apply_async(started_marker(marker))
    wait_until(lambda: os.path.exists(marker) and os.path.getsize(marker) > 0, T,
               msg="task never started")
    python_pid = int(open(marker).read().split()[0])
    os.kill(python_pid, signal.SIGKILL)
    with raises_remote("EngineError") as info:
        ar.get(T)
    assert "signal 9" in info.errors[0].evalue
    assert "fresh namespace" in info.errors[0].evalue
    assert rc.ids == [0]
    assert rc[0].apply_async(os.getpid).get(T) != python_pid
    with raises_remote("NameError"):
        rc[0].execute("x", block=True)
    # os._exit is reported with its exit code
    with raises_remote("EngineError") as info:
        rc[0].execute("import os; os._exit(3)", block=True)
    assert "exited with code 3" in info.errors[0].evalue
    assert rc[0].apply_async(lambda: 42).get(T) == 42


def test_output_without_trailing_newline_then_more_requests(prc):
    for code, expected in [
        ("print('partial', end='')", "partial"),
        ("import os; os.write(1, b'raw')", "raw"),
        ("import subprocess; subprocess.run(['printf', 'child'])", "child"),
        ("print('whole line')", "whole line\n"),
    ]:
        ar = prc[0].execute(code, block=False)
        ar.get(T)
        ar.wait_for_output(T)
        assert ar.stdout == expected, (code, ar.stdout)


def test_update_display(pcluster, prc):
    """`update_display` is published as update_display_data (the stock
    Client does not record those, so listen on iopub directly)."""
    from jupyter_client.session import Session

    info = json.load(open(pcluster.connection_file("client")))
    session = Session(key=info["key"].encode())
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"{info['interface']}:{info['iopub']}")
    try:
        time.sleep(0.3)  # let the subscription reach the hub
        code = "\n".join([
            "from IPython.display import display",
            "h = display('first', display_id='d1')",
            "h.update('second')",
        ])
        ar = prc[0].execute(code, block=False)
        ar.get(T)
        seen = []
        deadline = time.monotonic() + T
        while time.monotonic() < deadline and "update_display_data" not in [m[0] for m in seen]:
            if sub.poll(200):
                _, msg = session.feed_identities(sub.recv_multipart())
                msg = session.deserialize(msg)
                if msg["parent_header"].get("msg_id") == ar.msg_ids[0]:
                    seen.append((msg["msg_type"], msg["content"]))
        kinds = [k for k, _ in seen if k.endswith("display_data")]
        assert kinds == ["display_data", "update_display_data"], seen
        upd = [c for k, c in seen if k == "update_display_data"][0]
        assert upd["data"]["text/plain"] == "'second'"
        assert upd["transient"]["display_id"] == "d1"
    finally:
        sub.close()


def test_matplotlib_inline_png(prc):
    code = "\n".join([
        "import matplotlib.pyplot as plt",
        "fig, ax = plt.subplots()",
        "ax.plot([1, 3, 2])",
        "plt.show()",
    ])
    ar = prc[0].execute(code, block=False)
    ar.get(60)
    ar.wait_for_output(T)
    pngs = [o for o in ar.outputs if "image/png" in o["data"]]
    assert len(pngs) == 1, ar.outputs
    import base64

    assert base64.b64decode(pngs[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
