"""A small driver for the Parallax kernel in tests: start one with an
explicit KernelSpec (no kernelspec lookup), run cells and collect every
iopub message of a request, stop it and check that nothing it started is
left behind.

Used by test_kernel_behaviour.py; usable by hand:

    from kernel_harness import Kernel
    with Kernel(engines=4) as k:
        r = k.execute('print("hi")')
        print(r.displays(), r.reply["status"])
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

import psutil
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PARALLAX_BIN = Path(os.environ.get("PARALLAX_BIN") or REPO / "target/release/parallax").resolve()
#: the Python the engines run code in (has IPython, numpy, …)
ENGINE_PYTHON = os.environ.get("PARALLAX_TEST_PYTHON") or str(Path(sys.executable))

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: ipyparallel's colored result prefix
RED, NORMAL = "\x1b[0;31m", "\x1b[0m"


def strip_ansi(s: str) -> str:
    return ANSI.sub("", s)


@dataclass
class Result:
    """Everything one execute_request produced."""

    msg_id: str
    #: iopub messages parented to the request, status busy … idle included
    iopub: list[dict]
    reply: dict
    elapsed: float = 0.0
    #: iopub messages with another parent seen meanwhile (should be none)
    strays: list[dict] = field(default_factory=list)

    @property
    def content(self) -> dict:
        return self.reply["content"]

    @property
    def status(self) -> str:
        return self.content["status"]

    def outputs(self) -> list[dict]:
        """The iopub messages that show something (no status/execute_input)."""
        return [m for m in self.iopub if m["msg_type"] not in ("status", "execute_input")]

    def of_type(self, *types: str) -> list[dict]:
        return [m for m in self.iopub if m["msg_type"] in types]

    def streams(self, name: str | None = None) -> list[str]:
        return [
            m["content"]["text"]
            for m in self.of_type("stream")
            if name is None or m["content"]["name"] == name
        ]

    def stderr(self) -> str:
        return "".join(self.streams("stderr"))

    def stdout(self) -> str:
        return "".join(self.streams("stdout"))

    def plain(self, *types: str) -> list[str]:
        """text/plain of display/update messages (default both), in order."""
        types = types or ("display_data", "update_display_data")
        return [m["content"]["data"].get("text/plain", "") for m in self.of_type(*types)]

    def final_displays(self) -> list[dict]:
        """What a notebook ends up showing: display_data in order, each
        replaced by the last update with the same transient display_id."""
        shown: list[dict] = []
        by_id: dict[str, int] = {}
        for m in self.iopub:
            kind = m["msg_type"]
            did = m["content"].get("transient", {}).get("display_id")
            if kind == "display_data":
                if did is not None and did in by_id:
                    shown[by_id[did]] = m
                    continue
                if did is not None:
                    by_id[did] = len(shown)
                shown.append(m)
            elif kind == "update_display_data" and did in by_id:
                shown[by_id[did]] = m
        return shown

    def final_texts(self) -> list[str]:
        return [m["content"]["data"].get("text/plain", "") for m in self.final_displays()]

    def stdout_by_engine(self) -> dict[int, str]:
        """engine id → the final "[stdout:N] …" text, prefix removed."""
        out = {}
        for t in self.final_texts():
            m = re.match(r"\[stdout:(\d+)\] (.*)", t, re.S)
            if m:
                out[int(m.group(1))] = m.group(2)
        return out

    def describe(self) -> str:
        return f"reply: {self.content}\n" + summarize(self.iopub)


class Kernel:
    """One Parallax kernel started through jupyter_client."""

    def __init__(
        self,
        engines: int = 4,
        interrupt_mode: str = "signal",
        extra_args: list[str] | None = None,
        env: dict | None = None,
        ready_timeout: float = 60,
    ):
        argv = [
            str(PARALLAX_BIN),
            "kernel",
            "-f",
            "{connection_file}",
            "--engines",
            str(engines),
            "--python",
            ENGINE_PYTHON,
            *(extra_args or []),
        ]
        self.engines = engines
        self.km = KernelManager()
        self.km._kernel_spec = KernelSpec(
            argv=argv,
            display_name="Parallax (test)",
            language="python",
            interrupt_mode=interrupt_mode,
            env=env or {},
        )
        kenv = os.environ.copy()
        # the Makefile's interop pass sets PARALLAX_ENGINES=parallax
        kenv.pop("PARALLAX_ENGINES", None)
        kenv.setdefault("RUST_BACKTRACE", "1")
        self.km.start_kernel(env=kenv)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=ready_timeout)
        except Exception:
            self.stop()
            raise
        self.pid = self.km.provisioner.process.pid

    def restart(self, timeout: float = 60) -> None:
        """km.restart_kernel(now=False), then wait for the new kernel."""
        self.km.restart_kernel(now=False)
        self.kc.wait_for_ready(timeout=timeout)
        self.pid = self.km.provisioner.process.pid

    # ------------------------------------------------------------ running

    def drain_iopub(self, quiet: float = 0.05) -> list[dict]:
        """Whatever is queued on iopub now."""
        msgs = []
        while True:
            try:
                msgs.append(self.kc.get_iopub_msg(timeout=quiet))
            except Empty:
                return msgs

    def send_execute(self, code: str, **kw) -> str:
        return self.kc.execute(code, **kw)

    def collect(self, msg_id: str, timeout: float = 60) -> Result:
        """iopub messages of `msg_id` until its status idle, then its reply."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        iopub: list[dict] = []
        strays: list[dict] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no idle for {msg_id} within {timeout} s; got:\n" + summarize(iopub))
            try:
                m = self.kc.get_iopub_msg(timeout=min(left, 1.0))
            except Empty:
                continue
            if m["parent_header"].get("msg_id") != msg_id:
                strays.append(m)
                continue
            iopub.append(m)
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        reply = self.shell_reply(msg_id, max(1.0, deadline - time.monotonic()))
        return Result(msg_id, iopub, reply, time.monotonic() - t0, strays)

    def shell_reply(self, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no shell reply to {msg_id} within {timeout} s")
            try:
                r = self.kc.get_shell_msg(timeout=left)
            except Empty:
                continue
            if r["parent_header"].get("msg_id") == msg_id:
                return r

    def execute(self, code: str, timeout: float = 60, **kw) -> Result:
        return self.collect(self.send_execute(code, **kw), timeout)

    def control_request(self, msg_type: str, content: dict | None = None, timeout: float = 10) -> dict:
        msg = self.kc.session.msg(msg_type, content or {})
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to control {msg_type} within {timeout} s")
            try:
                r = self.kc.control_channel.get_msg(timeout=left)
            except Empty:
                continue
            if r["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return r

    # ------------------------------------------------------------ processes

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engine_processes(self) -> list[psutil.Process]:
        """The kernel's `parallax engine` children (not its zygote)."""
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                if p.cmdline()[1:2] == ["engine"]:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def zygote(self) -> psutil.Process | None:
        """The kernel's zygote (the template Python its engines' interpreters
        are forked from), if it has one."""
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return None
        for p in kids:
            try:
                if "--parallax-zygote" in p.cmdline():
                    return p
            except psutil.Error:
                pass
        return None

    def engine_tree(self) -> dict[int, list[int]]:
        """engine process pid → pids of the Python workers running its code:
        its own children, or (forked by the zygote) the zygote's child whose
        engine id matches the engine's --id."""
        out = {}
        zyg = self.zygote()
        forked = {}
        if zyg is not None:
            try:
                for c in zyg.children():
                    forked[c.pid] = c
            except psutil.NoSuchProcess:
                pass
        for e in self.engine_processes():
            try:
                out[e.pid] = [c.pid for c in e.children()]
            except psutil.NoSuchProcess:
                continue
        if forked:
            # which forked worker serves which engine: ask each worker's
            # parent-side pipe peer — the engine holds the other end of the
            # worker's stdout; /proc/<engine>/fd and /proc/<worker>/fd name
            # the same pipe inode
            def pipes(pid):
                found = set()
                try:
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        try:
                            t = os.readlink(f"/proc/{pid}/fd/{fd}")
                        except OSError:
                            continue
                        if t.startswith("pipe:"):
                            found.add(t)
                except OSError:
                    pass
                return found

            engine_pipes = {e: pipes(e) for e in out}
            for w in forked:
                wp = pipes(w)
                for e, ep in engine_pipes.items():
                    if wp & ep:
                        out[e].append(w)
                        break
        return out

    def stop(self, timeout: float = 15) -> None:
        """Shut down (politely, then by force) and reap everything."""
        pids = [self.pid] if hasattr(self, "pid") else []
        pids += [p.pid for p in self.descendants()] if pids else []
        try:
            self.kc.stop_channels()
        except Exception:
            pass
        try:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=False)
        except Exception:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:
                pass
        left = wait_gone(pids, timeout)
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        wait_gone(left, 5)
        try:
            self.km.cleanup_resources()
        except Exception:
            pass

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def summarize(msgs: list[dict]) -> str:
    """One line per message; of a display updated many times (a progress
    bar) only the last update."""
    last = {}
    for i, m in enumerate(msgs):
        if m["msg_type"] == "update_display_data":
            last[m["content"].get("transient", {}).get("display_id")] = i
    lines = []
    for i, m in enumerate(msgs):
        if m["msg_type"] == "update_display_data":
            did = m["content"].get("transient", {}).get("display_id")
            if last[did] != i:
                continue
        lines.append(f"  {m['msg_type']}: {m['content']!r}"[:500])
    return "\n".join(lines)


def gone(pid: int) -> bool:
    """Dead or a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait until every pid has exited; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if not gone(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def wait_for(pred, timeout: float, interval: float = 0.05):
    """Poll `pred` until it returns something truthy; that value, or the last one."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


# ------------------------------------------ what a notebook shows of a cell


def plain(msg) -> str:
    """text/plain of a display/result message, ANSI escapes removed."""
    return ANSI.sub("", msg["content"].get("data", {}).get("text/plain", ""))


def final_displays(output_msgs) -> list[dict]:
    """The displays as a notebook ends up showing them: display_data
    messages in order, each replaced by the last update_display_data
    carrying the same transient display_id."""
    shown: list[dict] = []
    by_id: dict[str, int] = {}
    for msg in output_msgs:
        kind = msg["msg_type"]
        did = msg["content"].get("transient", {}).get("display_id")
        if kind == "display_data":
            if did is not None:
                if did in by_id:  # display_data with a known id: update too
                    shown[by_id[did]] = msg
                    continue
                by_id[did] = len(shown)
            shown.append(msg)
        elif kind == "update_display_data" and did in by_id:
            shown[by_id[did]] = msg
    return shown


def stream_displays(output_msgs, name: str) -> dict[int, str]:
    """engine id → final text of its `[name:N] ` display."""
    out: dict[int, str] = {}
    pat = re.compile(rf"^\[{name}:(\d+)\] ", re.S)
    for msg in final_displays(output_msgs):
        m = pat.match(plain(msg))
        if m:
            eid = int(m.group(1))
            assert eid not in out, f"two [{name}:{eid}] displays: {out[eid]!r}, {plain(msg)!r}"
            out[eid] = plain(msg)[m.end() :]
    return out


def engine_list(ids) -> str:
    """The kernel's engine list in a merged error header: ids ascending,
    runs of three or more as a-b."""
    ids = sorted(ids)
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ids[i]}-{ids[j]}")
        else:
            parts.extend(str(x) for x in ids[i : j + 1])
        i = j + 1
    return ",".join(parts)


# ------------------------------------------ cells of a notebook nbclient ran


def cell(nb, source_start: str):
    found = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(found) == 1, f"{len(found)} code cells start with {source_start!r}"
    return found[0]


def text_of(output) -> str:
    if output.output_type == "stream":
        return ANSI.sub("", output.text)
    return ANSI.sub("", output.get("data", {}).get("text/plain", ""))


def stdout_displays(c, name="stdout") -> dict[int, str]:
    """engine id → its `[name:N] ` display's text (after the prefix)."""
    out = {}
    for o in c.outputs:
        if o.output_type != "display_data":
            continue
        m = re.match(rf"\[{name}:(\d+)\] ", text_of(o))
        if m:
            eid = int(m.group(1))
            assert eid not in out, f"engine {eid}'s {name} shown twice: {c.outputs}"
            out[eid] = text_of(o)[m.end() :]
    return out


def results(c) -> dict[int, str]:
    """engine id → repr from its `Out[N:C]: repr` output."""
    out = {}
    for o in c.outputs:
        if o.output_type in ("display_data", "execute_result"):
            m = re.fullmatch(r"Out\[(\d+):(\d+)\]: (.*)", text_of(o), re.S)
            if m:
                out[int(m.group(1))] = m.group(3).strip()
    return out


def errors(c):
    return [o for o in c.outputs if o.output_type == "error"]
