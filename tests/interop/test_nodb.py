"""A hub started with --nodb still schedules work; record queries fail
cleanly (an error reply, not a hang)."""

from .harness import REPLY_TIMEOUT, raises_remote, wait_until, within

ENGINES = 1
HUB_ARGS = ["--nodb"]
T = REPLY_TIMEOUT


def test_work_without_db(rc):
    assert rc[:].apply_async(lambda: 1).get(T) == [1]
    lv = rc.load_balanced_view()
    assert lv.map_async(lambda x: x * 3, range(5)).get(T) == [0, 3, 6, 9, 12]
    # the hub's bookkeeping may trail the replies a little
    wait_until(lambda: within(T, rc.queue_status)[0]["completed"] >= 6, T)
    assert within(T, rc.queue_status)["unassigned"] == 0


def test_record_queries_are_errors(rc):
    ar = rc[0].apply_async(lambda: 2)
    ar.get(T)
    # ipcontroller's NoDB raises NoData
    with raises_remote(None):
        within(T, rc.hub_history)
    with raises_remote(None):
        within(T, rc.db_query, {"msg_id": {"$ne": ""}})
    with raises_remote(None):
        within(T, rc.resubmit, ar.msg_ids)
    # the query channel still answers afterwards
    assert set(within(T, rc.queue_status, 0)) == {"queue", "completed", "tasks"}
