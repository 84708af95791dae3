"""Property-based checks of the simulator: random scenarios, random action sequences."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from intune_env.intune import InTuneEnv
from simulators import ScenarioError


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    n = draw(st.integers(2, 8))
    cpus = draw(st.integers(n, 64))
    stages = []
    for i in range(n):
        stages.append({
            "name": f"stage{i}",
            "rate_per_cpu": draw(st.floats(1.0, 2e6)),
            "max_cpus": draw(st.integers(1, 64)),
            "contention": draw(st.sampled_from([0.0, 0.01, 0.5, 3.0])),
            "bandwidth_cap": draw(st.one_of(st.none(), st.floats(1.0, 5e6))),
            "worker_memory_mib": draw(st.floats(0, 4000)),
            "element_kib": draw(st.floats(0.01, 64)),
            "buffer": draw(st.integers(1, 200000)),
            "buffer_per_cpu": draw(st.integers(0, 5000)),
            "state_mib": draw(st.floats(0, 2000)),
        })
    events = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["cpus", "memory", "stage", "cotenant"]))
        ev: dict = {"at_s": draw(st.floats(0, 200))}
        if kind == "cpus":
            ev["cpus"] = draw(st.integers(1, 64))
        elif kind == "memory":
            ev["memory_gib"] = draw(st.floats(1, 512))
        elif kind == "cotenant":
            ev["cotenant_memory_gib"] = draw(st.floats(0, 16))
        else:
            ev["stage"] = f"stage{draw(st.integers(0, n - 1))}"
            ev["rate_per_cpu_factor"] = draw(st.floats(0.05, 3))
        events.append(ev)
    return {
        "name": "prop",
        "machine": {"cpus": cpus, "memory_gib": draw(st.floats(16, 1024)),
                    "base_memory_gib": draw(st.floats(0, 8)),
                    "gpu_rate": draw(st.floats(1.0, 1e7)),
                    "oversubscription_overhead": draw(st.floats(0, 1))},
        "stages": stages,
        "events": events,
        "noise_cv": draw(st.floats(0, 0.3)),
        "control_interval_s": draw(st.floats(0.1, 30)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), seed=st.integers(0, 2**31 - 1),
       actions=st.lists(st.integers(0, 16), min_size=1, max_size=80),
       oversubscribe=st.booleans())
def test_random_scenarios_and_actions_keep_invariants(scenario: dict, seed: int,
                                                      actions: list[int],
                                                      oversubscribe: bool) -> None:
    try:
        env = InTuneEnv(scenario=scenario)
    except ScenarioError as err:  # refused: one CPU per stage cannot fit, or a dead stage
        assert any(why in str(err) for why in (
            "cannot start", "every allocation runs out of memory", "samples per control "
            "interval even with max_cpus", "less than one sample per control interval")), \
            str(err)
        assume(False)
    n = env.n_stages
    obs, info = env.reset(seed=seed)
    sim = env.sim
    crashed = info["oom"]  # the start allocation itself may not fit: the first step ends it
    if oversubscribe:  # tuners like AUTOTUNE may hand out more CPUs than exist
        env.set_allocation(list(sim.max_cpus))
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a % (2 * n + 1))
        assert np.all(np.isfinite(obs)) and env.observation_space.contains(obs)
        assert math.isfinite(reward)
        assert all(b >= 0 for b in info["buffer_levels"])
        assert all(p >= 0 for p in info["stage_processed"])
        assert 0 <= info["throughput"] <= info["gpu_rate"] + 1e-9
        # samples are never created or lost
        assert sim.samples_in == sim.samples_out + sum(sim.buffers)
        # memory is exactly the sum of its parts
        comp, cond = sim.compiled, sim.conditions
        parts = cond.fixed_memory_bytes + sum(
            comp.workers[i][k] + info["buffer_levels"][i] * comp.element_bytes[i]
            + comp.state_bytes[i] for i, k in enumerate(info["allocation"]))
        assert info["memory_bytes"] == parts
        assert info["oom"] == (crashed or parts > info["memory_capacity_bytes"])
        assert math.isfinite(info["oracle_throughput"]) and info["oracle_throughput"] > 0
        if terminated:
            assert info["oom"]
            break
