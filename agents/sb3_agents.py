"""Stable-Baselines3 baselines on `InTune-v0`: PPO, A2C, DQN and MaskablePPO.

Training (:func:`train_sb3`) follows rl-baselines3-zoo practice:

- hyperparameters come from ``agents/hyperparams/sb3.yaml`` (one mapping per algorithm);
- the training envs are wrapped in ``Monitor`` and, where the YAML says
  ``normalize``, in ``VecNormalize`` (running mean/std of observations, and of returns for
  the on-policy algorithms);
- an ``EvalCallback`` scores the deterministic policy on a *separate* env (other seed,
  normalisation frozen) a few times during training and keeps the best model;
- the training envs are, by default, one batched ``InTuneVectorEnv`` behind the
  :class:`~intune_env.sb3_vecenv.SB3VecEnv` adapter (``vec_env="batched"``); sub-env
  ``i`` is the single env seeded ``seed + i``, as in a ``DummyVecEnv`` of ``gym.make``
  copies (``vec_env="dummy"``, kept for comparison and for custom wrappers);
- the result is saved as ``NAME.zip`` (SB3's archive), ``NAME.vecnormalize.json`` (the
  observation statistics, when used; JSON, never pickle) and ``NAME.json`` (what the model
  was trained on: algorithm, scenario, stage names, observation/action shapes, budget,
  hyperparameters); see :mod:`agents.sb3_files`, which loads them without unpickling.

MaskablePPO (sb3-contrib) asks the env for ``action_masks()`` (the batched env and its
adapter provide it), so it never wastes a step on a move the env rejects.

:class:`SB3Agent` wraps a saved model as an :class:`agents.base.Agent`: ``act`` applies
the saved normalisation statistics and returns ``model.predict(obs, deterministic=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import itertools
import math
import pickle
import tempfile
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import gymnasium as gym
import numpy as np
import torch
from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from sb3_contrib.common.wrappers import ActionMasker
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, VecNormalize

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import MAX_TRAIN_STEPS, Agent
from agents.sb3_files import (
    LEGACY_STATS_SUFFIX,
    SIDECAR_VERSION,
    ModelFileError,
    ObsStats,
    echo_path,
    load_obs_stats,
    model_paths,
    read_json_file,
    read_model_zip,
    safe_custom_objects,
    serialized_n,
    serialized_shape,
)
from intune_env import common
from simulators.fileio import (
    InputFileError,
    echo,
    read_text_limited,
    write_bytes_atomic,
    write_json_atomic,
)
from simulators.scenario import ExponentFloat, ScenarioError, StrictModel, parse_yaml

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

    Raises :class:`HyperparamError` (a ``ValueError``) with one line if the file is
    unreadable, lacks ``algo`` or holds a bad key or value.
    """
    algo = canonical_algo(algo)
    p = Path(path) if path is not None else HYPERPARAMS_PATH
    try:
        # the scenario loader: `3e-4` is a number (YAML 1.1 reads it as a string), and
        # duplicate keys, octal `010` and base-60 `1:30` are refused, not misread
        data = plain_numbers(parse_yaml(read_text_limited(p, what="hyperparameter file"),
                                        echo_path(p)))
    except (InputFileError, ScenarioError) as err:
        raise HyperparamError(str(err)) from None
    if not isinstance(data, dict) or not isinstance(data.get(algo), dict):
        raise HyperparamError(f"{echo_path(p)}: no mapping for algorithm {algo!r} (expected "
                              f"a top-level key {algo}: with n_timesteps, policy, ...)")
    hp = dict(data[algo])
    check_hyperparams(algo, hp, f"{echo_path(p)}: {algo}")
    return hp


def plain_numbers(value: Any) -> Any:
    """``value`` with every exponent-only YAML number (``1e5``, ``3e-4``) a plain ``int`` or
    ``float``, in nested mappings and lists too.

    The scenario loader returns them as a ``float`` subclass that remembers its text;
    SB3, pickling and JSON want plain numbers. A whole number written without a decimal
    point (``1e5``) is an integer, as scenario files read it: ``n_timesteps: 1e5``.
    """
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    if isinstance(value, ExponentFloat):
        number = float(value)
        whole = (math.isfinite(number) and number.is_integer() and "." not in value.text
                 and "-" not in value.text.lstrip("+-"))
        return int(number) if whole else number
    return value


class HyperparamError(InputFileError):
    """A hyperparameter file (or override) with a bad key or value; one line naming the
    file and the key. A user's fault wherever it surfaces (also inside a compare run)."""


#: Largest on-policy rollout, n_steps * n_envs transitions: SB3 allocates the whole
#: buffer up front (~200 bytes a transition with 8 stages' observations and action
#: masks, and copies it once to shuffle), so 2**20 is about half a GB; the shipped
#: file uses 2,048.
MAX_ROLLOUT = 2**20
#: Largest DQN replay buffer (SB3's default): obs + next_obs of every transition are
#: allocated up front, ~250 bytes each.
MAX_BUFFER_SIZE = 10**6
#: Largest minibatch: DQN samples (and copies) this many transitions every gradient step;
#: more than 65,536 is a whole rollout or most of a replay buffer, not a minibatch.
MAX_BATCH_SIZE = 2**16

_Fraction = Annotated[float, Field(ge=0, le=1)]
_Count = Annotated[StrictInt, Field(ge=1)]


class HyperparamRanges(StrictModel):
    """The valid range of every common PPO, A2C and DQN hyperparameter (SB3's meanings).

    Keys a file leaves out are not checked (SB3's defaults are valid); keys of one
    algorithm that another does not take are refused before (unknown hyperparameter).
    """

    model_config = ConfigDict(extra="ignore")

    learning_rate: float = Field(default=3e-4, gt=0)
    gamma: float = Field(default=0.99, gt=0, le=1)
    gae_lambda: _Fraction = 0.95
    tau: float = Field(default=1.0, gt=0, le=1)
    exploration_fraction: _Fraction = 0.1
    exploration_initial_eps: _Fraction = 1.0
    exploration_final_eps: _Fraction = 0.05
    clip_range: float = Field(default=0.2, gt=0)
    clip_range_vf: float | None = Field(default=None, gt=0)
    target_kl: float | None = Field(default=None, gt=0)
    ent_coef: float = Field(default=0.0, ge=0)
    vf_coef: float = Field(default=0.5, ge=0)
    max_grad_norm: float = Field(default=0.5, gt=0)
    rms_prop_eps: float = Field(default=1e-5, gt=0)
    n_steps: StrictInt = Field(default=1, ge=1, le=MAX_ROLLOUT)
    batch_size: StrictInt = Field(default=64, ge=1, le=MAX_BATCH_SIZE)
    n_epochs: _Count = 10
    buffer_size: StrictInt = Field(default=1, ge=1, le=MAX_BUFFER_SIZE)
    target_update_interval: _Count = 1
    stats_window_size: _Count = 100
    learning_starts: StrictInt = Field(default=0, ge=0)
    # a description is the expected value in words, where the bounds alone do not tell
    train_freq: StrictInt = Field(default=4, ge=1,
                                  description="an integer >= 1 or [n, 'step' | 'episode']")
    gradient_steps: StrictInt = Field(
        default=1, ge=-1, description="-1 (as many as steps collected) or an integer >= 1")

    @field_validator("train_freq", mode="before")
    @classmethod
    def _train_freq_unit(cls, v: Any) -> Any:
        # SB3 also takes [n, "step" | "episode"]: the count is checked like an int
        if isinstance(v, list | tuple):
            if len(v) != 2 or v[1] not in ("step", "episode"):
                raise ValueError("not [n, unit]")
            return v[0]
        return v

    @field_validator("gradient_steps")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:  # SB3 then never trains
            raise ValueError("0")
        return v


class NormalizeSettings(StrictModel):
    """``normalize: {...}``: the ``VecNormalize`` arguments a file may set (SB3's
    defaults). ``training`` is the loop's to set; ``norm_obs_keys`` needs dict
    observations, and InTune's are one vector."""

    norm_obs: StrictBool = True
    norm_reward: StrictBool = True
    clip_obs: float = Field(default=10.0, gt=0)
    clip_reward: float = Field(default=10.0, gt=0)
    # the discount of the running return that scales rewards: 1 would never forget
    gamma: float = Field(default=0.99, ge=0, lt=1)
    # added to the variance before the square root: 0 divides by zero on a constant input
    epsilon: float = Field(default=1e-8, gt=0)


def _expected(model: type[StrictModel], key: str) -> str:
    """``"a number in (0, 1]"``, ``"an integer from 1 to 4,096"``...: ``key``'s range in
    words."""
    field = model.model_fields[key]
    if field.description:
        return field.description
    args = typing.get_args(field.annotation) or (field.annotation,)
    if bool in args:
        return "true or false"
    kind = "a number" if float in args else "an integer"
    bound = {name: getattr(m, name) for m in field.metadata for name in ("gt", "ge", "lt", "le")
             if getattr(m, name, None) is not None}
    low = ("(", bound["gt"]) if "gt" in bound else ("[", bound["ge"]) if "ge" in bound \
        else None
    high = (bound["lt"], ")") if "lt" in bound else (bound["le"], "]") if "le" in bound \
        else None
    if kind == "an integer" and low and high:
        return f"an integer from {low[1]:,} to {high[0]:,}"
    if low and high:
        return f"{kind} in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    if low:
        return f"{kind} {'>' if low[0] == '(' else '>='} {low[1]:g}"
    return kind


def check_ranges(hp: dict[str, Any], where: str,
                 model: type[StrictModel] = HyperparamRanges) -> None:
    """:class:`HyperparamError` naming ``where.KEY`` and its range for the first value of
    ``hp`` outside ``model`` (or a key it does not have, if it forbids extra keys)."""
    try:
        model.model_validate(hp)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0])
        if first["type"] == "extra_forbidden":
            raise HyperparamError(f"{where}.{echo(key)}: unknown key; expected one of "
                                  f"{', '.join(model.model_fields)}") from None
        raise HyperparamError(f"{where}.{echo(key)}: expected {_expected(model, key)}, got "
                              f"{echo(repr(hp[key]))}") from None


#: Constructor arguments train_sb3 sets itself (a file may not).
_SET_BY_TRAINING = ("env", "seed", "device", "verbose", "tensorboard_log", "policy",
                    "_init_setup_model")
#: Constructor arguments that take a class or its arguments (code, or sizes the checks
#: below could not see): SB3 picks the buffer for the algorithm, as a loaded model does.
_NOT_SETTABLE = ("rollout_buffer_class", "rollout_buffer_kwargs", "replay_buffer_class",
                 "replay_buffer_kwargs")
#: policy_kwargs a file may set, per algorithm: what each SB3 policy's constructor takes
#: (MaskablePPO's has no log_std_init, DQN's neither ortho_init); classes such as
#: optimizer_class would be code.
_POLICY_KWARGS: dict[str, tuple[str, ...]] = {
    "ppo": ("net_arch", "activation_fn", "ortho_init", "log_std_init"),
    "a2c": ("net_arch", "activation_fn", "ortho_init", "log_std_init"),
    "maskable_ppo": ("net_arch", "activation_fn", "ortho_init"),
    "dqn": ("net_arch", "activation_fn"),
}
#: Largest n_envs (copies of the env held in memory at once).
MAX_N_ENVS = 4096
#: Widest hidden layer: observations are at most 28 numbers (8 stages), so 4,096 units
#: is already far more than a policy for them needs (the shipped file uses 64 and 256).
MAX_LAYER_WIDTH = 4096
#: Most hidden layers of one network.
MAX_LAYERS = 8
#: Most weights between the hidden layers of one network (2**24: [4096, 4096]): with
#: gradients and Adam's two moments, 16M weights are ~256 MB, and PPO has two networks
#: and DQN a target copy. Eight layers of 4,096 would be ~2 GB each.
MAX_NET_WEIGHTS = 2**24


def _first_nonfinite(value: Any, at: str) -> tuple[str, float] | None:
    """Where (``at.KEY...``) and what the first NaN or infinity in ``value`` is."""
    if isinstance(value, float) and not math.isfinite(value):
        return at, value
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _first_nonfinite(v, at if isinstance(value, list) else f"{at}.{echo(str(k))}")
        if found:
            return found
    return None


def _check_net_arch(algo: str, net_arch: Any, at: str) -> None:
    """``net_arch`` as SB3 takes it for ``algo``: a list of layer widths, or for the
    actor-critic algorithms ``{pi: [...], vf: [...]}`` (separate policy and value
    networks; a missing key is no hidden layer). ``null`` is SB3's default."""
    if net_arch is None:
        return
    dict_ok = algo != "dqn"  # DQN's QNetwork takes one list of widths
    expected = "a list of layer widths" + (" or {pi: [...], vf: [...]}" if dict_ok else "")
    if isinstance(net_arch, dict) and dict_ok:
        for key in net_arch:
            if key not in ("pi", "vf"):
                raise HyperparamError(f"{at}.{echo(str(key))}: unknown key; expected pi (the "
                                      f"policy network) or vf (the value network)")
        nets = {f"{at}.{k}": v for k, v in net_arch.items()}
    else:
        nets = {at: net_arch}
    for where, layers in nets.items():
        if not isinstance(layers, list):
            what = expected if where == at else "a list of layer widths"
            raise HyperparamError(f"{where}: expected {what}, got {echo(repr(layers))}")
        if len(layers) > MAX_LAYERS:
            raise HyperparamError(f"{where}: expected at most {MAX_LAYERS} hidden layers, "
                                  f"got {len(layers)}")
        for i, width in enumerate(layers):
            if isinstance(width, bool) or not isinstance(width, int) or \
                    not 1 <= width <= MAX_LAYER_WIDTH:
                raise HyperparamError(f"{where}[{i}]: expected a layer width, an integer from 1 "
                                      f"to {MAX_LAYER_WIDTH:,}, got {echo(repr(width))}")
        weights = sum(a * b for a, b in itertools.pairwise(layers))
        if weights > MAX_NET_WEIGHTS:
            raise HyperparamError(f"{where}: {weights:,} weights between the hidden layers; "
                                  f"expected at most {MAX_NET_WEIGHTS:,} (e.g. [4096, 4096])")


def _check_policy_kwargs(algo: str, pk: Any, at: str) -> None:
    if not isinstance(pk, dict):
        raise HyperparamError(f"{at}: expected a mapping, got {echo(repr(pk))}")
    allowed = _POLICY_KWARGS[algo]
    for key in pk:
        if key not in allowed:
            raise HyperparamError(f"{at}.{echo(str(key))}: not settable from a file for "
                                  f"{algo}; expected one of {', '.join(allowed)}")
    _check_net_arch(algo, pk.get("net_arch"), f"{at}.net_arch")
    act = pk.get("activation_fn", "tanh")
    if not isinstance(act, str) or act.lower() not in _ACTIVATIONS:
        raise HyperparamError(f"{at}.activation_fn: expected one of "
                              f"{', '.join(_ACTIVATIONS)}, got {echo(repr(act))}")
    if not isinstance(pk.get("ortho_init", True), bool):
        raise HyperparamError(f"{at}.ortho_init: expected true or false, got "
                              f"{echo(repr(pk['ortho_init']))}")
    log_std = pk.get("log_std_init", 0.0)
    if isinstance(log_std, bool) or not isinstance(log_std, int | float):
        raise HyperparamError(f"{at}.log_std_init: expected a number, got {echo(repr(log_std))}")


def _check_normalize(value: Any, at: str) -> None:
    """``normalize``: true, false (or null) or a mapping of :class:`NormalizeSettings`."""
    if value is None or isinstance(value, bool):
        return
    if not isinstance(value, dict):
        raise HyperparamError(f"{at}: expected true, false or a mapping of VecNormalize "
                              f"settings ({', '.join(NormalizeSettings.model_fields)}), got "
                              f"{echo(repr(value))}")
    check_ranges(value, at, NormalizeSettings)


def check_hyperparams(algo: str, hp: dict[str, Any], where: str) -> None:
    """``ValueError`` naming ``where.KEY`` unless ``hp`` is a usable mapping for ``algo``.

    Keys are the loop keys or the SB3 constructor's own arguments; counts are integers
    in range; numbers are finite (nested ones too); sizes that SB3 allocates up front are
    bounded; no value names code (schedules and classes cannot be given in a file).
    """
    params = inspect.signature(ALGOS[algo].__init__).parameters
    allowed = set(_LOOP_KEYS) | (set(params) - set(_SET_BY_TRAINING) - {"self"})
    for key, value in hp.items():
        at = f"{where}.{echo(str(key))}"
        if key not in allowed:
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            raise HyperparamError(f"{at}: unknown hyperparameter"
                                  + (f"; did you mean {near[0]!r}?" if near else
                                     f" (not an argument of {ALGOS[algo].__name__})"))
        if key in _NOT_SETTABLE:
            raise HyperparamError(f"{at}: not settable from a file (SB3 picks the buffer; "
                                  f"its size is n_steps or buffer_size)")
        found = _first_nonfinite(value, at)
        if found:
            raise HyperparamError(f"{found[0]}: expected a finite number, got {found[1]!r}")
        # the constructor's default tells the type (SB3 checks few of them itself); the
        # range table types its own keys
        default = params[key].default if key in params and \
            key not in HyperparamRanges.model_fields else None
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, int):  # a count (DQN's train_freq may also be [n, unit])
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                key == "train_freq" and isinstance(value, list))
            expected = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            expected = "a number"
        else:
            ok, expected = True, ""
        if not ok:
            raise HyperparamError(f"{at}: expected {expected}, got {echo(repr(value))}")
    check_ranges(hp, where)
    if "n_timesteps" not in hp:
        raise HyperparamError(f"{where}.n_timesteps: required (the training budget in env steps)")
    for key, lo, hi in (("n_timesteps", 1, MAX_TRAIN_STEPS),
                        ("compare_n_timesteps", 1, MAX_TRAIN_STEPS),
                        ("n_envs", 1, MAX_N_ENVS), ("n_evaluations", 1, 10**4),
                        ("n_eval_episodes", 1, 10**4)):
        v = hp.get(key, lo)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise HyperparamError(f"{where}.{key}: expected an integer from {lo} to "
                                  f"{hi:,}, got {echo(repr(v))}")
    if hp.get("policy", "MlpPolicy") != "MlpPolicy":
        raise HyperparamError(f"{where}.policy: expected MlpPolicy (observations are one "
                              f"vector), got {echo(repr(hp['policy']))}")
    # sizes SB3 allocates from two keys at once; absent keys count as SB3's defaults
    # (DQN takes n_steps only from stable-baselines3 2.7 on: 1-step returns before it)
    size = {k: hp.get(k, params[k].default) if k in params else 1
            for k in ("n_steps", "batch_size")}
    if algo != "dqn" and size["n_steps"] * hp.get("n_envs", 1) > MAX_ROLLOUT:
        raise HyperparamError(f"{where}.n_steps: n_steps * n_envs = "
                              f"{size['n_steps'] * hp.get('n_envs', 1):,} transitions a "
                              f"rollout; expected at most {MAX_ROLLOUT:,} (the buffer is "
                              f"allocated up front)")
    if algo == "dqn" and size["n_steps"] * size["batch_size"] > MAX_ROLLOUT:
        # n-step returns gather [batch_size, n_steps] arrays every gradient step
        raise HyperparamError(f"{where}.n_steps: n_steps * batch_size = "
                              f"{size['n_steps'] * size['batch_size']:,}; expected at most "
                              f"{MAX_ROLLOUT:,}")
    if hp.get("use_sde"):
        raise HyperparamError(f"{where}.use_sde: expected false (gSDE needs continuous "
                              f"actions; InTune's are discrete)")
    if hp.get("optimize_memory_usage"):
        raise HyperparamError(f"{where}.optimize_memory_usage: expected false (SB3's replay "
                              f"buffer cannot use it with episodes cut by a time limit)")
    if "policy_kwargs" in hp and hp["policy_kwargs"] is not None:
        _check_policy_kwargs(algo, hp["policy_kwargs"], f"{where}.policy_kwargs")
    _check_normalize(hp.get("normalize"), f"{where}.normalize")


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
        # Only an env without its own action_masks() needs sb3-contrib's wrapper.
        if masked and not hasattr(env.unwrapped, "action_masks"):
            env = ActionMasker(env, _mask_fn)
        return Monitor(env)
    return make


#: Training env kinds of :func:`build_vec_env`.
VEC_ENVS = ("batched", "dummy")


def build_vec_env(scenario: Any, n_envs: int, seed: int, *, normalize: dict[str, Any] | None,
                  masked: bool = False, training: bool = True,
                  env_kwargs: dict[str, Any] | None = None,
                  max_episode_steps: int | None = None, vec_env: str = "batched") -> VecEnv:
    """``n_envs`` copies of InTune-v0 as an SB3 ``VecEnv``, seeded ``seed + i``.

    ``vec_env="batched"`` (default) steps all copies at once in one ``InTuneVectorEnv``
    (:class:`~intune_env.sb3_vecenv.SB3VecEnv`, monitored by ``VecMonitor``);
    ``"dummy"`` is SB3's ``DummyVecEnv`` of monitored ``gym.make`` envs. With
    ``normalize`` (``VecNormalize`` keyword arguments) the vector env is wrapped in
    ``VecNormalize``; ``training=False`` freezes the statistics and returns raw rewards
    (for evaluation envs).
    """
    if vec_env not in VEC_ENVS:
        raise ValueError(f"vec_env must be one of {', '.join(VEC_ENVS)}, got {echo(vec_env)}")
    venv: VecEnv
    if vec_env == "batched":
        from gymnasium.vector import AutoresetMode

        from intune_env.sb3_vecenv import SB3VecEnv
        from intune_env.vector import InTuneVectorEnv

        inner = InTuneVectorEnv(num_envs=n_envs, scenario=scenario,
                                max_episode_steps=600 if max_episode_steps is None
                                else max_episode_steps,
                                autoreset_mode=AutoresetMode.SAME_STEP, **(env_kwargs or {}))
        venv = VecMonitor(SB3VecEnv(inner))
    else:
        fns = [_env_factory(scenario, masked, env_kwargs or {}, max_episode_steps)
               for _ in range(n_envs)]
        venv = DummyVecEnv(fns)
    venv.seed(seed)
    if normalize:
        venv = VecNormalize(venv, training=training, **normalize)
        if not training:
            venv.norm_reward = False
    return venv


class TqdmCallback(BaseCallback):
    """A tqdm progress bar over training timesteps (no dependency on rich)."""

    def __init__(self, total: int, desc: str = "train", position: int | None = None,
                 leave: bool = True) -> None:
        super().__init__()
        self.total, self.desc = total, desc
        self.position, self.leave = position, leave
        self._bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.total = rounded_budget(self.model, self.total)
        self._bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True,
                         position=self.position, leave=self.leave)

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


class ProgressCallback(BaseCallback):
    """Calls ``report(done, total)`` every ``every`` timesteps (compare's workers)."""

    def __init__(self, total: int, report: Callable[[int, int], None], every: int = 2048) -> None:
        super().__init__()
        self.total, self.report, self.every = total, report, max(1, every)
        self._last = 0

    def _on_training_start(self) -> None:
        self.total = rounded_budget(self.model, self.total)

    def _on_step(self) -> bool:
        if self.model.num_timesteps - self._last >= self.every:
            self._last = self.model.num_timesteps
            self.report(self._last, self.total)
        return True

    def _on_training_end(self) -> None:
        self.report(self.model.num_timesteps, max(self.total, self.model.num_timesteps))


def rounded_budget(model: BaseAlgorithm, total: int) -> int:
    """Timesteps SB3 actually trains for a budget of ``total``: on-policy algorithms
    collect whole rollouts of ``n_steps * n_envs``, so the budget rounds up to one."""
    rollout = getattr(model, "n_steps", 0) * model.n_envs if hasattr(model, "rollout_buffer") \
        else 0
    return -(-total // rollout) * rollout if rollout else total


class _SaveStatsOnBest(BaseCallback):
    """Called by EvalCallback on a new best: keep the matching observation statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.best_step = -1
        self.stats: ObsStats | None = None

    def _on_step(self) -> bool:
        self.best_step = int(self.model.num_timesteps)
        vn = self.model.get_vec_normalize_env()
        self.stats = ObsStats.from_vec_normalize(vn) if vn is not None and vn.norm_obs \
            else None
        return True


@dataclass
class TrainResult:
    """Where a trained model went and how training went.

    ``n_timesteps`` is what SB3 actually trained (a whole number of rollouts for PPO and
    A2C: ``train --steps 512`` with 4 envs x 512 steps trains 2048), ``requested`` the
    budget asked for.
    """

    model_path: Path
    algo: str
    scenario: str
    seed: int
    n_timesteps: int
    kept: str  # "best_eval@STEP" or "final"
    best_eval_reward: float | None
    wall_s: float
    requested: int = 0


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
    """``VecNormalize`` arguments of ``normalize``: ``true`` and a mapping (``{}`` too,
    SB3's defaults) normalise; ``false`` and ``null`` do not."""
    if raw is True:
        return {"norm_obs": True, "norm_reward": True}
    if raw is None or raw is False:
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
              verbose: int = 0, vec_env: str = "batched",
              callback: BaseCallback | None = None) -> TrainResult:
    """Train ``algo`` on ``scenario`` and save it as ``out`` (a ``.zip`` path).

    ``n_timesteps`` overrides the YAML budget and ``overrides`` any other YAML key. The
    training envs are seeded from ``1000 * seed + 1``, the evaluation env from
    ``1000 * seed + 501``, so neither replays the noise of the evaluation episode
    ``reset(seed=seed)`` that ``intune compare`` scores. ``env_kwargs`` go to the env
    (reward weights, scenario overrides) and ``max_episode_steps`` replaces the 600-step
    limit (short episodes for tests). ``num_threads`` sets torch's
    intra-op threads (1 is fastest for these small networks and shares a small machine
    well; ``None`` leaves torch's setting alone). ``vec_env`` picks the training env kind
    (:func:`build_vec_env`); ``callback`` is an extra SB3 callback (progress reports).
    """
    from simulators import load_scenario

    algo = canonical_algo(algo)
    hp = load_hyperparams(algo, hyperparams_path)
    where = f"{echo_path(hyperparams_path or HYPERPARAMS_PATH)}: {algo}"
    if overrides:
        hp.update(plain_numbers(overrides))
        check_hyperparams(algo, hp, f"{echo_path(hyperparams_path or HYPERPARAMS_PATH)} "
                                    f"(with overrides): {algo}")
    requested = int(n_timesteps if n_timesteps is not None else hp["n_timesteps"])
    if requested < 1:
        raise ValueError(f"n_timesteps must be at least 1, got {requested}")
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

    out = model_paths(out)[0]
    if out.is_dir():
        raise ModelFileError(f"{echo(str(out))}: is a folder; expected a model file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    sc = load_scenario(scenario)
    start = time.perf_counter()
    train_env = build_vec_env(sc, n_envs, 1000 * seed + 1, normalize=normalize,
                              masked=masked, env_kwargs=env_kwargs,
                              max_episode_steps=max_episode_steps, vec_env=vec_env)
    eval_env = build_vec_env(sc, 1, 1000 * seed + 501, normalize=normalize,
                             masked=masked, training=False, env_kwargs=env_kwargs,
                             max_episode_steps=max_episode_steps, vec_env=vec_env)
    try:
        model = ALGOS[algo](hp.get("policy", "MlpPolicy"), train_env, seed=seed, device="cpu",
                            verbose=verbose, tensorboard_log=None if tensorboard_log is None
                            else str(tensorboard_log), **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        # a value SB3 itself refuses (a wrong type, gamma above 1, a bad net_arch)
        train_env.close()
        eval_env.close()
        raise HyperparamError(f"{where}: {ALGOS[algo].__name__} refused the hyperparameters: "
                              f"{echo(str(err) or type(err).__name__)}") from None
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".train-") as tmp:
        tmpd = Path(tmp)
        on_best = _SaveStatsOnBest()
        eval_cls = MaskableEvalCallback if masked else EvalCallback
        eval_cb = eval_cls(eval_env, callback_on_new_best=on_best,
                           n_eval_episodes=n_eval_episodes,
                           eval_freq=max(requested // (n_evals * n_envs), 1),
                           best_model_save_path=str(tmpd), deterministic=True, verbose=0,
                           warn=False)
        callbacks: list[BaseCallback] = [eval_cb]
        if progress_bar:
            callbacks.append(TqdmCallback(requested, desc=f"{algo} {sc.name}"))
        if callback is not None:
            callbacks.append(callback)
        model.learn(total_timesteps=requested, callback=CallbackList(callbacks),
                    tb_log_name=f"{algo}_seed{seed}")
        trained = int(model.num_timesteps)
        # Score the final policy too; keep whichever scored best on the eval env.
        final_reward = _evaluate(model, eval_env, train_env, n_eval_episodes, masked)
        best = eval_cb.best_mean_reward if on_best.best_step >= 0 else -np.inf
        final_vn = model.get_vec_normalize_env()
        if best > final_reward and (tmpd / "best_model.zip").exists():
            kept, kept_reward = f"best_eval@{on_best.best_step}", float(best)
            # weights only (torch.load(weights_only=True)): nothing is unpickled
            model.set_parameters(str(tmpd / "best_model.zip"), exact_match=True, device="cpu")
            stats = on_best.stats
        else:
            kept, kept_reward = "final", float(final_reward)
            stats = ObsStats.from_vec_normalize(final_vn) \
                if final_vn is not None and final_vn.norm_obs else None
        agent = SB3Agent(model, algo, obs_stats=stats)
        meta = {"algo": algo, **scenario_meta(sc, model), "seed": seed,
                "n_timesteps": trained, "requested_timesteps": requested, "kept": kept,
                "eval_reward": kept_reward, "hyperparams": hp, "vec_env": vec_env}
        agent.save(out, meta=meta)
    train_env.close()
    eval_env.close()
    return TrainResult(out, algo, sc.name, seed, trained, kept, kept_reward,
                       time.perf_counter() - start, requested)


def scenario_meta(scenario: Any, model: BaseAlgorithm | None = None) -> dict[str, Any]:
    """What the sidecar records about the scenario (and the model's spaces)."""
    meta: dict[str, Any] = {"scenario": scenario.name,
                            "stage_names": list(scenario.stage_names),
                            "n_stages": len(scenario.stage_names)}
    if model is not None:
        meta["observation_shape"] = list(model.observation_space.shape)
        meta["n_actions"] = int(model.action_space.n)
    return meta


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


def sidecar_paths(model_path: str | Path) -> tuple[Path, Path, Path]:
    """(model ``.zip``, ``.vecnormalize.json``, ``.json``) paths of a saved model."""
    return model_paths(model_path)


def _stage_text(names: Any) -> str:
    if isinstance(names, list) and names:
        return f" ({echo(', '.join(str(n) for n in names), 60)})"
    return ""


def check_model_fits(where: str, meta: dict[str, Any], data: dict[str, Any],
                     env: gym.Env) -> None:
    """Refuse (one line) a model whose observation/action layout is not ``env``'s."""
    obs_shape = tuple(meta.get("observation_shape") or serialized_shape(data,
                                                                        "observation_space")
                      or ())
    n_actions = meta.get("n_actions") or serialized_n(data)
    env_obs = tuple(env.observation_space.shape or ())
    env_n = int(getattr(env.action_space, "n", 0))
    if (not obs_shape or obs_shape == env_obs) and (not n_actions or n_actions == env_n):
        return
    inner = env.unwrapped
    sc = getattr(inner, "scenario", None)
    env_names = list(getattr(sc, "stage_names", []) or [])
    m = len(env_names) if env_names else (env_n - 1) // 2
    n = meta.get("n_stages") or ((int(n_actions) - 1) // 2 if n_actions else None)
    trained_on = f" of {echo(str(meta['scenario']), 40)}" if meta.get("scenario") else ""
    sc_name = echo(getattr(sc, "name", "?"), 40)
    if n is not None and n != m:
        raise ModelFileError(
            f"{where}: model trained on {n} stages{_stage_text(meta.get('stage_names'))}"
            f"{trained_on}, scenario {sc_name} has {m} stages"
            f"{_stage_text(env_names)}")
    raise ModelFileError(f"{where}: model takes observations of shape {obs_shape} and "
                         f"{n_actions} actions; scenario {sc_name} gives {env_obs} and "
                         f"{env_n}")


class SB3Agent(Agent):
    """A trained SB3 policy as an :class:`Agent` (deterministic actions, frozen stats)."""

    def __init__(self, model: BaseAlgorithm, algo: str, obs_stats: ObsStats | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.model = model
        self.algo = canonical_algo(algo)
        self.name = self.algo.replace("_", "-")
        self.obs_stats = obs_stats
        self.meta = dict(meta or {})
        self.masked = self.algo == "maskable_ppo"

    def _normalise(self, obs: np.ndarray) -> np.ndarray:
        if self.obs_stats is None:
            return obs
        return self.obs_stats.normalize(obs)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        o = self._normalise(obs)
        if self.masked:
            action, _ = self.model.predict(o, deterministic=True,
                                           action_masks=np.asarray(info["action_mask"]))
        else:
            action, _ = self.model.predict(o, deterministic=True)
        return int(action)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write ``PATH.zip`` (+ ``.vecnormalize.json``, ``.json``) atomically; return the
        zip. The zip is written last: its presence marks a complete model."""
        zpath, spath, mpath = model_paths(path)
        zpath.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, **(meta or {}), "format_version": SIDECAR_VERSION,
                "algo": self.algo, "normalized": self.obs_stats is not None,
                "observation_shape": list(self.model.observation_space.shape),
                "n_actions": int(self.model.action_space.n)}
        buf = io.BytesIO()
        self.model.save(buf)
        if self.obs_stats is not None:
            write_json_atomic(spath, self.obs_stats.to_dict())
        else:
            with contextlib.suppress(FileNotFoundError):
                spath.unlink()
        with contextlib.suppress(FileNotFoundError):  # a stale pickle must not linger
            Path(f"{zpath.with_suffix('')}{LEGACY_STATS_SUFFIX}").unlink()
        write_json_atomic(mpath, meta, indent=2)
        write_bytes_atomic(zpath, buf.getvalue())
        self.meta = meta
        return zpath

    @classmethod
    def load(cls, path: str | Path, algo: str | None = None, *, trust_model: bool = False,
             env: gym.Env | None = None) -> SB3Agent:
        """Load a model saved by :meth:`save` or :func:`train_sb3` (or any SB3 zip + algo).

        Nothing is unpickled unless ``trust_model`` (see :mod:`agents.sb3_files`). With
        ``env`` the model's observation and action layout must match it (else a
        :class:`ModelFileError` naming both stage counts). Every fault in the files is a
        :class:`ModelFileError` with one line.
        """
        where, chosen, meta, raw, custom = read_model_files(path, algo,
                                                            trust_model=trust_model, env=env)
        try:
            with warnings.catch_warnings():
                # torch warns about a refused file's pickle protocol before refusing it;
                # the refusal below is the one line the user gets
                warnings.filterwarnings("ignore", message=".*pickle protocol",
                                        category=UserWarning)
                model = ALGOS[chosen].load(io.BytesIO(raw), device="cpu",
                                           custom_objects=custom)
        except pickle.UnpicklingError:
            raise ModelFileError(f"{where}: the weights hold objects other than tensors; "
                                 f"refused (torch.load weights_only)") from None
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                AssertionError, OSError) as err:
            raise ModelFileError(f"{where}: cannot load the model ({type(err).__name__}: "
                                 f"{echo(str(err).splitlines()[0] if str(err) else '')})") \
                from None
        stats = model_obs_stats(path, meta, trust_model,
                                int(np.prod(model.observation_space.shape)))
        return cls(model, chosen, obs_stats=stats, meta=meta)


def read_model_files(path: str | Path, algo: str | None = None, *,
                     trust_model: bool = False, env: Any = None
                     ) -> tuple[str, str, dict[str, Any], bytes, dict[str, Any] | None]:
    """Check a saved model's files as loading it does, without building the policy:
    ``(where, algo, sidecar, zip bytes, custom_objects)``.

    The sidecar (a JSON object; its ``algo`` must be ``algo``'s), the zip, with ``env``
    (anything with ``observation_space`` and ``action_space``) the layout, and unless
    ``trust_model`` the pickled entries. Every fault is a :class:`ModelFileError` with
    one line. ``intune compare`` calls it for ``--models`` before ``--out`` exists.
    """
    zpath, spath, mpath = model_paths(path)
    where = echo_path(zpath)
    if not zpath.exists():
        raise ModelFileError(f"{where}: no such model file")
    meta: dict[str, Any] = {}
    if mpath.exists():
        raw_meta = read_json_file(mpath, "model sidecar")
        if not isinstance(raw_meta, dict):
            raise ModelFileError(f"{echo_path(mpath)}: model sidecar must be a JSON "
                                 f"object, got {type(raw_meta).__name__}")
        meta = raw_meta
    saved_algo = meta.get("algo")
    if saved_algo is not None and not isinstance(saved_algo, str):
        raise ModelFileError(f"{echo_path(mpath)}: field 'algo' must be a string")
    try:
        if algo is not None and saved_algo is not None and \
                canonical_algo(algo) != canonical_algo(saved_algo):
            raise ModelFileError(f"{where}: model was trained with {echo(saved_algo)}, "
                                 f"not {echo(algo)}")
        if saved_algo is None and algo is None:
            raise ModelFileError(f"{where}: no {mpath.name} next to it; say which "
                                 f"algorithm trained it (ppo, a2c, dqn, maskable-ppo)")
        chosen = canonical_algo(saved_algo or algo or "")
    except ModelFileError:
        raise
    except ValueError as err:
        raise ModelFileError(f"{echo_path(mpath)}: {err}") from None
    raw, data = read_model_zip(zpath)
    if env is not None:
        check_model_fits(where, meta, data, env)
    spaces = (env.observation_space, env.action_space) if env is not None else None
    custom = None if trust_model else safe_custom_objects(data, ALGOS[chosen], spaces,
                                                          where)
    return where, chosen, meta, raw, custom


def model_obs_stats(path: str | Path, meta: dict[str, Any], trust_model: bool,
                    n_obs: int) -> ObsStats | None:
    """The observation statistics saved next to a model (``None`` if it was not
    normalised); :class:`ModelFileError` if they are bad or do not fit ``n_obs``."""
    zpath, spath, _ = model_paths(path)
    normalized = meta.get("normalized")
    legacy = Path(f"{zpath.with_suffix('')}{LEGACY_STATS_SUFFIX}")
    if normalized or (normalized is None and (spath.exists() or legacy.exists())):
        return load_obs_stats(spath, legacy, trust_model, n_obs)
    return None


def result_dict(result: TrainResult) -> dict[str, Any]:
    """A JSON-friendly view of a :class:`TrainResult`."""
    d = asdict(result)
    d["model_path"] = str(result.model_path)
    return d
