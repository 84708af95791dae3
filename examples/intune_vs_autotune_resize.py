"""InTune against tf.data AUTOTUNE when the machine shrinks under the job.

On ``machine-resize`` the trainer's container goes from 32 to 16 CPUs at 600 s. InTune
(tabular Q-learning from the shipped pretrained table, learning online as deployed) moves
CPUs one at a time and, after the shrink, settles on a few time-sliced threads where its
measured overhead says they pay (as the oracle does: 21 threads on 16 CPUs); AUTOTUNE
keeps publishing its parallelism, 65 threads time-sliced on the 16 CPUs. The oracle
(best static allocation under the current conditions) is the yardstick.

Run: python examples/intune_vs_autotune_resize.py
(the same comparison with more seeds, plots and confidence intervals:
``intune compare --scenarios machine-resize --agents qlearning,autotune,oracle --seeds 5
--out resize-grid``)
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import run_episode
from agents.registry import make_agent

SCENARIO = "machine-resize"
SEEDS = range(3)

print(f"{'agent':<11}{'seed':>5}{'before resize':>15}{'after resize':>14}{'last 20%':>10}"
      f"{'OOM':>5}   allocation at the end")
finals: dict[str, list[float]] = {}
for name in ("qlearning", "autotune", "oracle"):
    for seed in SEEDS:
        env = gym.make("InTune-v0", scenario=SCENARIO)
        agent = make_agent(name, env, seed=seed)
        trace = run_episode(env, agent, seed=seed)  # 600 steps of 2 s, learning online
        f = np.nan_to_num(trace.fraction)
        t = np.asarray(trace.time_s)
        before, after = f[(t > 300) & (t <= 600)].mean(), f[t > 900].mean()
        last = f[-len(f) // 5:].mean()
        finals.setdefault(name, []).append(last)
        print(f"{name:<11}{seed:>5}{before:>15.3f}{after:>14.3f}{last:>10.3f}"
              f"{'yes' if trace.oom else 'no':>5}   {trace.allocation[-1]} "
              f"({sum(trace.allocation[-1])} CPUs on a 16-CPU machine)")

ratio = np.mean(finals["qlearning"]) / np.mean(finals["autotune"])
print(f"\nInTune reaches {np.mean(finals['qlearning']):.0%} of the oracle after the resize, "
      f"AUTOTUNE {np.mean(finals['autotune']):.0%}: {ratio:.2f}x AUTOTUNE's throughput.")
