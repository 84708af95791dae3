"""``intune train``, ``intune eval`` and ``intune compare`` (click commands).

``intune_env.cli`` attaches them to the ``intune`` group::

    from agents.cli import compare, eval_cmd, train
    main.add_command(train); main.add_command(eval_cmd, "eval"); main.add_command(compare)

A user's fault (unknown agent, bad scenario file, missing model, unwritable output folder)
prints one line ``intune: error: ...`` on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import click

from agents import registry
from agents.compare import DEFAULT_AGENTS, CompareError, RunSpec, execute_run, run_compare
from simulators import ScenarioError, load_scenario

#: Online training budget of ``intune train --agent qlearning*`` when --steps is not given.
QLEARNING_DEFAULT_STEPS = 30_000

_USER_ERRORS = (ScenarioError, CompareError, registry.UnknownAgentError,
                registry.AgentUnavailableError, FileNotFoundError, zipfile.BadZipFile)


def fail(message: str) -> NoReturn:
    """Print one line on stderr and exit 2 (a user's fault, not a crash)."""
    click.echo(f"intune: error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


def _writable_dir(path: Path, what: str = "--out") -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        fail(f"{what} {path}: output folder is not writable ({err.strerror})")
    return path


def _scenario(spec: str) -> Any:
    try:
        return load_scenario(spec)
    except ScenarioError as err:
        fail(str(err))


def _agent(name: str) -> str:
    try:
        registry.ensure_available(name)
    except (registry.UnknownAgentError, registry.AgentUnavailableError) as err:
        fail(str(err))
    return name


@click.command("train")
@click.option("--agent", "agent_name", required=True,
              help=f"one of {', '.join(registry.TRAINABLE)}")
@click.option("--scenario", default="dlrm-criteo", show_default=True,
              help="built-in name or YAML file")
@click.option("--steps", type=int, default=None,
              help="environment steps (default: n_timesteps of the SB3 YAML; "
                   f"{QLEARNING_DEFAULT_STEPS:,} for qlearning)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for the trained model")
@click.option("--tensorboard", is_flag=True, help="SB3: write TensorBoard logs to OUT/tb")
@click.option("--hyperparams", type=click.Path(path_type=Path), default=None,
              help="SB3 hyperparameter YAML (default: agents/hyperparams/sb3.yaml)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(agent_name: str, scenario: str, steps: int | None, seed: int, out_dir: Path,
          tensorboard: bool, hyperparams: Path | None, progress: bool) -> None:
    """Train a learning agent on a scenario and save it under OUT."""
    _agent(agent_name)
    if agent_name not in registry.TRAINABLE:
        fail(f"agent {agent_name!r} does not learn; trainable agents: "
             f"{', '.join(registry.TRAINABLE)}")
    if steps is not None and steps < 1:
        fail(f"--steps must be at least 1, got {steps}")
    sc = _scenario(scenario)
    out_dir = _writable_dir(out_dir)
    if agent_name in registry.SB3_AGENTS:
        from agents.sb3_agents import train_sb3

        if tensorboard:
            try:
                import tensorboard as _tb  # noqa: F401
            except ImportError:
                fail("--tensorboard needs the tensorboard package (pip install 'intune[sb3]')")
        try:
            res = train_sb3(registry.SB3_AGENTS[agent_name], sc, out_dir / f"{agent_name}.zip",
                            seed=seed, n_timesteps=steps, hyperparams_path=hyperparams,
                            tensorboard_log=out_dir / "tb" if tensorboard else None,
                            progress_bar=progress)
        except ValueError as err:  # bad hyperparameter file
            fail(str(err))
        click.echo(f"saved {agent_name} model to {res.model_path} ({res.n_timesteps:,} steps "
                   f"on {res.scenario}, kept {res.kept}, eval return {res.best_eval_reward:.1f}, "
                   f"{res.wall_s:.0f} s)")
        return
    _train_qlearning(agent_name, sc, steps or QLEARNING_DEFAULT_STEPS, seed, out_dir, progress)


def _train_qlearning(agent_name: str, sc: Any, steps: int, seed: int, out_dir: Path,
                     progress: bool) -> None:
    """Online Q-learning over consecutive episodes (seeds seed, seed+1, ...)."""
    import gymnasium as gym
    from tqdm.auto import tqdm

    import intune_env  # noqa: F401
    from agents.base import run_episode

    env = gym.make("InTune-v0", scenario=sc)
    try:
        agent = registry.make_agent(agent_name, env, seed=seed)
    except (*_USER_ERRORS, ValueError) as err:
        fail(str(err))
    start = time.perf_counter()
    done, episode, last = 0, 0, 0.0
    with tqdm(total=steps, desc=f"{agent_name} {sc.name}", unit="step",
              disable=not progress, dynamic_ncols=True) as bar:
        while done < steps:
            trace = run_episode(env, agent, seed=seed + episode, max_steps=steps - done,
                                learn=True)
            n = len(trace.time_s)
            f = trace.fraction
            last = float(f[-max(1, n // 5):].mean()) if n else 0.0
            done += n
            episode += 1
            bar.update(n)
            bar.set_postfix(final_fraction=f"{last:.3f}")
    path = agent.save(out_dir / f"{agent_name}.json")
    click.echo(f"saved {agent_name} table to {path} ({done:,} steps, {episode} episodes on "
               f"{sc.name}, last episode final fraction {last:.3f}, "
               f"{time.perf_counter() - start:.0f} s)")


@click.command("eval")
@click.option("--agent", "agent_name", required=True, help="agent name (intune compare --help)")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="trained model (.zip for SB3, .json table for qlearning)")
@click.option("--scenario", default="dlrm-criteo", show_default=True,
              help="built-in name or YAML file")
@click.option("--episodes", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="seed of the first episode (then seed+1, ...)")
@click.option("--duration-s", type=float, default=1200.0, show_default=True,
              help="simulated seconds per episode")
def eval_cmd(agent_name: str, model_path: Path | None, scenario: str, episodes: int,
             seed: int, duration_s: float) -> None:
    """Evaluate an agent: one episode per seed, fraction of the oracle and OOMs."""
    _agent(agent_name)
    if episodes < 1:
        fail(f"--episodes must be at least 1, got {episodes}")
    if duration_s <= 0:
        fail(f"--duration-s must be positive, got {duration_s}")
    if model_path is not None and not model_path.exists():
        fail(f"--model {model_path}: no such file")
    if agent_name in registry.SB3_AGENTS and model_path is None:
        fail(f"agent {agent_name!r} needs --model PATH (a .zip from `intune train`)")
    sc = _scenario(scenario)
    rows = []
    for k in range(episodes):
        spec = RunSpec(sc.name, sc.to_dict(), agent_name, seed + k, duration_s,
                       None if model_path is None else str(model_path))
        try:
            r = execute_run(spec)
        except (*_USER_ERRORS, ValueError, KeyError) as err:
            fail(f"{agent_name}: {err}")
        rows.append(r)
        t90 = "never" if r["time_to_90_s"] is None else f"{r['time_to_90_s']:.0f} s"
        click.echo(f"seed {r['seed']}: final fraction {r['final_fraction']:.3f}, mean "
                   f"{r['mean_fraction']:.3f}, OOM {'yes' if r['oom'] else 'no'}, "
                   f"time to 90% {t90}, memory {r['mean_memory_fraction']:.2f}")
    ff = [r["final_fraction"] for r in rows]
    click.echo(f"{agent_name} on {sc.name}: final fraction mean {sum(ff) / len(ff):.3f} over "
               f"{len(rows)} episodes, OOM {sum(r['oom'] for r in rows)}/{len(rows)}")


@click.command("compare")
@click.option("--scenarios", default="all", show_default=True,
              help="comma-separated built-in names and/or YAML files, or 'all'")
@click.option("--agents", default=",".join(DEFAULT_AGENTS), show_default=True,
              help="comma-separated agent names")
@click.option("--seeds", type=int, default=5, show_default=True,
              help="number of seeds (0..N-1)")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="output folder; rerunning with the same folder resumes the grid")
@click.option("--duration-s", type=float, default=1200.0, show_default=True,
              help="simulated seconds per evaluation episode")
@click.option("--jobs", type=int, default=None, help="parallel processes (default: one per core)")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="trained SB3 models (SCENARIO/AGENT/seedK.zip, SCENARIO/AGENT.zip or "
                   "AGENT.zip); default: train one per (scenario, seed) and cache it in OUT")
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
            jobs: int | None, models_dir: Path | None, sb3_steps: int | None,
            hyperparams: Path | None, executor: str, address: str | None, plots: bool,
            progress: bool) -> None:
    """Run every agent on every scenario and seed; write runs.csv, summary, plots.

    SB3 agents without --models are trained first, one model per (scenario, seed), with
    compare_n_timesteps (50,000 steps, ~15-50 s per model on one core) and cached in OUT.
    """
    if seeds < 1:
        fail(f"--seeds must be at least 1, got {seeds}")
    if jobs is not None and jobs < 1:
        fail(f"--jobs must be at least 1, got {jobs}")
    if sb3_steps is not None and sb3_steps < 1:
        fail(f"--sb3-steps must be at least 1, got {sb3_steps}")
    if hyperparams is not None and not hyperparams.is_file():
        fail(f"--hyperparams {hyperparams}: no such file")
    if address is not None and executor != "ray":
        fail("--address only makes sense with --executor ray")
    try:
        res = run_compare(scenarios, agents, seeds, out_dir, duration_s=duration_s, jobs=jobs,
                          models_dir=models_dir, sb3_steps=sb3_steps,
                          hyperparams_path=hyperparams, executor=executor, address=address,
                          progress=progress, plots=plots,
                          log=lambda m: click.echo(m, err=True))
    except (*_USER_ERRORS, ValueError) as err:
        fail(str(err))
    click.echo(f"{len(res.ran)} runs done, {len(res.skipped)} reused, {len(res.failed)} failed; "
               f"wrote {res.out / 'runs.csv'}, {res.out / 'summary.md'}")
    if res.failed:
        for key, err in res.failed.items():
            click.echo(f"intune: run {key} failed: {err}", err=True)
        sys.exit(1)
