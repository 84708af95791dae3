"""Measure the Q-learner against its targets (issue 3) and print markdown tables.

    .venv/bin/python benchmarks/qlearning_targets.py [--seeds 10] [--scenarios a,b]

For every built-in scenario and every pipeline in ``benchmarks/unseen/`` it runs
``qlearning`` (the shipped table, learning online), ``qlearning-scratch`` (an empty table,
learning online during the one episode) and, when their modules exist, the ``autotune``
and ``plumber`` baselines, over ``--seeds`` evaluation episodes of 1200 simulated s from
the env's default ``start_allocation="even"``. Per episode:

- ``final_fraction``: mean of throughput / oracle throughput over the last 20% of steps;
- ``time_to_90_s``: simulated seconds from the start of a phase (the episode start or an
  event) until throughput stays at or above 0.9 of the oracle up to the end of that phase
  (the next event or the end of the episode); ``inf`` if it never does;
- OOM: whether the episode ended out of memory (its ``final_fraction`` counts as 0 and its
  memory as the memory at the crash).

Reported: the interquartile mean (IQM) of ``final_fraction`` with a 95% percentile
bootstrap confidence interval over seeds, the number of OOM episodes, the median
``time_to_90_s`` of the first phase and the worst (largest) median over the phases after
events, and the mean memory used over the last 20% as a fraction of capacity, next to the
oracle allocation's worst case. A second table gives the wall time ``qlearning-scratch``
needs to be trained to the target level on each scenario (one core); a third, ``qlearning``
on ``--random`` random pipelines that nobody wrote (2-8 stages, random numbers and events).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from scipy.stats import trim_mean

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import Agent, EpisodeTrace, run_episode
from agents.qlearning import QLearningAgent
from simulators import Conditions, ScenarioError, load_scenario, oracle
from simulators.generate import oracle_survives_events
from simulators.scenario import builtin_scenarios

HERE = Path(__file__).resolve().parent
UNSEEN_DIR = HERE / "unseen"
sys.path.insert(0, str(HERE))
from pretrain_qlearning import HELD_OUT, TRAIN  # noqa: E402

AGENTS = ("qlearning", "qlearning-scratch", "autotune", "plumber")


@dataclass
class EpisodeResult:
    final_fraction: float
    time_to_90_s: list[float]  # one per phase (start, then after each event)
    oom: bool
    memory_fraction: float


def phase_starts(spec: Any) -> list[float]:
    """Simulated times at which phases start: 0 and every event time."""
    scenario = load_scenario(spec)
    return [0.0, *sorted({float(e.at_s) for e in scenario.events if e.at_s > 0})]


def time_to_90(trace: EpisodeTrace, starts: list[float], level: float = 0.9) -> list[float]:
    """Per phase: seconds from its start until the fraction stays >= level to its end."""
    t = np.asarray(trace.time_s)
    f = trace.fraction
    out = []
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else math.inf
        idx = np.flatnonzero((t > s) & (t <= end))
        if len(idx) == 0:
            out.append(math.nan)  # the episode ended (OOM) before this phase
            continue
        bad = idx[~(f[idx] >= level)]
        if len(bad) == 0:
            out.append(0.0)
        elif bad[-1] == idx[-1] or trace.oom:
            out.append(math.inf)
        else:
            out.append(float(t[bad[-1]] - s))
    return out


def evaluate_episode(env: gym.Env, agent: Agent, seed: int, starts: list[float]) -> EpisodeResult:
    trace = run_episode(env, agent, seed=seed)
    f = trace.fraction
    n = 600 if trace.oom else len(f)
    tail = slice(int(0.8 * n), None)  # the last 20% (120 of 600 steps)
    final = 0.0 if trace.oom else float(np.nanmean(f[tail]))  # a crash delivers nothing
    return EpisodeResult(final_fraction=final, time_to_90_s=time_to_90(trace, starts),
                         oom=trace.oom,
                         memory_fraction=float(trace.memory_fraction[-1] if trace.oom
                                               else np.mean(trace.memory_fraction[tail])))


def iqm_ci(x: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> tuple[float, float,
                                                                                   float]:
    """Interquartile mean and its 95% percentile bootstrap interval."""
    x = np.asarray(x, dtype=float)
    point = float(trim_mean(x, 0.25))
    boots = trim_mean(x[rng.integers(0, len(x), size=(n_boot, len(x)))], 0.25, axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def make(name: str, env: gym.Env, seed: int) -> Agent | None:
    """The agent ``name``; None if its module is not there (baselines, written elsewhere)."""
    if name == "qlearning":
        return QLearningAgent.pretrained(seed=seed)
    if name == "qlearning-scratch":
        return QLearningAgent(seed=seed)
    try:
        from agents.registry import make_agent
        return make_agent(name, env, seed)
    except (ImportError, RuntimeError, ValueError) as err:  # module not there (yet)
        print(f"note: {name} unavailable: {err}", file=sys.stderr)
        return None


def oracle_memory_fraction(spec: Any) -> float:
    """Worst-case memory of the oracle allocation in the final phase, / capacity."""
    scenario = load_scenario(spec)
    cond = Conditions.initial(scenario)
    for ev in sorted(scenario.events, key=lambda e: e.at_s):
        cond = cond.apply(ev)
    return oracle(cond).memory_bytes / cond.memory_capacity_bytes


def scratch_training_cost(spec: Any, seed: int, target: float = 0.95,
                          max_episodes: int = 10) -> tuple[int, float, float]:
    """Train ``qlearning-scratch`` on ``spec`` until a frozen greedy evaluation reaches
    ``target``; (episodes, wall seconds of training, fraction reached)."""
    agent = QLearningAgent(seed=seed, epsilon=(0.3, 0.02, 2400), safe_exploration=False)
    env = gym.make("InTune-v0", scenario=spec)
    starts = phase_starts(spec)
    wall = 0.0
    frac = 0.0
    for ep in range(1, max_episodes + 1):
        t0 = time.perf_counter()
        run_episode(env, agent, seed=10_000 + 100 * seed + ep)
        wall += time.perf_counter() - t0
        frozen = QLearningAgent(seed=seed, epsilon=(0.0, 0.0, 1), learn=False)
        frozen.q = agent.q.copy()
        frac = evaluate_episode(env, frozen, 20_000 + seed, starts).final_fraction
        if frac >= target:
            return ep, wall, frac
    return max_episodes, wall, frac


def random_pipeline(rng: np.random.Generator, k: int) -> dict[str, Any]:
    """A random pipeline nobody wrote: 2-8 stages, 8-128 CPUs, random rates, memory,
    sequential stages, link caps, contention, noise and resize / drift / co-tenant events."""
    n = int(rng.integers(2, 9))
    cpus = int(rng.integers(max(n, 8), 129))
    mem = float(rng.uniform(16, 512))
    gpu = float(10 ** rng.uniform(4.5, 6.5))
    stages = []
    for i in range(n):
        seq = rng.random() < 0.2
        st: dict[str, Any] = {
            "name": f"s{i}", "rate_per_cpu": float(gpu * 10 ** rng.uniform(-2, 0.5)),
            "max_cpus": 1 if seq else int(rng.integers(2, cpus + 1)),
            "worker_memory_mib": float(10 ** rng.uniform(1, 3.5)),
            "element_kib": float(rng.uniform(0.1, 4)), "buffer": int(rng.integers(1000, 100000)),
            "buffer_per_cpu": int(rng.integers(0, 4000)),
            "contention": float(rng.choice([0.0, rng.uniform(0, 0.05)]))}
        if rng.random() < 0.2:
            st["bandwidth_cap"] = float(gpu * rng.uniform(0.3, 1.2))
        if seq:
            st["rate_per_cpu"] = float(gpu * rng.uniform(0.5, 3))
        stages.append(st)
    events: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        events.append({"at_s": float(rng.integers(100, 1000)),
                       "cpus": int(max(n, cpus * rng.uniform(0.4, 1.5)))})
    if rng.random() < 0.3:
        events.append({"at_s": float(rng.integers(100, 1000)), "stage": f"s{rng.integers(n)}",
                       "rate_per_cpu_factor": float(rng.uniform(0.4, 1.6))})
    if rng.random() < 0.2:
        events.append({"at_s": float(rng.integers(100, 1000)),
                       "cotenant_memory_gib": float(mem * rng.uniform(0.05, 0.3))})
    return {"name": f"random-{k}", "noise_cv": float(rng.uniform(0, 0.08)),
            "machine": {"cpus": cpus, "memory_gib": mem,
                        "base_memory_gib": float(mem * rng.uniform(0.1, 0.6)), "gpu_rate": gpu},
            "stages": stages, "events": events}


def unavoidable_oom(scenario: Any) -> bool:
    """Would even the oracle's allocation run out of memory when a later event lands?"""
    return not oracle_survives_events(scenario)


def random_pipelines(count: int, seed: int = 2024) -> None:
    """Run ``qlearning`` once on each of ``count`` random pipelines and summarise."""
    rng = np.random.default_rng(seed)
    fracs, ooms, excused, k = [], 0, 0, 0
    while len(fracs) < count:
        k += 1
        spec = random_pipeline(rng, k)
        try:
            scenario = load_scenario(spec)
            env = gym.make("InTune-v0", scenario=scenario)
            _, info = env.reset(seed=0)
        except (ScenarioError, ValueError):
            continue
        sim = env.unwrapped.sim  # type: ignore[attr-defined]
        worst = sim.conditions.fixed_memory_bytes + sum(
            sim.compiled.worst_memory[i][c] for i, c in enumerate(info["allocation"]))
        if worst > info["memory_capacity_bytes"] or not oracle(sim.conditions).feasible:
            continue  # the even start itself crashes: no tuner can do anything
        r = evaluate_episode(env, QLearningAgent.pretrained(seed=k), k, phase_starts(scenario))
        fracs.append(r.final_fraction)
        if r.oom:
            ooms += 1
            excused += unavoidable_oom(scenario)
    f = np.array(fracs)
    print(f"\n{count} random pipelines (seed {seed}; 2-8 stages, 8-128 CPUs, events), "
          f"qlearning, one episode each:\n")
    print("| IQM final_fraction | median | >= 0.95 | >= 0.90 | OOM (of which even the "
          "oracle's allocation would crash at a co-tenant event) |")
    print("|---|---|---|---|---|")
    print(f"| {trim_mean(f, 0.25):.3f} | {np.median(f):.3f} | {np.mean(f >= 0.95):.0%} | "
          f"{np.mean(f >= 0.9):.0%} | {ooms} ({excused}) |")


def fmt_t(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--scenarios", default="",
                        help="comma-separated names/paths (default: built-ins + unseen)")
    parser.add_argument("--agents", default=",".join(AGENTS))
    parser.add_argument("--no-training-cost", action="store_true")
    parser.add_argument("--random", type=int, default=100,
                        help="also run on this many random pipelines (0: skip)")
    args = parser.parse_args(argv)
    if args.scenarios:
        specs = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    else:
        specs = [*builtin_scenarios(), *sorted(str(p) for p in UNSEEN_DIR.glob("*.yaml"))]
    try:
        scenarios = [(s, load_scenario(s)) for s in specs]
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    rng = np.random.default_rng(12345)
    seeds = list(range(args.seeds))
    results: dict[tuple[str, str], list[EpisodeResult]] = {}
    t_all = time.perf_counter()
    for _spec, sc in scenarios:
        starts = phase_starts(sc)
        for name in agents:
            env = gym.make("InTune-v0", scenario=sc)
            rows = []
            for seed in seeds:
                agent = make(name, env, seed)
                if agent is None:
                    break
                rows.append(evaluate_episode(env, agent, 1000 + seed, starts))
            if rows:
                results[(sc.name, name)] = rows

    def group(name: str) -> str:
        if name in TRAIN:
            return "trained"
        return "held-out built-in" if name in HELD_OUT else "unseen"

    print(f"{len(seeds)} seeds per cell; IQM of final_fraction [95% bootstrap CI]; OOM "
          f"episodes; median time_to_90_s at start / worst phase after events; memory used "
          f"(last 20%) vs the oracle's worst case, fraction of capacity.\n")
    print("| scenario | set | agent | IQM final_fraction [95% CI] | OOM | t90 start (s) | "
          "t90 after events (s) | memory / oracle's |")
    print("|---|---|---|---|---|---|---|---|")
    for _spec, sc in scenarios:
        omem = oracle_memory_fraction(sc)
        for name in agents:
            rows = results.get((sc.name, name))
            if rows is None:
                continue
            ff = np.array([r.final_fraction for r in rows])
            point, lo, hi = iqm_ci(ff, rng)
            ooms = sum(r.oom for r in rows)
            t90 = np.array([r.time_to_90_s for r in rows])
            start = float(np.median(t90[:, 0]))
            after = "-" if t90.shape[1] == 1 else fmt_t(max(
                float(np.median(t90[:, k])) for k in range(1, t90.shape[1])))
            mem = float(np.mean([r.memory_fraction for r in rows]))
            print(f"| {sc.name} | {group(sc.name)} | {name} | {point:.3f} [{lo:.3f}, {hi:.3f}]"
                  f" | {ooms} | {fmt_t(start)} | {after} | {mem:.2f} / {omem:.2f} |")
    print(f"\nevaluation wall time {time.perf_counter() - t_all:.0f} s")
    if not args.no_training_cost:
        print("\nTraining qlearning-scratch from an empty table on one scenario until a frozen "
              "greedy evaluation episode reaches final_fraction >= 0.95 (3 training seeds, "
              "wall time on one core):\n")
        print("| scenario | episodes (per seed) | training wall time (s, per seed) | "
              "fraction reached |")
        print("|---|---|---|---|")
        for _spec, sc in scenarios:
            runs = [scratch_training_cost(sc, s) for s in range(3)]
            print(f"| {sc.name} | {', '.join(str(r[0]) for r in runs)} | "
                  f"{', '.join(f'{r[1]:.2f}' for r in runs)} | "
                  f"{', '.join(f'{r[2]:.3f}' for r in runs)} |")
    if args.random > 0:
        random_pipelines(args.random)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
