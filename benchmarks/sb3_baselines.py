"""Stable-Baselines3 baselines on InTune-v0 within a documented budget.

Trains PPO, A2C, DQN and MaskablePPO (hyperparameters: ``agents/hyperparams/sb3.yaml``)
on a few scenarios, one model per (scenario, seed) with ``--steps`` environment steps
each (default 200,000 = 333 episodes of 600 steps, ~2 min per model on one core), then
scores each model's deterministic policy on one 1200 s evaluation episode of that seed
(noise seeds not used in training), next to reference tuners, through ``intune compare``'s
machinery. Prints the summary table and writes everything under ``--out``.

    python benchmarks/sb3_baselines.py --out /tmp/sb3-bench            # ~30 min, 2 cores
    python benchmarks/sb3_baselines.py --steps 20000 --seeds 1 --out /tmp/sb3-quick

It resumes like ``intune compare``: rerunning with the same ``--out`` reuses finished runs
and trained models.
"""

from __future__ import annotations

import argparse
import time

from agents.compare import run_compare

SCENARIOS = "dlrm-criteo,machine-resize,memory-tight"
SB3 = "ppo,maskable-ppo,a2c,dqn"
REFERENCE = "even,autotune,qlearning-scratch,oracle"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=SCENARIOS)
    ap.add_argument("--agents", default=f"{SB3},{REFERENCE}")
    ap.add_argument("--steps", type=int, default=200_000, help="training steps per model")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=None, help="parallel runs (default: cores)")
    ap.add_argument("--out", default="sb3-bench")
    args = ap.parse_args()

    start = time.perf_counter()
    res = run_compare(args.scenarios, args.agents, args.seeds, args.out, jobs=args.jobs,
                      sb3_steps=args.steps, log=print)
    wall = time.perf_counter() - start
    print(f"\nbudget: {args.steps:,} training steps per model; seeds {args.seeds}; "
          f"wall {wall / 60:.1f} min ({len(res.ran)} runs now, {len(res.skipped)} reused)")
    for key, err in res.failed.items():
        print(f"FAILED {key}: {err}")
    trained = {}
    for r in res.rows:
        if r["train_wall_s"]:
            trained.setdefault(r["agent"], []).append(float(r["train_wall_s"]))
    for agent, ts in trained.items():
        print(f"training wall time {agent}: {sum(ts) / len(ts):.0f} s per model")
    print()
    print((res.out / "summary.md").read_text())
    print(res.summary_line())


if __name__ == "__main__":
    main()
