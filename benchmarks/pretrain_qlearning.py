"""Regenerate the shipped Q-table, ``agents/pretrained/qtable.json``, reproducibly.

    PYTHONPATH=. python benchmarks/pretrain_qlearning.py [--out PATH] [--seed 0]

Training set: the built-in scenarios (:data:`TRAIN`, ``EPISODES_BASE`` episodes each) and
every member of the generated ``train`` split (``suite:train:0000`` ...,
:mod:`simulators.generate`, one episode each), interleaved in a seeded random order. The
``test`` split is never seen; ``benchmarks/generalization.py`` measures on it. Every
episode starts from the even split scaled down until it fits in memory (the env's default
start rule), so memory-tight pipelines are trained on, not skipped.

Pretraining explores more (epsilon 0.3 -> 0.02) and without the deployed agent's safe
exploration, so the table also learns what releasing a busy CPU costs. Prints the wall
time per group (one core) and the greedy policy it learnt.
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
from simulators.generate import SUITES, suite_members
from simulators.scenario import builtin_scenarios

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import fitting_start

TRAIN = tuple(builtin_scenarios())  # every built-in
HELD_OUT: tuple[str, ...] = ()  # the generated test split is the held-out set
SPLIT = "train"
EPISODES_BASE = 4  # episodes on each built-in
EPISODE_S = 1200.0


def build_curriculum(seed: int) -> list[tuple[str, Any]]:
    """(group, scenario spec) pairs: the built-ins and the train split, shuffled (seeded)."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, Any]] = [(name, name) for name in TRAIN
                                    for _ in range(EPISODES_BASE)]
    items += [(f"suite:{SPLIT}", m) for m in suite_members(SPLIT)]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def pretrain(seed: int = 0, progress: bool = True) -> tuple[QLearningAgent, dict[str, float]]:
    """Train a fresh agent on the curriculum; returns it and the wall seconds per scenario."""
    curriculum = build_curriculum(seed)
    steps = len(curriculum) * int(EPISODE_S / 2.0)
    agent = QLearningAgent(epsilon=(0.3, 0.02, int(0.8 * steps)), seed=seed,
                           safe_exploration=False)
    wall: dict[str, float] = dict.fromkeys([*TRAIN, f"suite:{SPLIT}"], 0.0)
    for ep, (name, spec) in enumerate(tqdm(curriculum, desc="pretraining", unit="episode",
                                           disable=not progress, file=sys.stderr)):
        env = gym.make("InTune-v0", scenario=spec)
        start = time.perf_counter()
        env.reset(seed=0)
        run_episode(env, agent, seed=seed * 100_000 + ep,
                    options={"allocation": fitting_start(env)})
        wall[name] += time.perf_counter() - start
    agent.metadata = {
        "trained_on": [*TRAIN, f"suite:{SPLIT}"],
        "episodes_per_builtin": EPISODES_BASE,
        "episodes_per_split_member": 1,
        "held_out": ["suite:test", "benchmarks/unseen/*.yaml"],
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
    print("| training group | episodes | wall time, one core |")
    print("|---|---|---|")
    for name in TRAIN:
        print(f"| {name} | {EPISODES_BASE} | {wall[name]:.2f} s |")
    print(f"| suite:{SPLIT} | {SUITES[SPLIT].count} | {wall[f'suite:{SPLIT}']:.2f} s |")
    print(f"total wall time {time.perf_counter() - total:.1f} s")
    print("held out: suite:test, benchmarks/unseen/*.yaml")
    print("\ngreedy policy (state -> action, visits):")
    for state, action, visits in agent.policy_table():
        print(f"  {state:<72} {action:<5} {visits}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
