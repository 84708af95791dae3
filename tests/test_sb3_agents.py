"""SB3 baselines: tiny trainings run, agents act validly, saved models round-trip."""

from __future__ import annotations

from pathlib import Path

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
    path.write_text(f"ppo:\n  n_timesteps: 64\n  n_envs: 1\n  {line}\n")
    with pytest.raises(ValueError) as err:
        load_hyperparams("ppo", path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg, msg


@pytest.mark.parametrize(("algo", "line", "fragment"), [
    ("ppo", "gamma: 5.0", "ppo.gamma: expected a number in (0, 1], got 5.0"),
    ("ppo", "gamma: 0", "ppo.gamma: expected a number in (0, 1]"),
    ("ppo", "learning_rate: -0.001", "ppo.learning_rate: expected a number > 0"),
    ("ppo", "n_steps: 0", "ppo.n_steps: expected an integer >= 1, got 0"),
    ("ppo", "batch_size: -3", "ppo.batch_size: expected an integer >= 1, got -3"),
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
    ("dqn", "buffer_size: 0", "dqn.buffer_size: expected an integer >= 1, got 0"),
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
