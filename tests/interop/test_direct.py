"""DirectView traffic (MUX + control + iopub) through the hub."""

import json
import os

import pytest

import ipyparallel as ipp

from .harness import (
    REPLY_TIMEOUT,
    gated,
    connection_file_mode,
    raises_remote,
    within,
)

ENGINES = 3
T = REPLY_TIMEOUT


def test_connection_files(cluster):
    client_keys = {
        "key", "signature_scheme", "pack", "unpack", "interface", "location",
        "registration", "control", "mux", "task", "task_scheme", "iopub",
        "notification", "broadcast",
    }  # fmt: skip
    engine_keys = {
        "key", "signature_scheme", "pack", "unpack", "interface", "location",
        "registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong",
        "broadcast",
    }  # fmt: skip
    cinfo = json.loads(cluster.connection_file("client").read_text())
    einfo = json.loads(cluster.connection_file("engine").read_text())
    assert client_keys <= set(cinfo), client_keys - set(cinfo)
    assert engine_keys <= set(einfo), engine_keys - set(einfo)
    assert cinfo["key"] == einfo["key"] and cinfo["key"]
    assert cinfo["signature_scheme"] == "hmac-sha256"
    assert cinfo["interface"] == "tcp://127.0.0.1"
    assert cinfo["task_scheme"] == "leastload"  # ipcontroller's default scheme
    assert isinstance(cinfo["broadcast"], int)
    assert isinstance(einfo["broadcast"], list) and einfo["broadcast"]
    for kind in ("client", "engine"):
        assert connection_file_mode(cluster.connection_file(kind)) == 0o600


def test_ids(rc):
    assert rc.ids == list(range(ENGINES))
    assert len(rc) == ENGINES
    # every engine has a distinct uuid
    assert len(set(rc._engines[i] for i in rc.ids)) == ENGINES
    assert [v.targets for v in rc] == rc.ids


def test_wait_for_engines(rc):
    assert rc.wait_for_engines(ENGINES, timeout=5) is None
    f = rc.wait_for_engines(ENGINES, block=False)
    assert f.done()
    with pytest.raises(TimeoutError):
        rc.wait_for_engines(ENGINES + 1, timeout=0.5)


def test_second_client_sees_engines(cluster):
    rc2 = cluster.connect()
    try:
        assert rc2.ids == list(range(ENGINES))
        assert rc2._engines == cluster.client._engines
        assert rc2[:].apply_async(lambda: "hi").get(T) == ["hi"] * ENGINES
    finally:
        rc2.close()


def test_apply_sync_all(rc):
    dv = rc[:]
    assert within(T, dv.apply_sync, lambda x, y=1: x + y, 41) == [42] * ENGINES
    assert within(T, dv.apply_sync, lambda x, y=1: x + y, 40, y=2) == [42] * ENGINES


def test_apply_metadata_and_engine_identity(rc):
    ar = rc[:].apply_async(os.getpid)
    pids = ar.get(T)
    assert len(set(pids)) == ENGINES
    assert ar.engine_id == rc.ids
    assert ar.engine_uuid == [rc._engines[i] for i in rc.ids]
    for md in ar._metadata:
        assert md["status"] == "ok"
        assert md["submitted"] <= md["started"] <= md["completed"] <= md["received"]
    # a single engine
    ar = rc[1].apply_async(os.getpid)
    assert ar.get(T) == pids[1]
    assert ar.engine_id == 1


def test_apply_large_buffers_roundtrip(rc):
    payload = os.urandom(2 * 1024 * 1024)  # big enough for zero-copy buffers
    ar = rc[:].apply_async(lambda b: (len(b), b[:16], b[-16:]), payload)
    expected = (len(payload), payload[:16], payload[-16:])
    assert ar.get(T) == [expected] * ENGINES
    ar = rc[0].apply_async(lambda b: b, payload)
    assert ar.get(T) == payload


def test_apply_error(rc):
    with raises_remote("ZeroDivisionError") as info:
        rc[2].apply_async(lambda: 1 / 0).get(T)
    (err,) = info.errors
    assert err.engine_info["engine_id"] == 2
    assert err.engine_info["method"] == "apply"

    with raises_remote("ValueError") as info:
        rc[:].apply_async(lambda: int("x")).get(T)
    assert sorted(e.engine_info["engine_id"] for e in info.errors) == rc.ids


def test_execute(rc):
    dv = rc[:]
    ar = dv.execute("a = 5\nb = a * 2", block=False)
    ar.get(T)
    assert dv.pull("b", block=False).get(T) == [10] * ENGINES

    ar = dv.execute("b + 1", silent=False, block=False)
    replies = ar.get(T)
    ar.wait_for_output(T)  # execute_result travels on iopub
    assert len(replies) == ENGINES
    for reply in replies:
        assert reply.execute_result["data"]["text/plain"] == "11"

    with raises_remote("NameError") as info:
        rc[0].execute("undefined_name_xyz", block=False).get(T)
    assert info.errors[0].engine_info["method"] == "execute"


def test_iopub_stdout_is_attributed_to_engines(rc):
    dv = rc[:]
    ar = dv.execute(
        "import os, sys\nprint('out', os.getpid())\nprint('err', file=sys.stderr)",
        block=False,
    )
    ar.get(T)
    ar.wait_for_output(T)
    pids = rc[:].apply_async(os.getpid).get(T)
    assert ar.stdout == [f"out {pid}\n" for pid in pids]
    assert ar.stderr == ["err\n"] * ENGINES

    def noisy(n):
        for i in range(n):
            print(i)
        return n

    ar = rc[1].apply_async(noisy, 3)
    assert ar.get(T) == 3
    ar.wait_for_output(T)
    assert ar.stdout == "0\n1\n2\n"


def test_push_pull(rc):
    dv = rc[:]
    dv.push(dict(a=1, b="two", c=[3]), block=False).get(T)
    assert dv.pull("a", block=False).get(T) == [1] * ENGINES
    assert dv.pull(("a", "b", "c"), block=False).get(T) == [[1, "two", [3]]] * ENGINES
    rc[1].push(dict(a=100), block=False).get(T)
    assert dv.pull("a", block=False).get(T) == [1, 100, 1]
    assert rc[1].pull("a", block=False).get(T) == 100
    with raises_remote("NameError"):
        dv.pull("never_defined", block=False).get(T)


def test_getitem_setitem(rc):
    dv = rc[:]
    within(T, dv.__setitem__, "item", {"k": 9})
    assert within(T, dv.__getitem__, "item") == [{"k": 9}] * ENGINES
    e2 = rc[2]
    within(T, e2.__setitem__, "item", 7)
    assert within(T, e2.__getitem__, "item") == 7
    assert within(T, dv.__getitem__, "item") == [{"k": 9}, {"k": 9}, 7]


def test_scatter_gather(rc):
    dv = rc[:]
    data = list(range(10))
    dv.scatter("part", data, block=False).get(T)
    parts = dv.pull("part", block=False).get(T)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sum(parts, []) == data
    assert dv.gather("part", block=False).get(T) == data

    dv.scatter("rank", rc.ids, flatten=True, block=False).get(T)
    assert dv.pull("rank", block=False).get(T) == rc.ids


def test_direct_map(rc):
    dv = rc[:]
    assert dv.map_sync(lambda x: x * 2, range(11)) == [x * 2 for x in range(11)]


def test_clear_namespace(rc):
    rc[:].push(dict(to_clear=1), block=False).get(T)
    within(T, rc.clear, targets=[0], block=True)
    with raises_remote("NameError"):
        rc[0].pull("to_clear", block=False).get(T)
    assert rc[1:].pull("to_clear", block=False).get(T) == [1] * (ENGINES - 1)


def test_many_small_messages(rc):
    """A burst of concurrent requests all come back, each to the right future."""
    dv = rc[:]
    ars = [dv.apply_async(lambda i: i * i, i) for i in range(40)]
    assert [ar.get(T) for ar in ars] == [[i * i] * ENGINES for i in range(40)]
    assert rc.wait(timeout=T)
    assert not rc.outstanding


def test_signal_engines(rc, gate):
    """signal_request over the control channel interrupts a running task."""
    ar = rc[0].apply_async(gated, *gate.args())
    gate.wait_started()
    within(T, rc.send_signal, "SIGINT", targets=[0], block=True)
    with raises_remote("KeyboardInterrupt"):
        ar.get(T)
    assert rc[0].apply_async(lambda: "alive").get(T) == "alive"


def test_interactive_function_namespace(rc):
    @ipp.interactive
    def uses_global():
        return some_global * 2  # noqa: F821

    rc[:].push(dict(some_global=21), block=False).get(T)
    assert rc[:].apply_async(uses_global).get(T) == [42] * ENGINES
