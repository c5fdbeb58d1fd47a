"""`jupyter console` on the Parallax kernels, in a real terminal.

As test_lab.py drives JupyterLab with a real browser, these tests drive
jupyter console (prompt_toolkit) in a real terminal: a tmux server on a
private socket (`tmux -L`, no config file, a fixed 160x50 window) runs
`jupyter console --kernel parallax-python` (or `parallax-rust`); keys go in
with `send-keys`, and the screen is read back with `capture-pane` and
polled, every wait with a deadline. Each step checks the screen:

* the first prompt, with the Parallax banner;
* a one-line cell (every engine's output);
* a multi-line block: the console asks is_complete on each Enter, so the
  block only runs after its last, blank line; auto-indent comes from the
  reply's `indent`;
* a `%%px --targets ::2` cell ended by a blank line (even engines only);
* `%engines`;
* a cell interrupted with Ctrl-C: KeyboardInterrupt shown, the prompt back,
  the next cell runs;
* the end: the Python console is killed with its terminal (`tmux
  kill-session`, which SIGHUPs jupyter console) and the kernel and every
  engine must exit on their own; the Rust console exits with Ctrl-D (its
  kernel and engines must be gone, and must have written nothing on the
  way out), then its terminal is killed.

At every step the screen must hold nothing but the console's and the
kernel's own output: no "did not respond to an is_complete_request"
warning (a late is_complete reply puts the console out of step for good),
no log lines of the engines' sockets.

Two more tests without a terminal: what a console asks while the user
types (is_complete, kernel_info, complete, inspect) is answered right after
start and while a cell runs; and an engine at WARN (as kernels start them)
does not log its sockets' reconnection attempts when its hub goes away.

The last screens are kept in tests/artifacts/console-{python,rust}.txt.
Needs tmux (`make console-deps`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import KERNEL_NAME, N_ENGINES, REPO, RUST_ENGINES, RUST_KERNEL_NAME, venv_bin

TMUX = shutil.which("tmux") or "/usr/bin/tmux"
#: the last screen of each console test is kept here
ARTIFACTS = REPO / "tests/artifacts"
WIDTH, HEIGHT = 160, 50
#: the console's first prompt (kernel_info is answered before the engines are up)
PROMPT_TIMEOUT = 60
#: a cell (the first one waits for the engines; a Rust cell compiles)
CELL_TIMEOUT = 90
RUST_FIRST_CELL_TIMEOUT = 240
#: how long the kernel and engines get to exit after their console is gone
EXIT_TIMEOUT = 30

#: what must never reach the terminal
NOISE = re.compile(
    r"did not respond|UserWarning|Reconnection attempt|\b(WARN|ERROR|INFO|DEBUG)\b .*(zeromq|tcp://)"
)


class Terminal:
    """A tmux server of its own running one command in one window."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.socket = f"parallax-test-{uuid.uuid4().hex[:8]}"
        self.target = "console"
        # the server inherits `env`; the window is the given size
        self._tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", self.target,
            "-x", str(WIDTH), "-y", str(HEIGHT), *argv,
            env=env,
        )  # fmt: skip
        self._tmux("set-option", "-g", "history-limit", "20000")
        # a console that exits leaves its last screen to read
        self._tmux("set-option", "-wg", "remain-on-exit", "on")
        self.pid = int(self._tmux("display-message", "-p", "-t", self.target, "#{pane_pid}").strip())
        self.socket_path = Path(self._tmux("display-message", "-p", "#{socket_path}").strip())

    def _tmux(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        r = subprocess.run(
            [TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=30, env=env
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def exited(self) -> bool:
        """Whether the command in the window has exited."""
        out = self._tmux("display-message", "-p", "-t", self.target, "#{pane_dead}", check=False)
        return out.strip() == "1"

    def type(self, text: str) -> None:
        """Type `text` literally (no Enter)."""
        # tmux reads an argument ending in ";" as a command separator: a
        # final ";" goes as its hex code
        body, semi = (text[:-1], True) if text.endswith(";") else (text, False)
        if body:
            self._tmux("send-keys", "-t", self.target, "-l", body)
        if semi:
            self._tmux("send-keys", "-t", self.target, "-H", "3b")

    def keys(self, *keys: str) -> None:
        """Press keys by name: Enter, C-c, C-d."""
        self._tmux("send-keys", "-t", self.target, *keys)

    def line(self, text: str) -> None:
        self.type(text)
        self.keys("Enter")

    def screen(self) -> str:
        """Everything the window showed, scrollback included, wrapped lines
        joined, trailing blanks dropped."""
        out = self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.target, check=False)
        return "\n".join(line.rstrip() for line in out.splitlines()).rstrip("\n")

    def wait_for(self, pattern: str, timeout: float, what: str, since: int = 0) -> str:
        """Poll the screen until `pattern` (a regex, multiline) matches the
        text from offset `since`; return that text."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()[since:]
            if rx.search(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no {pattern!r} on the screen after {timeout} s:\n{self.screen()}")
            time.sleep(0.1)

    def keep(self, name: str) -> None:
        """Save the screen as tests/artifacts/<name>."""
        text = self.screen()
        if text:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / name).write_text(text + "\n")

    def kill(self) -> None:
        """Stop the server (if still there) and remove its socket file."""
        self._tmux("kill-server", check=False)
        self.socket_path.unlink(missing_ok=True)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def names(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return "\n".join(out)


class Session:
    """jupyter console on one kernel, with the prompt numbers it has shown."""

    def __init__(self, term: Terminal):
        self.t = term
        self.n = 1  # the prompt now waiting for input

    def clean(self) -> None:
        text = self.t.screen()
        m = NOISE.search(text)
        assert not m, f"unexpected text on the console ({m.group(0)!r}):\n{text}"

    def prompt_at(self) -> int:
        """Offset of the current `In [n]:` prompt on the screen."""
        text = self.t.screen()
        i = text.rfind(f"In [{self.n}]:")
        assert i >= 0, f"no In [{self.n}]: prompt:\n{text}"
        return i

    def run(self, lines: list[str], expect: list[str], timeout: float = CELL_TIMEOUT) -> str:
        """Type a cell line by line (Enter after each; the console decides
        from is_complete whether it runs), wait for the next prompt and
        return the screen text of this cell: its input and output."""
        start = self.prompt_at()
        for i, text in enumerate(lines):
            self.t.line(text)
            if i < len(lines) - 1:
                # the console keeps reading the cell: a continuation prompt
                # for each line so far
                self.t.wait_for(rf"(^\s*\.\.\.:.*\n?){{{i + 1}}}", 10, f"continuation after {text!r}", start)
        self.n += 1
        out = self.t.wait_for(rf"^In \[{self.n}\]:", timeout, f"the prompt after {lines!r}", start)
        for e in expect:
            assert re.search(e, out, re.M), f"no {e!r} in the output of {lines!r}:\n{out}"
        self.clean()
        return out


def start_console(kernel: str, tmp_path: Path) -> tuple[Terminal, Session]:
    if not os.access(TMUX, os.X_OK):
        pytest.fail(f"{TMUX} missing: run `make console-deps`")
    env = dict(os.environ)
    # the console's own state in the test's dirs, not the user's
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("IPYTHONDIR", "ipython"), ("JUPYTER_DATA_DIR", "data")):  # fmt: skip
        (tmp_path / sub).mkdir(exist_ok=True)
        env[var] = str(tmp_path / sub)
    env.pop("TMUX", None)
    term = Terminal([venv_bin("jupyter"), "console", "--kernel", kernel], env)
    return term, Session(term)


def cluster_processes(term: Terminal, n_engines: int, timeout: float = 30) -> list[psutil.Process]:
    """The console's kernel and its engines (and their interpreters)."""
    deadline = time.monotonic() + timeout
    while True:
        procs = descendants(term.pid)
        engines = [p for p in procs if "engine" in " ".join(p.cmdline())]
        if len(engines) >= n_engines:
            return procs
        assert time.monotonic() < deadline, f"no {n_engines} engines under the console:\n{names(procs)}"
        time.sleep(0.1)


def assert_all_exit(procs: list[psutil.Process], how: str) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=EXIT_TIMEOUT)
    assert not alive, f"still running {EXIT_TIMEOUT} s after {how}:\n{names(alive)}"


@pytest.mark.timeout(PROMPT_TIMEOUT + 8 * CELL_TIMEOUT + EXIT_TIMEOUT)
def test_python_console(tmp_path):
    term, s = start_console(KERNEL_NAME, tmp_path)
    procs: list[psutil.Process] = []
    try:
        banner = term.wait_for(r"^In \[1\]:", PROMPT_TIMEOUT, "the first prompt")
        assert "Parallax Python" in banner, banner
        s.clean()

        out = s.run(["import os; print(os.getpid())"], [rf"^\[stdout:{e}\] \d+$" for e in range(N_ENGINES)])
        procs = [psutil.Process(term.pid), *cluster_processes(term, N_ENGINES)]
        pids = set(re.findall(r"^\[stdout:\d\] (\d+)$", out, re.M))
        assert len(pids) == N_ENGINES, out

        # Enter after the header and after the body only continue the cell
        # (auto-indented); the blank line runs it
        s.run(
            ["for i in range(3):", "print(i * 10)", ""],
            [rf"^\[stdout:{e}\] 0$" for e in range(N_ENGINES)],
        )

        out = s.run(
            ["%%px --targets ::2", "print('even', os.environ['PARALLAX_ENGINE_ID'])", ""],
            [r"^\[stdout:0\] even 0$", r"^\[stdout:2\] even 2$"],
        )
        assert "[stdout:1]" not in out and "[stdout:3]" not in out, out

        s.run(["%engines"], [r"^ID\s+UUID\s+STATUS", rf"^{N_ENGINES} engines registered"])

        # Ctrl-C while a cell runs: the console interrupts the kernel
        start = s.prompt_at()
        term.line("import time; print('sleeping', flush=True); time.sleep(120)")
        term.wait_for(r"(\[stdout:\d\] sleeping[\s\S]*){%d}" % N_ENGINES, CELL_TIMEOUT, "the sleeping cell", start)
        term.keys("C-c")
        s.n += 1
        out = term.wait_for(rf"^In \[{s.n}\]:", CELL_TIMEOUT, "the prompt after Ctrl-C", start)
        assert "KeyboardInterrupt" in out, out
        s.clean()
        s.run(["print('after', 6 * 7)"], [rf"^\[stdout:{e}\] after 42$" for e in range(N_ENGINES)])

        term.keep("console-python.txt")
        # the terminal goes away: jupyter console dies of SIGHUP without
        # shutting its kernel down; the kernel must notice and stop its engines
        term._tmux("kill-session", "-t", term.target)
        assert_all_exit(procs, "the terminal of jupyter console was killed")
    finally:
        term.kill()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.mark.timeout(PROMPT_TIMEOUT + RUST_FIRST_CELL_TIMEOUT + 8 * CELL_TIMEOUT + EXIT_TIMEOUT)
def test_rust_console(rust_kernelspec, tmp_path):
    term, s = start_console(RUST_KERNEL_NAME, tmp_path)
    procs: list[psutil.Process] = []
    try:
        banner = term.wait_for(r"^In \[1\]:", PROMPT_TIMEOUT, "the first prompt")
        assert "Parallax Rust" in banner, banner
        s.clean()

        s.run(
            ['println!("engine {}", std::env::var("PARALLAX_ENGINE_ID").unwrap());'],
            [rf"^\[stdout:{e}\] engine {e}$" for e in range(RUST_ENGINES)],
            timeout=RUST_FIRST_CELL_TIMEOUT,
        )
        procs = [psutil.Process(term.pid), *cluster_processes(term, RUST_ENGINES)]

        # a block: the console continues (auto-indented) until the braces close
        out = s.run(
            ["for i in 0..3 {", 'println!("{}", i * 10);', "}"],
            [rf"^\[stdout:{e}\] 0$" for e in range(RUST_ENGINES)],
        )
        assert "error" not in out.lower(), out

        out = s.run(
            ["%%px --targets ::2", 'println!("even");', ""],
            [r"^\[stdout:0\] even$"],
        )
        assert "[stdout:1]" not in out, out

        s.run(["%engines"], [r"^ID\s+UUID\s+STATUS", rf"^{RUST_ENGINES} engines registered"])

        start = s.prompt_at()
        term.line('println!("sleeping"); std::thread::sleep(std::time::Duration::from_secs(120));')
        term.wait_for(r"(\[stdout:\d\] sleeping[\s\S]*){%d}" % RUST_ENGINES, CELL_TIMEOUT, "the sleeping cell", start)
        term.keys("C-c")
        s.n += 1
        out = term.wait_for(rf"^In \[{s.n}\]:", CELL_TIMEOUT, "the prompt after Ctrl-C", start)
        assert "KeyboardInterrupt" in out, out
        s.clean()
        s.run(['println!("after {}", 6 * 7);'], [rf"^\[stdout:{e}\] after 42$" for e in range(RUST_ENGINES)])

        # Ctrl-D: the console asks, then shuts its kernel down and exits
        start = s.prompt_at()
        term.keys("C-d")
        term.wait_for(r"Do you really want to exit", 10, "the exit question", start)
        term.line("y")
        assert_all_exit(procs, "jupyter console exited")
        assert term.exited(), "jupyter console is gone but its window is not dead"
        # nothing written by the kernel or engines while they stopped
        s.clean()
        term.keep("console-rust.txt")
        term._tmux("kill-session", "-t", term.target)
    finally:
        term.kill()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass


#: jupyter console's `kernel_is_complete_timeout`: a later reply makes it
#: give up on the kernel's is_complete for good
CONSOLE_IS_COMPLETE_PATIENCE = 1.0


def _reply(kc, msg_id: str, timeout: float) -> tuple[dict, float]:
    t0 = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - t0)
        assert left > 0, f"no reply to {msg_id} within {timeout} s"
        msg = kc.get_shell_msg(timeout=left)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg, time.monotonic() - t0


def test_console_requests_never_wait(kernel_env):
    """What a console asks while the user types is answered at once: right
    after the kernel starts (engines not up yet) and while a cell runs —
    kernel_info and is_complete by the kernel itself, complete and inspect
    by an engine within 1 s or empty. Latencies are printed (`-s`)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        timings = {}
        # right after start: the cluster is still starting
        first = kc.is_complete("for i in range(3):")
        r, timings["is_complete at start"] = _reply(kc, first, 10)
        assert r["content"] == {"status": "incomplete", "indent": "    "}, r["content"]
        r, timings["complete at start"] = _reply(kc, kc.complete("isinstanc"), 10)
        assert r["content"]["status"] == "ok", r["content"]

        # a cell that runs for a while
        cell = kc.execute("import time; time.sleep(6)")
        time.sleep(0.5)  # let it reach the engines
        asked_while_busy = []
        for what, ask in [
            ("is_complete while busy", lambda: kc.is_complete("%%px --targets ::2\nx = 1\n")),
            ("kernel_info while busy", kc.kernel_info),
            ("complete while busy", lambda: kc.complete("isinstanc")),
            ("inspect while busy", lambda: kc.inspect("print")),
        ]:
            asked_while_busy.append(msg_id := ask())
            r, timings[what] = _reply(kc, msg_id, 10)
            assert r["content"]["status"] in ("ok", "complete"), (what, r["content"])
        _, cell_t = _reply(kc, cell, 60)
        assert cell_t > 2, "the cell ended before the requests were answered"
        assert timings["is_complete while busy"] < CONSOLE_IS_COMPLETE_PATIENCE, timings
        assert timings["is_complete at start"] < CONSOLE_IS_COMPLETE_PATIENCE, timings
        # busy/idle for each request, but none for those answered while the
        # cell ran: JupyterLab would show the kernel idle
        statuses = {}
        deadline = time.monotonic() + 30
        while statuses.get(cell, [])[-1:] != ["idle"]:
            assert time.monotonic() < deadline, statuses
            m = kc.get_iopub_msg(timeout=30)
            if m["header"]["msg_type"] == "status":
                statuses.setdefault(m["parent_header"].get("msg_id"), []).append(m["content"]["execution_state"])
        assert statuses[cell] == ["busy", "idle"], statuses
        assert statuses[first] == ["busy", "idle"], statuses
        assert not [statuses[m] for m in asked_while_busy if m in statuses], statuses

        # idle engines answer completions
        r, timings["complete when idle"] = _reply(kc, kc.complete("isinstanc"), 10)
        assert r["content"]["matches"] == ["isinstance"], r["content"]
        print("\n" + "\n".join(f"{k}: {v * 1000:.1f} ms" for k, v in timings.items()))
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def _wait_file_text(path: Path, pattern: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return True
        time.sleep(0.05)
    return False


def test_engines_do_not_log_reconnects_at_warn(parallax_bin, tmp_path):
    """An engine's stderr is its kernel's, which under jupyter console is the
    user's terminal: at --log-level=WARN (what the kernel starts engines
    with) a hub that goes away must not fill it with zmq.rs's reconnection
    warnings, nor with the engine's own probes of the hub (it rebuilds its
    sockets itself, engine/src/link.rs): one line says the connection is
    lost. At INFO that line gives the time the WARN engine is watched for."""
    env = {k: v for k, v in os.environ.items() if k != "PARALLAX_LOG"}
    logs = {}
    for level in ("INFO", "WARN"):
        prof = tmp_path / f"profile-{level}"
        hub_log, eng_log = tmp_path / f"hub-{level}.log", tmp_path / f"engine-{level}.log"
        with open(hub_log, "w") as h, open(eng_log, "w") as e:
            hub = subprocess.Popen([str(parallax_bin), "hub", f"--profile-dir={prof}", "--log-level=INFO"],
                                   stdout=h, stderr=h, env=env)  # fmt: skip
            engine = None
            try:
                assert _wait_file_text(hub_log, r"hub ready", 30), hub_log.read_text()
                engine = subprocess.Popen([str(parallax_bin), "engine", f"--profile-dir={prof}",
                                           f"--log-level={level}"], stdout=e, stderr=e, env=env)  # fmt: skip
                assert _wait_file_text(hub_log, r"engine registered", 30), hub_log.read_text()
                t0 = time.monotonic()
                hub.kill()
                hub.wait(timeout=10)
                if level == "INFO":
                    assert _wait_file_text(eng_log, r"lost the connection to the hub", 30), eng_log.read_text()
                    # a few more attempts' worth
                    watch = max(1.0, 3 * (time.monotonic() - t0))
                else:
                    time.sleep(watch)
            finally:
                for p in (engine, hub):
                    if p is not None and p.poll() is None:
                        p.kill()
                        p.wait(timeout=10)
        logs[level] = eng_log.read_text()
    assert "Reconnection attempt" not in logs["WARN"], logs["WARN"]
    assert logs["WARN"].count("lost the connection to the hub") == 1, logs["WARN"]
    assert "hub not ready" not in logs["WARN"], logs["WARN"]


def test_kernel_shutdown_is_quiet(kernel_env, tmp_path):
    """A kernel's stderr is the user's terminal under jupyter console (and
    JupyterLab's log): starting, running a cell and shutting down logs no
    warning. Stopping its own cluster used to make its client warn "lost the
    connection to the hub; reconnecting when it is back" at every exit."""
    from jupyter_client.manager import KernelManager

    log = tmp_path / "kernel-stderr.txt"
    km = KernelManager(kernel_name=KERNEL_NAME)
    with open(log, "w") as err:
        km.start_kernel(stderr=err)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        r, _ = _reply(kc, kc.execute('print("hi")'), CELL_TIMEOUT)
        assert r["content"]["status"] == "ok", r["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    text = log.read_text(errors="replace")
    noisy = [line for line in text.splitlines() if re.search(r"\b(WARN|ERROR)\b", line)]
    assert not noisy, text[-3000:]
