"""The Parallax kernel on an existing cluster (`--cluster FILE`, `%cluster
connect FILE`): a stock ipcontroller with stock ipengines, and a cluster
started with `parallax cluster start`. The kernel must use it, and leave it
running when it shuts down (it stops only what it started)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BIN = Path(os.environ.get("PARALLAX_BIN") or REPO / "target/release/parallax").resolve()
PY = str(Path(sys.executable))
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(120)


def start_kernel(*extra: str):
    km = KernelManager()
    km._kernel_spec = KernelSpec(
        argv=[str(BIN), "kernel", "-f", "{connection_file}", "--python", PY, *extra],
        display_name="px",
        language="python",
        interrupt_mode="signal",
    )
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    return km, kc


def run(kc, code: str, timeout: float = 30):
    """Execute; return (reply content, [(msg_type, content)] of iopub)."""
    msg_id = kc.execute(code)
    outs = []
    deadline = time.monotonic() + timeout
    while True:
        m = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        t = m["msg_type"]
        if t == "status" and m["content"]["execution_state"] == "idle":
            break
        if t not in ("status", "execute_input"):
            outs.append((t, m["content"]))
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["parent_header"]["msg_id"] == msg_id
    return reply["content"], outs


def stdout(outs) -> str:
    """A local cell's plain stdout."""
    return "".join(c["text"] for t, c in outs if t == "stream" and c["name"] == "stdout")


def texts(outs):
    """The cell's output displays; the progress bar (shown when a cell runs
    longer than --progress-after, as a first cell on a loaded machine can)
    is not output."""
    return sorted(
        c["data"]["text/plain"]
        for t, c in outs
        if t in ("display_data", "update_display_data") and "text/plain" in c["data"]
        and not c.get("transient", {}).get("display_id", "").endswith("-progress")
    )


def stop_kernel(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def stock_cluster(tmp_path):
    """ipcontroller + 2 ipengines, started by ipyparallel itself."""
    import ipyparallel as ipp

    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{VENV_BIN}:{env_path}"
    cid = uuid.uuid4().hex[:8]
    cluster = ipp.Cluster(n=2, profile_dir=str(tmp_path / "profile"), cluster_id=cid, log_level=30)
    try:
        cluster.start_cluster_sync()
        rc = cluster.connect_client_sync()
        rc.wait_for_engines(2, timeout=60)
        client_file = Path(cluster.profile_dir) / "security" / f"ipcontroller-{cid}-client.json"
        assert client_file.exists()
        yield client_file, rc
        rc.close()
    finally:
        cluster.stop_cluster_sync()
        os.environ["PATH"] = env_path


def test_kernel_on_stock_ipcontroller(stock_cluster):
    client_file, rc = stock_cluster
    engine_pids = set(rc[:].apply_sync(os.getpid))
    km, kc = start_kernel("--cluster", str(client_file))
    try:
        c, outs = run(kc, 'print("hello")')
        assert c["status"] == "ok", c
        assert texts(outs) == ["[stdout:0] hello\n", "[stdout:1] hello\n"]
        c, outs = run(kc, "6 * 7")
        assert c["status"] == "ok"
        vals = texts(outs)
        assert len(vals) == 2 and all(v.endswith("42") and "Out[" in v for v in vals), vals
        c, outs = run(kc, "%%px --targets 1\nimport os\nos.getpid()")
        assert c["status"] == "ok"
        [(t, d)] = outs
        assert int(d["data"]["text/plain"].rsplit("m", 1)[-1]) in engine_pids
        # input() on a stock ipengine is not forwarded (its kernel's stdin
        # socket has no path to the notebook): a clear error, no wait
        t0 = time.monotonic()
        c, outs = run(kc, '%%px --targets 0\ninput("name? ")')
        assert time.monotonic() - t0 < 10
        assert c["status"] == "error", c
        err = re.sub(r"\x1b\[[0-9;]*m", "", "".join(d["text"] for t, d in outs if t == "stream"))
        last = err.strip().splitlines()[-1]
        assert last.startswith("StdinNotImplementedError:") and "does not support input requests" in last, err
        # the local namespace's client is on the same (stock) cluster
        c, outs = run(kc, "%%local\nimport os\nprint(sorted(rc.ids), sorted(rc[:].apply_sync(os.getpid)))")
        assert c["status"] == "ok", c
        assert stdout(outs) == f"[0, 1] {sorted(engine_pids)}\n", outs
        c, outs = run(kc, "%engines")
        table = "".join(d["text"] for t, d in outs if t == "stream")
        assert "2 engines registered" in table and "connected to the hub" in table, table
        # %cluster add/restart are for the kernel's own engines only.
        c, outs = run(kc, "%cluster add 1")
        assert c["status"] == "error" and "embedded cluster" in c["evalue"], c
    finally:
        stop_kernel(km, kc)
    # The kernel did not stop the engines it did not start.
    assert sorted(rc.ids) == [0, 1]
    assert set(rc[:].apply_sync(os.getpid)) == engine_pids


def test_parallax_cluster_start_and_connect_magic(tmp_path):
    profile = tmp_path / "profile"
    cid = "k" + uuid.uuid4().hex[:6]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    start = subprocess.run(
        [str(BIN), "cluster", "start", "-n", "2", "--daemonize", f"--profile-dir={profile}", f"--cluster-id={cid}"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert start.returncode == 0, start.stderr
    client_file = profile / "security" / f"ipcontroller-{cid}-client.json"
    try:
        assert client_file.exists()
        # An embedded kernel, then %cluster connect to the external cluster.
        km, kc = start_kernel("--engines", "3")
        try:
            c, outs = run(kc, 'print("x")')
            assert len(texts(outs)) == 3
            kernel = psutil.Process(km.provisioner.process.pid)
            embedded = [p for p in kernel.children() if p.cmdline()[1:2] == ["engine"]]
            assert len(embedded) == 3
            c, outs = run(kc, "%local print(sorted(rc.ids))")
            assert stdout(outs) == "[0, 1, 2]\n", outs
            c, outs = run(kc, f"%cluster connect {client_file}")
            assert c["status"] == "ok", c
            said = "".join(d["text"] for t, d in outs if t == "stream")
            assert "engines [0, 1]" in said, said
            # The embedded engines were stopped.
            wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in embedded),
                     10, "embedded engines to stop")
            c, outs = run(kc, "import os\nprint(os.environ['PARALLAX_N_ENGINES'])")
            assert texts(outs) == ["[stdout:0] 2\n", "[stdout:1] 2\n"]
            # the local client follows the kernel to the connected cluster
            c, outs = run(kc, "%local print(sorted(rc.ids), sorted(parallax_bare.Client().ids) if (parallax_bare := __import__('ipyparallel')) else '')")
            assert stdout(outs) == "[0, 1] [0, 1]\n", outs
            # Stopping an engine of an external cluster goes through the hub.
            c, outs = run(kc, "%cluster stop 1")
            assert c["status"] == "ok", c
            c, outs = run(kc, 'print("left")')
            assert texts(outs) == ["[stdout:0] left\n"]
        finally:
            stop_kernel(km, kc)
        listing = subprocess.run(
            [str(BIN), "cluster", "list", f"--profile-dir={profile}"],
            env=env, capture_output=True, text=True, timeout=30,
        )
        assert cid in listing.stdout, listing.stdout
    finally:
        subprocess.run(
            [str(BIN), "cluster", "stop", f"--profile-dir={profile}", f"--cluster-id={cid}"],
            env=env, capture_output=True, text=True, timeout=60,
        )


def test_bad_cluster_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "nope.json"
    bogus.write_text("{}")
    km, kc = start_kernel("--cluster", str(bogus))
    try:
        c, outs = run(kc, 'print("x")')
        assert c["status"] == "error"
        err = "".join(d.get("text", "") for t, d in outs if t == "stream")
        assert "could not start" in err and "not a client connection file" in err, err
        # The kernel stays up and says the same again.
        c, _ = run(kc, "1")
        assert c["status"] == "error"
        c, outs = run(kc, "%cluster connect /nonexistent/file.json")
        assert c["status"] == "error"
    finally:
        stop_kernel(km, kc)
