"""Engines dying mid-task (each test gets a private cluster)."""

import os
import signal
import time

import pytest

import ipyparallel as ipp

from .harness import (
    ENGINES_ARE_PARALLAX,
    HUB_IS_IPCONTROLLER,
    REPLY_TIMEOUT,
    raises_remote,
    wait_until,
    within,
)

T = REPLY_TIMEOUT
# generous: ipcontroller waits 5 s before failing a dead engine's LB tasks,
# and heartbeat-based detection takes ~10 missed pings
DEATH_TIMEOUT = 30


def started_marker(path):
    """A task that announces it is running (by creating ``path``), then
    sleeps long enough to be killed."""

    def task():
        import os
        import time

        with open(path, "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}")
        time.sleep(60)

    return task


def wait_started(path):
    """The pid of the engine process running the task (for a Parallax
    engine, the parent of the Python subprocess that runs user code)."""
    wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, T,
               msg="task never started")
    pid, ppid = map(int, open(path).read().split())
    return ppid if ENGINES_ARE_PARALLAX else pid


def assert_cluster_still_works(rc, dead_ids, survivors):
    wait_until(
        lambda: not set(dead_ids) & set(rc.ids),
        DEATH_TIMEOUT,
        msg=f"engines {dead_ids} were never unregistered (still in rc.ids)",
    )
    assert rc.ids == survivors
    for dead in dead_ids:
        with pytest.raises(IndexError):
            rc[dead]
    assert rc[:].apply_async(lambda: "ok").get(T) == ["ok"] * len(survivors)
    lv = rc.load_balanced_view()
    amr = lv.map_async(lambda x: x + 1, range(10))
    assert amr.get(T) == list(range(1, 11))
    assert set(amr.engine_id) <= set(survivors)


def test_kill_engine_running_direct_task(make_cluster, tmp_path):
    c = make_cluster(engines=2)
    rc = c.client
    pids = c.engine_pids()
    victim = 1
    marker = str(tmp_path / "started")
    ar = rc[victim].apply_async(started_marker(marker))
    other = rc[0].apply_async(lambda: "unaffected")
    assert wait_started(marker) == pids[victim]
    os.killpg(pids[victim], signal.SIGKILL)

    with raises_remote("EngineError") as info:
        ar.get(DEATH_TIMEOUT)
    assert "died" in info.errors[0].evalue
    assert other.get(T) == "unaffected"
    assert_cluster_still_works(rc, [victim], [0])
    # a client connecting now only sees the survivor
    rc2 = c.connect()
    assert rc2.ids == [0]
    # a replacement engine gets a fresh id: ids are never reused
    c.start_engines(1)
    wait_until(lambda: len(rc.ids) == 2, 60, msg="replacement engine never registered")
    assert rc.ids == [0, 2]
    assert rc[2].apply_async(lambda: "new").get(T) == "new"
    wait_until(lambda: rc2.ids == [0, 2], T, msg="rc2 never saw the new engine")


@pytest.mark.xfail(
    condition=HUB_IS_IPCONTROLLER,
    reason="ipcontroller never removes an unregistered engine from Hub.ids, "
    "so queue_status() keeps reporting dead engines forever (while "
    "connection_reply and the client's ids drop them)",
    strict=True,
)
def test_queue_status_forgets_dead_engine(make_cluster):
    c = make_cluster(engines=2)
    rc = c.client
    pids = c.engine_pids()
    os.killpg(pids[1], signal.SIGKILL)
    wait_until(lambda: 1 not in rc.ids, DEATH_TIMEOUT, msg="engine 1 never unregistered")
    qs = within(T, rc.queue_status)
    assert set(qs) == {0, "unassigned"}


def test_kill_engines_running_lb_tasks(make_cluster, tmp_path):
    """Two engines die while running load-balanced tasks: the task without
    retries fails with EngineError, the one with retries=1 is re-run on a
    surviving engine."""
    c = make_cluster(engines=3)
    rc = c.client
    pids = c.engine_pids()
    by_pid = {p: e for e, p in pids.items()}
    plain_marker = str(tmp_path / "plain")
    retry_marker = str(tmp_path / "retry")

    @ipp.interactive
    def once_then_ok(path):
        import os
        import time

        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(f"{os.getpid()} {os.getppid()}")
            time.sleep(60)
        return os.getpid(), os.getppid()

    lv = rc.load_balanced_view()
    plain = lv.apply_async(started_marker(plain_marker))
    with lv.temp_flags(retries=1):
        retried = lv.apply_async(once_then_ok, retry_marker)
    pid1 = wait_started(plain_marker)
    pid2 = wait_started(retry_marker)
    assert pid1 != pid2
    os.killpg(pid1, signal.SIGKILL)
    os.killpg(pid2, signal.SIGKILL)

    with raises_remote("EngineError"):
        plain.get(DEATH_TIMEOUT)
    survivor = [e for e in pids if pids[e] not in (pid1, pid2)]
    pid, ppid = retried.get(DEATH_TIMEOUT)
    assert (ppid if ENGINES_ARE_PARALLAX else pid) == pids[survivor[0]]
    assert retried.engine_id == survivor[0]
    assert_cluster_still_works(rc, [by_pid[pid1], by_pid[pid2]], survivor)


def test_engine_death_detected_by_heartbeat(make_cluster):
    """Kill the engine *and* its nanny: no unregistration_request is sent, so
    the hub has to notice via missed heartbeats."""
    c = make_cluster(engines=2)
    rc = c.client
    pids = c.engine_pids()
    victim = 0
    uuid = rc._engines[victim]
    proc = c.engine_proc(pids[victim])
    proc.snapshot()
    # ipengine's nanny, or the Parallax engine's Python subprocess: killed
    # with the engine so that nothing sends an unregistration_request.
    nannies = list(proc.seen.values())
    assert nannies, "expected the engine to have a child process"
    events = []
    rc._registration_callbacks.append(events.append)
    ar = rc[victim].apply_async(time.sleep, 60)
    time.sleep(0.3)
    for n in nannies:
        n.kill()
    os.killpg(pids[victim], signal.SIGKILL)
    with raises_remote("EngineError"):
        ar.get(DEATH_TIMEOUT)
    assert_cluster_still_works(rc, [victim], [1])
    unreg = [e for e in events if e["event"] == "unregister"]
    assert [(e["id"], e["uuid"]) for e in unreg] == [(victim, uuid)]
