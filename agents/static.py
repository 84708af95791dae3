"""Static baselines and the oracle upper bound.

- ``even`` (:class:`EvenAgent`): the machine's CPUs split evenly over the stages, capped
  by each stage's ``max_cpus`` (what a user without a tuner does; the env's default
  start). ``static`` is a convenience alias for ``even``.
- ``min`` (:class:`MinAgent`): one CPU per stage.
- ``random`` (:class:`RandomAgent`): a random valid allocation (``1 <= k_i <= max_cpus_i``,
  ``sum(k) <= cpus``) drawn at each episode start from the agent's seeded generator.
- ``oracle`` (:class:`OracleAgent`): applies ``info["oracle_allocation"]`` every step,
  the best static allocation under the current conditions; the upper bound, and the
  only agent that reads the ``oracle_*`` keys.

The static agents choose their allocation at the episode start (machine size as it is
then), apply it at the first step and hold it: they never react to events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.base import Agent, Allocation
from intune_env.intune import even_allocation


class _HeldAllocation(Agent):
    """Applies :meth:`choose` once at the first step, then does nothing."""

    def choose(self, info: dict[str, Any]) -> list[int]:
        raise NotImplementedError

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        self.allocation = [int(k) for k in self.choose(info)]
        self._applied = False

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        if self._applied:
            return 0
        self._applied = True
        return Allocation(self.allocation)


class EvenAgent(_HeldAllocation):
    """The machine's CPUs split evenly over stages (capped by ``max_cpus``), held."""

    name = "even"

    def choose(self, info: dict[str, Any]) -> list[int]:
        return even_allocation(int(info["cpus_total"]), [int(k) for k in info["max_cpus"]])


class MinAgent(_HeldAllocation):
    """One CPU per stage, held."""

    name = "min"

    def choose(self, info: dict[str, Any]) -> list[int]:
        return [1] * len(info["max_cpus"])


def random_allocation(rng: np.random.Generator, cpus: int, max_cpus: Sequence[int]) -> list[int]:
    """A random valid allocation: 1 CPU each, then a uniform number of extra CPUs, each
    given to a uniformly chosen stage still below its ``max_cpus``."""
    n = len(max_cpus)
    alloc = [1] * n
    room = min(max(int(cpus) - n, 0), sum(int(m) - 1 for m in max_cpus))
    for _ in range(int(rng.integers(0, room + 1))):
        open_ = [i for i in range(n) if alloc[i] < max_cpus[i]]
        alloc[open_[int(rng.integers(len(open_)))]] += 1
    return alloc


class RandomAgent(_HeldAllocation):
    """A random valid allocation per episode from a generator seeded with ``seed``, held.

    Each episode draws a new allocation from the same generator, so a sequence of episodes
    is reproducible. ``seed=None`` means 0 (all randomness is seeded).
    """

    name = "random"

    def __init__(self, seed: int | None = 0) -> None:
        self.seed = 0 if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)

    def choose(self, info: dict[str, Any]) -> list[int]:
        return random_allocation(self.rng, int(info["cpus_total"]),
                                 [int(k) for k in info["max_cpus"]])


class OracleAgent(Agent):
    """Applies ``info["oracle_allocation"]`` whenever it differs from the current one."""

    name = "oracle"

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        target = [int(k) for k in info["oracle_allocation"]]
        if target == [int(k) for k in info["allocation"]]:
            return 0
        return Allocation(target)


#: Registry names of this module's agents (``static`` is an alias of ``even``).
STATIC_AGENTS: dict[str, type[Agent]] = {
    "even": EvenAgent,
    "static": EvenAgent,
    "min": MinAgent,
    "random": RandomAgent,
    "oracle": OracleAgent,
}

__all__ = ["STATIC_AGENTS", "EvenAgent", "MinAgent", "OracleAgent", "RandomAgent",
           "random_allocation"]
