"""``intune compare``: every agent on every scenario and seed, with tables and plots."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from agents.cli.common import (
    OUT_PATH,
    USER_ERRORS,
    at_least,
    fail,
    finite_positive,
    show_path,
    trust_kwargs,
    trust_model_option,
    warn_late_events,
)
from agents.compare import DEFAULT_AGENTS, CompareError, run_compare
from simulators import ScenarioError, builtin_scenarios, load_scenario
from simulators.fileio import InputFileError


def _warn_late(scenarios: str, duration_s: float) -> None:
    """Warn about events after the episode's end; run_compare reports unloadable names."""
    specs = [s.strip() for s in scenarios.split(",")]
    for spec in filter(None, builtin_scenarios() if specs == ["all"] else specs):
        with contextlib.suppress(ScenarioError, InputFileError):  # run_compare refuses it
            warn_late_events(load_scenario(spec), duration_s)


@click.command("compare")
@click.option("--scenarios", default="all", show_default=True,
              help="comma-separated built-in names and/or YAML files, or 'all'")
@click.option("--agents", default=",".join(DEFAULT_AGENTS), show_default=True,
              help="comma-separated agent names (`intune agents` lists them)")
@click.option("--seeds", type=int, default=5, show_default=True,
              help="number of seeds (0..N-1)")
@click.option("--out", "out_dir", required=True, type=OUT_PATH,
              help="output folder; rerunning with the same folder resumes the grid")
@click.option("--duration-s", type=float, default=1200.0, show_default=True,
              help="simulated seconds per evaluation episode")
@click.option("--jobs", type=int, default=None, help="parallel processes (default: one per core)")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="trained SB3 models (SCENARIO/AGENT/seedK.zip, SCENARIO/AGENT.zip or "
                   "AGENT.zip); default: train one per (scenario, seed) and cache it in OUT")
@trust_model_option
@click.option("--sb3-steps", type=int, default=None,
              help="training budget per SB3 model (default: compare_n_timesteps of the YAML)")
@click.option("--hyperparams", type=click.Path(path_type=Path), default=None,
              help="SB3 hyperparameter YAML")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True)
@click.option("--address", default=None, help="Ray cluster address (with --executor ray)")
@click.option("--plots/--no-plots", default=True, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def compare(scenarios: str, agents: str, seeds: int, out_dir: Path, duration_s: float,
            jobs: int | None, models_dir: Path | None, trust_model: bool,
            sb3_steps: int | None, hyperparams: Path | None, executor: str,
            address: str | None, plots: bool, progress: bool) -> None:
    """Run every agent on every scenario and seed; write runs.csv, summary, plots.

    SB3 agents without --models are trained first, one model per (scenario, seed), with
    compare_n_timesteps (50,000 steps, ~15-50 s per model on one core) and cached in OUT.
    """
    at_least(seeds, 1, "--seeds")
    at_least(jobs, 1, "--jobs")
    cores = os.cpu_count() or 1
    if executor == "local" and jobs is not None and jobs > 4 * cores:  # processes here
        fail(f"--jobs {jobs}: this machine has {cores} cores; expected at most {4 * cores}")
    at_least(sb3_steps, 1, "--sb3-steps")
    finite_positive(duration_s, "--duration-s")
    if hyperparams is not None and not hyperparams.is_file():
        fail(f"--hyperparams {show_path(hyperparams)}: no such file")
    if models_dir is not None and models_dir.exists() and not models_dir.is_dir():
        fail(f"--models {show_path(models_dir)}: is a file; expected a folder")
    if address is not None and executor != "ray":
        fail("--address only makes sense with --executor ray")
    # --out is created by run_compare once the agents, seeds and scenarios are known to be
    # good, so a refused command leaves no empty folder behind
    _warn_late(scenarios, duration_s)
    try:
        res = run_compare(scenarios, agents, seeds, out_dir, duration_s=duration_s, jobs=jobs,
                          models_dir=models_dir, sb3_steps=sb3_steps,
                          hyperparams_path=hyperparams, executor=executor, address=address,
                          progress=progress, plots=plots,
                          log=lambda m: click.echo(m, err=True),
                          **trust_kwargs(trust_model, run_compare))
    except (*USER_ERRORS, CompareError, ValueError) as err:
        fail(str(err))
    # The last line names every output, so a reader knows where to look.
    outputs = [p.name + ("/" if p.is_dir() else "") for p in res.outputs if p.exists()]
    click.echo(f"{len(res.ran)} runs done, {len(res.skipped)} reused, {len(res.failed)} failed; "
               f"wrote {', '.join(outputs)} in {res.out}")
    if res.refused:  # the user's input, found during the runs: exit 2 like any other
        key, why = next(iter(res.refused.items()))
        fail(f"{len(res.refused)} run(s) refused their input ({key}: {why}); fix it and "
             f"rerun the same command")
    if res.failed:  # each failure was logged as it happened; one closing line
        # a factory the workers cannot re-import (a lambda, a nested function) fails the
        # same way on every retry: say what does help
        pickling = any("pickl" in why.lower() for why in res.failed.values())
        advice = ("an agent factory that worker processes cannot import (a lambda or "
                  "nested function): make it a top-level function or use --jobs 1" if pickling
                  else "rerun the same command to retry them")
        click.echo(f"intune: {len(res.failed)} run(s) failed (errors above: "
                   f"{', '.join(list(res.failed)[:3])}{' ...' if len(res.failed) > 3 else ''});"
                   f" {advice}", err=True)
        sys.exit(1)
