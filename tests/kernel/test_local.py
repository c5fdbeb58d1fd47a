"""Issue 12: the Parallax Python kernel's local interpreter and the client
in its namespace.

`%%local` cells, `%local` lines, unmarked cells under `%autopx` off and the
local half of `%%px --local` run in a Python process of the kernel's own;
`rc`, `dview`, `lview` there are the stock ipyparallel client on the
kernel's cluster; `--out NAME` binds the AsyncResult locally. Real kernel
under jupyter_client, real hub, engines and local Python.
"""

from __future__ import annotations

import time

import psutil
import pytest

from kernel_harness import Kernel, strip_ansi, wait_for

pytestmark = pytest.mark.timeout(150)

ENGINES = [0, 1, 2, 3]


def ok(k: Kernel, code: str, timeout: float = 60):
    r = k.execute(code, timeout=timeout)
    assert r.status == "ok", f"{code!r} failed:\n{r.describe()}"
    return r


def local_pid(k: Kernel) -> int:
    r = ok(k, "%%local\nimport os\nprint(os.getpid())")
    return int(r.stdout().strip())


def test_local_cells_have_their_own_namespace_and_plain_outputs(k4):
    r = ok(k4, "%%local\nhome = 6 * 7\nprint('at home', home)\nhome + 1")
    # plain output: no [stdout:N] prefix, the value as the cell's Out[n]
    assert r.streams("stdout") == ["at home 42\n"], r.describe()
    assert r.plain("execute_result") == ["43"], r.describe()
    assert r.of_type("execute_result")[0]["content"]["execution_count"] == r.content["execution_count"]
    # the engines do not have it, the local namespace keeps it
    out = ok(k4, "print('home' in globals())").stdout_by_engine()
    assert out == {e: "False\n" for e in ENGINES}, out
    r = ok(k4, "%local print(home)")
    assert r.stdout() == "42\n", r.describe()
    # one process, not one per cell; not an engine, not the kernel
    pid = local_pid(k4)
    assert pid == local_pid(k4)
    assert pid in {p.pid for p in k4.descendants()}
    # IPython syntax runs locally in local cells
    r = ok(k4, "%%local\n%timeit -n 2 -r 1 sum(range(10))")
    assert "per loop" in r.stdout() and "[stdout:" not in r.stdout(), r.describe()
    r = ok(k4, "%%local\n!echo local-bang")
    assert r.stdout().strip() == "local-bang", r.describe()


def test_local_errors_and_rich_display(k4):
    r = k4.execute("%%local\n1/0", timeout=60)
    assert r.status == "error" and r.content["ename"] == "ZeroDivisionError", r.describe()
    r = ok(k4, "%%local\nfrom IPython.display import HTML, display\ndisplay(HTML('<b>local</b>'))")
    (d,) = r.of_type("display_data")
    assert d["content"]["data"]["text/html"] == "<b>local</b>", r.describe()


def test_autopx_off_runs_unmarked_cells_locally(k4):
    ok(k4, "%autopx")
    try:
        r = ok(k4, "where = 'local'\n%timeit -n 1 -r 1 1\nwhere")
        assert r.plain("execute_result") == ["'local'"], r.describe()
        assert "[stdout:" not in r.stdout()
        # %px still reaches the engines
        out = ok(k4, "%px print('where' in globals())").stdout_by_engine()
        assert out == {e: "False\n" for e in ENGINES}, out
    finally:
        ok(k4, "%autopx")
    out = ok(k4, "print('engines again')").stdout_by_engine()
    assert sorted(out) == ENGINES


def test_client_in_the_local_namespace(k4):
    r = ok(k4, "%%local\nsorted(rc.ids), type(rc).__module__, type(dview).__name__, type(lview).__name__")
    assert r.plain("execute_result") == [
        "([0, 1, 2, 3], 'ipyparallel.client.client', 'DirectView', 'LoadBalancedView')"
    ], r.describe()
    # the seed tutorial: apply on one engine and all, map on a load-balanced view
    cell = """%%local
def mul(a, b):
    return a * b
rc.block = True
print(rc[0].apply(mul, 5, 6))
print(rc[:].apply(mul, 5, 6))
print(lview.map(mul, range(1, 10), range(2, 11), block=True))
"""
    r = ok(k4, cell)
    assert r.stdout() == "30\n[30, 30, 30, 30]\n[2, 6, 12, 20, 30, 42, 56, 72, 90]\n", r.describe()
    # a bare Client() finds the kernel's cluster (the tutorial's first cell)
    r = ok(k4, "%%local\nimport ipyparallel as parallel\nc2 = parallel.Client()\nprint(sorted(c2.ids))\nc2.close()")
    assert r.stdout() == "[0, 1, 2, 3]\n", r.describe()


def test_values_move_between_notebook_and_engines(k4):
    ok(k4, "%%local\ndview.block = True\ndview.push({'pushed': 5})\ndview.scatter('part', list(range(8)))")
    out = ok(k4, "print(pushed, part)").stdout_by_engine()
    assert out == {0: "5 [0, 1]\n", 1: "5 [2, 3]\n", 2: "5 [4, 5]\n", 3: "5 [6, 7]\n"}, out
    ok(k4, "squared = [x * x for x in part]")
    r = ok(k4, "%%local\nprint(dview.gather('squared'), dview['pushed'], dview.pull('pushed', targets=1))")
    assert r.stdout() == "[0, 1, 4, 9, 16, 25, 36, 49] [5, 5, 5, 5] 5\n", r.describe()


def test_client_requests_do_not_leak_into_kernel_cells(k4):
    # the local client's output stays with its AsyncResult; the next kernel
    # cell shows only its own output
    r = ok(k4, "%%local\nar = dview.execute('print(\"from-client\")', block=True)\nprint(sorted(ar.stdout))")
    assert "from-client" in r.stdout() and "[stdout:" not in r.stdout(), r.describe()
    out = ok(k4, "print('from-kernel')").stdout_by_engine()
    assert out == {e: "from-kernel\n" for e in ENGINES}, out
    # and a kernel cell's output never reaches the client's results
    r = ok(k4, "%%local\nprint(set(rc.results) <= set(rc.history))")
    assert r.stdout() == "True\n", r.describe()


def test_px_local_runs_on_the_engines_and_locally(k4):
    r = ok(k4, "%%px --local\nimport os\nboth = os.getpid()\nprint('ran', both > 0)")
    # the local half first, plainly; then the engines' results, shown as
    # ipyparallel's display_outputs shows them
    streams = r.streams("stdout")
    assert streams == ["ran True\n"] + [f"[stdout:{e}] \nran True\n" for e in ENGINES], r.describe()
    local = ok(k4, "%local print(both)").stdout().strip()
    engines = ok(k4, "print(both)").stdout_by_engine()
    assert local not in {v.strip() for v in engines.values()}
    assert int(local) == local_pid(k4)


def test_px_out_binds_the_async_result_locally(k4):
    ok(k4, "%%px --out pxres\nimport os\nos.getpid()")
    r = ok(k4, "%%local\npxres.wait(10)\nprint(type(pxres).__name__, len(pxres.get()), pxres.successful())")
    assert r.stdout().startswith("AsyncHubResult 4 True"), r.describe()
    # %pxresult still knows the name
    r = ok(k4, "%pxresult --out pxres")
    shown = [strip_ansi(t) for t in r.plain()]
    assert [t.split(":")[0] for t in shown] == ["Out[0", "Out[1", "Out[2", "Out[3"], r.describe()


def test_interrupt_and_crash_of_local_code(k4):
    ok(k4, "%local keep = 'kept'")
    msg_id = k4.send_execute("%%local\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    time.sleep(1.5)
    k4.control_request("interrupt_request")
    r = k4.collect(msg_id, timeout=30)
    assert r.status == "error" and r.content["ename"] == "KeyboardInterrupt", r.describe()
    # the namespace survives an interrupt
    assert ok(k4, "%local print(keep)").stdout() == "kept\n"
    pid = local_pid(k4)
    r = k4.execute("%%local\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)", timeout=60)
    assert r.status == "error" and r.content["ename"] == "LocalInterpreterError", r.describe()
    assert "SIGKILL" in r.content["evalue"] and "rc, dview and lview" in r.content["evalue"], r.describe()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # a fresh process with a fresh namespace, the client bound again
    assert local_pid(k4) != pid
    r = ok(k4, "%%local\nprint('keep' in globals(), sorted(rc.ids))")
    assert r.stdout() == "False [0, 1, 2, 3]\n", r.describe()


def test_complete_and_inspect_in_local_cells(k4):
    ok(k4, "%local local_only_name = 1")
    k4.drain_iopub()
    reply = k4.shell_reply(k4.kc.complete("%%local\nlocal_only_", 19), 10)
    assert "local_only_name" in reply["content"]["matches"], reply
    reply = k4.shell_reply(k4.kc.inspect("%%local\nlocal_only_name", 20), 10)
    assert reply["content"]["found"] and "int" in reply["content"]["data"]["text/plain"], reply
    # an engine cell asks the engines, which do not have it
    reply = k4.shell_reply(k4.kc.complete("local_only_", 11), 10)
    assert "local_only_name" not in reply["content"]["matches"], reply


def test_local_interpreter_is_started_only_when_used_and_stopped_with_the_kernel():
    with Kernel(engines=2) as k:
        ok(k, "x = 1")
        before = {p.pid for p in k.descendants()}
        pid = local_pid(k)
        # started by the first local cell, a child of the kernel
        assert pid not in before
        assert pid in {p.pid for p in k.descendants()}
    assert wait_for(lambda: not psutil.pid_exists(pid), 15)


def test_rust_kernel_says_local_cells_are_python_only():
    with Kernel(engines=1, extra_args=["--language", "rust"]) as k:
        for cell in ("%%local\nlet x = 1;", "%local 1", "%%px --local\nlet y = 2;"):
            r = k.execute(cell, timeout=120)
            assert r.status == "error" and r.content["ename"] == "UsageError", r.describe()
            assert "not available in the Rust kernel" in r.content["evalue"], r.describe()


def test_setup_without_ipyparallel_or_cluster_gives_stand_ins_that_say_why():
    """local_setup.py itself (run by the kernel in the local namespace):
    without ipyparallel, or without a cluster file, rc/dview/lview say why
    on every use instead of being missing names."""
    import subprocess
    import sys
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[2] / "kernel/src/local_setup.py").read_text()
    probe = setup + """
import sys
sys.modules['ipyparallel'] = None   # import ipyparallel -> ImportError
_parallax_local_setup('/nonexistent/client.json')
print(repr(rc).startswith('<no ipyparallel client: ipyparallel is not importable'))
for use in (lambda: rc.ids, lambda: dview['x'], lambda: lview.map(abs, [1])):
    try:
        use()
    except RuntimeError as e:
        print('pip install ipyparallel' in str(e))
del sys.modules['ipyparallel']
_parallax_local_setup(None)
try:
    rc[:]
except RuntimeError as e:
    print(str(e))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True", "True", "True", "True", "this kernel has no cluster connection file"], r.stdout
