"""The one simulation kernel: properties, single == batched, custom stage models, the
fitted start, and the env's boundaries (issues 8.1, 9, 10, 11)."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode
from test_vector import DRIFTING  # events and crashes at different times per sub-env

import intune_env  # noqa: F401  (registers InTune-v0)
from intune_env.intune import InTuneEnv
from intune_env.vector import ALL_INFO_KEYS, InTuneVectorEnv
from simulators import (
    Conditions,
    ScenarioError,
    StageModel,
    builtin_scenarios,
    fitting_start,
    kernel,
    load_scenario,
    oracle,
    register_stage_model,
    worst_memory,
)

ROOT = Path(__file__).parents[1]

# Memory-tight pipelines that crashed at reset with the old "fill every CPU" start.
TIGHT = {
    "name": "tight",
    "machine": {"cpus": 32, "memory_gib": 30, "base_memory_gib": 20, "gpu_rate": 300000},
    "stages": [
        {"name": "read", "rate_per_cpu": 20000, "max_cpus": 32, "worker_memory_mib": 500,
         "element_kib": 1.0, "buffer": 4096},
        {"name": "transform", "rate_per_cpu": 15000, "max_cpus": 32,
         "worker_memory_mib": 900, "element_kib": 1.0, "buffer": 4096},
    ],
}

# --- one implementation -------------------------------------------------------------------
def test_no_exec_eval_or_compile_in_the_package() -> None:
    calls = []
    for folder in ("simulators", "intune_env", "agents"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                        node.func.id in ("exec", "eval", "compile"):
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def test_simulators_never_import_gymnasium() -> None:
    for path in (ROOT / "simulators").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(m.split(".")[0] == "gymnasium" for m in names), path


def test_noise_has_the_documented_law_and_depends_on_seed_step_and_stage() -> None:
    u = np.array([kernel.uniform(np.uint64(12345), t, i) for t in range(4000)
                  for i in range(5)])
    assert u.min() >= 0.0 and u.max() < 1.0
    z = 1.0 + 0.1 * kernel.NOISE_SCALE * (2.0 * u - 1.0)
    assert abs(z.mean() - 1.0) < 0.005 and abs(z.std() - 0.1) < 0.005
    # neighbouring counters and seeds are not correlated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.05
    other = np.array([kernel.uniform(np.uint64(12346), t, i) for t in range(4000)
                      for i in range(5)])
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.05


# --- properties ---------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", [DRIFTING, "large-96", "machine-resize"])
def test_conservation_memory_and_no_nan_in_every_sub_env(scenario: Any) -> None:
    env = InTuneVectorEnv(num_envs=5, scenario=scenario, max_episode_steps=70,
                          info_keys="all")
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    sim = env.sim
    for t in range(250):
        if t % 31 == 0:  # an oversubscribing allocation now and then (time-slicing)
            sim.alloc[:] = [int(rng.integers(1, m + 1)) for m in sim.max_cpus]
        obs, rew, _, _, info = env.step(rng.integers(0, 2 * env.n_stages + 1, 5))
        assert np.isfinite(obs).all() and np.isfinite(rew).all()
        assert env.single_observation_space.contains(obs[0])
        st = sim.state
        assert (st[:, kernel.SAMPLES_IN] ==
                st[:, kernel.SAMPLES_OUT] + sim.buf.sum(axis=1)).all()
        for e in range(5):
            j = int(st[e, kernel.COND])
            comp, cond = sim.compiled_chain[j], sim.chain[j]
            parts = cond.fixed_memory_bytes + sum(comp.state_bytes) + sum(
                comp.workers[i][k] + b * comp.element_bytes[i]
                for i, (k, b) in enumerate(zip(info["allocation"][e], info["buffer_levels"][e],
                                               strict=True)))
            assert info["memory_bytes"][e] == parts
            assert (info["buffer_levels"][e] >= 0).all()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_batched_equals_single_on_every_info_key(mode: AutoresetMode) -> None:
    """Bit for bit, all 21 keys, with events and crashes at different times."""
    n_envs = 4
    sync = gym.make_vec("InTune-v0", num_envs=n_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": mode}, scenario=DRIFTING,
                        max_episode_steps=45)
    ours = InTuneVectorEnv(num_envs=n_envs, scenario=DRIFTING, max_episode_steps=45,
                           autoreset_mode=mode, info_keys="all")
    o1, _ = sync.reset(seed=21)
    o2, _ = ours.reset(seed=21)
    assert o1.tobytes() == o2.tobytes()
    rng = np.random.default_rng(2)
    ooms, conds = 0, set()
    for t in range(200):
        a = rng.integers(0, 11, n_envs)
        if t % 37 == 5:  # oversubscribe sub-env 1 (both envs) to make it crash
            big = [int(m) for m in ours.sim.max_cpus]
            sync.envs[1].unwrapped.set_allocation(big)
            ours.sim.alloc[1] = big
        r1, r2 = sync.step(a), ours.step(a)
        for x, y in zip(r1[:4], r2[:4], strict=True):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), t
        for key in ALL_INFO_KEYS:
            got = r2[4][key]
            want = r1[4][key]
            if want.dtype == object and key not in ("bottleneck_stage", "stage_names"):
                want = np.array([np.asarray(v) for v in want])
            assert np.array_equal(np.asarray(got), want.astype(np.asarray(got).dtype)
                                  if want.dtype != object else want), (t, key)
            assert np.array_equal(r2[4]["_" + key], r1[4]["_" + key])
        if mode is AutoresetMode.SAME_STEP and "final_obs" in r1[4]:
            for i in np.flatnonzero(r1[4]["_final_obs"]):
                assert r1[4]["final_obs"][i].tobytes() == r2[4]["final_obs"][i].tobytes()
        ooms += int(r2[2].sum())
        conds.add(tuple(ours.sim.state[:, kernel.COND].tolist()))
    assert ooms > 0 and any(len(set(c)) > 1 for c in conds)


# --- custom stage models ------------------------------------------------------------------
@register_stage_model
class _Sqrt(StageModel):
    kind = "test-sqrt"
    param_names: ClassVar[tuple[str, ...]] = ("scale",)

    def capacity(self, cpus: int) -> float:
        return self.rate_per_cpu * self.params["scale"] * math.sqrt(cpus)


CUSTOM = {
    "name": "custom",
    "machine": {"cpus": 16, "memory_gib": 64, "base_memory_gib": 4, "gpu_rate": 500000},
    "noise_cv": 0.05,
    "stages": [
        {"name": "read", "rate_per_cpu": 40000, "max_cpus": 8, "element_kib": 1.0},
        {"name": "odd", "kind": "test-sqrt", "params": {"scale": 2.0}, "rate_per_cpu": 30000,
         "max_cpus": 12, "element_kib": 1.0},
    ],
}


def test_custom_stage_model_in_single_batched_and_oracle() -> None:
    scen = load_scenario(CUSTOM)
    cond = Conditions.initial(scen)
    orc = oracle(cond)
    assert orc.feasible and orc.throughput > 0
    single = InTuneEnv(CUSTOM, noise_cv=0.0)
    _, info = single.reset(seed=0, options={"allocation": [6, 9]})
    _, _, _, _, info = single.step(0)
    capacity = info["stage_processed"][1] / info["stage_utilisation"][1]
    assert capacity == pytest.approx(30000 * 2.0 * math.sqrt(9) * 2.0)  # dt = 2 s
    ours = InTuneVectorEnv(num_envs=3, scenario=CUSTOM)
    singles = [InTuneEnv(CUSTOM) for _ in range(3)]
    obs = ours.reset(seed=4)[0]
    for i, env in enumerate(singles):
        assert env.reset(seed=4 + i)[0].tobytes() == obs[i].tobytes()
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = rng.integers(0, 5, 3)
        obs, rew = ours.step(a)[:2]
        for i, env in enumerate(singles):
            o, r = env.step(int(a[i]))[:2]
            assert o.tobytes() == obs[i].tobytes() and r == rew[i]


# --- a start that never crashes -------------------------------------------------------------
def _tight(worker_mib: tuple[int, int]) -> dict[str, Any]:
    d = {**TIGHT, "stages": [dict(s) for s in TIGHT["stages"]]}
    d["stages"][0]["worker_memory_mib"], d["stages"][1]["worker_memory_mib"] = worker_mib
    return d


@pytest.mark.parametrize("scenario", [*builtin_scenarios(), "tight-500-900", "tight-900-900"])
def test_default_start_fits_memory(scenario: str) -> None:
    spec: Any = scenario
    if scenario.startswith("tight-"):
        spec = _tight(tuple(int(x) for x in scenario.split("-")[1:]))  # type: ignore[arg-type]
    env = InTuneEnv(spec)
    sim = env.sim
    cond = sim.chain[sim.start_cond]
    assert worst_memory(cond, env._start) <= cond.memory_capacity_bytes
    _, info = env.reset(seed=0)
    for _ in range(100):  # holding the start never crashes
        _, _, term, _, info = env.step(0)
        assert not term
    assert info["allocation"] == env._start == fitting_start(cond)
    vec = InTuneVectorEnv(num_envs=2, scenario=spec)
    _, info = vec.reset(seed=0)
    assert info["allocation"].tolist() == [env._start] * 2


def test_fitting_start_scales_the_even_split_down() -> None:
    env = InTuneEnv(_tight((500, 900)))
    total = sum(env._start)
    assert total < 32  # the full even split (16 + 16) needs 21.9 GiB of workers alone
    cond = env.sim.chain[0]
    from simulators import even_allocation

    bigger = even_allocation(total + 1, list(env.sim.max_cpus))
    assert worst_memory(cond, bigger) > cond.memory_capacity_bytes  # the largest that fits


def test_explicit_start_that_does_not_fit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"needs up to .* GiB .* machine has 30\.00 GiB"):
        InTuneEnv(_tight((500, 900)), start_allocation=[16, 16])
    with pytest.raises(ValueError, match="needs up to"):
        InTuneVectorEnv(num_envs=2, scenario=_tight((500, 900)), start_allocation=[16, 16])
    env = InTuneEnv(_tight((500, 900)))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="needs up to"):
        env.reset(options={"allocation": [16, 16]})
    vec = InTuneVectorEnv(num_envs=2, scenario=_tight((500, 900)))
    with pytest.raises(ValueError, match="needs up to"):
        vec.reset(seed=0, options={"allocation": [16, 16]})


def test_start_fits_an_event_within_the_first_interval() -> None:
    # A stranger's co-tenant at t = 1 s (the interval is 2 s) crashed the default start
    # at the first step, before any action could shed memory: every agent, the oracle
    # included, scored 0. The start now fits the first step's conditions too.
    spec = {**_tight((500, 900)), "name": "cotenant-at-1s", "machine": {
        **TIGHT["machine"], "memory_gib": 40},
        "events": [{"at_s": 1, "cotenant_memory_gib": 10}]}
    env = InTuneEnv(spec)
    first = env.sim.start_conditions()
    assert len(first) == 2 and first[1].cotenant_memory_bytes > 0
    assert worst_memory(first[1], env._start) <= first[1].memory_capacity_bytes
    assert env._start == fitting_start(*first) != fitting_start(first[0])
    env.reset(seed=0)
    _, _, term, _, info = env.step(0)
    assert not term and not info["oom"]
    vec = InTuneVectorEnv(num_envs=2, scenario=spec)
    _, vinfo = vec.reset(seed=0)
    assert vinfo["allocation"].tolist() == [env._start] * 2
    too_big = fitting_start(first[0])
    with pytest.raises(ValueError, match=r"at the first step \(an event within the first"):
        env.reset(options={"allocation": too_big})
    with pytest.raises(ValueError, match="at the first step"):
        InTuneVectorEnv(num_envs=2, scenario=spec, start_allocation=too_big)
    # a file's own start_allocation is checked the same way (the same check) when loaded
    with pytest.raises(ScenarioError, match=r"start_allocation: .* at the first step \(an event"):
        load_scenario({**spec, "start_allocation": too_big})


def test_scenario_file_start_allocation_is_read_and_the_keyword_wins() -> None:
    from simulators import Scenario

    if "start_allocation" not in getattr(Scenario, "model_fields", {}):
        pytest.skip("Scenario.start_allocation is added by the scenario schema branch")
    spec = {**load_scenario("dlrm-criteo").to_dict(), "start_allocation": "min"}
    assert InTuneEnv(spec)._start == [1] * 5
    assert InTuneEnv(spec, start_allocation=[2, 2, 1, 2, 2])._start == [2, 2, 1, 2, 2]


# --- boundaries ---------------------------------------------------------------------------
def test_step_before_reset_raises_reset_needed() -> None:
    with pytest.raises(ResetNeeded):
        InTuneEnv().step(0)
    with pytest.raises(ResetNeeded):
        InTuneEnv().action_masks()


def test_failed_reset_leaves_the_env_as_it_was() -> None:
    env = InTuneEnv("memory-tight")
    env.reset(seed=0)
    for _ in range(5):
        env.step(1)
    before = (env.sim.state.copy(), env.sim.alloc.copy(), env.sim.buf.copy(),
              env.np_random.bit_generator.state)
    for bad in ({"allocation": [0, 1, 1, 1, 1]}, {"allocation": "11111"}, {"bogus": 1}, [1]):
        with pytest.raises(ValueError):
            env.reset(seed=3, options=bad)  # type: ignore[arg-type]
    after = (env.sim.state, env.sim.alloc, env.sim.buf, env.np_random.bit_generator.state)
    for x, y in zip(before[:3], after[:3], strict=True):
        assert np.array_equal(x, y)
    assert before[3] == after[3]
    _, _, term, _, info = env.step(0)
    assert not term and info["sim_time_s"] == 14.0


def test_reset_options_must_be_a_dict_of_known_keys() -> None:
    env = InTuneEnv()
    with pytest.raises(ValueError, match="must be a dict"):
        env.reset(options=[("allocation", [1] * 5)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) bogus; known: allocation"):
        env.reset(options={"bogus": 1})
    vec = InTuneVectorEnv(num_envs=2)
    with pytest.raises(ValueError, match="known: allocation"):
        vec.reset(options={"bogus": 1})


@pytest.mark.parametrize("name", ["reward_throughput_weight", "reward_memory_weight",
                                  "oom_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "abc", True, None])
def test_reward_weights_must_be_finite_numbers(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        InTuneEnv(**{name: value})


@pytest.mark.parametrize("bad", [float("inf"), 1.0, True, np.float32(2), "1", None, 11, -1,
                                 np.array([1])])
def test_actions_must_be_integers_in_range(bad: Any) -> None:
    env = InTuneEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)


def test_numpy_integer_actions_are_accepted() -> None:
    env = InTuneEnv()
    env.reset(seed=0)
    for a in (np.int64(1), np.int32(0), np.uint8(6), np.array(2)):
        env.step(a)


def test_vector_env_rejects_out_of_range_unsigned_actions_without_wrapping() -> None:
    env = InTuneVectorEnv(num_envs=2)
    env.reset(seed=0)
    before = env.sim.state.copy()
    for bad in (np.array([0, 2**64 - 1], dtype=np.uint64), np.array([11, 0], dtype=np.uint8),
                np.array([0, -1], dtype=np.int32), np.array([0, 2**40], dtype=np.int64)):
        with pytest.raises(ValueError, match="outside the action space"):
            env.step(bad)
    assert np.array_equal(env.sim.state, before)
    env.step(np.array([1, 0], dtype=np.uint64))


@pytest.mark.parametrize("bad", [[2.9, 1.5, 1, 1, 1], "11111", [True, 1, 1, 1, 1],
                                 [1, 1, 1, 1], 5, [1, 1, 1, 1, "1"], np.array(3),
                                 np.ones((1, 5), dtype=int)])
def test_allocations_are_sequences_of_integers(bad: Any) -> None:
    env = InTuneEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="allocation"):
        env.set_allocation(bad)
    with pytest.raises(ValueError, match="allocation"):
        env.reset(options={"allocation": bad})
    with pytest.raises((ValueError, TypeError)):
        InTuneEnv(start_allocation=bad)


# --- masks for MaskablePPO ----------------------------------------------------------------
def test_action_masks_through_gymnasium_wrappers() -> None:
    env = gym.make("InTune-v0")
    _, info = env.reset(seed=0)
    assert np.array_equal(env.unwrapped.action_masks(), info["action_mask"])
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    assert is_masking_supported(env)
    assert np.array_equal(get_action_masks(env), info["action_mask"])


def test_action_masks_follow_set_allocation() -> None:
    from intune_env import common

    env = InTuneEnv()
    env.reset(seed=0)
    before = env.action_masks()
    env.set_allocation([1, 1, 1, 1, 1])
    mask = env.action_masks()
    assert np.array_equal(mask, common.action_mask([1] * 5, env.sim.max_cpus, 32))
    assert not mask[6:].any() and not np.array_equal(mask, before)


def test_maskable_ppo_learns_with_no_wrapper() -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    import torch

    torch.set_num_threads(1)
    env = gym.make("InTune-v0", scenario="memory-tight")
    model = sb3_contrib.MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1,
                                    seed=0, device="cpu")
    model.learn(256)
    obs, _ = env.reset(seed=1)
    for _ in range(20):
        action, _ = model.predict(obs, action_masks=env.unwrapped.action_masks())
        assert env.unwrapped.action_masks()[int(action)]
        obs, _, term, trunc, _ = env.step(int(action))
        if term or trunc:
            obs, _ = env.reset()


def test_kernel_entry_tells_two_kernels_of_one_name_apart() -> None:
    """The entry-point cache is keyed by the compiled function, not its name: a second
    kernel called ``step`` (a copied or reloaded module) gets its own machine code."""
    from numba import njit

    from simulators.pipeline import kernel_entry

    def make(value: int) -> Any:
        def step(out: np.ndarray) -> int:
            out[0] = value
            return value
        return njit(step)

    out = np.zeros(1, dtype=np.int64)
    first, second = make(1), make(2)
    assert kernel_entry(first, out)(out) == 1
    assert kernel_entry(second, out)(out) == 2
    assert out[0] == 2
