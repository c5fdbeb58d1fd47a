"""`--engines sshproxy`: ssh proxy mode (ipyparallel's
SSHProxyEngineSetLauncher). `parallax cluster engines` runs on each host
over ssh, on a private profile holding the hub's connection files, and that
host's own launcher (`--proxy-engines`, here local) starts the engines.
The hosts are network namespaces with their own names and sshd (the
`ssh_hosts` fixture). Checked: the engines run there and the stock Client
here uses them, the key is on no command line, stop goes through each
host's `cluster stop` and leaves no process or directory, and a host that
cannot start its engines fails `start` at once with that host's words."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch_harness import BIN, VENV_BIN, child_env, client, wait_gone
from test_ssh import cmdlines_with, hostnames, ssh_processes

pytestmark = pytest.mark.timeout(120)

PY = f"--engine-args=--python={VENV_BIN / 'python3'}"


def test_each_hosts_own_launcher_starts_its_engines(profile, ssh_hosts):
    (h1, h2), (n1, n2) = ssh_hosts.addrs, ssh_hosts.names
    t0 = time.monotonic()
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", f"{h1}:2,{h2}:1", "--proxy-engines", "local",
                        "--ssh-args", ssh_hosts.ssh_args(), PY, "--ip", ssh_hosts.hub_ip,
                        "--location", ssh_hosts.hub_ip, "--daemonize")
    assert "3 engines registered" in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    rc = client(profile, 3)
    try:
        first, second = ssh_hosts.hostnames
        assert hostnames(rc) == [first, first, second]
    finally:
        rc.close()
    key = json.loads(profile.client_file.read_text())["key"]
    assert key and cmdlines_with(key) == []
    state = profile.state()
    assert state["engines"]["class"] == "sshproxy"
    (proxy_set,) = state["engines"]["sets"].values()
    hosts = proxy_set["hosts"]
    assert [h["proxy"] for h in hosts] == [True, True]
    assert sorted(h["remote_hostname"] for h in hosts) == sorted(ssh_hosts.hostnames)
    # each host's own cluster file records the engine set its launcher started
    dirs = [Path(h["remote_dir"]) for h in hosts]
    for d, n in zip(dirs, (2, 1)):
        remote = json.loads((d / "security" / f"cluster-{profile.cluster_id}.json").read_text())
        assert remote["controller"]["class"] == "external"
        (s,) = remote["engines"]["sets"].values()
        assert s["n"] == n
        for f in (d / "security").iterdir():
            assert (f.stat().st_mode & 0o077) == 0, f
    listed = profile.cluster("list", "--profile-dir", profile.dir).stdout
    assert "SSHProxy" in listed, listed
    engines = {name: ssh_hosts.pids_in(name) for name in (n1, n2)}
    assert all(engines.values()), engines
    # signals go through each host's own `cluster signal` (idle engines ignore SIGINT)
    r = profile.cluster("signal", "--profile-dir", profile.dir, "--cluster-id", profile.cluster_id, "-s", "INT")
    assert r.stdout.count("sshproxy ") == 2, r.stdout + r.stderr

    r = profile.cluster("stop")
    assert "Stopped cluster" in r.stdout, r.stdout + r.stderr
    assert not profile.cluster_file.exists()
    for name in (n1, n2):
        assert wait_gone(list(engines[name]), 15) == [], f"left on {name}"
        assert ssh_hosts.pids_in(name) == set(), f"left on {name}"
    assert not any(d.exists() for d in dirs)
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_hub_over_ssh_with_proxied_engines(profile, ssh_hosts):
    """Both ssh features: the hub on one host, the other host's own launcher
    starts the engines, the stock Client here runs work on them."""
    (h1, h2), (n1, n2) = ssh_hosts.addrs, ssh_hosts.names
    r = profile.cluster("start", "--controller", "ssh", "--controller-host", h1, "--engines", "sshproxy",
                        "--hosts", f"{h2}:2", "--ssh-args", ssh_hosts.ssh_args(), PY, "--daemonize")
    assert "2 engines registered" in r.stdout, r.stdout + r.stderr
    rc = client(profile, 2)
    try:
        assert hostnames(rc) == [ssh_hosts.hostnames[1]] * 2
        assert rc[:].apply_sync(pow, 6, 2) == [36, 36]
    finally:
        rc.close()
    assert ssh_hosts.pids_in(n1) and ssh_hosts.pids_in(n2)
    state = profile.state()
    dirs = [Path(state["controller"]["state"]["remote_dir"])]
    dirs += [Path(h["remote_dir"]) for s in state["engines"]["sets"].values() for h in s["hosts"]]
    assert len(dirs) == 2 and all(d.is_dir() for d in dirs), dirs
    profile.cluster("stop")
    for name in (n1, n2):
        assert wait_gone(list(ssh_hosts.pids_in(name)), 15) == [], f"left on {name}"
    assert not any(d.exists() for d in dirs)
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_a_host_that_cannot_start_its_engines_fails_the_start_with_its_words(profile, ssh_hosts):
    h1 = ssh_hosts.addrs[0]
    t0 = time.monotonic()
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", f"{h1}:1", "--ssh-args", ssh_hosts.ssh_args(),
                        "--proxy-args=--no-such-option", "--ip", ssh_hosts.hub_ip, "--location", ssh_hosts.hub_ip,
                        "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 15
    assert "--no-such-option" in r.stderr and f"on {h1}" in r.stderr, r.stderr
    assert ssh_hosts.pids_in(ssh_hosts.names[0]) == set()
    assert profile.left_running() == []

    t0 = time.monotonic()
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", f"{h1}:1", "--ssh-args", ssh_hosts.ssh_args(),
                        "--remote-parallax", "/nonexistent/parallax", "--ip", ssh_hosts.hub_ip,
                        "--location", ssh_hosts.hub_ip, "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 15
    assert "/nonexistent/parallax" in r.stderr, r.stderr
    assert profile.left_running() == []


def test_proxy_options_are_checked_before_anything_starts(profile):
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", "h1:1", "--proxy-engines", "nope",
                        "--ip", "0.0.0.0", check=False)
    assert r.returncode != 0 and "--proxy-engines \"nope\"" in r.stderr, r.stderr
    r = profile.cluster("start", "--proxy-engines", "slurm", check=False)
    assert r.returncode != 0 and "--engines sshproxy" in r.stderr, r.stderr
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", "10.1.2.3:1", check=False)
    assert r.returncode != 0 and "loopback" in r.stderr, r.stderr
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", "h1:2", "--ip", "0.0.0.0",
                        "--proxy-engines", "slurm", "--proxy-args=--queue=debug", "--print-script")
    assert "cluster engines -n 2 --engines slurm" in r.stdout and "--queue=debug" in r.stdout, r.stdout
    assert "<ipcontroller-" in r.stdout and not profile.cluster_file.exists()
    assert profile.left_running() == []


def test_stopping_while_a_host_still_starts_its_engines_leaves_nothing(profile, ssh_hosts):
    """A host whose launcher never produces engines (as a job pending for
    ever: its "mpiexec" is `tail -f`, which never runs them) keeps that
    host's `cluster engines` waiting; Ctrl-C of the foreground start ends
    it there, stops what it launched and removes its profile."""
    h1, n1 = ssh_hosts.addrs[0], ssh_hosts.names[0]
    argv = [str(BIN), "cluster", "start", "--profile-dir", str(profile.dir), "--cluster-id", profile.cluster_id,
            "--engines", "sshproxy", "--hosts", f"{h1}:2", "--ssh-args", ssh_hosts.ssh_args(),
            "--proxy-engines", "mpi", "--proxy-args=--mpi-cmd='tail -f /dev/null' --mpi-args=--",
            "--ip", ssh_hosts.hub_ip, "--location", ssh_hosts.hub_ip]
    p = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        # the script's shell, the host's `cluster engines` and its "mpiexec"
        deadline = time.monotonic() + 30
        while len(ssh_hosts.pids_in(n1)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        started = ssh_hosts.pids_in(n1)
        if len(started) < 3:
            p.kill()
        assert len(started) >= 3, (started, p.communicate(timeout=10) if len(started) < 3 else "")
        time.sleep(1)  # its set is recorded as soon as it started it
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode != 0 and "SIGINT" in err, out + err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait(10)
    assert wait_gone(list(started), 15) == []
    assert ssh_hosts.pids_in(n1) == set()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parallax" / "proxy"
    assert not any(profile.cluster_id in f.read_text() for f in base.glob("p.*/security/cluster-*.json"))
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_slurm_behind_a_proxy_host(profile, ssh_hosts, slurm):
    """The proxy host is a Slurm login node (this host's loopback sshd; its
    slurm.conf comes in ssh's environment, as /etc/slurm would be there):
    its own `parallax cluster engines --engines slurm` submits the job, the
    engines register with the hub here, and stop cancels the job there."""
    host = f"127.0.0.1:{ssh_hosts.loopback_port}:2"
    r = profile.cluster("start", "--engines", "sshproxy", "--hosts", host, "--proxy-engines", "slurm",
                        "--proxy-args=--time=10", "--ssh-args", f"{ssh_hosts.ssh_args()} -o SetEnv=SLURM_CONF={slurm.conf}",
                        PY, "--daemonize", timeout=120)
    assert "2 engines registered" in r.stdout, r.stdout + r.stderr
    (job,) = slurm.jobs()
    rc = client(profile, 2)
    try:
        seen = rc[:].apply_sync(os.getenv, "SLURM_JOB_ID")
        assert seen == [job, job], seen
    finally:
        rc.close()
    (proxy_set,) = profile.state()["engines"]["sets"].values()
    (remote_dir,) = [Path(h["remote_dir"]) for h in proxy_set["hosts"]]
    remote = json.loads((remote_dir / "security" / f"cluster-{profile.cluster_id}.json").read_text())
    (s,) = remote["engines"]["sets"].values()
    assert s["job_id"] == job, s
    profile.cluster("stop")
    assert slurm.jobs() == []
    assert not remote_dir.exists()
    assert profile.left_running() == []
