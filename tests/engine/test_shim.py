"""Tests for engine/python/parallax_engine_shim.py, driven through its pipe
protocol exactly as the Rust engine drives it (no Rust needed).

fd 0 = /dev/null, fd 1 / fd 2 = pipes read here, fd 3 = commands, fd 4 =
events; framing: u32 LE JSON length + JSON, u32 LE nbuf, per buffer u64 LE
length + bytes.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "engine" / "python" / "parallax_engine_shim.py"
PY = sys.executable

WAIT = 20.0  # generous default wait for one request (first apply imports ipyparallel)


def _high(fd: int) -> int:
    """Move ``fd`` to a close-on-exec descriptor >= 10 (no clash with 0-4)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class _Stream:
    """Collects one output pipe; hands out output up to end tokens."""

    def __init__(self, fd: int):
        self.fd = fd
        self.data = bytearray()
        self.pos = 0
        self.eof = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except OSError:
                chunk = b""
            with self.cond:
                if not chunk:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.data += chunk
                self.cond.notify_all()

    def until_token(self, token: str, timeout: float) -> bytes:
        marker = b"\x1e" + token.encode() + b"\n"
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                idx = self.data.find(marker, self.pos)
                if idx >= 0:
                    out = bytes(self.data[self.pos:idx])
                    self.pos = idx + len(marker)
                    return out
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise TimeoutError(
                        f"end token {token!r} not seen; tail: {bytes(self.data[-300:])!r}"
                    )
                self.cond.wait(left)

    def wait_for(self, needle: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.data.find(needle, self.pos) < 0:
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise TimeoutError(f"{needle!r} not seen")
                self.cond.wait(left)


class Result:
    def __init__(self, events, reply, bufs, out, err):
        self.events = events  # all events of the request, reply last
        self.reply = reply
        self.content = reply["content"]
        self.bufs = bufs
        self.stdout = out.decode("utf-8")
        self.stderr = err.decode("utf-8")

    def of(self, kind):
        return [e for e in self.events if e["ev"] == kind]

    def result_text(self):
        res = self.of("execute_result")
        return res[0]["data"]["text/plain"] if res else None


class _Proc:
    """The spawned shim: a minimal Popen look-alike for a posix_spawn'd pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("parallax_engine_shim", timeout)
            time.sleep(0.005)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Shim:
    """A shim process plus a client for its protocol."""

    def __init__(self, python: str = PY, env: dict | None = None):
        cmd_r, cmd_w = os.pipe()  # os.pipe() ends are close-on-exec
        evt_r, evt_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # child ends moved to >= 10 so the dup2s below cannot clobber each other
        cmd_src, evt_src = _high(cmd_r), _high(evt_w)
        out_w, err_w = _high(out_w), _high(err_w)
        self.cmd_w, self.evt_r = cmd_w, evt_r
        full_env = dict(os.environ)
        full_env.update(
            PARALLAX_CMD_FD="3",
            PARALLAX_EVT_FD="4",
            PARALLAX_ENGINE_ID="3",
            PARALLAX_N_ENGINES="4",
            PARALLAX_ENGINE_UUID="uuid-engine-3",
        )
        full_env.pop("MPLBACKEND", None)
        if env:
            full_env.update(env)
        self.t_spawn = time.monotonic()
        # posix_spawn: the fd layout the engine uses, without running Python
        # code between fork and exec (preexec_fn is unsafe with threads)
        pid = os.posix_spawn(
            python,
            [python, "-u", str(SHIM)],
            full_env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
                (os.POSIX_SPAWN_DUP2, cmd_src, 3),
                (os.POSIX_SPAWN_DUP2, evt_src, 4),
            ],
        )
        self.proc = _Proc(pid)
        for fd in (cmd_src, evt_src, out_w, err_w):
            os.close(fd)
        self.out = _Stream(out_r)
        self.err = _Stream(err_r)
        self.events: queue.Queue = queue.Queue()
        self._n = 0
        self._evt_thread = threading.Thread(target=self._read_events, daemon=True)
        self._evt_thread.start()
        try:
            self.ready = self.next_event(timeout=5.0)
        except (TimeoutError, EOFError) as e:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"no ready event: {e}; exit status {self.proc.returncode}; "
                f"stderr {bytes(self.err.data[-2000:])!r}; stdout {bytes(self.out.data[-500:])!r}"
            ) from None
        self.ready_wall_ms = (time.monotonic() - self.t_spawn) * 1000

    # -- framing ------------------------------------------------------------

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.evt_r, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _read_events(self):
        try:
            while True:
                n = int.from_bytes(self._read_exact(4), "little")
                msg = json.loads(self._read_exact(n).decode("utf-8"))
                nbuf = int.from_bytes(self._read_exact(4), "little")
                bufs = []
                for _ in range(nbuf):
                    ln = int.from_bytes(self._read_exact(8), "little")
                    bufs.append(self._read_exact(ln))
                self.events.put((msg, bufs))
        except (EOFError, OSError):
            self.events.put((None, None))

    def send(self, msg: dict, bufs=()) -> None:
        data = json.dumps(msg).encode()
        frame = bytearray(len(data).to_bytes(4, "little") + data)
        frame += len(bufs).to_bytes(4, "little")
        for b in bufs:
            b = bytes(b)
            frame += len(b).to_bytes(8, "little") + b
        view = memoryview(frame)
        while view:
            view = view[os.write(self.cmd_w, view):]

    def next_event(self, timeout: float = WAIT):
        try:
            msg, bufs = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no event from the shim") from None
        if msg is None:
            raise EOFError("event pipe closed")
        return msg if not bufs else (msg, bufs)

    # -- requests -------------------------------------------------------------

    def request(self, op: str, bufs=(), timeout: float = WAIT, **fields) -> Result:
        self._n += 1
        rid = f"req-{self._n}"
        self.send(dict(op=op, id=rid, **fields), bufs)
        events = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {op} within {timeout}s; got {events}")
            try:
                msg, rbufs = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise EOFError(f"event pipe closed before reply; got {events}")
            assert msg.get("id") == rid, msg
            events.append(msg)
            if msg["ev"] == "reply":
                break
        token = msg["end"]
        out = self.out.until_token(token, timeout=5)
        err = self.err.until_token(token, timeout=5)
        return Result(events, msg, rbufs, out, err)

    def execute(self, code: str, count: int = 1, silent: bool = False,
                user_expressions=None, timeout: float = WAIT, **kw) -> Result:
        return self.request(
            "execute",
            code=code,
            silent=silent,
            store_history=kw.pop("store_history", not silent),
            user_expressions=user_expressions or {},
            execution_count=count,
            timeout=timeout,
            **kw,
        )

    def apply(self, f, args=(), kwargs=None, timeout: float = WAIT) -> Result:
        from ipyparallel.serialize import pack_apply_message

        bufs = pack_apply_message(f, args, kwargs or {})
        return self.request(
            "apply", bufs=bufs, engine_id=3, engine_uuid="uuid-engine-3", timeout=timeout
        )

    def close_cmd(self):
        """Close our end of the command pipe (the shim sees EOF/HUP)."""
        if self.cmd_w >= 0:
            os.close(self.cmd_w)
            self.cmd_w = -1

    def close(self):
        self.close_cmd()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        # close our read ends only once the reader threads are done with them,
        # so a reused fd number is never read by a stale thread
        for thread, fd in (
            (self._evt_thread, self.evt_r),
            (self.out.thread, self.out.fd),
            (self.err.thread, self.err.fd),
        ):
            thread.join(timeout=5)
            if not thread.is_alive():
                os.close(fd)


@pytest.fixture
def shim():
    s = Shim()
    try:
        yield s
    finally:
        s.close()


def _ok(res: Result) -> dict:
    assert res.content["status"] == "ok", res.content
    return res.content


def _tb(content) -> str:
    return "\n".join(content["traceback"])


def _result(res: Result):
    """Deserialize an apply_reply's buffers."""
    from ipyparallel.serialize import deserialize_object

    obj, rest = deserialize_object(res.bufs)
    assert not rest
    return obj


# ---------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------


@pytest.fixture
def cold_shim():
    """A shim without the background warm-up (PARALLAX_WARMUP=0)."""
    s = Shim(env={"PARALLAX_WARMUP": "0"})
    try:
        yield s
    finally:
        s.close()


def test_ready_is_lean_and_fast(cold_shim):
    shim = cold_shim
    r = shim.ready
    assert r["ev"] == "ready"
    assert r["pid"] == shim.proc.pid
    assert r["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert r["ipython"] is True and r["ipyparallel"] is True
    assert isinstance(r["startup_ms"], float)
    assert r["end_prefix"].startswith("pxe-") and r["end_prefix"].endswith("-")
    print(
        f"\nshim ready: startup_ms={r['startup_ms']:.1f} (module start -> ready), "
        f"spawn -> ready wall {shim.ready_wall_ms:.1f} ms"
    )
    res = shim.execute("1")
    assert res.reply["end"].startswith(r["end_prefix"])
    res = shim.execute(
        "import sys, os\n"
        "heavy = sorted(m for m in ('IPython', 'ipyparallel', 'json', 'zmq', 'numpy')"
        " if m in sys.modules)\n"
        "(heavy, os.environ['PARALLAX_ENGINE_ID'], os.environ['PARALLAX_N_ENGINES'],"
        " os.environ['PARALLAX_ENGINE_UUID'], 'PARALLAX_CMD_FD' in os.environ,"
        " sys.argv, sys.path[0], __name__, sys.modules['__main__'].__dict__ is globals())"
    )
    _ok(res)
    assert res.result_text() == (
        "(['json'], '3', '4', 'uuid-engine-3', False, [''], '', '__main__', True)"
    )


# ---------------------------------------------------------------------------
# execute
# ---------------------------------------------------------------------------


def test_state_persists_across_requests(shim):
    _ok(shim.execute("x = 40\ndef f(y):\n    return x + y", count=1))
    res = shim.execute("f(2)", count=2)
    c = _ok(res)
    assert c["execution_count"] == 2 and c["payload"] == [] and c["user_expressions"] == {}
    (r,) = res.of("execute_result")
    assert r["execution_count"] == 2
    assert r["data"] == {"text/plain": "42"} and r["metadata"] == {}
    assert [e["ev"] for e in res.events] == ["execute_result", "reply"]


def test_last_expression_semantics(shim):
    res = shim.execute("a = 1\na + 1", count=1)
    assert res.result_text() == "2"
    assert shim.execute("None", count=2).of("execute_result") == []
    assert shim.execute("x = 5", count=3).of("execute_result") == []
    assert shim.execute("if True:\n    7", count=4).of("execute_result") == []
    assert shim.execute("7;  # quiet", count=5).of("execute_result") == []
    res = shim.execute("print('side effect'); 3 * 3", silent=True, count=6)
    assert res.of("execute_result") == [] and res.stdout == "side effect\n"
    assert shim.execute("'a;b'", count=7).result_text() == "'a;b'"
    res = shim.execute("(_, __, ___, _1, _7, sorted(Out))", count=8)
    assert res.result_text() == "('a;b', 2, '', 2, 'a;b', [1, 7])"
    # a user assignment to _ is not overwritten
    shim.execute("_ = 'mine'", count=9)
    shim.execute("10", count=10)
    assert shim.execute("_", count=11).result_text() == "'mine'"


def test_output_captured_and_ordered_before_end_token(shim):
    code = (
        "import os, subprocess, sys\n"
        "print('py-1')\n"
        "os.write(1, b'raw-fd-1\\n')\n"
        "subprocess.run(['echo', 'hi from child'])\n"
        "print('py-2', end='')\n"
        "sys.stdout.write('|partial')\n"
        "os.system('echo from-system')\n"
        "print('last')\n"
    )
    res = shim.execute(code)
    _ok(res)
    # line buffering: the unterminated 'py-2|partial' is flushed before the
    # child writes (subprocess/os.system do not flush), so it appears at
    # the latest at the next newline or the end of the request
    assert "py-1\nraw-fd-1\nhi from child\n" in res.stdout
    assert res.stdout.endswith("last\n")
    assert "from-system\n" in res.stdout and "py-2|partial" in res.stdout
    assert "\x1e" not in res.stdout
    # the next request's output is cleanly separated
    assert shim.execute("print('next')").stdout == "next\n"


def test_large_output(shim):
    res = shim.execute("print('x' * 10_000_000)\nprint('tail')", timeout=60)
    _ok(res)
    assert len(res.stdout) == 10_000_000 + 1 + 5
    assert res.stdout.endswith("x\ntail\n")


def test_unicode_output(shim):
    res = shim.execute("print('héllo wörld ✓ 日本語 🎉')\ns = 'ünï'\ns")
    assert res.stdout == "héllo wörld ✓ 日本語 🎉\n"
    assert res.result_text() == "'ünï'"
    # lone surrogates do not break the pipe or the JSON framing
    res = shim.execute("import sys\nprint('bad \\udc80 char')\n'\\udc80'")
    _ok(res)
    assert res.stdout == "bad \\udc80 char\n"


def test_stderr_captured(shim):
    res = shim.execute(
        "import sys, os, warnings\n"
        "print('to err', file=sys.stderr)\n"
        "os.write(2, b'raw err\\n')\n"
        "print('to out')\n"
        "warnings.warn('careful')\n"
    )
    _ok(res)
    assert res.stdout == "to out\n"
    assert res.stderr.startswith("to err\nraw err\n")
    assert "UserWarning: careful" in res.stderr


def test_syntax_error(shim):
    res = shim.execute("x = (1,\ny = 2 +", count=4)
    c = res.content
    assert c["status"] == "error" and c["ename"] == "SyntaxError"
    assert c["execution_count"] == 4 and c["user_expressions"] == {} and c["payload"] == []
    assert c["engine_info"] == {
        "engine_uuid": "uuid-engine-3", "engine_id": 3, "method": "execute"
    }
    tb = _tb(c)
    assert 'File "<cell-4>", line' in tb and "SyntaxError" in tb
    assert "Traceback" not in tb and "parallax_engine_shim" not in tb
    (err,) = res.of("error")
    assert [e["ev"] for e in res.events] == ["error", "reply"]
    assert err["ename"] == "SyntaxError" and err["traceback"] == c["traceback"]
    # the shim is still fine
    assert shim.execute("1 + 1").result_text() == "2"


def test_runtime_error_traceback_has_no_shim_frames(shim):
    shim.execute("def inner():\n    return 1 / 0\n\ndef outer():\n    return inner()", count=1)
    res = shim.execute("x = 3\nouter()", count=2)
    c = res.content
    assert c["status"] == "error"
    assert (c["ename"], c["evalue"]) == ("ZeroDivisionError", "division by zero")
    tb = _tb(c)
    print("\n" + tb)
    assert tb.startswith("Traceback (most recent call last):")
    assert 'File "<cell-2>", line 2, in <module>' in tb
    assert 'File "<cell-1>", line 5, in outer' in tb
    assert "return 1 / 0" in tb
    # Python 3.11+ position markers line up with the source line
    assert "    return inner()\n           ^^^^^^^" in tb
    assert tb.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "parallax_engine_shim" not in tb and "exec" not in tb
    assert all(not s.endswith("\n") for s in c["traceback"])
    assert res.of("error")[0]["traceback"] == c["traceback"]
    # the statement before the error ran; namespace intact
    assert shim.execute("x").result_text() == "3"


def test_chained_exception_and_system_exit(shim):
    res = shim.execute(
        "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('bad') from e"
    )
    tb = _tb(res.content)
    assert "KeyError: 'k'" in tb and "direct cause" in tb and tb.endswith("ValueError: bad")
    res = shim.execute("import sys\nsys.exit(3)")
    assert res.content["ename"] == "SystemExit" and res.content["evalue"] == "3"
    assert shim.execute("'alive'").result_text() == "'alive'"


def test_user_expressions(shim):
    res = shim.execute(
        "a = [1, 2]",
        user_expressions={"length": "len(a)", "bad": "1/0", "name": "undefined_name"},
    )
    ue = _ok(res)["user_expressions"]
    assert ue["length"] == {"status": "ok", "data": {"text/plain": "2"}, "metadata": {}}
    assert ue["bad"]["status"] == "error" and ue["bad"]["ename"] == "ZeroDivisionError"
    assert ue["name"]["ename"] == "NameError" and isinstance(ue["name"]["traceback"], list)


def test_top_level_await_and_futures(shim):
    res = shim.execute("import asyncio\nawait asyncio.sleep(0.01)\nawait asyncio.sleep(0, 'done')")
    assert res.result_text() == "'done'"
    res = shim.execute("async def boom():\n    raise RuntimeError('async boom')\nawait boom()")
    tb = _tb(res.content)
    assert res.content["ename"] == "RuntimeError" and "asyncio" not in tb, tb
    # a __future__ import stays in force for later cells
    shim.execute("from __future__ import annotations")
    res = shim.execute("def g(x: NotDefinedAnywhere): pass\ng.__annotations__['x']")
    assert res.result_text() == "'NotDefinedAnywhere'"


def test_pickle_and_main_module(shim):
    res = shim.execute(
        "import pickle\nclass Point:\n    def __init__(self, x): self.x = x\n"
        "pickle.loads(pickle.dumps(Point(4))).x"
    )
    assert res.result_text() == "4"


def test_ipython_syntax_fallback(shim):
    res = shim.execute("!echo from-bang\nv = 5")
    _ok(res)
    assert "from-bang" in res.stdout
    assert shim.execute("v").result_text() == "5"


def test_real_matplotlib_gets_the_inline_backend(shim):
    # matplotlib and matplotlib-inline are pinned in requirements.txt
    res = shim.execute("import matplotlib")
    assert res.content["status"] == "ok", res.content
    backend = shim.execute("import matplotlib\nmatplotlib.get_backend()").result_text()
    assert "inline" in backend, backend


@pytest.mark.parametrize(
    "magic", ["%matplotlib inline", "%matplotlib", "%pylab inline"]
)
def test_matplotlib_magics_give_inline_png(shim, magic):
    # ipykernel's shell implements enable_gui; IPython's base class raises
    # NotImplementedError ("Implement enable_gui in a subclass")
    res = shim.execute(magic)
    assert res.content["status"] == "ok", res.content
    res = shim.execute(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.title('x')\nNone"
    )
    assert res.content["status"] == "ok", res.content
    pngs = [e for e in res.of("display_data") if "image/png" in e["data"]]
    assert len(pngs) == 1, res.events
    assert base64.b64decode(pngs[0]["data"]["image/png"])[:4] == b"\x89PNG"


def test_matplotlib_gui_backend_is_a_clear_error(shim):
    # IPython prints a magic's UsageError instead of failing the cell
    res = shim.execute("%gui tk")
    assert "not available on a Parallax engine" in res.stderr + res.stdout + str(
        res.content
    ), (res.content, res.stderr)


_FAKE_MPL = {
    "__init__.py": "import os\nseen_backend = os.environ.get('MPLBACKEND')\n",
    "pyplot.py": (
        "_figs = {}\n"
        "class Figure:\n"
        "    def savefig(self, f, format=None, **kw): f.write(b'\\x89PNG fake')\n"
        "    def __repr__(self): return '<Figure fake>'\n"
        "def get_backend(): return 'agg'\n"
        "def figure(num=None):\n"
        "    num = num or len(_figs) + 1\n"
        "    return _figs.setdefault(num, Figure())\n"
        "def get_fignums(): return sorted(_figs)\n"
        "def close(which): _figs.clear()\n"
    ),
}


@pytest.mark.parametrize("mplbackend", [None, "agg"])
def test_matplotlib_hooks_with_fake_matplotlib(tmp_path, mplbackend):
    """matplotlib is not installed here: exercise the guarded code with a fake.

    Unset MPLBACKEND -> the inline backend is chosen (matplotlib_inline is
    installed), like ipykernel.  An Agg backend -> open figures are sent as
    PNG display_data after the cell and closed.
    """
    pkg = tmp_path / "matplotlib"
    pkg.mkdir()
    for name, text in _FAKE_MPL.items():
        (pkg / name).write_text(text)
    env = {"PYTHONPATH": str(tmp_path)}
    if mplbackend:
        env["MPLBACKEND"] = mplbackend
    s = Shim(env=env)
    try:
        res = s.execute("import matplotlib\nmatplotlib.seen_backend")
        expected = mplbackend or "module://matplotlib_inline.backend_inline"
        assert res.result_text() == repr(expected)
        res = s.execute("import matplotlib.pyplot as plt\nplt.figure()\nx = 1")
        _ok(res)
        (d,) = res.of("display_data")
        assert d["data"]["text/plain"] == "<Figure fake>"
        assert base64.b64decode(d["data"]["image/png"]) == b"\x89PNG fake"
        assert s.execute("plt.get_fignums()").result_text() == "[]"
    finally:
        s.close()


# ---------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------


def test_display_html(shim):
    res = shim.execute(
        "print('before')\n"
        "from IPython.display import display, HTML, clear_output\n"
        "display(HTML('<b>bold</b>'))\n"
        "h = display('first', display_id='d1')\n"
        "h.update('second')\n"
        "clear_output(wait=True)\n"
        "print('after')",
        count=1,
    )
    _ok(res)
    assert res.stdout == "before\nafter\n"
    kinds = [e["ev"] for e in res.events]
    assert kinds == ["display_data", "display_data", "display_data", "clear_output", "reply"]
    d0, d1, d2, clr, _ = res.events
    assert d0["data"]["text/html"] == "<b>bold</b>" and "text/plain" in d0["data"]
    assert d0["metadata"] == {} and d0["transient"] == {} and "update" not in d0
    assert d1["data"]["text/plain"] == "'first'" and d1["transient"] == {"display_id": "d1"}
    assert d2["update"] is True and d2["data"]["text/plain"] == "'second'"
    assert clr == {"ev": "clear_output", "id": res.reply["id"], "wait": True}
    # existing variables survive the lazy shell creation; display is a builtin
    res = shim.execute("display(1)\nget_ipython() is not None", count=2)
    assert [e["ev"] for e in res.events] == ["display_data", "execute_result", "reply"]
    assert res.result_text() == "True"


def test_rich_result_uses_ipython_formatter(shim):
    res = shim.execute(
        "class Rich:\n"
        "    def _repr_html_(self): return '<i>rich</i>'\n"
        "    def __repr__(self): return 'Rich()'\n"
        "Rich()"
    )
    (r,) = res.of("execute_result")
    assert r["data"] == {"text/html": "<i>rich</i>", "text/plain": "Rich()"}


def test_existing_variables_survive_shell_creation(shim):
    shim.execute("Out_backup = 1\n_ = 'under'\nIn = 'user In'", count=1)
    shim.execute("import IPython", count=2)
    res = shim.execute("(Out_backup, _, In)", count=3)
    assert res.result_text() == "(1, 'under', 'user In')"


# ---------------------------------------------------------------------------
# apply (ipyparallel)
# ---------------------------------------------------------------------------


def _remote(f):
    """Make a test function travel by value (like functions of a notebook).

    ipyparallel re-imports a function's module on the engine unless it is
    ``__main__``; this test module is not importable there.
    """
    f.__module__ = "__main__"
    return f


@_remote
def _add(x, y=0):
    import os

    print("adding on engine", os.environ["PARALLAX_ENGINE_ID"])
    return x + y


@_remote
def _boom(x):
    raise ValueError(f"apply boom {x}")


def test_apply_roundtrip(shim):
    import numpy as np

    res = shim.apply(_add, (2,), {"y": 40})
    assert res.content == {"status": "ok"}
    assert _result(res) == 42
    assert res.stdout == "adding on engine 3\n"
    assert [e["ev"] for e in res.events] == ["reply"]
    # large numpy payloads travel as separate buffers both ways
    arr = np.arange(100_000, dtype="float64").reshape(250, 400)
    res = shim.apply(_add, (arr,), {"y": 1.0})
    assert len(res.bufs) >= 2
    out = _result(res)
    assert out.shape == (250, 400) and out[249, 399] == 99_999 + 1.0


def test_apply_sees_namespace_and_interactive(shim):
    @_remote
    def uses_global():
        return secret * 2  # noqa: F821 - resolved in the engine's namespace

    shim.execute("secret = 21")
    assert _result(shim.apply(uses_global)) == 42


def test_apply_error_has_engine_info(shim):
    res = shim.apply(_boom, (7,))
    c = res.content
    assert c["status"] == "error" and c["ename"] == "ValueError"
    assert c["evalue"] == "apply boom 7"
    assert c["engine_info"] == {
        "engine_uuid": "uuid-engine-3", "engine_id": 3, "method": "apply"
    }
    assert "__parallax_metadata" not in c
    tb = _tb(c)
    assert "in _boom" in tb and "parallax_engine_shim" not in tb
    assert res.bufs == []
    (err,) = res.of("error")
    assert err["ename"] == "ValueError"


def test_apply_unmet_dependency(shim):
    from ipyparallel.controller.dependency import dependent

    f = dependent(_add, _remote(lambda: False))
    res = shim.apply(f, (1,))
    c = res.content
    assert c["ename"] == "UnmetDependency"
    assert c["__parallax_metadata"] == {"dependencies_met": False}


def test_push_pull_execute_helpers(shim):
    """What Client/DirectView push, pull, dv['x'], scatter, execute send."""
    from ipyparallel import util

    assert shim.apply(util._push, kwargs={"a": 5, "b": [1, 2, 3]}).content == {"status": "ok"}
    assert shim.execute("a + sum(b)").result_text() == "11"
    assert _result(shim.apply(util._pull, ("a",))) == 5
    assert _result(shim.apply(util._pull, (("a", "b"),))) == [5, [1, 2, 3]]
    _ok(shim.apply(util._execute, ("c = a * 10",)))
    assert _result(shim.apply(util._pull, ("c",))) == 50
    res = shim.apply(util._pull, ("nope",))
    assert res.content["ename"] == "NameError"


def test_scatter_gather_map_shapes(shim):
    """scatter pushes a partition, gather pulls it, map applies a mapper."""
    from ipyparallel import util
    from ipyparallel.serialize import Reference

    _ok(shim.apply(util._push, kwargs={"part": [0, 1, 2, 3]}))
    assert _result(shim.apply(util._pull, ("part",))) == [0, 1, 2, 3]

    @_remote
    def square_all(xs):
        return list(map(lambda v: v * v, xs))

    assert _result(shim.apply(square_all, (Reference("part"),))) == [0, 1, 4, 9]

    # DirectView.map: apply(PrePickled(_map), PrePickled(func), partition)
    from ipyparallel.client.remotefunction import _map
    from ipyparallel.serialize import PrePickled

    cube = _remote(lambda v: v ** 3)
    res = shim.apply(PrePickled(_map), (PrePickled(cube), [1, 2, 3]))
    assert _result(res) == [1, 8, 27]


def test_apply_display_and_interrupt_free(shim):
    @_remote
    def show():
        from IPython.display import display, Markdown

        display(Markdown("**md**"))
        return "shown"

    res = shim.apply(show)
    assert _result(res) == "shown"
    (d,) = res.of("display_data")
    assert d["data"]["text/markdown"] == "**md**"


def test_input_and_background_thread_output(shim):
    res = shim.execute("input('prompt? ')")
    assert res.content["ename"] == "StdinNotImplementedError"  # as on ipengine
    res = shim.execute(
        "import threading\n"
        "from IPython.display import display\n"
        "def work():\n"
        "    for i in range(20):\n"
        "        display({'text/plain': f'bg {i}'}, raw=True)\n"
        "        print('line', i)\n"
        "t = threading.Thread(target=work)\n"
        "t.start(); t.join()"
    )
    _ok(res)
    shown = [e["data"]["text/plain"] for e in res.of("display_data")]
    assert shown == [f"bg {i}" for i in range(20)]
    assert res.stdout == "".join(f"line {i}\n" for i in range(20))


# ---------------------------------------------------------------------------
# interrupts
# ---------------------------------------------------------------------------


def test_sigint_during_apply(shim):
    @_remote
    def slow():
        import time

        print("in slow", flush=True)
        time.sleep(60)

    from ipyparallel.serialize import pack_apply_message

    shim.apply(_add, (1,))  # import ipyparallel before timing the interrupt
    shim.send(dict(op="apply", id="slow", engine_id=3, engine_uuid="uuid-engine-3"),
              pack_apply_message(slow, (), {}))
    shim.out.wait_for(b"in slow\n", timeout=10)
    t0 = time.monotonic()
    os.kill(shim.proc.pid, signal.SIGINT)
    while True:
        msg = shim.next_event(timeout=5)
        if msg["ev"] == "reply":
            break
    assert time.monotonic() - t0 < 1.0
    c = msg["content"]
    assert c["ename"] == "KeyboardInterrupt" and c["engine_info"]["method"] == "apply"
    shim.out.until_token(msg["end"], 5)
    shim.err.until_token(msg["end"], 5)
    assert _result(shim.apply(_add, (1, 2))) == 3


def test_sigint_interrupts_running_code_and_keeps_state(shim):
    shim.execute("kept = 'yes'")
    shim.send(dict(op="execute", id="sleepy", code="import time\nprint('sleeping', flush=True)\n"
                   "time.sleep(60)\nkept = 'no'", silent=False, store_history=True,
                   user_expressions={}, execution_count=2))
    shim.out.wait_for(b"sleeping\n", timeout=10)
    time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(shim.proc.pid, signal.SIGINT)
    events = []
    while True:
        msg = shim.next_event(timeout=5)
        events.append(msg)
        if msg["ev"] == "reply":
            break
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    c = msg["content"]
    assert c["status"] == "error" and c["ename"] == "KeyboardInterrupt"
    assert [e["ev"] for e in events] == ["error", "reply"]
    tb = _tb(c)
    assert "time.sleep(60)" in tb and "parallax_engine_shim" not in tb
    shim.out.until_token(msg["end"], 5)
    shim.err.until_token(msg["end"], 5)
    assert shim.execute("kept").result_text() == "'yes'"


def test_sigint_while_idle_is_ignored(shim):
    for _ in range(5):
        os.kill(shim.proc.pid, signal.SIGINT)
        time.sleep(0.02)
    time.sleep(0.2)
    assert shim.proc.poll() is None
    assert shim.execute("1 + 2").result_text() == "3"
    # even after user code replaced the SIGINT handler
    _ok(shim.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)"))
    os.kill(shim.proc.pid, signal.SIGINT)
    time.sleep(0.2)
    assert shim.proc.poll() is None
    assert shim.execute("'still here'").result_text() == "'still here'"


def test_many_sigints_during_output_keep_framing(shim):
    """Interrupts while display/print are in flight never corrupt the pipes."""
    shim.send(dict(op="execute", id="spam", code=(
        "from IPython.display import display\nprint('go', flush=True)\n"
        "while True:\n    display({'text/plain': 'x' * 5000}, raw=True)\n    print('y' * 100)"
    ), silent=False, store_history=True, user_expressions={}, execution_count=1))
    shim.out.wait_for(b"go\n", timeout=15)
    time.sleep(0.2)
    for _ in range(4):  # later ones hit the error path or the idle shim
        os.kill(shim.proc.pid, signal.SIGINT)
        time.sleep(0.003)
    while True:
        msg = shim.next_event(timeout=10)
        if msg["ev"] == "reply":
            break
        assert msg["ev"] in ("display_data", "error")
    assert msg["content"]["ename"] == "KeyboardInterrupt"
    shim.out.until_token(msg["end"], 5)
    shim.err.until_token(msg["end"], 5)
    assert shim.execute("'ok'").result_text() == "'ok'"


# ---------------------------------------------------------------------------
# other requests
# ---------------------------------------------------------------------------


def test_clear(shim):
    shim.execute("gone = 1\n2", count=1)
    res = shim.request("clear")
    assert res.content == {"status": "ok"}
    res = shim.execute("gone", count=2)
    assert res.content["ename"] == "NameError"
    assert shim.execute("(__name__, len.__name__, Out)", count=3).result_text() == (
        "('__main__', 'len', {})"
    )


def test_clear_with_shell(shim):
    shim.execute("import IPython\ngone = 1")
    assert shim.request("clear").content == {"status": "ok"}
    assert shim.execute("gone").content["ename"] == "NameError"
    assert shim.execute("get_ipython() is not None and __name__").result_text() == "'__main__'"


def test_complete(shim):
    shim.execute("import os\nmy_variable = 1\nmy_value = 2")
    c = _ok(shim.request("complete", code="x = my_va", cursor_pos=9))
    assert c["matches"] == ["my_value", "my_variable"]
    assert (c["cursor_start"], c["cursor_end"]) == (4, 9) and c["metadata"] == {}
    c = _ok(shim.request("complete", code="os.pa", cursor_pos=5))
    # rlcompleter answers "os.path" from 0, IPython's completer ".path" from 2
    assert "os.path" in ["os.pa"[: c["cursor_start"]] + m for m in c["matches"]], c
    c = _ok(shim.request("complete", code="pri", cursor_pos=3))
    assert "print" in c["matches"]
    c = _ok(shim.request("complete", code="imp", cursor_pos=3))
    assert "import" in c["matches"]  # rlcompleter's "import " decoration removed
    # with an IPython shell the IPython completer is used
    shim.execute("import IPython")
    c = _ok(shim.request("complete", code="x = my_va", cursor_pos=9))
    assert set(c["matches"]) >= {"my_value", "my_variable"}


def test_inspect(shim):
    shim.execute("def documented(a, b=2):\n    '''Adds things.'''\n    return a + b")
    c = _ok(shim.request("inspect", code="documented(", cursor_pos=11, detail_level=0))
    assert c["found"] is True
    text = c["data"]["text/plain"]
    assert "documented(a, b=2)" in text and "Adds things." in text
    c = _ok(shim.request("inspect", code="documented", cursor_pos=3, detail_level=1))
    assert "return a + b" in c["data"]["text/plain"]
    c = _ok(shim.request("inspect", code="len", cursor_pos=3, detail_level=0))
    assert c["found"] and "Return the number of items" in c["data"]["text/plain"]
    c = _ok(shim.request("inspect", code="nothing_here", cursor_pos=5, detail_level=0))
    assert c["found"] is False and c["data"] == {}


@pytest.mark.parametrize(
    "code, status, indent",
    [
        ("x = 1", "complete", None),
        ("for i in range(3):", "incomplete", "    "),
        ("for i in range(3):\n    print(i)", "incomplete", "    "),
        ("for i in range(3):\n    print(i)\n", "complete", None),
        ("x = (", "incomplete", ""),
        ("x = [1,\n     2", "incomplete", "     "),
        ("if x:\n    if y:", "incomplete", "        "),
        # IPython's check_complete (what ipykernel answers) counts a tab as one
        # column and answers in spaces
        ("if x:\n\tif y:", "incomplete", "     "),
        ("x = [1,\n     2]", "complete", None),
        ("1+", "invalid", None),
        ("x = )", "invalid", None),
        ("", "complete", None),
    ],
)
def test_is_complete(shim, code, status, indent):
    c = shim.request("is_complete", code=code).content
    assert c["status"] == status
    if indent is not None:
        assert c["indent"] == indent


def test_numeric_request_ids_are_echoed(shim):
    """The Rust engine numbers its requests; ids are opaque to the shim."""
    shim.send({"op": "execute", "id": 41, "code": "print('n')\n6 * 7", "silent": False,
               "store_history": True, "user_expressions": {}, "execution_count": 1})
    res = shim.next_event()
    assert res["ev"] == "execute_result" and res["id"] == 41
    reply = shim.next_event()
    assert reply["ev"] == "reply" and reply["id"] == 41
    assert shim.out.until_token(reply["end"], 5) == b"n\n"
    shim.err.until_token(reply["end"], 5)
    # apply without engine_id/engine_uuid (as the Rust engine sends it):
    # engine_info comes from PARALLAX_ENGINE_ID / PARALLAX_ENGINE_UUID
    from ipyparallel.serialize import pack_apply_message

    res = shim.request("apply", bufs=pack_apply_message(_boom, (1,), {}))
    assert res.content["engine_info"] == {
        "engine_uuid": "uuid-engine-3", "engine_id": 3, "method": "apply"
    }


def test_marker_follows_unterminated_output_directly(shim):
    """Output that does not end with a newline is followed directly by the
    end marker: readers must find "\\x1e<token>\\n" anywhere, not only at a
    line start (the token starts with the ready event's end_prefix)."""
    res = shim.execute("import os\nprint('partial', end='')\nos.write(2, b'raw')")
    _ok(res)
    assert res.stdout == "partial" and res.stderr == "raw"
    assert res.reply["end"].startswith(shim.ready["end_prefix"])


def test_unknown_op(shim):
    res = shim.request("frobnicate")
    assert res.content == {
        "status": "error",
        "ename": "ValueError",
        "evalue": "unknown op 'frobnicate'",
        "traceback": [],
    }
    assert [e["ev"] for e in res.events] == ["reply"]
    assert shim.execute("1").result_text() == "1"


def test_shutdown(shim):
    shim.execute("import atexit\natexit.register(lambda: print('bye'))")
    res = shim.request("shutdown")
    assert res.content == {"status": "ok", "restart": False}
    assert shim.proc.wait(timeout=5) == 0


def test_closing_command_pipe_exits_when_idle(shim):
    shim.close_cmd()
    assert shim.proc.wait(timeout=3) == 0


def test_closing_command_pipe_exits_while_busy(shim):
    shim.send(dict(op="execute", id="busy", code="import time\nprint('busy', flush=True)\n"
                   "time.sleep(60)", silent=False, store_history=True,
                   user_expressions={}, execution_count=1))
    shim.out.wait_for(b"busy\n", timeout=10)
    t0 = time.monotonic()
    shim.close_cmd()
    shim.proc.wait(timeout=3)
    assert time.monotonic() - t0 < 2


# ---------------------------------------------------------------------------
# a Python without IPython / ipyparallel
# ---------------------------------------------------------------------------


def _bare_python():
    for cand in ("/usr/bin/python3", shutil.which("python3") or ""):
        if not cand or not os.path.exists(cand) or os.path.realpath(cand) == os.path.realpath(PY):
            continue
        probe = subprocess.run(
            [cand, "-c", "import sys, importlib.util as u; "
             "sys.exit(0 if sys.version_info >= (3, 9) and u.find_spec('IPython') is None "
             "and u.find_spec('ipyparallel') is None else 1)"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return cand
    return None


def test_python_without_ipython():
    bare = _bare_python()
    if bare is None:
        pytest.skip("no Python without IPython/ipyparallel on this machine")
    s = Shim(python=bare, env={"PYTHONPATH": "", "VIRTUAL_ENV": ""})
    try:
        assert s.ready["ipython"] is False and s.ready["ipyparallel"] is False
        assert s.execute("[1, 2][-1]").result_text() == "2"
        res = s.request("apply", bufs=[b"x", b"y"], engine_id=3, engine_uuid="u")
        c = res.content
        assert c["status"] == "error" and c["ename"] == "ImportError"
        assert "ipyparallel" in c["evalue"]
        assert c["engine_info"]["method"] == "apply"
        c = s.request("complete", code="pri", cursor_pos=3).content
        assert "print" in c["matches"]
        assert s.execute("get_ipython()").of("execute_result") == []
    finally:
        s.close()


def test_publish_data_sends_a_data_pub_event(shim):
    # ipyparallel.datapub.publish_data needs ipykernel's shell on ipengine;
    # here it becomes a data_pub event with serialize_object's buffers
    @_remote
    def task():
        from ipyparallel.datapub import publish_data

        publish_data({"i": 1})
        publish_data({"i": 2, "name": "x"})
        return "done"

    res = shim.apply(task)
    assert res.content["status"] == "ok", res.content
    evs = res.of("data_pub")
    assert [e["keys"] for e in evs] == [["i"], ["i", "name"]], res.events
    assert all(e["id"] == res.reply["id"] for e in evs)
    # also through the shell, as get_ipython().data_pub
    res = shim.execute("get_ipython().data_pub.publish_data({'k': 3})")
    assert res.content["status"] == "ok", res.content
    assert [e["keys"] for e in res.of("data_pub")] == [["k"]]


def test_warmup_imports_in_the_background_and_keeps_the_namespace():
    """After ``ready`` a thread imports IPython and ipyparallel's serializer;
    the shell is created by the main thread while idle; the first request
    waits for a warm-up still running; user variables are untouched."""
    s = Shim()
    try:
        res = s.execute(
            "import sys\nx = 5\n"
            "('ipyparallel.serialize' in sys.modules, get_ipython() is not None, x)"
        )
        assert res.result_text() == "(True, True, 5)", res.content
        assert s.execute("x").result_text() == "5"
    finally:
        s.close()


def test_input_raises_stdin_not_implemented(shim):
    res = shim.execute("input('name? ')")
    assert res.content["ename"] == "StdinNotImplementedError", res.content
    assert "does not support input requests" in res.content["evalue"]
    res = shim.execute("import getpass\ngetpass.getpass()")
    assert res.content["ename"] == "StdinNotImplementedError", res.content
    res = shim.execute(
        "from IPython.core.error import StdinNotImplementedError\n"
        "try:\n    input()\nexcept StdinNotImplementedError:\n    ok = 1\nok"
    )
    assert res.result_text() == "1", res.content


def _execute_cmd(rid, code, **kw):
    return dict(op="execute", id=rid, code=code, silent=False, store_history=True,
                user_expressions={}, execution_count=1, **kw)


def _until_reply(shim, timeout=10):
    events = []
    while True:
        msg = shim.next_event(timeout=timeout)
        events.append(msg)
        if msg["ev"] == "reply":
            shim.out.until_token(msg["end"], 5)
            shim.err.until_token(msg["end"], 5)
            return events


def test_input_is_forwarded_when_the_request_allows_stdin(shim):
    shim.send(_execute_cmd("ask", "print('before')\nx = input('name? ')\nprint(x.upper())\n"
                                  "import getpass\npw = getpass.getpass()\nlen(pw)", stdin=True))
    ev = shim.next_event(timeout=10)
    assert ev["ev"] == "input_request", ev
    assert (ev["id"], ev["prompt"], ev["password"]) == ("ask", "name? ", False)
    # output printed before input() is flushed before the prompt goes out
    shim.out.wait_for(b"before\n", timeout=5)
    shim.send(dict(op="input_reply", seq=ev["seq"] + 100, value="stale"))  # skipped
    shim.send(dict(op="input_reply", seq=ev["seq"], value="ada"))
    ev2 = shim.next_event(timeout=10)
    assert ev2["ev"] == "input_request" and ev2["password"] is True, ev2
    assert ev2["prompt"] == "Password: " and ev2["seq"] != ev["seq"]
    shim.send(dict(op="input_reply", seq=ev2["seq"], value="s3cret"))
    events = _until_reply(shim)
    assert events[-1]["content"]["status"] == "ok", events
    assert [e["data"]["text/plain"] for e in events if e["ev"] == "execute_result"] == ["6"]
    assert b"ADA\n" in bytes(shim.out.data)
    # the next request without stdin refuses again
    res = shim.execute("input()")
    assert res.content["ename"] == "StdinNotImplementedError", res.content


def test_refused_input_names_the_clients_reason(shim):
    why = "is forwarded to the notebook only when a cell targets one engine; this cell targets 4 engines"
    res = shim.execute("input('x')", stdin_refused=why)
    assert res.content["ename"] == "StdinNotImplementedError"
    assert res.content["evalue"] == "input() " + why
    res = shim.execute("import getpass\ngetpass.getpass()", stdin_refused=why)
    assert res.content["evalue"] == "getpass() " + why
    # a thread may not wait (the main loop reads the same pipe)
    res = shim.execute(
        "import threading\nerr = []\n"
        "def f():\n    try:\n        input()\n    except Exception as e:\n        err.append(str(e))\n"
        "t = threading.Thread(target=f); t.start(); t.join()\nerr[0]", stdin=True)
    assert "only from the main thread" in res.result_text(), res.content


def test_sigint_ends_a_wait_for_input_and_a_late_answer_is_dropped(shim):
    shim.execute("kept = 'yes'")
    shim.send(_execute_cmd("ask", "kept = input('never? ')", stdin=True))
    ev = shim.next_event(timeout=10)
    assert ev["ev"] == "input_request", ev
    time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(shim.proc.pid, signal.SIGINT)
    events = _until_reply(shim, timeout=5)
    assert time.monotonic() - t0 < 2.0
    c = events[-1]["content"]
    assert c["status"] == "error" and c["ename"] == "KeyboardInterrupt", c
    # the answer arrives after the interrupt: the shim skips it silently
    shim.send(dict(op="input_reply", seq=ev["seq"], value="late"))
    assert shim.execute("kept").result_text() == "'yes'"
