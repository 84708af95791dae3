"""The interface every tuner implements, and the loop that runs one on an env.

An agent sees only what the env exposes publicly: the observation and the ``info`` dict
(measurements a real tuner could take; agents other than ``oracle`` must not read the
``oracle_*`` keys). Per step it returns either

- an ``int`` action of the env's ``Discrete(2N + 1)`` space (InTune, SB3), or
- an :class:`Allocation`, a whole CPU allocation applied at once through the env's
  public ``set_allocation`` method (tf.data AUTOTUNE and Plumber publish whole
  configurations; this path may oversubscribe the machine, actions never do).

Learning agents learn from :meth:`Agent.observe`, called after every step.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np


class Allocation(tuple[int, ...]):
    """A whole allocation (CPUs per stage) returned by :meth:`Agent.act`."""

    __slots__ = ()


class Agent(abc.ABC):
    """Base class of tuners. Subclasses implement :meth:`act`; learners also :meth:`observe`."""

    #: Registry name used by the CLI (``--agent NAME``).
    name: str = ""

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:  # noqa: B027
        """Called at the start of every episode, with the first observation."""

    @abc.abstractmethod
    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        """The next action (or whole allocation) given the last observation and info."""

    def observe(self, obs: np.ndarray, action: int | Allocation, reward: float,  # noqa: B027
                next_obs: np.ndarray, next_info: dict[str, Any], terminated: bool,
                truncated: bool) -> None:
        """Learn from one transition. Default: nothing (non-learning tuners)."""

    def save(self, path: str | Path) -> Path:
        """Write the agent's learned state. Non-learning agents have none to save."""
        raise NotImplementedError(f"agent {self.name!r} has no learned state to save")

    @classmethod
    def load(cls, path: str | Path) -> Agent:
        raise NotImplementedError(f"agent {cls.name!r} has no learned state to load")


@dataclass
class EpisodeTrace:
    """What one episode looked like, step by step (after each step)."""

    time_s: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    oracle_throughput: list[float] = field(default_factory=list)
    memory_fraction: list[float] = field(default_factory=list)
    allocation: list[list[int]] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    invalid: int = 0
    oom: bool = False
    wall_s: float = 0.0

    @property
    def fraction(self) -> np.ndarray:
        """Throughput over oracle throughput per step (nan where the oracle is unknown)."""
        t = np.asarray(self.throughput, dtype=float)
        o = np.asarray(self.oracle_throughput, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(o > 0, t / o, np.nan)


def apply(env: gym.Env, choice: int | Allocation) -> int:
    """Turn an agent's choice into an env action (applying whole allocations first)."""
    if isinstance(choice, Allocation):
        env.unwrapped.set_allocation(list(choice))  # type: ignore[attr-defined]
        return 0
    return int(choice)


#: Most training steps one training run takes (`intune train --steps`, an SB3 file's
#: ``n_timesteps``): days at the SB3 agents' few thousand steps/s (10**13 was accepted
#: and would have run for years).
MAX_TRAIN_STEPS = 10**8


def episode_steps(duration_s: float, dt: float) -> int:
    """Control steps of an episode of ``duration_s`` simulated seconds at interval ``dt``
    (at least one): what ``intune run``, ``eval`` and ``compare`` run, and bound."""
    return max(1, round(duration_s / dt))


def run_episode(env: gym.Env, agent: Agent, seed: int | None = None,
                max_steps: int | None = None, learn: bool = True,
                options: dict[str, Any] | None = None) -> EpisodeTrace:
    """Run ``agent`` on ``env`` for one episode (or ``max_steps`` steps) and trace it.

    With ``learn=True`` the agent's :meth:`Agent.observe` is called after each step, so
    an online learner keeps adapting, as InTune does when deployed.
    """
    trace = EpisodeTrace()
    start = time.perf_counter()
    obs, info = env.reset(seed=seed, options=options)
    agent.reset(obs, info)
    steps = 0
    while max_steps is None or steps < max_steps:
        choice = agent.act(obs, info)
        next_obs, reward, terminated, truncated, next_info = env.step(apply(env, choice))
        if learn:
            agent.observe(obs, choice, float(reward), next_obs, next_info, terminated,
                          truncated)
        trace.time_s.append(float(next_info["sim_time_s"]))
        trace.throughput.append(float(next_info["throughput"]))
        trace.oracle_throughput.append(float(next_info.get("oracle_throughput", np.nan)))
        trace.memory_fraction.append(
            next_info["memory_bytes"] / next_info["memory_capacity_bytes"])
        trace.allocation.append(list(next_info["allocation"]))
        trace.reward.append(float(reward))
        trace.invalid += bool(next_info.get("invalid_action", False))
        obs, info = next_obs, next_info
        steps += 1
        if terminated or truncated:
            trace.oom = bool(next_info.get("oom", False))
            break
    trace.wall_s = time.perf_counter() - start
    return trace
