"""Static baselines and the oracle; every baseline agent runs on every built-in scenario."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.autotune import MODES, AutotuneAgent
from agents.base import Agent, Allocation, run_episode
from agents.plumber import PlumberAgent
from agents.static import (
    STATIC_AGENTS,
    EvenAgent,
    MinAgent,
    OracleAgent,
    RandomAgent,
    random_allocation,
)
from intune_env.intune import even_allocation
from simulators import builtin_scenarios

STEPS = 150


def make(name: str) -> Agent:
    if name.startswith("autotune:"):
        return AutotuneAgent(name.split(":", 1)[1])
    if name == "plumber":
        return PlumberAgent()
    if name == "random":
        return RandomAgent(seed=7)
    return STATIC_AGENTS[name]()


AGENTS = [f"autotune:{m}" for m in MODES] + ["plumber", "even", "min", "random", "oracle"]


@pytest.mark.parametrize("scenario", builtin_scenarios())
@pytest.mark.parametrize("agent_name", AGENTS)
def test_every_baseline_runs_an_episode(agent_name: str, scenario: str) -> None:
    env = gym.make("InTune-v0", scenario=scenario)
    trace = run_episode(env, make(agent_name), seed=0, max_steps=STEPS)
    assert 1 <= len(trace.throughput) <= STEPS
    assert len(trace.throughput) == STEPS or trace.oom  # only an OOM ends it early
    caps = env.unwrapped.sim.max_cpus
    for alloc in trace.allocation:
        assert all(1 <= k <= m for k, m in zip(alloc, caps, strict=True))
    assert np.all(np.isfinite(trace.throughput))
    assert trace.invalid == 0


def test_static_alias_and_names() -> None:
    assert STATIC_AGENTS["static"] is EvenAgent
    assert {c.name for c in STATIC_AGENTS.values()} == {"even", "min", "random", "oracle"}


def test_even_and_min_hold_their_allocation() -> None:
    env = gym.make("InTune-v0", scenario="dlrm-criteo", start_allocation="min")
    trace = run_episode(env, EvenAgent(), seed=0, max_steps=20)
    want = even_allocation(32, env.unwrapped.sim.max_cpus)
    assert all(a == want for a in trace.allocation)
    trace = run_episode(env, MinAgent(), seed=0, max_steps=20)
    assert all(a == [1] * 5 for a in trace.allocation)


def test_random_allocations_are_valid_and_reproducible() -> None:
    caps = [16, 8, 1, 32, 8]
    draws = [random_allocation(np.random.default_rng(s), 32, caps) for s in range(200)]
    for a in draws:
        assert all(1 <= k <= m for k, m in zip(a, caps, strict=True)) and sum(a) <= 32
    assert len({tuple(a) for a in draws}) > 100  # actually random
    assert draws[5] == random_allocation(np.random.default_rng(5), 32, caps)
    env = gym.make("InTune-v0", scenario="dlrm-criteo")
    t1 = run_episode(env, RandomAgent(seed=3), seed=0, max_steps=10)
    t2 = run_episode(env, RandomAgent(seed=3), seed=0, max_steps=10)
    assert t1.allocation == t2.allocation


def test_oracle_applies_the_oracle_allocation_and_reaches_it() -> None:
    env = gym.make("InTune-v0", scenario="transform-heavy")
    agent = OracleAgent()
    obs, info = env.reset(seed=0)
    choice = agent.act(obs, info)
    assert isinstance(choice, Allocation) and list(choice) == list(info["oracle_allocation"])
    trace = run_episode(env, OracleAgent(), seed=0, max_steps=100)
    assert np.nanmean(trace.fraction[50:]) > 0.95
