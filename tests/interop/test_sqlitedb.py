"""`--sqlitedb`: task records (with their buffers) in a SQLite file that a
later hub on the same file serves: db_query, get_result, result_status,
purge_results and hub_history through the stock Client."""

import signal
import sqlite3
import subprocess

import pytest

from ipyparallel.error import RemoteError

from .harness import (
    HUB_IS_IPCONTROLLER,
    REPLY_TIMEOUT,
    HubCluster,
    raises_remote,
    wait_until,
    within,
)

T = REPLY_TIMEOUT
# ipcontroller names its table after the hub's session unless told; with a
# fixed table a second ipcontroller finds the first one's records too.
HUB_ARGS = ["--sqlitedb", "--SQLiteDB.table=tasks"]
KEYS = ["msg_id", "completed", "engine_uuid", "stdout", "result_buffers", "queue"]


def payload(n):
    """Prints, and returns bytes large enough to travel as a buffer."""
    print(f"task {n}")
    return bytes([n]) * (4096 + n)


def hub_completed(rc, msg_ids):
    def done():
        try:
            status = within(T, rc.result_status, msg_ids)
        except RemoteError:
            return False  # the hub has not seen every request yet
        return set(status["completed"]) == set(msg_ids)

    wait_until(done, T, msg=f"hub never completed {msg_ids}")


def run_tasks(rc, n):
    lv = rc.load_balanced_view()
    ar = lv.map_async(payload, range(n))
    assert ar.get(T) == [payload(i) for i in range(n)]
    ids = list(ar.msg_ids)
    hub_completed(rc, ids)
    return ids


def check_records(rc, ids):
    recs = within(T, rc.db_query, {"msg_id": {"$in": ids}}, keys=KEYS)
    assert [r["msg_id"] for r in recs] == ids  # oldest first
    for i, r in enumerate(recs):
        assert r["completed"] is not None and r["engine_uuid"]
        assert r["queue"] == "task"
        assert r["stdout"] == f"task {i}\n"
        assert len(r["result_buffers"]) >= 1
    # get_result from the hub, not the client's cache
    rc.purge_local_results("all")
    for i, msg_id in enumerate(ids):
        assert rc.get_result(msg_id, owner=False).get(T) == [payload(i)]
    assert set(ids) <= set(within(T, rc.hub_history))


def db_file(cluster):
    """Where both hubs keep the file by default: the profile directory."""
    return cluster.profile_dir / "tasks.db"


def test_records_queries_and_purge(make_cluster):
    c = make_cluster(engines=2, hub_args=HUB_ARGS)
    rc = c.client
    ids = run_tasks(rc, 6)
    check_records(rc, ids)
    status = within(T, rc.result_status, ids)
    assert set(status["completed"]) == set(ids) and status["pending"] == []
    # queries beyond msg_id go through the same matcher
    recs = within(T, rc.db_query, {"stdout": {"$in": "task 3\n"}}, keys=["msg_id"])
    assert [r["msg_id"] for r in recs] == [ids[3]]
    within(T, rc.purge_results, ids[:2])
    assert within(T, rc.db_query, {"msg_id": {"$in": ids[:2]}}, keys=["msg_id"]) == []
    with raises_remote("KeyError"):
        rc.get_result(ids[0], owner=False).get(T)
    hist = within(T, rc.hub_history)
    assert not set(ids[:2]) & set(hist) and set(ids[2:]) <= set(hist)
    assert db_file(c).exists()


def test_records_survive_a_hub_restart(make_cluster, tmp_path):
    first = make_cluster(engines=1, hub_args=HUB_ARGS)
    rc = first.client
    ids = run_tasks(rc, 4)
    within(T, rc.purge_results, ids[0])
    kept = ids[1:]
    # a polite stop (as `ipcluster stop` does): the hub commits and exits
    first.close_clients()
    first.hub.popen.send_signal(signal.SIGTERM)
    assert first.hub.popen.wait(timeout=T) is not None
    first.stop()

    # a new hub (new cluster id, no engines) on the same profile, same file
    second = HubCluster(
        first.root, engines=0, hub_args=HUB_ARGS, label="restarted"
    )
    try:
        second.start()
        rc2 = second.client
        recs = within(T, rc2.db_query, {"msg_id": {"$in": ids}}, keys=KEYS)
        assert [r["msg_id"] for r in recs] == kept
        status = within(T, rc2.result_status, kept)
        assert set(status["completed"]) == set(kept)
        for msg_id in kept:
            i = ids.index(msg_id)
            assert rc2.get_result(msg_id, owner=False).get(T) == [payload(i)]
        assert set(kept) <= set(within(T, rc2.hub_history))
        with raises_remote("KeyError"):
            rc2.get_result(ids[0], owner=False).get(T)
        within(T, rc2.purge_results, "all")
        assert within(T, rc2.db_query, {"msg_id": {"$in": ids}}, keys=["msg_id"]) == []
    finally:
        second.stop()


def test_committed_records_survive_a_killed_hub(make_cluster):
    c = make_cluster(engines=1, hub_args=HUB_ARGS)
    ids = run_tasks(c.client, 3)
    db = db_file(c)

    def committed():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            marks = ",".join("?" * len(ids))
            rows = con.execute(
                f"SELECT count(*) FROM tasks WHERE msg_id IN ({marks}) "
                "AND completed IS NOT NULL",
                ids,
            ).fetchone()
        finally:
            con.close()
        return rows[0] == len(ids)

    # batches commit within milliseconds; ipcontroller commits every 2 s
    wait_until(committed, T, msg="records never committed")
    c.hub.kill()  # SIGKILL: no chance to flush anything more
    c.stop()
    again = HubCluster(c.root, engines=0, hub_args=HUB_ARGS, label="after-kill")
    try:
        again.start()
        recs = within(T, again.client.db_query, {"msg_id": {"$in": ids}}, keys=KEYS)
        assert [r["msg_id"] for r in recs] == ids
    finally:
        again.stop()


def test_mongodb_is_refused_naming_sqlitedb(make_cluster):
    if HUB_IS_IPCONTROLLER:
        pytest.skip("ipcontroller tries to reach a MongoDB server instead")
    c = make_cluster(engines=0, hub_args=["--mongodb"], start=False)
    out = subprocess.run(
        c.hub_argv(), capture_output=True, text=True, timeout=T, env=c.env
    )
    assert out.returncode != 0
    assert "--sqlitedb" in out.stderr, out.stderr
