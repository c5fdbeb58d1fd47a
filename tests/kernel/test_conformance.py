"""Jupyter protocol conformance of the Parallax kernel (jupyter_kernel_test).

The kernel is `parallax-python` with 4 engines (conftest.py installs the
kernelspec). Every message it sends during these tests is checked against
the Jupyter message spec v5 by jupyter_kernel_test's `validate_message`.

Which of jupyter_kernel_test's tests apply as they are, and why some are
adapted: a Parallax cell runs on every engine and its outputs come back in
ipyparallel's `%%px` formats, not as a plain IPython kernel's messages —

* engine stdout/stderr is one `display_data` per engine and stream,
  text/plain `[stdout:N] …`, updated in place with `update_display_data`
  (ipyparallel's streaming output in a notebook), never a `stream` message;
* a result is a `display_data` `Out[N:C]: repr` per engine, not an
  `execute_result` (in ipyparallel the %%px cell itself has no value);
* rich output is `[output:N]` then the engine's display_data;
* an error is a stderr stream `[N:execute]` + traceback per failing engine,
  then one `error` message (AlreadyDisplayedError, "N errors").

So test_execute_stdout, test_execute_stderr, test_execute_result,
test_display_data and test_error are overridden below with the %%px form of
the same check (same code attributes, same execute_helper and message
validation, assertions on the merged format). The others run unchanged.
"""

from __future__ import annotations

import os
import re
import signal
import time
from queue import Empty

import jupyter_kernel_test as jkt
from jupyter_kernel_test.msgspec_v5 import validate_message

from conftest import KERNEL_NAME, N_ENGINES
from kernel_harness import plain, stream_displays

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ENGINES = set(range(N_ENGINES))


class ParallaxKernelTests(jkt.KernelTests):
    kernel_name = KERNEL_NAME
    language_name = "python"
    file_extension = ".py"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        # complete and inspect are answered by an engine within 1 s, or empty
        # (while the cluster starts, too): the engines must be up first
        try:
            reply = cls.kc.execute_interactive("pass", timeout=120, output_hook=lambda m: None)
            assert reply["content"]["status"] == "ok", reply["content"]
        except BaseException:
            cls.tearDownClass()  # unittest skips it when setUpClass fails
            raise

    # -- run unchanged --------------------------------------------------
    # complete and inspect are forwarded to one engine (rlcompleter,
    # pydoc); is_complete is the kernel's own lexical check
    completion_samples = [
        {"text": "isinstanc", "matches": {"isinstance"}},
        {"text": "pri"},
    ]
    complete_code_samples = ["1+2", 'print("hello, world")', "x = [1,\n     2]"]
    incomplete_code_samples = ["for i in range(3):", "x = [1,", "def f(x):\n    return x"]
    invalid_code_samples = ["1+", "x = )"]
    code_inspect_sample = "print"

    # history: the kernel keeps the cells it ran (test_history takes its
    # code from code_execute_result)
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "1?2"

    # -- omitted --------------------------------------------------------
    # code_page_something: engines' pager payloads ("print?") are not part of
    # %%px's output model — ipyparallel's client drops execute_reply payloads,
    # and with N engines there would be N pages, not the one payload the test
    # requires.
    # code_clear_output: ipyparallel's %%px does not forward an engine's
    # clear_output (one engine clearing would wipe every engine's merged
    # output), so the kernel is not expected to send one.

    # -- overridden in the %%px form (see the module docstring) ---------
    code_hello_world = 'print("hello, world")'
    code_stderr = 'import sys; print("oops", file=sys.stderr)'
    code_execute_result = [
        {"code": "1+2", "result": "3"},
        {"code": "6*7", "result": "42"},
    ]
    code_display_data = [
        {
            "code": 'from IPython.display import display, HTML; display(HTML("<b>x</b>"))',
            "mime": "text/html",
        },
    ]
    code_generate_error = 'raise Exception("boom")'

    def test_execute_stdout(self) -> None:
        """stdout → one `[stdout:N] ` display per engine, text accumulated,
        each with its own transient display_id (updated in place)."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(code=self.code_hello_world)
        self.assertEqual(reply["content"]["status"], "ok")
        got = stream_displays(output_msgs, "stdout")
        self.assertEqual(got, {e: "hello, world\n" for e in ENGINES}, output_msgs)
        ids = {
            m["content"]["transient"]["display_id"]
            for m in output_msgs
            if m["msg_type"] == "display_data" and plain(m).startswith("[stdout:")
        }
        self.assertEqual(len(ids), N_ENGINES, "one display_id per engine's stdout")
        for m in output_msgs:
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout":
                self.assertNotIn("hello, world", m["content"]["text"], "engine stdout sent as a stream")

    def test_execute_stderr(self) -> None:
        """stderr → one `[stderr:N] ` display per engine."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(code=self.code_stderr)
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stderr"), {e: "oops\n" for e in ENGINES})

    def test_execute_result(self) -> None:
        """the value → `Out[N:C]: repr` per engine (display_data, red prefix)."""
        for sample in self.code_execute_result:
            with self.subTest(code=sample["code"]):
                self.flush_channels()
                reply, output_msgs = self.execute_helper(sample["code"])
                self.assertEqual(reply["content"]["status"], "ok")
                seen = {}
                for msg in output_msgs:
                    if msg["msg_type"] not in ("display_data", "execute_result"):
                        continue
                    m = re.fullmatch(r"Out\[(\d+):(\d+)\]: (.*)", plain(msg), re.S)
                    if m:
                        seen[int(m.group(1))] = m.group(3)
                        raw = msg["content"]["data"]["text/plain"]
                        self.assertTrue(raw.startswith("\x1b[0;31mOut["), f"no red prefix: {raw!r}")
                self.assertEqual(seen, {e: sample["result"] for e in ENGINES}, output_msgs)

    def test_display_data(self) -> None:
        """rich output → `[output:N]` then the engine's display_data."""
        for sample in self.code_display_data:
            with self.subTest(code=sample["code"]):
                self.flush_channels()
                reply, output_msgs = self.execute_helper(sample["code"])
                self.assertEqual(reply["content"]["status"], "ok")
                labels = []
                for i, msg in enumerate(output_msgs):
                    if msg["msg_type"] == "display_data" and sample["mime"] in msg["content"]["data"]:
                        self.assertGreater(i, 0)
                        prev = output_msgs[i - 1]
                        text = (
                            prev["content"].get("text", "")
                            if prev["msg_type"] == "stream"
                            else plain(prev)
                        )
                        m = re.fullmatch(r"\[output:(\d+)\]\s*", text)
                        self.assertIsNotNone(m, f"display not preceded by [output:N]: {text!r}")
                        labels.append(int(m.group(1)))
                self.assertEqual(sorted(labels), sorted(ENGINES), output_msgs)

    def test_error(self) -> None:
        """an exception on every engine → `[N:execute]` + traceback on
        stderr per engine, then one error message, AlreadyDisplayedError."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(self.code_generate_error)
        self.assertEqual(reply["content"]["status"], "error")
        errors = [m for m in output_msgs if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1, output_msgs)
        self.assertIs(output_msgs[-1], errors[0], "the error message comes last")
        self.assertEqual(errors[0]["content"]["ename"], "AlreadyDisplayedError")
        self.assertEqual(errors[0]["content"]["evalue"], f"{N_ENGINES} errors")
        self.assertEqual(reply["content"]["ename"], "AlreadyDisplayedError")
        stderr = "".join(
            m["content"]["text"]
            for m in output_msgs
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
        )
        stderr = ANSI.sub("", stderr)
        for e in ENGINES:
            self.assertIn(f"[{e}:execute]", stderr)
        self.assertEqual(stderr.count("Exception: boom"), N_ENGINES, stderr)

    # -- more %%px behaviour through the same machinery ------------------

    def test_px_targets(self) -> None:
        """`%%px --targets 0` runs on engine 0 only."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper('%%px --targets 0\nprint("only zero")')
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stdout"), {0: "only zero\n"})

    def test_px_engine_environment(self) -> None:
        """engines see PARALLAX_ENGINE_ID and PARALLAX_N_ENGINES."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(
            'import os; print(os.environ["PARALLAX_ENGINE_ID"], os.environ["PARALLAX_N_ENGINES"])'
        )
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(
            stream_displays(output_msgs, "stdout"), {e: f"{e} {N_ENGINES}\n" for e in ENGINES}
        )

    def test_px_namespace_kept(self) -> None:
        """each engine keeps its own namespace between cells."""
        self.flush_channels()
        self.execute_helper('import os; mine = int(os.environ["PARALLAX_ENGINE_ID"]) * 10')
        reply, output_msgs = self.execute_helper("print(mine + 1)")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(
            stream_displays(output_msgs, "stdout"), {e: f"{e * 10 + 1}\n" for e in ENGINES}
        )

    def test_z_interrupt(self) -> None:
        """interrupting a cell stops every engine's code within seconds and
        the kernel (and the engines' namespaces) stay usable. Named test_z_
        so it runs last in the class."""
        self.flush_channels()
        self.execute_helper("kept = 7")
        msg_id = self.kc.execute("import time\nfor _ in range(600): time.sleep(0.1)")
        busy = self.kc.get_iopub_msg(timeout=jkt.TIMEOUT)
        validate_message(busy, "status", msg_id)
        time.sleep(2)  # let the engines start sleeping
        t0 = time.monotonic()
        self.km.interrupt_kernel()
        try:
            reply = self.get_non_kernel_info_reply(timeout=20)
        except Empty:
            self.fail("no execute_reply within 20 s of the interrupt")
        validate_message(reply, "execute_reply", msg_id)
        self.assertLess(time.monotonic() - t0, 20)
        self.assertEqual(reply["content"]["status"], "error")
        self.flush_channels()
        reply, output_msgs = self.execute_helper("print(kept)")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stdout"), {e: "7\n" for e in ENGINES})


# -- the kernel's process tree ---------------------------------------------


def _start_kernel():
    from jupyter_client.manager import start_new_kernel

    return start_new_kernel(kernel_name=KERNEL_NAME, startup_timeout=60)


def _engine_ids_run(kc) -> dict[int, str]:
    """Run a cell that prints each engine's pid; engine id → pid text."""
    out = []
    reply = kc.execute_interactive(
        "import os; print(os.getpid())", timeout=60, output_hook=out.append
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    return stream_displays([m for m in out if m["msg_type"] != "status"], "stdout")


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_kernel_killed_takes_its_cluster_along():
    """SIGKILL of the kernel (what a frontend does to a hung kernel) leaves
    no engine or engine Python behind: the conftest's orphan check fails the
    test if anything outlives it."""
    import psutil

    km, kc = _start_kernel()
    try:
        pids = _engine_ids_run(kc)
        assert set(pids) == ENGINES
        tree = _descendants(km.provisioner.process.pid)
        assert {int(p.strip()) for p in pids.values()} <= {p.pid for p in tree}, (
            "the engines' Python processes are not the kernel's descendants"
        )
        kc.stop_channels()
        os.kill(km.provisioner.process.pid, signal.SIGKILL)  # the kernel alone
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, [f"{p.pid} {p.name()}" for p in alive]
    finally:
        if km.is_alive():
            km.shutdown_kernel(now=True)
        else:
            km.cleanup_resources()


def test_restart_replaces_the_cluster():
    """A kernel restart (shutdown_request restart=true, then a new kernel
    process) starts fresh engines: new namespaces, the old engines gone."""
    import psutil

    km, kc = _start_kernel()
    try:
        kc.execute_interactive("survivor = 1", timeout=60)
        old_tree = _descendants(km.provisioner.process.pid)
        assert old_tree, "the kernel has no child processes"
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=60)
        gone, alive = psutil.wait_procs(old_tree, timeout=15)
        assert not alive, [f"{p.pid} {p.name()}" for p in alive]
        out = []
        reply = kc.execute_interactive(
            "print('survivor' in dir())", timeout=60, output_hook=out.append
        )
        assert reply["content"]["status"] == "ok"
        assert stream_displays(out, "stdout") == {e: "False\n" for e in ENGINES}
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_kernel_exits_when_its_frontend_dies(tmp_path):
    """The process that started the kernel (a Jupyter server, nbclient) is
    killed: the kernel must notice and exit with its cluster, as ipykernel
    does (it polls its parent: JPY_PARENT_PID / reparenting to init), rather
    than stay behind as an orphan with N engines."""
    import subprocess
    import sys

    import psutil

    starter = tmp_path / "starter.py"
    starter.write_text(
        "import sys, time\n"
        "from jupyter_client.manager import start_new_kernel\n"
        f"km, kc = start_new_kernel(kernel_name={KERNEL_NAME!r}, startup_timeout=60)\n"
        "kc.execute_interactive('x = 1', timeout=60, output_hook=lambda m: None)\n"
        "print(km.provisioner.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(starter)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"starter printed {line!r}"
        kernel = psutil.Process(int(line))
        tree = [kernel, *kernel.children(recursive=True)]
        assert len(tree) > N_ENGINES, [p.pid for p in tree]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, "still running 20 s after the frontend died: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline()[:2])}" for p in alive if p.is_running()
    )
