"""One run: (scenario, agent, seed) -> metrics and trace. Executes in a worker process.

SB3 agents without a model first train one on the same scenario (training envs use
other noise seeds than the evaluation episode, see :func:`agents.sb3_agents.train_sb3`)
and cache it where the grid said, so a resumed grid never retrains it.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents import registry
from agents.compare.grid import RUN_FORMAT, RunSpec
from agents.compare.metrics import episode_metrics
from simulators import load_scenario

#: ``report(run_key, steps_done, steps_total)``: training progress of an SB3 run.
ProgressFn = Callable[[str, int, int], None]


def _train(spec: RunSpec, scenario: Any, progress: ProgressFn | None) -> float:
    from agents.sb3_agents import ProgressCallback, train_sb3

    assert spec.model_path is not None and spec.train_steps is not None
    cb = None
    if progress is not None:
        key = spec.key
        cb = ProgressCallback(spec.train_steps, lambda d, t: progress(key, d, t),
                              every=max(512, spec.train_steps // 50))
    res = train_sb3(registry.SB3_AGENTS[spec.agent], scenario, spec.model_path,
                    seed=spec.seed, n_timesteps=spec.train_steps,
                    hyperparams_path=spec.hyperparams_path, num_threads=1, callback=cb)
    return res.wall_s


def execute_run(spec: RunSpec, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run one (scenario, agent, seed): train the SB3 model first if needed; return the
    result dict (metrics + trace + fingerprint). Writes no result file."""
    import intune_env  # noqa: F401  (registers InTune-v0 in a spawned process)
    from agents.base import episode_steps, run_episode

    scenario = load_scenario(spec.scenario_data)
    dt = scenario.control_interval_s
    n_steps = episode_steps(spec.duration_s, dt)
    train_wall = 0.0
    model_path = spec.model_path
    if spec.agent in registry.SB3_AGENTS and model_path is not None \
            and not Path(model_path).exists():
        if spec.train_steps is None:
            raise FileNotFoundError(f"{model_path}: no trained model for {spec.agent}")
        train_wall = _train(spec, scenario, progress)
    start = time.perf_counter()
    env = gym.make("InTune-v0", scenario=scenario, max_episode_steps=n_steps)
    if spec.factory is not None:
        agent = spec.factory(env, spec.seed, model_path=model_path)
    else:
        agent = registry.make_agent(spec.agent, env, seed=spec.seed, model_path=model_path,
                                    trust_model=spec.trust_model)
    cpus: list[int] = []
    oracle_alloc: list[list[int]] = []
    env = _Recorder(env, cpus, oracle_alloc)
    trace = run_episode(env, agent, seed=spec.seed, learn=True)
    wall = time.perf_counter() - start
    metrics = episode_metrics(trace.time_s, trace.fraction, trace.memory_fraction,
                              trace.throughput, trace.oom, n_steps, dt)
    return {
        "format": RUN_FORMAT, "fingerprint": spec.fingerprint,
        "scenario": spec.scenario, "agent": spec.agent, "seed": spec.seed, **metrics,
        "wall_s": wall, "train_wall_s": train_wall, "steps": len(trace.time_s),
        "invalid_actions": trace.invalid,
        "duration_s": spec.duration_s, "control_interval_s": dt,
        "trace": {
            "time_s": trace.time_s,
            "fraction": [None if not np.isfinite(x) else float(x) for x in trace.fraction],
            "throughput": trace.throughput,
            "oracle_throughput": [x if math.isfinite(x) else None
                                  for x in trace.oracle_throughput],
            "memory_fraction": trace.memory_fraction,
            "allocation": trace.allocation,
            "cpus_total": cpus,
            "oracle_allocation": oracle_alloc,
            "stage_names": list(scenario.stage_names),
        },
    }


class _Recorder(gym.Wrapper):
    """Keeps the machine size and oracle allocation of every step (for plots)."""

    def __init__(self, env: gym.Env, cpus: list[int], oracle: list[list[int]]) -> None:
        super().__init__(env)
        self._cpus, self._oracle = cpus, oracle

    def step(self, action: Any) -> Any:
        out = self.env.step(action)
        info = out[4]
        self._cpus.append(int(info["cpus_total"]))
        self._oracle.append([int(k) for k in info["oracle_allocation"]])
        return out


def guarded(spec: RunSpec, pin_threads: bool = True,
            progress: ProgressFn | None = None) -> dict[str, Any]:
    """:func:`execute_run` with errors turned into data (and, in a worker, torch pinned
    to one thread: one run per core); a user's fault is marked ``_user_error``."""
    if pin_threads and spec.agent in registry.SB3_AGENTS:
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
    try:
        return execute_run(spec, progress)
    except registry.USER_ERRORS as err:  # bad input found in the run: the command exits 2
        return {"_error": str(err), "_user_error": True}
    except Exception as err:  # reported per run; the grid goes on
        return {"_error": f"{type(err).__name__}: {err}",
                "_traceback": traceback.format_exc()}
