"""The broadcast tree: a hub with depth 2 (4 leaves), engines spread over
every leaf (engine i connects to leaf i % 4), coalescing and not, and an
engine dying in the middle of a broadcast.

The depth is given in ipcontroller's traitlets form, which ``parallax hub``
translates to ``--broadcast-scheduler-depth``, so the same module runs
against stock ipcontroller (``PARALLAX_HUB_CMD``)."""

import json
import os
import signal

import pytest

import ipyparallel as ipp

from .harness import (
    ENGINES_ARE_PARALLAX,
    HUB_IS_IPCONTROLLER,
    REPLY_TIMEOUT,
    raises_remote,
    wait_until,
)

# 6 engines on 4 leaves: leaves 0 and 1 get two engines, 2 and 3 one
ENGINES = 6
DEPTH = 2
HUB_ARGS = (f"--IPController.broadcast_scheduler_depth={DEPTH}",)
T = REPLY_TIMEOUT
# a killed engine is noticed by its nanny (ipengine) or by missed heartbeats
DEATH_TIMEOUT = 30


@ipp.interactive
def get_rank():
    return rank  # noqa: F821


@pytest.fixture(scope="module", autouse=True)
def ranks(rc):
    rc[:].scatter("rank", rc.ids, flatten=True, block=False).get(T)
    assert rc[:].pull("rank", block=False).get(T) == rc.ids


@pytest.fixture(params=[False, True], ids=["plain", "coalescing"])
def coalescing(request):
    return request.param


def test_engine_file_lists_one_port_per_leaf(cluster):
    info = json.loads(cluster.connection_file("engine").read_text())
    leaves = info["broadcast"]
    assert len(leaves) == 2**DEPTH
    assert len(set(leaves)) == len(leaves), "one socket per leaf"
    client = json.loads(cluster.connection_file("client").read_text())
    assert isinstance(client["broadcast"], int), "clients still see one port"


def test_apply_on_every_leaf(rc, coalescing):
    bv = rc.broadcast_view(is_coalescing=coalescing)
    for _ in range(3):
        ar = bv.apply_async(get_rank)
        result = ar.get(T)
        if coalescing:
            assert sorted(result) == rc.ids
            if not HUB_IS_IPCONTROLLER:
                # ipcontroller's depth-2 tree concatenates the replies'
                # buffers and `broadcast_targets` in different orders (seen:
                # results [0, 4, 1, 5, 2, 3], engine_id [0, 1, 4, 5, 2, 3])
                assert result == ar.engine_id
        else:
            assert result == rc.ids
            for msg_id, eid in zip(ar.msg_ids, ar.engine_id):
                assert msg_id.endswith("_" + rc._engines[eid])


@pytest.mark.parametrize("targets", [[3], [4, 0], [5, 2, 1], [1, 2, 3, 4]])
def test_subsets_across_leaves(rc, coalescing, targets):
    bv = rc.broadcast_view(targets=targets, is_coalescing=coalescing)
    ar = bv.apply_async(get_rank)
    result = ar.get(T)
    if coalescing:
        assert sorted(result) == sorted(targets)
    else:
        assert result == targets


def test_buffers_and_execute_on_every_leaf(rc, coalescing):
    payload = bytes(range(256)) * 1024
    bv = rc.broadcast_view(is_coalescing=coalescing)
    assert bv.apply_async(lambda b: len(b), payload).get(T) == [len(payload)] * ENGINES
    if not coalescing:
        ar = bv.execute("tree = rank + 100\nprint('leaf', rank % 4)", block=False)
        ar.get(T)
        ar.wait_for_output(T)
        assert ar.stdout == [f"leaf {i % 4}\n" for i in rc.ids]
        assert rc[:].pull("tree", block=False).get(T) == [i + 100 for i in rc.ids]


@pytest.mark.parametrize("coalesce", [False, True], ids=["plain", "coalescing"])
def test_engine_dies_mid_broadcast(make_cluster, tmp_path, coalesce):
    """Engine 2 (alone on leaf 2) is killed while it runs a broadcast the
    others finished: the broadcast fails with EngineError for it (no hang),
    and broadcasts to the survivors, over the same leaves, still work."""
    c = make_cluster(engines=4, hub_args=HUB_ARGS)
    rc = c.client
    rc[:].scatter("rank", rc.ids, flatten=True, block=False).get(T)
    marker = str(tmp_path / "started")

    @ipp.interactive
    def slow_on_two(path):
        import os
        import time

        if rank == 2:  # noqa: F821
            with open(path, "w") as f:
                f.write(f"{os.getpid()} {os.getppid()}")
            time.sleep(60)
        return rank  # noqa: F821

    ar = rc.broadcast_view(is_coalescing=coalesce).apply_async(slow_on_two, marker)
    wait_until(
        lambda: os.path.exists(marker) and os.path.getsize(marker) > 0,
        T,
        msg="the broadcast never started on engine 2",
    )
    pid, ppid = map(int, open(marker).read().split())
    os.killpg(ppid if ENGINES_ARE_PARALLAX else pid, signal.SIGKILL)
    if coalesce:
        with raises_remote("EngineError"):
            ar.get(DEATH_TIMEOUT)
    else:
        results = ar.get(DEATH_TIMEOUT, return_exceptions=True)
        assert [results[i] for i in (0, 1, 3)] == [0, 1, 3]
        assert isinstance(results[2], ipp.error.RemoteError), results[2]
        assert results[2].ename == "EngineError", results[2]
    wait_until(lambda: 2 not in rc.ids, DEATH_TIMEOUT, msg="engine 2 never unregistered")
    bv = rc.broadcast_view(is_coalescing=coalesce)
    got = bv.apply_async(get_rank).get(T)
    assert sorted(got) == [0, 1, 3]
