"""SB3 model folders are data: nothing in them runs, every fault is one clear line."""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import small_scenario

import intune_env  # noqa: F401
from agents.registry import AgentUnavailableError, agent_descriptions, known_agents, make_agent
from agents.sb3_agents import SB3Agent, train_sb3
from agents.sb3_files import ModelFileError

_TINY = {"n_envs": 2, "n_steps": 32, "batch_size": 64, "n_epochs": 1, "n_evaluations": 1,
         "n_eval_episodes": 1}


class _Marker:
    """Unpickling this writes a marker file: proof that code from the file ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "pwned"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ppo")
    res = train_sb3("ppo", "machine-resize", d / "ppo", n_timesteps=64, overrides=_TINY,
                    max_episode_steps=20)
    return res.model_path


def _copy(model: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in model.parent.iterdir():
        if f.name.startswith("ppo"):
            shutil.copy(f, dest / f.name)
    return dest / "ppo.zip"


def _rewrite_zip(zpath: Path, edit: dict[str, bytes | None]) -> None:
    with zipfile.ZipFile(zpath) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    for k, v in edit.items():
        if v is None:
            entries.pop(k, None)
        else:
            entries[k] = v
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in entries.items():
            zf.writestr(k, v)


def _env(scenario: object = "machine-resize") -> gym.Env:
    return gym.make("InTune-v0", scenario=scenario)


def test_model_records_what_it_was_trained_on(model: Path) -> None:
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["scenario"] == "machine-resize" and meta["n_stages"] == len(meta["stage_names"])
    assert meta["observation_shape"] == list(_env().observation_space.shape)
    assert meta["n_actions"] == 2 * meta["n_stages"] + 1
    assert meta["normalized"] is True
    stats = json.loads(Path(str(model).replace(".zip", ".vecnormalize.json")).read_text())
    assert set(stats) >= {"mean", "var", "count", "clip_obs", "epsilon"}
    assert not list(model.parent.glob("*.pkl"))  # no pickle written anywhere


def test_malicious_stats_pickle_never_runs(model: Path, tmp_path: Path) -> None:
    z = _copy(model, tmp_path / "m")
    marker = tmp_path / "marker"
    (tmp_path / "m" / "ppo.vecnormalize.json").unlink()
    (tmp_path / "m" / "ppo.vecnormalize.pkl").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(ModelFileError, match=r"pickle.*trust-model"):
        make_agent("ppo", _env(), seed=0, model_path=z)
    assert not marker.exists()
    # the flag is what makes it run: the test above could fail
    with pytest.raises(ModelFileError):  # the payload is not a VecNormalize
        make_agent("ppo", _env(), seed=0, model_path=z, trust_model=True)
    assert marker.exists()


def test_malicious_serialized_entries_never_run(model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = base64.b64encode(pickle.dumps(_Marker(str(marker)))).decode()
    z = _copy(model, tmp_path / "m")
    with zipfile.ZipFile(z) as zf:
        data = json.loads(zf.read("data"))
    # a known entry with a poisoned payload is rebuilt from readable fields: loads fine
    data["observation_space"][":serialized:"] = payload
    data["lr_schedule"][":serialized:"] = payload
    _rewrite_zip(z, {"data": json.dumps(data).encode()})
    agent = make_agent("ppo", _env(), seed=0, model_path=z)
    obs, info = _env().reset(seed=0)
    assert 0 <= agent.act(obs, info) < _env().action_space.n
    assert not marker.exists()
    # an entry nobody knows how to rebuild is refused
    data["evil"] = {":type:": "<class 'x'>", ":serialized:": payload}
    _rewrite_zip(z, {"data": json.dumps(data).encode()})
    with pytest.raises(ModelFileError, match=r"'evil'.*unpickling.*trust-model"):
        SB3Agent.load(z)
    assert not marker.exists()
    with pytest.raises(ModelFileError):  # SB3 then unpickles it: the payload runs
        SB3Agent.load(z, trust_model=True)
    assert marker.exists()


def test_pickled_object_in_policy_weights_refused(model: Path, tmp_path: Path) -> None:
    z = _copy(model, tmp_path / "m")
    marker = tmp_path / "marker"
    _rewrite_zip(z, {"policy.pth": pickle.dumps(_Marker(str(marker)))})
    with pytest.raises(ModelFileError, match=r"ppo\.zip"):
        SB3Agent.load(z)
    assert not marker.exists()


@pytest.mark.parametrize("fault", ["empty", "truncated", "no-data", "no-policy",
                                   "policy-corrupt", "data-list", "not-zip", "data-bomb",
                                   "many-entries"])
def test_broken_zip_one_line(model: Path, tmp_path: Path, fault: str) -> None:
    z = _copy(model, tmp_path / "m")
    raw = z.read_bytes()
    if fault == "empty":
        z.write_bytes(b"")
    elif fault == "truncated":
        z.write_bytes(raw[: len(raw) // 2])
    elif fault == "not-zip":
        z.write_text("hello")
    elif fault == "no-data":
        _rewrite_zip(z, {"data": None})
    elif fault == "no-policy":
        _rewrite_zip(z, {"policy.pth": None})
    elif fault == "policy-corrupt":
        _rewrite_zip(z, {"policy.pth": b"\x00garbage" * 50})
    elif fault == "data-list":
        _rewrite_zip(z, {"data": b"[1, 2]"})
    elif fault == "data-bomb":  # 32 MiB of spaces: a small file, refused before inflating
        _rewrite_zip(z, {"data": b" " * (32 << 20)})
        assert z.stat().st_size < 1 << 20
    elif fault == "many-entries":  # each under the cap, 300 MiB in all
        _rewrite_zip(z, {f"pad{i}": bytes(100 << 20) for i in range(3)})
    with pytest.raises(ModelFileError) as err:
        make_agent("ppo", _env(), seed=0, model_path=z)
    msg = str(err.value)
    assert "\n" not in msg and "ppo.zip" in msg and len(msg) < 300
    if fault == "many-entries":
        assert "bytes in all" in msg


def test_sidecar_faults(model: Path, tmp_path: Path) -> None:
    z = _copy(model, tmp_path / "m")
    side = z.with_suffix(".json")
    good = side.read_text()
    side.write_text("[1, 2, 3]")
    with pytest.raises(ModelFileError, match=r"ppo\.json: model sidecar must be a JSON object"):
        SB3Agent.load(z)
    side.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        SB3Agent.load(z)
    for bad in ('{"n_stages": 5, ' + good.lstrip()[1:],  # duplicate key: no "last wins"
                '{"x": ' + "9" * 5000 + ", " + good.lstrip()[1:]):  # too many digits
        side.write_text(bad)
        with pytest.raises(ModelFileError, match=r"ppo\.json: model sidecar is not valid JSON"):
            SB3Agent.load(z)
    side.write_text(good)
    stats = tmp_path / "m" / "ppo.vecnormalize.json"
    stats.write_text(json.dumps({"mean": [0.0], "var": [1.0], "count": 1, "clip_obs": 10,
                                 "epsilon": 1e-8}))
    with pytest.raises(ModelFileError, match="statistics for 1 observation values"):
        SB3Agent.load(z)
    stats.unlink()
    with pytest.raises(ModelFileError, match="missing; the model was trained with normalised"):
        SB3Agent.load(z)


def test_wrong_kind_of_file(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"an SB3 model is a \.zip file"):
        make_agent("ppo", _env(), seed=0, model_path=tmp_path / "qlearning.json")
    with pytest.raises(ModelFileError, match="no such model file"):
        make_agent("ppo", _env(), seed=0, model_path=tmp_path / "nothing.zip")
    with pytest.raises(AgentUnavailableError, match="takes no model file"):
        make_agent("autotune", _env(), seed=0, model_path=model)


def test_stage_count_mismatch_names_both(model: Path) -> None:
    env = _env(small_scenario())  # 3 stages; the model was trained on 5
    n_model = json.loads(model.with_suffix(".json").read_text())["n_stages"]
    assert n_model == 5
    with pytest.raises(ModelFileError,
                       match=r"model trained on 5 stages \(.*\) of machine-resize, "
                             r"scenario small has 3 stages \(read, shuffle, transform\)"):
        make_agent("ppo", env, seed=0, model_path=model)


def test_steps_reported_are_steps_trained(tmp_path: Path) -> None:
    # 2 envs x 32 steps per rollout: a budget of 40 trains 64
    res = train_sb3("ppo", "machine-resize", tmp_path / "p", n_timesteps=40, overrides=_TINY,
                    max_episode_steps=20)
    assert res.requested == 40 and res.n_timesteps == 64


def test_maskable_ppo_trains_on_batched_env_without_wrapper(tmp_path: Path) -> None:
    res = train_sb3("maskable-ppo", "machine-resize", tmp_path / "m", n_timesteps=128,
                    overrides=_TINY, max_episode_steps=20)
    meta = json.loads(res.model_path.with_suffix(".json").read_text())
    assert meta["vec_env"] == "batched"
    agent = make_agent("maskable-ppo", _env(), seed=0, model_path=res.model_path)
    env = _env()
    obs, info = env.reset(seed=1)
    for _ in range(30):
        obs, _, term, trunc, info = env.step(agent.act(obs, info))
        assert not info["invalid_action"]
        if term or trunc:
            break


def test_dummy_and_batched_training_agree(tmp_path: Path) -> None:
    """Sub-env i of the batch is the single env seeded s + i: same model either way."""
    a = train_sb3("a2c", "machine-resize", tmp_path / "a", n_timesteps=64, seed=3,
                  overrides={"n_envs": 2, "n_steps": 8, "n_evaluations": 1,
                             "n_eval_episodes": 1}, max_episode_steps=20, vec_env="batched")
    b = train_sb3("a2c", "machine-resize", tmp_path / "b", n_timesteps=64, seed=3,
                  overrides={"n_envs": 2, "n_steps": 8, "n_evaluations": 1,
                             "n_eval_episodes": 1}, max_episode_steps=20, vec_env="dummy")
    pa = SB3Agent.load(a.model_path).model.policy.state_dict()
    pb = SB3Agent.load(b.model_path).model.policy.state_dict()
    for k in pa:
        np.testing.assert_allclose(pa[k].numpy(), pb[k].numpy(), rtol=1e-5, atol=1e-6)


def test_agent_descriptions_cover_every_agent() -> None:
    d = agent_descriptions()
    assert set(d) == set(known_agents())
    assert all(isinstance(v, str) and v and "\n" not in v for v in d.values())


def test_train_refuses_folder_output_before_training(tmp_path: Path) -> None:
    (tmp_path / "ppo.zip").mkdir()
    with pytest.raises(ModelFileError, match="is a folder"):
        train_sb3("ppo", "machine-resize", tmp_path / "ppo.zip", n_timesteps=10**9,
                  overrides=_TINY)  # would take hours if it trained first


def test_sigterm_during_training_leaves_no_temporary_folder(tmp_path: Path) -> None:
    """`timeout` or a scheduler sends SIGTERM: the command unwinds and cleans up."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "train", "--agent", "a2c",
                             "--steps", "1000000", "--out", str(tmp_path), "--no-progress"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".train-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(tmp_path.glob(".train-*")), "training never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert not list(tmp_path.glob(".train-*")) and not list(tmp_path.glob("*.zip"))
