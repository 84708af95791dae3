"""Files at the package's boundary: bounded reads, atomic writes, contained paths.

Every file the package reads from a user (scenario YAML, Q-tables, model sidecars, run
results) goes through :func:`read_text_limited`; every file it writes goes through
:func:`write_bytes_atomic` (or its text/JSON forms); every path it builds from a name
goes through :func:`contained`. One copy of each, so the rules hold everywhere:

- reads: regular files only (a FIFO would block forever, ``/dev/zero`` never ends), at
  most ``max_bytes``, strict UTF-8; any fault is an :class:`InputFileError` whose message
  names the file and what was expected, one line;
- writes: a temporary file in the destination folder, flushed and fsynced, then
  ``os.replace``: a reader sees the old file or the new one, never half of one, and a
  failed write (disk full) leaves no temporary file behind;
- names: a path built from a user-given name must stay inside its folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Default cap on a user file read as text (a scenario is a few KiB).
MAX_TEXT_BYTES = 1 << 20
#: Characters of user input echoed in an error message.
ECHO_CHARS = 80

# C0/C1 controls (ANSI escapes, NUL), the bidirectional marks, overrides and isolates,
# which reorder the text printed after them (U+202E shows "txt.exe" as "exe.txt"), and the
# line and paragraph separators, which would break a one-line message
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e"
                      "\u2066-\u2069]")


class InputFileError(ValueError):
    """A user file that cannot be read as what it should be (one-line message)."""


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr``-like text of user input that is safe to print: control characters (ANSI
    escapes included) escaped, at most ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = _CONTROL.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                   else f"\\u{ord(m.group()):04x}"), text)
    if len(text) > limit:
        text = f"{text[: limit - 3]}... ({len(text):,} chars)"
    return text


def read_bytes_limited(path: str | Path, max_bytes: int = MAX_TEXT_BYTES,
                       what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; :class:`InputFileError`."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise InputFileError(f"{echo(str(p))}: cannot read {what} ({err.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{echo(str(p))}: {what} must be a regular file")
        if st.st_size > max_bytes:
            raise InputFileError(f"{echo(str(p))}: {what} is {st.st_size:,} bytes; "
                                 f"expected at most {max_bytes:,}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as err:
        raise InputFileError(f"{echo(str(p))}: cannot read {what} ({err.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while we read
        raise InputFileError(f"{echo(str(p))}: {what} is over {max_bytes:,} bytes")
    return data


def read_text_limited(path: str | Path, max_bytes: int = MAX_TEXT_BYTES,
                      what: str = "file") -> str:
    """A regular file of at most ``max_bytes`` decoded as strict UTF-8."""
    data = read_bytes_limited(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(f"{echo(str(path))}: {what} is not UTF-8 text (byte "
                             f"{err.start}: {data[err.start:err.start + 1]!r})") from None


def refuse_folders(paths: Sequence[str | Path]) -> None:
    """``IsADirectoryError`` naming the first of ``paths`` that is a folder: checked for a
    whole set of outputs before the first is written, so none is left half done."""
    for p in paths:
        if Path(p).is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder; expected a file path", str(p))


def write_bytes_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the folder, then rename)."""
    p = Path(path)
    refuse_folders([p])
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private; these are ordinary data files
        os.replace(tmp, p)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            # A failed write (disk full) names no file by itself; name the destination.
            raise OSError(err.errno, err.strerror, str(p)) from err
        raise
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 ``text``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{echo(k)}'")
        out[k] = v
    return out


def loads_json_strict(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (no silent "last wins").

    Raises ``ValueError`` (``json.JSONDecodeError`` for bad syntax, plain ``ValueError``
    for a duplicate key or an integer of more than 4,300 digits) or ``RecursionError``
    for deep nesting; callers turn those into one line naming their file.
    """
    return json.loads(text, object_pairs_hook=_unique_keys)


def _json_default(o: Any) -> Any:
    import numpy as np  # local: this module is imported by every layer

    if isinstance(o, np.integer | np.bool_):
        return o.item()
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json_atomic(path: str | Path, data: Any, indent: int | None = None,
                      sort_keys: bool = False) -> Path:
    """``data`` as strict JSON (no NaN or infinity), written atomically."""
    text = json.dumps(data, allow_nan=False, default=_json_default, indent=indent,
                      sort_keys=sort_keys)
    return write_text_atomic(path, text + ("\n" if indent is not None else ""))


def contained(folder: str | Path, *parts: str) -> Path:
    """``folder / parts...``, refused (``ValueError``) unless it stays inside ``folder``.

    Guards paths built from names that came from a user (a scenario's ``name``, an
    agent's): ``../x``, absolute parts and symlinks out of the folder are all refused.
    """
    base = Path(folder).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"path {echo('/'.join(parts))} leaves its folder {echo(str(base))}")
    return target
