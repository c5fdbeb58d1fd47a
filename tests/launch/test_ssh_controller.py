"""`parallax cluster start --controller ssh --controller-host HOST`: the hub
on another host over ssh (ipyparallel's SSHControllerLauncher). The hosts
are network namespaces with their own host names and sshd (the `ssh_hosts`
fixture): the hub runs on one, engines on the other, and the stock
ipyparallel Client here (the root namespace, reaching them over the bridge)
runs work on all of them with the connection file that came back over ssh.
Checked: the key is on no command line and the fetched files are 0600,
`list` sees the remote hub, engines added later join it, stop leaves no
process or directory on any host, and a hub that cannot start is a clear
error at once."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from launch_harness import BIN, VENV_BIN, child_env, client, wait_gone
from test_ssh import client_when_ready, cmdlines_with, hostnames, ssh_processes

pytestmark = pytest.mark.timeout(120)

PY = f"--engine-args=--python={VENV_BIN / 'python3'}"


def hub_dirs() -> set[str]:
    """The remote hubs' private directories (the hosts share this file system)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {str(p) for p in tmp.glob("parallax-hub.*")}


def test_hub_on_one_host_engines_on_another(profile, ssh_hosts):
    (h1, h2), (n1, n2) = ssh_hosts.addrs, ssh_hosts.names
    dirs_before = hub_dirs()
    t0 = time.monotonic()
    r = profile.cluster("start", "-n", 2, "--controller", "ssh", "--controller-host", f"root@{h1}:22",
                        "--engines", "ssh", "--hosts", f"{h2}:2", "--ssh-args", ssh_hosts.ssh_args(),
                        f"--engine-args=--python={VENV_BIN / 'python3'}", "--daemonize")
    assert "2 engines registered" in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    # the hub runs on h1 (its namespace), nothing of it here
    hub_pids = ssh_hosts.pids_in(n1)
    assert hub_pids, "no hub on the first host"
    state = profile.state()
    ctl = state["controller"]
    assert ctl["class"] == "ssh"
    assert ctl["state"]["hostname"] == h1 and ctl["state"]["remote_hostname"] == ssh_hosts.hostnames[0]
    assert ctl["state"]["remote_pid"] in hub_pids
    assert state["cluster"]["controller_location"] == h1
    # the connection files came back, private, naming the host as ssh reached it
    info = json.loads(profile.client_file.read_text())
    assert info["location"] == h1, info
    for f in profile.security.glob("ipcontroller-*.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert info["key"] and cmdlines_with(info["key"]) == []
    # the stock Client, from this (root) namespace
    rc = client(profile, 2)
    try:
        assert hostnames(rc) == [ssh_hosts.hostnames[1]] * 2
    finally:
        rc.close()
    listed = profile.cluster("list", "--profile-dir", profile.dir).stdout
    line = next(l for l in listed.splitlines() if profile.cluster_id in l)
    assert " True " in line and f"hub ssh root@{h1}:22" in line, listed
    # engines added afterwards (here on the hub's own host) join the remote hub
    profile.cluster("engines", "-n", 1, "--engines", "ssh", "--hosts", f"{h1}:1", "--ssh-args",
                    ssh_hosts.ssh_args(), f"--engine-args=--python={VENV_BIN / 'python3'}",
                    "--profile-dir", profile.dir, "--cluster-id", profile.cluster_id)
    rc = client(profile, 3)
    try:
        assert hostnames(rc) == sorted([ssh_hosts.hostnames[0]] + [ssh_hosts.hostnames[1]] * 2)
    finally:
        rc.close()
    remote_dir = ctl["state"]["remote_dir"]
    assert remote_dir in hub_dirs() - dirs_before

    r = profile.cluster("stop")
    assert "Stopped cluster" in r.stdout, r.stdout + r.stderr
    assert not profile.cluster_file.exists()
    assert not profile.client_file.exists()
    for name in (n1, n2):
        assert wait_gone(list(ssh_hosts.pids_in(name)), 15) == [], f"left on {name}"
    assert not Path(remote_dir).exists()
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_a_missing_remote_parallax_is_the_hubs_own_error_at_once(profile, ssh_hosts):
    h1 = ssh_hosts.addrs[0]
    dirs_before = hub_dirs()
    t0 = time.monotonic()
    r = profile.cluster("start", "-n", 1, "--controller", "ssh", "--controller-host", h1,
                        "--remote-parallax", "/nonexistent/parallax", "--ssh-args", ssh_hosts.ssh_args(),
                        "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 10
    # the remote shell's words, and where
    assert "/nonexistent/parallax" in r.stderr and "No such file" in r.stderr, r.stderr
    assert f"the hub on {ssh_hosts.hostnames[0]} exited" in r.stderr, r.stderr
    assert "everything started was stopped" in r.stderr
    assert not profile.cluster_file.exists() and not profile.client_file.exists()
    assert ssh_hosts.pids_in(ssh_hosts.names[0]) == set()
    assert hub_dirs() - dirs_before == set()
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_a_hub_that_rejects_its_arguments_shows_its_stderr(profile, ssh_hosts):
    h1 = ssh_hosts.addrs[0]
    t0 = time.monotonic()
    r = profile.cluster("start", "-n", 1, "--controller", "ssh", "--controller-host", h1,
                        "--controller-args=--no-such-hub-option", "--ssh-args", ssh_hosts.ssh_args(),
                        "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 10
    assert "--no-such-hub-option" in r.stderr, r.stderr
    assert ssh_hosts.pids_in(ssh_hosts.names[0]) == set()
    assert profile.left_running() == []


def test_an_unreachable_hub_host_fails_with_sshs_words(profile, ssh_hosts):
    dead = f"{ssh_hosts.subnet}.250"  # on the bridge's subnet, nobody there
    t0 = time.monotonic()
    r = profile.cluster("start", "-n", 1, "--controller", "ssh", "--controller-host", dead,
                        "--ssh-args", f"{ssh_hosts.ssh_args()} -o ConnectTimeout=2", "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 15
    assert "255" in r.stderr and dead in r.stderr, r.stderr
    assert not profile.cluster_file.exists()
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_controller_host_is_required_and_checked(profile):
    r = profile.cluster("start", "--controller", "ssh", check=False)
    assert r.returncode != 0 and "--controller-host" in r.stderr, r.stderr
    r = profile.cluster("start", "--controller", "ssh", "--controller-host", "h1:notaport", check=False)
    assert r.returncode != 0 and "not a port" in r.stderr, r.stderr
    r = profile.cluster("start", "--controller-host", "h1", check=False)
    assert r.returncode != 0 and "--controller ssh" in r.stderr, r.stderr
    assert profile.left_running() == []


def test_the_hub_outlives_its_ssh_and_stop_still_finds_it(profile, ssh_hosts):
    """The connection that started the hub is lost (killed here): the hub
    keeps running there, `list` asks the host, `stop` from the cluster file
    stops it and removes its directory."""
    h1, n1 = ssh_hosts.addrs[0], ssh_hosts.names[0]
    profile.cluster("start", "-n", 1, "--controller", "ssh", "--controller-host", h1, "--engines", "ssh",
                    "--hosts", f"{h1}:1", "--ssh-args", ssh_hosts.ssh_args(), PY, "--daemonize")
    ctl = profile.state()["controller"]["state"]
    os.kill(ctl["pid"], 9)  # the local ssh of the hub
    assert wait_gone([ctl["pid"]], 10) == []
    rc = client(profile, 1)
    try:
        assert hostnames(rc) == [ssh_hosts.hostnames[0]]
    finally:
        rc.close()
    listed = profile.cluster("list", "--profile-dir", profile.dir).stdout
    line = next(l for l in listed.splitlines() if profile.cluster_id in l)
    assert " True " in line and "running" in line, listed
    profile.cluster("stop")
    assert wait_gone(list(ssh_hosts.pids_in(n1)), 15) == []
    assert not Path(ctl["remote_dir"]).exists()
    assert profile.left_running() == []


def test_a_foreground_cluster_stops_its_remote_hub_on_sigint(profile, ssh_hosts):
    h1, n1 = ssh_hosts.addrs[0], ssh_hosts.names[0]
    argv = [str(BIN), "cluster", "start", "--profile-dir", str(profile.dir), "--cluster-id", profile.cluster_id,
            "-n", "1", "--controller", "ssh", "--controller-host", h1, "--engines", "ssh", "--hosts", f"{h1}:1",
            "--ssh-args", ssh_hosts.ssh_args(), PY]
    p = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        rc = client_when_ready(profile, 1, p)
        rc.close()
        remote_dir = profile.state()["controller"]["state"]["remote_dir"]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "Cluster stopped" in out, out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait(10)
    assert wait_gone(list(ssh_hosts.pids_in(n1)), 15) == []
    assert not Path(remote_dir).exists()
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert not profile.client_file.exists()
    assert profile.left_running() == []
