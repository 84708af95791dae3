"""The command line as a stranger meets it: --version, agents, help text, the layer contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import distribution
from pathlib import Path

import pytest
from click.testing import CliRunner

import agents
import intune_env
import simulators
from agents import registry
from agents.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_distributions() -> None:
    dist = distribution("intune")
    assert agents.__version__ == intune_env.__version__ == simulators.__version__
    assert simulators.__version__ == dist.version
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"intune, version {dist.version}"


def test_pyproject_version_is_the_installed_one() -> None:
    # the checkout's own ``intune.egg-info`` (setuptools' editable build leaves it, and the
    # checkout is on sys.path under pytest) has no direct_url.json: look at every one
    from importlib.metadata import distributions

    urls = [json.loads(d.read_text("direct_url.json") or "{}").get("url")
            for d in distributions(name="intune")]
    direct = {"url": ROOT.as_uri()} if ROOT.as_uri() in urls else {"url": urls}
    if direct.get("url") != ROOT.as_uri():
        pytest.skip(f"intune is installed from {direct.get('url')}, not this checkout")
    with open(ROOT / "pyproject.toml", "rb") as fh:
        assert tomllib.load(fh)["project"]["version"] == simulators.__version__


def test_agents_lists_every_agent_with_one_line() -> None:
    res = CliRunner().invoke(main, ["agents"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    names = [ln.split()[0] for ln in lines]
    assert names == registry.known_agents()
    assert all(len(ln.split(maxsplit=1)) == 2 for ln in lines), res.output  # a description


@pytest.mark.parametrize("cmd", ["eval", "run", "compare"])
def test_trust_model_help_names_the_risk(cmd: str) -> None:
    res = CliRunner().invoke(main, [cmd, "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "--trust-model" in text and "Unpickling runs any code" in text


def test_live_commands_are_attached_and_light() -> None:
    res = CliRunner().invoke(main, ["--help"])
    for name in ("scenarios", "run", "agents", "train", "eval", "compare", "calibrate",
                 "live-sweep"):
        assert f"  {name} " in res.output, res.output


def test_lower_layers_never_import_agents() -> None:
    code = ("import sys, simulators, intune_env, intune_env.live.cli, intune_env.cli; "
            "print(sorted(m for m in sys.modules if m == 'agents' or m.startswith('agents.')),"
            " 'gymnasium' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.split()[0] == "[]", proc.stdout
    code = "import sys, simulators; print('gymnasium' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_import_contract_holds() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed (pip install 'intune[dev]')")
    proc = subprocess.run([found], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_trust_model_without_a_model_is_a_warning() -> None:
    res = CliRunner().invoke(main, ["run", "--agent", "even", "--trust-model", "--duration-s",
                                    "4", "--every", "10"])
    assert res.exit_code == 0, res.output
    assert "intune: warning: --trust-model has no effect without --model" in res.stderr


def test_late_events_warn_once_per_scenario(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["compare", "--scenarios", "machine-resize,dlrm-criteo",
                                    "--agents", "even", "--seeds", "1", "--duration-s", "20",
                                    "--jobs", "1", "--out", str(tmp_path), "--no-progress",
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("intune: warning:")]
    assert len(warnings) == 1 and "machine-resize" in warnings[0] and "600 s" in warnings[0]
    last = res.stdout.strip().splitlines()[-1]
    assert f"wrote runs.csv, summary.md, summary.json in {tmp_path}" in last  # no plots asked
    res = CliRunner().invoke(main, ["eval", "--agent", "even", "--scenario", "machine-resize",
                                    "--episodes", "1", "--duration-s", "1200"])
    assert res.exit_code == 0 and "warning" not in res.stderr  # the event happens


@pytest.mark.parametrize(("at_s", "late"), [(1199.0, False), (1200.0, False), (1201.0, True)])
def test_late_event_boundary_is_the_last_interval_start(at_s: float, late: bool,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    # 600 steps of 2 s: the last starts at 1200 s, so an event at 1200 s still happens
    # (the warning said it never did), one at 1201 s does not
    from conftest import small_scenario

    from agents.cli.common import warn_late_events

    data = small_scenario()
    data["events"] = [{"at_s": at_s, "stage": data["stages"][0]["name"],
                       "rate_per_cpu_factor": 0.5}]
    warn_late_events(simulators.load_scenario(data), 1200.0)
    err = capsys.readouterr().err
    assert ("never happen" in err) == late, err


def test_the_command_starts_without_heavy_imports() -> None:
    heavy = ("torch", "matplotlib", "stable_baselines3", "pyarrow", "ray")
    code = f"import sys, agents.cli; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_run_lengths_have_upper_bounds(tmp_path: Path) -> None:
    # accepted before, they would have run for years
    res = CliRunner().invoke(main, ["eval", "--agent", "even", "--episodes", "100000000"])
    assert res.exit_code == 2 and "--episodes: at most 10,000" in res.stderr
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--agent", "qlearning-scratch", "--steps",
                                    "10000000000000", "--out", str(out)])
    assert res.exit_code == 2 and "--steps: at most 100,000,000" in res.stderr
    assert not out.exists()
