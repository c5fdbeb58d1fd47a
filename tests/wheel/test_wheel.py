"""The wheel as a user gets it: `pip install parallax_jupyter-*.whl` into a
fresh venv (beside jupyter_client, nbclient, ipyparallel), then Jupyter finds
the kernel, a notebook runs on it, and ipyparallel starts a Parallax hub and
engines by name. Everything runs in the venv's own processes (scripts run
with its Python, its bin not on PATH)."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap

import pytest

from conftest import run

pytestmark = pytest.mark.timeout(600)


def venv_python(venv, code: str, timeout=240):
    """Run `code` with the venv's Python; its last stdout line is JSON."""
    p = run([venv["python"], "-c", textwrap.dedent(code)], env=venv["env"], timeout=timeout,
            cwd=venv["root"])
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_wheel_holds_binary_kernelspec_and_entry_points(venv):
    parallax = venv["bin"] / "parallax"
    assert parallax.is_file()
    assert run([parallax, "--version"], env=venv["env"]).stdout.startswith("parallax ")
    # the wheel's binary is the Python path: no Rust engine
    p = run([parallax, "kernelspec", "install", "--prefix", venv["root"] / "ks", "--all"],
            env=venv["env"])
    assert "Not installing parallax-rust" in p.stdout and "make build-rust" in p.stdout
    e = subprocess.run([parallax, "engine", "--language", "rust"], env=venv["env"],
                       capture_output=True, text=True, timeout=30)
    assert e.returncode != 0 and "--features rust-engine" in e.stderr, e
    got = venv_python(venv, """
        import json
        from importlib.metadata import entry_points
        import parallax_jupyter
        print(json.dumps({
            "binary": parallax_jupyter.binary(),
            "controller": [e.value for e in entry_points(group="ipyparallel.controller_launchers") if e.name == "parallax"],
            "engines": [e.value for e in entry_points(group="ipyparallel.engine_launchers") if e.name == "parallax"],
        }))
    """)
    assert got["binary"] == str(parallax)
    assert got["controller"] == ["parallax_jupyter.launchers:ParallaxControllerLauncher"]
    assert got["engines"] == ["parallax_jupyter.launchers:ParallaxEngineSetLauncher"]


def test_jupyter_kernelspec_list_shows_parallax_python(venv):
    out = run([venv["bin"] / "jupyter", "kernelspec", "list", "--json"], env=venv["env"]).stdout
    specs = json.loads(out)["kernelspecs"]
    assert "parallax-python" in specs, specs.keys()
    ks = specs["parallax-python"]
    assert ks["resource_dir"] == str(venv["dir"] / "share/jupyter/kernels/parallax-python")
    assert ks["spec"]["display_name"] == "Parallax Python (4 engines)"
    assert ks["spec"]["argv"][:3] == ["python", "-m", "parallax_jupyter"]


def test_notebook_runs_on_the_installed_kernel(venv):
    """nbclient (in the venv) runs a notebook on parallax-python: the cells
    fan out to the 4 engines, which run the venv's Python."""
    got = venv_python(venv, """
        import json
        import nbformat
        from nbclient import NotebookClient
        nb = nbformat.v4.new_notebook()
        nb.metadata.kernelspec = {"name": "parallax-python", "display_name": "Parallax Python", "language": "python"}
        nb.cells = [
            nbformat.v4.new_code_cell("import os, sys\\nx = int(os.environ['PARALLAX_ENGINE_ID'])\\nprint(sys.prefix)"),
            nbformat.v4.new_code_cell("%%px --targets 0\\nx * 10 + 1"),
        ]
        NotebookClient(nb, timeout=120, startup_timeout=90, kernel_name="parallax-python").execute()
        def text(o):
            return o.get("text") or o.get("data", {}).get("text/plain", "")
        print(json.dumps([[[o["output_type"], text(o)] for o in c.outputs] for c in nb.cells]))
    """)
    prints, result = got
    printed = "".join(t for _, t in prints)
    for i in range(4):
        assert f"[stdout:{i}]" in printed, prints
    assert printed.count(str(venv["dir"])) == 4, prints
    # engine 0's result, as ipyparallel's %%px shows it
    assert len(result) == 1, result
    assert re.sub(r"\x1b\[[0-9;]*m", "", result[0][1]) == "Out[0:2]: 1", result


CLUSTER = """
    import json, os, sys
    import ipyparallel as ipp

    def where():
        import os, sys
        return os.getpid(), sys.executable

    out = {}
    kw = dict(controller="parallax", engines="parallax", n=2, controller_ip="127.0.0.1",
              log_level=10)
    cluster = ipp.Cluster(cluster_id="api", **kw)
    cluster.start_cluster_sync()
    try:
        out["controller_args"] = cluster.controller.args
        out["engine_args"] = [el.args for es in cluster.engines.values() for el in es.launchers.values()]
        rc = cluster.connect_client_sync()
        rc.wait_for_engines(2, timeout=60)
        out["api"] = rc[:].apply_sync(where)
        out["lb"] = rc.load_balanced_view().map_sync(lambda x: x * x, range(6))
        rc.close()
    finally:
        cluster.stop_cluster_sync()
    with ipp.Cluster(cluster_id="ctx", **kw) as rc:
        rc.wait_for_engines(2, timeout=60)
        out["ctx"] = rc[:].apply_sync(where)
    print(json.dumps(out))
"""


def test_ipp_cluster_starts_parallax_hub_and_engines(venv):
    got = venv_python(venv, CLUSTER)
    parallax = str(venv["bin"] / "parallax")
    assert got["controller_args"][:2] == [parallax, "hub"], got["controller_args"]
    engine_args = got["engine_args"]
    assert len(engine_args) == 2, engine_args
    for a in engine_args:
        assert a[:3] == [parallax, "engine", f"--python={venv['python']}"], a
    for key in ("api", "ctx"):
        pids = {pid for pid, _ in got[key]}
        assert len(pids) == 2, got[key]
        # engines run user code in the venv's Python
        assert {exe for _, exe in got[key]} == {str(venv["python"])}, got[key]
    assert got["lb"] == [x * x for x in range(6)]


def test_ipcluster_start_with_parallax(venv):
    """`ipcluster start --controller=parallax --engines=parallax -n 2`, a
    stock Client, `ipcluster stop`."""
    env = venv["env"]
    ipcluster = venv["bin"] / "ipcluster"
    profile = venv["root"] / "profile_cli"
    run([ipcluster, "start", "-n", "2", "--controller=parallax", "--engines=parallax",
         f"--profile-dir={profile}", "--cluster-id=cli", "--daemonize"], env=env, timeout=120)
    try:
        got = venv_python(venv, f"""
            import json, os
            import ipyparallel as ipp
            rc = ipp.Client(profile_dir={str(profile)!r}, cluster_id="cli", timeout=60)
            rc.wait_for_engines(2, timeout=60)
            pids = rc[:].apply_sync(os.getpid)
            rc.close()
            cluster = ipp.Cluster.from_file(profile_dir={str(profile)!r}, cluster_id="cli")
            print(json.dumps({{"pids": pids, "controller": cluster.controller.args[:2]}}))
        """)
        assert len(set(got["pids"])) == 2
        assert got["controller"] == [str(venv["bin"] / "parallax"), "hub"]
    finally:
        run([ipcluster, "stop", f"--profile-dir={profile}", "--cluster-id=cli"], env=env,
            timeout=120)
