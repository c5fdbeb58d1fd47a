"""`parallax cluster start --engines ssh`: engines on other hosts, started
over ssh. The hosts are network namespaces with their own host names and
sshd (the `ssh_hosts` fixture); the hub binds the bridge address. Checked
for real: the engines run on those hosts, the HMAC key is on no command
line, stop leaves nothing on any host, and the failures a user meets (a
hub on loopback, an unreachable host, a missing remote program) are
clear errors at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from launch_harness import BIN, VENV_BIN, child_env, client, wait_gone

pytestmark = pytest.mark.timeout(180)


def hostnames(rc) -> list[str]:
    return sorted(rc[:].apply_sync(__import__("socket").gethostname))


#: run on an engine: its host, its interpreter's parent and that parent's argv
PARENT_CELL = """
import os, socket
with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
    parent = (socket.gethostname(), os.getppid(), [a.decode() for a in f.read().split(b"\\0") if a])
"""


def cmdlines_with(text: str) -> list[str]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if text in line:
            out.append(line)
    return out


def ssh_processes(hosts) -> list[int]:
    """Local ssh clients talking to the test hosts."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            argv = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if argv and os.path.basename(argv[0]) == "ssh" and str(hosts.config) in argv:
            out.append(p.info["pid"])
    return out


FROM_FILE_PROBE = """
import json, os, sys
import ipyparallel as ipp
import psutil
c = ipp.Cluster.from_file(profile_dir=sys.argv[1], cluster_id=sys.argv[2])
(eset,) = c.engines.values()
running = []
for e in eset.launchers.values():
    try:
        e.wait_one(timeout=0)
        running.append(False)
    except TimeoutError:
        running.append(True)
print(json.dumps({"class": type(eset).__name__, "running": running,
                  "pids": [e.pid for e in eset.launchers.values()],
                  "hosts": [e.hostname for e in eset.launchers.values()]}))
sys.stdout.flush()
# the launchers' waiting threads have ssh children of their own
for child in psutil.Process().children(recursive=True):
    child.kill()
os._exit(0)
"""


def test_engines_on_two_hosts_from_a_hosts_file(profile, ssh_hosts):
    h1, h2 = ssh_hosts.addrs
    hostfile = profile.dir.parent / "hosts"
    hostfile.write_text(
        "# two namespace hosts, the venv's Python on each\n"
        f"{h1} 2 python={VENV_BIN / 'python3'}\n"
        f"root@{h2}:22 engines=2 python={VENV_BIN / 'python3'}\n"
    )
    r = profile.cluster("start", "--engines", "ssh", "--hostfile", hostfile, "--ssh-args", ssh_hosts.ssh_args(),
                        "--ip", ssh_hosts.hub_ip, "--location", ssh_hosts.hub_ip, "--daemonize")
    assert "4 engines registered" in r.stdout, r.stdout
    rc = client(profile, 4)
    try:
        assert hostnames(rc) == sorted(ssh_hosts.hostnames * 2)
        # each host's engines got their own ids, and run as separate processes
        pids = rc[:].apply_sync(os.getpid)
        assert len(set(pids)) == 4
    finally:
        rc.close()
    # the key travelled on ssh's stdin: no command line here or there holds it
    key = json.loads(profile.client_file.read_text())["key"]
    assert key and cmdlines_with(key) == []
    state = profile.state()
    assert state["engines"]["class"] == "ssh"
    (ssh_set,) = state["engines"]["sets"].values()
    assert ssh_set["n"] == 4
    assert sorted(h["remote_hostname"] for h in ssh_set["hosts"]) == sorted(ssh_hosts.hostnames)
    assert all(len(h["remote_pids"]) == 2 for h in ssh_set["hosts"])
    listed = profile.cluster("list", "--profile-dir", profile.dir).stdout
    assert "SSH" in listed, listed
    # ipyparallel reads the set as its own SSHEngineSetLauncher: one
    # SSHEngineLauncher per remote engine, with its pid on its host, and
    # reaches each engine through ssh itself (in a child process: its
    # launchers poll the hosts from threads until the engines exit)
    probe = subprocess.run(
        [VENV_BIN / "python", "-c", FROM_FILE_PROBE, str(profile.dir), profile.cluster_id],
        capture_output=True, text=True, timeout=60, env=child_env())
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout)
    assert seen["class"] == "SSHEngineSetLauncher"
    assert sorted(seen["pids"]) == sorted(pid for h in ssh_set["hosts"] for pid in h["remote_pids"])
    assert set(seen["hosts"]) == {h1, h2}
    assert seen["running"] == [True] * 4, seen
    engines = {name: ssh_hosts.pids_in(name) for name in ssh_hosts.names}
    assert all(len(p) >= 2 for p in engines.values()), engines

    profile.cluster("stop")
    assert not profile.cluster_file.exists()
    for name in ssh_hosts.names:
        assert wait_gone(engines[name], 15) == [], f"left on {name}"
        assert ssh_hosts.pids_in(name) == set(), f"left on {name}"
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_hosts_argument_and_n_take_the_first_slots(profile, ssh_hosts):
    h1, h2 = ssh_hosts.addrs
    profile.cluster("start", "-n", 3, "--engines", "ssh", "--hosts", f"{h1}:2,{h2}:2",
                    "--ssh-args", ssh_hosts.ssh_args(), f"--engine-args=--python={VENV_BIN / 'python3'}",
                    "--ip", "0.0.0.0", "--location", ssh_hosts.hub_ip, "--daemonize")
    rc = client(profile, 3)
    try:
        first, second = ssh_hosts.hostnames
        assert hostnames(rc) == [first, first, second]
        # each host's engines fork their interpreters from that host's zygote
        # (hosts here share the file system: the network namespace tells them apart)
        rc[:].execute(PARENT_CELL, block=True)
        parents = rc[:].pull("parent", block=True)
    finally:
        rc.close()
    by_host = {}
    for host, ppid, argv in parents:
        assert "--parallax-zygote" in argv and "--host-lock" in argv, argv
        by_host.setdefault(host, set()).add(ppid)
    assert sorted(len(v) for v in by_host.values()) == [1, 1], by_host
    assert by_host[first] != by_host[second]
    profile.cluster("stop")
    for name in ssh_hosts.names:
        assert ssh_hosts.pids_in(name) == set()
    assert profile.left_running() == []


def test_foreground_cluster_stops_remote_engines_on_sigint(profile, ssh_hosts):
    """Loopback ssh (an sshd on 127.0.0.1): a hub on loopback is fine for it."""
    argv = [str(BIN), "cluster", "start", "--profile-dir", str(profile.dir), "--cluster-id", profile.cluster_id,
            "--engines", "ssh", "--hosts", f"127.0.0.1:{ssh_hosts.loopback_port}:2",
            "--ssh-args", ssh_hosts.ssh_args(), f"--engine-args=--python={VENV_BIN / 'python3'}"]
    p = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        rc = client_when_ready(profile, 2, p)
        try:
            engine_pids = rc[:].apply_sync(os.getpid)
        finally:
            rc.close()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "Cluster stopped" in out, out
        assert wait_gone(engine_pids, 10) == []
        assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait(10)
    assert profile.left_running() == []


def client_when_ready(profile, n, proc):
    deadline = time.monotonic() + 60
    while not profile.client_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"cluster start exited: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("the hub wrote no connection file within 60 s")
        time.sleep(0.1)
    return client(profile, n)


def test_a_loopback_hub_with_remote_hosts_is_refused_at_once(profile, ssh_hosts):
    t0 = time.monotonic()
    r = profile.cluster("start", "--engines", "ssh", "--hosts", f"{ssh_hosts.addrs[0]}:2",
                        "--ssh-args", ssh_hosts.ssh_args(), "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 5
    assert "loopback" in r.stderr and ssh_hosts.addrs[0] in r.stderr and "--ip=0.0.0.0" in r.stderr, r.stderr
    assert not profile.cluster_file.exists()
    assert profile.left_running() == []


def test_an_unreachable_host_fails_the_start_with_sshs_words(profile, ssh_hosts):
    h1 = ssh_hosts.addrs[0]
    dead = f"{ssh_hosts.subnet}.250"  # on the bridge's subnet, nobody there
    t0 = time.monotonic()
    r = profile.cluster("start", "--engines", "ssh", "--hosts", f"{h1}:1,{dead}:1",
                        "--ssh-args", f"{ssh_hosts.ssh_args()} -o ConnectTimeout=2",
                        f"--engine-args=--python={VENV_BIN / 'python3'}",
                        "--ip", ssh_hosts.hub_ip, "--location", ssh_hosts.hub_ip, "--daemonize", check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30
    assert f"ssh to {dead} exited" in r.stderr and "255" in r.stderr, r.stderr
    assert "everything started was stopped" in r.stderr
    # the engine that did start on the reachable host was stopped too
    assert ssh_hosts.pids_in(ssh_hosts.names[0]) == set()
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    assert profile.left_running() == []


def test_a_missing_remote_parallax_is_reported(profile, ssh_hosts):
    h1 = ssh_hosts.addrs[0]
    r = profile.cluster("start", "--engines", "ssh", "--hosts", f"{h1}:1", "--ssh-args", ssh_hosts.ssh_args(),
                        "--remote-parallax", "/nonexistent/parallax", "--ip", ssh_hosts.hub_ip,
                        "--location", ssh_hosts.hub_ip, "--daemonize", "--timeout", "30", check=False)
    assert r.returncode != 0
    assert "/nonexistent/parallax" in r.stderr, r.stderr
    assert ssh_hosts.pids_in(ssh_hosts.names[0]) == set()
    assert profile.left_running() == []


def test_print_script_shows_the_command_and_script_without_the_key(profile, ssh_hosts):
    h1, h2 = ssh_hosts.addrs
    r = profile.cluster("start", "--engines", "ssh", "--hosts", f"{h1}:2,alice@{h2}:2222:1",
                        "--ssh-args", "-o BatchMode=yes", "--ip", "0.0.0.0", "--print-script")
    out = r.stdout
    assert f"# --- 2 engines on {h1}: ssh -o BatchMode=yes {h1} 'sh -s'" in out, out
    assert f"ssh -o BatchMode=yes -p 2222 alice@{h2} 'sh -s'" in out, out
    assert "IPP_CONNECTION_INFO='<the engine connection file's contents>'" in out.replace("'\"'\"'", "'")
    assert "setsid " in out and " engine --n-engines=3" in out
    assert not profile.cluster_file.exists()


def test_bad_host_lists_are_clear_errors(profile, tmp_path):
    r = profile.cluster("start", "--engines", "ssh", check=False)
    assert r.returncode != 0 and "--hosts" in r.stderr and "--hostfile" in r.stderr, r.stderr
    r = profile.cluster("start", "--engines", "ssh", "--hosts", "h1:0", check=False)
    assert r.returncode != 0 and '"0" is not a number of engines' in r.stderr, r.stderr
    r = profile.cluster("start", "-n", 5, "--engines", "ssh", "--hosts", "h1:2,h2:2", "--ip", "0.0.0.0",
                        check=False)
    assert r.returncode != 0 and "-n 5 asks for more engines than the hosts have slots for (4" in r.stderr
    bad = tmp_path / "hosts"
    bad.write_text("h1 2 pyhton=/usr/bin/python3\n")
    r = profile.cluster("start", "--engines", "ssh", "--hostfile", bad, "--ip", "0.0.0.0", check=False)
    assert r.returncode != 0 and "line 1" in r.stderr and "pyhton" in r.stderr, r.stderr
    assert profile.left_running() == []
