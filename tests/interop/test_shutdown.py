"""Shutting down engines and the hub through the client."""

import time

from .harness import REPLY_TIMEOUT, wait_until, within

T = REPLY_TIMEOUT
EXIT_TIMEOUT = 20


def test_shutdown_engine_then_hub(make_cluster):
    c = make_cluster(engines=2)
    rc = c.client
    observer = c.connect()  # another session, which must be told too
    pids = c.engine_pids()
    for p in c.engines:
        p.snapshot()  # remember the nannies

    # one engine
    within(T, rc.shutdown, targets=[1], block=True)
    victim = c.engine_proc(pids[1])
    wait_until(lambda: not victim.alive(), EXIT_TIMEOUT, msg="engine 1 did not exit")
    wait_until(lambda: 1 not in rc.ids, EXIT_TIMEOUT, msg="engine 1 never unregistered")
    wait_until(lambda: observer.ids == [0], EXIT_TIMEOUT, msg="observer still sees 1")
    assert rc[0].apply_async(lambda: "still here").get(T) == "still here"

    # everything
    within(T, rc.shutdown, hub=True, block=True)
    wait_until(
        lambda: not c.hub.alive(), EXIT_TIMEOUT, msg="hub did not exit after shutdown"
    )
    assert c.hub.popen.returncode == 0, f"hub exit status {c.hub.popen.returncode}"
    wait_until(
        lambda: not any(p.alive() for p in c.engines),
        EXIT_TIMEOUT,
        msg="engines did not exit after hub shutdown",
    )
    # nannies and any helper processes are gone too
    wait_until(
        lambda: not [x for p in c.engines + [c.hub] for x in p.leftover()],
        EXIT_TIMEOUT,
        msg="processes left over after shutdown",
    )
    # the shutting-down client closed itself; the other session was notified
    # (shutdown_notification) and closed as well
    assert rc._closed
    wait_until(lambda: observer._closed, T, msg="observer never got shutdown_notification")


def test_hub_shutdown_with_no_engines(make_cluster):
    c = make_cluster(engines=0)
    rc = c.client
    assert rc.ids == []
    # queries work without engines (ipcontroller: targets=None -> all = none)
    assert within(T, rc.queue_status) == {"unassigned": 0}
    assert within(T, rc.hub_history) == []
    t0 = time.monotonic()
    within(T, rc.shutdown, hub=True, block=True)
    wait_until(lambda: not c.hub.alive(), EXIT_TIMEOUT, msg="hub did not exit")
    assert time.monotonic() - t0 < EXIT_TIMEOUT
    assert c.hub.popen.returncode == 0
