"""Plumber-like tuner: the LP against scipy, the integer rounding against brute force."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
from scipy.optimize import linprog

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.base import Allocation, apply, run_episode
from agents.plumber import PlumberAgent, integer_allocation, lp_theta, solve_lp


def brute_force(rates: list[float], max_cpus: list[int], cores: int) -> float:
    """Best min_i r_i k_i over every integer allocation within the budget."""
    best = -1.0
    for k in itertools.product(*(range(1, m + 1) for m in max_cpus)):
        if sum(k) <= cores:
            best = max(best, min(r * x for r, x in zip(rates, k, strict=True)))
    return best


def linprog_value(rates: list[float], max_cpus: list[int], cores: int) -> float:
    """max z s.t. z <= r_i theta_i, sum theta <= cores, 1 <= theta_i <= max_i (scipy)."""
    n = len(rates)
    c = np.zeros(n + 1)
    c[-1] = -1.0  # maximise z
    a_ub = np.zeros((n + 1, n + 1))
    b_ub = np.zeros(n + 1)
    for i, r in enumerate(rates):
        a_ub[i, i] = -r
        a_ub[i, -1] = 1.0  # z - r_i theta_i <= 0
    a_ub[n, :n] = 1.0
    b_ub[n] = cores
    bounds = [(1, m) for m in max_cpus] + [(0, None)]
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    assert res.success
    return -res.fun


def test_hand_computed_case() -> None:
    # Rates 10, 20, 40 per CPU, 7 cores, no caps: theta proportional to 1/r, sum 7
    # -> X (1/10 + 1/20 + 1/40) = 7 -> X = 40: theta = (4, 2, 1).
    sol = solve_lp([10.0, 20.0, 40.0], [8, 8, 8], 7)
    assert sol.value == pytest.approx(40.0)
    assert sol.theta == pytest.approx((4.0, 2.0, 1.0))
    assert sol.allocation == (4, 2, 1)
    assert sol.int_value == 40.0


def test_sequential_stage_caps_the_level() -> None:
    # A sequential stage (max 1) at rate 30 caps the objective at 30 whatever the cores.
    sol = solve_lp([10.0, 30.0], [16, 1], 32)
    assert sol.value == pytest.approx(30.0)
    assert sol.allocation == (3, 1)  # spare cores left unused: they cannot raise the min


@pytest.mark.parametrize("seed", range(40))
def test_lp_matches_linprog_and_integer_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5))
    rates = [float(x) for x in rng.uniform(1.0, 50.0, size=n)]
    max_cpus = [int(x) for x in rng.integers(1, 6, size=n)]
    cores = int(rng.integers(n, sum(max_cpus) + 3))
    sol = solve_lp(rates, max_cpus, cores)
    assert sol.value == pytest.approx(linprog_value(rates, max_cpus, cores), rel=1e-7)
    assert sum(sol.theta) <= cores + 1e-9
    assert all(1 - 1e-12 <= t <= m + 1e-12 for t, m in zip(sol.theta, max_cpus, strict=True))
    assert sol.int_value == pytest.approx(brute_force(rates, max_cpus, cores))
    assert sum(sol.allocation) <= cores
    assert all(1 <= k <= m for k, m in zip(sol.allocation, max_cpus, strict=True))
    assert sol.int_value <= sol.value + 1e-9


def test_infeasible_budget_gives_one_each() -> None:
    sol = solve_lp([1.0, 2.0, 3.0], [4, 4, 4], 2)
    assert not sol.feasible and sol.allocation == (1, 1, 1)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="rates must be finite"):
        solve_lp([1.0, 0.0], [2, 2], 4)
    with pytest.raises(ValueError, match="equal-length"):
        integer_allocation([1.0], [2, 2], 4)
    with pytest.raises(ValueError, match="cores"):
        lp_theta([1.0], [2], 0)
    with pytest.raises(ValueError, match="window_steps"):
        PlumberAgent(window_steps=0)


def test_agent_measures_rates_and_plans_once() -> None:
    env = gym.make("InTune-v0", scenario="dlrm-criteo", noise_cv=0.0)
    agent = PlumberAgent(window_steps=5)
    obs, info = env.reset(seed=0)
    agent.reset(obs, info)
    choices = []
    for _ in range(20):
        choice = agent.act(obs, info)
        choices.append(choice)
        obs, _, _, _, info = env.step(apply(env, choice))
    plans = [c for c in choices if isinstance(c, Allocation)]
    assert len(plans) == 1 and isinstance(choices[4], Allocation)
    rates = agent.plans[0]["rates"]
    # Uncapped, contention-free stages: measured rate == rate_per_cpu (batch, gpu_load).
    assert rates[1] == pytest.approx(150000, rel=1e-3)
    assert rates[4] == pytest.approx(120000, rel=1e-3)
    assert sum(plans[0]) <= env.unwrapped.sim.cpus


def test_agent_replans_periodically_when_asked() -> None:
    env = gym.make("InTune-v0", scenario="machine-resize")
    agent = PlumberAgent(window_steps=5, replan_every_steps=50)
    trace = run_episode(env, agent, seed=0, max_steps=400)
    assert len(agent.plans) == 1 + (400 - 5) // 50
    # After the resize at 600 s (step ~300) the plan fits the 16-CPU machine.
    assert sum(trace.allocation[-1]) <= 16
