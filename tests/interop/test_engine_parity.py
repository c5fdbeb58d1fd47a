"""ipengine parity (issue 13): each behaviour checked on a stock ipengine
and on a Parallax engine side by side, on the suite's hub (ours, or stock
ipcontroller with PARALLAX_HUB_CMD), driven by the stock Client.

* traitlets options as ipcluster and users pass them;
* `%matplotlib inline`, `%matplotlib`, `%pylab inline` (figures as PNG
  display_data);
* `ipyparallel.datapub.publish_data` updating `AsyncResult.data` live;
* abort after error: execute_requests queued behind a failed one are
  aborted (ipykernel 7's stop_on_error), apply_requests are not;
* a crashed interpreter: ipengine exits (its nanny unregisters it); a
  Parallax engine does the same with `--restart-on-crash=false`.
"""

from __future__ import annotations

import base64
import json
import os
import time

import pytest

from .harness import REPO, REPLY_TIMEOUT, Gate, gated, raises_remote, wait_until

T = REPLY_TIMEOUT
PARALLAX_BIN = os.environ.get("PARALLAX_BIN") or str(REPO / "target" / "release" / "parallax")
KINDS = {"ipengine": [], "parallax": [PARALLAX_BIN, "engine"]}


@pytest.fixture(params=list(KINDS), scope="module")
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def one(kind, tmp_path_factory):
    """One hub + one engine of `kind`, shared by the module's tests."""
    from .harness import HubCluster

    c = HubCluster(tmp_path_factory.mktemp(f"parity-{kind}"), engines=1,
                   label=f"parity-{kind}", engine_cmd=KINDS[kind])
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _outputs(ar):
    ar.get(60)
    ar.wait_for_output(T)
    return ar.outputs


def test_traitlets_options_as_ipcluster_passes_them(kind, make_cluster):
    c = make_cluster(engines=0, engine_cmd=KINDS[kind])
    key = json.load(open(c.connection_file("engine")))["key"]
    c.engine_args = [
        "--InteractiveShell.colors=nocolor",
        "--IPEngine.wait_for_url_file=30",
        "--EngineFactory.timeout=10",
        f"--Session.key={key}",
        "--IPEngine.enable_nanny=False",
        "--BaseParallelApplication.work_dir=" + str(c.root),
    ]
    c.start_engines(1)
    c.wait_for_engines(1)
    rc = c.client
    assert rc[0].apply_sync(os.getcwd) == str(c.root)
    log = (c.log_dir / "engine-0.log").read_text()
    if kind == "parallax":
        # (ipengine logs its config, key included, at DEBUG)
        assert key not in log
        assert "--IPEngine.enable_nanny=False accepted, no effect" in log, log
        assert "--EngineFactory.timeout=10 honoured as --timeout=10" in log, log


def test_malformed_traitlets_option_is_a_clear_error(make_cluster):
    import subprocess

    p = subprocess.run(
        [PARALLAX_BIN, "engine", "--IPEngine.=3"], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 2
    assert "malformed ipengine option" in p.stderr, p.stderr


@pytest.mark.parametrize("magic", ["%matplotlib inline", "%matplotlib", "%pylab inline"])
def test_matplotlib_magics(one, magic):
    rc = one.client
    out = _outputs(rc[0].execute(magic, block=False))
    assert not [o for o in out if "image/png" in o.get("data", {})]
    code = "import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 3, 2])\nNone"
    out = _outputs(rc[0].execute(code, block=False))
    pngs = [o for o in out if "image/png" in o["data"]]
    assert len(pngs) == 1, out
    assert base64.b64decode(pngs[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def _publish_then_wait(path, limit):
    import os
    import time

    from ipyparallel.datapub import publish_data

    publish_data({"step": 1})
    with open(path + ".started", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    publish_data({"step": 2, "done": True})
    return "finished"


def test_publish_data_updates_asyncresult_data_live(one, tmp_path):
    rc = one.client
    gate = Gate(tmp_path)
    ar = rc[0].apply_async(_publish_then_wait, *gate.args())
    gate.wait_started()
    # the first publication arrives while the task still runs
    wait_until(lambda: ar.data == {"step": 1}, T, msg=f"no live data: {ar.data!r}")
    assert not ar.ready()
    gate.open()
    assert ar.get(T) == "finished"
    wait_until(lambda: ar.data == {"step": 2, "done": True}, T, msg=f"data: {ar.data!r}")


def _queue_behind_a_failure(e, tmp_path, silent):
    """Hold the engine with a gated apply, queue `b / 0`, `b *= 2`, an apply
    and `b *= 3` behind it, release; return their AsyncResults."""
    gate = Gate(tmp_path)
    held = e.apply_async(gated, *gate.args())
    gate.wait_started()
    ars = [
        e.execute("b / 0", block=False, silent=silent),
        e.execute("b *= 2", block=False, silent=silent),
        e.apply_async(lambda: "apply runs"),
        e.execute("b *= 3", block=False, silent=silent),
    ]
    time.sleep(0.5)  # let every request reach the engine's queue
    gate.open()
    held.get(T)
    return ars


def test_abort_after_error(one, tmp_path):
    """ipykernel 7's stop_on_error, as `%px` (silent=False) sees it: the
    execute_requests already queued behind a failed one are aborted; an
    apply_request is not; requests sent afterwards run."""
    import ipyparallel as ipp

    e = one.client[0]
    e.execute("b = 1", block=True)
    failing, doubled, applied, tripled = _queue_behind_a_failure(e, tmp_path, silent=False)
    with raises_remote("ZeroDivisionError"):
        failing.get(T)
    for ar in (doubled, tripled):
        with pytest.raises(ipp.error.TaskAborted):
            ar.get(T)
    assert applied.get(T) == "apply runs"
    # the window closes once the queue is drained: later requests run
    e.execute("b += 10", block=True)
    assert e.pull("b", block=True) == 11


def test_silent_failure_aborts_nothing(one, tmp_path):
    """The Client's execute() is silent by default: no abort (ipykernel
    aborts only after a non-silent failure)."""
    e = one.client[0]
    e.execute("b = 1", block=True)
    failing, doubled, applied, tripled = _queue_behind_a_failure(e, tmp_path, silent=True)
    with raises_remote("ZeroDivisionError"):
        failing.get(T)
    doubled.get(T)
    tripled.get(T)
    assert applied.get(T) == "apply runs"
    assert e.pull("b", block=True) == 6


def test_crashed_interpreter_makes_the_engine_leave(kind, make_cluster):
    args = ["--restart-on-crash=false"] if kind == "parallax" else []
    c = make_cluster(engines=1, engine_cmd=KINDS[kind], engine_args=args)
    rc = c.client
    assert rc[0].apply_sync(lambda: 1) == 1
    ar = rc[0].execute("import os; os._exit(3)", block=False)
    with raises_remote("EngineError"):
        ar.get(30)
    wait_until(lambda: rc.ids == [], 30, msg=f"engine still registered: {rc.ids}")
    wait_until(lambda: not c.engines[0].alive(), 30, msg="engine process did not exit")


def test_input_is_stdin_not_implemented(one):
    """No request to an engine allows stdin: ipykernel raises
    StdinNotImplementedError, and so does a Parallax engine (it used to be a
    bare EOFError from /dev/null)."""
    e = one.client[0]
    with raises_remote("StdinNotImplementedError") as info:
        e.execute("input('name? ')", block=True, silent=False)
    assert "does not support input requests" in info.errors[0].evalue
    assert e.apply_sync(lambda: 3) == 3


def test_hub_takes_ipcontroller_traitlets_options(make_cluster):
    """The same hub options as traitlets (what ipcluster profiles pass);
    stock ipcontroller reads them natively, our hub translates them."""
    from .harness import HUB_IS_IPCONTROLLER

    c = make_cluster(engines=1, hub_args=[
        "--HeartMonitor.max_heartmonitor_misses=20",
        "--TaskScheduler.scheme_name=lru",
        "--IPController.db_class=NoDB",
        "--IPController.use_threads=False",
        "--InteractiveShell.colors=nocolor",
    ])
    rc = c.client
    assert rc.load_balanced_view().apply_sync(lambda: 7) == 7
    if not HUB_IS_IPCONTROLLER:
        log = (c.log_dir / "hub.log").read_text()
        assert "--HeartMonitor.max_heartmonitor_misses=20 honoured as --max-heartbeat-misses=20" in log, log
        assert "--IPController.db_class=NoDB honoured as --nodb" in log, log
        assert "scheme=lru" in log, log
