"""Jupyter protocol conformance of the Parallax Rust kernel
(jupyter_kernel_test), plus interrupt and shutdown of its evcxr engines.

The kernel is `parallax-rust` with 2 engines (installed here with `parallax
kernelspec install --prefix P --language rust --engines 2`, P first on
JUPYTER_PATH for this module). One kernel serves the whole module (the
class's setUpClass); every message it sends while a test reads it is checked
against the Jupyter message spec v5 by jupyter_kernel_test's
`validate_message`.

Outputs come back in ipyparallel's `%%px` formats, as with parallax-python
(see test_conformance.py): engine stdout/stderr is one `display_data` per
engine and stream (`[stdout:N] …`, updated in place), a value is a
`display_data` `Out[N:C]: value` per engine, rich output is `[output:N]`
then the engine's display_data, and errors are `[N:execute]` + traceback on
stderr then one `error` (AlreadyDisplayedError). So test_execute_stdout,
test_execute_stderr, test_execute_result, test_display_data and test_error
are overridden with the `%%px` form of the same check, in Rust;
test_is_complete runs each sample as a subtest of its own. test_pager and
test_clear_output are skipped with the reason (nothing in evcxr produces a
page payload or clear_output).

Rust cells run in evcxr: the engines' first cell compiles for seconds
(setUpClass runs one with a generous timeout), later cells take ~0.3–1.5 s,
so execute_helper waits up to 60 s instead of jupyter_kernel_test's 15.

The last tests of the class (test_z_interrupt, test_zz_shutdown_…) change
the kernel: an interrupt restarts every engine's evcxr runtime process, and
the shutdown test ends the kernel. unittest runs a class's tests in name
order, so they run last.
"""

from __future__ import annotations

import re
import subprocess
import time
from queue import Empty
from unittest import SkipTest

import jupyter_kernel_test as jkt
import psutil
import pytest
from jupyter_kernel_test.msgspec_v5 import validate_message

from kernel_harness import engine_list, gone, plain, stream_displays, wait_gone

from conftest import RUST_ENGINES as N_ENGINES, RUST_KERNEL_NAME as KERNEL_NAME  # noqa: E402
ENGINES = set(range(N_ENGINES))
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: an execute_request's reply and output, the first cell's compile included
CELL_TIMEOUT = 60
FIRST_CELL_TIMEOUT = 180

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _rust_kernel_first_on_path(rust_kernelspec):
    """parallax-rust (conftest) installed before setUpClass starts the kernel."""
    return rust_kernelspec


# ---------------------------------------------------------------- helpers


def results(output_msgs) -> dict[int, str]:
    """engine id → value of its `Out[N:C]: value` output."""
    out = {}
    for msg in output_msgs:
        if msg["msg_type"] in ("display_data", "execute_result"):
            m = re.fullmatch(r"Out\[(\d+):(\d+)\]: (.*)", plain(msg), re.S)
            if m:
                out[int(m.group(1))] = m.group(3)
    return out


def stderr_text(output_msgs) -> str:
    return ANSI.sub(
        "",
        "".join(
            m["content"]["text"]
            for m in output_msgs
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
        ),
    )


# ---------------------------------------------------------------- the kernel


class ParallaxRustKernelTests(jkt.KernelTests):
    kernel_name = KERNEL_NAME
    language_name = "rust"
    file_extension = ".rs"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        # the engines' first cell compiles evcxr's code for seconds
        try:
            reply = cls.kc.execute_interactive(
                "let parallax_ready = true;", timeout=FIRST_CELL_TIMEOUT, output_hook=lambda m: None
            )
            assert reply["content"]["status"] == "ok", reply["content"]
        except BaseException:
            cls.tearDownClass()  # unittest skips it when setUpClass fails
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.kc.stop_channels()
        if cls.km.is_alive():
            cls.km.shutdown_kernel()
        else:  # test_zz_shutdown_… ended it
            cls.km.cleanup_resources()

    def execute_helper(self, code, timeout=CELL_TIMEOUT, **kw):
        return super().execute_helper(code, timeout=timeout, **kw)

    # -- run unchanged --------------------------------------------------
    # complete and inspect are forwarded to one engine: evcxr's
    # rust-analyzer, which knows std and the cells run so far
    completion_samples = [
        {"text": "std::env::va", "matches": {"var(key)", "var_os(key)", "vars()", "vars_os()"}},
        {"text": "prin", "matches": {"print!()", "println!()"}},
    ]
    complete_code_samples = [
        "let a = 1;",
        'println!("}")',
        "fn f() -> i32 { 1 }",
        "fn first<'a>(s: &'a str) -> &'a str { s }",
        'let s = r#"{"#;',
        'let path = r"C:\\";',  # a backslash does not escape in a raw string
        "let c = '{';",  # nor does a bracket count in a char literal
    ]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,", 'let s = "abc', "/* unclosed"]
    invalid_code_samples = ["}", "let x = (1));"]
    code_inspect_sample = "std::env::var"

    # history: the kernel keeps the cells it ran (test_history takes its
    # code from code_execute_result)
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "6 ? 7"

    # -- overridden in the %%px form (see the module docstring) ---------
    code_hello_world = 'println!("hello, world")'
    code_stderr = 'eprintln!("oops");'
    code_execute_result = [
        {"code": "1 + 2", "result": "3"},
        {"code": "6 * 7", "result": "42"},
    ]
    code_display_data = [
        {
            "code": 'println!("EVCXR_BEGIN_CONTENT text/html\\n<b>x</b>\\nEVCXR_END_CONTENT");',
            "mime": "text/html",
        },
        {
            "code": 'println!("EVCXR_BEGIN_CONTENT image/svg+xml\\n'
            '<svg xmlns=\\"http://www.w3.org/2000/svg\\" width=\\"8\\" height=\\"8\\"></svg>\\n'
            'EVCXR_END_CONTENT");',
            "mime": "image/svg+xml",
        },
        {
            # evcxr shows a final value through its evcxr_display method
            "code": "struct Bold(&'static str);\n"
            "impl Bold {\n"
            "    fn evcxr_display(&self) {\n"
            '        println!("EVCXR_BEGIN_CONTENT text/html\\n<b>{}</b>\\nEVCXR_END_CONTENT", self.0);\n'
            "    }\n"
            "}\n"
            'Bold("bold")',
            "mime": "text/html",
        },
    ]
    code_generate_error = 'panic!("boom {}", 42);'

    # -- not applicable ---------------------------------------------------

    def test_pager(self) -> None:
        raise SkipTest(
            "no pager in Rust: evcxr has no `?`-style help that returns a page payload "
            "(documentation is inspect_request, tested by test_inspect), and %%px output "
            "has no place for one page per engine"
        )

    def test_clear_output(self) -> None:
        raise SkipTest(
            "evcxr has no way for Rust code to send clear_output, and ipyparallel's %%px "
            "does not forward an engine's clear_output (one engine would wipe all engines' output)"
        )

    # -- the %%px forms, and is_complete one sample at a time -------------

    def test_is_complete(self) -> None:
        """jupyter_kernel_test's check, but every sample is its own subtest
        (the original stops at the first sample that fails)."""
        self.flush_channels()
        for status, samples in (
            ("complete", self.complete_code_samples),
            ("incomplete", self.incomplete_code_samples),
            ("invalid", self.invalid_code_samples),
        ):
            for sample in samples:
                with self.subTest(status=status, sample=sample):
                    self.check_is_complete(sample, status)

    def test_kernel_info(self) -> None:
        super().test_kernel_info()
        self.flush_channels()
        msg_id = self.kc.kernel_info()
        reply = self.kc.get_shell_msg(timeout=jkt.TIMEOUT)
        validate_message(reply, "kernel_info_reply", msg_id)
        info = reply["content"]["language_info"]
        self.assertEqual(info["mimetype"], "text/rust")
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, timeout=30)
        self.assertEqual(info["version"], rustc.stdout.split()[1])
        self.assertIn("Rust", reply["content"]["banner"])

    def test_execute_stdout(self) -> None:
        """stdout → one `[stdout:N] ` display per engine, updated in place,
        never a stream message."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(code=self.code_hello_world)
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stdout"), {e: "hello, world\n" for e in ENGINES})
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
        """eprintln! → one `[stderr:N] ` display per engine."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(code=self.code_stderr)
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stderr"), {e: "oops\n" for e in ENGINES})
        self.assertEqual(stream_displays(output_msgs, "stdout"), {})

    def test_execute_result(self) -> None:
        """the last expression's value → `Out[N:C]: value` per engine
        (display_data, red prefix)."""
        for sample in self.code_execute_result:
            with self.subTest(code=sample["code"]):
                self.flush_channels()
                reply, output_msgs = self.execute_helper(sample["code"])
                self.assertEqual(reply["content"]["status"], "ok")
                self.assertEqual(results(output_msgs), {e: sample["result"] for e in ENGINES}, output_msgs)
                for msg in output_msgs:
                    if plain(msg).startswith("Out["):
                        raw = msg["content"]["data"]["text/plain"]
                        self.assertTrue(raw.startswith("\x1b[0;31mOut["), f"no red prefix: {raw!r}")

    def test_display_data(self) -> None:
        """EVCXR_BEGIN_CONTENT output → `[output:N]` then the engine's
        display_data with that MIME type."""
        for sample in self.code_display_data:
            with self.subTest(code=sample["code"]):
                self.flush_channels()
                reply, output_msgs = self.execute_helper(sample["code"])
                self.assertEqual(reply["content"]["status"], "ok")
                labels = []
                for i, msg in enumerate(output_msgs):
                    if msg["msg_type"] == "display_data" and sample["mime"] in msg["content"]["data"]:
                        self.assertGreater(i, 0)
                        m = re.fullmatch(r"\[output:(\d+)\]\s*", plain(output_msgs[i - 1]))
                        self.assertIsNotNone(m, f"display not preceded by [output:N]: {output_msgs[i - 1]}")
                        labels.append(int(m.group(1)))
                        self.assertEqual(msg["content"]["metadata"].get("engine"), int(m.group(1)))
                self.assertEqual(sorted(labels), sorted(ENGINES), output_msgs)
                self.assertEqual(stream_displays(output_msgs, "stdout"), {}, "content leaked into stdout")

    def test_error(self) -> None:
        """a panic on every engine → `[N:execute]` + the panic message on
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
        stderr = stderr_text(output_msgs)
        for e in ENGINES:
            self.assertIn(f"[{e}:execute]", stderr)
        self.assertEqual(stderr.count("panicked at"), N_ENGINES, stderr)
        self.assertEqual(stderr.count("\nboom 42\n"), N_ENGINES, stderr)
        # the panic message is the error, not engine stderr as well
        self.assertEqual(stream_displays(output_msgs, "stderr"), {}, output_msgs)

    # -- Rust specifics through the same machinery ----------------------

    def test_compile_error_is_shown_once(self) -> None:
        """the same CompileError on every engine → one stderr block headed
        `[0,1:execute] CompileError on all 2 engines`."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper('let n: u32 = "seven";')
        self.assertEqual(reply["content"]["status"], "error")
        stderr = stderr_text(output_msgs)
        header = f"[{engine_list(ENGINES)}:execute] CompileError on all {N_ENGINES} engines\n"
        self.assertTrue(stderr.startswith(header), stderr)
        self.assertEqual(stderr.count("mismatched types"), 1, stderr)
        for e in ENGINES:
            self.assertNotIn(f"[{e}:execute]", stderr)
        errors = [m for m in output_msgs if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1, output_msgs)
        self.assertEqual(
            (errors[0]["content"]["ename"], errors[0]["content"]["evalue"]),
            ("AlreadyDisplayedError", f"{N_ENGINES} errors"),
        )

    def test_compile_error_on_one_engine_is_not_merged(self) -> None:
        """a variable defined on engine 0 only: engine 0 runs the next cell,
        engine 1 reports a CompileError under its own `[1:execute]`."""
        self.flush_channels()
        reply, _ = self.execute_helper("%%px --targets 0\nlet only_zero = 41;")
        self.assertEqual(reply["content"]["status"], "ok")
        reply, output_msgs = self.execute_helper("only_zero + 1")
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(results(output_msgs), {0: "42"}, output_msgs)
        stderr = stderr_text(output_msgs)
        self.assertTrue(stderr.startswith("[1:execute]\n"), stderr)
        self.assertIn("cannot find value `only_zero` in this scope", stderr)
        self.assertNotIn("CompileError on all", stderr)
        self.assertEqual(reply["content"]["evalue"], "1 errors")

    def test_completion_knows_earlier_cells(self) -> None:
        """rust-analyzer completes a variable defined by an earlier cell."""
        self.flush_channels()
        reply, _ = self.execute_helper("let parallax_counter = 1u8;")
        self.assertEqual(reply["content"]["status"], "ok")
        code = "let y = parallax_cou"
        msg_id = self.kc.complete(code, len(code))
        reply = self.get_non_kernel_info_reply(timeout=CELL_TIMEOUT)
        validate_message(reply, "complete_reply", msg_id)
        self.assertEqual(reply["content"]["matches"], ["parallax_counter"])
        self.assertEqual((reply["content"]["cursor_start"], reply["content"]["cursor_end"]), (8, len(code)))

    def test_px_targets(self) -> None:
        """`%%px --targets 1` runs on engine 1 only."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper('%%px --targets 1\nprintln!("only one");')
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stdout"), {1: "only one\n"})

    def test_px_engine_environment(self) -> None:
        """Rust code sees PARALLAX_ENGINE_ID and PARALLAX_N_ENGINES."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper(
            'println!("{} {}", std::env::var("PARALLAX_ENGINE_ID").unwrap(), '
            'std::env::var("PARALLAX_N_ENGINES").unwrap());'
        )
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_displays(output_msgs, "stdout"), {e: f"{e} {N_ENGINES}\n" for e in ENGINES})

    def test_px_namespace_kept(self) -> None:
        """each engine keeps its own variables between cells; evcxr's
        `:vars` lists them."""
        self.flush_channels()
        reply, _ = self.execute_helper(
            'let mine: u64 = std::env::var("PARALLAX_ENGINE_ID").unwrap().parse::<u64>().unwrap() * 10;'
        )
        self.assertEqual(reply["content"]["status"], "ok")
        reply, output_msgs = self.execute_helper("mine + 1")
        self.assertEqual(results(output_msgs), {e: str(e * 10 + 1) for e in ENGINES}, output_msgs)
        reply, output_msgs = self.execute_helper(":vars")
        self.assertEqual(reply["content"]["status"], "ok")
        listed = results(output_msgs)
        self.assertEqual(set(listed), ENGINES, output_msgs)
        for text in listed.values():
            self.assertIn("mine: u64", text.splitlines())

    def test_z_interrupt(self) -> None:
        """interrupting `std::thread::sleep` on every engine: the cell ends
        within seconds with KeyboardInterrupt, each engine says which
        variables were lost, a function defined before still works and the
        lost variables are really gone."""
        self.flush_channels()
        reply, _ = self.execute_helper(
            "let doomed_a = 1u32;\n"
            'let doomed_b = String::from("b");\n'
            "fn survivor(n: u32) -> u32 { n + 100 }"
        )
        self.assertEqual(reply["content"]["status"], "ok")
        code = 'println!("sleeping");\nstd::thread::sleep(std::time::Duration::from_secs(60));'
        msg_id = self.kc.execute(code)
        msgs: list[dict] = []
        sleeping: set[int] = set()
        deadline = time.monotonic() + CELL_TIMEOUT
        while sleeping != ENGINES:  # every engine is in the sleep
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"engines {sorted(ENGINES - sleeping)} never printed 'sleeping': {msgs}")
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except Empty:
                continue
            validate_message(msg, msg["msg_type"], msg_id)
            msgs.append(msg)
            if msg["msg_type"] in ("display_data", "update_display_data"):
                m = re.match(r"\[stdout:(\d+)\] sleeping\n", plain(msg))
                if m:
                    sleeping.add(int(m.group(1)))
        t0 = time.monotonic()
        self.km.interrupt_kernel()
        try:
            reply = self.get_non_kernel_info_reply(timeout=20)
        except Empty:
            self.fail("no execute_reply within 20 s of the interrupt")
        elapsed = time.monotonic() - t0
        validate_message(reply, "execute_reply", msg_id)
        self.assertLess(elapsed, 10, "the interrupted cell took too long to end")
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(reply["content"]["ename"], "KeyboardInterrupt")
        while True:  # the rest of the cell's iopub, up to idle
            msg = self.kc.get_iopub_msg(timeout=10)
            validate_message(msg, msg["msg_type"], msg_id)
            msgs.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        errors = [m for m in msgs if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1, msgs)
        self.assertEqual(errors[0]["content"]["ename"], "KeyboardInterrupt")
        stderr = stderr_text(msgs)
        for e in ENGINES:
            m = re.search(
                rf"\[{e}:execute\]\nKeyboardInterrupt: "
                r"(interrupted: the Rust runtime process was stopped[^\n]*)",
                stderr,
            )
            self.assertIsNotNone(m, f"engine {e}: no runtime-stopped KeyboardInterrupt in {stderr!r}")
            lost = re.search(r"variables lost: ([\w, ]+)\.", m.group(1))
            self.assertIsNotNone(lost, m.group(1))
            self.assertLessEqual({"doomed_a", "doomed_b"}, set(lost.group(1).split(", ")), m.group(1))
        self.assertEqual(stream_displays(msgs, "stdout"), {e: "sleeping\n" for e in ENGINES})

        # the kernel and the engines are usable; the function survived
        self.flush_channels()
        reply, output_msgs = self.execute_helper("survivor(1)")
        self.assertEqual(reply["content"]["status"], "ok", stderr_text(output_msgs))
        self.assertEqual(results(output_msgs), {e: "101" for e in ENGINES}, output_msgs)
        # …and the variables are gone, as the message said
        reply, output_msgs = self.execute_helper("doomed_a")
        self.assertEqual(reply["content"]["status"], "error")
        self.assertIn("cannot find value `doomed_a` in this scope", stderr_text(output_msgs))

    def test_zz_shutdown_leaves_no_processes(self) -> None:
        """shutdown_request: the kernel exits by itself and takes every
        engine and every engine's evcxr runtime process with it. Ends the
        class's kernel, so it runs last."""
        self.flush_channels()
        reply, output_msgs = self.execute_helper('let warm = "a runtime process is running";')
        self.assertEqual(reply["content"]["status"], "ok", stderr_text(output_msgs))
        kernel = psutil.Process(self.km.provisioner.process.pid)
        tree = kernel.children(recursive=True)
        engines = [p for p in kernel.children() if "engine" in p.cmdline()[1:2]]
        runtimes = []
        for p in tree:
            try:
                if p.environ().get("EVCXR_IS_RUNTIME") == "1":
                    runtimes.append(p)
            except psutil.NoSuchProcess:
                pass
        self.assertEqual(len(engines), N_ENGINES, [p.cmdline() for p in tree])
        self.assertEqual(len(runtimes), N_ENGINES, [p.cmdline() for p in tree])
        self.assertEqual({p.ppid() for p in runtimes}, {p.pid for p in engines}, "one runtime per engine")
        pids = [kernel.pid] + [p.pid for p in tree]

        self.kc.shutdown()
        try:
            code = self.km.provisioner.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.fail("the kernel did not exit within 15 s of shutdown_request")
        self.assertEqual(code, 0, "the kernel's exit status after shutdown_request")
        left = wait_gone(pids, 15)
        described = []
        for pid in left:
            try:
                p = psutil.Process(pid)
                runtime = p.environ().get("EVCXR_IS_RUNTIME") == "1"
                described.append(f"{pid} {' '.join(p.cmdline())[:120]}" + (" (evcxr runtime)" if runtime else ""))
            except psutil.Error:
                pass
        self.assertEqual(left, [], f"left running 15 s after the kernel exited: {described}")
        self.assertTrue(all(gone(p) for p in pids))
