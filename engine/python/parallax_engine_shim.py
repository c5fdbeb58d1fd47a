"""Python side of ``parallax engine``: runs user code in a persistent process.

The Rust engine starts ``python -u parallax_engine_shim.py`` with

* fd 0 = /dev/null, fd 1 / fd 2 = pipes the engine reads (all output of the
  process and its children is captured at the fd level);
* ``PARALLAX_CMD_FD`` (engine -> shim) and ``PARALLAX_EVT_FD`` (shim -> engine)
  naming the two protocol pipes;
* ``PARALLAX_ENGINE_ID``, ``PARALLAX_N_ENGINES``, ``PARALLAX_ENGINE_UUID``.

Framing on both protocol pipes: ``u32 LE`` length + UTF-8 JSON object, then
``u32 LE`` buffer count, then per buffer ``u64 LE`` length + raw bytes.

Every request (``{"op": ..., "id": ...}``) ends with a ``reply`` event.  Right
before it the shim flushes Python's (and C stdio's) stdout/stderr and writes
the line ``"\\x1e" + token + "\\n"`` to fd 1 and to fd 2; the reply carries the
same token as ``"end"`` so the engine knows it has seen all of the request's
output on both pipes.  Tokens are ``<end_prefix><n>`` (``[a-z0-9-]``); the
per-process ``end_prefix`` is announced in the ``ready`` event.  The marker
is not necessarily at the start of a line (output that did not end with a
newline precedes it directly).

``input()``/``getpass()`` during an ``execute`` command with ``"stdin":
true`` send ``{"ev": "input_request", "seq", "prompt", "password"}`` and wait
for the command ``{"op": "input_reply", "seq", "value"}`` (no reply event is
sent for it; a stale one is skipped).  Without ``"stdin": true`` they raise
StdinNotImplementedError, completed by the command's ``stdin_refused``.

SIGINT raises KeyboardInterrupt only while user code runs; otherwise it is
ignored.  Interrupts that arrive while an event frame is being written are
deferred until the frame is complete, so the pipes never carry a torn frame.

Only the standard library is imported at start-up.  IPython and ipyparallel
are imported lazily: IPython when user code imports it (an import hook
notices), calls ``get_ipython()``, produces a value with rich ``_repr_*_``
methods, uses IPython-only syntax (``%magic``, ``!cmd``), or on the first
``apply``; ipyparallel on the first ``apply``.

Why a real (lazily created) ``InteractiveShell``: ``IPython.display.display``,
``clear_output``, ``update_display`` and the matplotlib inline backend all
route through ``InteractiveShell.instance().display_pub``, and ipyparallel's
``push``/``pull``/``execute`` helpers call ``get_ipython().user_global_ns``.
Without an initialised shell ``display()`` silently degrades to ``print``.  A
shell subclass whose display publisher sends ``display_data`` events, sharing
this process's ``__main__`` namespace, makes all of them behave as under
ipykernel.  Creating it costs ~40 ms on top of the IPython import, so it is
only done on first need; creating it never changes existing user variables.
Execution itself never goes through the shell: cells are plain Python
compiled with ``ast`` here (IPython's input transformer is used only as a
fallback for cells that are not valid Python).
"""

import builtins
import io
import os
import sys
import time
import _signal
import _thread

_T0 = time.perf_counter()

#: the filename frames of this module carry; such frames are hidden from
#: user-facing tracebacks
_SHIM_FILE = sys._getframe().f_code.co_filename

_MISSING = object()
_CO_COROUTINE = 0x0080
_MAX_OUT_CACHE = 1000
# ipyparallel's / jupyter_client's defaults (jupyter_client.session)
_DEFAULT_BUFFER_THRESHOLD = 1024
_DEFAULT_ITEM_THRESHOLD = 64
_MPL_INLINE = "module://matplotlib_inline.backend_inline"
_RICH_ATTRS = (
    "_repr_html_",
    "_repr_markdown_",
    "_repr_svg_",
    "_repr_png_",
    "_repr_jpeg_",
    "_repr_latex_",
    "_repr_json_",
    "_repr_javascript_",
    "_repr_pdf_",
    "_repr_mimebundle_",
    "_ipython_display_",
)

_json = None


# --------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------


def _json_mod():
    global _json
    if _json is None:
        import json

        _json = json
    return _json


def _json_default(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        import base64

        return base64.b64encode(bytes(o)).decode("ascii")
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    iso = getattr(o, "isoformat", None)
    if callable(iso):
        try:
            return iso()
        except Exception:
            pass
    tolist = getattr(o, "tolist", None)
    if callable(tolist):
        try:
            return tolist()
        except Exception:
            pass
    try:
        return str(o)
    except Exception:
        return "<unserializable %s>" % type(o).__name__


def _sanitize(o, depth=0):
    """Make ``o`` strict-JSON-safe (no NaN/Infinity, no cycles, str keys)."""
    if depth > 64:
        return "<too deep>"
    if isinstance(o, float):
        return o if o == o and o not in (float("inf"), float("-inf")) else None
    if isinstance(o, dict):
        return {str(k): _sanitize(v, depth + 1) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v, depth + 1) for v in o]
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return _sanitize(_json_default(o), depth + 1)


def _dumps(obj):
    json = _json_mod()
    try:
        s = json.dumps(
            obj, ensure_ascii=False, allow_nan=False, default=_json_default,
            separators=(",", ":"),
        )
    except (ValueError, TypeError, RecursionError):
        s = json.dumps(_sanitize(obj), ensure_ascii=False, separators=(",", ":"))
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return s.encode("utf-8", "replace")


def _clean_bundle(data):
    """A mime bundle with bytes values turned into text (base64 for binary)."""
    out = {}
    for k, v in dict(data).items():
        if isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v)
            if str(k).startswith("text/"):
                v = v.decode("utf-8", "replace")
            else:
                import base64

                v = base64.b64encode(v).decode("ascii")
        out[str(k)] = v
    return out


# --------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------


def _write_all(fd, data):
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


class _Channel:
    """The two protocol pipes."""

    def __init__(self, cmd_fd, evt_fd):
        self.cmd_fd = cmd_fd
        self.evt_fd = evt_fd
        self.reader = io.FileIO(cmd_fd, "rb", closefd=False)
        self.lock = _thread.allocate_lock()

    def _read_exact(self, n):
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = self.reader.readinto(mv[got:])
            if not k:
                raise EOFError("command pipe closed")
            got += k
        return buf

    def read(self):
        """Next ``(message, buffers)``; EOFError when the engine is gone."""
        n = int.from_bytes(self._read_exact(4), "little")
        raw = self._read_exact(n)
        nbuf = int.from_bytes(self._read_exact(4), "little")
        bufs = []
        for _ in range(nbuf):
            ln = int.from_bytes(self._read_exact(8), "little")
            bufs.append(self._read_exact(ln))
        try:
            msg = _json_mod().loads(raw.decode("utf-8"))
        except ValueError as e:
            msg = {"op": None, "_bad": "invalid JSON command: %s" % e}
        if not isinstance(msg, dict):
            msg = {"op": None, "_bad": "command is not a JSON object"}
        return msg, bufs

    def write_raw(self, obj, bufs=()):
        data = _dumps(obj)
        head = bytearray()
        head += len(data).to_bytes(4, "little")
        head += data
        head += len(bufs).to_bytes(4, "little")
        parts = [head]
        for b in bufs:
            mv = memoryview(b)
            if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
                try:
                    mv = mv.cast("B")
                except TypeError:  # not C-contiguous
                    mv = memoryview(mv.tobytes())
            if mv.nbytes < 65536:
                parts[-1] += mv.nbytes.to_bytes(8, "little")
                parts[-1] += mv
            else:
                parts[-1] += mv.nbytes.to_bytes(8, "little")
                parts.append(mv)
                parts.append(bytearray())
        with self.lock:
            for p in parts:
                if len(p):
                    _write_all(self.evt_fd, p)


# --------------------------------------------------------------------------
# import hook: notice IPython / matplotlib being imported
# --------------------------------------------------------------------------


class _LoaderProxy:
    """Wraps a module's real loader to run callbacks around its execution."""

    def __init__(self, loader, before, after):
        self._loader = loader
        self._before = before
        self._after = after

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        if self._before is not None:
            self._before(module)
        self._loader.exec_module(module)
        if self._after is not None:
            self._after(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _ImportWatcher:
    """A meta path finder that only ever wraps the loaders of a few modules."""

    def __init__(self, hooks):
        self.hooks = hooks  # name -> (before, after)
        self.busy = set()

    def find_spec(self, fullname, path=None, target=None):
        hooks = self.hooks.get(fullname)
        if hooks is None or fullname in self.busy:
            return None
        self.busy.add(fullname)
        try:
            spec = _find_spec_raw(fullname, path, target, skip=self)
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderProxy(spec.loader, hooks[0], hooks[1])
        return spec


def _find_spec_raw(name, path=None, target=None, skip=None):
    """Locate a module without importing it (and without importlib.util)."""
    for finder in list(sys.meta_path):
        if finder is skip or isinstance(finder, _ImportWatcher):
            continue
        fs = getattr(finder, "find_spec", None)
        if fs is None:
            continue
        try:
            spec = fs(name, path, target)
        except Exception:
            continue
        if spec is not None:
            return spec
    return None


def _importable(name):
    if name in sys.modules:
        return sys.modules[name] is not None
    return _find_spec_raw(name) is not None


# --------------------------------------------------------------------------
# helpers for the lazily created IPython shell
# --------------------------------------------------------------------------


def _create_shell(engine):
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    class ParallaxDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None,
                    update=False, **kwargs):
            engine.publish_display(data, metadata, transient, update)

        def clear_output(self, wait=False):
            engine.publish_clear(wait)

    class ParallaxShell(InteractiveShell):
        display_pub_class = Type(ParallaxDisplayPublisher)

        def enable_gui(self, gui=None):
            # ipykernel's ZMQInteractiveShell hands the toolkit's event loop
            # to the kernel; an engine has no display and no event loop
            # integration, so only the inline backend (gui None / "inline")
            # is meaningful: figures come back as display_data at the end of
            # each request (matplotlib_inline's post_execute hook)
            if gui in (None, "", "inline", "agg"):
                self.active_eventloop = gui
                return
            from IPython.core.error import UsageError

            raise UsageError(
                "GUI event loop %r is not available on a Parallax engine (no "
                "display): use %%matplotlib inline" % (gui,)
            )

    cfg = Config()
    cfg.HistoryManager.enabled = False  # no sqlite file, no saving thread
    cfg.IPCompleter.use_jedi = False  # keep completion cheap
    cfg.InteractiveShell.colors = "nocolor"
    cfg.InteractiveShell.warn_venv = False
    return ParallaxShell.instance(
        config=cfg, user_module=engine.main_mod, user_ns=engine.ns
    )


_NO_STDIN = (
    "%s was called, but this frontend does not support input requests "
    "(a Parallax engine has no stdin: pass values as arguments or with push())"
)


def _stdin_error(what, reason=None):
    """ipykernel's error for input() without allow_stdin (same class when
    IPython is importable, so ``except StdinNotImplementedError`` works).
    ``reason`` (the client's ``stdin_refused``) completes the sentence after
    ``what``; without one, ipykernel's words."""
    cls = None
    if _importable("IPython"):
        try:
            from IPython.core.error import StdinNotImplementedError as cls
        except Exception:
            cls = None
    if cls is None:
        cls = type("StdinNotImplementedError", (NotImplementedError,), {})
    if reason:
        return cls("%s %s" % (what, reason))
    return cls(_NO_STDIN % what)


class _DataPub:
    """``get_ipython().data_pub`` as on ipengine (ZMQDataPublisher)."""

    def __init__(self, engine):
        self._engine = engine

    def publish_data(self, data):
        self._engine.publish_data(data)


class _NSHolder:
    """Stand-in for ``get_ipython()`` in ipyparallel helpers if no shell."""

    def __init__(self, ns):
        self.user_ns = ns
        self.user_global_ns = ns


# --------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------


class Engine:
    def __init__(self, chan):
        self.chan = chan
        self.current_id = None
        self.user_running = False
        self.critical = False
        self.pending_interrupt = False
        self.busy = False
        self.shutting_down = False
        self.shell = None
        # the execution count of the cell running now (for a shell created lazily)
        self.current_count = None
        self._shell_creating = False
        self._shell_failed = False
        self._ipp_ser = None
        self._loop = None
        self._cflags = 0
        self._cell_names = {}
        self._unders = ["", "", ""]
        self.out_hist = {}
        self._token_prefix = "pxe-%s-" % os.urandom(6).hex()
        # input(): forwarded to the client only during an execute request
        # that allows it (see request_input); else refused with the reason
        self._stdin_ok = False
        self._stdin_reason = None
        self._input_seq = 0
        self._seq = 0
        self._replied = False
        self._libc_fflush = _MISSING
        self._sigint_handler = self._on_sigint
        self._main_tid = _thread.get_ident()
        # background warm-up of the heavy imports (see _warm_imports):
        # None (off), "running", "done" (imports finished), "finished"
        self._warm = None
        self._warm_tid = None
        self._warm_lock = _thread.allocate_lock()  # held while it runs
        self.engine_id = _env_int("PARALLAX_ENGINE_ID", -1)
        self.engine_uuid = os.environ.get("PARALLAX_ENGINE_UUID", "")
        self.main_mod = type(sys)("__main__")
        self.ns = self.main_mod.__dict__
        self._init_ns()

    # ---- namespace -------------------------------------------------------

    def _init_ns(self):
        ns = self.ns
        ns.update(
            __name__="__main__",
            __doc__=None,
            __package__=None,
            __loader__=None,
            __spec__=None,
            __builtins__=builtins,
            __builtin__=builtins,
        )
        self.out_hist = {}
        self._unders = ["", "", ""]
        ns["Out"] = ns["_oh"] = self.out_hist
        ns["get_ipython"] = self._user_get_ipython

    def _user_get_ipython(self):
        """``get_ipython()`` as seen by user code: creates the shell on demand."""
        return self.ensure_shell()

    # ---- signals ---------------------------------------------------------

    def _on_sigint(self, signum, frame):
        if not self.user_running:
            return  # idle / shim code: ignore
        if self.critical:
            self.pending_interrupt = True
            return
        raise KeyboardInterrupt

    def _ensure_sigint_handler(self):
        try:
            if _signal.getsignal(_signal.SIGINT) is not self._sigint_handler:
                _signal.signal(_signal.SIGINT, self._sigint_handler)
        except (ValueError, OSError):
            pass

    def _user(self, fn, *args):
        """Run ``fn(*args)`` as user code: SIGINT raises KeyboardInterrupt."""
        prev = self.user_running
        self.user_running = True
        try:
            return fn(*args)
        finally:
            self.user_running = prev

    # ---- events ----------------------------------------------------------

    def send_event(self, ev, bufs=()):
        if _thread.get_ident() != self._main_tid:
            # another thread (e.g. a display() from a user thread): signals
            # are only handled in the main thread, so no deferral is needed;
            # the channel lock keeps frames whole
            try:
                self.chan.write_raw(ev, bufs)
            except OSError:
                os._exit(3)
            return
        # main thread: an interrupt arriving mid-frame is deferred until the
        # frame is written, then raised (only if user code is running)
        prev = self.critical
        self.critical = True
        try:
            try:
                self.chan.write_raw(ev, bufs)
            except OSError:  # BrokenPipe: the engine is gone
                os._exit(3)
        finally:
            self.critical = prev
            if not prev and self.pending_interrupt and self.user_running:
                self.pending_interrupt = False
                raise KeyboardInterrupt

    def _flush_std(self):
        for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if s is not None:
                    s.flush()
            except Exception:
                pass

    def _flush_c_stdio(self):
        f = self._libc_fflush
        if f is _MISSING:
            f = None
            try:
                import ctypes

                f = ctypes.CDLL(None).fflush
                f.argtypes = [ctypes.c_void_p]
                f.restype = ctypes.c_int
            except Exception:
                f = None
            self._libc_fflush = f
        if f is not None:
            try:
                f(None)
            except Exception:
                pass

    def publish_display(self, data, metadata=None, transient=None, update=False):
        self._flush_std()
        ev = {
            "ev": "display_data",
            "id": self.current_id,
            "data": _clean_bundle(data or {}),
            "metadata": dict(metadata or {}),
            "transient": dict(transient or {}),
        }
        if update:
            ev["update"] = True
        self.send_event(ev)

    def publish_clear(self, wait=False):
        self._flush_std()
        self.send_event({"ev": "clear_output", "id": self.current_id, "wait": bool(wait)})

    def _send_error(self, rid, content):
        self._flush_std()
        self.send_event({
            "ev": "error",
            "id": rid,
            "ename": content["ename"],
            "evalue": content["evalue"],
            "traceback": content["traceback"],
        })

    def _finish(self, rid, content, bufs=()):
        """Flush output, write the end token to fd 1 and fd 2, send the reply."""
        self._flush_std()
        self._flush_c_stdio()
        self._seq += 1
        token = "%s%d" % (self._token_prefix, self._seq)
        line = ("\x1e" + token + "\n").encode("ascii")
        for fd in (1, 2):
            try:
                _write_all(fd, line)
            except OSError:
                pass
        self.send_event({"ev": "reply", "id": rid, "content": content, "end": token}, bufs)
        self._replied = True

    # ---- shell -----------------------------------------------------------

    def ensure_shell(self):
        """The IPython shell, created on first need (None if unavailable)."""
        if self.shell is not None or self._shell_failed or self._shell_creating:
            return self.shell
        if not _importable("IPython"):
            return None
        self._shell_creating = True
        ns = self.ns
        before = dict(ns)
        # an interrupt must not leave a half-initialised singleton behind: it
        # is deferred until the shell exists (see send_event for the pattern)
        main = _thread.get_ident() == self._main_tid
        prev_critical = self.critical
        if main:
            self.critical = True
        try:
            shell = _create_shell(self)
        except Exception as e:
            self._shell_failed = True
            try:
                sys.stderr.write(
                    "parallax: could not create an IPython shell (%s: %s); "
                    "display() will print\n" % (type(e).__name__, e)
                )
            except Exception:
                pass
            return None
        finally:
            self._shell_creating = False
            if main:
                self.critical = prev_critical
            # creating the shell never changes existing user variables
            for k, v in before.items():
                if ns.get(k, _MISSING) is not v:
                    ns[k] = v
            sys.modules["__main__"] = self.main_mod
        try:
            shell.user_ns_hidden.update(
                {k: ns[k] for k in ("Out", "_oh", "get_ipython") if k in ns}
            )
        except Exception:
            pass
        try:
            # ipykernel's shell attribute, used by ipyparallel's publish_data
            shell.data_pub = _DataPub(self)
        except Exception:
            pass
        self.shell = shell
        # created in the middle of a cell: it is that cell's count, not 1
        if self.current_count is not None:
            try:
                shell.execution_count = int(self.current_count)
            except Exception:
                pass
        if main and not prev_critical and self.pending_interrupt and self.user_running:
            self.pending_interrupt = False
            raise KeyboardInterrupt
        return shell

    def _on_ipython_imported(self, module):
        if _thread.get_ident() == self._warm_tid:
            # the warm-up thread: the shell is created by the main thread
            # (while idle, or before the next request runs)
            return
        try:
            self.ensure_shell()
        except Exception:
            pass

    def publish_data(self, data):
        """ipyparallel's ``publish_data``: a ``data_message`` on iopub whose
        buffers are ``serialize_object(data)``; the client merges them into
        ``AsyncResult.data`` (ipengine's ``ZMQDataPublisher``)."""
        ser = self._ipyparallel()
        bufs = ser.serialize_object(
            data,
            buffer_threshold=_DEFAULT_BUFFER_THRESHOLD,
            item_threshold=_DEFAULT_ITEM_THRESHOLD,
        )
        self._flush_std()
        self.send_event(
            {"ev": "data_pub", "id": self.current_id, "keys": [str(k) for k in data]},
            bufs,
        )

    def _on_datapub_imported(self, module):
        # ipyparallel's publish_data goes through
        # ``ZMQInteractiveShell.instance().data_pub``: ipykernel's shell, which
        # an engine without ipykernel does not have.  Replace it (by the same
        # name, so functions that refer to it still pickle by reference).
        engine = self

        def publish_data(data):
            """publish a data_message on the IOPub channel (Parallax engine)"""
            engine.publish_data(data)

        publish_data.__module__ = module.__name__
        module.publish_data = publish_data

    def _on_getpass_imported(self, module):
        engine = self

        def getpass(prompt="Password: ", stream=None):
            """getpass on a Parallax engine: asks the notebook (password
            input) when the cell allows it, else StdinNotImplementedError"""
            return engine.request_input("getpass()", prompt, True)

        module.getpass = getpass

    def _input(self, prompt=""):
        return self.request_input("input()", prompt, False)

    # ---- stdin -----------------------------------------------------------

    def request_input(self, what, prompt, password):
        """input()/getpass(): an ``input_request`` event, then wait on the
        command pipe for the ``input_reply`` op with the same ``seq``.  The
        wait is user code: SIGINT (the kernel's interrupt) raises
        KeyboardInterrupt out of it, so a client that never answers is
        bounded by the cell's interrupt.  Only the main thread, during a
        request, may wait: the main loop reads the same pipe otherwise."""
        if not self._stdin_ok:
            raise _stdin_error(what, self._stdin_reason)
        if _thread.get_ident() != self._main_tid:
            raise _stdin_error(
                what, "is forwarded to the notebook only from the main thread"
            )
        prompt = "" if prompt is None else str(prompt)
        self._input_seq += 1
        seq = self._input_seq
        self._flush_std()  # output before the prompt is shown before it
        self.send_event({
            "ev": "input_request",
            "id": self.current_id,
            "seq": seq,
            "prompt": prompt,
            "password": bool(password),
        })
        import select

        p = select.poll()
        p.register(self.chan.cmd_fd, select.POLLIN | select.POLLHUP)
        while True:
            p.poll()  # interruptible: the SIGINT handler raises here
            # a frame is read whole: an interrupt meanwhile is deferred
            prev = self.critical
            self.critical = True
            try:
                msg, _ = self.chan.read()
            except (EOFError, OSError):
                os._exit(0)  # the engine is gone
            finally:
                self.critical = prev
            if self.pending_interrupt and self.user_running and not prev:
                self.pending_interrupt = False
                raise KeyboardInterrupt
            if msg.get("op") == "input_reply" and msg.get("seq") == seq:
                value = msg.get("value")
                return value if isinstance(value, str) else ""
            # a stale answer (to an interrupted input()): skip it

    def _before_matplotlib(self, module):
        # like ipykernel: default to the inline backend (lower priority than
        # anything the user sets), but only if it can actually be loaded
        try:
            if not os.environ.get("MPLBACKEND") and _importable(
                "matplotlib_inline"
            ) and _importable("IPython"):
                os.environ["MPLBACKEND"] = _MPL_INLINE
        except Exception:
            pass

    def _flush_figures_fallback(self):
        """Without matplotlib_inline: show open Agg figures as PNG, then close."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            backend = str(plt.get_backend()).lower()
        except Exception:
            return
        if backend != "agg":
            return
        import base64

        for num in list(plt.get_fignums()):
            fig = plt.figure(num)
            bio = io.BytesIO()
            fig.savefig(bio, format="png", bbox_inches="tight")
            self.publish_display(
                {
                    "image/png": base64.b64encode(bio.getvalue()).decode("ascii"),
                    "text/plain": repr(fig),
                },
                {},
                {},
            )
        plt.close("all")

    # ---- formatting --------------------------------------------------------

    def _format(self, value):
        """``(data, metadata)`` of a value, IPython's formatter if available."""
        shell = self.shell
        if shell is None and any(hasattr(type(value), a) for a in _RICH_ATTRS):
            shell = self.ensure_shell()
        if shell is not None:
            data, md = shell.display_formatter.format(value)
            return _clean_bundle(data), dict(md or {})
        return {"text/plain": repr(value)}, {}

    def _format_exc(self, e):
        """An exception as a list of strings (joined with "\\n" by frontends).

        Python's own formatting, without frames of this shim and without the
        asyncio frames that run top-level ``await``.
        """
        import traceback

        try:
            try:
                te = traceback.TracebackException(
                    type(e), e, e.__traceback__, compact=True
                )
            except TypeError:  # Python < 3.10
                te = traceback.TracebackException(type(e), e, e.__traceback__)
            self._filter_te(te, set())
            chunks = list(te.format())
        except Exception:
            chunks = traceback.format_exception_only(type(e), e)
        return [c[:-1] if c.endswith("\n") else c for c in chunks]

    def _filter_te(self, te, seen):
        import traceback

        if te is None or id(te) in seen:
            return
        seen.add(id(te))
        asyncio_mod = sys.modules.get("asyncio")
        adir = None
        if asyncio_mod is not None and getattr(asyncio_mod, "__file__", None):
            adir = os.path.dirname(asyncio_mod.__file__) + os.sep
        frames = [f for f in te.stack if f.filename != _SHIM_FILE]
        i = 0
        while adir and i < len(frames) and frames[i].filename.startswith(adir):
            i += 1
        te.stack = traceback.StackSummary.from_list(frames[i:])
        self._filter_te(te.__cause__, seen)
        self._filter_te(te.__context__, seen)
        for sub in getattr(te, "exceptions", None) or ():
            self._filter_te(sub, seen)

    def _error_content(self, e, method=None):
        try:
            evalue = str(e)
        except Exception as str_error:
            evalue = "Failed to cast exception to string: %s" % (str_error,)
        content = {
            "status": "error",
            "ename": type(e).__name__,
            "evalue": evalue,
            "traceback": self._format_exc(e),
        }
        if method is not None:
            content["engine_info"] = {
                "engine_uuid": self.engine_uuid,
                "engine_id": self.engine_id,
                "method": method,
            }
        return content

    # ---- compiling / running ----------------------------------------------

    def _cell_filename(self, count):
        base = "<cell-%s>" % count
        n = self._cell_names.get(base, 0) + 1
        self._cell_names[base] = n
        return base if n == 1 else "<cell-%s:%d>" % (count, n)

    @staticmethod
    def _register_source(fname, src):
        import linecache

        lines = src.splitlines(True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"  # as linecache does; traceback's carets rely on it
        linecache.cache[fname] = (len(src), None, lines, fname)

    def _compile(self, node, fname, mode):
        import ast

        flags = self._cflags | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        return compile(node, fname, mode, flags, True)

    def _track_futures(self, tree, code):
        import ast

        if any(
            isinstance(n, ast.ImportFrom) and n.module == "__future__"
            for n in tree.body
        ):
            import __future__

            for name in __future__.all_feature_names:
                flag = getattr(__future__, name).compiler_flag
                if code.co_flags & flag:
                    self._cflags |= flag

    def _get_loop(self):
        if self._loop is None or self._loop.is_closed():
            import asyncio

            self._loop = asyncio.new_event_loop()
        return self._loop

    def _run_code(self, code):
        value = eval(code, self.ns)
        if code.co_flags & _CO_COROUTINE:
            value = self._get_loop().run_until_complete(value)
        return value

    def _parse(self, code, fname):
        """AST of ``code``; falls back to IPython's transforms (``%magic``)."""
        import ast

        flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT | self._cflags
        try:
            return compile(code, fname, "exec", flags, True), code
        except SyntaxError as first:
            transformed = None
            if _looks_like_ipython_syntax(code) and _importable("IPython"):
                try:
                    from IPython.core.inputtransformer2 import TransformerManager

                    transformed = TransformerManager().transform_cell(code)
                except Exception:
                    transformed = None
            if not transformed or transformed == code:
                raise first
            try:
                tree = compile(transformed, fname, "exec", flags, True)
            except SyntaxError:
                raise first from None
            self.ensure_shell()
            return tree, transformed

    @staticmethod
    def _ends_with_semicolon(code):
        if ";" not in code:
            return False
        import tokenize

        try:
            toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
        except Exception:
            return False
        skip = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE,
                tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
        for tok in reversed(toks):
            if tok.type in skip:
                continue
            return tok.type == tokenize.OP and tok.string == ";"
        return False

    def _store_result(self, value, count, store_history):
        """``_``, ``__``, ``___`` (unless the user assigned them), ``_N``, Out."""
        ns = self.ns
        update = True
        for name, cur in zip(("_", "__", "___"), self._unders):
            if name in ns and ns[name] is not cur:
                update = False
        self._unders = [value, self._unders[0], self._unders[1]]
        if update and "_" not in builtins.__dict__:
            ns["_"], ns["__"], ns["___"] = self._unders
        if store_history:
            out = self.out_hist
            out[count] = value
            ns["_%s" % count] = value
            while len(out) > _MAX_OUT_CACHE:
                old = next(iter(out))
                oldv = out.pop(old)
                if ns.get("_%s" % old, _MISSING) is oldv:
                    del ns["_%s" % old]

    def _run_cell(self, rid, code, silent, store_history, count):
        """Run a cell; returns None or the exception that ended it."""
        import ast

        fname = self._cell_filename(count)
        try:
            tree, src = self._parse(code, fname)
            self._register_source(fname, src)
            body = list(tree.body)
            last = None
            if body and isinstance(body[-1], ast.Expr) and not silent:
                last = body.pop()
            mod = ast.Module(body=body, type_ignores=[])
            code_main = self._compile(mod, fname, "exec")
            self._track_futures(tree, code_main)
            code_last = None
            if last is not None:
                code_last = self._compile(ast.Expression(body=last.value), fname, "eval")
        except BaseException as e:  # SyntaxError, ValueError (NUL bytes), ...
            return e
        try:
            self._user(self._run_code, code_main)
            if code_last is not None:
                value = self._user(self._run_code, code_last)
                if value is not None and not self._ends_with_semicolon(src):
                    data, md = self._user(self._format, value)
                    self._store_result(value, count, store_history)
                    if data:
                        self._flush_std()
                        self.send_event({
                            "ev": "execute_result",
                            "id": rid,
                            "execution_count": count,
                            "data": data,
                            "metadata": md,
                        })
        except BaseException as e:
            sys.last_type, sys.last_value, sys.last_traceback = (
                type(e), e, e.__traceback__,
            )
            return e
        return None

    # ---- shell events around execute ---------------------------------------

    def _trigger(self, event, *args):
        shell = self.shell
        if shell is None:
            return
        try:
            self._user(shell.events.trigger, event, *args)
        except KeyboardInterrupt:
            pass
        except Exception:
            pass

    def _exec_info(self, code, silent, store_history):
        try:
            from IPython.core.interactiveshell import ExecutionInfo

            return ExecutionInfo(code, store_history, silent, True, None)
        except Exception:
            return None

    # ---- ops --------------------------------------------------------------

    def op_execute(self, msg, bufs):
        rid = msg.get("id")
        code = msg.get("code") or ""
        silent = bool(msg.get("silent", False))
        store_history = bool(msg.get("store_history", not silent))
        count = msg.get("execution_count")
        if count is None:
            count = 0
        self.current_count = count
        user_expressions = msg.get("user_expressions") or {}

        info = None
        if self.shell is not None:
            try:
                self.shell.execution_count = int(count)
            except Exception:
                pass
            self._trigger("pre_execute")
            if not silent:
                info = self._exec_info(code, silent, store_history)
                if info is not None:
                    self._trigger("pre_run_cell", info)

        err = self._run_cell(rid, code, silent, store_history, count)

        if self.shell is not None:
            self._trigger("post_execute")
            if not silent and info is not None:
                try:
                    from IPython.core.interactiveshell import ExecutionResult

                    res = ExecutionResult(info)
                    res.execution_count = count
                    res.error_in_exec = err
                    self._trigger("post_run_cell", res)
                except Exception:
                    pass
        try:
            self._user(self._flush_figures_fallback)
        except BaseException:
            pass

        if err is None:
            content = {
                "status": "ok",
                "execution_count": count,
                "user_expressions": self._user_expressions(user_expressions),
                "payload": [],
            }
        else:
            content = self._error_content(err, method="execute")
            content.update(execution_count=count, user_expressions={}, payload=[])
            self._send_error(rid, content)
        return content, ()

    def _user_expressions(self, exprs):
        out = {}
        for name, expr in dict(exprs).items():
            try:
                value = self._user(eval, expr, self.ns)
                data, md = self._user(self._format, value)
                out[name] = {"status": "ok", "data": data, "metadata": md}
            except BaseException as e:
                c = self._error_content(e)
                out[name] = {
                    "status": "error",
                    "ename": c["ename"],
                    "evalue": c["evalue"],
                    "traceback": c["traceback"],
                }
        return out

    def _ipyparallel(self):
        if self._ipp_ser is None:
            self.ensure_shell()  # ipyparallel's push/pull helpers call get_ipython()
            import ipyparallel.serialize as ser

            if self.shell is None:
                import ipyparallel.util as ipp_util

                holder = _NSHolder(self.ns)
                ipp_util.get_ipython = lambda: holder
            self._ipp_ser = ser
        return self._ipp_ser

    def op_apply(self, msg, bufs):
        rid = msg.get("id")
        if "engine_id" in msg and msg["engine_id"] is not None:
            self.engine_id = msg["engine_id"]
        if msg.get("engine_uuid"):
            self.engine_uuid = msg["engine_uuid"]
        try:
            ser = self._ipyparallel()
        except Exception as e:
            content = {
                "status": "error",
                "ename": "ImportError",
                "evalue": "apply needs ipyparallel installed in the engine's Python "
                "(%s): %s: %s" % (sys.executable, type(e).__name__, e),
                "traceback": [],
                "engine_info": {
                    "engine_uuid": self.engine_uuid,
                    "engine_id": self.engine_id,
                    "method": "apply",
                },
            }
            self._send_error(rid, content)
            return content, ()
        bt = msg.get("buffer_threshold") or _DEFAULT_BUFFER_THRESHOLD
        it = msg.get("item_threshold") or _DEFAULT_ITEM_THRESHOLD
        try:
            f, args, kwargs = self._user(ser.unpack_apply_message, bufs, self.ns, False)
            del bufs
            result = self._user(_call, f, args, kwargs)
            del f, args, kwargs
            result_bufs = self._user(ser.serialize_object, result, bt, it)
        except BaseException as e:
            content = self._error_content(e, method="apply")
            if content["ename"] == "UnmetDependency":
                content["__parallax_metadata"] = {"dependencies_met": False}
            self._send_error(rid, content)
            return content, ()
        return {"status": "ok"}, result_bufs

    def op_complete(self, msg, bufs):
        import re

        code = msg.get("code") or ""
        pos = msg.get("cursor_pos")
        if pos is None or pos > len(code):
            pos = len(code)
        shell = self.shell
        if shell is not None:
            start = code.rfind("\n", 0, pos) + 1
            end = code.find("\n", pos)
            line = code[start:] if end < 0 else code[start:end]
            txt, matches = self._user(shell.complete, "", line, pos - start)
            return {
                "status": "ok",
                "matches": list(matches),
                "cursor_start": pos - len(txt),
                "cursor_end": pos,
                "metadata": {},
            }, ()
        text = re.search(r"[\w.]*$", code[:pos]).group(0)
        matches = self._user(_rl_complete, self.ns, text)
        return {
            "status": "ok",
            "matches": matches,
            "cursor_start": pos - len(text),
            "cursor_end": pos,
            "metadata": {},
        }, ()

    def op_inspect(self, msg, bufs):
        code = msg.get("code") or ""
        pos = msg.get("cursor_pos")
        if pos is None or pos > len(code):
            pos = len(code)
        level = int(msg.get("detail_level") or 0)
        name = _name_at_cursor(code, pos)
        content = {"status": "ok", "found": False, "data": {}, "metadata": {}}
        if not name:
            return content, ()
        obj = self._user(_resolve_name, self.ns, name)
        if obj is _MISSING:
            return content, ()
        text = self._user(_describe, name, obj, level)
        content["found"] = True
        content["data"] = {"text/plain": text}
        return content, ()

    def op_is_complete(self, msg, bufs):
        return _is_complete(msg.get("code") or ""), ()

    def op_clear(self, msg, bufs):
        shell = self.shell
        if shell is not None:
            try:
                shell.reset(new_session=False)
            except Exception:
                pass
        self.ns.clear()
        self._init_ns()
        if shell is not None:
            try:
                shell.init_user_ns()
            except Exception:
                pass
            self.ns["Out"] = self.ns["_oh"] = self.out_hist
            self.ns["get_ipython"] = self._user_get_ipython
        sys.modules["__main__"] = self.main_mod
        return {"status": "ok"}, ()

    def op_shutdown(self, msg, bufs):
        return {"status": "ok", "restart": bool(msg.get("restart", False))}, ()

    # ---- main loop -----------------------------------------------------------

    def handle(self, msg, bufs):
        # a shutdown does not wait for the warm-up: it runs no user code,
        # and an engine stopped right after it registered (cluster stop
        # while the imports run) would otherwise wait for them, or be killed
        # after the engine's 2 s
        if self._warm in ("running", "done") and msg.get("op") != "shutdown":
            # a request that arrives during the warm-up waits for it: user
            # code importing the same packages from this thread while they
            # are half-imported in the other could see partially
            # initialised modules (circular imports across threads); the
            # shell is then created here, as the import hook would have
            self._warm_lock.acquire()
            self._warm_lock.release()
            self._finish_warmup()
        rid = msg.get("id")
        op = msg.get("op")
        self.current_id = rid
        self.pending_interrupt = False
        self.shutting_down = op == "shutdown"
        self.busy = True
        self._stdin_ok = op == "execute" and msg.get("stdin") is True
        reason = msg.get("stdin_refused") if op == "execute" else None
        self._stdin_reason = reason if isinstance(reason, str) else None
        handler = getattr(self, "op_%s" % op, None) if isinstance(op, str) else None
        try:
            if handler is None:
                what = msg.get("_bad") or "unknown op %r" % (op,)
                content, rbufs = {
                    "status": "error",
                    "ename": "ValueError",
                    "evalue": what,
                    "traceback": [],
                }, ()
            else:
                content, rbufs = handler(msg, bufs)
        except BaseException as e:  # a bug in the shim, or a stray interrupt
            content, rbufs = self._error_content(e), ()
        finally:
            self.user_running = False
            self.critical = False
            self._stdin_ok = False
            self._stdin_reason = None
        self._ensure_sigint_handler()
        self._finish(rid, content, rbufs)
        self.busy = False
        if op == "shutdown":
            self._flush_std()
            try:
                import atexit

                atexit._run_exitfuncs()
            except BaseException:
                pass
            self._flush_std()
            os._exit(0)

    # ---- warm-up -------------------------------------------------------

    def _warm_imports(self):
        """Background thread started after ``ready``: import what the first
        ``apply`` (ipyparallel's serializer) and rich output (IPython's
        shell) need, overlapping the engine's idle time instead of the
        first request's.  Never touches the user namespace."""
        self._warm_tid = _thread.get_ident()
        try:
            if _importable("IPython"):
                import IPython.core.interactiveshell  # noqa: F401
                import IPython.core.displaypub  # noqa: F401
            if _importable("ipyparallel"):
                import ipyparallel.serialize  # noqa: F401
        except BaseException:
            pass
        finally:
            self._warm = "done"
            self._warm_lock.release()

    def _finish_warmup(self):
        """Main thread: create the shell once the warm-up has imported
        IPython (what the import hook does for user imports)."""
        self._warm = "finished"
        if self.shell is None and "IPython" in sys.modules:
            try:
                self.ensure_shell()
            except BaseException:
                pass

    def _idle_until_warm(self, fd):
        """While the warm-up runs and no command is waiting: wait, then
        finish it (shell creation) in the main thread while still idle."""
        import select

        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLHUP)
        while self._warm == "running":
            try:
                if p.poll(20):
                    return  # a command (or EOF): serve it first
            except InterruptedError:
                continue
        if self._warm == "done":
            self._finish_warmup()

    def serve(self):
        while True:
            if self._warm in ("running", "done"):
                try:
                    self._idle_until_warm(self.chan.cmd_fd)
                except Exception:
                    pass
            try:
                msg, bufs = self.chan.read()
            except (EOFError, OSError):
                os._exit(0)
            if msg.get("op") == "input_reply":
                # the answer to an input() that was interrupted: it gets
                # no reply (the engine expects none)
                continue
            self._replied = False
            try:
                self.handle(msg, bufs)
            except BaseException as e:
                # only reachable if an interrupt lands in the shim's own
                # bookkeeping; never let it kill the process or lose a reply
                self.user_running = False
                self.critical = False
                self.busy = False
                if not self._replied:
                    try:
                        self._finish(msg.get("id"), self._error_content(e))
                    except BaseException:
                        pass


def _looks_like_ipython_syntax(code):
    """Cheap pre-check before paying for IPython's input transformers."""
    import re

    # %magic, !cmd, x = %magic / !cmd, ?obj, obj? and obj??
    return re.search(r"^\s*[%!?]|^[^#\n]*=\s*[%!]|\?\s*$", code, re.M) is not None


def _call(f, args, kwargs):
    return f(*args, **kwargs)


def _env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# --------------------------------------------------------------------------
# completion / inspection / is_complete
# --------------------------------------------------------------------------


def _rl_complete(ns, text):
    if "rlcompleter" in sys.modules:
        import rlcompleter
    else:
        # rlcompleter imports readline just to install itself there; the
        # engine has no terminal, so keep readline out of the process
        blocked = "readline" not in sys.modules
        if blocked:
            sys.modules["readline"] = None
        try:
            import rlcompleter
        finally:
            if blocked and sys.modules.get("readline", _MISSING) is None:
                del sys.modules["readline"]
    comp = rlcompleter.Completer(ns)
    if "." in text:
        raw = comp.attr_matches(text)
    else:
        raw = comp.global_matches(text)
    out, seen = [], set()
    for m in raw:
        # rlcompleter decorates: "len(", "import ", "try:"
        m = m.rstrip("(: ")
        if m not in seen:
            seen.add(m)
            out.append(m)
    return sorted(out, key=lambda s: (s.rsplit(".", 1)[-1].startswith("_"), s))


def _name_at_cursor(code, pos):
    """Dotted name under the cursor, or the callee of the enclosing call."""
    import re

    left = re.search(r"[\w.]*$", code[:pos]).group(0)
    right = re.match(r"\w*", code[pos:]).group(0)
    name = (left + right).strip(".")
    if name and not name[0].isdigit():
        return name
    depth = 0
    for i in range(pos - 1, -1, -1):
        c = code[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth == 0:
                name = re.search(r"[\w.]*$", code[:i]).group(0).strip(".")
                return name if name and not name[0].isdigit() else ""
            depth -= 1
        elif c == "\n" and depth == 0 and i < pos - 1 and code[i + 1:pos].strip() == "":
            break
    return ""


def _resolve_name(ns, name):
    parts = name.split(".")
    if parts[0] in ns:
        obj = ns[parts[0]]
    elif hasattr(builtins, parts[0]):
        obj = getattr(builtins, parts[0])
    else:
        return _MISSING
    for p in parts[1:]:
        try:
            obj = getattr(obj, p)
        except Exception:
            return _MISSING
    return obj


def _describe(name, obj, level):
    import inspect

    lines = []
    sig = None
    if callable(obj):
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = None
    if sig is not None:
        lines.append("Signature: %s%s" % (name, sig))
    lines.append("Type:      %s" % type(obj).__name__)
    if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
        try:
            s = repr(obj)
        except Exception as e:
            s = "<repr failed: %s>" % e
        if len(s) > 500:
            s = s[:250] + " ... " + s[-100:]
        lines.append("String form: %s" % s)
    try:
        f = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        f = None
    if f:
        lines.append("File:      %s" % f)
    source = None
    if level >= 1:
        try:
            source = inspect.getsource(obj)
        except (TypeError, OSError):
            source = None
    if source is not None:
        lines.append("Source:\n%s" % source.rstrip("\n"))
    else:
        doc = inspect.getdoc(obj)
        lines.append("Docstring:\n%s" % (doc if doc else "<no docstring>"))
    return "\n".join(lines)


_transformer_manager = []


def _is_complete(code):
    """is_complete_reply content: IPython's check_complete (what ipykernel
    answers) when IPython is installed, else codeop with console rules."""
    import codeop
    import warnings

    if not code.strip():
        return {"status": "complete"}
    if not _transformer_manager:
        try:
            from IPython.core.inputtransformer2 import TransformerManager

            _transformer_manager.append(TransformerManager())
        except Exception:
            _transformer_manager.append(None)
    tm = _transformer_manager[0]
    if tm is not None:
        try:
            status, indent_spaces = tm.check_complete(code)
            reply = {"status": status}
            if status == "incomplete":
                reply["indent"] = " " * (indent_spaces or 0)
            return reply
        except Exception:
            pass
    lines = code.split("\n")
    last = lines[-1]
    nonblank = [ln for ln in lines if ln.strip()]
    ref = nonblank[-1] if nonblank else ""
    indent = ref[: len(ref) - len(ref.lstrip(" \t"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = codeop.compile_command(code, "<input>", "exec")
        except (SyntaxError, OverflowError, ValueError, TypeError):
            return {"status": "invalid"}
    if res is None:
        if ref.rstrip().endswith(":"):
            indent += "    "
        return {"status": "incomplete", "indent": indent}
    # an indented block is only finished by an empty line, as in a console
    if last.strip() and last[:1] in (" ", "\t"):
        return {"status": "incomplete", "indent": indent}
    return {"status": "complete"}


# --------------------------------------------------------------------------
# start-up
# --------------------------------------------------------------------------


def _text_stream(fd, line_buffering, write_through):
    raw = io.FileIO(fd, "wb", closefd=False)
    buf = io.BufferedWriter(raw, 1 << 16)
    return io.TextIOWrapper(
        buf,
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=line_buffering,
        write_through=write_through,
    )


def main(forked=False):
    cmd_fd = _env_int("PARALLAX_CMD_FD", 3)
    evt_fd = _env_int("PARALLAX_EVT_FD", 4)
    os.environ.pop("PARALLAX_CMD_FD", None)
    os.environ.pop("PARALLAX_EVT_FD", None)

    # keep this module reachable under its own name; user code gets a fresh
    # __main__ (ipykernel-like: pickle / multiprocessing find user objects)
    me = sys.modules.get(__name__)
    if me is not None:
        sys.modules.setdefault("parallax_engine_shim", me)

    chan = _Channel(cmd_fd, evt_fd)
    if forked and _ZYGOTE_ENGINE is not None:
        # the zygote's engine, shell included (shared pages): only what is
        # this process's own changes
        engine = _ZYGOTE_ENGINE
        engine.chan = chan
        engine._token_prefix = "pxe-%s-" % os.urandom(6).hex()
        engine._main_tid = _thread.get_ident()
        engine.engine_id = _env_int("PARALLAX_ENGINE_ID", -1)
        engine.engine_uuid = os.environ.get("PARALLAX_ENGINE_UUID", "")
    else:
        engine = Engine(chan)
    _signal.signal(_signal.SIGINT, engine._sigint_handler)

    for fd in (cmd_fd, evt_fd):
        try:
            os.set_inheritable(fd, False)  # children get only fds 0-2
        except OSError:
            pass

    # stdout: line buffered (flushed at every newline, before every event and
    # at the end of every request); stderr: unbuffered
    sys.stdout = sys.__stdout__ = _text_stream(1, True, False)
    sys.stderr = sys.__stderr__ = _text_stream(2, True, True)

    sys.modules["__main__"] = engine.main_mod
    sys.argv = [""]
    # like an interactive interpreter / ipykernel: the working directory, not
    # the shim's directory, is first on sys.path
    try:
        here = os.path.dirname(os.path.abspath(_SHIM_FILE))
        if sys.path and sys.path[0] and os.path.samefile(sys.path[0], here):
            sys.path[0] = ""
    except OSError:
        pass
    if "" not in sys.path:
        sys.path.insert(0, "")

    hooks = {
        "IPython": (None, engine._on_ipython_imported),
        "matplotlib": (engine._before_matplotlib, None),
        "ipyparallel.engine.datapub": (None, engine._on_datapub_imported),
        "getpass": (None, engine._on_getpass_imported),
    }
    sys.meta_path.insert(0, _ImportWatcher(hooks))
    if forked:
        # forked from the zygote: what it imported already is patched now,
        # as the import hook would have done (IPython's shell: below)
        for name, (_before, after) in hooks.items():
            mod = sys.modules.get(name)
            if mod is not None and after is not None and name != "IPython":
                try:
                    after(mod)
                except Exception:
                    pass
    # stdin is /dev/null: input() would raise a bare EOFError.  It asks the
    # client when the request allows it, else raises ipykernel's
    # StdinNotImplementedError (as ipengine does without allow_stdin)
    builtins.input = engine._input

    # exit promptly if the engine dies, even while user code is running:
    # poll() with no requested events reports only POLLHUP / POLLERR /
    # POLLNVAL.  When idle, the main loop sees EOF and exits by itself; a
    # shutdown request finishes (reply, atexit) before exiting.
    try:
        import select

        def _watchdog(fd=cmd_fd):
            p = select.poll()
            p.register(fd, 0)
            while True:
                try:
                    ev = p.poll()
                except InterruptedError:
                    continue
                except Exception:
                    return
                for _, mask in ev:
                    if mask & select.POLLNVAL:
                        return
                    if mask & (select.POLLHUP | select.POLLERR):
                        while True:
                            if engine.busy and not engine.shutting_down:
                                os._exit(0)
                            time.sleep(0.05)

        _thread.start_new_thread(_watchdog, ())
    except Exception:
        pass

    ipy = _importable("IPython")
    ipp = _importable("ipyparallel")
    v = sys.version_info
    startup_ms = (time.perf_counter() - _T0) * 1000.0
    # hand-written: json is only imported once the first command arrives
    # "end_prefix" (an addition to the protocol): every end token of this
    # process starts with it, so the engine can spot markers on fd 1/2
    # before the reply that names them arrives
    ready = (
        '{"ev":"ready","pid":%d,"python":"%d.%d.%d","ipython":%s,'
        '"ipyparallel":%s,"startup_ms":%.3f,"end_prefix":"%s"}'
        % (os.getpid(), v[0], v[1], v[2], "true" if ipy else "false",
           "true" if ipp else "false", startup_ms, engine._token_prefix)
    ).encode("ascii")
    _write_all(
        evt_fd,
        len(ready).to_bytes(4, "little") + ready + (0).to_bytes(4, "little"),
    )
    if forked and "IPython" in sys.modules:
        # the zygote imported everything: only the shell is left, created
        # by the main thread while idle (no thread: nothing to import)
        engine._warm = "done"
    elif os.environ.get("PARALLAX_WARMUP", "1") != "0":
        engine._warm = "running"
        engine._warm_lock.acquire()
        try:
            _thread.start_new_thread(engine._warm_imports, ())
        except Exception:
            engine._warm = None
            engine._warm_lock.release()
    engine.serve()


# --------------------------------------------------------------------------
# zygote: one template process that imports once and forks the interpreters
# --------------------------------------------------------------------------
#
# ``python -u parallax_engine_shim.py --parallax-zygote SOCKET``: binds the
# Unix socket at once (engines may connect while it imports), imports what
# an engine's first apply and rich output need in its only thread, freezes
# the garbage collector's view of those objects (``gc.freeze``: collections
# in the children never touch, hence never copy, the shared pages), then
# serves.  It never starts a thread, so forking is safe.
#
# Protocol, per connection (one connection = one interpreter):
# engine -> zygote: u32 LE length + JSON {"env": {..}, "cwd": "..",
#   "python": ".."}, sent with SCM_RIGHTS carrying four descriptors: the
#   write ends of stdout and stderr, the read end of the command pipe and
#   the write end of the event pipe.
# zygote -> engine: JSON lines: {"pid": N} (forked) or {"error": ".."};
#   later {"exit": code} or {"signal": n} when the child ended (the zygote
#   is its parent and reaps it).  A connection closed by the engine kills a
#   child that is still running (the engine is gone).


#: the engine the zygote prepared (shell created, serializer warmed); a
#: forked child adopts it
_ZYGOTE_ENGINE = None


def _zygote_probe(x, k=None):
    return [x, k]


def _zygote_prepare():
    """In the zygote: an Engine whose shell exists and whose apply path ran
    once (ipyparallel's canning imports numpy and fills its maps on first
    use), so each child starts where an engine is after its first apply."""
    global _ZYGOTE_ENGINE
    engine = Engine(None)
    sys.modules["__main__"] = engine.main_mod
    if _importable("IPython"):
        engine.ensure_shell()
    if _importable("ipyparallel"):
        ser = engine._ipyparallel()
        bufs = ser.pack_apply_message(_zygote_probe, (1,), {"k": [1.5, "a"]})
        f, args, kwargs = ser.unpack_apply_message(bufs, engine.ns, False)
        ser.serialize_object(_call(f, args, kwargs), _DEFAULT_BUFFER_THRESHOLD,
                             _DEFAULT_ITEM_THRESHOLD)
    _ZYGOTE_ENGINE = engine


def _zygote_refusal(req):
    """Why this zygote cannot fork the interpreter ``req`` asks for (None
    if it can): another interpreter, or a Python-level environment that
    would have made its start-up differ."""
    want = req.get("python")
    mine = os.environ.get("PARALLAX_ZYGOTE_PYTHON")
    if want and mine and want != mine:
        return "the zygote runs %s, not %s" % (mine, want)
    env = req.get("env") or {}
    for k in sorted(set(env) | set(os.environ)):
        if k.startswith("PYTHON") and env.get(k) != os.environ.get(k):
            return "%s differs from the zygote's" % k
    return None


def _zygote_child(socks, fds, req):
    """In the forked child: become an engine's interpreter."""
    global _T0
    _T0 = time.perf_counter()
    import fcntl
    import signal

    signal.set_wakeup_fd(-1)
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    for s in socks:
        # detach: a socket object collected later must not close a number
        # that is one of this process's pipes by then
        try:
            os.close(s.detach())
        except OSError:
            pass
    # own process group, as a spawned interpreter: the engine forwards
    # signals; a terminal's Ctrl-C to the engine's group must not land here
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDONLY)
    # the descriptors after the engine's four go to the numbers the engine
    # has them at (PMI_FD: a process manager's socket, named by the env)
    keep = [int(k) for k in req.get("keep_fds") or []]
    # above all targets first, so no dup2 clobbers a source
    floor = max([10] + [k + 1 for k in keep])
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in [null] + list(fds)]
    for dst, src in zip(list(range(5)) + keep, high):
        os.dup2(src, dst)
    # nothing of the zygote's (its socket, other engines' pipes) stays open
    lo = 5
    for k in sorted(keep):
        os.closerange(lo, k)
        lo = k + 1
    os.closerange(lo, 1 << 20)
    env = req.get("env") or {}
    os.environ.clear()
    os.environ.update(env)
    os.environ["PARALLAX_CMD_FD"] = "3"
    os.environ["PARALLAX_EVT_FD"] = "4"
    cwd = req.get("cwd")
    if cwd:
        os.chdir(cwd)
    sys.argv = [_SHIM_FILE]
    main(forked=True)


#: how long a host zygote waits with no engine before it exits: long
#: enough for an engine to fork the next interpreter after a crash, short
#: enough that a stop (which waits for it) is not slowed down
_HOST_IDLE = 0.5


def _zygote_main(path, owner=None, host_lock=None):
    import fcntl
    import gc
    import json
    import select
    import signal
    import socket
    import struct

    os.umask(0o077)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4096)
    # the heavy imports, in this (the only) thread
    t0 = time.perf_counter()
    for name in ("IPython.core.interactiveshell", "IPython.core.displaypub",
                 "ipyparallel.serialize", "json", "ast", "codeop", "traceback",
                 "linecache", "select", "re", "inspect", "tokenize", "getpass"):
        if _importable(name.split(".")[0]):
            try:
                __import__(name)
            except Exception as e:
                sys.stderr.write("parallax zygote: importing %s failed: %s\n" % (name, e))
    sys.modules.setdefault("parallax_engine_shim", sys.modules[__name__])
    try:
        _zygote_prepare()
    except Exception as e:
        sys.stderr.write("parallax zygote: preparing an engine failed: %r\n" % (e,))
    gc.collect()
    gc.freeze()
    if len(sys._current_frames()) != 1:
        sys.stderr.write("parallax zygote: a thread is running; not forking\n")
        os._exit(1)
    sys.stdout.write("parallax zygote ready: pid %d, %.0f ms of imports, socket %s\n"
                     % (os.getpid(), (time.perf_counter() - t0) * 1e3, path))
    sys.stdout.flush()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    stopping = []
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conns = {}  # fd -> [socket, pid or None, request bytes, received fds]
    by_pid = {}  # pid -> fd

    def send(c, obj):
        try:
            c.sendall((json.dumps(obj) + "\n").encode())
        except OSError:
            pass

    def drop(fd):
        c, pid = conns.pop(fd)[:2]
        if pid is not None and pid in by_pid:
            # the engine is gone (or gave up): no interpreter without it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        c.close()

    def reap():
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fd = by_pid.pop(pid, None)
            if fd is None or fd not in conns:
                continue
            c = conns[fd][0]
            if os.WIFSIGNALED(status):
                send(c, {"signal": os.WTERMSIG(status)})
            else:
                send(c, {"exit": os.WEXITSTATUS(status)})
            conns[fd][1] = None

    def serve_request(fd):
        ent = conns[fd]
        c = ent[0]
        try:
            data, fds, _flags, _addr = socket.recv_fds(c, 1 << 20, 8)
        except OSError:
            data, fds = b"", []
        ent[3].extend(fds)
        if not data:
            for x in ent[3]:
                os.close(x)
            drop(fd)
            return
        buf = ent[2]
        buf.extend(data)
        if len(buf) < 4 or len(buf) < 4 + struct.unpack("<I", buf[:4])[0]:
            return  # more to come (the fds came with the first byte)
        n = struct.unpack("<I", buf[:4])[0]
        got = ent[3]
        try:
            req = json.loads(bytes(buf[4:4 + n]))
        except ValueError:
            req = None
        keep = req.get("keep_fds") if isinstance(req, dict) else None
        if req is None or not isinstance(keep or [], list) or len(got) != 4 + len(keep or []) \
                or any(not isinstance(k, int) or k < 5 for k in keep or []):
            send(c, {"error": "bad request"})
        else:
            why = _zygote_refusal(req)
            if why:
                send(c, {"error": why})
            else:
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    try:
                        # (the wake-up pipe goes with closerange)
                        _zygote_child([srv] + [v[0] for v in conns.values()], got, req)
                    except BaseException as e:
                        try:
                            os.write(2, ("parallax zygote child: %r\n" % (e,)).encode())
                        except OSError:
                            pass
                    os._exit(1)
                by_pid[pid] = fd
                ent[1] = pid
                send(c, {"pid": pid})
        for x in got:
            os.close(x)
        ent[2] = bytearray()
        ent[3] = []

    # the host zygote's log (beside its lock): removed at an idle exit, which
    # is a clean end; kept when it ends otherwise
    host_log = host_lock[:-len(".lock")] + ".log" if host_lock and host_lock.endswith(".lock") else None

    def lock_now():
        """The host lock, taken without waiting (None: an engine holds it,
        or the private directory is gone). Kept until the process ends."""
        try:
            fd = os.open(host_lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def remove_files():
        """Socket, log and lock file, while holding the lock: an engine
        waiting on it finds it is no longer the one at the path and locks
        anew; the next engine starts a new zygote."""
        for p in (path, host_log, host_lock):
            try:
                os.unlink(p)
            except (OSError, TypeError):
                pass

    def may_leave():
        """A host zygote with no engine: leave unless one is connecting
        (engines connect only while holding the lock) or has connected."""
        fd = lock_now()
        if fd is None:
            return not os.path.exists(host_lock)  # gone: nobody can come
        if select.select([srv], [], [], 0)[0]:
            os.close(fd)
            return False  # one connected just before
        remove_files()
        srv.close()
        return True

    # an owner (the cluster file of `parallax cluster start`): once it has
    # existed and is gone (the cluster was stopped, also by ipyparallel's
    # Cluster.stop_cluster, which knows nothing of zygotes) and no child is
    # left, the zygote is not needed any more; one never seen for 10 min is
    # a start that died before writing it. A host zygote (``host_lock``)
    # leaves when no engine has been connected for HOST_IDLE seconds.
    owner_seen = False
    born = time.monotonic()
    idle_since = born
    while not stopping:
        if owner is not None:
            if os.path.exists(owner):
                owner_seen = True
            elif not by_pid and (owner_seen or time.monotonic() - born > 600):
                break
        if host_lock is not None:
            if conns or by_pid:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > _HOST_IDLE and may_leave():
                break
        timeout = None if owner is None else 1.0
        if host_lock is not None and not conns and not by_pid:
            # wake up when the idle time is over
            timeout = max(0.01, idle_since + _HOST_IDLE - time.monotonic() + 0.01)
        try:
            r, _, _ = select.select([srv, wake_r] + list(conns), [], [], timeout)
        except InterruptedError:
            r = []
        for x in r:
            if x is srv:
                try:
                    c, _ = srv.accept()
                except OSError:
                    continue
                conns[c.fileno()] = [c, None, bytearray(), []]
            elif x == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except OSError:
                    pass
                reap()
            elif x in conns:
                if conns[x][1] is None:
                    serve_request(x)
                else:
                    # after the pid: only EOF (or junk) comes from the engine
                    try:
                        more = conns[x][0].recv(4096)
                    except OSError:
                        more = b""
                    if not more:
                        drop(x)
        reap()
    # SIGTERM (or the owner gone): the cluster is stopping; no interpreter
    # outlives the zygote
    for pid in list(by_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if host_lock is not None and lock_now() is not None:
        # a host zygote stopped from outside (a batch system ending the
        # job, a person): no file of it stays behind
        remove_files()
    try:
        os.unlink(path)
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    # --parallax-zygote SOCKET [--owner CLUSTER_FILE] [--host-lock LOCK]
    # (the owner is also there for `cluster stop` to find in
    # /proc/PID/cmdline; a host lock makes it a host zygote)
    if len(sys.argv) >= 3 and sys.argv[1] == "--parallax-zygote":
        _opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))
        _zygote_main(sys.argv[2], _opts.get("--owner"), _opts.get("--host-lock"))
    else:
        main()
