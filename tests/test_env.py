"""InTune-v0 as Gymnasium and SB3 users meet it."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import intune_env
from intune_env import common
from intune_env.intune import InTuneEnv, even_allocation
from simulators import ScenarioError, builtin_scenarios

INFO_KEYS = {
    "throughput", "allocation", "memory_bytes", "memory_capacity_bytes", "oom",
    "oracle_throughput", "oracle_allocation", "bottleneck_stage", "sim_time_s",
    "invalid_action", "stage_names", "stage_utilisation", "stage_processed", "stage_busy_s",
    "buffer_levels", "buffer_capacities", "element_bytes", "cpus_total", "max_cpus",
    "gpu_rate", "action_mask",
}


@pytest.mark.parametrize("scenario", builtin_scenarios())
def test_gymnasium_check_env_every_builtin(scenario: str) -> None:
    env = gym.make("InTune-v0", scenario=scenario)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may be left unexplained
        check_env(env.unwrapped, skip_render_check=False)


def test_sb3_check_env() -> None:
    sb3_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    env = InTuneEnv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_checker.check_env(env, warn=True)


def test_rollout_in_fresh_process_through_module_path() -> None:
    code = (
        "import gymnasium as gym\n"
        "env = gym.make('intune_env:InTune-v0', scenario='io-bound-remote')\n"
        "obs, info = env.reset(seed=3)\n"
        "for _ in range(20): obs, r, te, tr, info = env.step(env.action_space.sample())\n"
        "print(round(info['oracle_throughput']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "260037"  # 50 threads time-sliced on 48 CPUs


def test_async_vector_env_spawns_fresh_processes() -> None:
    envs = gym.vector.AsyncVectorEnv(
        [lambda: gym.make("intune_env:InTune-v0") for _ in range(2)], context="spawn")
    try:
        obs, _ = envs.reset(seed=[1, 2])
        obs2, rew, term, trunc, _ = envs.step(np.array([1, 2]))
        assert obs2.shape == (2, 19) and np.all(np.isfinite(rew))
    finally:
        envs.close()


def _rollout(seed: int, steps: int = 500) -> list:
    env = gym.make("InTune-v0", scenario="machine-resize")
    actions = np.random.default_rng(123).integers(0, env.action_space.n, steps)
    obs, info = env.reset(seed=seed)
    out = [(obs.tobytes(), repr(sorted((k, repr(v)) for k, v in info.items())))]
    for a in actions:
        obs, r, te, tr, info = env.step(int(a))
        out.append((obs.tobytes(), r, te, tr, repr(sorted((k, repr(v)) for k, v in info.items()))))
        if te or tr:
            break
    return out


def test_same_seed_same_everything_different_seed_differs() -> None:
    a, b, c = _rollout(7), _rollout(7), _rollout(8)
    assert len(a) == 501
    assert a == b
    assert a != c


def test_info_has_every_key_and_fresh_objects() -> None:
    env = gym.make("InTune-v0")
    _, info0 = env.reset(seed=0)
    assert set(info0) >= INFO_KEYS
    _, _, _, _, info1 = env.step(0)
    assert set(info1) >= INFO_KEYS
    for key, value in info1.items():
        if isinstance(value, list | dict):
            assert value is not info0[key], key  # mutable: fresh every call
        elif isinstance(value, np.ndarray):
            assert not np.shares_memory(value, info0[key]), key
    assert isinstance(info1["stage_names"], tuple) and isinstance(info1["max_cpus"], tuple)
    info1["allocation"].append(99)  # mutating an info must not touch the env
    _, _, _, _, info2 = env.step(0)
    assert len(info2["allocation"]) == 5


def test_actions_layout_and_invalid_moves(small: dict) -> None:
    env = InTuneEnv(scenario=small, start_allocation=[1, 1, 1])
    env.reset(seed=0)
    # 1..N add, N+1..2N remove
    _, _, _, _, info = env.step(1)
    assert info["allocation"] == [2, 1, 1] and not info["invalid_action"]
    _, _, _, _, info = env.step(2)  # shuffle has max_cpus 1
    assert info["allocation"] == [2, 1, 1] and info["invalid_action"]
    _, _, _, _, info = env.step(6)  # remove from transform below 1
    assert info["allocation"] == [2, 1, 1] and info["invalid_action"]
    _, _, _, _, info = env.step(4)  # remove from read
    assert info["allocation"] == [1, 1, 1] and not info["invalid_action"]
    for _ in range(3):
        env.step(3)
    _, _, _, _, info = env.step(3)  # 6 CPUs used: none free
    assert info["allocation"] == [1, 1, 4] and sum(info["allocation"]) == 6
    _, _, _, _, info = env.step(3)
    assert info["invalid_action"] and info["allocation"] == [1, 1, 4]
    mask = info["action_mask"]
    assert mask.tolist() == [True, False, False, False, False, False, True]


@pytest.mark.parametrize("bad", [-1, 7, 2.5, "1", None])
def test_action_outside_space_raises_clearly(small: dict, bad: object) -> None:
    env = InTuneEnv(scenario=small)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)  # type: ignore[arg-type]


def test_reset_options_allocation_and_default_start(small: dict) -> None:
    env = InTuneEnv(scenario=small)
    _, info = env.reset(seed=0)
    assert info["allocation"] == even_allocation(6, [4, 1, 6]) == [3, 1, 2]
    _, info = env.reset(seed=0, options={"allocation": [3, 1, 2]})
    assert info["allocation"] == [3, 1, 2]
    with pytest.raises(ValueError, match="transform"):
        env.reset(options={"allocation": [1, 1, 7]})
    with pytest.raises(ValueError, match="3 stages"):
        env.reset(options={"allocation": [1, 1]})


#: Bad ``reset(options={"allocation": ...})`` values and what the message must say.
BAD_ALLOCATION_OPTIONS = [
    (None, "must be 'even', 'min' or a sequence of 3 positive integers"),
    ("lots", "must be 'even', 'min' or a sequence of 3 positive integers"),
    ([1.5, 1, 1], "must hold integers"),
    ([1, 1], "3 stages"),
    ([0, 1, 1], "expected 1..4"),
]


@pytest.mark.parametrize(("value", "expected"), BAD_ALLOCATION_OPTIONS)
def test_bad_reset_allocation_names_the_option(small: dict, value: object,
                                               expected: str) -> None:
    env = InTuneEnv(scenario=small)
    _, before = env.reset(seed=0)
    with pytest.raises(ValueError) as err:
        env.reset(options={"allocation": value})
    msg = str(err.value)
    assert msg.startswith("InTune-v0: options['allocation']") and expected in msg, msg
    assert "start_allocation" not in msg, msg
    assert env._info()["allocation"] == before["allocation"]  # a failed reset changes nothing


def test_truncated_by_time_limit_covers_1200_simulated_seconds() -> None:
    env = gym.make("InTune-v0", scenario="transform-heavy")
    env.reset(seed=0)
    steps, truncated, info = 0, False, {}
    while not truncated:
        _, _, terminated, truncated, info = env.step(0)
        assert not terminated
        steps += 1
    assert steps == intune_env.MAX_EPISODE_STEPS
    assert info["sim_time_s"] >= 1200


def test_over_allocation_runs_out_of_memory_and_says_so() -> None:
    env = gym.make("InTune-v0", scenario="memory-tight")
    _, info = env.reset(seed=0, options={"allocation": [4, 2, 1, 8, 2]})
    assert not info["oom"]
    terminated = False
    for _ in range(40):  # keep adding transform workers (1.2 GiB each)
        _, reward, terminated, truncated, info = env.step(4)
        if terminated:
            break
    assert terminated and info["oom"]
    assert reward == -InTuneEnv.default_config()["oom_penalty"]
    assert info["memory_bytes"] > info["memory_capacity_bytes"]
    assert sum(info["allocation"]) <= info["cpus_total"]


def test_reward_formula_and_weights(small: dict) -> None:
    env = InTuneEnv(scenario=small, reward_memory_weight=0.5, reward_throughput_weight=2.0)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(0)
    expected = 2.0 * info["throughput"] / info["gpu_rate"] - 0.5 * (
        info["memory_bytes"] / info["memory_capacity_bytes"])
    assert reward == pytest.approx(expected)


def test_observation_features_match_info(small: dict) -> None:
    env = InTuneEnv(scenario=small, start_allocation=[2, 1, 3])
    obs, info = env.reset(seed=0)
    n = 3
    assert obs.shape == (3 * n + 4,)
    assert obs[:n] == pytest.approx(np.array([2, 1, 3]) / 6)
    assert obs[n:2 * n] == pytest.approx(info["stage_utilisation"], abs=1e-6)
    fill = np.array(info["buffer_levels"]) / np.array(info["buffer_capacities"])
    assert obs[2 * n:3 * n] == pytest.approx(fill, abs=1e-6)
    assert obs[3 * n] == pytest.approx(info["memory_bytes"] / info["memory_capacity_bytes"])
    assert obs[3 * n + 1] == pytest.approx(info["throughput"] / info["gpu_rate"])
    assert obs[3 * n + 2] == pytest.approx(0.0)
    assert env.observation_space.contains(obs)
    assert np.all(np.isfinite(env.observation_space.low))
    assert np.all(np.isfinite(env.observation_space.high))


def test_render_ansi_table() -> None:
    env = gym.make("InTune-v0", render_mode="ansi")
    env.reset(seed=0)
    text = env.render()
    assert isinstance(text, str)
    for name in ("read", "batch", "shuffle", "transform", "gpu_load", "oracle", "bottleneck"):
        assert name in text


def test_bad_config_and_scenario_give_clear_errors() -> None:
    with pytest.raises(ScenarioError, match="unknown argument"):
        gym.make("InTune-v0", reward_weight=1.0)
    with pytest.raises(ScenarioError, match=r"machine\.cpus"):
        gym.make("InTune-v0", machine={"cpus": "many"})
    with pytest.raises(ScenarioError, match="start_allocation"):
        gym.make("InTune-v0", start_allocation="lots")
    with pytest.raises(ScenarioError, match="stages"):
        gym.make("InTune-v0", scenario={"name": "x", "machine": {"cpus": 4, "memory_gib": 8,
                                                                 "gpu_rate": 10}})


def test_overrides_merge_into_scenario() -> None:
    env = gym.make("InTune-v0", machine={"cpus": 16}, noise_cv=0.0, control_interval_s=5.0)
    _, info = env.reset(seed=0)
    assert info["cpus_total"] == 16 and sum(info["allocation"]) == 16
    assert info["sim_time_s"] == 5.0
    assert env.unwrapped.scenario.machine.memory_gib == 64  # untouched keys kept


def test_set_allocation_may_oversubscribe_and_is_degraded(small: dict) -> None:
    env = InTuneEnv(scenario=small)
    env.reset(seed=0, options={"allocation": [2, 1, 3]})
    for _ in range(5):
        _, _, _, _, fit = env.step(0)
    env.set_allocation([4, 1, 6])  # 11 CPUs on a 6-CPU machine
    for _ in range(5):
        _, _, _, _, over = env.step(0)
    assert sum(over["allocation"]) == 11
    # every thread gets 6/11 of a CPU, less 10% context switching per 100% oversubscription:
    # read (4 x 20k x share) is now slower than transform (6 x 15k x share)
    share = (6 / 11) / (1 + 0.1 * (11 / 6 - 1))
    assert over["throughput"] == pytest.approx(20000 * 4 * share, rel=1e-3)
    assert over["throughput"] < 20000 * 4  # what the same allocation gives undegraded
    assert fit["throughput"] == pytest.approx(20000 * 2, rel=1e-3)


def test_common_action_codec_roundtrip() -> None:
    for n in (2, 5, 8):
        for a in range(2 * n + 1):
            stage, delta = common.decode_action(a, n)
            assert common.encode_action(stage, delta, n) == a


def test_sb3_subproc_vec_env_through_module_path() -> None:
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    venv = make_vec_env("intune_env:InTune-v0", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
                        vec_env_kwargs={"start_method": "spawn"})
    try:
        obs = venv.reset()
        obs, rewards, dones, infos = venv.step(np.array([0, 3]))
        assert obs.shape == (2, 19) and len(infos) == 2
        assert infos[1]["allocation"] != infos[0]["allocation"] or infos[1]["invalid_action"]
    finally:
        venv.close()


def test_negative_oom_penalty_is_refused() -> None:
    """A negative penalty would make a crash pay: a sign error, refused by name."""
    with pytest.raises(ValueError, match="oom_penalty must be >= 0"):
        gym.make("InTune-v0", oom_penalty=-5)
    assert gym.make("InTune-v0", oom_penalty=0.0).unwrapped.weights.oom_penalty == 0.0
