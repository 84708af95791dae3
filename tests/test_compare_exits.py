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
