"""Stable-Baselines3 baselines on `InTune-v0`: PPO, A2C, DQN and MaskablePPO.

Training (:func:`train_sb3`) follows rl-baselines3-zoo practice:

- hyperparameters come from ``agents/hyperparams/sb3.yaml`` (one mapping per algorithm);
- the training envs are wrapped in ``Monitor`` and, where the YAML says
  ``normalize``, in ``VecNormalize`` (running mean/std of observations, and of returns for
  the on-policy algorithms);
- an ``EvalCallback`` scores the deterministic policy on a *separate* env (other seed,
  normalisation frozen) a few times during training and keeps the best model;
- the result is saved in SB3's own formats: ``NAME.zip`` (the model),
  ``NAME.vecnormalize.pkl`` (the ``VecNormalize`` statistics, when used) and a small
  ``NAME.json`` (algorithm, scenario, seed, budget, hyperparameters, when the kept model
  was found).

MaskablePPO (sb3-contrib) sees the env's invalid-action mask (``info["action_mask"]``,
computed from ``env.unwrapped.sim``) so it never wastes a step on a move the env rejects.

:class:`SB3Agent` wraps a saved model as an :class:`agents.base.Agent`: ``act`` applies
the saved normalisation statistics and returns ``model.predict(obs, deterministic=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from sb3_contrib.common.wrappers import ActionMasker
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import Agent
from intune_env import common

#: The YAML file shipped with the package.
HYPERPARAMS_PATH = Path(__file__).parent / "hyperparams" / "sb3.yaml"

#: Algorithm key of the YAML -> SB3 class.
ALGOS: dict[str, type[BaseAlgorithm]] = {
    "ppo": PPO, "a2c": A2C, "dqn": DQN, "maskable_ppo": MaskablePPO,
}

#: YAML keys that configure the training loop rather than the SB3 constructor.
_LOOP_KEYS = ("n_timesteps", "compare_n_timesteps", "n_envs", "normalize", "policy",
              "n_evaluations", "n_eval_episodes")

_ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "elu": torch.nn.ELU}


def canonical_algo(name: str) -> str:
    """``maskable-ppo`` (registry spelling) -> ``maskable_ppo`` (YAML key)."""
    key = name.replace("-", "_").lower()
    if key not in ALGOS:
        raise ValueError(f"unknown SB3 algorithm {name!r}; expected one of "
                         f"{', '.join(a.replace('_', '-') for a in ALGOS)}")
    return key


def load_hyperparams(algo: str, path: str | Path | None = None) -> dict[str, Any]:
    """The YAML mapping of ``algo`` (a copy), from ``path`` or the shipped file.

    Raises ``ValueError`` with one line if the file is unreadable or lacks ``algo``.
    """
    algo = canonical_algo(algo)
    p = Path(path) if path is not None else HYPERPARAMS_PATH
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise ValueError(f"{p}: cannot read hyperparameter file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{p}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict) or not isinstance(data.get(algo), dict):
        raise ValueError(f"{p}: no mapping for algorithm {algo!r} (expected a top-level "
                         f"key {algo}: with n_timesteps, policy, ...)")
    return dict(data[algo])


def _mask_fn(env: gym.Env) -> np.ndarray:
    sim = env.unwrapped.sim  # type: ignore[attr-defined]
    return common.action_mask(sim.allocation, sim.max_cpus, sim.cpus)


def _env_factory(scenario: Any, masked: bool, env_kwargs: dict[str, Any],
                 max_episode_steps: int | None) -> Callable[[], gym.Env]:
    def make() -> gym.Env:
        kwargs = dict(env_kwargs)
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        env: gym.Env = gym.make("InTune-v0", scenario=scenario, **kwargs)
        if masked:
            env = ActionMasker(env, _mask_fn)
        return Monitor(env)
    return make


def build_vec_env(scenario: Any, n_envs: int, seed: int, *, normalize: dict[str, Any] | None,
                  masked: bool = False, training: bool = True,
                  env_kwargs: dict[str, Any] | None = None,
                  max_episode_steps: int | None = None) -> VecEnv:
    """``n_envs`` monitored copies of InTune-v0 in a DummyVecEnv, seeded from ``seed``.

    With ``normalize`` (``VecNormalize`` keyword arguments) the vector env is wrapped in
    ``VecNormalize``; ``training=False`` freezes the statistics and returns raw rewards
    (for evaluation envs).
    """
    fns = [_env_factory(scenario, masked, env_kwargs or {}, max_episode_steps)
           for _ in range(n_envs)]
    venv: VecEnv = DummyVecEnv(fns)
    venv.seed(seed)
    if normalize:
        venv = VecNormalize(venv, training=training, **normalize)
        if not training:
            venv.norm_reward = False
    return venv


class TqdmCallback(BaseCallback):
    """A tqdm progress bar over training timesteps (no dependency on rich)."""

    def __init__(self, total: int, desc: str = "train") -> None:
        super().__init__()
        self.total, self.desc = total, desc
        self._bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        rollout = getattr(self.model, "n_steps", 0) * self.model.n_envs
        if rollout:  # on-policy algorithms collect whole rollouts: the budget rounds up
            self.total = -(-self.total // rollout) * rollout
        self._bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)

    def _advance(self) -> None:
        done = self.model.num_timesteps
        if done > self._bar.total:  # on-policy rollouts round the budget up
            self._bar.total = done
        self._bar.update(done - self._bar.n)

    def _on_step(self) -> bool:
        self._advance()
        return True

    def _on_training_end(self) -> None:
        self._advance()
        self._bar.close()


class _SaveStatsOnBest(BaseCallback):
    """Called by EvalCallback on a new best: keep the matching VecNormalize statistics."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.best_step = -1

    def _on_step(self) -> bool:
        self.best_step = int(self.model.num_timesteps)
        vn = self.model.get_vec_normalize_env()
        if vn is not None:
            vn.save(str(self.path))
        return True


@dataclass
class TrainResult:
    """Where a trained model went and how training went."""

    model_path: Path
    algo: str
    scenario: str
    seed: int
    n_timesteps: int
    kept: str  # "best_eval@STEP" or "final"
    best_eval_reward: float | None
    wall_s: float


def _policy_kwargs(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    kw = dict(raw)
    act = kw.get("activation_fn")
    if isinstance(act, str):
        if act.lower() not in _ACTIVATIONS:
            raise ValueError(f"policy_kwargs.activation_fn: unknown {act!r}; expected one of "
                             f"{', '.join(_ACTIVATIONS)}")
        kw["activation_fn"] = _ACTIVATIONS[act.lower()]
    return kw


def _normalize_kwargs(raw: Any) -> dict[str, Any] | None:
    if raw is True:
        return {"norm_obs": True, "norm_reward": True}
    if not raw:
        return None
    return dict(raw)


def scenario_label(scenario: Any) -> str:
    """A readable name for a scenario spec (built-in name, file, dict or Scenario)."""
    from simulators import load_scenario

    return load_scenario(scenario).name


def train_sb3(algo: str, scenario: Any, out: str | Path, *, seed: int = 0,
              n_timesteps: int | None = None, hyperparams_path: str | Path | None = None,
              overrides: dict[str, Any] | None = None,
              tensorboard_log: str | Path | None = None, progress_bar: bool = False,
              env_kwargs: dict[str, Any] | None = None,
              max_episode_steps: int | None = None, num_threads: int | None = 1,
              verbose: int = 0) -> TrainResult:
    """Train ``algo`` on ``scenario`` and save it as ``out`` (a ``.zip`` path).

    ``n_timesteps`` overrides the YAML budget and ``overrides`` any other YAML key. The
    training envs are seeded from ``1000 * seed + 1``, the evaluation env from
    ``1000 * seed + 501``, so neither replays the noise of the evaluation episode
    ``reset(seed=seed)`` that ``intune compare`` scores. ``env_kwargs`` go to ``gym.make``
    (reward weights, scenario overrides) and ``max_episode_steps`` replaces the 600-step
    limit (short episodes for tests). ``num_threads`` sets torch's
    intra-op threads (1 is fastest for these small networks and shares a small machine
    well; ``None`` leaves torch's setting alone).
    """
    algo = canonical_algo(algo)
    hp = load_hyperparams(algo, hyperparams_path)
    hp.update(overrides or {})
    total = int(n_timesteps if n_timesteps is not None else hp["n_timesteps"])
    if total < 1:
        raise ValueError(f"n_timesteps must be at least 1, got {total}")
    n_envs = int(hp.get("n_envs", 1))
    normalize = _normalize_kwargs(hp.get("normalize"))
    masked = algo == "maskable_ppo"
    n_evals = int(hp.get("n_evaluations", 10))
    n_eval_episodes = int(hp.get("n_eval_episodes", 2))
    kwargs = {k: v for k, v in hp.items() if k not in _LOOP_KEYS}
    if "policy_kwargs" in kwargs:
        kwargs["policy_kwargs"] = _policy_kwargs(kwargs["policy_kwargs"])
    if num_threads is not None:
        torch.set_num_threads(num_threads)

    out = Path(out)
    if out.suffix != ".zip":
        out = out.with_suffix(".zip")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_env = build_vec_env(scenario, n_envs, 1000 * seed + 1, normalize=normalize,
                              masked=masked, env_kwargs=env_kwargs,
                              max_episode_steps=max_episode_steps)
    eval_env = build_vec_env(scenario, 1, 1000 * seed + 501, normalize=normalize,
                             masked=masked, training=False, env_kwargs=env_kwargs,
                             max_episode_steps=max_episode_steps)
    model = ALGOS[algo](hp.get("policy", "MlpPolicy"), train_env, seed=seed, device="cpu",
                        verbose=verbose,
                        tensorboard_log=None if tensorboard_log is None else str(tensorboard_log),
                        **kwargs)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".train-") as tmp:
        tmpd = Path(tmp)
        on_best = _SaveStatsOnBest(tmpd / "best_model.vecnormalize.pkl")
        eval_cls = MaskableEvalCallback if masked else EvalCallback
        eval_cb = eval_cls(eval_env, callback_on_new_best=on_best,
                           n_eval_episodes=n_eval_episodes,
                           eval_freq=max(total // (n_evals * n_envs), 1),
                           best_model_save_path=str(tmpd), deterministic=True, verbose=0,
                           warn=False)
        callbacks: list[BaseCallback] = [eval_cb]
        if progress_bar:
            callbacks.append(TqdmCallback(total, desc=f"{algo} {scenario_label(scenario)}"))
        model.learn(total_timesteps=total, callback=CallbackList(callbacks),
                    tb_log_name=f"{algo}_seed{seed}")
        # Score the final policy too; keep whichever scored best on the eval env.
        final_reward = _evaluate(model, eval_env, train_env, n_eval_episodes, masked)
        best = eval_cb.best_mean_reward if on_best.best_step >= 0 else -np.inf
        if best > final_reward and (tmpd / "best_model.zip").exists():
            kept, kept_reward = f"best_eval@{on_best.best_step}", float(best)
            model = ALGOS[algo].load(tmpd / "best_model.zip", device="cpu")
            stats = tmpd / "best_model.vecnormalize.pkl"
            vn = _load_stats(stats) if stats.exists() else None
        else:
            kept, kept_reward = "final", float(final_reward)
            vn = model.get_vec_normalize_env()
        agent = SB3Agent(model, algo, obs_stats=vn)
        meta = {"algo": algo, "scenario": scenario_label(scenario), "seed": seed,
                "n_timesteps": total, "kept": kept, "eval_reward": kept_reward,
                "hyperparams": hp}
        agent.save(out, meta=meta)
    train_env.close()
    eval_env.close()
    return TrainResult(out, algo, meta["scenario"], seed, total, kept, kept_reward,
                       time.perf_counter() - start)


def _evaluate(model: BaseAlgorithm, eval_env: VecEnv, train_env: VecEnv, n: int,
              masked: bool) -> float:
    from stable_baselines3.common.vec_env import sync_envs_normalization

    if isinstance(train_env, VecNormalize):
        sync_envs_normalization(train_env, eval_env)
    if masked:
        from sb3_contrib.common.maskable.evaluation import evaluate_policy as evaluate
    else:
        from stable_baselines3.common.evaluation import evaluate_policy as evaluate
    mean, _ = evaluate(model, eval_env, n_eval_episodes=n, deterministic=True, warn=False)
    return float(mean)


class _SpacesOnly(gym.Env):
    """Carries the spaces of saved VecNormalize statistics; never stepped."""

    def __init__(self, observation_space: gym.Space) -> None:
        self.observation_space = observation_space
        self.action_space = gym.spaces.Discrete(1)


def _load_stats(path: Path) -> VecNormalize:
    with open(path, "rb") as fh:
        vn = pickle.load(fh)  # SB3's own format (VecNormalize.save), trusted local file
    space = vn.observation_space
    vn.set_venv(DummyVecEnv([lambda: _SpacesOnly(space)]))  # restores what save() needs
    vn.training = False
    return vn


def sidecar_paths(model_path: str | Path) -> tuple[Path, Path, Path]:
    """(model ``.zip``, ``.vecnormalize.pkl``, ``.json``) paths of a saved model."""
    p = Path(model_path)
    stem = p.with_suffix("") if p.suffix == ".zip" else p
    return (stem.with_suffix(".zip"), Path(f"{stem}.vecnormalize.pkl"), Path(f"{stem}.json"))


class SB3Agent(Agent):
    """A trained SB3 policy as an :class:`Agent` (deterministic actions, frozen stats)."""

    def __init__(self, model: BaseAlgorithm, algo: str, obs_stats: VecNormalize | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.model = model
        self.algo = canonical_algo(algo)
        self.name = self.algo.replace("_", "-")
        self.obs_stats = obs_stats
        self.meta = dict(meta or {})
        self.masked = self.algo == "maskable_ppo"

    def _normalise(self, obs: np.ndarray) -> np.ndarray:
        if self.obs_stats is None or not self.obs_stats.norm_obs:
            return obs
        return self.obs_stats.normalize_obs(np.asarray(obs, dtype=np.float32)).astype(np.float32)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        o = self._normalise(obs)
        if self.masked:
            action, _ = self.model.predict(o, deterministic=True,
                                           action_masks=np.asarray(info["action_mask"]))
        else:
            action, _ = self.model.predict(o, deterministic=True)
        return int(action)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write ``PATH.zip`` (+ ``.vecnormalize.pkl``, ``.json``) atomically; return the zip."""
        zpath, spath, mpath = sidecar_paths(path)
        zpath.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, **(meta or {}), "algo": self.algo,
                "normalized": self.obs_stats is not None}
        tmp = zpath.parent / f".{zpath.stem}.{os.getpid()}.tmp.zip"
        self.model.save(tmp)
        if self.obs_stats is not None:
            stmp = spath.parent / f".{spath.name}.{os.getpid()}.tmp"
            self.obs_stats.save(str(stmp))
            os.replace(stmp, spath)
        else:
            with contextlib.suppress(FileNotFoundError):
                spath.unlink()
        _write_atomic(mpath, json.dumps(meta, indent=2, default=str))
        os.replace(tmp, zpath)  # last: the zip's presence marks a complete model
        self.meta = meta
        return zpath

    @classmethod
    def load(cls, path: str | Path, algo: str | None = None) -> SB3Agent:
        """Load a model saved by :meth:`save` or :func:`train_sb3` (or any SB3 zip + algo)."""
        zpath, spath, mpath = sidecar_paths(path)
        if not zpath.exists():
            raise FileNotFoundError(f"{zpath}: no such model file")
        meta = json.loads(mpath.read_text()) if mpath.exists() else {}
        saved_algo = meta.get("algo")
        if algo is not None and saved_algo is not None and \
                canonical_algo(algo) != canonical_algo(saved_algo):
            raise ValueError(f"{zpath}: model was trained with {saved_algo}, not {algo}")
        if saved_algo is None and algo is None:
            raise ValueError(f"{zpath}: no {mpath.name} next to it; say which algorithm "
                             f"trained it (ppo, a2c, dqn, maskable-ppo)")
        chosen = canonical_algo(saved_algo or algo or "")
        model = ALGOS[chosen].load(zpath, device="cpu")
        stats = _load_stats(spath) if spath.exists() else None
        return cls(model, chosen, obs_stats=stats, meta=meta)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def result_dict(result: TrainResult) -> dict[str, Any]:
    """A JSON-friendly view of a :class:`TrainResult`."""
    d = asdict(result)
    d["model_path"] = str(result.model_path)
    return d
