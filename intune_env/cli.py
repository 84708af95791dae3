"""The one error line of the ``intune`` command, shared by every layer that has commands.

The click group lives in the top layer (:mod:`agents.cli`); the live commands
(:mod:`intune_env.live.cli`) sit in this layer and cannot import upward, so the error line
they share lives here. A user's fault prints ``intune: error: ...`` on stderr, as one line
(whitespace collapsed, control characters escaped, length capped), and exits 2.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from simulators.fileio import echo

#: Longest error line printed (user input inside it is capped far lower by ``echo``).
MAX_LINE_CHARS = 1000
#: Most lines of one error (several validation errors are listed one per line).
MAX_LINES = 8


def one_line(message: object) -> str:
    """``message`` as one safe line: whitespace collapsed, control characters escaped."""
    return echo(" ".join(str(message).split()), limit=MAX_LINE_CHARS)


def error_lines(message: object) -> list[str]:
    """``message`` as at most :data:`MAX_LINES` safe lines, blank lines dropped."""
    lines = [one_line(ln) for ln in str(message).splitlines() if ln.strip()] or ["(no message)"]
    if len(lines) > MAX_LINES:
        lines = [*lines[: MAX_LINES - 1], f"(+{len(lines) - MAX_LINES + 1} more lines)"]
    return lines


def fail(message: object) -> NoReturn:
    """Print ``intune: error: MESSAGE`` on stderr and exit 2 (a user's fault).

    One line, unless the message itself lists several faults one per line (a scenario
    with several validation errors): those follow, indented, after the first.
    """
    first, *rest = error_lines(message)
    click.echo(f"intune: error: {first}", err=True)
    for line in rest:
        click.echo(f"  {line}", err=True)
    sys.exit(2)


def warn(message: object) -> None:
    """Print ``intune: warning: MESSAGE`` (one line) on stderr and carry on."""
    click.echo(f"intune: warning: {one_line(message)}", err=True)
