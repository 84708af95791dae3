"""`intune train / eval / compare`: user errors exit 2 with one line; the happy paths work."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from agents.cli.compare_cmd import compare
from agents.cli.train_eval import eval_cmd, train
from agents.compare import RUN_COLUMNS

TINY_PPO = {"ppo": {"n_timesteps": 256, "policy": "MlpPolicy", "n_envs": 2,
                    "normalize": {"norm_obs": True, "norm_reward": True}, "n_steps": 64,
                    "batch_size": 64, "n_epochs": 2, "n_evaluations": 1,
                    "n_eval_episodes": 1}}


def invoke(cmd: object, args: list[str]) -> Result:
    return CliRunner().invoke(cmd, args)  # type: ignore[arg-type]


def assert_one_line_error(res: Result, *fragments: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("intune: error: ")
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("cmd,extra", [
    (compare, ["--scenarios", "dlrm-criteo", "--seeds", "1"]),
    (eval_cmd, ["--episodes", "1"]),
    (train, []),
])
def test_unknown_agent(cmd: object, extra: list[str], tmp_path: Path) -> None:
    flag = "--agents" if cmd is compare else "--agent"
    args = [flag, "nosuchagent", *extra]
    if cmd is not eval_cmd:
        args += ["--out", str(tmp_path / "o")]
    assert_one_line_error(invoke(cmd, args), "unknown agent 'nosuchagent'", "autotune")


def test_bad_scenario_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmachine: {cpus: 8, memory_gib: 4, gpu_rate: 10}\nstages: []\n")
    res = invoke(compare, ["--scenarios", f"dlrm-criteo,{bad}", "--agents", "even",
                           "--seeds", "1", "--out", str(tmp_path / "o")])
    assert_one_line_error(res, str(bad), "stages")
    res = invoke(eval_cmd, ["--agent", "even", "--scenario", str(tmp_path / "missing.yaml")])
    assert_one_line_error(res, "missing.yaml", "no such scenario")


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = invoke(compare, ["--scenarios", "dlrm-criteo", "--agents", "even", "--seeds", "1",
                           "--out", str(blocker / "out")])
    assert_one_line_error(res, "a-file/out", "not writable")
    res = invoke(train, ["--agent", "qlearning-scratch", "--out", str(blocker / "out")])
    assert_one_line_error(res, "not writable")
    res = invoke(compare, ["--scenarios", "dlrm-criteo", "--agents", "even", "--seeds", "1",
                           "--out", str(blocker)])
    assert_one_line_error(res, "a-file", "is a file")


def test_other_user_errors(tmp_path: Path) -> None:
    assert_one_line_error(invoke(train, ["--agent", "autotune", "--out", str(tmp_path)]),
                          "does not learn")
    assert_one_line_error(invoke(eval_cmd, ["--agent", "ppo"]), "needs --model")
    assert_one_line_error(invoke(eval_cmd, ["--agent", "ppo", "--model",
                                            str(tmp_path / "none.zip")]), "no such file")
    res = invoke(compare, ["--scenarios", "dlrm-criteo", "--agents", "even", "--seeds", "0",
                           "--out", str(tmp_path)])
    assert_one_line_error(res, "--seeds")
    res = invoke(compare, ["--scenarios", "dlrm-criteo", "--agents", "ppo", "--seeds", "1",
                           "--models", str(tmp_path), "--out", str(tmp_path / "o")])
    assert_one_line_error(res, "no model for ppo")
    bad_hp = tmp_path / "hp.yaml"
    bad_hp.write_text("ppo: [1, 2\n")
    res = invoke(train, ["--agent", "ppo", "--hyperparams", str(bad_hp), "--out",
                         str(tmp_path / "t")])
    assert_one_line_error(res, "hp.yaml", "invalid YAML")
    res = invoke(eval_cmd, ["--agent", "even", "--seed", str(2**63 - 1), "--episodes", "2"])
    assert_one_line_error(res, "episode seeds run to 9223372036854775808")
    res = invoke(compare, ["--scenarios", "dlrm-criteo", "--agents", "even", "--seeds",
                           "100000000", "--out", str(tmp_path / "big")])
    assert_one_line_error(res, "--seeds: at most 10,000")
    import os

    many = str(4 * (os.cpu_count() or 1) + 1)
    res = invoke(compare, ["--scenarios", "dlrm-criteo", "--agents", "even", "--jobs", many,
                           "--out", str(tmp_path / "jobs")])
    assert_one_line_error(res, f"--jobs {many}: this machine has")
    assert not (tmp_path / "big").exists()


def test_train_eval_ppo_with_tensorboard(tmp_path: Path) -> None:
    hp = tmp_path / "tiny.yaml"
    hp.write_text(yaml.safe_dump(TINY_PPO))
    out = tmp_path / "model"
    res = invoke(train, ["--agent", "ppo", "--scenario", "machine-resize", "--steps", "128",
                         "--seed", "1", "--out", str(out), "--hyperparams", str(hp),
                         "--tensorboard", "--no-progress"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (out / "ppo.zip").exists() and (out / "ppo.vecnormalize.json").exists()
    assert any((out / "tb").rglob("events.out.tfevents*"))
    res = invoke(eval_cmd, ["--agent", "ppo", "--model", str(out / "ppo.zip"), "--scenario",
                            "machine-resize", "--episodes", "2", "--duration-s", "60"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "seed 0: final fraction" in res.output and "seed 1: final fraction" in res.output
    # the trained model serves `compare --models DIR` (DIR/ppo.zip: every scenario and seed)
    grid = tmp_path / "grid"
    res = invoke(compare, ["--scenarios", "machine-resize", "--agents", "ppo,even", "--seeds",
                           "1", "--duration-s", "20", "--jobs", "1", "--models", str(out),
                           "--out", str(grid), "--no-progress", "--no-plots"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert not (grid / "models").exists()  # nothing was trained
    with open(grid / "runs.csv", newline="") as fh:
        assert [r["agent"] for r in csv.DictReader(fh)] == ["ppo", "even"]


def test_train_eval_qlearning_scratch(tmp_path: Path) -> None:
    res = invoke(train, ["--agent", "qlearning-scratch", "--scenario", "dlrm-criteo",
                         "--steps", "700", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, (res.output, res.exception)
    table = tmp_path / "qlearning-scratch.json"
    assert table.exists() and "700 steps, 2 episodes" in res.output
    res = invoke(eval_cmd, ["--agent", "qlearning-scratch", "--model", str(table),
                            "--episodes", "1", "--duration-s", "100"])
    assert res.exit_code == 0, (res.output, res.exception)


def test_compare_command(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    args = ["--scenarios", "machine-resize", "--agents", "even,oracle", "--seeds", "2",
            "--duration-s", "30", "--jobs", "1", "--out", str(out), "--no-progress"]
    res = invoke(compare, args)
    assert res.exit_code == 0, (res.output, res.exception)
    with open(out / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and list(rows[0]) == list(RUN_COLUMNS)
    assert (out / "summary.md").exists() and (out / "summary.json").exists()
    res = invoke(compare, args)
    assert res.exit_code == 0 and "0 runs done, 4 reused" in res.output
