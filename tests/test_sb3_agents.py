"""SB3 baselines: tiny trainings run, agents act validly, saved models round-trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import yaml

import intune_env  # noqa: F401
from agents.base import run_episode
from agents.registry import AgentUnavailableError, make_agent
from agents.sb3_agents import (
    HyperparamError,
    SB3Agent,
    load_hyperparams,
    sidecar_paths,
    train_sb3,
)

EPISODE = 40  # steps per training/eval episode in these tests
_FAST = {"n_evaluations": 1, "n_eval_episodes": 1}
_PPO = {"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2, **_FAST}
#: Budgets small enough for a test, still through the whole training path.
TINY = {
    "ppo": {"n_timesteps": 256, "overrides": _PPO},
    "maskable-ppo": {"n_timesteps": 256, "overrides": _PPO},
    "a2c": {"n_timesteps": 256, "overrides": {"n_envs": 2, "n_steps": 8, **_FAST}},
    "dqn": {"n_timesteps": 300, "overrides": {
        "learning_starts": 100, "buffer_size": 1000, "target_update_interval": 100,
        "policy_kwargs": {"net_arch": [32, 32]}, **_FAST}},
}


def _train(algo: str, tmp_path: Path, seed: int = 0, name: str | None = None) -> Path:
    res = train_sb3(algo, "machine-resize", tmp_path / (name or algo), seed=seed,
                    n_timesteps=TINY[algo]["n_timesteps"], overrides=TINY[algo]["overrides"],
                    max_episode_steps=EPISODE)
    assert res.model_path.exists()
    return res.model_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sb3")
    return {algo: _train(algo, d) for algo in ("ppo", "a2c", "dqn", "maskable-ppo")}


@pytest.mark.parametrize("algo", ["ppo", "a2c", "dqn", "maskable-ppo"])
def test_agent_runs_an_episode(trained: dict[str, Path], algo: str) -> None:
    env = gym.make("InTune-v0", scenario="machine-resize", max_episode_steps=60)
    agent = make_agent(algo, env, seed=0, model_path=trained[algo])
    assert isinstance(agent, SB3Agent)
    trace = run_episode(env, agent, seed=3)
    assert len(trace.time_s) == 60
    # actions (never whole allocations) keep every stage at >= 1 CPU within the machine
    assert all(min(a) >= 1 and sum(a) <= 32 for a in trace.allocation)
    assert np.all(np.isfinite(trace.fraction))
    if algo == "maskable-ppo":
        assert trace.invalid == 0  # the mask removes every move the env would reject


def test_save_load_round_trip(trained: dict[str, Path], tmp_path: Path) -> None:
    env = gym.make("InTune-v0", scenario="machine-resize")
    pairs = [env.reset(seed=s) for s in range(5)]
    pairs += [(o, i) for o, _, _, _, i in (env.step(a) for a in range(env.action_space.n))]
    for algo, path in trained.items():
        a = SB3Agent.load(path)
        before = [a.act(o, i) for o, i in pairs]
        copy = a.save(tmp_path / f"copy-{algo}")
        b = SB3Agent.load(copy)
        assert [b.act(o, i) for o, i in pairs] == before
        assert b.algo == a.algo and b.meta["algo"] == a.algo
        zpath, stats, meta = sidecar_paths(copy)
        assert zpath.suffix == ".zip" and meta.exists()
        assert stats.exists() == (a.obs_stats is not None)
        if a.obs_stats is not None:
            np.testing.assert_array_equal(a.obs_stats.mean, b.obs_stats.mean)
            # the saved statistics are applied: raw and normalised observations differ
            assert not np.allclose(a._normalise(pairs[0][0]), pairs[0][0])


def test_same_seed_same_model(tmp_path: Path) -> None:
    p1 = _train("ppo", tmp_path, seed=5, name="a")
    p2 = _train("ppo", tmp_path, seed=5, name="b")
    m1, m2 = SB3Agent.load(p1).model, SB3Agent.load(p2).model
    for (k, v1), v2 in zip(m1.policy.state_dict().items(), m2.policy.state_dict().values(),
                           strict=True):
        assert np.array_equal(v1.numpy(), v2.numpy()), k


def test_registry_needs_a_model_for_sb3() -> None:
    env = gym.make("InTune-v0", scenario="dlrm-criteo")
    with pytest.raises(AgentUnavailableError, match="needs a trained model"):
        make_agent("ppo", env, seed=0)


def test_wrong_algorithm_for_model(trained: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="trained with ppo"):
        SB3Agent.load(trained["ppo"], algo="dqn")


def test_hyperparams_file(tmp_path: Path) -> None:
    hp = load_hyperparams("maskable-ppo")
    assert hp["policy"] == "MlpPolicy" and hp["n_timesteps"] >= hp["compare_n_timesteps"] > 0
    for algo in ("ppo", "a2c", "dqn"):
        assert load_hyperparams(algo)["normalize"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ppo": {"n_timesteps": 10}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: no mapping for algorithm 'dqn'"):
        load_hyperparams("dqn", bad)
    with pytest.raises(ValueError, match="unknown SB3 algorithm"):
        load_hyperparams("sac")


@pytest.mark.parametrize(("line", "fragment"), [
    ("turbo: 3", "ppo.turbo: unknown hyperparameter"),
    ("n_evaluations: 0", "ppo.n_evaluations: expected an integer from 1"),
    ("n_envs: 1000000", "ppo.n_envs: expected an integer from 1 to 4,096"),
    ("policy_kwargs: {optimizer_class: os.system}", "policy_kwargs.optimizer_class: not settable"),
    ("learning_rate: lin_3e-4", "ppo.learning_rate: expected a number"),
    ("device: cuda", "ppo.device: unknown hyperparameter"),
    ("gamma: hello", "ppo.gamma: expected a number"),
    ("batch_size: 3.5", "ppo.batch_size: expected an integer"),
    ("gamma: .nan", "ppo.gamma: expected a finite number"),
    ("policy: CnnPolicy", "ppo.policy: expected MlpPolicy"),
])
def test_a_bad_hyperparameter_file_is_one_line_naming_file_and_key(
        tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text(f"ppo:\n  n_timesteps: 64\n  {line}\n")
    with pytest.raises(ValueError) as err:
        load_hyperparams("ppo", path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg, msg


@pytest.mark.parametrize(("algo", "line", "fragment"), [
    ("ppo", "gamma: 5.0", "ppo.gamma: expected a number in (0, 1], got 5.0"),
    ("ppo", "gamma: 0", "ppo.gamma: expected a number in (0, 1]"),
    ("ppo", "learning_rate: -0.001", "ppo.learning_rate: expected a number > 0"),
    ("ppo", "n_steps: 0", "ppo.n_steps: expected an integer from 1 to 1,048,576, got 0"),
    ("ppo", "batch_size: -3", "ppo.batch_size: expected an integer from 1 to 65,536, got -3"),
    ("ppo", "n_epochs: 0", "ppo.n_epochs: expected an integer >= 1"),
    ("ppo", "ent_coef: -1", "ppo.ent_coef: expected a number >= 0, got -1"),
    ("ppo", "clip_range: 0", "ppo.clip_range: expected a number > 0, got 0"),
    ("ppo", "gae_lambda: 2", "ppo.gae_lambda: expected a number in [0, 1], got 2"),
    ("ppo", "target_kl: -0.1", "ppo.target_kl: expected a number > 0"),
    ("a2c", "vf_coef: -0.5", "a2c.vf_coef: expected a number >= 0"),
    ("a2c", "max_grad_norm: 0", "a2c.max_grad_norm: expected a number > 0"),
    ("dqn", "tau: 2", "dqn.tau: expected a number in (0, 1], got 2"),
    ("dqn", "exploration_fraction: 1.5", "dqn.exploration_fraction: expected a number in [0, 1]"),
    ("dqn", "exploration_final_eps: -0.1", "dqn.exploration_final_eps: expected a number in"),
    ("dqn", "buffer_size: 0", "dqn.buffer_size: expected an integer from 1 to 1,000,000, "
     "got 0"),
    ("dqn", "learning_starts: -1", "dqn.learning_starts: expected an integer >= 0"),
    ("dqn", "train_freq: 0", "dqn.train_freq: expected an integer >= 1 or [n,"),
    ("dqn", "train_freq: [4, hour]", "dqn.train_freq: expected an integer >= 1 or [n,"),
    ("dqn", "gradient_steps: 0", "dqn.gradient_steps: expected -1 (as many as steps"),
    ("dqn", "target_update_interval: 0", "dqn.target_update_interval: expected an integer"),
    ("ppo", "policy_kwargs: {activation_fn: sigmoid}",
     "ppo.policy_kwargs.activation_fn: expected one of tanh, relu, elu"),
])
def test_hyperparameters_out_of_range_are_refused_naming_file_key_and_range(
        tmp_path: Path, algo: str, line: str, fragment: str) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text(f"{algo}:\n  n_timesteps: 64\n  {line}\n")
    with pytest.raises(HyperparamError) as err:
        load_hyperparams(algo, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and fragment in msg and "\n" not in msg, msg
    assert msg.count(str(path)) == 1, msg


@pytest.mark.parametrize(("algo", "line"), [
    ("ppo", "gamma: 1"), ("ppo", "gae_lambda: 0"), ("ppo", "ent_coef: 0"),
    ("ppo", "target_kl: null"), ("dqn", "train_freq: [1, episode]"),
    ("dqn", "gradient_steps: -1"), ("dqn", "max_grad_norm: 0.5"),
    ("dqn", "exploration_fraction: 1.0"), ("dqn", "tau: 0.005")])
def test_hyperparameters_at_the_edges_of_their_range_are_accepted(
        tmp_path: Path, algo: str, line: str) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text(f"{algo}:\n  n_timesteps: 64\n  {line}\n")
    key, value = line.split(": ")
    assert load_hyperparams(algo, path)[key] == yaml.safe_load(value)


def test_overrides_are_range_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(HyperparamError, match=r"ppo\.gamma: expected a number in \(0, 1\]"):
        train_sb3("ppo", "machine-resize", tmp_path / "m", n_timesteps=64,
                  overrides={"gamma": 5.0})
    assert not any(tmp_path.iterdir())  # refused before any file or folder was made


def test_hyperparameter_file_needs_a_budget(tmp_path: Path) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text("ppo:\n  n_envs: 1\n")
    with pytest.raises(ValueError, match=r"ppo\.n_timesteps: required"):
        load_hyperparams("ppo", path)


def _hp_file(tmp_path: Path, algo: str, body: str) -> Path:
    path = tmp_path / "hp.yaml"
    path.write_text(f"{algo}:\n  n_timesteps: 64\n  " + body.replace("\n", "\n  ") + "\n")
    return path


@pytest.mark.parametrize(("algo", "line", "fragment"), [
    # layer widths: integers 1..4096, at most 8 layers, a bounded number of weights
    ("ppo", "policy_kwargs: {net_arch: [-5]}", "net_arch[0]: expected a layer width, an "
                                               "integer from 1 to 4,096, got -5"),
    ("ppo", "policy_kwargs: {net_arch: [0]}", "net_arch[0]: expected a layer width"),
    ("ppo", "policy_kwargs: {net_arch: [64, 64.5]}", "net_arch[1]: expected a layer width"),
    ("ppo", "policy_kwargs: {net_arch: [true, 64]}", "net_arch[0]: expected a layer width"),
    ("ppo", "policy_kwargs: {net_arch: [100000000, 100000000]}", "got 100000000"),
    ("ppo", "policy_kwargs: {net_arch: big}", "net_arch: expected a list of layer widths or "
                                              "{pi: [...], vf: [...]}, got 'big'"),
    ("ppo", "policy_kwargs: {net_arch: {pi: [-1], vf: [64]}}", "net_arch.pi[0]: expected a "
                                                               "layer width"),
    ("ppo", "policy_kwargs: {net_arch: {pi: [64], qf: [64]}}", "net_arch.qf: unknown key"),
    ("a2c", "policy_kwargs: {net_arch: {pi: 64}}", "net_arch.pi: expected a list of layer"),
    ("dqn", "policy_kwargs: {net_arch: {pi: [64], vf: [64]}}",
     "dqn.policy_kwargs.net_arch: expected a list of layer widths, got"),
    ("ppo", "policy_kwargs: {net_arch: [8, 8, 8, 8, 8, 8, 8, 8, 8]}", "at most 8 hidden layers"),
    ("ppo", "policy_kwargs: {net_arch: [4096, 4096, 4096]}",
     "net_arch: 33,554,432 weights between the hidden layers; expected at most 16,777,216"),
    ("ppo", "policy_kwargs: {ortho_init: 5}", "policy_kwargs.ortho_init: expected true or false"),
    ("maskable_ppo", "policy_kwargs: {log_std_init: 0.0}",
     "policy_kwargs.log_std_init: not settable from a file for maskable_ppo"),
    ("dqn", "policy_kwargs: {ortho_init: true}", "policy_kwargs.ortho_init: not settable"),
    # every number finite, nested ones too
    ("ppo", "policy_kwargs: {log_std_init: .nan}",
     "ppo.policy_kwargs.log_std_init: expected a finite number, got nan"),
    ("ppo", "policy_kwargs: {log_std_init: x}", "policy_kwargs.log_std_init: expected a number"),
    # sizes SB3 allocates up front
    ("ppo", "n_steps: 1000000000", "ppo.n_steps: expected an integer from 1 to 1,048,576"),
    ("ppo", "n_envs: 4096\nn_steps: 512", "ppo.n_steps: n_steps * n_envs = 2,097,152"),
    ("a2c", "n_envs: 4096\nn_steps: 300", "a2c.n_steps: n_steps * n_envs = 1,228,800"),
    ("ppo", "batch_size: 1000000000", "ppo.batch_size: expected an integer from 1 to 65,536"),
    ("dqn", "buffer_size: 100000000", "dqn.buffer_size: expected an integer from 1 to "
                                      "1,000,000"),
    ("dqn", "n_steps: 100\nbatch_size: 65536", "dqn.n_steps: n_steps * batch_size = 6,553,600"),
    # normalize: a bool or VecNormalize's own settings, each checked
    ("ppo", "normalize: {bogus: 1}", "ppo.normalize.bogus: unknown key; expected one of "
                                     "norm_obs, norm_reward, clip_obs"),
    ("ppo", "normalize: {training: false}", "ppo.normalize.training: unknown key"),
    ("ppo", 'normalize: "true"', "ppo.normalize: expected true, false or a mapping"),
    ("ppo", "normalize: [norm_obs]", "ppo.normalize: expected true, false or a mapping"),
    ("ppo", "normalize: {norm_obs: true, clip_obs: -1, gamma: 5, epsilon: -1}",
     "ppo.normalize.clip_obs: expected a number > 0, got -1"),
    ("ppo", "normalize: {clip_reward: 0}", "ppo.normalize.clip_reward: expected a number > 0"),
    ("ppo", "normalize: {gamma: 1}", "ppo.normalize.gamma: expected a number in [0, 1), got 1"),
    ("ppo", "normalize: {epsilon: -1}", "ppo.normalize.epsilon: expected a number > 0"),
    ("ppo", "normalize: {norm_reward: 1}", "ppo.normalize.norm_reward: expected true or false"),
    ("ppo", "normalize: {clip_obs: '5'}", "ppo.normalize.clip_obs: expected a number > 0"),
    ("ppo", "normalize: {clip_obs: .inf}", "ppo.normalize.clip_obs: expected a finite number"),
    # SB3 would refuse these only once the envs are built, or never take them from data
    ("ppo", "use_sde: true", "ppo.use_sde: expected false"),
    ("dqn", "optimize_memory_usage: true", "dqn.optimize_memory_usage: expected false"),
    ("ppo", "rollout_buffer_kwargs: {n_envs: 9}", "ppo.rollout_buffer_kwargs: not settable"),
    ("dqn", "replay_buffer_class: HerReplayBuffer", "dqn.replay_buffer_class: not settable"),
    # YAML 1.1 reads these as numbers nobody means, or overwrites a key silently
    ("ppo", "n_steps: 64\nn_steps: 1000000000", "line 4: invalid YAML: duplicate key 'n_steps' "
                                                "(first on line 3)"),
    ("ppo", "n_epochs: 010", "010 is read as octal"),
    ("ppo", "n_epochs: 1:30", "1:30 is read as base 60"),
])
def test_bad_nested_values_and_sizes_are_one_line_naming_file_and_key(
        tmp_path: Path, algo: str, line: str, fragment: str) -> None:
    path = _hp_file(tmp_path, algo, line)
    with pytest.raises(HyperparamError) as err:
        load_hyperparams(algo, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and fragment in msg and "\n" not in msg, msg


@pytest.mark.parametrize(("algo", "line"), [
    ("ppo", "policy_kwargs: {net_arch: [4096, 4096]}"),
    ("ppo", "policy_kwargs: {net_arch: [1, 1, 1, 1, 1, 1, 1, 1]}"),
    ("ppo", "policy_kwargs: {net_arch: []}"),
    ("ppo", "policy_kwargs: {net_arch: {pi: [64, 64], vf: [128]}}"),
    ("maskable_ppo", "policy_kwargs: {net_arch: {pi: [32]}, ortho_init: false}"),
    ("a2c", "policy_kwargs: {net_arch: {vf: []}, log_std_init: -1.5}"),
    ("dqn", "policy_kwargs: {net_arch: [256, 256], activation_fn: relu}"),
    ("ppo", "n_envs: 16\nn_steps: 65536"),
    ("dqn", "buffer_size: 1000000\nbatch_size: 65536"),
    ("ppo", "normalize: true"), ("ppo", "normalize: false"), ("ppo", "normalize: null"),
    ("ppo", "normalize: {norm_obs: true, norm_reward: false, clip_obs: 5.0, clip_reward: 1,"
            " gamma: 0, epsilon: 1.0e-8}"),
])
def test_nested_values_and_sizes_at_the_edges_are_accepted(
        tmp_path: Path, algo: str, line: str) -> None:
    hp = load_hyperparams(algo, _hp_file(tmp_path, algo, line))
    assert hp == {"n_timesteps": 64, **yaml.safe_load(line)}


def test_exponent_only_numbers_are_plain_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads `3e-4` as the string '3e-4'; the scenario loader reads a number
    path = _hp_file(tmp_path, "ppo", "learning_rate: 3e-4\ncompare_n_timesteps: 1e3\n"
                                     "policy_kwargs: {log_std_init: -5e-1}\n"
                                     "normalize: {epsilon: 1e-8}")
    hp = load_hyperparams("ppo", path)
    assert type(hp["learning_rate"]) is float and hp["learning_rate"] == 3e-4
    # a whole number written without a decimal point is a count, as in scenario files
    assert type(hp["compare_n_timesteps"]) is int and hp["compare_n_timesteps"] == 1000
    assert type(hp["policy_kwargs"]["log_std_init"]) is float
    assert type(hp["normalize"]["epsilon"]) is float
    with pytest.raises(HyperparamError, match=r"ppo\.n_timesteps: expected an integer from 1 "
                                              r"to 100,000,000, got 500\.0"):
        path.write_text("ppo:\n  n_timesteps: 5.0e2\n")  # a decimal point: not a count
        load_hyperparams("ppo", path)


@pytest.mark.parametrize("overrides", [
    {"policy_kwargs": {"net_arch": [0]}}, {"normalize": {"bogus": 1}},
    {"n_steps": 10**9}, {"policy_kwargs": {"log_std_init": float("nan")}}])
def test_overrides_get_the_file_checks_before_training(
        tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(HyperparamError) as err:
        train_sb3("ppo", "machine-resize", tmp_path / "m", n_timesteps=64, overrides=overrides)
    msg = str(err.value)
    assert "(with overrides): ppo." in msg and "\n" not in msg, msg
    assert not any(tmp_path.iterdir())


def test_dqn_without_n_steps_in_older_sb3_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    # DQN takes n_steps from stable-baselines3 2.7 on; pyproject allows >= 2.3, where the
    # size check read size["n_steps"] and raised a bare KeyError
    import inspect

    from agents import sb3_agents

    real = sb3_agents.ALGOS["dqn"]
    sig = inspect.signature(real.__init__)

    class OldDQN(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    OldDQN.__init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != "n_steps"])
    monkeypatch.setitem(sb3_agents.ALGOS, "dqn", OldDQN)
    assert sb3_agents.load_hyperparams("dqn")["n_timesteps"] > 0
