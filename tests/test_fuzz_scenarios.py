"""Hypothesis fuzz of scenario dicts: loading either refuses with ``ScenarioError`` or
gives a scenario the single and the batched env run without a crash or a NaN.

Values are drawn around and beyond the schema's bounds (zero, tiny, huge, infinite, NaN,
wrong types), so the fuzz checks that validation and the simulator agree on one set.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import intune_env  # noqa: F401  (registers InTune-v0)
from simulators import ScenarioError, load_scenario

_EDGE_FLOATS = [0.0, -1.0, 1e-300, 1e-12, 1e-3, 0.5, 1.0, 2.0, 100.0, 1e4, 1e6, 1e9, 1e10,
                1e12, 1e17, 1e300, 1e308, math.inf, -math.inf, math.nan]


def _num(lo: float, hi: float) -> st.SearchStrategy[Any]:
    """Mostly a plausible value in [lo, hi]; one draw in 40 an edge case, a huge integer or
    a wrong type (a scenario has ~20 numbers: about half the scenarios stay valid)."""
    return st.integers(0, 39).flatmap(lambda r: (
        st.sampled_from(_EDGE_FLOATS) if r == 0
        else st.sampled_from(["x", None, True, [1], -5, 2**64, 10**400]) if r == 1
        else st.floats(lo, hi, allow_nan=False)))


def _int(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return st.integers(0, 39).flatmap(lambda r: (
        st.sampled_from([0, -1, 1.5, "3", None, math.inf, 2**63, 10**400]) if r == 0
        else st.integers(lo, hi)))


@st.composite
def scenario_dicts(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 6))
    cpus = draw(_int(n, 48))
    names = [f"s{i}" for i in range(n)]
    stages = []
    for name in names:
        stage: dict[str, Any] = {"name": name, "rate_per_cpu": draw(_num(100.0, 1e6))}
        for key, strat in [("max_cpus", _int(1, 48)), ("contention", _num(0.0, 0.5)),
                           ("bandwidth_cap", _num(1e3, 1e7)),
                           ("worker_memory_mib", _num(0.0, 2000.0)),
                           ("element_kib", _num(0.01, 4.0)), ("buffer", _int(1, 100_000)),
                           ("buffer_per_cpu", _int(0, 4096)), ("state_mib", _num(0.0, 4000.0))]:
            if draw(st.booleans()):
                stage[key] = draw(strat)
        stages.append(stage)
    machine: dict[str, Any] = {"cpus": cpus, "memory_gib": draw(_num(1.0, 256.0)),
                               "gpu_rate": draw(_num(1e3, 1e7))}
    if draw(st.booleans()):
        machine["base_memory_gib"] = draw(_num(0.0, 64.0))
    if draw(st.booleans()):
        machine["oversubscription_overhead"] = draw(_num(0.0, 1.0))
    events = []
    for _ in range(draw(st.integers(0, 3))):
        ev: dict[str, Any] = {"at_s": draw(_num(0.0, 200.0))}
        kind = draw(st.sampled_from(["cpus", "memory", "cotenant", "stage"]))
        if kind == "cpus":
            ev["cpus"] = draw(_int(1, 48))
        elif kind == "memory":
            ev["memory_gib"] = draw(_num(1e-3, 256.0))
        elif kind == "cotenant":
            ev["cotenant_memory_gib"] = draw(_num(0.0, 128.0))
        else:
            ev["stage"] = draw(st.sampled_from(names))
            if draw(st.booleans()):
                ev["rate_per_cpu_factor"] = draw(_num(0.1, 10.0))
            else:
                ev["bandwidth_cap"] = draw(_num(1e3, 1e7))
        events.append(ev)
    d: dict[str, Any] = {"name": "fuzz", "machine": machine, "stages": stages,
                         "events": events}
    if draw(st.booleans()):
        d["noise_cv"] = draw(_num(0.0, 0.3))
    if draw(st.booleans()):
        d["control_interval_s"] = draw(_num(0.01, 10.0))
    if draw(st.integers(0, 3)) == 0:
        d["start_allocation"] = draw(st.one_of(
            st.sampled_from(["even", "min", "max", 3, None]),
            st.lists(_int(1, 8), min_size=n - 1, max_size=n + 1)))
    return d


def _run(env: gym.Env, rng: np.random.Generator, steps: int) -> None:
    obs, info = env.reset(seed=int(rng.integers(1 << 31)))
    assert np.all(np.isfinite(obs))
    assert math.isfinite(info["oracle_throughput"])
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert np.all(np.isfinite(obs)) and math.isfinite(reward), (obs, reward)
        assert math.isfinite(info["throughput"]) and info["memory_bytes"] >= 0
        if terminated or truncated:
            obs, info = env.reset()


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(scenario_dicts())
def test_accepted_scenarios_run(data: dict[str, Any]) -> None:
    try:
        sc = load_scenario(data)
    except ScenarioError as err:  # any other exception type fails the test
        assert str(err).startswith("<dict>: ")
        return
    rng = np.random.default_rng(0)
    env = gym.make("InTune-v0", scenario=sc.to_dict(), disable_env_checker=True)
    env.action_space.seed(0)
    _run(env, rng, 200)
    vec = gym.make_vec("InTune-v0", num_envs=2, scenario=sc.to_dict())
    vec.action_space.seed(0)
    vec.reset(seed=1)
    for _ in range(50):
        obs, reward, *_ = vec.step(vec.action_space.sample())
        assert np.all(np.isfinite(obs)) and np.all(np.isfinite(reward))
