"""Hubs for engines on other hosts: `parallax cluster start --ip/--location`
write routable connection files, and an engine on another host (here:
another UTS namespace, so another host name) facing a hub on loopback
fails at once with a clear message instead of timing out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from launch_harness import BIN, child_env, client

pytestmark = pytest.mark.timeout(120)


def test_ip_and_location_reach_the_connection_files(profile):
    profile.cluster("start", "-n", 2, "--ip", "0.0.0.0", "--location", "127.0.0.1", "--daemonize")
    info = json.loads(profile.client_file.read_text())
    assert info["interface"] == "tcp://0.0.0.0" and info["location"] == "127.0.0.1"
    cluster = profile.state()["cluster"]
    assert cluster["controller_ip"] == "0.0.0.0" and cluster["controller_location"] == "127.0.0.1"
    rc = client(profile, 2)  # the Client connects through the location
    try:
        assert sorted(rc.ids) == [0, 1]
    finally:
        rc.close()
    profile.cluster("stop")
    assert profile.left_running() == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_engine_on_another_host_facing_a_loopback_hub_fails_at_once(profile):
    profile.cluster("start", "-n", 1, "--daemonize")
    engine_file = profile.security / f"ipcontroller-{profile.cluster_id}-engine.json"
    t0 = time.monotonic()
    r = subprocess.run(
        ["unshare", "--uts", "sh", "-c", f'hostname px-other-host && exec "$0" engine --file="$1"', str(BIN),
         str(engine_file)],
        env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert time.monotonic() - t0 < 10
    assert "(loopback)" in r.stderr and '"px-other-host"' in r.stderr, r.stderr
    assert "--ip=0.0.0.0" in r.stderr
    profile.cluster("stop")
    assert profile.left_running() == []
