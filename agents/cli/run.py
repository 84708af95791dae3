"""``intune run``: watch one tuner allocate CPUs on a scenario, with per-stage tables."""

from __future__ import annotations

from pathlib import Path

import click

from agents.cli.common import (
    SEED,
    at_least,
    check_agent,
    check_model,
    fail,
    finite_positive,
    load_scenario_or_fail,
    trust_kwargs,
    trust_model_option,
    warn_late_events,
)


@click.command("run")
@click.option("--scenario", "scenario", default="dlrm-criteo", show_default=True,
              help="built-in name or YAML file")
@click.option("--agent", "agent_name", default="qlearning", show_default=True,
              help="agent name (`intune agents` lists them)")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="trained model of a learning agent (.zip for SB3, .json table for "
                   "qlearning); needed by the SB3 agents")
@trust_model_option
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--duration-s", default=1200.0, show_default=True, type=float,
              help="simulated seconds")
@click.option("--every", default=100, show_default=True, type=int,
              help="print the per-stage table every this many steps")
def run_cmd(scenario: str, agent_name: str, model_path: Path | None, trust_model: bool,
            seed: int, duration_s: float, every: int) -> None:
    """Watch one tuner allocate CPUs on a scenario, with per-stage tables."""
    import gymnasium as gym

    import intune_env  # noqa: F401  (registers the envs)
    from agents import registry
    from agents.base import apply, episode_steps

    at_least(every, 1, "--every")
    finite_positive(duration_s, "--duration-s")
    check_agent(agent_name)
    check_model(agent_name, model_path)
    sc = load_scenario_or_fail(scenario)
    warn_late_events(sc, duration_s)
    env = gym.make("InTune-v0", scenario=sc, render_mode="ansi", max_episode_steps=None)
    steps = episode_steps(duration_s, env.unwrapped.sim.dt)
    try:
        agent = registry.make_agent(agent_name, env, seed=seed, model_path=model_path,
                                    **trust_kwargs(trust_model, registry.make_agent, model_path))
    except (KeyError, ValueError, NotImplementedError) as err:
        fail(f"{agent_name}: {err.args[0] if err.args else err}")
    obs, info = env.reset(seed=seed)
    agent.reset(obs, info)
    fractions: list[float] = []
    for t in range(1, steps + 1):
        choice = agent.act(obs, info)
        nobs, reward, terminated, truncated, ninfo = env.step(apply(env, choice))
        agent.observe(obs, choice, float(reward), nobs, ninfo, terminated, truncated)
        obs, info = nobs, ninfo
        fractions.append(info["throughput"] / info["oracle_throughput"])
        if t % every == 0 or terminated or t == steps:
            click.echo(env.render())
            click.echo("")
        if terminated:
            click.echo("the job ran out of memory")
            break
    crashed = len(fractions) < steps
    # as in `intune compare`: a crashed job delivers nothing for the rest of the episode
    fractions += [0.0] * (steps - len(fractions))
    tail = fractions[-max(1, len(fractions) // 5):]
    click.echo(f"{agent_name} on {sc.name}: mean fraction of oracle "
               f"{sum(fractions) / len(fractions):.3f}, last 20% {sum(tail) / len(tail):.3f}"
               + (" (out of memory: 0 from the crash on)" if crashed else ""))
