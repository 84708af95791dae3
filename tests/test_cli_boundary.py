"""Every subcommand refuses bad input and I/O faults at its boundary: one line, exit 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agents.cli import main

ROOT = Path(__file__).resolve().parents[1]
LONG = "a" * 300  # longer than NAME_MAX (255) on every common file system


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line(res: Result, *fragments: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("intune: error: "), res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e300"])  # 1e300: no end
def test_duration_must_be_finite_and_positive(value: str, tmp_path: Path) -> None:
    one_line(invoke("eval", "--agent", "even", "--duration-s", value), "--duration-s")
    one_line(invoke("run", "--agent", "even", "--duration-s", value), "--duration-s")
    one_line(invoke("compare", "--agents", "even", "--scenarios", "dlrm-criteo", "--seeds",
                    "1", "--duration-s", value, "--out", str(tmp_path)), "--duration-s")


def test_integer_options_have_lower_bounds() -> None:
    one_line(invoke("run", "--every", "0"), "--every must be at least 1, got 0")
    one_line(invoke("eval", "--agent", "even", "--episodes", "0"), "--episodes")
    one_line(invoke("scenarios", "generate", "--count", "0", "--out", "x"), "--count")


@pytest.mark.parametrize(("spec", "why"), [("suite:test:-1", "out of range"),
                                         ("suite:test:200", "out of range"),
                                         ("suite:test:x", "is not an integer")])
def test_suite_index_out_of_range_names_the_range(spec: str, why: str, tmp_path: Path) -> None:
    one_line(invoke("scenarios", "show", spec), why, "suite 'test' has members 0..199")
    out = tmp_path / "new"
    one_line(invoke("compare", "--agents", "even", "--scenarios", spec, "--seeds", "1",
                    "--out", str(out)), why, "0..199")
    assert not out.exists()


def test_model_for_an_agent_that_does_not_learn(tmp_path: Path) -> None:
    model = tmp_path / "m.json"
    model.write_text("{}")
    for cmd in ("eval", "run"):
        one_line(invoke(cmd, "--agent", "even", "--model", str(model)), "'even' does not learn")
    one_line(invoke("run", "--agent", "qlearning", "--model", str(tmp_path / "no.json")),
             "no such file")
    one_line(invoke("run", "--agent", "ppo"), "needs a trained model", "--model")


def test_run_loads_a_trained_table(tmp_path: Path) -> None:
    res = invoke("train", "--agent", "qlearning-scratch", "--steps", "60", "--out",
                 str(tmp_path), "--no-progress")
    assert res.exit_code == 0, res.output
    table = tmp_path / "qlearning-scratch.json"
    res = invoke("run", "--agent", "qlearning-scratch", "--model", str(table), "--scenario",
                 "machine-resize", "--duration-s", "20", "--every", "5")
    assert res.exit_code == 0, (res.output, res.exception)
    assert "qlearning-scratch on machine-resize: mean fraction of oracle" in res.stdout
    # a table is not an SB3 model: the loader refuses it with one line
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    one_line(invoke("run", "--agent", "qlearning-scratch", "--model", str(broken)),
             "broken.json")


def test_train_refuses_a_folder_where_the_model_goes_before_training(tmp_path: Path) -> None:
    (tmp_path / "qlearning-scratch.json").mkdir()
    res = invoke("train", "--agent", "qlearning-scratch", "--steps", "100000", "--out",
                 str(tmp_path), "--no-progress")
    one_line(res, "qlearning-scratch.json", "is a folder")
    assert "saved" not in res.stdout


@pytest.mark.parametrize(("hp", "fragment"), [
    ("ppo:\n  n_timesteps: 64\n  gamma: 5.0\n", "ppo.gamma: expected a number in (0, 1]"),
    # refused by SB3 itself, once training has started inside OUT
    ("ppo:\n  n_timesteps: 64\n  n_envs: 1\n  batch_size: 1\n",
     "PPO refused the hyperparameters")])
def test_train_failing_on_user_input_leaves_no_out_folder(tmp_path: Path, hp: str,
                                                          fragment: str) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text(hp)
    out = tmp_path / "new" / "models"
    one_line(invoke("train", "--agent", "ppo", "--hyperparams", str(path), "--steps", "64",
                    "--out", str(out), "--no-progress"), "hp.yaml", fragment)
    assert not (tmp_path / "new").exists()
    # a folder that was there before is left as it was
    out.mkdir(parents=True)
    one_line(invoke("train", "--agent", "ppo", "--hyperparams", str(path), "--steps", "64",
                    "--out", str(out), "--no-progress"), fragment)
    assert out.is_dir() and not any(out.iterdir())


def test_out_dir_removes_only_the_empty_folders_it_made(tmp_path: Path) -> None:
    from agents.cli.common import out_dir

    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "a" / "b"
    with pytest.raises(SystemExit), out_dir(target):
        assert target.is_dir()
        raise SystemExit(2)
    assert not (tmp_path / "kept" / "a").exists() and (tmp_path / "kept").is_dir()
    with pytest.raises(KeyboardInterrupt), out_dir(target):
        (target / "partial.json").write_text("{}")  # something was written: kept
        raise KeyboardInterrupt
    assert (target / "partial.json").exists()


def test_out_naming_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "f.txt"
    blocker.write_text("x")
    one_line(invoke("train", "--agent", "qlearning-scratch", "--out", str(blocker)), "is a file")
    one_line(invoke("compare", "--agents", "even", "--scenarios", "dlrm-criteo", "--seeds", "1",
                    "--out", str(blocker)), "is a file")
    one_line(invoke("scenarios", "generate", "--count", "1", "--out", str(blocker)), "is a file")


def test_empty_out_is_refused_not_the_current_folder(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is "."; `--out ''` (an unset variable) wrote runs/, runs.csv, summary.*
    # and .compare.lock into the current folder
    from agents.compare import CompareError, run_compare

    monkeypatch.chdir(tmp_path)
    one_line(invoke("compare", "--agents", "even", "--scenarios", "dlrm-criteo", "--seeds",
                    "1", "--duration-s", "20", "--jobs", "1", "--out", ""),
             "--out", "empty path")
    with pytest.raises(CompareError, match="--out: empty path"):
        run_compare("dlrm-criteo", "even", 1, "", duration_s=20.0, jobs=1, progress=False,
                    plots=False)
    one_line(invoke("train", "--agent", "qlearning-scratch", "--steps", "10", "--out", ""),
             "--out", "empty path")
    one_line(invoke("scenarios", "generate", "--count", "1", "--out", ""), "--out", "empty path")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("make", "fragment"), [
    # was "output folder is not writable (File exists)"
    ("runs", "runs is a file; expected a folder"),
    # were found only once every run had finished
    ("plots", "plots is a file; expected a folder"),
    ("plots/summary.png/", "summary.png is a folder; expected a file"),
    ("runs/dlrm-criteo__even__seed0.json/", "seed0.json is a folder; expected a file"),
    (".compare.lock/", ".compare.lock is a folder; expected a file"),
])
def test_compare_checks_where_it_writes_before_any_run(tmp_path: Path, make: str,
                                                       fragment: str) -> None:
    out = tmp_path / "out"
    target = out / make.rstrip("/")
    if make.endswith("/"):
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x")
    one_line(invoke("compare", "--agents", "even", "--scenarios", "dlrm-criteo", "--seeds",
                    "1", "--duration-s", "20", "--jobs", "1", "--no-progress", "--out",
                    str(out)), str(out), fragment)
    assert not [p for p in out.rglob("*.json") if p.is_file()]  # no run ran
    assert not (out / "runs.csv").exists()


def test_names_too_long_for_the_file_system(tmp_path: Path) -> None:
    one_line(invoke("compare", "--agents", "even", "--scenarios", "dlrm-criteo", "--seeds", "1",
                    "--out", str(tmp_path / LONG)), "File name too long")
    one_line(invoke("train", "--agent", "qlearning-scratch", "--out", str(tmp_path / LONG)),
             "File name too long")
    line = one_line(invoke("scenarios", "show", str(tmp_path / f"{LONG}.yaml")))
    assert len(line) < 400  # the echoed path is capped


def test_disk_full_is_one_line_and_leaves_nothing_half_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # every atomic write fsyncs before renaming
    res = invoke("train", "--agent", "qlearning-scratch", "--steps", "30", "--out",
                 str(tmp_path), "--no-progress")
    one_line(res, "No space left on device", "disk is full")
    assert list(tmp_path.iterdir()) == []  # no table, no temporary file


def _tiny_tmpfs(path: Path) -> bool:
    path.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def test_disk_really_full(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    if not _tiny_tmpfs(mnt):
        pytest.skip("needs root to mount a 64 KiB tmpfs")
    try:
        with open(mnt / "filler", "wb", buffering=0) as fh, pytest.raises(OSError):
            while True:
                fh.write(b"x" * 4096)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for args in (["train", "--agent", "qlearning-scratch", "--steps", "30",
                      "--no-progress", "--out", str(mnt / "m")],
                     ["compare", "--agents", "even", "--scenarios", "machine-resize",
                      "--seeds", "1", "--duration-s", "10", "--jobs", "1", "--no-progress",
                      "--out", str(mnt / "c")]):
            proc = subprocess.run([sys.executable, "-m", "agents.cli", *args], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("intune: error")]
            assert proc.returncode == 2 and len(errors) == 1, proc.stderr
            assert "No space left on device" in errors[0] and "Traceback" not in proc.stderr
        assert not [p for p in mnt.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("args, fragment", [
    (["run", "--every", "abc"], "'abc' is not a valid integer"),
    (["nosuchcommand"], "No such command"),
    (["train"], "Missing option '--agent'"),
    (["compare", "--executor", "slurm", "--out", "x"], "--executor"),
    (["run", "--seed", "-1"], "--seed"),
    (["eval", "--agent", "even", "--seed", str(2**64)], "--seed"),
    (["train", "--agent", "qlearning-scratch", "--seed", "-3", "--out", "x"], "--seed"),
])
def test_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    one_line(invoke(*args), fragment, "--help")


def test_scenarios_generate_writes_valid_files(tmp_path: Path) -> None:
    pytest.importorskip("simulators.generate", reason="scenario generator not merged yet")
    out = tmp_path / "gen"
    res = invoke("scenarios", "generate", "--count", "3", "--seed", "7", "--out", str(out))
    assert res.exit_code == 0, (res.output, res.exception)
    files = sorted(out.glob("*.yaml"))
    assert len(files) == 3 and "wrote 3 scenarios" in res.output
    for f in files:
        assert invoke("scenarios", "show", str(f)).exit_code == 0
    again = tmp_path / "again"
    assert invoke("scenarios", "generate", "--count", "3", "--seed", "7", "--out",
                  str(again)).exit_code == 0
    assert [f.read_bytes() for f in files] == [f.read_bytes()
                                               for f in sorted(again.glob("*.yaml"))]


def test_error_lines_are_safe_and_bounded() -> None:
    from intune_env.cli import MAX_LINES, error_lines

    assert error_lines("a\n\n  b   c\n") == ["a", "b c"]
    assert error_lines("\x1b[31mred\x1b[0m") == ["\\x1b[31mred\\x1b[0m"]  # no escapes reach a tty
    many = error_lines("\n".join(f"fault {i}" for i in range(20)))
    assert len(many) == MAX_LINES and many[-1] == "(+13 more lines)"
    assert len(error_lines("x" * 10**6)[0]) < 1100


def test_reader_leaving_the_pipe_is_a_quiet_exit() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "run", "--agent", "even",
                             "--duration-s", "2000", "--every", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err == "", err
