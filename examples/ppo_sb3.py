"""Train PPO (Stable-Baselines3) on InTune-v0, save it, load it back and evaluate it.

The hyperparameters come from ``agents/hyperparams/sb3.yaml``; observations and returns
are normalised with ``VecNormalize``, the 4 training envs run as one batched
``InTuneVectorEnv``, an ``EvalCallback`` scores the policy on a separate env and the best
model is kept. The model folder holds ``ppo.zip``, ``ppo.json`` (what it was trained on)
and ``ppo.vecnormalize.json`` (the observation statistics); loading it unpickles nothing.
50,000 steps take about a minute on one core; the
benchmark budget is 200,000 (``benchmarks/sb3_baselines.py``).

Run: python examples/ppo_sb3.py [STEPS]
Same from the command line:
    intune train --agent ppo --scenario transform-drift --steps 50000 --out runs/ppo --tensorboard
    intune eval --agent ppo --model runs/ppo/ppo.zip --scenario transform-drift --episodes 3
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import run_episode
from agents.registry import make_agent
from agents.sb3_agents import train_sb3

SCENARIO = "transform-drift"
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000

with tempfile.TemporaryDirectory() as tmp:
    result = train_sb3("ppo", SCENARIO, Path(tmp) / "ppo.zip", seed=0, n_timesteps=steps,
                       progress_bar=True)
    print(f"trained {result.n_timesteps:,} steps in {result.wall_s:.0f} s, "
          f"kept {result.kept}; saved as {result.model_path.name} (+ .json sidecar and "
          f"observation statistics)")

    for name in ("ppo", "even", "oracle"):
        env = gym.make("InTune-v0", scenario=SCENARIO)
        model = result.model_path if name == "ppo" else None
        agent = make_agent(name, env, seed=0, model_path=model)  # SB3Agent for "ppo"
        finals = []
        for seed in (100, 101, 102):  # evaluation seeds never seen in training
            f = np.nan_to_num(run_episode(env, agent, seed=seed).fraction)
            finals.append(f[-len(f) // 5:].mean())
        print(f"{name:<7} final fraction of the oracle: {np.mean(finals):.3f} "
              f"(seeds 100-102: {', '.join(f'{x:.3f}' for x in finals)})")
