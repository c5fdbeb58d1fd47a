"""The kernel's engines on other hosts over ssh: the real Parallax kernel
under jupyter_client, its hub on the bridge address of network-namespace
hosts with their own sshd and host names (the `ssh_hosts` fixture).
`%cluster start --engines ssh` and `--engines sshproxy` (each host's own
`parallax cluster engines` starts them there) add engines that run cells
beside the embedded ones; `%cluster` shows them; kernel shutdown leaves no
process, ssh client or proxy directory behind on any host."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from launch_harness import VENV_BIN, wait_gone
from test_ssh import ssh_processes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from kernel_harness import Kernel, strip_ansi  # noqa: E402

pytestmark = pytest.mark.timeout(180)

KIND = {"ssh": "SSH", "sshproxy": "SSHProxy"}
PY = f"--engine-args=--python={VENV_BIN / 'python3'}"


def cmdlines(pids) -> list[str]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:
            pass
    return out


def hostnames_by_engine(k: Kernel) -> dict[int, str]:
    r = k.execute("%px import socket; print(socket.gethostname())")
    assert r.status == "ok", r.describe()
    return {eid: text.strip() for eid, text in r.stdout_by_engine().items()}


@pytest.mark.parametrize("launcher", ["ssh", "sshproxy"])
def test_cluster_start_puts_engines_on_other_hosts(launcher, ssh_hosts, tmp_path):
    (h1, h2), (n1, n2) = ssh_hosts.addrs, ssh_hosts.names
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    # the hosts' proxy profiles: under their $HOME (shared here), not the env above
    proxy_root = Path.home() / ".cache" / "parallax" / "proxy"
    before = set(proxy_root.iterdir()) if proxy_root.is_dir() else set()
    k = Kernel(engines=1, extra_args=[f"--ip={ssh_hosts.hub_ip}", f"--location={ssh_hosts.hub_ip}"], env=env)
    try:
        cell = (f"%cluster start --engines {launcher} --hosts {h1}:2,{h2}:1 "
                f"--ssh-args='{ssh_hosts.ssh_args()}' {PY}")
        r = k.execute(cell, timeout=90)
        out = strip_ansi(r.stdout())
        assert r.status == "ok", r.describe()
        assert "3 engines registered; now 4 engines" in out, out
        first, second = ssh_hosts.hostnames
        names = hostnames_by_engine(k)
        assert sorted(names.values())[:3] == sorted([first, first, second]), names
        assert len(names) == 4
        shown = strip_ansi(k.execute("%cluster").stdout())
        assert re.search(rf"launched: 3 engines via {KIND[launcher]} ", shown), shown
        on_hosts = {name: ssh_hosts.pids_in(name) for name in (n1, n2)}
        assert all(on_hosts.values()), on_hosts
    finally:
        k.stop(timeout=60)
    for name in (n1, n2):
        left = wait_gone(list(on_hosts[name]), 20)
        assert left == [], f"left on {name}: {cmdlines(left)}"
        left = ssh_hosts.pids_in(name)
        assert left == set(), f"left on {name}: {cmdlines(left)}"
    assert wait_gone(ssh_processes(ssh_hosts), 10) == []
    # nothing of the proxy's private profiles is left in the (shared) cache
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    after = set(proxy_root.iterdir()) if proxy_root.is_dir() else set()
    assert after - before == set(), after - before
