"""Regenerate the shipped Q-table, ``agents/pretrained/qtable.json``, reproducibly.

    /work/venv/bin/python benchmarks/pretrain_qlearning.py [--out PATH] [--seed 0]

Training set: the built-in scenarios in :data:`TRAIN` and, for each, randomised variants
(domain randomisation: consumer rate, stage rates, machine size, memory and random
resize / drift / co-tenant events), so the table also visits states the five training
pipelines never reach (for example a GPU-bound pipeline). Held out, never seen in
training: the built-ins in :data:`HELD_OUT` and the pipelines in ``benchmarks/unseen/``;
``benchmarks/qlearning_targets.py`` reports them separately.

Pretraining explores more (epsilon 0.3 -> 0.02) and without the deployed agent's safe
exploration, so the table also learns what releasing a busy CPU costs. Prints the wall
time per scenario (one core) and the greedy policy it learnt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import run_episode
from agents.qlearning import PRETRAINED_PATH, QLearningAgent
from simulators import Conditions, ScenarioError, load_scenario, oracle
from simulators.scenario import builtin_scenarios

TRAIN = ("dlrm-criteo", "io-bound-remote", "machine-resize", "memory-tight", "transform-heavy")
HELD_OUT = tuple(s for s in builtin_scenarios() if s not in TRAIN)  # large-96, transform-drift
EPISODES_BASE = 4  # episodes on each training built-in as written
VARIANTS = 20  # randomised variants of each, one episode each
EPISODE_S = 1200.0


def variant(base: dict[str, Any], rng: np.random.Generator, index: int) -> dict[str, Any] | None:
    """A randomised copy of scenario ``base``; None if it starts out of memory."""
    sc = {k: v for k, v in base.items() if k != "events"}
    m = dict(sc["machine"])
    n = len(sc["stages"])
    m["gpu_rate"] = float(m["gpu_rate"] * rng.uniform(0.4, 1.6))
    m["cpus"] = int(max(2 * n, round(m["cpus"] * rng.uniform(0.6, 1.6))))
    m["memory_gib"] = float(m["memory_gib"] * rng.uniform(0.6, 1.3))
    m["base_memory_gib"] = float(min(m["base_memory_gib"], 0.6 * m["memory_gib"]))
    stages = []
    for st in sc["stages"]:
        st = dict(st)
        st["rate_per_cpu"] = float(st["rate_per_cpu"] * np.exp(rng.uniform(-0.5, 0.5)))
        if st.get("max_cpus", 1024) > 1:
            st["max_cpus"] = int(max(2, min(m["cpus"], round(st["max_cpus"] * rng.uniform(
                0.7, 2.0)))))
        stages.append(st)
    events: list[dict[str, Any]] = []
    if rng.random() < 0.35:
        events.append({"at_s": float(rng.integers(150, 1000)),
                       "cpus": int(max(n, round(m["cpus"] * rng.uniform(0.4, 1.5))))})
    if rng.random() < 0.35:
        events.append({"at_s": float(rng.integers(150, 1000)),
                       "stage": stages[int(rng.integers(n))]["name"],
                       "rate_per_cpu_factor": float(rng.uniform(0.5, 1.5))})
    if rng.random() < 0.2:
        events.append({"at_s": float(rng.integers(150, 1000)),
                       "cotenant_memory_gib": float(m["memory_gib"] * rng.uniform(0.05, 0.2))})
    out = {**sc, "name": f"{base['name']}~{index}", "machine": m, "stages": stages,
           "events": events}
    try:
        scenario = load_scenario(out)
        cond = Conditions.initial(scenario)
        for ev in scenario.events:  # every phase must be feasible at one CPU per stage
            if not oracle(cond).feasible:
                return None
            cond = cond.apply(ev)
        if not oracle(cond).feasible:
            return None
        env = gym.make("InTune-v0", scenario=scenario)
        _, info = env.reset(seed=0)
        sim = env.unwrapped.sim  # type: ignore[attr-defined]
        comp = sim.compiled
        worst = sim.conditions.fixed_memory_bytes + sum(
            comp.worst_memory[i][k] for i, k in enumerate(info["allocation"]))
        if worst > info["memory_capacity_bytes"]:
            return None  # the even start itself would crash: nothing to learn
    except (ScenarioError, ValueError):
        return None
    return out


def build_curriculum(seed: int) -> list[tuple[str, Any]]:
    """(training scenario, scenario spec) pairs, interleaved across scenarios."""
    rng = np.random.default_rng(seed)
    per: dict[str, list[Any]] = {}
    for name in TRAIN:
        base = load_scenario(name).to_dict()
        items: list[Any] = [name] * EPISODES_BASE
        made = 0
        tries = 0
        while made < VARIANTS and tries < 50 * VARIANTS:
            tries += 1
            v = variant(base, rng, made)
            if v is not None:
                items.append(v)
                made += 1
        order = rng.permutation(len(items))
        per[name] = [items[i] for i in order]
    out = []
    for k in range(max(len(v) for v in per.values())):
        for name in TRAIN:
            if k < len(per[name]):
                out.append((name, per[name][k]))
    return out


def pretrain(seed: int = 0, progress: bool = True) -> tuple[QLearningAgent, dict[str, float]]:
    """Train a fresh agent on the curriculum; returns it and the wall seconds per scenario."""
    curriculum = build_curriculum(seed)
    steps = len(curriculum) * int(EPISODE_S / 2.0)
    agent = QLearningAgent(epsilon=(0.3, 0.02, int(0.8 * steps)), seed=seed,
                           safe_exploration=False)
    wall: dict[str, float] = dict.fromkeys(TRAIN, 0.0)
    for ep, (name, spec) in enumerate(tqdm(curriculum, desc="pretraining", unit="episode",
                                           disable=not progress, file=sys.stderr)):
        env = gym.make("InTune-v0", scenario=spec)
        start = time.perf_counter()
        run_episode(env, agent, seed=seed * 100_000 + ep)
        wall[name] += time.perf_counter() - start
    agent.metadata = {
        "trained_on": list(TRAIN),
        "variants_per_scenario": VARIANTS,
        "episodes_per_builtin": EPISODES_BASE,
        "held_out": [*HELD_OUT, "benchmarks/unseen/*.yaml"],
        "seed": seed,
        "learning_steps": int(agent.steps),
        "generated_by": "benchmarks/pretrain_qlearning.py",
    }
    return agent, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PRETRAINED_PATH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    total = time.perf_counter()
    agent, wall = pretrain(args.seed)
    try:
        agent.save(args.out)
    except OSError as err:
        print(f"error: cannot write {args.out}: {err.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({agent.steps} learning steps)")
    print("| training scenario | episodes (built-in + variants) | wall time, one core |")
    print("|---|---|---|")
    for name in TRAIN:
        print(f"| {name} | {EPISODES_BASE} + {VARIANTS} | {wall[name]:.2f} s |")
    print(f"total wall time {time.perf_counter() - total:.1f} s (including variant checks)")
    print(f"held out: {', '.join(HELD_OUT)}, benchmarks/unseen/*.yaml")
    print("\ngreedy policy (state -> action, visits):")
    for state, action, visits in agent.policy_table():
        print(f"  {state:<72} {action:<5} {visits}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
