"""The batched InTune-v0 (``intune_env.vector``) against N single envs, and its SB3 adapter."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import intune_env  # noqa: F401  (registers InTune-v0)
from intune_env.vector import INFO_KEYS, InTuneVectorEnv
from simulators import kernel, load_scenario, oracle

# memory-tight plus events: with OOM crashes and a short time limit, sub-envs restart at
# different times and so meet the events (co-tenant memory, a machine shrink that
# oversubscribes, a slower stage) at different steps.
DRIFTING = {
    **load_scenario("memory-tight").to_dict(),
    "name": "memory-tight-drifting",
    "events": [
        {"at_s": 20, "cotenant_memory_gib": 2.0},
        {"at_s": 40, "cpus": 20},
        {"at_s": 40, "stage": "transform", "rate_per_cpu_factor": 0.7},
        {"at_s": 70, "memory_gib": 44},
    ],
}

CASES: dict[str, dict[str, Any]] = {
    "dlrm-criteo": {"scenario": "dlrm-criteo", "max_episode_steps": 60},
    "drifting-oom": {"scenario": DRIFTING, "max_episode_steps": 45},
    "machine-resize": {"scenario": "machine-resize", "max_episode_steps": 350},
    "large-96-min": {"scenario": "large-96", "max_episode_steps": 50,
                     "start_allocation": "min"},
    "noise-free": {"scenario": "io-bound-remote", "max_episode_steps": 40, "noise_cv": 0.0},
}


def _same_info(sync: dict[str, Any], ours: dict[str, Any], where: str) -> None:
    """Same values where the ``_key`` masks (which must agree) say the key is present."""
    for key in INFO_KEYS:
        mask = sync["_" + key]
        assert np.array_equal(ours["_" + key], mask), f"{where}: info['_{key}']"
        expected = sync[key][mask]
        if expected.dtype == object:  # lists (allocation) are object arrays in SyncVectorEnv
            expected = np.array([list(v) for v in expected])
        got = ours[key][mask]
        assert got.shape == expected.shape, f"{where}: info[{key!r}] shape"
        assert np.array_equal(got, expected.astype(got.dtype)), f"{where}: info[{key!r}]"


def _compare(case: str, mode: AutoresetMode, num_envs: int = 6, steps: int = 160,
             seed: int = 11) -> int:
    """Step SyncVectorEnv and InTuneVectorEnv with the same actions; return #episode ends."""
    kwargs = CASES[case]
    sync = gym.make_vec("InTune-v0", num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": mode}, **kwargs)
    ours = gym.make_vec("InTune-v0", num_envs=num_envs, autoreset_mode=mode, **kwargs)
    assert isinstance(sync, SyncVectorEnv)
    assert isinstance(ours.unwrapped, InTuneVectorEnv)
    assert ours.metadata["autoreset_mode"] is mode
    n_actions = int(ours.single_action_space.n)
    actions = np.random.default_rng(seed).integers(0, n_actions, (steps, num_envs))
    # invalid moves often: bias towards removals and additions on one stage
    actions[::3] = np.random.default_rng(seed + 1).choice([1, 4, 6, 9], (len(actions[::3]),
                                                                       num_envs))
    (o1, i1), (o2, i2) = sync.reset(seed=seed), ours.reset(seed=seed)
    assert o1.tobytes() == np.ascontiguousarray(o2).tobytes()
    _same_info(i1, i2, "reset")
    ends = 0
    for t, act in enumerate(actions):
        r1, r2 = sync.step(act), ours.step(act)
        for name, x, y in zip(("obs", "reward", "terminated", "truncated"), r1[:4], r2[:4],
                              strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape, f"step {t}: {name} type"
            assert x.tobytes() == np.ascontiguousarray(y).tobytes(), f"step {t}: {name}"
        _same_info(r1[4], r2[4], f"step {t}")
        if mode is AutoresetMode.SAME_STEP and (r1[2] | r1[3]).any():
            assert np.array_equal(r1[4]["_final_obs"], r2[4]["_final_obs"])
            for i in np.flatnonzero(r1[2] | r1[3]):
                assert r1[4]["final_obs"][i].tobytes() == r2[4]["final_obs"][i].tobytes()
            _same_info(r1[4]["final_info"], r2[4]["final_info"], f"step {t} final_info")
        masks = np.stack([e.unwrapped._info()["action_mask"] for e in sync.envs])
        assert np.array_equal(ours.unwrapped.action_masks(), masks), f"step {t}: masks"
        ends += int((r1[2] | r1[3]).sum())
    sync.close()
    ours.close()
    return ends


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_trajectories_as_sync_vector_env_next_step(case: str) -> None:
    ends = _compare(case, AutoresetMode.NEXT_STEP)
    if case != "machine-resize":
        assert ends > 0  # autoresets happened


@pytest.mark.parametrize("case", ["drifting-oom", "dlrm-criteo"])
def test_same_trajectories_as_sync_vector_env_same_step(case: str) -> None:
    assert _compare(case, AutoresetMode.SAME_STEP) > 0


def test_drifting_case_desynchronises_and_crashes() -> None:
    """The drifting case must exercise what it is meant to: per-sub-env OOM and events."""
    env = InTuneVectorEnv(num_envs=6, max_episode_steps=45, scenario=DRIFTING)
    env.reset(seed=11)
    rng = np.random.default_rng(11)
    conds, ooms = set(), 0
    for _ in range(160):
        _, _, term, _, info = env.step(rng.integers(0, 11, 6))
        conds.add(tuple(env.sim.state[:, kernel.COND].tolist()))
        ooms += int(term.sum())
        assert np.array_equal(info["oom"], term)
    assert ooms > 0
    assert any(len(set(c)) > 1 for c in conds)  # sub-envs under different conditions


def test_make_vec_uses_the_batched_env_by_default() -> None:
    env = gym.make_vec("InTune-v0", num_envs=3)
    assert isinstance(env.unwrapped, InTuneVectorEnv)
    assert env.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP
    assert env.unwrapped.max_episode_steps == 600  # the registration's TimeLimit
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, 19) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    assert set(INFO_KEYS) <= set(info)


def test_oracle_is_computed_once_per_condition_not_per_copy() -> None:
    oracle.cache_clear()
    env = InTuneVectorEnv(num_envs=512, scenario="transform-drift")
    assert len(env.sim.chain) == 4
    env.reset(seed=0)
    assert oracle.cache_info().misses == 4
    for _ in range(5):
        env.step(np.zeros(512, dtype=np.int64))
    assert oracle.cache_info().misses == 4


def test_oom_terminates_only_that_sub_env_then_it_resets() -> None:
    env = InTuneVectorEnv(num_envs=3, scenario="memory-tight", max_episode_steps=None)
    env.reset(seed=1)
    add_transform = 4  # stage 3 (transform) is action 1 + 3
    remove_read = 6  # free CPUs first: action N + 1 + stage 0
    crashed_at = None
    for t in range(60):
        a = np.zeros(3, dtype=np.int64)
        a[1] = remove_read if t % 2 == 0 else add_transform
        _, reward, term, trunc, info = env.step(a)
        assert not term[0] and not term[2] and not trunc.any()
        if term[1]:
            assert info["oom"][1] and reward[1] == -10.0
            crashed_at = t
            break
    assert crashed_at is not None, "sub-env 1 never ran out of memory"
    _, reward, term, trunc, info = env.step(np.full(3, 1, dtype=np.int64))
    assert reward[1] == 0.0 and not term[1] and not trunc[1]  # NEXT_STEP reset
    assert not info["invalid_action"][1] and not info["oom"][1]
    assert info["allocation"][1].tolist() == env.single_env._start


def test_reset_seeding_matches_sync_semantics() -> None:
    """reset(seed=[...]) per sub-env, then reset() keeps the generators going."""
    sync = gym.make_vec("InTune-v0", num_envs=3, vectorization_mode="sync")
    ours = gym.make_vec("InTune-v0", num_envs=3)
    for seed in ([5, 9, 0], None, 7, None):
        o1, _ = sync.reset(seed=seed)
        o2, _ = ours.reset(seed=seed)
        assert o1.tobytes() == np.ascontiguousarray(o2).tobytes()
        for _ in range(70):
            a = np.array([1, 0, 7])
            assert sync.step(a)[0].tobytes() == np.ascontiguousarray(ours.step(a)[0]).tobytes()


def test_bad_actions_and_arguments_are_clear_errors() -> None:
    env = InTuneVectorEnv(num_envs=2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, dtype=np.int64))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(np.array([0, 11]))
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(np.array([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        env.step(np.zeros(2))
    with pytest.raises(ValueError, match="num_envs"):
        InTuneVectorEnv(num_envs=0)
    with pytest.raises(ValueError, match="unknown argument"):
        InTuneVectorEnv(num_envs=2, bogus=1)


def test_sb3_adapter_matches_dummy_vec_env() -> None:
    pytest.importorskip("stable_baselines3")  # the optional [sb3] extra
    from stable_baselines3.common.vec_env import DummyVecEnv

    from intune_env.sb3_vecenv import make_sb3_vec_env

    n = 4
    ours = make_sb3_vec_env(num_envs=n, scenario=DRIFTING, max_episode_steps=30)
    ref = DummyVecEnv([lambda: gym.make("InTune-v0", scenario=DRIFTING,
                                        max_episode_steps=30)] * n)
    ours.seed(3)
    ref.seed(3)
    assert np.array_equal(ours.reset(), ref.reset())
    rng = np.random.default_rng(3)
    dones = 0
    for t in range(120):
        a = rng.integers(0, 11, n)
        ours.step_async(a)
        ref.step_async(a)
        (o1, r1, d1, i1), (o2, r2, d2, i2) = ours.step_wait(), ref.step_wait()
        assert np.array_equal(o1, o2) and o1.flags.c_contiguous, t
        assert r1.dtype == r2.dtype and np.array_equal(r1, r2), t
        assert np.array_equal(d1, d2), t
        for k in range(n):
            assert i1[k]["TimeLimit.truncated"] == i2[k]["TimeLimit.truncated"]
            for key in ("throughput", "oom", "memory_bytes", "oracle_throughput"):
                assert i1[k][key] == i2[k][key], (t, k, key)
            if d2[k]:
                assert np.array_equal(i1[k]["terminal_observation"],
                                      i2[k]["terminal_observation"])
        dones += int(d1.sum())
    assert dones > 0
    masks = ours.env_method("action_masks")
    assert len(masks) == n and masks[0].shape == (11,) and masks[0].dtype == bool


@pytest.mark.parametrize("algo", ["PPO", "A2C"])
def test_sb3_algorithms_train_on_the_adapter(algo: str) -> None:
    pytest.importorskip("stable_baselines3")  # the optional [sb3] extra
    import stable_baselines3
    import torch

    from intune_env.sb3_vecenv import make_sb3_vec_env

    torch.set_num_threads(1)
    cls = getattr(stable_baselines3, algo)
    kwargs = {"n_steps": 16, "batch_size": 64, "n_epochs": 1} if algo == "PPO" else \
        {"n_steps": 4}
    model = cls("MlpPolicy", make_sb3_vec_env(num_envs=8, max_episode_steps=40), seed=0,
                device="cpu", **kwargs)
    model.learn(total_timesteps=512)
    assert model.num_timesteps >= 512


def test_maskable_ppo_reads_masks_from_the_adapter() -> None:
    pytest.importorskip("sb3_contrib")
    from sb3_contrib.common.maskable.utils import get_action_masks

    from intune_env.sb3_vecenv import make_sb3_vec_env

    venv = make_sb3_vec_env(num_envs=3)
    venv.reset()
    masks = get_action_masks(venv)
    assert masks.shape == (3, 11) and masks[:, 0].all()


def test_reset_options_and_an_oversubscribed_start_match_sync() -> None:
    """reset(options={"allocation"}) then autoresets from an oversubscribed start_allocation
    (time-slicing) give the SyncVectorEnv trajectories too."""
    kwargs = {"scenario": "dlrm-criteo", "max_episode_steps": 20,
              "start_allocation": [16, 8, 1, 20, 8]}  # 53 CPUs on a 32-CPU machine
    sync = gym.make_vec("InTune-v0", num_envs=3, vectorization_mode="sync", **kwargs)
    ours = gym.make_vec("InTune-v0", num_envs=3, **kwargs)
    options = {"allocation": [2, 2, 1, 2, 2]}
    o1, _ = sync.reset(seed=1, options=options)
    o2, _ = ours.reset(seed=1, options=options)
    assert o1.tobytes() == np.ascontiguousarray(o2).tobytes()
    for t, act in enumerate(np.random.default_rng(0).integers(0, 11, (80, 3))):
        r1, r2 = sync.step(act), ours.step(act)
        assert r1[0].tobytes() == np.ascontiguousarray(r2[0]).tobytes(), t
        assert r1[1].tobytes() == r2[1].tobytes(), t


def _info_equal(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    assert sorted(a) == sorted(b), where
    for key in a:
        if key in ("final_info",):
            _info_equal(a[key], b[key], f"{where} final_info")
        elif key == "final_obs":
            assert all((x is None and y is None) or x.tobytes() == y.tobytes()
                       for x, y in zip(a[key], b[key], strict=True)), f"{where}: {key}"
        else:
            assert a[key].dtype == b[key].dtype, f"{where}: {key} dtype"
            assert np.array_equal(a[key], b[key]), f"{where}: {key}"


def _lockstep(first: InTuneVectorEnv, second: InTuneVectorEnv, steps: int, seed: int,
              compare_info: bool) -> int:
    """Step both envs with the same actions, asserting byte-equal outputs; #episode ends."""
    n_actions = int(first.single_action_space.n)
    actions = np.random.default_rng(seed).integers(0, n_actions, (steps, first.num_envs))
    o1, i1 = first.reset(seed=seed)
    o2, i2 = second.reset(seed=seed)
    assert o1.tobytes() == o2.tobytes()
    ends = 0
    for t, act in enumerate(actions):
        r1, r2 = first.step(act), second.step(act)
        for name, x, y in zip(("obs", "reward", "terminated", "truncated"), r1[:4], r2[:4],
                              strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"step {t}: {name}"
        if compare_info:
            _info_equal(r1[4], r2[4], f"step {t}")
        ends += int((r1[2] | r1[3]).sum())
    return ends


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_parallel_kernel_is_bit_identical_to_the_single_threaded_one(mode: AutoresetMode) -> None:
    # 300 sub-envs: two full chunks of kernel.CHUNK and a partial one; crashes, events and
    # (SAME_STEP) skipped rows spread over the chunks
    assert 2 * kernel.CHUNK < 300 < 3 * kernel.CHUNK
    kw: dict[str, Any] = {"num_envs": 300, "scenario": DRIFTING, "max_episode_steps": 45,
                          "info_keys": "all", "autoreset_mode": mode}
    serial, par = InTuneVectorEnv(**kw), InTuneVectorEnv(parallel=True, **kw)
    assert par.sim.run is not serial.sim.run
    assert _lockstep(serial, par, 120, 5, compare_info=True) > 0
    for x, y in zip(serial.sim.args, par.sim.args, strict=True):
        assert x.tobytes() == y.tobytes()


def test_default_info_skips_the_per_stage_outputs_without_changing_the_dynamics() -> None:
    kw: dict[str, Any] = {"num_envs": 20, "scenario": DRIFTING, "max_episode_steps": 45}
    lean, full = InTuneVectorEnv(**kw), InTuneVectorEnv(info_keys="all", **kw)
    assert _lockstep(lean, full, 100, 3, compare_info=False) > 0
    # the lean env never wrote its per-stage diagnostics; the full one did
    assert not lean.sim.stage_out.any() and not lean.sim.stage_f.any()
    assert full.sim.stage_out.any() and full.sim.stage_f.any()
    for a, b in ((lean.sim.alloc, full.sim.alloc), (lean.sim.buf, full.sim.buf),
                 (lean.sim.obs, full.sim.obs), (lean.sim.mask, full.sim.mask)):
        assert np.array_equal(a, b)
    cols = [c for c in range(kernel.N_STATE) if c != kernel.BOTTLENECK]
    assert np.array_equal(lean.sim.state[:, cols], full.sim.state[:, cols])


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_parallel_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(ValueError, match="parallel must be True or False"):
        InTuneVectorEnv(num_envs=2, parallel=bad)


@pytest.mark.parametrize(("value", "expected"), [
    (None, "must be 'even', 'min' or a sequence of 5 positive integers"),
    ([1, 1], "5 stages"), ([True, 1, 1, 1, 1], "must hold integers")])
def test_bad_reset_allocation_names_the_option_as_the_single_env_does(
        value: object, expected: str) -> None:
    single = gym.make("InTune-v0", scenario="dlrm-criteo").unwrapped
    batched = InTuneVectorEnv(num_envs=2, scenario="dlrm-criteo")
    msgs = []
    for env in (single, batched):
        with pytest.raises(ValueError) as err:
            env.reset(options={"allocation": value})
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1], msgs
    assert msgs[0].startswith("InTune-v0: options['allocation']") and expected in msgs[0]
    assert "start_allocation" not in msgs[0]
