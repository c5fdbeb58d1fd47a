"""Many engines, bounded for `make test` (the figures are `make bench
BENCH=scale`'s job, never asserted here):

* a kernel with 32 engines starts, runs a cell on every engine and stops
  cleanly, several times in a row, with no engine lost or left behind;
* `parallax bench engines -n 1000` (the load generator: fake engines that
  register, heartbeat and answer) gets every one of 1,000 engines
  registered in one storm, and fans a request out to all of them;
* the same with `--sockets lean` (each fake engine keeps only its heartbeat
  pong and the shell connection measured, so 10,000 fit under the 20,000
  open files a process may hold here): 1,000 lean engines through the MUX
  all register and get the fan-out, `--via none` registers and heartbeats
  1,000 with about one hub connection each.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PARALLAX_BIN
from kernel_harness import Kernel, strip_ansi, wait_gone

N = 32
ROUNDS = 3


@pytest.mark.timeout(600)
def test_kernel_with_32_engines_starts_runs_and_stops_repeatedly():
    for round_ in range(ROUNDS):
        k = Kernel(engines=N, ready_timeout=120)
        try:
            r = k.execute("%%px\nimport os\nprint('engine', os.environ['PARALLAX_ENGINE_ID'])", timeout=180)
            assert r.status == "ok", f"round {round_}: {r.describe()}"
            # 32 engines: one merged display; all texts differ, so one
            # "[stdout:i] engine i" line per engine, in engine order
            texts = [t for t in r.final_texts() if t]  # a progress bar, blanked when done, is ""
            assert len(texts) == 1, texts
            assert texts[0] == "".join(f"[stdout:{i}] engine {i}\n" for i in range(N)), texts[0]
            assert "still starting" not in r.stderr(), f"round {round_}: {r.stderr()}"
            # identical output of every engine: shown once with its range
            same = k.execute("%%px\nprint('done')", timeout=60)
            assert [t for t in same.final_texts() if t] == [f"[stdout:0-{N - 1}] done\n"], same.describe()
            plain = k.execute("%%px --no-merge --no-stream\nprint('done')", timeout=60)
            assert plain.stdout().count("done") == N, plain.describe()
            e = k.execute("%engines", timeout=60)
            out = strip_ansi(e.stdout())
            assert f"{N} engines registered" in out, out
            assert "not registered yet" not in out, out
            pids = [k.pid] + [p.pid for p in k.descendants()]
            # kernel + N engines + N Python workers
            assert len(pids) >= 1 + 2 * N, f"round {round_}: {len(pids)} processes"
        finally:
            k.stop()
        assert wait_gone(pids, 30) == [], f"round {round_}: processes left behind"


@pytest.mark.timeout(300)
def test_load_generator_registers_1000_engines():
    r = subprocess.run(
        [str(PARALLAX_BIN), "bench", "engines", "-n", "1000", "--rounds", "3", "--idle", "1",
         "--timeout", "200", "--json"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    report = json.loads(r.stdout)
    assert report["engines"] == 1000
    assert report["registered_after_idle"] == 1000, report
    assert report["fanout_rounds"] == 3
    assert report["fanout_max_ms"] > 0, report
    assert report["bcast_max_ms"] > 0, report  # the same through the broadcast scheduler
    assert report["hub_kib_per_engine"] > 0, report


def run_loadgen(*args: str, timeout: float = 280) -> dict:
    r = subprocess.run([str(PARALLAX_BIN), "bench", "engines", *args, "--json"],
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.timeout(300)
def test_lean_load_generator_registers_1000_engines_and_fans_out_through_the_mux():
    report = run_loadgen("-n", "1000", "--sockets", "lean", "--via", "mux", "--rounds", "3",
                         "--idle", "1", "--timeout", "200")  # fmt: skip
    assert report["engines"] == 1000
    assert report["sockets"] == "lean" and report["via"] == "mux", report
    assert report["registered_after_idle"] == 1000, report
    assert report["fanout_rounds"] == 3
    assert report["fanout_max_ms"] > 0, report
    assert "bcast_p50_ms" not in report, report  # not connected to the broadcast leaves
    # one SUB per 500 engines gets the pings
    assert report["ping_subscribers"] == 2, report
    # each engine: its pong and its MUX connection, the registration socket
    # closed after the reply — here and in the hub (full sockets: 6 each)
    assert 2000 <= report["hub_open_files"] < 2000 + 200, report
    assert 2000 <= report["loadgen_open_files"] < 2000 + 200, report
    assert report["hub_kib_per_engine"] > 0, report


@pytest.mark.timeout(300)
def test_lean_load_generator_via_none_registers_and_heartbeats_only():
    report = run_loadgen("-n", "1000", "--sockets", "lean", "--via", "none", "--ping-group", "250",
                         "--register-at-once", "100", "--rounds", "3", "--idle", "4", "--ping", "1000",
                         "--timeout", "200")  # fmt: skip
    assert report["registered_after_idle"] == 1000, report  # 4 heartbeats later, none purged
    assert report["ping_subscribers"] == 4, report
    assert report["registration_sockets_at_once"] == 100, report
    assert "fanout_p50_ms" not in report and "bcast_p50_ms" not in report, report
    assert "--via none" in report["fanout_skipped"], report
    assert 1000 <= report["hub_open_files"] < 1000 + 200, report
    assert report["hub_heartbeat_cpu_percent"] >= 0, report


def test_lean_load_generator_rejects_bad_input():
    def err(*args: str) -> str:
        r = subprocess.run([str(PARALLAX_BIN), "bench", "engines", *args],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode != 0, r.stdout
        return r.stderr

    assert "--tasks needs fake engines with a shell connection" in err(
        "-n", "5", "--sockets", "lean", "--via", "none", "--tasks", "5")
    assert "apply only with --sockets lean" in err("-n", "5", "--ping-group", "2")
    assert "--ping-group must be at least 1" in err("-n", "5", "--sockets", "lean", "--ping-group", "0")
    # more than the open files allow: the largest -n that fits is named
    # (a million engines need more than any limit, fs.nr_open included;
    # the check starts no hub)
    out = err("-n", "1000000", "--sockets", "lean", "--via", "mux")
    assert "use at most -n" in out, out
    out = err("-n", "1000000")
    assert "use at most -n" in out and "--sockets lean" in out, out


def test_load_generator_rejects_bad_input(tmp_path):
    r = subprocess.run([str(PARALLAX_BIN), "bench", "engines", "-n", "0"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0
    assert "-n must be at least 1" in r.stderr
    bogus = tmp_path / "ipcontroller-engine.json"
    bogus.write_text("{}")
    r = subprocess.run([str(PARALLAX_BIN), "bench", "engines", "-n", "3", "--file", str(bogus)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0
    assert "is not an engine connection file" in r.stderr
