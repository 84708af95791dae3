"""Steps per second of InTune-v0 against Gymnasium's CartPole, side by side in one run.

    python benchmarks/step_rate.py            # env tables, then SB3 training rates
    python benchmarks/step_rate.py --no-sb3   # env tables only

Every env is stepped with pre-drawn uniform random actions (plain ints for single envs,
int64 arrays for batched ones), resetting (single) or autoresetting (batched) as an
agent would. To be fair on a shared, noisy machine, each pair (candidate, reference) is
measured in alternating chunks over several rounds; the table reports the median of
each env's per-round rate and the median of the per-round ratios.

Rows:

- single: ``gym.make(id)`` with its default wrappers (TimeLimit, OrderEnforcing,
  PassiveEnvChecker), one env;
- startup: a fresh interpreter's first ``gym.make("InTune-v0")`` + reset + step, with an
  empty numba cache (cold: compiles the kernel) and a filled one (warm);
- batched: ``gym.make_vec(id, num_envs=N)`` for N in ``--num-envs`` (default 1, 16, 256,
  1024, 4096, 16384): Gymnasium's ``CartPoleVectorEnv`` and our ``InTuneVectorEnv``
  (both registered ``vector_entry_point``), and the creation time of each; the cost of
  ``info_keys="all"``; for context ``SyncVectorEnv`` over single InTune envs. Batched
  rows use the default single-threaded kernel (``parallel=False``); ``--parallel`` adds
  rows for ``parallel=True`` (numba threads, ``NUMBA_NUM_THREADS``) at the same sizes;
- README: the batched curve again as a markdown table (N, steps/s of both, ratio);
- SB3: PPO, A2C and DQN training throughput (``model.learn`` timesteps/s, rollouts and
  updates, torch on one thread) on the batched env through
  ``intune_env.sb3_vecenv.SB3VecEnv`` versus SB3's ``DummyVecEnv`` over single envs, same
  number of envs and hyper-parameters, in alternating halves.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

import intune_env  # noqa: F401  (registers InTune-v0)

Runner = Callable[[int], None]


def single_runner(env_id: str, seed: int = 0, **kwargs: Any) -> Runner:
    """A function stepping ``gym.make(env_id)`` n times with pre-drawn random actions."""
    env = gym.make(env_id, **kwargs)
    actions = np.random.default_rng(seed).integers(0, env.action_space.n, 1 << 16).tolist()
    env.reset(seed=seed)
    state = {"i": 0}

    def run(n: int) -> None:
        i = state["i"]
        step, reset = env.step, env.reset
        for _ in range(n):
            _, _, term, trunc, _ = step(actions[i])
            i = (i + 1) & 0xFFFF
            if term or trunc:
                reset()
        state["i"] = i

    return run


def vector_runner(env_id: str, num_envs: int, seed: int = 0, **kwargs: Any) -> Runner:
    """A function stepping ``gym.make_vec(env_id, num_envs)`` n times (autoreset)."""
    env = gym.make_vec(env_id, num_envs=num_envs, **kwargs)
    n_actions = int(env.single_action_space.n)
    actions = np.random.default_rng(seed).integers(0, n_actions, (256, num_envs))
    env.reset(seed=seed)
    state = {"i": 0}

    def run(n: int) -> None:
        i = state["i"]
        step = env.step
        for _ in range(n):
            step(actions[i])
            i = (i + 1) & 0xFF
        state["i"] = i

    return run


def paired(cand: Runner, ref: Runner, steps_cand: int, steps_ref: int, per_step: int,
           rounds: int) -> tuple[float, float, float]:
    """(candidate steps/s, reference steps/s, median ratio) over alternating rounds."""
    cand(max(1, steps_cand // 10))  # warm up (first-call checks, caches)
    ref(max(1, steps_ref // 10))
    rc, rr, ratios = [], [], []
    for k in range(rounds):
        order = [(cand, steps_cand, rc), (ref, steps_ref, rr)]
        if k % 2:
            order.reverse()
        for fn, n, out in order:
            t0 = time.perf_counter()
            fn(n)
            out.append(n * per_step / (time.perf_counter() - t0))
        ratios.append(rc[-1] / rr[-1])
    return statistics.median(rc), statistics.median(rr), statistics.median(ratios)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, gymnasium {gym.__version__}, load avg {load:.1f}")


FIRST_MAKE = ("import time; t = time.perf_counter(); import gymnasium as gym, intune_env; "
              "env = gym.make('InTune-v0'); env.reset(seed=0); env.step(0); "
              "print(time.perf_counter() - t)")


def first_make_seconds(cache_dir: str) -> float:
    """Seconds from a fresh interpreter to a first step of ``gym.make("InTune-v0")``,
    with numba's cache in ``cache_dir`` (empty: a cold compile; filled: warm)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", FIRST_MAKE], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def startup_rows() -> list[tuple[str, int, float, str]]:
    """Cold (empty numba cache) and warm first ``gym.make`` in fresh processes."""
    with tempfile.TemporaryDirectory() as cache:
        cold = first_make_seconds(cache)
        warm = statistics.median(first_make_seconds(cache) for _ in range(3))
    return [("first gym.make + reset + step, cold numba cache", 1, float("nan"),
             f"{cold:.2f} s (compiles the kernel)"),
            ("first gym.make + reset + step, warm numba cache", 1, float("nan"),
             f"{warm:.2f} s (median of 3 fresh processes)")]


Curve = list[tuple[int, float, float, float]]


def env_table(rounds: int, sizes: list[int], parallel: bool = False,
              curve: Curve | None = None) -> list[tuple[str, int, float, str]]:
    """The env rows; the single-threaded batched curve is appended to ``curve``."""
    rows: list[tuple[str, int, float, str]] = []
    # single env, gym.make with default wrappers
    intune, cartpole = single_runner("InTune-v0"), single_runner("CartPole-v1")
    c, r, ratio = paired(intune, cartpole, 2000, 2000, 1, 2 * rounds)
    rows += [("CartPole-v1 (gym.make)", 1, r, "1.00 (reference)"),
             ("InTune-v0 (gym.make)", 1, c, f"{ratio:.2f}")]
    # batched: make_vec default (vector_entry_point) for both, at every size
    for num_envs in sizes:
        t0 = time.perf_counter()
        gym.make_vec("InTune-v0", num_envs=num_envs)
        create_s = time.perf_counter() - t0
        vin, vcp = vector_runner("InTune-v0", num_envs), vector_runner("CartPole-v1", num_envs)
        chunk = max(8, 262144 // num_envs)  # about a quarter million sub-env steps a chunk
        c, r, ratio = paired(vin, vcp, chunk, chunk, num_envs, rounds)
        rows += [("CartPole-v1 (make_vec: CartPoleVectorEnv)", num_envs, r, "1.00 (reference)"),
                 ("InTune-v0 (make_vec: InTuneVectorEnv)", num_envs, c, f"{ratio:.2f}"),
                 ("  make_vec('InTune-v0') creation", num_envs, float("nan"),
                  f"{create_s * 1000:.0f} ms")]
        if curve is not None:
            curve.append((num_envs, c, r, ratio))
        if parallel:
            vpar = vector_runner("InTune-v0", num_envs, parallel=True)
            c, r, ratio = paired(vpar, vcp, chunk, chunk, num_envs, rounds)
            rows.append((f"InTune-v0 make_vec parallel=True ({numba_threads()} thr)",
                         num_envs, c, f"{ratio:.2f}"))
    vall = vector_runner("InTune-v0", 1024, info_keys="all")
    vdef = vector_runner("InTune-v0", 1024)
    c, r, ratio = paired(vall, vdef, 256, 256, 1024, max(3, rounds // 3))
    rows.append(("InTune-v0 make_vec info_keys='all'", 1024, c,
                 f"{ratio:.2f} of the default info's rate"))
    sync_n = 16
    vsync = vector_runner("InTune-v0", sync_n, vectorization_mode="sync")
    vcp16 = vector_runner("CartPole-v1", sync_n)
    c2, r2, ratio2 = paired(vsync, vcp16, 200, 200, sync_n, max(3, rounds // 3))
    rows.append(("InTune-v0 (make_vec sync: SyncVectorEnv)", sync_n, c2,
                 f"{ratio2:.2f} (vs CartPoleVectorEnv N={sync_n})"))
    return rows


def numba_threads() -> int:
    """Threads ``parallel=True`` runs on (numba's, bounded by ``NUMBA_NUM_THREADS``)."""
    import numba

    return int(numba.get_num_threads())


def readme_table(curve: Curve) -> list[str]:
    """The batched curve as the README's markdown table."""
    lines = ["| num_envs | InTuneVectorEnv steps/s | CartPoleVectorEnv steps/s | ratio |",
             "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {n} | {c:,.0f} | {r:,.0f} | {ratio:.2f} |" for n, c, r, ratio in curve]
    return lines


def sb3_table(timesteps: int, n_envs: int) -> list[tuple[str, str, int, float, str]]:
    import torch
    from stable_baselines3 import A2C, DQN, PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from intune_env.sb3_vecenv import make_sb3_vec_env

    torch.set_num_threads(1)  # small MLPs: threads only contend on a 2-CPU machine
    dummy, ours = "DummyVecEnv (single envs)", "SB3VecEnv (InTuneVectorEnv)"
    makers = {dummy: lambda: DummyVecEnv([lambda: gym.make("InTune-v0")] * n_envs),
              ours: lambda: make_sb3_vec_env(num_envs=n_envs)}
    rows: list[tuple[str, str, int, float, str]] = []
    for algo, kwargs in ((PPO, {"n_steps": 128, "batch_size": 256, "n_epochs": 4}),
                         (A2C, {"n_steps": 8}),
                         (DQN, {"learning_starts": 1000, "buffer_size": 50_000,
                                "train_freq": 4, "batch_size": 64})):
        rates: dict[str, list[float]] = {dummy: [], ours: []}
        models = {}
        for label, make in makers.items():
            models[label] = algo("MlpPolicy", make(), seed=0, device="cpu", verbose=0,
                                 **kwargs)
            models[label].learn(total_timesteps=max(1, timesteps // 8))  # warm up
        for k in range(2):  # alternate, half the timesteps each time
            for label in (dummy, ours) if k == 0 else (ours, dummy):
                t0 = time.perf_counter()
                models[label].learn(total_timesteps=timesteps // 2, reset_num_timesteps=False)
                rates[label].append(timesteps // 2 / (time.perf_counter() - t0))
        base = statistics.mean(rates[dummy])
        for label in (dummy, ours):
            rate = statistics.mean(rates[label])
            rows.append((algo.__name__, label, n_envs, rate, f"{rate / base:.2f}"))
        for model in models.values():
            model.get_env().close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15,
                    help="alternating rounds per pair (twice as many for single envs)")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[1, 16, 256, 1024, 4096, 16384],
                    help="batched env sizes")
    ap.add_argument("--no-startup", action="store_true",
                    help="skip the cold/warm first-make subprocesses")
    ap.add_argument("--no-sb3", action="store_true", help="skip the SB3 training rates")
    ap.add_argument("--parallel", action="store_true",
                    help="also measure InTuneVectorEnv(parallel=True) at every size")
    ap.add_argument("--sb3-timesteps", type=int, default=32768)
    ap.add_argument("--sb3-envs", type=int, default=16)
    args = ap.parse_args(argv)
    if args.rounds < 1 or min(args.num_envs) < 1 or args.sb3_timesteps < 1 or args.sb3_envs < 1:
        print("step_rate: --rounds, --num-envs, --sb3-timesteps and --sb3-envs must be >= 1",
              file=sys.stderr)
        return 2
    print(f"machine: {machine()}")
    print(f"{'env':<46}{'num_envs':>9}{'steps/s':>14}  ratio to CartPole reference")
    rows = [] if args.no_startup else startup_rows()
    curve: Curve = []
    for name, n, rate, ratio in rows + env_table(args.rounds, args.num_envs, args.parallel,
                                                 curve):
        shown = "" if rate != rate else f"{rate:,.0f}"
        print(f"{name:<46}{n:>9}{shown:>14}  {ratio}")
    print()
    print("README (batched, single process, single-threaded kernel: parallel=False; "
          f"median of {args.rounds} alternating rounds):")
    print("\n".join(readme_table(curve)))
    if not args.no_sb3:
        print()
        print(f"{'algo':<6}{'vec env':<30}{'n_envs':>7}{'train steps/s':>15}  vs DummyVecEnv")
        for algo, label, n, rate, ratio in sb3_table(args.sb3_timesteps, args.sb3_envs):
            print(f"{algo:<6}{label:<30}{n:>7}{rate:>15,.0f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
