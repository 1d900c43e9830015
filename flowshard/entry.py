"""The `flowshard` command's entry point.

Why a module of its own: a Ctrl-C while the CLI's modules are still importing (the first tenth of a
second or so) raised KeyboardInterrupt outside `cli.main`'s handler, a traceback (a review). Importing
them here, inside a handler, makes it the same one-line exit as later.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from flowshard.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("flowshard: interrupted\n")
        return 130
    return cli_main()
