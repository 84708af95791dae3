"""Stable-Baselines3 ``VecEnv`` over the batched :class:`~intune_env.vector.InTuneVectorEnv`.

    from stable_baselines3 import PPO
    from intune_env.sb3_vecenv import SB3VecEnv, make_sb3_vec_env

    venv = make_sb3_vec_env(num_envs=64, scenario="dlrm-criteo")
    PPO("MlpPolicy", venv).learn(100_000)

SB3 conventions: ``step_wait`` returns ``(obs, rewards, dones, infos)`` with
``dones = terminated | truncated``; a done sub-env is reset in the same step (the batched
env runs in ``AutoresetMode.SAME_STEP`` under this adapter), its last observation is
``infos[i]["terminal_observation"]``, and every step ``infos[i]["TimeLimit.truncated"]``
tells a time-limit truncation from an out-of-memory termination, as SB3's
``DummyVecEnv`` does (``tests/test_vector.py`` checks the two give the same data).
Each ``infos[i]`` also holds the batched env's per-step info keys for sub-env ``i``
(``intune_env.vector.INFO_KEYS``: throughput, oom, oracle_throughput, allocation,
memory_bytes, invalid_action); on a done step those are the final step's values.
``seed()`` and ``set_options()`` apply at the next ``reset()``, as in SB3.

There are no sub-env objects: ``get_attr``/``set_attr``/``env_method`` act on the
batched env and return its answer once per requested index, except
``env_method("action_masks")``, which returns each sub-env's own mask (what
``sb3_contrib.MaskablePPO`` asks for).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from intune_env.vector import INFO_KEYS, InTuneVectorEnv


def make_sb3_vec_env(num_envs: int = 8, max_episode_steps: int | None = 600,
                     **config: Any) -> SB3VecEnv:
    """An :class:`SB3VecEnv` over a new ``InTuneVectorEnv(num_envs, **config)``."""
    return SB3VecEnv(InTuneVectorEnv(num_envs=num_envs, max_episode_steps=max_episode_steps,
                                     autoreset_mode=AutoresetMode.SAME_STEP, **config))


class SB3VecEnv(VecEnv):
    """Adapts a batched InTune env to SB3's ``VecEnv`` API (see the module docstring).

    Args:
        venv: an :class:`InTuneVectorEnv` (or ``gym.make_vec("InTune-v0", ...)``) in
            ``SAME_STEP`` autoreset mode (``make_sb3_vec_env`` builds one); a
            ``NEXT_STEP`` env is rebuilt in ``SAME_STEP`` mode with the same arguments.
    """

    def __init__(self, venv: Any) -> None:
        inner = getattr(venv, "unwrapped", venv)
        if not isinstance(inner, InTuneVectorEnv):
            raise TypeError(f"SB3VecEnv needs an InTuneVectorEnv, got {type(inner).__name__}")
        if inner.metadata.get("autoreset_mode") is not AutoresetMode.SAME_STEP:
            inner = InTuneVectorEnv(
                num_envs=inner.num_envs, scenario=inner.scenario,
                max_episode_steps=inner.max_episode_steps,
                autoreset_mode=AutoresetMode.SAME_STEP,
                **{k: v for k, v in inner.single_env.config.items()},
            )
            venv.close()
        self.venv = inner
        super().__init__(inner.num_envs, inner.single_observation_space,
                         inner.single_action_space)
        self._actions: np.ndarray | None = None

    # --- VecEnv API ----------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seeds = list(self._seeds)
        seed: list[int | None] | None = None if all(s is None for s in seeds) else seeds
        options = self._options[0] if self._options and self._options[0] else None
        obs, info = self.venv.reset(seed=seed, options=options)
        self.reset_infos = self._split(info)
        self._reset_seeds()
        self._reset_options()
        return np.ascontiguousarray(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs).astype(np.int64, copy=False)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("SB3VecEnv: step_async() must come before step_wait()")
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        infos = self._split(info.get("final_info", info) if dones.any() else info)
        for d, t in zip(infos, (truncated & ~terminated).tolist(), strict=True):
            d["TimeLimit.truncated"] = t  # every step, as DummyVecEnv
        if dones.any():
            final_obs = info["final_obs"]
            for i in np.flatnonzero(dones).tolist():
                infos[i]["terminal_observation"] = final_obs[i]
                self.reset_infos[i] = {}
        return (np.ascontiguousarray(obs), rewards.astype(np.float32), dones, infos)

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        idx = list(self._get_indices(indices))
        if method_name == "action_masks":
            return [result[i] for i in idx]
        return [result for _ in idx]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]

    def action_masks(self) -> np.ndarray:
        """Valid actions of every sub-env, ``(num_envs, 2n + 1)`` bool."""
        return self.venv.action_masks()

    # --- helpers -------------------------------------------------------------------------
    def _split(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        """Batched info (dict of arrays) to one dict per sub-env (the INFO_KEYS)."""
        columns = [(key, info[key].tolist()) for key in INFO_KEYS if key in info]
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for key, values in columns:
            for d, v in zip(infos, values, strict=True):
                d[key] = v
        return infos

    def _get_indices(self, indices: VecEnvIndices) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices
