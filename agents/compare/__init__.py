"""``intune compare``: every agent on every scenario and seed, in parallel, resumable.

One *run* is one evaluation episode of ``duration_s`` simulated seconds of one agent on
one scenario, from ``env.reset(seed=seed)``. Learning agents learn online during it
(``qlearning`` from its pretrained table, ``qlearning-scratch`` from an empty one), as
InTune is deployed. SB3 agents need a trained model: either ``models_dir`` holds one, or
the run trains one first on the same scenario (budget ``compare_n_timesteps`` of
``agents/hyperparams/sb3.yaml``, 50,000 steps by default) and caches it under
``OUT/models/``; the progress bar shows how far each training has got.

Outputs under ``OUT``:

- ``runs/<scenario>__<agent>__seed<k>.json``: one file per finished run, written
  atomically, carrying the run's fingerprint; a rerun reuses it only if it parses,
  validates and the fingerprint matches (see :mod:`agents.compare.grid`), else it reruns
  the run and says why;
- ``runs.csv``: one row per run of the grid (:data:`RUN_COLUMNS`);
- ``summary.json`` and ``summary.md``: per (scenario, agent) the interquartile mean (IQM)
  of ``final_fraction`` with a 95% percentile-bootstrap confidence interval across seeds
  (seeded generator), the OOM rate, the median ``time_to_90_s``, the memory fraction and
  the throughput ratio to ``autotune`` (:mod:`agents.compare.metrics`; the legend under
  the tables defines every column);
- ``plots/``: learning curves, allocations over time, a summary bar chart
  (:mod:`agents.compare.plots`).

Only one ``compare`` at a time may use an ``OUT`` folder (an ``flock`` on
``OUT/.compare.lock``). Executors (:mod:`agents.compare.executors`): ``local`` (default)
runs a process pool, one worker per core (``jobs=1`` runs in this process); ``ray``
sends runs to an existing Ray cluster (``address``), one CPU each. Results always come
back to this process, which writes them; with Ray, trained models are written by the
workers, so ``OUT`` should be on a filesystem the cluster shares.

The package, in reading order: ``grid`` (runs, fingerprints, resume, lock), ``run`` (one
run), ``executors``, ``metrics``, ``report``, ``plots``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import registry
from agents.base import episode_steps
from agents.compare.executors import run_local, run_ray
from agents.compare.grid import (
    RUN_COLUMNS,
    CompareError,
    RunSpec,
    check_out_dir,
    locked,
    parse_list,
    plan_grid,
    read_run,
    resolve_scenarios,
    run_key,
)
from agents.compare.metrics import bootstrap_ci, episode_metrics, iqm, summarise
from agents.compare.plots import make_plots, plot_files
from agents.compare.report import run_row, write_runs_csv, write_summary
from agents.compare.run import execute_run
from simulators import ScenarioError
from simulators.fileio import echo, write_json_atomic

#: Default agents of ``intune compare``.
DEFAULT_AGENTS: tuple[str, ...] = ("qlearning", "qlearning-scratch", "autotune", "plumber",
                                   "ppo", "a2c", "dqn", "static", "oracle")

#: Bounds of one grid: steps per run (a run file keeps its trace; 100,000 steps of 8
#: stages are ~15 MB, within what a resume reads back), seeds and runs.
MAX_RUN_STEPS = 100_000
MAX_SEEDS = 10_000
MAX_RUNS = 100_000

_SHOWN = 5  # rerun reasons printed one per line; the rest are counted


@dataclass
class CompareResult:
    """What :func:`run_compare` did."""

    out: Path
    total: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # failed on the user's input
    rerun: dict[str, str] = field(default_factory=dict)  # key -> why its file was not reused
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def summary_line(self) -> str:
        """The last line of ``intune compare``: counts and every output written."""
        outs = ", ".join(str(p) + ("/" if p.is_dir() else "") for p in self.outputs)
        return (f"{len(self.ran)} runs done, {len(self.skipped)} reused, "
                f"{len(self.failed)} failed; wrote {outs}")


def run_compare(scenarios: str | Sequence[str], agents: str | Sequence[str],
                seeds: int | Sequence[int], out: str | Path, *, duration_s: float = 1200.0,
                jobs: int | None = None, models_dir: str | Path | None = None,
                sb3_steps: int | None = None, hyperparams_path: str | Path | None = None,
                executor: str = "local", address: str | None = None,
                progress: bool = True, plots: bool = True, trust_model: bool = False,
                log: Callable[[str], None] | None = None) -> CompareResult:
    """Run (or resume) the grid and write runs.csv, summary.{md,json} and plots.

    ``seeds`` is a count ``N`` (seeds ``0..N-1``) or explicit seeds. ``trust_model``
    lets SB3 models from ``models_dir`` that need unpickling load (``--trust-model``).
    Raises :class:`CompareError` or :class:`simulators.ScenarioError` (one line) for a
    user's fault before any run starts; failures inside runs are collected in the result
    (``failed``; those due to the user's input, such as a model that does not fit its
    scenario, in ``refused`` too).
    """
    import math

    if isinstance(out, str) and not out:  # Path("") is the current folder
        raise CompareError("--out: empty path; expected a folder ('.' for the current one)")
    out = Path(out)
    agent_list = parse_list(agents)
    if not agent_list:
        raise CompareError("--agents: no agent given")
    for a in agent_list:
        registry.ensure_available(a)
    if len(set(agent_list)) != len(agent_list):
        raise CompareError(f"--agents: repeated agent in {', '.join(agent_list)}")
    if isinstance(seeds, int) and seeds > MAX_SEEDS:
        raise CompareError(f"--seeds: at most {MAX_SEEDS:,} seeds per grid, got {seeds:,}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise CompareError("--seeds: at least one seed is needed")
    if not (isinstance(duration_s, int | float) and math.isfinite(duration_s)
            and duration_s > 0):
        raise CompareError(f"--duration-s must be a positive finite number, got {duration_s}")
    if executor not in ("local", "ray"):
        raise CompareError(f"--executor: expected 'local' or 'ray', got {executor!r}")
    sc = resolve_scenarios(scenarios)
    for name, data in sc.items():
        # each run's result file keeps its whole trace; past this many steps it would
        # outgrow what a resume reads back (MAX_RUN_BYTES) and be rerun every time
        steps = episode_steps(duration_s, float(data["control_interval_s"]))
        if steps > MAX_RUN_STEPS:
            raise CompareError(
                f"--duration-s {duration_s:g}: scenario {echo(name)!r} steps every "
                f"{data['control_interval_s']:g} s, so a run would be {steps:,} steps; at "
                f"most {MAX_RUN_STEPS:,} steps per run")
    if len(sc) * len(agent_list) * len(seed_list) > MAX_RUNS:
        raise CompareError(f"the grid has {len(sc) * len(agent_list) * len(seed_list):,} "
                           f"runs (scenarios x agents x seeds); at most {MAX_RUNS:,}")
    mdir = Path(models_dir) if models_dir is not None else None
    if mdir is not None and not mdir.is_dir():
        raise CompareError(f"--models {mdir}: no such folder")
    hp = str(hyperparams_path) if hyperparams_path is not None else None
    say = log or (lambda _m: None)
    # planned before OUT is made: a bad hyperparameter or model file leaves no folder
    specs = plan_grid(sc, agent_list, seed_list, out, duration_s, mdir, sb3_steps, hp,
                      trust_model)
    check_out_dir(out, specs, plot_files(list(sc)) if plots else None)
    with locked(out):
        return _run_grid(specs, out, list(sc), agent_list, jobs, executor, address,
                         progress, plots, say)


def _run_grid(specs: list[RunSpec], out: Path, scenarios: list[str], agents: list[str],
              jobs: int | None, executor: str, address: str | None, progress: bool,
              plots: bool, say: Callable[[str], None]) -> CompareResult:
    runs_dir = out / "runs"
    result = CompareResult(out=out, total=len(specs))
    results: dict[str, dict[str, Any]] = {}
    pending = []
    for s in specs:
        res, why = read_run(runs_dir / f"{s.key}.json", s)
        if res is not None:
            result.skipped.append(s.key)
            results[s.key] = res
        else:
            if why != "missing":
                result.rerun[s.key] = why
            pending.append(s)
    say(f"{len(specs)} runs: {len(result.skipped)} reused, {len(pending)} to run"
        + (f" ({len(result.rerun)} rerun: their results do not match)" if result.rerun
           else ""))
    for key, why in list(result.rerun.items())[:_SHOWN]:
        say(f"  rerun {key}: {why}")
    if len(result.rerun) > _SHOWN:
        say(f"  ... and {len(result.rerun) - _SHOWN} more")
    n_train = sum(1 for s in pending if s.train_steps is not None
                  and s.model_path is not None and not Path(s.model_path).exists())
    if n_train:
        say(f"{n_train} runs train an SB3 model first (the bar shows their progress)")

    def done(spec: RunSpec, res: dict[str, Any]) -> None:
        if "_error" in res:
            result.failed[spec.key] = res["_error"]
            if res.get("_user_error"):
                result.refused[spec.key] = res["_error"]
            say(f"run {spec.key} failed: {res['_error']}")
            return
        write_json_atomic(runs_dir / f"{spec.key}.json", res)
        results[spec.key] = res
        result.ran.append(spec.key)

    if pending:
        try:
            if executor == "ray":
                run_ray(pending, done, address, progress)
            else:
                run_local(pending, done, jobs, progress)
        except KeyboardInterrupt:
            say(f"interrupted: {len(result.ran)} finished runs are kept in {runs_dir}; "
                f"rerun the same command to resume")
            raise
    ordered = [results[s.key] for s in specs if s.key in results]
    result.rows = [run_row(r) for r in ordered]
    write_runs_csv(out / "runs.csv", result.rows)
    result.summary = summarise(result.rows, scenarios, agents)
    write_summary(out, result.summary, scenarios, agents, result.rows)
    result.outputs = [out / "runs.csv", out / "summary.md", out / "summary.json"]
    if plots and result.rows:
        say(f"plotting {len(scenarios) * 2 + 1} figures into {out / 'plots'} ...")
        traces = {}
        for r in ordered:
            dt = float(r.get("control_interval_s", 2.0))
            traces[(r["scenario"], r["agent"], int(r["seed"]))] = {
                **r["trace"], "dt": dt,
                "n_steps": episode_steps(float(r.get("duration_s", 0.0)), dt)}
        make_plots(out / "plots", traces, result.summary, scenarios, agents)
        result.outputs.append(out / "plots")
    return result


__all__ = ["DEFAULT_AGENTS", "RUN_COLUMNS", "CompareError", "CompareResult", "RunSpec",
           "ScenarioError", "bootstrap_ci", "episode_metrics", "execute_run", "iqm",
           "run_compare", "run_key", "summarise"]
