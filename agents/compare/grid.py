"""The grid of runs: what one run is, its fingerprint, planning, and honest resumes.

A run is keyed twice:

- its *key* ``<scenario>__<agent>__seed<k>`` names its result file
  ``OUT/runs/<key>.json`` (a readable, stable name; names that are not safe file names
  are sanitised and given a short hash so two names never share a file);
- its *fingerprint* is a hash of everything that determines the result: the validated
  scenario content, the duration, the agent and its options (a registered factory's
  import path, a given model's bytes, the pretrained Q-table's bytes), the seed, the
  SB3 budget and hyperparameters, the package version, the package's own source
  (:func:`source_digest`) and the source of every loaded plugin. A result file is
  reused only if it parses, validates and carries the same fingerprint; otherwise the
  run is rerun and the reason is said.

SB3 models a run trains are cached under ``OUT/models/<scenario>/<agent>/`` in a file
named by the fingerprint of their training inputs, so a changed budget or scenario
trains a new model rather than reusing a stale one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import registry
from agents.base import episode_steps
from agents.compare.metrics import episode_metrics
from agents.plugins import plugins_digest
from agents.sb3_files import echo_path
from simulators import builtin_scenarios, load_scenario
from simulators.fileio import (
    InputFileError,
    contained,
    echo,
    loads_json_strict,
    read_text_limited,
    refuse_folders,
)
from simulators.generate import expand_suite
from simulators.scenario import MAX_CPUS

#: Version of the run-file layout; part of every fingerprint.
RUN_FORMAT = 2
#: Cap on a run result file read back (a 2400 s trace is ~200 KB).
MAX_RUN_BYTES = 64 << 20

#: Columns of ``runs.csv``, in order.
RUN_COLUMNS: tuple[str, ...] = (
    "scenario", "agent", "seed", "final_fraction", "mean_fraction", "oom", "time_to_90_s",
    "mean_memory_fraction", "wall_s", "train_wall_s", "steps", "invalid_actions",
    "final_throughput", "mean_throughput",
)
_NUMERIC = ("final_fraction", "mean_fraction", "mean_memory_fraction", "wall_s",
            "train_wall_s", "final_throughput", "mean_throughput")


class CompareError(ValueError):
    """A user's fault in the grid (unknown agent, bad scenario, unwritable folder)."""


def package_version() -> str:
    """The installed intune version (part of every fingerprint)."""
    try:
        from importlib.metadata import version

        return version("intune")
    except Exception:  # not installed: a source checkout
        return "unknown"


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker process needs for one run (picklable)."""

    scenario: str  # label (the scenario's name)
    scenario_data: dict[str, Any]  # the validated scenario as a plain dict
    agent: str
    seed: int
    duration_s: float
    model_path: str | None = None  # SB3: model to load, or where to cache a trained one
    train_steps: int | None = None  # SB3: train first if model_path does not exist
    hyperparams_path: str | None = None
    factory: Callable[..., Any] | None = None  # agents registered at run time
    fingerprint: str = ""
    trust_model: bool = False

    @property
    def key(self) -> str:
        return run_key(self.scenario, self.agent, self.seed)


def _safe(s: str, limit: int = 64) -> str:
    """A file-name-safe form of ``s``; a short hash is added when it had to change."""
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", s)[:limit].lstrip(".") or "_"
    if clean != s:
        clean += "-" + hashlib.sha256(s.encode()).hexdigest()[:8]
    return clean


def run_key(scenario: str, agent: str, seed: int) -> str:
    """File stem of a run's result: ``<scenario>__<agent>__seed<k>`` (sanitised)."""
    return f"{_safe(scenario)}__{_safe(agent)}__seed{int(seed)}"


def fingerprint(payload: dict[str, Any]) -> str:
    """SHA-256 of canonical JSON (sorted keys): equal inputs, equal fingerprints."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pretrained_digest() -> str:
    """Digest of the pretrained Q-table ``qlearning`` starts from (regenerated tables
    change results without changing the package version)."""
    path = Path(__file__).resolve().parents[1] / "pretrained" / "qtable.json"
    return _file_digest(path) if path.exists() else "-"


#: The package's own source, whose code decides every run's result.
RUN_SOURCE = ("agents", "intune_env", "simulators")
#: What an SB3 model's training depends on: the env, the simulator and the SB3 wrapper
#: (not the comparison's reports or other agents, so editing those keeps cached models).
TRAIN_SOURCE = ("intune_env", "simulators", "agents/sb3_agents.py")


@functools.cache
def source_digest(parts: tuple[str, ...] = RUN_SOURCE, root: Path | None = None) -> str:
    """Digest of the package's own source: every ``.py`` and scenario file under
    ``parts`` (folders or files relative to ``root``, the checkout or install holding
    the packages). The agents' and the simulator's code decides every result, and a
    change to it need not change the package version: without it a rerun reused
    results of the previous code for agents without a table file. Byte caches
    (``__pycache__``) do not count."""
    base = Path(__file__).resolve().parents[2] if root is None else root
    h = hashlib.sha256()
    for part in parts:
        top = base / part
        paths = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in paths:
            if path.suffix in (".py", ".yaml", ".yml") and path.is_file():
                h.update(path.relative_to(base).as_posix().encode() + b"\0")
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _model_digest(zpath: Path) -> str:
    """Digest of a given model: the zip and the sidecars next to it (checked first, see
    :func:`_check_model`)."""
    from agents.sb3_files import model_paths

    parts = []
    for p in model_paths(zpath):
        parts.append(_file_digest(p) if p.exists() else "-")
    return ":".join(parts)


class _Layout:
    """The observation and action spaces of an env of ``scenario``: what
    ``check_model_fits`` reads of an env, without building a simulator."""

    def __init__(self, scenario: Any) -> None:
        from intune_env import common

        n = len(scenario.stages)
        self.scenario = scenario
        self.observation_space = common.observation_space(n)
        self.action_space = common.action_space(n)
        self.unwrapped = self


def _check_model(zpath: Path, agent: str, scenario: dict[str, Any], trust_model: bool) -> None:
    """Check a model given with ``--models`` for ``agent`` on ``scenario`` as loading it
    for a run does (:func:`agents.sb3_agents.read_model_files` and its observation
    statistics), so a bad file is the user's fault found before any run and before
    ``--out`` exists, not a run refused after the grid. The policy itself is not built:
    torch work here would start OpenMP threads in this process, which then forks the
    workers."""
    from agents.sb3_agents import model_obs_stats, read_model_files
    from agents.sb3_files import ModelFileError

    env = _Layout(load_scenario(scenario))
    try:
        _, _, meta, _, _ = read_model_files(zpath, registry.SB3_AGENTS[agent],
                                            trust_model=trust_model, env=env)
        model_obs_stats(zpath, meta, trust_model, int(env.observation_space.shape[0]))
    except ModelFileError as err:
        raise CompareError(f"--models: {err}") from None


def parse_list(text: str | Sequence[str]) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (lists pass through), empty items dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s and s.strip()]


def resolve_scenarios(names: str | Sequence[str]) -> dict[str, dict[str, Any]]:
    """label -> scenario dict for built-in names, files, suites (``suite:test``) or ``all``
    (raises ScenarioError)."""
    items = parse_list(names)
    if not items:
        raise CompareError("--scenarios: no scenario given; use names, YAML files or 'all'")
    if items == ["all"]:
        items = builtin_scenarios()
    # a named suite (``suite:test``) stands for its members (``suite:test:0017`` ...)
    items = [m for item in items for m in (expand_suite(item) or [item])]
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        sc = load_scenario(item)
        if sc.name in out and out[sc.name] != sc.to_dict():
            raise CompareError(f"--scenarios: two different scenarios are named "
                               f"{echo(sc.name)!r} ({echo(item)}); give them different "
                               f"'name' fields")
        out[sc.name] = sc.to_dict()
    return out


def _model_for(agent: str, scenario: str, seed: int, out: Path,
               models_dir: Path | None, train_fp: str) -> tuple[str, bool]:
    """(model path, whether the run may train it) for an SB3 agent.

    Every path built from a scenario or agent name goes through ``fileio.contained``: a
    name like ``../../x`` can neither write outside ``--out`` nor read outside ``--models``.
    """
    try:
        if models_dir is not None:
            rels = [(_safe(scenario), _safe(agent), f"seed{seed}.zip"),
                    (_safe(scenario), f"{_safe(agent)}.zip"), (f"{_safe(agent)}.zip",)]
            for rel in rels:
                cand = contained(models_dir, *rel)
                if cand.exists():
                    return str(cand), False
            raise CompareError(
                f"--models {echo_path(models_dir)}: no model for {echo(agent)} on "
                f"{echo(scenario)} seed {seed} (looked for "
                f"{', '.join('/'.join(r) for r in rels)})")
        path = contained(out, "models", _safe(scenario), _safe(agent),
                         f"seed{seed}-{train_fp[:16]}.zip")
    except ValueError as err:
        if isinstance(err, CompareError):
            raise
        raise CompareError(str(err)) from None
    return str(path), True


def plan_grid(scenarios: dict[str, dict[str, Any]], agents: Sequence[str], seeds: Sequence[int],
              out: Path, duration_s: float, models_dir: Path | None = None,
              sb3_steps: int | None = None, hyperparams_path: str | None = None,
              trust_model: bool = False) -> list[RunSpec]:
    """All runs of the grid, in (scenario, agent, seed) order, each with its fingerprint."""
    plugin_code = plugins_digest()
    specs: list[RunSpec] = []
    budgets: dict[str, int] = {}
    hparams: dict[str, dict[str, Any]] = {}
    checked: set[tuple[str, str]] = set()
    version = package_version()
    code = source_digest()
    for agent in agents:
        if agent in registry.SB3_AGENTS:
            from agents.sb3_agents import load_hyperparams

            hp = load_hyperparams(registry.SB3_AGENTS[agent], hyperparams_path)
            hparams[agent] = hp
            budgets[agent] = int(hp.get("compare_n_timesteps", hp["n_timesteps"]))
    for sc_name, data in scenarios.items():
        for agent in agents:
            factory = registry._EXTRA.get(agent)
            agent_id: dict[str, Any] = {"name": agent}
            if agent == "qlearning":  # starts from the shipped table: its content counts
                agent_id["table"] = _pretrained_digest()
            if factory is not None:
                agent_id["factory"] = f"{getattr(factory, '__module__', '?')}." \
                                      f"{getattr(factory, '__qualname__', repr(factory))}"
            for seed in seeds:
                model, train = None, None
                if agent in registry.SB3_AGENTS:
                    budget = sb3_steps if sb3_steps is not None else budgets[agent]
                    train_in = {"scenario": data, "agent": agent, "seed": seed,
                                "steps": budget, "hyperparams": hparams[agent],
                                "version": version, "code": source_digest(TRAIN_SOURCE),
                                "format": RUN_FORMAT}
                    if plugin_code:
                        train_in["plugins"] = plugin_code
                    train_fp = fingerprint(train_in)
                    model, may_train = _model_for(agent, sc_name, seed, out, models_dir,
                                                  train_fp)
                    if may_train:
                        train = budget
                        agent_id = {**agent_id, "train_steps": budget,
                                    "hyperparams": hparams[agent]}
                    else:
                        if (model, sc_name) not in checked:  # seeds may share a model
                            _check_model(Path(model), agent, data, trust_model)
                            checked.add((model, sc_name))
                        agent_id = {**agent_id, "model": _model_digest(Path(model))}
                payload = {"format": RUN_FORMAT, "version": version, "code": code,
                           "scenario": data,
                           "duration_s": float(duration_s), "agent": agent_id,
                           "seed": int(seed)}
                if plugin_code:  # only with plugins, so other fingerprints stay as they were
                    payload["plugins"] = plugin_code
                fp = fingerprint(payload)
                specs.append(RunSpec(sc_name, data, agent, int(seed), float(duration_s),
                                     model, train, hyperparams_path, factory, fp,
                                     trust_model))
    return specs


# --- run files ------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Relative slack on values a run file must reproduce (its float arithmetic is exact
#: after a JSON round trip; this only keeps a platform's last bit from causing a rerun).
_REL = 1e-9


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL, abs_tol=1e-12)


def validate_run(res: Any, spec: RunSpec) -> str | None:
    """Why ``res`` (a parsed run file) cannot be reused for ``spec``, or ``None``."""
    if not isinstance(res, dict):
        return f"not a JSON object ({type(res).__name__})"
    if res.get("fingerprint") != spec.fingerprint:
        changed = [k for k, v in (("duration_s", spec.duration_s), ("seed", spec.seed),
                                  ("agent", spec.agent), ("scenario", spec.scenario))
                   if res.get(k) != v]
        what = ", ".join(changed) if changed else "scenario content, agent options, plugin " \
                                                  "code, budget or package version"
        return f"settings changed ({what})"
    # A matching fingerprint says the inputs were the same, not that the file is intact:
    # every field the reports read is checked, so an edited or damaged file is rerun
    # (with the reason) instead of crashing the report or skewing it.
    for k, v in (("scenario", spec.scenario), ("agent", spec.agent), ("seed", spec.seed),
                 ("duration_s", spec.duration_s)):
        if res.get(k) != v or type(res.get(k)) is bool:
            return f"field {k!r} is {_short(res.get(k))}, expected {_short(v)}"
    for k in (*_NUMERIC, "steps", "invalid_actions", "control_interval_s"):
        if not _is_num(res.get(k)):
            return f"field {k!r} missing or not a finite number"
    # The interval and the duration size every array and loop of the reports (the
    # plots' steps are duration / interval): only the value this run is computed with
    # now is reused (0 divided by zero; 1e-6 allocated all memory).
    dt = float(spec.scenario_data["control_interval_s"])
    if res["control_interval_s"] != dt:
        return f"field 'control_interval_s' is {_short(res['control_interval_s'])}, " \
               f"expected {dt:g} (the scenario's)"
    n_steps = episode_steps(spec.duration_s, dt)
    if res.get("oom") not in (0, 1) or type(res.get("oom")) is bool:
        return "field 'oom' must be 0 or 1"
    steps = res["steps"]
    # an episode runs its planned steps; only running out of memory ends one early
    if not (_is_int(steps) and 1 <= steps <= n_steps and (res["oom"] or steps == n_steps)):
        return f"field 'steps' is {_short(steps)}, expected " + (
            f"an integer from 1 to {n_steps}" if res["oom"] else f"{n_steps} (no OOM)")
    if not (_is_int(res["invalid_actions"]) and 0 <= res["invalid_actions"] <= steps):
        return f"field 'invalid_actions' must be an integer from 0 to {steps}"
    # The GPU consumes at most gpu_rate samples/s (no event changes it): no throughput,
    # the oracle's included, can exceed it.
    top = float(spec.scenario_data["machine"]["gpu_rate"]) * (1 + _REL)
    for k in ("final_throughput", "mean_throughput"):
        if not 0 <= res[k] <= top:
            return f"field {k!r} is {_short(res[k])}, expected 0 to the scenario's " \
                   f"gpu_rate ({top:g})"
    # (fractions have no fixed upper bound: buffers drained after a rate drop beat the
    # oracle of the new rate many times over; they are checked against the trace below)
    for k in ("final_fraction", "mean_fraction", "mean_memory_fraction", "wall_s",
              "train_wall_s"):
        if res[k] < 0:
            return f"field {k!r} is {_short(res[k])}, expected >= 0"
    t90 = res.get("time_to_90_s")
    if t90 is not None and not _is_num(t90):
        return "field 'time_to_90_s' must be a number or null"
    names = [s["name"] for s in spec.scenario_data["stages"]]
    # (a reset runs one interval before the first action: the last step ends there)
    end_s = (n_steps + 1) * dt * (1 + _REL)
    why = _trace_fault(res.get("trace"), steps, names, top, end_s)
    if why:
        return f"field 'trace' {why}"
    return _metrics_fault(res, n_steps, dt)


def _short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, str | int | float | None) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _trace_fault(trace: Any, steps: int, names: list[str], top: float,
                 end_s: float) -> str | None:
    """What is wrong with a run file's ``trace`` (``steps`` entries per series, the
    scenario's stage ``names``, throughputs up to ``top``, times up to ``end_s``), or
    None."""
    if not isinstance(trace, dict):
        return "missing or not an object"
    if trace.get("stage_names") != names:
        return f"'stage_names' must be the scenario's stages ({', '.join(names)})"
    for k in ("time_s", "fraction", "throughput", "oracle_throughput", "memory_fraction",
              "allocation", "cpus_total", "oracle_allocation"):
        series = trace.get(k)
        if not isinstance(series, list) or len(series) != steps:
            return f"{k!r} must be a list of {steps} entries (one per step)"
    for k in ("time_s", "throughput", "memory_fraction"):
        if not all(_is_num(x) and x >= 0 for x in trace[k]):
            return f"{k!r} must hold finite numbers >= 0"
    t = trace["time_s"]
    if any(b <= a for a, b in itertools.pairwise(t)) or t[-1] > end_s:
        return f"'time_s' must increase step by step, up to the episode's end ({end_s:g} s)"
    thr, orc = trace["throughput"], trace["oracle_throughput"]
    if max(thr) > top:
        return f"'throughput' must be at most the scenario's gpu_rate ({top:g})"
    if not all(x is None or (_is_num(x) and 0 <= x <= top) for x in orc):
        return f"'oracle_throughput' must hold numbers from 0 to the scenario's gpu_rate " \
               f"({top:g}) or null"
    # each fraction is that step's throughput over the oracle's (null: no oracle)
    for i, (f, x, o) in enumerate(zip(trace["fraction"], thr, orc, strict=True)):
        if (f is not None or (o is not None and o > 0)) and not (
                o is not None and o > 0 and _is_num(f) and _close(f, x / o)):
            return f"'fraction' at step {i} must be 'throughput' / 'oracle_throughput' " \
                   f"of that step"
    if not all(_is_int(x) and 1 <= x <= MAX_CPUS for x in trace["cpus_total"]):
        return f"'cpus_total' must hold CPU counts from 1 to {MAX_CPUS}"
    for k in ("allocation", "oracle_allocation"):
        if not all(isinstance(a, list) and len(a) == len(names)
                   and all(_is_int(c) and 0 <= c <= MAX_CPUS for c in a) for a in trace[k]):
            return f"{k!r} must hold one CPU count (0 to {MAX_CPUS}) per stage " \
                   f"({len(names)}) per step"
    return None


def _metrics_fault(res: dict[str, Any], n_steps: int, dt: float) -> str | None:
    """Which metric of ``res`` is not what its (checked) trace gives, or None."""
    tr = res["trace"]
    frac = [math.nan if x is None else x for x in tr["fraction"]]
    want = episode_metrics(tr["time_s"], frac, tr["memory_fraction"], tr["throughput"],
                           bool(res["oom"]), n_steps, dt)
    for k, v in want.items():
        got = res.get(k)
        same = got is None if v is None else _is_num(got) and _close(got, v)
        if not same:
            shown = "null" if v is None else f"{v:.6g}"
            return f"field {k!r} is {_short(got)}, but its trace gives {shown}"
    return None


def read_run(path: Path, spec: RunSpec) -> tuple[dict[str, Any] | None, str]:
    """(result, "") if ``path`` holds a valid result of ``spec``; else (None, why)."""
    if not path.exists():
        return None, "missing"
    try:
        res = loads_json_strict(read_text_limited(path, MAX_RUN_BYTES, "run result"))
    except InputFileError as err:
        return None, str(err)
    except (ValueError, RecursionError):  # syntax, duplicate key, huge integer, nesting
        return None, "result file does not parse (truncated or corrupted)"
    why = validate_run(res, spec)
    return (None, why) if why else (res, "")


# --- the output folder ----------------------------------------------------------------
def check_out_dir(out: Path, specs: Sequence[RunSpec] = (),
                  plot_files: Sequence[str] | None = None) -> None:
    """Create ``out`` and ``out/runs``; one line if it is a file, not writable, or holds
    something else where compare writes later (a file where a folder goes, a folder
    where a file goes): the reports and plots are written after every run, so that
    would fail only once the grid is done. ``specs``: the runs (their result files and
    SB3 models); ``plot_files``: names under ``out/plots`` (``None``: no plots)."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {echo_path(out)}: is a file; expected a folder (it is "
                           f"created if missing)")
    folders = {out / "runs": "run results"}
    if plot_files is not None:
        folders[out / "plots"] = "plots"
    if any(s.train_steps is not None for s in specs):
        folders[out / "models"] = "trained SB3 models"
    for path, what in folders.items():
        if path.exists() and not path.is_dir():
            raise CompareError(f"--out {echo_path(out)}: {echo_path(path)} is a file; "
                               f"expected a folder (compare writes its {what} there)")
    files = [out / name for name in ("runs.csv", "summary.md", "summary.json",
                                     ".compare.lock")]
    files += [out / "runs" / f"{s.key}.json" for s in specs]
    files += [out / "plots" / name for name in plot_files or ()]
    try:
        refuse_folders(files)
    except IsADirectoryError as err:
        raise CompareError(f"--out {echo_path(out)}: {echo_path(err.filename)} is a folder; "
                           f"expected a file (compare writes it)") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "runs").mkdir(exist_ok=True)
        probe = out / "runs" / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CompareError(f"--out {echo_path(out)}: output folder is not writable "
                           f"({err.strerror})") from None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``OUT/.compare.lock`` (refused if another compare
    holds it). The kernel drops the lock when the holder dies, however it dies."""
    path = out / ".compare.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CompareError(f"--out {echo_path(out)}: another intune compare (pid "
                               f"{echo(holder, 12)}) is running on this folder; wait for "
                               f"it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
