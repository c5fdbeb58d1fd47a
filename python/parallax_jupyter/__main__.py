"""``python -m parallax_jupyter ARGS``: ``parallax ARGS`` with this
environment's Python for the engines (the kernelspec's command)."""

import sys

from . import exec_parallax

if __name__ == "__main__":
    exec_parallax(sys.argv[1:])
