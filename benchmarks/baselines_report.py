"""Baseline tuners on every built-in scenario: fraction of oracle, OOMs, CPUs, oversubscription.

Usage::

    python benchmarks/baselines_report.py [--seeds 0 1 2] [--steps 600]
        [--agents autotune,plumber,...] [--scenarios dlrm-criteo,...]

For every (scenario, agent) it runs one episode per seed with ``agents.base.run_episode``
(no learning: none of these agents learns) and prints a Markdown table:

- ``frac``: throughput / oracle throughput, averaged over the last 20% of the nominal
  episode (``steps``) and then over seeds (``± sd`` across seeds). Steps after an
  out-of-memory crash count as 0: the job is dead.
- ``OOM``: seeds whose episode ended out of memory.
- ``CPUs``: mean total CPUs allocated over that window (before any crash) / the
  machine's CPUs at the end of the episode.
- ``max over``: the largest ``allocated / machine CPUs`` seen in any step (> 1 means
  the machine was oversubscribed); ``% over``: share of steps oversubscribed.
- ``rounds``: re-allocations the agent published (whole allocations returned).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.autotune import AutotuneAgent
from agents.base import Agent, Allocation, run_episode
from agents.plumber import PlumberAgent
from agents.static import EvenAgent, MinAgent, OracleAgent, RandomAgent
from simulators import builtin_scenarios

#: Agent name -> factory(seed). ``autotune`` is MAX_PARALLELISM, tf.data's default.
AGENTS: dict[str, Callable[[int], Agent]] = {
    "autotune": lambda s: AutotuneAgent("max_parallelism"),
    "autotune:hill_climb": lambda s: AutotuneAgent("hill_climb"),
    "autotune:stage_based": lambda s: AutotuneAgent("stage_based"),
    "autotune:gradient_descent": lambda s: AutotuneAgent("gradient_descent"),
    "plumber": lambda s: PlumberAgent(),
    "plumber:replan60s": lambda s: PlumberAgent(window_steps=5, replan_every_steps=30),
    "even": lambda s: EvenAgent(),
    "min": lambda s: MinAgent(),
    "random": lambda s: RandomAgent(seed=s),
    "oracle": lambda s: OracleAgent(),
}


class _CountingAgent(Agent):
    """Wraps an agent to count the whole allocations it publishes."""

    def __init__(self, inner: Agent) -> None:
        self.inner = inner
        self.name = inner.name
        self.published = 0

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        self.inner.reset(obs, info)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        choice = self.inner.act(obs, info)
        self.published += isinstance(choice, Allocation)
        return choice


class _MachineLog(gym.Wrapper):
    """Records the machine's CPUs after every step (they change on resize events)."""

    def reset(self, **kwargs: Any) -> Any:
        self.cpus: list[int] = []
        return self.env.reset(**kwargs)

    def step(self, action: int) -> Any:
        out = self.env.step(action)
        self.cpus.append(int(out[4]["cpus_total"]))
        return out


def run_one(scenario: str, agent_name: str, seed: int, steps: int) -> dict[str, float]:
    env = _MachineLog(gym.make("InTune-v0", scenario=scenario))
    agent = _CountingAgent(AGENTS[agent_name](seed))
    trace = run_episode(env, agent, seed=seed, max_steps=steps, learn=False)
    n = len(trace.throughput)
    frac = np.zeros(steps)  # after a crash: 0
    frac[:n] = np.nan_to_num(trace.fraction, nan=0.0)
    start = round(0.8 * steps)
    alloc = np.array([sum(a) for a in trace.allocation], dtype=float)
    cpus = np.array(env.cpus, dtype=float)
    ratio = alloc / cpus
    window = alloc[start:n] if n > start else alloc[-1:]
    return {
        "frac": float(np.mean(frac[start:])),
        "oom": float(trace.oom),
        "cpus_used": float(np.mean(window)),
        "machine": float(cpus[-1]),
        "max_over": float(ratio.max()),
        "pct_over": float(np.mean(ratio > 1.0 + 1e-12) * 100.0),
        "rounds": float(agent.published),
    }


def report(scenarios: list[str], agents: list[str], seeds: list[int], steps: int) -> str:
    lines = [
        f"Baselines, {len(seeds)} seeds ({', '.join(map(str, seeds))}), {steps} steps; "
        "frac = throughput / oracle over the last 20% (0 after an OOM)",
        "",
        "| scenario | agent | frac (mean ± sd) | OOM | CPUs used / machine | max over "
        "| % over | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sc in scenarios:
        for name in agents:
            rows = [run_one(sc, name, s, steps) for s in seeds]
            f = np.array([r["frac"] for r in rows])

            def mean(key: str, rows: list[dict[str, float]] = rows) -> float:
                return float(np.mean([r[key] for r in rows]))

            lines.append(
                f"| {sc} | {name} | {f.mean():.3f} ± {f.std():.3f} "
                f"| {int(sum(r['oom'] for r in rows))}/{len(rows)} "
                f"| {mean('cpus_used'):.1f} / {mean('machine'):.0f} "
                f"| {max(r['max_over'] for r in rows):.2f} | {mean('pct_over'):.0f}% "
                f"| {mean('rounds'):.1f} |"
            )
    return "\n".join(lines)


def _names(text: str, known: list[str], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        print(f"baselines_report: --{what}: unknown {what} {', '.join(bad) or '(none)'}; "
              f"expected a comma-separated subset of {', '.join(known)}", file=sys.stderr)
        raise SystemExit(2)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--agents", default=",".join(AGENTS))
    parser.add_argument("--scenarios", default=",".join(builtin_scenarios()))
    args = parser.parse_args(argv)
    if args.steps < 5:
        print(f"baselines_report: --steps must be >= 5, got {args.steps}", file=sys.stderr)
        raise SystemExit(2)
    agents = _names(args.agents, list(AGENTS), "agents")
    scenarios = _names(args.scenarios, builtin_scenarios(), "scenarios")
    print(report(scenarios, agents, args.seeds, args.steps))


if __name__ == "__main__":
    main()
