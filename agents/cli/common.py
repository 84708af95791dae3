"""Checks every ``intune`` subcommand makes at its boundary, before any long work starts.

Each check either returns a usable value or calls :func:`fail` (one line on stderr, exit 2).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from agents import registry
from intune_env.cli import fail, warn
from simulators import Scenario, ScenarioError, load_scenario
from simulators.fileio import ECHO_CHARS, InputFileError, echo

#: Exceptions that are a user's fault wherever they surface: one line, exit 2.
USER_ERRORS = registry.USER_ERRORS

TRUST_MODEL_HELP = ("also load model files that need unpickling (legacy .pkl statistics, "
                    "pickled objects in an SB3 zip). Unpickling runs any code the file "
                    "holds: only for model files you made or fully trust")


def show_path(path: str | Path) -> str:
    """A path safe to print, capped at its tail (the file name is what tells)."""
    text = echo(str(path), limit=1 << 30)  # escape control characters only
    return text if len(text) <= ECHO_CHARS else "..." + text[-(ECHO_CHARS - 3):]


def trust_model_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--trust-model`` flag (eval, run, compare)."""
    return click.option("--trust-model", is_flag=True, help=TRUST_MODEL_HELP)(f)


def trust_kwargs(trust_model: bool, target: Callable[..., Any],
                 model_path: Path | bool | None = True) -> dict[str, Any]:
    """``{"trust_model": True}`` when the flag is set, else nothing (the safe default).

    Passing the keyword only when asked keeps the default call unchanged; a callee that
    does not know the keyword cannot honour the flag, which must not pass silently.
    ``model_path=None`` (no model to load): the flag has no effect, said in a warning.
    """
    if not trust_model:
        return {}
    if model_path is None:
        warn("--trust-model has no effect without --model")
        return {}
    params = inspect.signature(target).parameters
    if "trust_model" not in params and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        fail(f"--trust-model is not supported by {getattr(target, '__name__', target)} "
             "in this version")
    return {"trust_model": True}


#: Seeds are what numpy and Gymnasium accept: integers in [0, 2**63).
SEED = click.IntRange(0, 2**63 - 1)
#: Longest simulated episode (11.6 days; 500,000 steps at the default 2 s interval):
#: ``--duration-s 1e300`` would otherwise run for ever.
MAX_DURATION_S = 1e6


def finite_positive(value: float, flag: str, high: float = MAX_DURATION_S) -> float:
    """``value`` if it is a finite number in (0, ``high``] (``inf``, ``nan``, ``0`` refused)."""
    if not (math.isfinite(value) and 0 < value <= high):
        fail(f"{flag} must be a finite number > 0 and at most {high:,g}, got {value}")
    return value


def at_least(value: int | None, minimum: int, flag: str) -> None:
    """Refuse an integer option below ``minimum`` (``None``: not given, fine)."""
    if value is not None and value < minimum:
        fail(f"{flag} must be at least {minimum}, got {value}")


def load_scenario_or_fail(spec: str) -> Scenario:
    """The validated scenario ``spec`` (built-in name or YAML file), or one line."""
    try:
        return load_scenario(spec)
    except (ScenarioError, InputFileError) as err:
        fail(str(err))  # names the file and field (and --plugin for an unknown kind)


def warn_late_events(sc: Scenario, duration_s: float) -> None:
    """One stderr line per scenario whose events come after the episode's last interval.

    An event applies from the first interval that starts at or after its ``at_s``; the
    last of the ``n`` steps starts at ``n * dt`` (the reset measured the interval before
    the first), so an event at exactly that time still happens, in the last step."""
    from agents.base import episode_steps

    dt = sc.control_interval_s
    last = episode_steps(duration_s, dt) * dt
    late = [ev.at_s for ev in sc.events if ev.at_s > last]
    if late:
        when = ", ".join(f"{t:g} s" for t in late[:5]) + (" ..." if len(late) > 5 else "")
        warn(f"scenario {echo(sc.name)}: {len(late)} event(s) at {when}, after the start "
             f"of the episode's last interval ({last:g} s); they never happen")


def check_agent(name: str) -> str:
    """``name`` if the agent exists and its modules import, else one line."""
    try:
        registry.ensure_available(name)
    except (registry.UnknownAgentError, registry.AgentUnavailableError) as err:
        fail(str(err))
    return name


def learns(name: str) -> bool:
    """Whether agent ``name`` has learned state (a model file) to load."""
    if name in registry.TRAINABLE:
        return True
    # A plugin agent's factory takes model_path and decides for itself.
    return name in registry.known_agents() and name not in registry.AGENT_NAMES


def check_model(agent_name: str, model_path: Path | None) -> None:
    """Refuse ``--model`` for an agent without learned state, or a model that is missing."""
    if model_path is None:
        return
    if not learns(agent_name):
        fail(f"--model: agent {agent_name!r} does not learn and loads no model; agents "
             f"with a model: {', '.join(registry.TRAINABLE)}")
    if not model_path.exists():
        fail(f"--model {show_path(model_path)}: no such file")
    if model_path.is_dir():
        fail(f"--model {show_path(model_path)}: is a folder; expected a model file")


class OutPath(click.Path):
    """The ``--out`` type of the commands that write a folder (``compare``, ``train``,
    ``scenarios generate``): a path, refused when empty (``Path("")`` is the current
    folder, so ``--out ''`` from an unset variable wrote every output there). The live
    commands write one file and refuse ``''`` as a folder before measuring."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("empty path; expected a folder ('.' for the current one)", param, ctx)
        return super().convert(value, param, ctx)


#: ``type=OUT_PATH`` for ``--out`` options.
OUT_PATH = OutPath()


def writable_dir(path: Path, what: str = "--out") -> Path:
    """Create ``path`` if needed and check a file can be written in it, else one line."""
    shown = show_path(path)
    if path.exists() and not path.is_dir():
        fail(f"{what} {shown}: is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        fail(f"{what} {shown}: output folder is not writable ({err.strerror})")
    return path


@contextlib.contextmanager
def out_dir(path: Path, what: str = "--out") -> Iterator[Path]:
    """:func:`writable_dir` for the body of a command: the folders it created are removed
    again, if still empty, when the command fails (one line, Ctrl-C, an error)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    writable_dir(path, what)
    try:
        yield path
    except BaseException:
        for p in missing:  # innermost first; rmdir leaves any folder with something in it
            try:
                p.rmdir()
            except OSError:
                break
        raise


def writable_file(path: Path, what: str) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written."""
    if path.is_dir():
        fail(f"{what} {show_path(path)}: is a folder; expected a file path")
    writable_dir(path.parent, what)
    return path
