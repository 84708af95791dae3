"""Agents by name: ``make_agent("autotune", env, seed)``.

Each entry is imported lazily, so a module that is missing or broken only matters when
its agent is asked for, and then gives one clear line (:class:`AgentUnavailableError`).

Names (``AGENT_NAMES``):

- ``qlearning``: InTune's tabular Q-learning agent starting from the shipped pretrained
  table (or ``model_path``); it keeps learning online during an episode, as InTune does
  when deployed;
- ``qlearning-scratch``: the same agent starting from an empty table, learning online;
- ``autotune``: a tf.data AUTOTUNE-like tuner; ``plumber``: a Plumber-like tuner;
- ``static``/``even`` (the machine split evenly), ``min`` (one CPU per stage),
  ``random``, ``oracle`` (reads the oracle's allocation: an upper bound, not a tuner);
- ``ppo``, ``a2c``, ``dqn``, ``maskable-ppo``: Stable-Baselines3 policies; they need a
  trained model (``model_path``, see :mod:`agents.sb3_agents`).
"""

from __future__ import annotations

import importlib
import inspect
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym

from agents.base import Agent
from agents.plugins import PluginError
from agents.sb3_files import ModelFileError
from simulators import ScenarioError
from simulators.fileio import InputFileError


class UnknownAgentError(ValueError):
    """The agent name is not registered; the message lists the known names."""


class AgentUnavailableError(ValueError):
    """The agent is registered but cannot be built here (missing module, model, package)."""


#: Exceptions that are a user's fault wherever they surface (a command's boundary, or a
#: run of ``intune compare``): a bad scenario, file (hyperparameters, model), plugin or
#: agent name. The command line prints them as one line and exits 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ScenarioError, InputFileError, ModelFileError, PluginError, UnknownAgentError,
    AgentUnavailableError, FileNotFoundError, zipfile.BadZipFile)


#: Stable-Baselines3 algorithms (registry name -> algorithm key of ``sb3.yaml``).
SB3_AGENTS: dict[str, str] = {"ppo": "ppo", "a2c": "a2c", "dqn": "dqn",
                              "maskable-ppo": "maskable_ppo"}

#: name -> (module, class name, fixed keyword arguments).
_NATIVE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qlearning": ("agents.qlearning", "QLearningAgent", {}),
    "qlearning-scratch": ("agents.qlearning", "QLearningAgent", {}),
    "qlearning-frozen": ("agents.qlearning", "FrozenQLearningAgent", {}),
    "qlearning-rule": ("agents.qlearning", "RuleAgent", {}),
    "autotune": ("agents.autotune", "AutotuneAgent", {}),
    "plumber": ("agents.plumber", "PlumberAgent", {}),
    "static": ("agents.static", "EvenAgent", {}),
    "even": ("agents.static", "EvenAgent", {}),
    "min": ("agents.static", "MinAgent", {}),
    "random": ("agents.static", "RandomAgent", {}),
    "oracle": ("agents.static", "OracleAgent", {}),
}

#: Every name :func:`make_agent` accepts, in a stable order.
AGENT_NAMES: tuple[str, ...] = (*_NATIVE, *SB3_AGENTS)

#: Agents that learn and can be trained with ``intune train``.
TRAINABLE: tuple[str, ...] = ("qlearning", "qlearning-scratch", *SB3_AGENTS)

# Extra agents registered at run time (tests, plug-ins): name -> factory.
_EXTRA: dict[str, Callable[..., Agent]] = {}


def register_agent(name: str, factory: Callable[..., Agent]) -> None:
    """Register ``factory(env, seed, model_path=None, **kwargs) -> Agent`` under ``name``.

    Factories must be importable by module path (top-level functions or classes) if the
    agent is used in a parallel ``compare``: worker processes re-import them. A built-in
    name cannot be replaced (``oracle`` replaced by a plugin kept its description and
    silently changed every comparison's reference).
    """
    if name in AGENT_NAMES:
        raise ValueError(f"agent {name!r} is built in; register the agent under another name")
    _EXTRA[name] = factory


def known_agents() -> list[str]:
    """Built-in and registered agent names."""
    return [*AGENT_NAMES, *(n for n in _EXTRA if n not in AGENT_NAMES)]


def check_agent_name(name: str) -> str:
    """Return ``name`` if it is known, else raise :class:`UnknownAgentError` (one line)."""
    if name in AGENT_NAMES or name in _EXTRA:
        return name
    raise UnknownAgentError(
        f"unknown agent {name!r}; expected one of {', '.join(known_agents())}")


def _import_class(name: str, module: str, attr: str) -> type[Agent]:
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise AgentUnavailableError(
            f"agent {name!r} is not available: cannot import {module} ({err})") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise AgentUnavailableError(
            f"agent {name!r} is not available: {module} has no {attr}") from None


def _construct(cls: type[Agent], env: gym.Env, seed: int | None, **kwargs: Any) -> Agent:
    """Call ``cls`` with the subset of ``env``/``seed``/``kwargs`` its signature takes."""
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = {"env": env, "seed": seed, **kwargs}
    chosen = {k: v for k, v in offered.items() if takes_any or k in params}
    dropped = sorted(set(kwargs) - set(chosen))
    if dropped:
        raise TypeError(f"{cls.__name__} does not accept {', '.join(dropped)}")
    return cls(**chosen)


def _make_qlearning(name: str, cls: Any, seed: int | None,
                    model_path: str | Path | None, **kwargs: Any) -> Agent:
    if model_path is not None:
        return cls.load(model_path, seed=seed, **kwargs)
    if name == "qlearning":
        return cls.pretrained(seed=seed, **kwargs)
    return cls(seed=seed, **kwargs)


def ensure_available(name: str) -> None:
    """Import what agent ``name`` needs now, so a missing module fails before a long run.

    Raises :class:`UnknownAgentError` or :class:`AgentUnavailableError` (one line each).
    """
    check_agent_name(name)
    if name in _EXTRA:
        return
    if name in SB3_AGENTS:
        _import_sb3(name)
        return
    module, attr, _ = _NATIVE[name]
    _import_class(name, module, attr)


def _import_sb3(name: str) -> Any:
    try:
        from agents.sb3_agents import SB3Agent
    except ImportError as err:
        raise AgentUnavailableError(
            f"agent {name!r} needs stable-baselines3 and sb3-contrib "
            f"(pip install 'intune[sb3]'): {err}") from None
    return SB3Agent


def make_agent(name: str, env: gym.Env, seed: int | None = None,
               model_path: str | Path | None = None, *, trust_model: bool = False,
               **kwargs: Any) -> Agent:
    """Build the agent ``name`` for ``env``.

    ``seed`` seeds the agent's own randomness; ``model_path`` loads learned state (an SB3
    ``.zip``, a Q-table file). ``trust_model`` allows an SB3 model whose files need
    unpickling (legacy ``.vecnormalize.pkl``, custom serialized objects), which can run
    code: only for files from someone you trust (``--trust-model``). Raises
    :class:`UnknownAgentError` for an unknown name, :class:`AgentUnavailableError` if its
    module, package or model is missing, and
    :class:`agents.sb3_files.ModelFileError` for an unusable SB3 model file.
    """
    check_agent_name(name)
    if name in _EXTRA:
        return _EXTRA[name](env, seed, model_path=model_path, **kwargs)
    if name in SB3_AGENTS:
        if model_path is None:
            raise AgentUnavailableError(
                f"agent {name!r} needs a trained model: train one with `intune train "
                f"--agent {name}` and pass its .zip (--model PATH)")
        return _import_sb3(name).load(model_path, algo=SB3_AGENTS[name],
                                      trust_model=trust_model, env=env)
    module, attr, fixed = _NATIVE[name]
    cls = _import_class(name, module, attr)
    if name.startswith("qlearning"):
        return _make_qlearning(name, cls, seed, model_path, **fixed, **kwargs)
    if model_path is not None:
        if not _has_own_load(cls):
            raise AgentUnavailableError(
                f"agent {name!r} learns nothing, so it takes no model file (--model)")
        return cls.load(model_path)
    return _construct(cls, env, seed, **fixed, **kwargs)


def _has_own_load(cls: type[Agent]) -> bool:
    return getattr(cls.load, "__func__", None) is not getattr(Agent.load, "__func__", None)


#: One line per built-in agent, for ``intune agents``.
_DESCRIPTIONS: dict[str, str] = {
    "qlearning": "InTune's tabular Q-learning, from the shipped pretrained table; learns "
                 "online",
    "qlearning-scratch": "InTune's tabular Q-learning from an empty table; learns online",
    "qlearning-frozen": "ablation: the pretrained Q-table, greedy, never updated online",
    "qlearning-rule": "ablation: the Q-learning agent's perception and shield with a fixed "
                      "rule, no table",
    "autotune": "a tf.data AUTOTUNE-like tuner (default mode max_parallelism, as tf.data)",
    "plumber": "a Plumber-like tuner (models stage rates, solves for an allocation)",
    "static": "the machine's CPUs split evenly across stages, never changed",
    "even": "same as static: an even split, never changed",
    "min": "one CPU per stage, never changed (a lower bound)",
    "random": "a random valid move every step (seeded)",
    "oracle": "the oracle's allocation every step: an upper bound, not a tuner",
    "ppo": "Stable-Baselines3 PPO; needs a trained model (intune train --agent ppo)",
    "a2c": "Stable-Baselines3 A2C; needs a trained model (intune train --agent a2c)",
    "dqn": "Stable-Baselines3 DQN; needs a trained model (intune train --agent dqn)",
    "maskable-ppo": "sb3-contrib MaskablePPO (never picks an invalid move); needs a "
                    "trained model",
}


def agent_descriptions() -> dict[str, str]:
    """Agent name -> one line (built-in and registered agents), for ``intune agents``.

    A registered agent's line is the first line of its factory's docstring, if any.
    """
    out: dict[str, str] = {}
    for name in known_agents():
        if name in _DESCRIPTIONS:
            out[name] = _DESCRIPTIONS[name]
        elif name in _NATIVE:  # added without a line here: the class docstring's first
            module, attr, _ = _NATIVE[name]
            try:
                doc = inspect.getdoc(_import_class(name, module, attr)) or ""
            except AgentUnavailableError as err:
                doc = str(err)
            out[name] = doc.splitlines()[0] if doc else f"{module}.{attr}"
        else:
            doc = inspect.getdoc(_EXTRA[name]) or ""
            out[name] = doc.splitlines()[0] if doc else "registered at run time"
    return out
