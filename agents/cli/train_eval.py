"""``intune train`` and ``intune eval``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import click

from agents import registry
from agents.base import MAX_TRAIN_STEPS
from agents.cli.common import (
    OUT_PATH,
    SEED,
    USER_ERRORS,
    at_least,
    check_agent,
    check_model,
    fail,
    finite_positive,
    load_scenario_or_fail,
    out_dir,
    trust_kwargs,
    trust_model_option,
    warn_late_events,
    writable_file,
)

#: Online training budget of ``intune train --agent qlearning*`` when --steps is not given.
QLEARNING_DEFAULT_STEPS = 30_000


@click.command("train")
@click.option("--agent", "agent_name", required=True,
              help=f"one of {', '.join(registry.TRAINABLE)}")
@click.option("--scenario", default="dlrm-criteo", show_default=True,
              help="built-in name or YAML file")
@click.option("--steps", type=int, default=None,
              help="environment steps (default: n_timesteps of the SB3 YAML; "
                   f"{QLEARNING_DEFAULT_STEPS:,} for qlearning); SB3 trains whole "
                   "rollouts, so PPO and A2C may train a few more")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", "out_path", required=True, type=OUT_PATH,
              help="folder for the trained model")
@click.option("--tensorboard", is_flag=True, help="SB3: write TensorBoard logs to OUT/tb")
@click.option("--hyperparams", type=click.Path(path_type=Path), default=None,
              help="SB3 hyperparameter YAML (default: agents/hyperparams/sb3.yaml)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(agent_name: str, scenario: str, steps: int | None, seed: int, out_path: Path,
          tensorboard: bool, hyperparams: Path | None, progress: bool) -> None:
    """Train a learning agent on a scenario and save it under OUT."""
    check_agent(agent_name)
    if agent_name not in registry.TRAINABLE:
        fail(f"agent {agent_name!r} does not learn; trainable agents: "
             f"{', '.join(registry.TRAINABLE)}")
    at_least(steps, 1, "--steps")
    if steps is not None and steps > MAX_TRAIN_STEPS:
        fail(f"--steps: at most {MAX_TRAIN_STEPS:,}, got {steps:,}")
    sc = load_scenario_or_fail(scenario)
    sb3 = agent_name in registry.SB3_AGENTS
    if sb3:  # the hyperparameter file is checked before OUT is made
        from agents.sb3_agents import load_hyperparams

        try:
            load_hyperparams(registry.SB3_AGENTS[agent_name], hyperparams)
        except ValueError as err:
            fail(str(err))
        if tensorboard:
            try:
                import tensorboard as _tb  # noqa: F401
            except ImportError:
                fail("--tensorboard needs the tensorboard package (pip install 'intune[sb3]')")
    with out_dir(out_path):  # removed again, if still empty, when training fails
        # Refused now, not after a training run that could not be saved.
        model_file = writable_file(out_path / f"{agent_name}.{'zip' if sb3 else 'json'}",
                                   "--out")
        if sb3:
            _train_sb3(agent_name, sc, steps, seed, model_file, tensorboard, hyperparams,
                       progress)
        else:
            _train_qlearning(agent_name, sc, steps or QLEARNING_DEFAULT_STEPS, seed,
                             model_file, progress)


def _train_sb3(agent_name: str, sc: Any, steps: int | None, seed: int, model_file: Path,
               tensorboard: bool, hyperparams: Path | None, progress: bool) -> None:
    """Train an SB3 agent into ``model_file`` (TensorBoard logs next to it, in ``tb/``)."""
    from agents.sb3_agents import train_sb3

    # SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so the temporary training
    # folder is removed instead of left next to the model
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        res = train_sb3(registry.SB3_AGENTS[agent_name], sc, model_file, seed=seed,
                        n_timesteps=steps, hyperparams_path=hyperparams,
                        tensorboard_log=model_file.parent / "tb" if tensorboard else None,
                        progress_bar=progress)
    except ValueError as err:  # bad hyperparameter file
        fail(str(err))
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(f"saved {agent_name} model to {res.model_path} ({res.n_timesteps:,} steps "
               f"on {res.scenario}, kept {res.kept}, eval return {res.best_eval_reward:.1f}, "
               f"{res.wall_s:.0f} s)")


def _exit_on_signal(signum: int, _frame: Any) -> None:
    click.echo("intune: terminated", err=True)
    raise SystemExit(128 + signum)


def _train_qlearning(agent_name: str, sc: Any, steps: int, seed: int, model_file: Path,
                     progress: bool) -> None:
    """Online Q-learning over consecutive episodes (seeds seed, seed+1, ...)."""
    import gymnasium as gym
    from tqdm.auto import tqdm

    import intune_env  # noqa: F401
    from agents.base import run_episode

    env = gym.make("InTune-v0", scenario=sc)
    try:
        agent = registry.make_agent(agent_name, env, seed=seed)
    except (*USER_ERRORS, ValueError) as err:
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
    path = agent.save(model_file)
    click.echo(f"saved {agent_name} table to {path} ({done:,} steps, {episode} episodes on "
               f"{sc.name}, last episode final fraction {last:.3f}, "
               f"{time.perf_counter() - start:.0f} s)")


@click.command("eval")
@click.option("--agent", "agent_name", required=True,
              help="agent name (`intune agents` lists them)")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="trained model (.zip for SB3, .json table for qlearning)")
@trust_model_option
@click.option("--scenario", default="dlrm-criteo", show_default=True,
              help="built-in name or YAML file")
@click.option("--episodes", type=int, default=5, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="seed of the first episode (then seed+1, ...)")
@click.option("--duration-s", type=float, default=1200.0, show_default=True,
              help="simulated seconds per episode")
def eval_cmd(agent_name: str, model_path: Path | None, trust_model: bool, scenario: str,
             episodes: int, seed: int, duration_s: float) -> None:
    """Evaluate an agent: one episode per seed, fraction of the oracle and OOMs."""
    from agents.compare import MAX_SEEDS, RunSpec, execute_run

    check_agent(agent_name)
    at_least(episodes, 1, "--episodes")
    if episodes > MAX_SEEDS:  # one episode per seed, bounded as a compare grid's seeds
        fail(f"--episodes: at most {MAX_SEEDS:,} (one per seed), got {episodes:,}")
    if seed + episodes - 1 > 2**63 - 1:  # (the range of SEED)
        fail(f"--seed {seed} with --episodes {episodes}: episode seeds run to "
             f"{seed + episodes - 1}; expected at most 2**63-1")
    finite_positive(duration_s, "--duration-s")
    check_model(agent_name, model_path)
    if agent_name in registry.SB3_AGENTS and model_path is None:
        fail(f"agent {agent_name!r} needs --model PATH (a .zip from `intune train`)")
    sc = load_scenario_or_fail(scenario)
    warn_late_events(sc, duration_s)
    trust = trust_kwargs(trust_model, RunSpec, model_path)
    rows = []
    for k in range(episodes):
        spec = RunSpec(sc.name, sc.to_dict(), agent_name, seed + k, duration_s,
                       None if model_path is None else str(model_path), **trust)
        try:
            r = execute_run(spec)
        except (*USER_ERRORS, ValueError, KeyError, NotImplementedError) as err:
            fail(f"{agent_name}: {err}")
        rows.append(r)
        t90 = "never" if r["time_to_90_s"] is None else f"{r['time_to_90_s']:.0f} s"
        click.echo(f"seed {r['seed']}: final fraction {r['final_fraction']:.3f}, mean "
                   f"{r['mean_fraction']:.3f}, OOM {'yes' if r['oom'] else 'no'}, "
                   f"time to 90% {t90}, memory {r['mean_memory_fraction']:.2f}")
    ff = [r["final_fraction"] for r in rows]
    click.echo(f"{agent_name} on {sc.name}: final fraction mean {sum(ff) / len(ff):.3f} over "
               f"{len(rows)} episodes, OOM {sum(r['oom'] for r in rows)}/{len(rows)}")
