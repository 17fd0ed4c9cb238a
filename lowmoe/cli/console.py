"""The console the CLI prints its tables on: a terminal's own width, or, where the output is a pipe
or a file, wide enough for any table at its natural width (rich would otherwise lay it out in 80
columns and cut the headers: "prefe…")."""

import sys

WIDE = 1000  # columns: more than any table here needs; a table is never padded out to it


def table_console(stderr=False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else WIDE)
