#!/usr/bin/env python3
"""Execute a notebook headless (nbclient) and print it as text.

usage: run_notebook.py NOTEBOOK [--kernel NAME] [--timeout S] [--output PATH]

Every cell is printed as it finishes: its source, then its outputs merged
into text — stream text, the text/plain of displays and results (so
Parallax's `[stdout:N]`, `Out[N:C]:` and `[output:N]` pieces show as they
would in a notebook), error tracebacks, and images as `<image/png N bytes>`.

The kernel defaults to the one named in the notebook's metadata. Cells tagged
`raises-exception` may fail; any other error (or a kernel that dies or a cell
that times out) stops the run with exit status 1. `make run` runs
notebooks/overview.ipynb with the Parallax kernel this way.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import sys
import textwrap
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")


def output_text(output: dict) -> str:
    """One output as text (ANSI escapes kept; the caller strips them)."""
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("text", "")
    if kind in ("display_data", "execute_result", "update_display_data"):
        data = output.get("data", {})
        for mime in IMAGE_MIMES:
            if mime in data:
                payload = data[mime]
                if isinstance(payload, list):
                    payload = "".join(payload)
                size = len(payload.encode())
                if mime != "image/svg+xml":
                    try:
                        size = len(base64.b64decode(payload, validate=False))
                    except (binascii.Error, ValueError):
                        pass
                return f"<{mime} {size} bytes>\n"
        if "text/plain" in data:
            text = data["text/plain"]
            if isinstance(text, list):
                text = "".join(text)
            return text if text.endswith("\n") else text + "\n"
        if data:
            mime = sorted(data)[0]
            return f"<{mime} {len(str(data[mime]))} chars>\n"
        return ""
    if kind == "error":
        tb = output.get("traceback") or [f"{output.get('ename')}: {output.get('evalue')}"]
        text = "\n".join(tb)
        return text if text.endswith("\n") else text + "\n"
    return f"<{kind}>\n"


def cell_text(cell, color: bool) -> str:
    lines = []
    if cell.cell_type == "code":
        n = cell.get("execution_count")
        lines.append(f"In [{n if n is not None else ' '}]:")
        lines.append(textwrap.indent(cell.source, "    "))
        outputs = "".join(output_text(o) for o in cell.get("outputs", []))
        if not color:
            outputs = ANSI.sub("", outputs)
        if outputs:
            lines.append("")
            lines.append(outputs.rstrip("\n"))
    elif cell.cell_type == "markdown":
        lines.append(textwrap.indent(cell.source, "  │ ", lambda line: True))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--kernel", help="kernel name (default: the notebook's kernelspec)")
    ap.add_argument("--timeout", type=float, default=60, help="per-cell timeout, seconds")
    ap.add_argument("--startup-timeout", type=float, default=60)
    ap.add_argument("--output", type=Path, help="also write the executed notebook here")
    ap.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="keep the outputs' ANSI colours (auto: when stdout is a terminal)",
    )
    args = ap.parse_args(argv)

    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    )
    nb = nbformat.read(args.notebook, as_version=4)
    kernel = args.kernel or nb.metadata.get("kernelspec", {}).get("name") or "parallax-python"
    print(f"=== {args.notebook} with kernel {kernel}", flush=True)

    printed: set[int] = set()
    unexpected_ok: list[int] = []

    def show(cell_index: int) -> None:
        cell = nb.cells[cell_index]
        printed.add(cell_index)
        print(f"--- cell {cell_index}", flush=True)
        print(cell_text(cell, color), flush=True)

    def on_cell_start(cell, cell_index, **_):
        # markdown cells (never executed) are printed before the next code cell
        for i in range(cell_index):
            if i not in printed and nb.cells[i].cell_type != "code":
                show(i)

    def on_cell_executed(cell, cell_index, execute_reply, **_):
        show(cell_index)
        status = (execute_reply or {}).get("content", {}).get("status")
        if status == "ok" and "raises-exception" in cell.metadata.get("tags", []):
            unexpected_ok.append(cell_index)

    client = NotebookClient(
        nb,
        timeout=args.timeout,
        startup_timeout=args.startup_timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(args.notebook.resolve().parent)}},
        on_cell_start=on_cell_start,
        on_cell_executed=on_cell_executed,
    )
    status = 0
    try:
        client.execute()
    except CellExecutionError as e:
        where = f"cell {max(printed)}" if printed else "a cell"
        print(f"=== unexpected error in {where}: {e.ename}: {ANSI.sub('', e.evalue)}", file=sys.stderr)
        status = 1
    except (CellTimeoutError, DeadKernelError, TimeoutError, RuntimeError) as e:
        print(f"=== run failed: {type(e).__name__}: {e}", file=sys.stderr)
        status = 1
    else:
        for i in range(len(nb.cells)):
            if i not in printed and nb.cells[i].cell_type != "code":
                show(i)
    for i in unexpected_ok:
        print(f"=== note: cell {i} is tagged raises-exception but did not raise", file=sys.stderr)
    if args.output:
        nbformat.write(nb, args.output)
        print(f"=== executed notebook written to {args.output}")
    if status == 0:
        print(f"=== {args.notebook}: all cells ran")
    return status


if __name__ == "__main__":
    sys.exit(main())
