"""A Plumber-like tuner (Kuchnik et al., MLSys 2022): measure per-CPU rates, solve an LP.

Plumber traces the pipeline, estimates for every operation ``i`` a per-core rate ``r_i``
(elements produced per CPU-second) and allocates cores by the linear program

    maximise  min_i r_i * theta_i
    s.t.      sum_i theta_i <= cores,  1 <= theta_i <= max_i

(``max_i = 1`` for a sequential operation). It assumes linear scaling, so it cannot see
contention, bandwidth caps, memory or the consumer's rate. (Real Plumber also bounds disk
bandwidth and plans caching; the env exposes no bandwidth measure and no cache, so those
parts are not modelled.)

Measurement: ``r_i = sum(processed_i) / sum(busy_s_i)`` over the measurement window, from
``info["stage_processed"]`` and ``info["stage_busy_s"]`` (busy CPU-seconds: utilisation x
CPUs x interval). Busy time is wall time, so on an oversubscribed machine the rates come
out low; contention and bandwidth caps also lower ``r_i`` at the measured CPU count.

Solving (:func:`solve_lp`): the real LP is solved exactly in closed form (water-filling:
``theta_i(X) = clip(X / r_i, 1, max_i)``, largest ``X`` with ``sum theta_i(X) <= cores``,
found on the piecewise-linear breakpoints). Plumber rounds each ``theta_i`` up, which can
exceed the budget by up to one core per stage; we use instead the exact optimum of the
*integer* problem, found by a greedy water-fill: start at 1 CPU each; repeatedly give one
CPU to the stage with the lowest ``r_i k_i`` until one of the lowest is at its maximum or
the budget is spent; then trim to the least allocation reaching that minimum. It is
optimal: while the current minimum is below the integer optimum ``V*`` the stage it
raises has ``k_i < ceil(V* / r_i)``, so the greedy never exceeds the cheapest allocation
reaching ``V*``, which fits in the budget. Spare cores that cannot raise the minimum are
left unused (they would only add memory). Tests check it against brute force and the
real LP against ``scipy.optimize.linprog``.

When it re-plans: Plumber is an offline optimiser (trace, solve, rewrite the pipeline),
so by default it plans once, after a measurement window of ``window_steps`` control
intervals at the env's starting allocation, and then holds the plan. With
``replan_every_steps`` it re-measures and re-plans periodically (an online variant that
also picks up machine resizes, since ``cores`` is read from ``info["cpus_total"]`` at
each plan).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.base import Agent, Allocation


@dataclass(frozen=True)
class LPSolution:
    """Real LP optimum (``theta``, ``value``); integer optimum (``allocation``, ``int_value``)."""

    theta: tuple[float, ...]
    value: float
    allocation: tuple[int, ...]
    int_value: float
    feasible: bool = True


def _check(rates: Sequence[float], max_cpus: Sequence[int], cores: int) -> tuple[
        np.ndarray, np.ndarray]:
    r = np.asarray(rates, dtype=float)
    m = np.asarray(max_cpus, dtype=int)
    if r.ndim != 1 or r.shape != m.shape or r.size == 0:
        raise ValueError(f"rates and max_cpus must be equal-length non-empty lists, got "
                         f"{r.size} rates and {m.size} max_cpus")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"rates must be finite and > 0, got {list(r)}")
    if np.any(m < 1):
        raise ValueError(f"max_cpus must be >= 1, got {list(m)}")
    if int(cores) < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    return r, m


def lp_theta(rates: Sequence[float], max_cpus: Sequence[int], cores: float) -> tuple[
        np.ndarray, float]:
    """Exact real optimum of the max-min LP by water-filling; ``(theta, value)``.

    If ``cores < len(rates)`` the LP is infeasible and every ``theta_i`` is 1.
    """
    r, m = _check(rates, max_cpus, int(cores))
    n = r.size
    if cores < n:
        return np.ones(n), float(np.min(r))
    cap = float(np.min(r * m))  # no level above the slowest stage at its maximum

    def used(x: float) -> float:
        return float(np.sum(np.clip(x / r, 1.0, m)))

    if used(cap) <= cores:
        level = cap
    else:
        # used(x) is piecewise linear and increasing; bracket x between breakpoints.
        points = np.unique(np.concatenate([r, r * m, [cap]]))
        points = points[points <= cap]
        lo = float(np.min(r))  # used(min r) == n <= cores
        for p in points:
            if used(float(p)) <= cores:
                lo = max(lo, float(p))
        hi = min(float(p) for p in np.append(points, cap) if p > lo)
        # Linear on [lo, hi]: slope = sum of 1/r_i over stages strictly inside their range.
        mid = 0.5 * (lo + hi)
        inside = (mid / r > 1.0) & (mid / r < m)
        slope = float(np.sum(1.0 / r[inside]))
        level = lo + (cores - used(lo)) / slope if slope > 0 else lo
        level = min(level, hi)
    theta = np.clip(level / r, 1.0, m)
    return theta, float(np.min(r * theta))


def integer_allocation(rates: Sequence[float], max_cpus: Sequence[int], cores: int) -> tuple[
        tuple[int, ...], float]:
    """Exact integer optimum of max-min ``r_i k_i`` (greedy water-fill, see module docs)."""
    r, m = _check(rates, max_cpus, cores)
    k = np.ones(r.size, dtype=int)
    left = int(cores) - r.size
    while left > 0:
        level = r * k
        tied = level == level.min()
        if np.any(k[tied] >= m[tied]):
            break  # a bottleneck cannot grow: no spare core raises the minimum
        k[int(np.argmax(tied))] += 1  # ties: the first stage
        left -= 1
    value = float(np.min(r * k))
    # Cores given to tied stages that the budget could not all raise are wasted: trim to
    # the least allocation reaching the same minimum.
    while True:
        shrink = (k > 1) & (r * (k - 1) >= value)
        if not shrink.any():
            break
        k[shrink] -= 1
    return tuple(int(x) for x in k), value


def solve_lp(rates: Sequence[float], max_cpus: Sequence[int], cores: int) -> LPSolution:
    """Plumber's allocation problem: real LP optimum and within-budget integer optimum."""
    r, m = _check(rates, max_cpus, cores)
    if int(cores) < r.size:
        ones = tuple([1] * r.size)
        return LPSolution(tuple([1.0] * r.size), float(np.min(r)), ones, float(np.min(r)),
                          feasible=False)
    theta, value = lp_theta(r, m, cores)
    alloc, int_value = integer_allocation(r, m, cores)
    return LPSolution(tuple(float(t) for t in theta), value, alloc, int_value)


class PlumberAgent(Agent):
    """Plumber-like tuner: measure rates for a window, solve :func:`solve_lp`, hold it.

    Args:
        window_steps: control intervals measured before each plan (default 5 = 10 s).
        replan_every_steps: if set, re-measure and re-plan every this many steps after the
            first plan; ``None`` (default) plans once, as offline Plumber does.
    """

    name = "plumber"

    def __init__(self, window_steps: int = 5, replan_every_steps: int | None = None) -> None:
        if int(window_steps) < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        if replan_every_steps is not None and int(replan_every_steps) < int(window_steps):
            raise ValueError(f"replan_every_steps must be >= window_steps ({window_steps}), "
                             f"got {replan_every_steps}")
        self.window_steps = int(window_steps)
        self.replan_every_steps = None if replan_every_steps is None else int(replan_every_steps)
        self.plans: list[dict[str, Any]] = []

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        n = len(info["max_cpus"])
        self._busy = np.zeros(n)
        self._processed = np.zeros(n)
        self._steps = 0
        self._since_plan = 0
        self._planned = False
        self.plans = []
        self._accumulate(info)  # the reset interval ran the starting allocation: a sample

    def _accumulate(self, info: dict[str, Any]) -> None:
        self._busy += np.asarray(info["stage_busy_s"], dtype=float)
        self._processed += np.asarray(info["stage_processed"], dtype=float)

    def rates(self) -> np.ndarray:
        """Measured samples per busy CPU-second per stage over the current window."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self._busy > 0, self._processed / np.maximum(self._busy, 1e-300),
                            np.nan)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        self._steps += 1
        if self._steps > 1:
            self._accumulate(info)
        self._since_plan += 1
        due = (not self._planned and self._since_plan >= self.window_steps) or (
            self._planned and self.replan_every_steps is not None
            and self._since_plan >= self.replan_every_steps)
        if not due:
            return 0
        r = self.rates()
        if not np.all(np.isfinite(r)) or np.any(r <= 0):
            return 0  # some stage did no work in the window: nothing to plan on yet
        sol = solve_lp(r, info["max_cpus"], int(info["cpus_total"]))
        self.plans.append({"time_s": float(info["sim_time_s"]), "rates": r.tolist(),
                           "theta": sol.theta, "allocation": sol.allocation})
        self._planned = True
        self._since_plan = 0
        self._busy[:] = 0.0
        self._processed[:] = 0.0
        return Allocation(sol.allocation)


__all__ = ["LPSolution", "PlumberAgent", "integer_allocation", "lp_theta", "solve_lp"]
