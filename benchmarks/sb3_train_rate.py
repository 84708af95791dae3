"""SB3 training steps/s on InTune-v0: batched env (SB3VecEnv) vs DummyVecEnv, side by side.

Each algorithm trains ``--steps`` steps through :func:`agents.sb3_agents.train_sb3`
(hyperparameters of ``agents/hyperparams/sb3.yaml``, one evaluation of one episode, so
the figure is mostly training), once per training-env kind, on one torch thread.

    python benchmarks/sb3_train_rate.py                  # ~1 min on an idle core
    python benchmarks/sb3_train_rate.py --steps 20000 --algos ppo,dqn
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from agents.sb3_agents import VEC_ENVS, train_sb3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8192)
    ap.add_argument("--algos", default="ppo,a2c,dqn")
    ap.add_argument("--scenario", default="dlrm-criteo")
    args = ap.parse_args()
    print(f"{args.steps:,} steps on {args.scenario}; load avg {os.getloadavg()[0]:.1f}")
    print(f"{'algo':<6}" + "".join(f"{k + ' steps/s':>18}" for k in VEC_ENVS))
    for algo in args.algos.split(","):
        rates = []
        for kind in VEC_ENVS:
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                res = train_sb3(algo, args.scenario, f"{d}/m", n_timesteps=args.steps,
                                overrides={"n_evaluations": 1, "n_eval_episodes": 1},
                                vec_env=kind)
                rates.append(res.n_timesteps / (time.perf_counter() - t))
        print(f"{algo:<6}" + "".join(f"{r:>18,.0f}" for r in rates))


if __name__ == "__main__":
    main()
