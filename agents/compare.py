"""``intune compare``: every agent on every scenario and seed, in parallel, resumable.

One *run* is one evaluation episode of ``duration_s`` simulated seconds of one agent on
one scenario, from ``env.reset(seed=seed)``. Learning agents learn online during it
(``qlearning`` from its pretrained table, ``qlearning-scratch`` from an empty one), as
InTune is deployed. SB3 agents need a trained model: either ``models_dir`` holds one, or
the run trains one first on the same scenario (budget ``compare_n_timesteps`` of
``agents/hyperparams/sb3.yaml``, 50,000 steps by default, ~30 s per model on one core;
training envs use other noise seeds than the evaluation episode) and caches it under
``OUT/models/`` so a resumed grid never retrains it.

Outputs under ``OUT``:

- ``runs/<scenario>__<agent>__seed<k>.json``: one file per finished run, written
  atomically (temporary file, then ``os.replace``); resuming skips runs whose file exists,
  so an interrupted grid leaves no half-written result;
- ``runs.csv``: one row per run of the grid (:data:`RUN_COLUMNS`);
- ``summary.json`` and ``summary.md``: per (scenario, agent) the interquartile mean (IQM)
  of ``final_fraction`` with a 95% percentile-bootstrap confidence interval across seeds
  (seeded generator), the OOM rate, the median ``time_to_90_s`` and the throughput ratio to
  ``autotune`` (mean final throughput over the same seeds);
- ``plots/``: learning curves per scenario (fraction of the oracle over simulated time,
  mean across seeds with a 95% bootstrap band), allocations over time for the first seed,
  a bar chart of the summary.

Metrics of a run (``throughput / oracle throughput`` per step; after an out-of-memory
crash the job produces nothing, so the remaining steps count as 0):

- ``final_fraction``: mean over the last 20% of the episode; ``mean_fraction``: whole
  episode;
- ``time_to_90_s``: simulated seconds from the start until throughput stays at or above
  0.9 of the oracle to the end (``None``/empty if it never does or the job crashed);
- ``mean_memory_fraction``: mean memory used / capacity over the steps that ran.

Executors: ``local`` (default) runs a ``ProcessPoolExecutor`` with the ``spawn`` start
method, one worker per core (``jobs=1`` runs in this process); ``ray`` sends runs to an
existing Ray cluster (``address``), one CPU each. Results always come back to this
process, which writes them; with Ray, trained models are written by the workers, so
``OUT`` should be on a filesystem the cluster shares (else models are retrained on resume).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents import registry
from simulators import ScenarioError, builtin_scenarios, load_scenario

#: Columns of ``runs.csv``, in order.
RUN_COLUMNS: tuple[str, ...] = (
    "scenario", "agent", "seed", "final_fraction", "mean_fraction", "oom", "time_to_90_s",
    "mean_memory_fraction", "wall_s", "train_wall_s", "steps", "invalid_actions",
    "final_throughput", "mean_throughput",
)

#: Default agents of ``intune compare``.
DEFAULT_AGENTS: tuple[str, ...] = ("qlearning", "qlearning-scratch", "autotune", "plumber",
                                   "ppo", "a2c", "dqn", "static", "oracle")

FINAL_SHARE = 0.2  # the "final" window: last 20% of the episode
TARGET = 0.9  # time_to_90_s threshold
N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 20230918


class CompareError(ValueError):
    """A user's fault in the grid (unknown agent, bad scenario, unwritable folder)."""


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

    @property
    def key(self) -> str:
        return run_key(self.scenario, self.agent, self.seed)


def run_key(scenario: str, agent: str, seed: int) -> str:
    """File stem of a run's result: ``<scenario>__<agent>__seed<k>`` (sanitised)."""
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", s)
    return f"{safe(scenario)}__{safe(agent)}__seed{int(seed)}"


# --- metrics ---------------------------------------------------------------------------
def episode_metrics(time_s: Sequence[float], fraction: Sequence[float],
                    memory_fraction: Sequence[float], throughput: Sequence[float],
                    oom: bool, n_steps: int, dt: float) -> dict[str, Any]:
    """The per-run metrics (see the module docstring) of one traced episode.

    ``n_steps`` is the planned episode length; steps missing after a crash count as 0.
    """
    f = np.nan_to_num(np.asarray(fraction, dtype=float), nan=0.0)
    thr = np.asarray(throughput, dtype=float)
    missing = max(n_steps - len(f), 0)
    f = np.concatenate([f, np.zeros(missing)])
    thr = np.concatenate([thr, np.zeros(missing)])
    tail = max(1, math.ceil(FINAL_SHARE * n_steps))
    t90: float | None = None
    if not oom and len(f):
        below = np.flatnonzero(f < TARGET)
        if len(below) == 0:
            t90 = float(time_s[0]) - dt if len(time_s) else 0.0
        elif below[-1] < len(f) - 1:
            t90 = float(time_s[below[-1]])  # end of the last interval below the target
    return {
        "final_fraction": float(f[-tail:].mean()) if len(f) else 0.0,
        "mean_fraction": float(f.mean()) if len(f) else 0.0,
        "oom": int(bool(oom)),
        "time_to_90_s": t90,
        "mean_memory_fraction": float(np.mean(memory_fraction)) if len(memory_fraction)
        else 0.0,
        "final_throughput": float(thr[-tail:].mean()) if len(thr) else 0.0,
        "mean_throughput": float(thr.mean()) if len(thr) else 0.0,
    }


# --- one run (executes in a worker process) --------------------------------------------
def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Run one (scenario, agent, seed): train the SB3 model first if needed; return the
    result dict (metrics + trace). Runs in a worker process; writes no result file."""
    import intune_env  # noqa: F401  (registers InTune-v0 in a spawned process)
    from agents.base import run_episode

    scenario = load_scenario(spec.scenario_data)
    dt = scenario.control_interval_s
    n_steps = max(1, round(spec.duration_s / dt))
    train_wall = 0.0
    model_path = spec.model_path
    if spec.agent in registry.SB3_AGENTS and model_path is not None \
            and not Path(model_path).exists():
        if spec.train_steps is None:
            raise FileNotFoundError(f"{model_path}: no trained model for {spec.agent}")
        from agents.sb3_agents import train_sb3

        res = train_sb3(registry.SB3_AGENTS[spec.agent], scenario, model_path,
                        seed=spec.seed, n_timesteps=spec.train_steps,
                        hyperparams_path=spec.hyperparams_path, num_threads=1)
        train_wall = res.wall_s
    start = time.perf_counter()
    env = gym.make("InTune-v0", scenario=scenario, max_episode_steps=n_steps)
    if spec.factory is not None:
        agent = spec.factory(env, spec.seed, model_path=model_path)
    else:
        agent = registry.make_agent(spec.agent, env, seed=spec.seed, model_path=model_path)
    cpus: list[int] = []
    oracle_alloc: list[list[int]] = []
    env = _Recorder(env, cpus, oracle_alloc)
    trace = run_episode(env, agent, seed=spec.seed, learn=True)
    wall = time.perf_counter() - start
    metrics = episode_metrics(trace.time_s, trace.fraction, trace.memory_fraction,
                              trace.throughput, trace.oom, n_steps, dt)
    return {
        "scenario": spec.scenario, "agent": spec.agent, "seed": spec.seed, **metrics,
        "wall_s": wall, "train_wall_s": train_wall, "steps": len(trace.time_s),
        "invalid_actions": trace.invalid,
        "duration_s": spec.duration_s, "control_interval_s": dt,
        "trace": {
            "time_s": trace.time_s,
            "fraction": [None if not np.isfinite(x) else float(x) for x in trace.fraction],
            "throughput": trace.throughput,
            "oracle_throughput": [x if math.isfinite(x) else None
                                  for x in trace.oracle_throughput],
            "memory_fraction": trace.memory_fraction,
            "allocation": trace.allocation,
            "cpus_total": cpus,
            "oracle_allocation": oracle_alloc,
            "stage_names": list(scenario.stage_names),
        },
    }


class _Recorder(gym.Wrapper):
    """Keeps the machine size and oracle allocation of every step (for plots)."""

    def __init__(self, env: gym.Env, cpus: list[int], oracle: list[list[int]]) -> None:
        super().__init__(env)
        self._cpus, self._oracle = cpus, oracle

    def step(self, action: Any) -> Any:
        out = self.env.step(action)
        info = out[4]
        self._cpus.append(int(info["cpus_total"]))
        self._oracle.append([int(k) for k in info["oracle_allocation"]])
        return out


def _guarded(spec: RunSpec, pin_threads: bool = True) -> dict[str, Any]:
    """:func:`execute_run` with errors turned into data (and, in a worker, torch pinned
    to one thread: one run per core)."""
    if pin_threads and spec.agent in registry.SB3_AGENTS:
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
    try:
        return execute_run(spec)
    except Exception as err:  # reported per run; the grid goes on
        return {"_error": f"{type(err).__name__}: {err}",
                "_traceback": traceback.format_exc()}


# --- the grid --------------------------------------------------------------------------
@dataclass
class CompareResult:
    """What :func:`run_compare` did."""

    out: Path
    total: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)


def parse_list(text: str | Sequence[str]) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (lists pass through), empty items dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s and s.strip()]


def resolve_scenarios(names: str | Sequence[str]) -> dict[str, dict[str, Any]]:
    """label -> scenario dict for built-in names, files or ``all`` (raises ScenarioError)."""
    items = parse_list(names)
    if not items:
        raise CompareError("--scenarios: no scenario given; use names, YAML files or 'all'")
    if items == ["all"]:
        items = builtin_scenarios()
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        sc = load_scenario(item)
        if sc.name in out and out[sc.name] != sc.to_dict():
            raise CompareError(f"--scenarios: two different scenarios are named {sc.name!r} "
                               f"({item}); give them different 'name' fields")
        out[sc.name] = sc.to_dict()
    return out


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "runs").mkdir(exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out / "runs", prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CompareError(f"{out}: output folder is not writable ({err.strerror})") from None


def _model_for(agent: str, scenario: str, seed: int, out: Path,
               models_dir: Path | None) -> tuple[str, bool]:
    """(model path, whether the run may train it) for an SB3 agent."""
    if models_dir is not None:
        for cand in (models_dir / scenario / agent / f"seed{seed}.zip",
                     models_dir / scenario / f"{agent}.zip",
                     models_dir / f"{agent}.zip"):
            if cand.exists():
                return str(cand), False
        raise CompareError(
            f"--models {models_dir}: no model for {agent} on {scenario} seed {seed} (looked "
            f"for {scenario}/{agent}/seed{seed}.zip, {scenario}/{agent}.zip, {agent}.zip)")
    return str(out / "models" / scenario / agent / f"seed{seed}.zip"), True


def plan_grid(scenarios: dict[str, dict[str, Any]], agents: Sequence[str], seeds: Sequence[int],
              out: Path, duration_s: float, models_dir: Path | None = None,
              sb3_steps: int | None = None,
              hyperparams_path: str | None = None) -> list[RunSpec]:
    """All runs of the grid, in (scenario, agent, seed) order."""
    specs: list[RunSpec] = []
    budgets: dict[str, int] = {}
    for agent in agents:
        if agent in registry.SB3_AGENTS and models_dir is None and sb3_steps is None:
            from agents.sb3_agents import load_hyperparams

            hp = load_hyperparams(registry.SB3_AGENTS[agent], hyperparams_path)
            budgets[agent] = int(hp.get("compare_n_timesteps", hp["n_timesteps"]))
    for sc_name, data in scenarios.items():
        for agent in agents:
            for seed in seeds:
                model, train = None, None
                if agent in registry.SB3_AGENTS:
                    model, may_train = _model_for(agent, sc_name, seed, out, models_dir)
                    if may_train:
                        train = sb3_steps if sb3_steps is not None else budgets[agent]
                specs.append(RunSpec(sc_name, data, agent, int(seed), float(duration_s),
                                     model, train, hyperparams_path,
                                     registry._EXTRA.get(agent)))
    return specs


def run_compare(scenarios: str | Sequence[str], agents: str | Sequence[str],
                seeds: int | Sequence[int], out: str | Path, *, duration_s: float = 1200.0,
                jobs: int | None = None, models_dir: str | Path | None = None,
                sb3_steps: int | None = None, hyperparams_path: str | Path | None = None,
                executor: str = "local", address: str | None = None,
                progress: bool = True, plots: bool = True,
                log: Callable[[str], None] | None = None) -> CompareResult:
    """Run (or resume) the grid and write runs.csv, summary.{md,json} and plots.

    ``seeds`` is a count ``N`` (seeds ``0..N-1``) or explicit seeds. Raises
    :class:`CompareError` or :class:`simulators.ScenarioError` (one line) for a user's
    fault before any run starts; failures inside runs are collected in the result.
    """
    out = Path(out)
    agent_list = parse_list(agents)
    if not agent_list:
        raise CompareError("--agents: no agent given")
    for a in agent_list:
        registry.ensure_available(a)
    if len(set(agent_list)) != len(agent_list):
        raise CompareError(f"--agents: repeated agent in {', '.join(agent_list)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise CompareError("--seeds: at least one seed is needed")
    if not duration_s > 0:
        raise CompareError(f"--duration-s must be positive, got {duration_s}")
    if executor not in ("local", "ray"):
        raise CompareError(f"--executor: expected 'local' or 'ray', got {executor!r}")
    sc = resolve_scenarios(scenarios)
    _check_writable(out)
    mdir = Path(models_dir) if models_dir is not None else None
    if mdir is not None and not mdir.is_dir():
        raise CompareError(f"--models {mdir}: no such folder")
    hp = str(hyperparams_path) if hyperparams_path is not None else None
    specs = plan_grid(sc, agent_list, seed_list, out, duration_s, mdir, sb3_steps, hp)
    runs_dir = out / "runs"
    result = CompareResult(out=out, total=len(specs))
    pending = []
    for s in specs:
        if (runs_dir / f"{s.key}.json").exists():
            result.skipped.append(s.key)
        else:
            pending.append(s)
    say = log or (lambda _m: None)
    say(f"{len(specs)} runs: {len(result.skipped)} already done, {len(pending)} to run")

    def done(spec: RunSpec, res: dict[str, Any]) -> None:
        if "_error" in res:
            result.failed[spec.key] = res["_error"]
            say(f"run {spec.key} failed: {res['_error']}")
            return
        write_json_atomic(runs_dir / f"{spec.key}.json", res)
        result.ran.append(spec.key)

    if pending:
        if executor == "ray":
            _run_ray(pending, done, address, progress)
        else:
            _run_local(pending, done, jobs, progress)
    result.rows = collect_rows(runs_dir, specs)
    write_runs_csv(out / "runs.csv", result.rows)
    traces = load_traces(runs_dir, specs)
    result.summary = summarise(result.rows, list(sc), agent_list)
    write_summary(out, result.summary, list(sc), agent_list, result.rows)
    if plots and result.rows:
        make_plots(out / "plots", traces, result.summary, list(sc), agent_list)
    return result


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", unit="run", disable=not enabled,
                dynamic_ncols=True)


def _run_local(pending: list[RunSpec], done: Callable[[RunSpec, dict[str, Any]], None],
               jobs: int | None, progress: bool) -> None:
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(pending)))
    bar = _progress(len(pending), progress)
    # Runs that train a model go first: they are the long ones.
    order = sorted(pending, key=lambda s: s.train_steps is None)
    if jobs == 1:  # no pool: saves the start-up of a spawned interpreter
        try:
            for s in order:
                done(s, _guarded(s, pin_threads=False))
                bar.update(1)
        finally:
            bar.close()
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures: dict[Future[dict[str, Any]], RunSpec] = {
            pool.submit(_guarded, s): s for s in order}
        remaining = set(futures)
        try:
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(futures[fut], fut.result())
                    bar.update(1)
        except BaseException:  # Ctrl-C: drop queued runs; finished results are on disk
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()


def _run_ray(pending: list[RunSpec], done: Callable[[RunSpec, dict[str, Any]], None],
             address: str | None, progress: bool) -> None:
    try:
        import ray
    except ImportError:
        raise CompareError("--executor ray needs Ray: pip install 'intune[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise CompareError(f"--address {address}: cannot connect to Ray ({err})") from None
    remote = ray.remote(num_cpus=1)(_guarded)
    refs = {remote.remote(s): s for s in pending}
    bar = _progress(len(pending), progress)
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as err:  # a lost worker, not a run's own error
                    res = {"_error": f"ray: {type(err).__name__}: {err}"}
                done(spec, res)
                bar.update(1)
    finally:
        bar.close()


# --- files -----------------------------------------------------------------------------
def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, allow_nan=False, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read_run(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect_rows(runs_dir: Path, specs: Iterable[RunSpec]) -> list[dict[str, Any]]:
    """The finished runs of the grid as ``runs.csv`` rows (trace left out)."""
    rows = []
    for s in specs:
        res = _read_run(runs_dir / f"{s.key}.json")
        if res is not None:
            rows.append({c: res.get(c) for c in RUN_COLUMNS})
    return rows


def load_traces(runs_dir: Path, specs: Iterable[RunSpec]) -> dict[tuple[str, str, int],
                                                               dict[str, Any]]:
    traces = {}
    for s in specs:
        res = _read_run(runs_dir / f"{s.key}.json")
        if res is not None and "trace" in res:
            dt = float(res.get("control_interval_s", 2.0))
            traces[(s.scenario, s.agent, s.seed)] = {
                **res["trace"], "dt": dt,
                "n_steps": max(1, round(float(res.get("duration_s", 0.0)) / dt))}
    return traces


def write_runs_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RUN_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in RUN_COLUMNS})
    write_text_atomic(path, buf.getvalue())


# --- statistics ------------------------------------------------------------------------
def iqm(x: Sequence[float] | np.ndarray, axis: int = -1) -> Any:
    """Interquartile mean: the mean of the middle 50% (scipy's ``trim_mean(x, 0.25)``)."""
    from scipy.stats import trim_mean

    return trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


def bootstrap_ci(x: Sequence[float], stat: Callable[..., Any] = iqm,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``stat`` across seeds (seeded; a point for < 2 seeds)."""
    a = np.asarray(x, dtype=float)
    if len(a) == 0:
        return (math.nan, math.nan)
    if len(a) < 2 or np.all(a == a[0]):
        v = float(stat(a))
        return (v, v)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(a), size=(N_BOOTSTRAP, len(a)))
    stats = stat(a[idx], axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def summarise(rows: list[dict[str, Any]], scenarios: Sequence[str],
              agents: Sequence[str]) -> list[dict[str, Any]]:
    """Per (scenario, agent): IQM and 95% CI of final_fraction, OOM rate, median
    time_to_90_s and throughput ratio to autotune (see the module docstring)."""
    out = []
    for sc in scenarios:
        auto = {r["seed"]: r["final_throughput"] for r in rows
                if r["scenario"] == sc and r["agent"] == "autotune"}
        for ag in agents:
            rs = [r for r in rows if r["scenario"] == sc and r["agent"] == ag]
            if not rs:
                continue
            ff = [float(r["final_fraction"]) for r in rs]
            lo, hi = bootstrap_ci(ff)
            t90 = [math.inf if r["time_to_90_s"] is None else float(r["time_to_90_s"])
                   for r in rs]
            med = float(np.median(t90))
            common = [r for r in rs if r["seed"] in auto]
            ratio = None
            den = sum(auto[r["seed"]] for r in common)
            if common and den > 0:
                ratio = sum(float(r["final_throughput"]) for r in common) / den
            out.append({
                "scenario": sc, "agent": ag, "n_seeds": len(rs),
                "final_fraction_iqm": float(iqm(ff)), "final_fraction_ci95": [lo, hi],
                "mean_fraction_iqm": float(iqm([float(r["mean_fraction"]) for r in rs])),
                "oom_rate": float(np.mean([int(r["oom"]) for r in rs])),
                "median_time_to_90_s": None if math.isinf(med) else med,
                "reached_90": int(sum(not math.isinf(t) for t in t90)),
                "mean_memory_fraction": float(np.mean([float(r["mean_memory_fraction"])
                                                       for r in rs])),
                "throughput_ratio_to_autotune": ratio,
            })
    return out


def write_summary(out: Path, summary: list[dict[str, Any]], scenarios: Sequence[str],
                  agents: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """``summary.json`` and ``summary.md`` (atomically)."""
    meta = {"metric": "final_fraction = mean throughput/oracle over the last 20% of the "
                      "episode", "statistic": "interquartile mean across seeds",
            "ci": f"95% percentile bootstrap, {N_BOOTSTRAP} resamples, seed {BOOTSTRAP_SEED}",
            "ratio_to_autotune": "mean final throughput / autotune's, same seeds"}
    write_json_atomic(out / "summary.json", {"scenarios": list(scenarios),
                                             "agents": list(agents), "n_runs": len(rows),
                                             "about": meta, "rows": summary})
    lines = ["# intune compare: summary", "",
             f"{len(rows)} runs. final fraction = throughput / oracle over the last 20% of "
             "each episode; IQM across seeds with a 95% bootstrap CI; t90 = median simulated "
             "seconds until throughput stays >= 0.9 of the oracle; x autotune = final "
             "throughput relative to AUTOTUNE on the same seeds ('-': AUTOTUNE was not run "
             "or produced nothing, e.g. it ran out of memory).", ""]
    for sc in scenarios:
        srows = [s for s in summary if s["scenario"] == sc]
        if not srows:
            continue
        lines += [f"## {sc}", "",
                  "| agent | seeds | final fraction (IQM) | 95% CI | OOM rate | t90 (s) "
                  "| memory | x autotune |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for s in srows:
            lo, hi = s["final_fraction_ci95"]
            t90 = "never" if s["median_time_to_90_s"] is None \
                else f"{s['median_time_to_90_s']:.0f}"
            ratio = "-" if s["throughput_ratio_to_autotune"] is None \
                else f"{s['throughput_ratio_to_autotune']:.2f}"
            lines.append(f"| {s['agent']} | {s['n_seeds']} | {s['final_fraction_iqm']:.3f} | "
                         f"[{lo:.3f}, {hi:.3f}] | {s['oom_rate']:.2f} | {t90} | "
                         f"{s['mean_memory_fraction']:.2f} | {ratio} |")
        lines.append("")
    write_text_atomic(out / "summary.md", "\n".join(lines))


# --- plots -----------------------------------------------------------------------------
def _save_fig(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def make_plots(plot_dir: Path, traces: dict[tuple[str, str, int], dict[str, Any]],
               summary: list[dict[str, Any]], scenarios: Sequence[str],
               agents: Sequence[str]) -> list[Path]:
    """Learning curves and allocations per scenario, and a summary bar chart (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(agents)}
    for sc in scenarios:
        present = [a for a in agents if any(k[0] == sc and k[1] == a for k in traces)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for ag in present:
            runs = [v for k, v in sorted(traces.items()) if k[0] == sc and k[1] == ag]
            n = max(max(r["n_steps"], len(r["fraction"])) for r in runs)
            dt = runs[0]["dt"]
            t0 = runs[0]["time_s"][0] if runs[0]["time_s"] else dt
            t = t0 + dt * np.arange(n)
            m = np.zeros((len(runs), n))  # after a crash the job produces nothing: 0
            for i, r in enumerate(runs):
                f = np.array([0.0 if x is None else x for x in r["fraction"]])
                m[i, :len(f)] = f
            m = _smooth(m, 10)
            mean = m.mean(axis=0)
            ax.plot(t, mean, label=ag, color=colours[ag], lw=1.4)
            if len(runs) > 1:
                rng = np.random.default_rng(BOOTSTRAP_SEED)
                idx = rng.integers(0, len(runs), size=(500, len(runs)))
                boots = m[idx].mean(axis=1)
                lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
                ax.fill_between(t, lo, hi, color=colours[ag], alpha=0.2, lw=0)
        ax.axhline(TARGET, color="grey", ls=":", lw=1)
        ax.set(xlabel="simulated time (s)", ylabel="throughput / oracle",
               title=f"{sc}: fraction of the oracle (mean over seeds, 95% CI)",
               ylim=(-0.03, 1.1))
        ax.legend(loc="lower right", fontsize=8, ncol=2)
        path = plot_dir / f"learning_{_safe(sc)}.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(len(present), 1, figsize=(9, 1.9 * len(present) + 0.6),
                                 sharex=True, squeeze=False)
        for ax, ag in zip(axes[:, 0], present, strict=True):
            first = min(k[2] for k in traces if k[0] == sc and k[1] == ag)
            r = traces[(sc, ag, first)]
            alloc = np.array(r["allocation"], dtype=float)
            if alloc.size:
                ax.stackplot(r["time_s"], alloc.T, labels=r["stage_names"], alpha=0.85)
                if r.get("cpus_total"):
                    ax.plot(r["time_s"], r["cpus_total"], color="k", lw=1, label="machine")
                if r.get("oracle_allocation"):
                    ax.plot(r["time_s"], np.sum(r["oracle_allocation"], axis=1), color="k",
                            ls="--", lw=1, label="oracle total")
            ax.set_ylabel("CPUs")
            ax.set_title(f"{ag} (seed {first})", fontsize=9, loc="left")
        axes[0, 0].legend(loc="upper right", fontsize=7, ncol=4)
        axes[-1, 0].set_xlabel("simulated time (s)")
        fig.suptitle(f"{sc}: CPUs per stage over time")
        path = plot_dir / f"allocation_{_safe(sc)}.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)

    if summary:
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * len(scenarios) * len(agents)
                                                      + 2.0)), 4.5))
        width = 0.8 / max(1, len(agents))
        for j, ag in enumerate(agents):
            xs, ys, err = [], [], [[], []]
            for i, sc in enumerate(scenarios):
                s = next((s for s in summary if s["scenario"] == sc and s["agent"] == ag), None)
                if s is None:
                    continue
                xs.append(i + (j - (len(agents) - 1) / 2) * width)
                ys.append(s["final_fraction_iqm"])
                lo, hi = s["final_fraction_ci95"]
                err[0].append(max(0.0, ys[-1] - lo))
                err[1].append(max(0.0, hi - ys[-1]))
                if s["oom_rate"] > 0:
                    ax.text(xs[-1], ys[-1] + 0.02, f"OOM {s['oom_rate']:.0%}", rotation=90,
                            ha="center", va="bottom", fontsize=7)
            if xs:
                ax.bar(xs, ys, width, yerr=err, label=ag, color=colours[ag], capsize=2)
        ax.set_xticks(range(len(scenarios)), list(scenarios), rotation=20, ha="right")
        ax.set(ylabel="final fraction of oracle (IQM, 95% CI)", ylim=(0, 1.25))
        ax.legend(fontsize=8, ncol=min(len(agents), 6), loc="upper center",
                  bbox_to_anchor=(0.5, 1.16), frameon=False)
        path = plot_dir / "summary.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _smooth(m: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average over ``w`` steps (per row)."""
    if m.shape[1] < 2 or w <= 1:
        return m
    c = np.cumsum(np.pad(m, ((0, 0), (1, 0))), axis=1)
    out = np.empty_like(m)
    for j in range(m.shape[1]):
        lo = max(0, j + 1 - w)
        out[:, j] = (c[:, j + 1] - c[:, lo]) / (j + 1 - lo)
    return out


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", s)


__all__ = ["DEFAULT_AGENTS", "RUN_COLUMNS", "CompareError", "CompareResult", "RunSpec",
           "ScenarioError", "bootstrap_ci", "episode_metrics", "execute_run", "iqm",
           "run_compare", "summarise"]
