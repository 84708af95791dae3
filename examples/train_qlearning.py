"""Train InTune's Q-learner from scratch, then watch it allocate CPUs.

    python examples/train_qlearning.py [SCENARIO] [--episodes 5] [--every 50]

SCENARIO is a built-in name (default ``transform-heavy``), a YAML path or a generated
suite member such as ``suite:test:0017``.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import apply, run_episode
from agents.qlearning import QLearningAgent
from simulators import ScenarioError, load_scenario

parser = argparse.ArgumentParser(description="Train the tabular Q-learner and watch it.")
parser.add_argument("scenario", nargs="?", default="transform-heavy")
parser.add_argument("--episodes", type=int, default=5)
parser.add_argument("--every", type=int, default=50, help="print the table every N steps")
args = parser.parse_args()
if args.episodes < 1 or args.every < 1:
    parser.error("--episodes and --every must be at least 1")
try:
    scenario = load_scenario(args.scenario)  # one line for a bad name or file, not a trace
except ScenarioError as err:
    parser.error(str(err))

# 1. Train from an empty table: a few episodes of 600 steps (1200 simulated seconds).
env = gym.make("InTune-v0", scenario=scenario)
agent = QLearningAgent(epsilon=(0.3, 0.02, 2000), learning_rate=0.1, discount=0.9, seed=0)
start = time.perf_counter()
for episode in range(args.episodes):
    trace = run_episode(env, agent, seed=episode)
    print(f"episode {episode}: throughput/oracle over the last 20% "
          f"{np.mean(trace.fraction[-120:]):.3f}, out of memory: {trace.oom}")
print(f"trained in {time.perf_counter() - start:.1f} s of wall time\n")

# 2. What it learnt: the greedy action in each abstract state it visited.
for state, action, visits in agent.policy_table():
    print(f"  {state:<72} -> {action:<5} ({visits} visits)")

# 3. Watch it (still learning online, as when deployed) from the even start.
env = gym.make("InTune-v0", scenario=scenario, render_mode="ansi")
obs, info = env.reset(seed=123)
agent.reset(obs, info)
for step in range(600):
    action = agent.act(obs, info)
    # apply(): the agent may return a whole allocation (a time-sliced thread, set through
    # env.set_allocation) instead of an action
    next_obs, reward, terminated, truncated, next_info = env.step(apply(env, action))
    agent.observe(obs, action, reward, next_obs, next_info, terminated, truncated)
    obs, info = next_obs, next_info
    if step % args.every == 0 or terminated or truncated:
        print(f"\nstep {step}\n{env.render()}")
    if terminated or truncated:
        break
