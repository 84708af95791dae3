"""The ``intune`` command.

``intune scenarios list|show``, ``intune run`` (watch a tuner on a scenario), and the
commands that live beside their logic: ``train``, ``eval``, ``compare`` (``agents.cli``)
and ``calibrate`` (``intune_env.live.cli``). A user's fault (bad scenario file, unknown
agent, unwritable folder) prints one line and exits 2, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from simulators import ScenarioError, builtin_scenarios, load_scenario
from simulators.scenario import GIB


def fail(message: str) -> NoReturn:
    """Print one line on stderr and exit 2 (a user's fault, not a crash)."""
    click.echo(f"intune: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="intune")
def main() -> None:
    """InTune: RL for CPU allocation across the stages of DLRM input pipelines."""


@main.group()
def scenarios() -> None:
    """List and inspect scenarios (built-in names or YAML files)."""


@scenarios.command("list")
def scenarios_list() -> None:
    """The built-in scenarios, one line each."""
    for name in builtin_scenarios():
        sc = load_scenario(name)
        m = sc.machine
        click.echo(f"{name:<18} {m.cpus:>3} CPUs {m.memory_gib:>5g} GiB  "
                   f"{len(sc.stages)} stages  {len(sc.events)} events  {sc.description}")


@scenarios.command("show")
@click.argument("scenario")
def scenarios_show(scenario: str) -> None:
    """Validate SCENARIO (name or YAML file) and show it with its oracle."""
    from simulators import Conditions, oracle

    try:
        sc = load_scenario(scenario)
    except ScenarioError as err:
        fail(str(err))
    m = sc.machine
    click.echo(f"{sc.name}: {sc.description}")
    click.echo(f"machine: {m.cpus} CPUs, {m.memory_gib:g} GiB ({m.base_memory_gib:g} GiB base), "
               f"GPU consumes {m.gpu_rate:,.0f} samples/s; interval {sc.control_interval_s:g} s, "
               f"noise cv {sc.noise_cv:g}")
    cond = Conditions.initial(sc)
    best = oracle(cond)
    click.echo(f"{'stage':<12}{'kind':<8}{'rate/cpu':>10}{'max':>5}{'cap':>10}"
               f"{'MiB/cpu':>9}{'KiB/el':>8}{'buffer':>8}{'oracle':>8}")
    for i, st in enumerate(sc.stages):
        cap = "-" if st.bandwidth_cap is None else f"{st.bandwidth_cap:,.0f}"
        click.echo(f"{st.name:<12}{st.kind:<8}{st.rate_per_cpu:>10,.0f}{st.max_cpus:>5}{cap:>10}"
                   f"{st.worker_memory_mib:>9g}{st.element_kib:>8g}{st.buffer:>8}"
                   f"{best.allocation[i]:>8}")
    click.echo(f"oracle: {best.throughput:,.0f} samples/s with {sum(best.allocation)} threads "
               f"on {m.cpus} CPUs, {best.memory_bytes / GIB:.1f} GiB worst case")
    for ev in sc.events:
        cond = cond.apply(ev)
        after = oracle(cond)
        change = ", ".join(f"{k}={v}" for k, v in ev.model_dump(exclude_none=True).items())
        click.echo(f"event {change}: oracle {after.throughput:,.0f} samples/s "
                   f"with {list(after.allocation)}")


@main.command("run")
@click.option("--scenario", "scenario", default="dlrm-criteo", show_default=True,
              help="built-in name or YAML file")
@click.option("--agent", "agent_name", default="qlearning", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--duration-s", default=1200.0, show_default=True, type=float,
              help="simulated seconds")
@click.option("--every", default=100, show_default=True, type=int,
              help="print the per-stage table every this many steps")
def run_cmd(scenario: str, agent_name: str, seed: int, duration_s: float, every: int) -> None:
    """Watch one tuner allocate CPUs on a scenario, with per-stage tables."""
    import gymnasium as gym

    import intune_env  # noqa: F401  (registers the envs)
    from agents.base import apply
    from agents.registry import make_agent

    try:
        env = gym.make("InTune-v0", scenario=scenario, render_mode="ansi",
                       max_episode_steps=None)
    except ScenarioError as err:
        fail(str(err))
    steps = max(1, round(duration_s / env.unwrapped.sim.dt))
    try:
        agent = make_agent(agent_name, env, seed=seed)
    except (KeyError, ValueError) as err:
        fail(str(err.args[0] if err.args else err))
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
    tail = fractions[-max(1, len(fractions) // 5):]
    click.echo(f"{agent_name} on {env.unwrapped.scenario.name}: mean fraction of oracle "
               f"{sum(fractions) / len(fractions):.3f}, last 20% {sum(tail) / len(tail):.3f}")


def _attach(module: str, names: dict[str, str]) -> None:
    """Attach commands defined beside their logic."""
    import importlib

    mod: Any = importlib.import_module(module)
    for attr, cmd_name in names.items():
        main.add_command(getattr(mod, attr), cmd_name)


_attach("agents.cli", {"train": "train", "eval_cmd": "eval", "compare": "compare"})
_attach("intune_env.live.cli", {"calibrate": "calibrate", "live_sweep": "live-sweep"})

if __name__ == "__main__":
    main()
