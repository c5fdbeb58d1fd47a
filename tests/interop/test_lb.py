"""Load-balanced scheduling: retries, after/follow dependencies, timeouts,
targets and abort."""

import os
import time

import pytest

import ipyparallel as ipp

from .harness import (
    HUB_IS_IPCONTROLLER,
    REPLY_TIMEOUT,
    gated,
    raises_remote,
    wait_until,
    within,
)

ENGINES = 3
# one outstanding task per engine (ipcontroller's default, made explicit
# because the retry tests rely on it)
HUB_ARGS = ["--hwm=1"]
T = REPLY_TIMEOUT


@pytest.fixture
def lv(rc):
    view = rc.load_balanced_view()
    yield view
    # never leave work behind for the next test
    rc.wait(timeout=T)


@pytest.fixture
def flaky_setup(rc):
    """Engine-local state for retry tests: ``attempts`` counter and ``good``
    flag (whether the flaky task succeeds on that engine)."""

    def setup(good_engines):
        dv = rc[:]
        dv.push(dict(attempts=0), block=False).get(T)
        for eid in rc.ids:
            rc[eid].push(dict(good=eid in good_engines), block=False).get(T)

    return setup


@ipp.interactive
def flaky():
    """Fails unless the engine's ``good`` flag is set; counts attempts."""
    global attempts
    attempts += 1  # noqa: F821
    if not good:  # noqa: F821
        raise ValueError("bad engine")
    import os

    return os.getpid()


def attempts_by_engine(rc):
    return dict(zip(rc.ids, rc[:].pull("attempts", block=False).get(T)))


def test_lb_apply_and_map(rc, lv):
    assert lv.apply_async(lambda x: x + 1, 1).get(T) == 2
    data = list(range(30))
    assert lv.map_async(lambda x: -x, data).get(T) == [-x for x in data]
    # each chunk records its engine
    amr = lv.map_async(lambda x: x, data, chunksize=5)
    assert amr.get(T) == data
    assert len(amr.msg_ids) == 6
    assert all(eid in rc.ids for eid in amr.engine_id)


def test_lb_targets_restrict_placement(rc, lv):
    for eid in rc.ids:
        with lv.temp_flags(targets=[eid]):
            ars = [lv.apply_async(lambda: 0) for _ in range(3)]
        for ar in ars:
            ar.get(T)
            assert ar.engine_id == eid


def test_retries_move_to_another_engine(rc, lv, flaky_setup, gate):
    good = rc.ids[-1]
    bad = rc.ids[:-1]
    flaky_setup(good_engines={good})
    # keep the good engine busy (hwm=1), so the task must first fail on the
    # bad engines and be retried elsewhere each time
    with lv.temp_flags(targets=[good]):
        blocker = lv.apply_async(gated, *gate.args())
    gate.wait_started()
    with lv.temp_flags(retries=ENGINES - 1):
        ar = lv.apply_async(flaky)
    wait_until(
        lambda: rc[bad].pull("attempts", block=False).get(T) == [1] * len(bad),
        T,
        msg="task was not tried on every bad engine",
    )
    assert not ar.ready()
    gate.open()
    pid = ar.get(T)
    blocker.get(T)
    assert ar.engine_id == good
    assert pid == rc[good].apply_async(os.getpid).get(T)
    # tried on every engine exactly once: a retry never reuses an engine
    assert attempts_by_engine(rc) == {eid: 1 for eid in rc.ids}


def test_retries_exhausted_returns_error(rc, lv, flaky_setup):
    flaky_setup(good_engines=set())
    with lv.temp_flags(retries=ENGINES - 1):
        with raises_remote("ValueError"):
            lv.apply_async(flaky).get(T)
    assert attempts_by_engine(rc) == {eid: 1 for eid in rc.ids}

    flaky_setup(good_engines=set())
    with raises_remote("ValueError"):
        lv.apply_async(flaky).get(T)  # retries=0: one attempt only
    assert sum(attempts_by_engine(rc).values()) == 1


def test_retries_beyond_engine_count_time_out(rc, lv, flaky_setup):
    """More retries than engines: once every engine is blacklisted the task
    can only wait, and its timeout fires."""
    flaky_setup(good_engines=set())
    with lv.temp_flags(retries=ENGINES + 2, timeout=1.0):
        with raises_remote("TaskTimeout"):
            lv.apply_async(flaky).get(T)
    assert attempts_by_engine(rc) == {eid: 1 for eid in rc.ids}


@pytest.mark.xfail(
    condition=HUB_IS_IPCONTROLLER,
    reason="ipcontroller's Hub never removes a retried task from the first "
    "engine's 'tasks' list (it only clears the engine that replied)",
    strict=True,
)
def test_queue_status_clean_after_retries(rc, lv, flaky_setup, gate):
    good = rc.ids[-1]
    flaky_setup(good_engines={good})
    with lv.temp_flags(targets=[good]):
        blocker = lv.apply_async(gated, *gate.args())
    gate.wait_started()
    with lv.temp_flags(retries=ENGINES - 1):
        ar = lv.apply_async(flaky)
    wait_until(
        lambda: sum(rc[:-1].pull("attempts", block=False).get(T)) == ENGINES - 1, T
    )
    gate.open()
    ar.get(T)
    blocker.get(T)
    assert attempts_by_engine(rc) == {eid: 1 for eid in rc.ids}  # it was retried

    def idle():
        qs = rc.queue_status(verbose=True)
        busy = {k: q["tasks"] for k, q in qs.items() if k != "unassigned" and q["tasks"]}
        return not busy and not qs["unassigned"]

    try:
        wait_until(idle, 3)
    except TimeoutError:
        pass
    qs = rc.queue_status(verbose=True)
    assert qs.pop("unassigned") == []
    assert {k: q["tasks"] for k, q in qs.items()} == {eid: [] for eid in rc.ids}


def test_after_waits_for_dependency(rc, lv):
    first = lv.apply_async(time.sleep, 0.5)
    with lv.temp_flags(after=first):
        second = lv.apply_async(lambda: "second")
    assert second.get(T) == "second"
    first.get(T)
    assert second.started >= first.completed


def test_after_failed_dependency_is_impossible(rc, lv):
    failing = lv.apply_async(lambda: 1 / 0)
    with raises_remote("ZeroDivisionError"):
        failing.get(T)
    # default dependency: success only
    with lv.temp_flags(after=failing):
        with raises_remote("ImpossibleDependency"):
            lv.apply_async(lambda: 1).get(T)
    # failure-only dependency on a failed task is met
    dep = ipp.Dependency(failing.msg_ids, success=False, failure=True)
    with lv.temp_flags(after=dep):
        assert lv.apply_async(lambda: "ran").get(T) == "ran"
    # success-or-failure dependency is met too
    dep = ipp.Dependency(failing.msg_ids, success=True, failure=True)
    with lv.temp_flags(after=dep):
        assert lv.apply_async(lambda: "ran2").get(T) == "ran2"


def gated_fail(path, limit):
    gated(path, limit)
    raise RuntimeError("late failure")


def test_after_pending_failure_becomes_impossible(rc, lv, gate):
    """A queued task whose dependency fails later is failed by the scheduler."""
    failing = lv.apply_async(gated_fail, *gate.args())
    gate.wait_started()
    with lv.temp_flags(after=failing):
        dependent = lv.apply_async(lambda: 1)
    wait_until(
        lambda: dependent.msg_ids[0] in rc.queue_status(verbose=True)["unassigned"],
        T,
        msg="dependent task never queued in the scheduler",
    )
    assert not dependent.ready()
    gate.open()
    with raises_remote("ImpossibleDependency"):
        dependent.get(T)
    with raises_remote("RuntimeError"):
        failing.get(T)


def test_follow_runs_on_same_engine(rc, lv):
    for target in (rc.ids[0], rc.ids[-1]):
        with lv.temp_flags(targets=[target]):
            anchor = lv.apply_async(lambda: 0)
        anchor.get(T)
        with lv.temp_flags(follow=anchor):
            ars = [lv.apply_async(lambda: 1) for _ in range(5)]
        for ar in ars:
            ar.get(T)
            assert ar.engine_id == target


def test_follow_on_two_engines_is_impossible(rc, lv):
    with lv.temp_flags(targets=[rc.ids[0]]):
        a = lv.apply_async(lambda: 1)
    with lv.temp_flags(targets=[rc.ids[1]]):
        b = lv.apply_async(lambda: 1)
    a.get(T)
    b.get(T)
    assert a.engine_id != b.engine_id
    with lv.temp_flags(follow=[a, b]):
        with raises_remote("ImpossibleDependency"):
            lv.apply_async(lambda: 1).get(T)
    # follow *any* of them is fine
    dep = ipp.Dependency([a.msg_ids[0], b.msg_ids[0]], all=False)
    with lv.temp_flags(follow=dep):
        ar = lv.apply_async(lambda: 2)
        assert ar.get(T) == 2
    assert ar.engine_id in (a.engine_id, b.engine_id)


def test_invalid_dependency(rc, lv):
    with lv.temp_flags(after="no-such-msg-id"):
        with raises_remote("InvalidDependency"):
            lv.apply_async(lambda: 1).get(T)
    with lv.temp_flags(follow=["also-unknown"]):
        with raises_remote("InvalidDependency"):
            lv.apply_async(lambda: 1).get(T)


def test_dependency_timeout(rc, lv, gate):
    blocker = lv.apply_async(gated, *gate.args())
    with lv.temp_flags(after=blocker, timeout=0.5):
        with raises_remote("TaskTimeout"):
            lv.apply_async(lambda: 1).get(T)
    assert not blocker.ready(), "timeout fired only after the dependency"
    gate.open()
    blocker.get(T)


def test_abort_queued_direct_tasks(rc, gate):
    eid = rc.ids[0]
    view = rc[eid]
    busy = view.apply_async(gated, *gate.args())
    queued = view.apply_async(lambda: "aborted?")
    kept = view.apply_async(lambda: "kept")
    gate.wait_started()
    within(T, view.abort, queued, block=True)
    gate.open()
    with pytest.raises(ipp.error.TaskAborted):
        queued.get(T)
    assert kept.get(T) == "kept"
    busy.get(T)


def test_abort_queued_lb_tasks(rc, lv, gate):
    # occupy every engine through the MUX, then queue LB tasks behind them
    busy = rc[:].apply_async(gated, *gate.args())
    gate.wait_started()
    ar2 = lv.apply_async(lambda: 2)
    ar3 = lv.apply_async(lambda: 3)
    ar4 = lv.apply_async(lambda: 4)
    # wait until the scheduler has placed them on engines
    wanted = set(ar2.msg_ids + ar3.msg_ids + ar4.msg_ids)

    def assigned():
        qs = rc.queue_status(verbose=True)
        on_engines = set()
        for k, q in qs.items():
            if k != "unassigned":
                on_engines.update(q["tasks"])
        return wanted <= on_engines

    wait_until(assigned, T, msg="LB tasks were not assigned")
    within(T, lv.abort, ar2, block=True)
    within(T, lv.abort, ar3.msg_ids, block=True)
    gate.open()
    with pytest.raises(ipp.error.TaskAborted):
        ar2.get(T)
    with pytest.raises(ipp.error.TaskAborted):
        ar3.get(T)
    assert ar4.get(T) == 4
    busy.get(T)
