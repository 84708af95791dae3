"""compare exits cleanly: no orphan worker, no leaked semaphore, fast Ctrl-C."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner
from conftest import small_scenario

from agents.cli import main

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import sys
    from agents.compare import run_compare
    run_compare(sys.argv[1], "even,min,random", 12, sys.argv[2], duration_s=float(sys.argv[3]),
                jobs=2, progress=False, plots=False)
""")


def _start(tmp_path: Path, duration_s: float) -> tuple[subprocess.Popen[bytes], Path]:
    sc = tmp_path / "small.yaml"
    sc.write_text(yaml.safe_dump(small_scenario()))
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(sc), str(out),
                             str(duration_s)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, out


def _wait_children(proc: subprocess.Popen[bytes], n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if len(kids) >= n:
            return kids
        time.sleep(0.1)
    raise AssertionError("compare never started its workers")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_mid_grid(tmp_path: Path, group: bool) -> list[psutil.Process]:
    """Start a grid of runs that would take minutes, SIGKILL the parent (or its whole
    process group) once its workers run; return the workers, given 10 s to go."""
    proc, _ = _start(tmp_path, 20000.0)
    kids = _wait_children(proc, 2)
    time.sleep(0.5)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _alive(kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return kids


def _sems() -> set[str]:
    return set(glob.glob("/dev/shm/sem.mp-*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_kill9_of_parent_leaves_no_orphan(tmp_path: Path) -> None:
    kids = _kill_mid_grid(tmp_path, group=False)
    assert not _alive(kids), [p.cmdline() for p in _alive(kids)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/shm is Linux")
def test_kill9_of_process_group_leaks_no_semaphore(tmp_path: Path) -> None:
    before = _sems()
    kids = _kill_mid_grid(tmp_path, group=True)
    assert not _alive(kids)
    assert _sems() - before == set()


def test_ctrl_c_exits_fast_keeping_finished_runs(tmp_path: Path) -> None:
    proc, out = _start(tmp_path, 400.0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "runs").glob("*.json")):
        time.sleep(0.1)
    kids = psutil.Process(proc.pid).children(recursive=True)
    finished = list((out / "runs").glob("*.json"))
    assert finished, "no run finished"
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    proc.wait(10)
    assert time.monotonic() - t0 < 2.0
    time.sleep(0.3)
    assert not _alive(kids)
    for f in finished:
        json.loads(f.read_text())  # kept, whole


def test_a_folder_where_a_report_goes_is_refused_before_any_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "summary.md").mkdir(parents=True)
    res = CliRunner().invoke(main, ["compare", "--scenarios", "dlrm-criteo", "--agents",
                                    "even", "--seeds", "1", "--out", str(out)])
    assert res.exit_code == 2
    assert "summary.md is a folder" in res.output
    assert not (out / "runs").exists() and not (out / "runs.csv").exists()


def test_a_given_model_that_is_not_a_model_is_refused_before_any_run(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "dlrm-criteo" / "ppo").mkdir(parents=True)
    (models / "dlrm-criteo" / "ppo" / "seed0.zip").write_text("hello")
    res = CliRunner().invoke(main, ["compare", "--scenarios", "dlrm-criteo", "--agents", "ppo",
                                    "--seeds", "1", "--models", str(models), "--out",
                                    str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "seed0.zip: not a readable zip archive" in res.output
    assert not (tmp_path / "out" / "runs.csv").exists()


def test_a_refused_command_leaves_no_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "never"
    res = CliRunner().invoke(main, ["compare", "--scenarios", "dlrm-criteo", "--agents",
                                    "nosuch", "--seeds", "1", "--out", str(out)])
    assert res.exit_code == 2 and "unknown agent 'nosuch'" in res.output
    assert not out.exists()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Arguments of a compare with one bad input each, and what its error line says."""
    gamma = tmp_path / "gamma.yaml"
    gamma.write_text("ppo:\n  n_timesteps: 64\n  gamma: 5.0\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("ppo:\n  n_timesteps: 64\n  gama: 0.9\n")
    field = tmp_path / "field.yaml"
    field.write_text(yaml.safe_dump({**small_scenario(), "noise_cv": 7}))
    return {
        "agent": (["--agents", "nosuch"], "unknown agent 'nosuch'"),
        "scenario": (["--scenarios", "nosuch"], "nosuch: no such scenario file"),
        "suite index": (["--scenarios", "suite:test:-1"], "out of range"),
        "scenario field": (["--scenarios", str(field)], "field.yaml: noise_cv"),
        "hyperparameter range": (["--agents", "ppo", "--hyperparams", str(gamma)],
                                 "gamma.yaml: ppo.gamma: expected a number in (0, 1]"),
        "hyperparameter name": (["--agents", "ppo", "--hyperparams", str(typo)],
                                "typo.yaml: ppo.gama: unknown hyperparameter"),
    }


@pytest.mark.parametrize("case", ["agent", "scenario", "suite index", "scenario field",
                                  "hyperparameter range", "hyperparameter name"])
def test_user_errors_exit_2_with_one_line_and_no_folder(tmp_path: Path, case: str) -> None:
    args, fragment = _bad_inputs(tmp_path)[case]
    defaults = {"--agents": "even", "--scenarios": "dlrm-criteo"}
    given = set(args[::2])
    args += [a for k, v in defaults.items() if k not in given for a in (k, v)]
    out = tmp_path / "new" / "out"
    res = CliRunner().invoke(main, ["compare", *args, "--seeds", "1", "--out", str(out),
                                    "--jobs", "1", "--no-progress", "--no-plots"])
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("intune: error: "), res.stderr
    assert fragment in lines[0] and "Traceback" not in res.output, lines[0]
    assert not (tmp_path / "new").exists()


def test_a_user_error_found_during_a_run_exits_2(tmp_path: Path) -> None:
    # SB3 itself refuses a batch of 1, which only shows when the run builds the model
    hp = tmp_path / "hp.yaml"
    hp.write_text("ppo:\n  n_timesteps: 64\n  n_envs: 1\n  batch_size: 1\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compare", "--agents", "even,ppo", "--scenarios",
                                    "dlrm-criteo", "--seeds", "1", "--out", str(out),
                                    "--hyperparams", str(hp), "--sb3-steps", "64", "--jobs",
                                    "1", "--duration-s", "20", "--no-progress", "--no-plots"])
    assert res.exit_code == 2, (res.exit_code, res.output)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("intune: error: 1 run(s) refused their input "
                           "(dlrm-criteo__ppo__seed0: "), last
    assert "hp.yaml: ppo: PPO refused the hyperparameters" in last and "Traceback" not in \
        res.output
    assert (out / "runs" / "dlrm-criteo__even__seed0.json").exists()  # the good run is kept


def _fake_model(folder: Path, meta: dict | None, stats: str | None) -> None:
    """``ppo.zip`` that passes the zip checks (its weights are never read here), with a
    ``ppo.json`` sidecar ``meta`` and a ``ppo.vecnormalize.json`` text ``stats``."""
    import zipfile

    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "ppo.zip", "w") as zf:
        zf.writestr("data", "{}")
        zf.writestr("policy.pth", b"not read")
    if meta is not None:
        (folder / "ppo.json").write_text(json.dumps(meta))
    if stats is not None:
        (folder / "ppo.vecnormalize.json").write_text(stats)


_STATS = '{"format": "intune-obs-stats", "version": 1, "mean": [%s], "var": [1.0], ' \
         '"count": 1.0, "clip_obs": 10.0, "epsilon": 1e-8}'


@pytest.mark.parametrize(("meta", "stats", "fragment"), [
    # the tester's vn_nan: found only when the run loaded it, after OUT was made
    ({"algo": "ppo", "normalized": True}, _STATS % "NaN",
     "ppo.vecnormalize.json: field 'mean' must hold finite numbers"),
    ({"algo": "ppo", "normalized": True}, None, "ppo.vecnormalize.json: missing"),
    ({"algo": "ppo", "normalized": True}, '{"mean": [0', "is not valid JSON"),
    ({"algo": "a2c"}, None, "model was trained with a2c, not ppo"),
    ({"algo": "../../etc"}, None, "unknown SB3 algorithm"),
    ({"algo": "ppo", "observation_shape": [99], "n_actions": 11}, None,
     "model takes observations of shape (99,)"),
])
def test_given_model_files_are_checked_before_out_exists(tmp_path: Path, meta: dict,
                                                         stats: str | None,
                                                         fragment: str) -> None:
    _fake_model(tmp_path / "models", meta, stats)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compare", "--scenarios", "dlrm-criteo", "--agents", "ppo",
                                    "--seeds", "1", "--models", str(tmp_path / "models"),
                                    "--out", str(out), "--no-progress", "--no-plots"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("intune: error: --models: "), res.stderr
    assert fragment in lines[0], lines[0]
    assert not out.exists()  # the CHANGELOG's promise: a refused compare leaves no folder
