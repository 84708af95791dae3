"""Q-table files and the abstract state/action space they are indexed by.

Table files are JSON with a ``format_version`` field, written atomically (temporary file in
the same folder, then ``os.replace``); a corrupt, truncated, wrong-version or wrong-shape
file raises :class:`QTableError` (a ``ValueError``) naming the file and the fault.

A table is a JSON object::

    {"format_version": 1, "kind": "intune-qlearning-table",
     "features": [[name, [values...]], ...], "actions": ["noop", "give", "take"],
     "q": [[float x 3] x 54], "visits": [[int x 3] x 54], "metadata": {...}}

Reading is defensive: the file is read with a size cap (``read_text_limited``), and any
fault (corrupt JSON, nesting too deep, a wrong type, a visit count that is negative,
fractional, a string or beyond 2**53, a ``format_version`` that is not the integer 1)
gives one :class:`QTableError` line naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulators.fileio import (
    InputFileError,
    echo,
    loads_json_strict,
    read_text_limited,
    write_json_atomic,
)

FORMAT_VERSION = 1
FILE_KIND = "intune-qlearning-table"

#: Abstract state features: (name, values). The state index is their mixed-radix number.
FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bottleneck", ("gpu", "stage_addable", "stage_blocked")),
    ("cpus", ("free", "none_free", "oversubscribed")),
    ("slack", ("none", "some")),
    ("memory", ("fits", "tight", "critical")),
)
#: Abstract actions, mapped to env actions each step.
ACTIONS: tuple[str, ...] = ("noop", "give", "take")
NOOP, GIVE, TAKE = range(3)
N_STATES = math.prod(len(v) for _, v in FEATURES)
N_ACTIONS = len(ACTIONS)

#: The table shipped with the package (see ``benchmarks/pretrain_qlearning.py``).
PRETRAINED_PATH = Path(__file__).with_name("pretrained") / "qtable.json"


class QTableError(ValueError):
    """A Q-table file cannot be used; the message names the file and the fault."""




def state_index(features: Sequence[int]) -> int:
    """Mixed-radix index of a feature tuple (see ``FEATURES``)."""
    idx = 0
    for (_, values), f in zip(FEATURES, features, strict=True):
        idx = idx * len(values) + int(f)
    return idx


def state_features(index: int) -> tuple[int, ...]:
    """Inverse of :func:`state_index`."""
    out = []
    for _, values in reversed(FEATURES):
        out.append(index % len(values))
        index //= len(values)
    return tuple(reversed(out))


def describe_state(index: int) -> str:
    """Readable name of a state, e.g. ``bottleneck=gpu cpus=free slack=some memory=fits``."""
    return " ".join(f"{name}={values[f]}"
                    for (name, values), f in zip(FEATURES, state_features(index), strict=True))



#: Largest table file read (a table is a few KiB).
MAX_TABLE_BYTES = 1 << 20
#: Visit counts above this are not counts (2**53: exact in a JSON number / float).
MAX_VISITS = 2**53


def write_table(path: str | Path, table: dict[str, Any]) -> Path:
    """Write ``table`` as strict JSON atomically (``simulators.fileio.write_json_atomic``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, table, indent=1, sort_keys=True)


def _fail(path: Path, msg: str) -> QTableError:
    return QTableError(f"{echo(str(path), 200)}: {msg}")


def _matrix(path: Path, data: dict[str, Any], key: str, integer: bool) -> np.ndarray:
    """``data[key]`` as a N_STATES x N_ACTIONS array of finite numbers (integers >= 0)."""
    rows = data.get(key)
    shape_msg = f"{key!r} must be a {N_STATES}x{N_ACTIONS} table of numbers"
    if not isinstance(rows, list):
        raise _fail(path, shape_msg)
    if len(rows) != N_STATES:
        raise _fail(path, f"{key!r} has {len(rows)} rows, expected {N_STATES} (one per "
                          f"state) of {N_ACTIONS} numbers")
    for i, r in enumerate(rows):
        if not isinstance(r, list) or len(r) != N_ACTIONS:
            what = (f"{len(r)} value{'' if len(r) == 1 else 's'}" if isinstance(r, list)
                    else f"not a list ({type(r).__name__})")
            raise _fail(path, f"{key}[{i}] is {what}, expected {N_ACTIONS} numbers (one per "
                              f"action)")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            where = f"{key}[{i}][{j}]"
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _fail(path, f"{where} is {echo(repr(v), 40)}; {shape_msg}")
            if isinstance(v, float) and not math.isfinite(v):
                raise _fail(path, f"{key!r} holds non-finite values ({where})")
            if integer:
                if isinstance(v, float) and not v.is_integer():
                    raise _fail(path, f"{where} is {v!r}; expected a whole number of visits")
                if not 0 <= v <= MAX_VISITS:
                    raise _fail(path, f"{where} is {echo(repr(v), 40)}; expected a visit count "
                                      f"from 0 to 2**53")
            elif abs(v) > 1e12:
                raise _fail(path, f"{where} is {echo(repr(v), 40)}; expected a Q-value within "
                                  f"+/-1e12")
    return np.asarray(rows, dtype=np.int64 if integer else float)


def read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read and validate a table file: ``(q, visits, metadata)``; :class:`QTableError`."""
    path = Path(path)
    try:
        text = read_text_limited(path, MAX_TABLE_BYTES, what="Q-table file")
    except InputFileError as err:  # missing, not a regular file, too large, not UTF-8
        raise QTableError(str(err)) from None
    try:
        data = loads_json_strict(text)  # duplicate keys are an error, not last-wins
    except json.JSONDecodeError as err:
        raise _fail(path, f"not a valid Q-table: corrupt or truncated JSON ({err.msg} at "
                          f"line {err.lineno})") from None
    except RecursionError:
        raise _fail(path, "not a valid Q-table: JSON nested too deeply") from None
    except ValueError as err:  # a duplicate key, an integer with too many digits
        raise _fail(path, f"not a valid Q-table: {echo(str(err), 60)}") from None
    if not isinstance(data, dict):
        raise _fail(path, "not a valid Q-table: expected a JSON object")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise _fail(path, f"format_version is {echo(repr(version), 40)}; this version of intune "
                          f"reads format_version {FORMAT_VERSION}")
    if data.get("kind") != FILE_KIND:
        raise _fail(path, f"kind is {echo(repr(data.get('kind')), 40)}, expected {FILE_KIND!r}")
    features = [[name, list(values)] for name, values in FEATURES]
    if data.get("features") != features or data.get("actions") != list(ACTIONS):
        raise _fail(path, f"the table's features/actions do not match this agent's (expected "
                          f"features {[f[0] for f in features]} and actions "
                          f"{list(ACTIONS)}); retrain it")
    q = _matrix(path, data, "q", integer=False)
    visits = _matrix(path, data, "visits", integer=True)
    meta = data.get("metadata", {})
    if not isinstance(meta, dict):
        raise _fail(path, "'metadata' must be an object")
    meta = {k: v for k, v in meta.items() if k != "hyperparameters"}
    return q, visits, meta
