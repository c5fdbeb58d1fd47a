"""Starting the hub through ipyparallel.Cluster (the launcher API that
ipcluster, notebooks and ``ipp.Cluster(...)`` users go through)."""

import logging
import os

from traitlets.config import Config

import ipyparallel as ipp

from .harness import (
    HUB_CMD,
    REPLY_TIMEOUT,
    TESTS_DIR,
    descendants,
    is_alive,
    kill_procs,
    wait_until,
)

T = REPLY_TIMEOUT


def test_cluster_start_apply_stop(tmp_path, monkeypatch):
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir()
    log_file = tmp_path / "cluster.log"
    log = logging.getLogger(f"interop.cluster.{os.getpid()}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = logging.FileHandler(log_file)
    log.addHandler(handler)

    # launched processes inherit our environment
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
    )

    config = Config()
    # the hub command replaces `python -m ipyparallel.controller`; the
    # launcher hands it the profile dir and cluster id as $IPP_PROFILE_DIR
    # and $IPP_CLUSTER_ID, plus the controller args below
    config.LocalControllerLauncher.controller_cmd = list(HUB_CMD)
    config.EngineLauncher.engine_args = ["--log-level=DEBUG"]

    cluster = ipp.Cluster(
        n=2,
        profile_dir=str(profile_dir),
        cluster_id="apitest",
        controller_ip="127.0.0.1",
        controller_args=["--ping=200", "--log-level=DEBUG"],
        config=config,
        load_profile=False,
        delay=0,
        log=log,
        shutdown_atexit=True,
    )
    seen = {}

    def remember_descendants():
        for p in descendants(os.getpid()):
            seen[p.pid] = p

    try:
        cluster.start_cluster_sync()
        controller_pid = cluster.controller.process.pid
        args = cluster.controller.args
        assert args[: len(HUB_CMD)] == HUB_CMD, args
        assert "--ping=200" in args and "--ip=127.0.0.1" in args
        # the launcher found the hub's connection files in our profile dir
        security = profile_dir / "security"
        assert (security / "ipcontroller-apitest-client.json").exists()
        assert (security / "ipcontroller-apitest-engine.json").exists()

        rc = cluster.connect_client_sync()
        try:
            rc.wait_for_engines(2, timeout=60)
            ar = rc[:].apply_async(os.getpid)
            engine_pids = ar.get(T)
            assert len(set(engine_pids)) == 2
            lv = rc.load_balanced_view()
            assert lv.map_async(lambda x: x * x, range(8)).get(T) == [
                x * x for x in range(8)
            ]
            remember_descendants()
            assert controller_pid in seen
            assert set(engine_pids) <= set(seen)
        finally:
            rc.close()

        cluster.stop_cluster_sync()
        wait_until(
            lambda: not [p for p in seen.values() if is_alive(p)],
            30,
            msg="processes left over after stop_cluster: "
            + ", ".join(
                f"{p.pid}:{' '.join(p.cmdline()[:3])}"
                for p in seen.values()
                if is_alive(p)
            ),
        )
    except BaseException:
        handler.flush()
        print(f"--- cluster log {log_file}:\n{log_file.read_text()[-5000:]}")
        for f in sorted((profile_dir / "log").glob("*.log")):
            print(f"--- {f.name}:\n{f.read_text()[-3000:]}")
        raise
    finally:
        remember_descendants()
        leftovers = [p for p in seen.values() if is_alive(p)]
        if leftovers:
            try:
                cluster.stop_cluster_sync()
            except Exception:
                pass
            kill_procs(leftovers)
        log.removeHandler(handler)
        handler.close()
