"""LoadBalancedView.map under every task scheme (one hub per scheme)."""

import importlib.util
import json
import threading

import pytest

from .harness import (
    HUB_IS_IPCONTROLLER,
    REPLY_TIMEOUT,
    HubCluster,
    gated,
    raises_remote,
    within,
)

T = REPLY_TIMEOUT
N_ITEMS = 20

pytestmark = [
    # harness.start() waits for 'pure' engines with a throwaway client, which
    # the stock client then (harmlessly) reports as having lost an engine
    pytest.mark.filterwarnings("ignore:An engine has been unregistered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Unregistering FD:UserWarning"),
]

_NO_NUMPY = importlib.util.find_spec("numpy") is None

SCHEMES = ["leastload", "lru", "plainrandom", "twobin", "weighted", "pure"]

#: stock ipcontroller's 'weighted' chooser calls numpy; without numpy its
#: scheduler errors on every task (the Rust hub doesn't need numpy)
WEIGHTED_BROKEN = HUB_IS_IPCONTROLLER and _NO_NUMPY


def expect_weighted_failure(request, scheme):
    """Mark a task-dispatching test as a known failure for weighted+no numpy
    on stock ipcontroller (strict: it must fail). Returns the reply timeout to
    use (short when the failure is expected, to keep the suite fast)."""
    if scheme == "weighted" and WEIGHTED_BROKEN:
        request.node.add_marker(
            pytest.mark.xfail(
                reason="stock ipcontroller's 'weighted' scheme needs numpy, "
                "which is not installed in this environment",
                strict=True,
            )
        )
        return 3
    return T


@pytest.fixture(scope="module", params=SCHEMES)
def scheme_cluster(request, tmp_path_factory):
    scheme = request.param
    c = HubCluster(
        tmp_path_factory.mktemp(f"scheme-{scheme}"),
        engines=2,
        scheme=scheme,
        label=f"scheme-{scheme}",
    )
    try:
        c.start()
        yield c
    finally:
        c.stop()


def square(x):
    return x * x


def first_waits(x, gate_path):
    """Item 0 blocks until the test opens the gate; returns (x, pid)."""
    import os

    if x == 0:
        gated(gate_path, limit=20)
    return x, os.getpid()


def test_connection_file_reports_scheme(scheme_cluster):
    info = json.loads(scheme_cluster.connection_file("client").read_text())
    assert info["task_scheme"] == scheme_cluster.scheme


def test_map_ordered(scheme_cluster, request, gate):
    t = expect_weighted_failure(request, scheme_cluster.scheme)
    rc = scheme_cluster.client
    lv = rc.load_balanced_view()
    data = list(range(N_ITEMS))
    amr = lv.map_async(first_waits, data, [gate.path] * N_ITEMS, ordered=True)
    assert len(amr) == N_ITEMS
    gate.wait_started(t)
    threading.Timer(0.3, gate.open).start()
    # iterating an ordered map yields in submission order although item 0
    # finishes last
    results = within(t, list, amr)
    assert [x for x, _ in results] == data
    assert amr.get(t) == results
    pids = {pid for _, pid in results}
    assert len(pids) == 2, "both engines should have received tasks"
    assert within(t, lv.map_sync, square, data) == [square(x) for x in data]


def test_map_unordered(scheme_cluster, request, gate):
    t = expect_weighted_failure(request, scheme_cluster.scheme)
    rc = scheme_cluster.client
    lv = rc.load_balanced_view()
    data = list(range(N_ITEMS))
    amr = lv.map_async(first_waits, data, [gate.path] * N_ITEMS, ordered=False)
    it = iter(amr)
    try:
        # item 0 is blocked: unordered iteration must yield other results
        # (as they arrive) without waiting for it
        first = within(t, next, it)
    finally:
        gate.open()
    arrived = [first] + within(t, list, it)
    xs = [x for x, _ in arrived]
    assert xs[0] != 0
    assert sorted(xs) == data
    assert len({pid for _, pid in arrived}) == 2


def test_apply_and_errors(scheme_cluster, request):
    t = expect_weighted_failure(request, scheme_cluster.scheme)
    rc = scheme_cluster.client
    lv = rc.load_balanced_view()
    assert lv.apply_async(square, 7).get(t) == 49
    ar = lv.apply_async(lambda: 1 / 0)
    with raises_remote("ZeroDivisionError"):
        ar.get(t)
    assert ar.engine_id in rc.ids
