"""AUTOTUNE-like tuner: the model, the climb and the agent, on hand-computed cases."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.autotune import (
    AutotuneAgent,
    best_increment,
    climb,
    gradient_descent,
    max_buffered_bytes,
    output_time,
    round_times,
    stage_based,
    stage_times,
    total_processing_time,
    wait_time,
)
from agents.base import Allocation, run_episode

# --- the wait function (Node::ComputeWaitTime) -------------------------------------------


def test_wait_time_special_cases() -> None:
    assert wait_time(0.0, 5.0, 3) == 0.0  # producer infinitely fast: buffer always full
    assert wait_time(7.0, 0.0, 3) == 7.0  # consumer infinitely fast: wait a whole element
    assert wait_time(6.0, 6.0, 2) == pytest.approx(6.0 / 3)  # x == y: y / (n + 1)


def test_wait_time_general_cases_by_hand() -> None:
    # Consumer slower (x=2, y=1, n=1): r = x/y = 2, p = (1-2)/(1-4) = 1/3, W = p*y.
    assert wait_time(1.0, 2.0, 1) == pytest.approx(1 / 3)
    # Producer slower (x=1, y=2, n=1): r = 1/2, p = (1/2)/(3/4) = 2/3, W = 4/3.
    assert wait_time(2.0, 1.0, 1) == pytest.approx(4 / 3)
    # Larger buffers wait less.
    assert wait_time(2.0, 1.0, 8) < wait_time(2.0, 1.0, 1)


# --- the output-time model -----------------------------------------------------------------


def test_output_time_two_async_nodes_by_hand() -> None:
    # Input times, root first: node1 = 0 + 100 = 100, node0 = 100 + 100 = 200.
    # Output: node0 = 100 + W(0, 200, 1) = 100; node1 = 100 + W(100, 100, 1) = 150.
    assert output_time([100.0, 100.0], [1, 1], [True, True]) == pytest.approx(150.0)


def test_output_time_synchronous_nodes_add_up() -> None:
    assert output_time([10.0, 20.0, 30.0], [1, 1, 1], [False, False, False]) == 60.0
    assert total_processing_time([10.0, 20.0, 30.0]) == 60.0


def test_buffered_bytes_count_only_async_nodes() -> None:
    # parallelism * element bytes for async nodes; the synchronous node counts nothing.
    assert max_buffered_bytes([3, 1, 2], [100, 1000, 10], [True, False, True]) == 320.0


# --- the climb --------------------------------------------------------------------------------

SELF = [100.0, 1000.0]  # ns per element: stage 1 is ten times slower
ASYNC = [True, True]


def test_climb_step_picks_the_stage_that_lowers_output_time_most() -> None:
    # At [1, 1]: T = 1000 + W(100, 1000, 1) = 1000 + 100 * 0.09/0.99 = 1009.0909.
    assert output_time(SELF, [1, 1], ASYNC) == pytest.approx(1000 + 100 * 0.09 / 0.99)
    # +1 on stage 0 -> T = 1000 + W(50, 1000, 1) = 1000 + 50 * 0.0475/0.9975 = 1002.381.
    assert output_time(SELF, [2, 1], ASYNC) == pytest.approx(1000 + 50 * 0.0475 / 0.9975)
    # +1 on stage 1 -> T = 500 + W(100, 500, 2) = 500 + 100 * 0.032/0.992 = 503.2258.
    assert output_time(SELF, [1, 2], ASYNC) == pytest.approx(500 + 100 * 0.032 / 0.992)
    best, delta = best_increment(SELF, [1, 1], ASYNC, [4, 4])
    assert best == 1
    assert delta == pytest.approx(1009.0909 - 503.2258, abs=1e-3)


def test_climb_skips_parameters_at_their_maximum() -> None:
    best, _ = best_increment(SELF, [1, 4], ASYNC, [4, 4])
    assert best == 0


def test_ram_budget_stops_the_climb_after_the_step_that_crosses_it() -> None:
    # [1,1] buffers 2 x 1000 B <= 2500; the climb takes stage 1 (see above) to [1,2]
    # = 3000 B > 2500 and stops there, publishing the step that crossed the budget.
    res = climb(SELF, ASYNC, [4, 4], [1000.0, 1000.0], cpu_budget=2, ram_budget=2500.0,
                mode="max_parallelism")
    assert res.stop_reason == "ram_budget"
    assert res.parallelism == (1, 2)
    assert res.buffered_bytes == 3000.0


def test_max_parallelism_ignores_the_cpu_budget_and_oversubscribes() -> None:
    res = climb(SELF, ASYNC, [4, 4], [1.0, 1.0], cpu_budget=4, ram_budget=1e12,
                mode="max_parallelism")
    assert res.stop_reason == "all_max"
    assert res.parallelism == (4, 4)
    assert sum(res.parallelism) > 4


def test_hill_climb_stops_on_the_output_time_target() -> None:
    res = climb(SELF, ASYNC, [4, 4], [1.0, 1.0], cpu_budget=4, ram_budget=1e12,
                mode="hill_climb")
    # Stop rule: T < total processing time / cpu_budget = 1100 / 4 = 275 ns.
    assert res.stop_reason == "output_time"
    assert res.output_time_ns < 1100 / 4
    assert sum(res.parallelism) < 8
    # One step earlier the target was not met (otherwise it would have stopped there).
    prev = list(res.parallelism)
    prev[int(np.argmax(prev))] -= 1
    assert output_time(SELF, prev, ASYNC) >= 1100 / 4 or min(prev) < 1


def test_climb_restarts_from_minimum_and_keeps_untunable_nodes() -> None:
    res = climb(SELF, ASYNC, [4, 4], [1.0, 1.0], cpu_budget=4, ram_budget=1e12,
                mode="max_parallelism", tunable=[False, True], current=[3, 4])
    assert res.parallelism[0] == 3  # not collected: keeps its value
    assert res.parallelism[1] == 4


def test_synchronous_nodes_are_never_tuned() -> None:
    res = climb([100.0, 50.0, 1000.0], [True, False, True], [4, 1, 4], [1.0] * 3,
                cpu_budget=64, ram_budget=1e12, mode="max_parallelism")
    assert res.parallelism == (4, 1, 4)


def test_gradient_descent_stays_in_bounds_and_improves() -> None:
    slow = [1e4, 1e5]  # microsecond-scale: steps move T by more than the 100 ns precision
    res = gradient_descent(slow, ASYNC, [4, 4], [1.0, 1.0], cpu_budget=64, ram_budget=1e12)
    assert all(1 <= p <= 4 for p in res.parallelism)
    assert output_time(slow, res.parallelism, ASYNC) < output_time(slow, [1, 1], ASYNC)


def test_gradient_descent_stops_within_100ns_precision() -> None:
    # With sub-microsecond stages one step changes T by under 100 ns: it stops at once.
    res = gradient_descent(SELF, ASYNC, [4, 4], [1.0, 1.0], cpu_budget=64, ram_budget=1e12)
    assert res.stop_reason == "converged" and res.parallelism == (1, 1)


def test_gradient_descent_stops_when_essential_parallelism_exceeds_cpu_budget() -> None:
    # Stage 1 is essential (1e5 > 0.3 x (1e4 + 1e5) / 3); its parallelism 1 > budget 0.
    res = gradient_descent([1e4, 1e5], ASYNC, [4, 4], [1.0, 1.0], cpu_budget=0,
                           ram_budget=1e12)
    assert res.stop_reason == "cpu_budget" and res.parallelism == (1, 1)


# --- STAGE_BASED ---------------------------------------------------------------------------

CHAIN = [100.0, 50.0, 1000.0, 10.0]  # async, sync, async, sync (the last joins the root)
CHAIN_ASYNC = [True, False, True, False]


def test_stage_times_group_sync_nodes_with_the_async_node_downstream() -> None:
    # Stage of node 0: 100/2 = 50; of node 2: 1000/4 + 50 (the sync node 1) = 300;
    # the root's stage holds the trailing sync node: 10.
    assert stage_times(CHAIN, [2, 1, 4, 1], CHAIN_ASYNC) == pytest.approx(
        [50.0, 0.0, 300.0, 0.0, 10.0])


def test_stage_based_raises_the_slowest_stage_until_the_target() -> None:
    # Target 200 ns: node 2's stage is 1000/p + 50 -> p = 7 gives 192.9 <= 200; node 0's
    # stage (100) already meets it.
    res = stage_based(CHAIN, CHAIN_ASYNC, [8, 1, 8, 1], [1.0] * 4, target_time_ns=200.0,
                      ram_budget=1e12)
    assert res is not None
    assert res.parallelism == (1, 1, 7, 1) and res.stop_reason == "target_met"


def test_stage_based_abandons_the_round_over_the_ram_budget() -> None:
    # Buffers: (p0 + p2) x 1000 B; the third step of node 2 reaches 4000 B > 3500 B.
    res = stage_based(CHAIN, CHAIN_ASYNC, [8, 1, 8, 1], [1000.0] * 4, target_time_ns=200.0,
                      ram_budget=3500.0)
    assert res is None


def test_stage_based_stops_when_the_slowest_stage_has_no_parameter() -> None:
    res = stage_based([100.0, 5000.0], [True, False], [8, 1], [1.0, 1.0],
                      target_time_ns=200.0, ram_budget=1e12)
    assert res is not None
    assert res.parallelism == (1, 1) and res.stop_reason == "no_optimizable_parameter"


def test_unknown_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="autotune mode"):
        AutotuneAgent("fastest")


# --- the agent -------------------------------------------------------------------------------


def test_round_schedule_doubles_from_10ms_to_60s() -> None:
    times = round_times(300.0)
    assert times[:4] == pytest.approx([0.0, 0.02, 0.06, 0.14])
    gaps = np.diff(times)
    assert gaps.max() == pytest.approx(60.0)
    assert np.all(np.diff(gaps) >= -1e-9)  # non-decreasing periods


def _info(t: float, busy: list[float], processed: list[int], alloc: list[int]) -> dict:
    return {"sim_time_s": t, "stage_busy_s": busy, "stage_processed": processed,
            "element_bytes": [100, 100], "cpus_total": 8, "max_cpus": [8, 8],
            "memory_capacity_bytes": 10_000, "memory_bytes": 4_000, "allocation": alloc,
            "gpu_rate": 1000.0}


def test_agent_budgets_start_and_round_times() -> None:
    agent = AutotuneAgent("max_parallelism")
    info = _info(2.0, [1.0, 1.0], [1000, 1000], [4, 4])
    agent.reset(np.zeros(1), info)
    assert agent.cpu_budget == 8 and agent.ram_budget == 0.5 * 6_000
    first = agent.act(np.zeros(1), info)  # the pipeline starts at min(16, pool) = 8
    assert isinstance(first, Allocation) and tuple(first) == (8, 8)
    acted = []
    for step in range(1, 80):
        choice = agent.act(np.zeros(1), _info(2.0 + 2 * step, [1.0, 2.0], [1000, 1000],
                                               list(first)))
        if isinstance(choice, Allocation):
            acted.append(2 * step)
    # Rounds due by elapsed 2 s (10 ms .. 1.26 s), then 2.54, 5.1, 10.2, 20.5, 41, 82, 142 s.
    assert acted == [2, 4, 6, 12, 22, 42, 82, 142]


def test_agent_self_times_are_cumulative_per_worker() -> None:
    agent = AutotuneAgent()
    info = _info(2.0, [0.0, 0.0], [0, 0], [1, 1])
    agent.reset(np.zeros(1), info)
    agent.act(np.zeros(1), info)  # start: not measured
    agent.act(np.zeros(1), _info(4.0, [2.0, 4.0], [1000, 1000], [8, 8]))
    agent.act(np.zeros(1), _info(6.0, [4.0, 4.0], [1000, 3000], [8, 8]))
    # (2 + 4) s / 2000 = 3 ms and (4 + 4) s / 4000 = 2 ms per element, in ns.
    assert agent.self_times_ns() == pytest.approx([3e6, 2e6])


def test_max_parallelism_oversubscribes_the_simulated_machine() -> None:
    env = gym.make("InTune-v0", scenario="dlrm-criteo")
    agent = AutotuneAgent("max_parallelism")
    trace = run_episode(env, agent, seed=0, max_steps=30)
    cpus = env.unwrapped.sim.cpus
    assert max(sum(a) for a in trace.allocation) > cpus
    assert agent.rounds and agent.rounds[-1]["stop_reason"] == "all_max"


def test_budgets_are_not_re_read_after_a_machine_resize() -> None:
    env = gym.make("InTune-v0", scenario="machine-resize")
    agent = AutotuneAgent("hill_climb")
    run_episode(env, agent, seed=1, max_steps=320)
    assert env.unwrapped.sim.cpus == 16
    assert agent.cpu_budget == 32 and agent.pool_size == 32


def test_same_seed_same_trajectory() -> None:
    runs = []
    for _ in range(2):
        env = gym.make("InTune-v0", scenario="transform-drift")
        runs.append(run_episode(env, AutotuneAgent("hill_climb"), seed=3, max_steps=100))
    assert runs[0].allocation == runs[1].allocation
    assert runs[0].throughput == runs[1].throughput
