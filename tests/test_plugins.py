"""Plugins through the real command line (subprocesses): ``--plugin`` and entry points."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "examples/plugin_amdahl.py"
SCENARIO = "examples/amdahl_scenario.yaml"


def intune(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "agents.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("intune: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_unknown_kind_without_plugin_is_one_line_naming_the_flag() -> None:
    one_error_line(intune("scenarios", "show", SCENARIO), "amdahl", "--plugin")
    one_error_line(intune("run", "--scenario", SCENARIO, "--agent", "even"), "amdahl",
                   "--plugin")


def test_plugin_file_makes_show_and_run_work() -> None:
    proc = intune("--plugin", PLUGIN, "scenarios", "show", SCENARIO)
    assert proc.returncode == 0, proc.stderr
    assert "transform   amdahl" in proc.stdout and "oracle: 165,000 samples/s" in proc.stdout
    # what the table has no column for is listed under it
    assert "  shuffle: state_mib 500\n  transform: serial_fraction=0.1\n" in proc.stdout
    proc = intune("--plugin", PLUGIN, "run", "--scenario", SCENARIO, "--agent", "even",
                  "--duration-s", "20", "--every", "5")
    assert proc.returncode == 0, proc.stderr
    assert "even on amdahl-transform: mean fraction of oracle" in proc.stdout
    # the event at 600 s is past a 20 s episode: one warning line, not an error
    assert proc.stderr.count("intune: warning:") == 1 and "600 s" in proc.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])  # 2: the pool's workers load the plugin too
def test_plugin_reaches_compare(jobs: str, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    proc = intune("--plugin", PLUGIN, "compare", "--scenarios", SCENARIO, "--agents",
                  "even,qlearning", "--seeds", "1", "--duration-s", "30", "--jobs", jobs,
                  "--out", str(out), "--no-progress", "--no-plots")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["agent"] for r in rows} == {"even", "qlearning"}
    assert all(r["scenario"] == "amdahl-transform" for r in rows)


def test_broken_plugins_are_one_line(tmp_path: Path) -> None:
    one_error_line(intune("--plugin", str(tmp_path / "nope.py"), "agents"), "no such file")
    one_error_line(intune("--plugin", "no_such_plugin_module", "agents"), "no module named")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    one_error_line(intune("--plugin", str(bad), "agents"), "failed to import", "boom")


def test_plugin_agent_is_listed_and_runs(tmp_path: Path) -> None:
    plugin = tmp_path / "my_agent.py"
    plugin.write_text(
        "from agents.registry import register_agent\n"
        "from agents.static import MinAgent\n\n\n"
        "def make(env, seed, model_path=None, **kwargs):\n"
        "    \"\"\"One CPU per stage, from a plugin.\"\"\"\n"
        "    return MinAgent()\n\n\n"
        "register_agent('plugin-min', make)\n")
    proc = intune("--plugin", str(plugin), "agents")
    assert proc.returncode == 0, proc.stderr
    assert any(ln.startswith("plugin-min") for ln in proc.stdout.splitlines()), proc.stdout
    proc = intune("--plugin", str(plugin), "run", "--agent", "plugin-min", "--duration-s",
                  "10", "--every", "100")
    assert proc.returncode == 0, proc.stderr
    assert "plugin-min on dlrm-criteo" in proc.stdout


def test_entry_point_plugins_load_at_startup(tmp_path: Path) -> None:
    # A minimal installed distribution declaring an intune.plugins entry point.
    (tmp_path / "amdahl_ep.py").write_text(
        f"import runpy\nrunpy.run_path({str(ROOT / PLUGIN)!r})\n")
    dist = tmp_path / "amdahl_ep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: amdahl-ep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[intune.plugins]\namdahl = amdahl_ep\n")
    proc = intune("scenarios", "show", SCENARIO, extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    one_error_line(intune("--no-entry-points", "scenarios", "show", SCENARIO,
                          extra_path=tmp_path), "amdahl", "--plugin")
    (tmp_path / "amdahl_ep.py").write_text("raise ImportError('half installed')\n")
    one_error_line(intune("agents", extra_path=tmp_path), "entry point", "half installed",
                   "amdahl-ep", "--no-entry-points")


def test_compare_reruns_when_a_plugins_code_changes(tmp_path: Path) -> None:
    """A plugin's source is part of every run's fingerprint: edited code, fresh runs."""
    plugin = tmp_path / "pa.py"
    plugin.write_text((ROOT / PLUGIN).read_text())
    out = tmp_path / "grid"
    args = ("--plugin", str(plugin), "compare", "--scenarios", SCENARIO, "--agents", "even",
            "--seeds", "1", "--duration-s", "30", "--out", str(out), "--no-progress",
            "--no-plots")

    def throughput() -> float:
        proc = intune(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(out / "runs.csv", newline="") as fh:
            return float(next(csv.DictReader(fh))["final_throughput"])

    first = throughput()
    assert throughput() == first and "1 reused" in intune(*args).stdout  # unchanged: reused
    plugin.write_text(plugin.read_text() + "\n# an edit that changes nothing it computes\n")
    proc = intune(*args)
    assert proc.returncode == 0 and "0 reused" in proc.stdout, proc.stdout


def test_compare_reruns_when_a_module_the_plugin_imports_changes(tmp_path: Path) -> None:
    # A stranger's plugin took its capacity formula from a helper module next to it:
    # halving the rate there reused the old results (only the plugin's file was hashed).
    (tmp_path / "amdahl_helper.py").write_text("FACTOR = 1.0\n")
    plugin = tmp_path / "pb.py"
    plugin.write_text((ROOT / PLUGIN).read_text() + "\nimport os\nimport sys\n\n"
                      "sys.path.insert(0, os.path.dirname(__file__))\n"
                      "import amdahl_helper  # noqa: E402\n")
    out = tmp_path / "grid"
    args = ("--plugin", str(plugin), "compare", "--scenarios", SCENARIO, "--agents", "even",
            "--seeds", "1", "--duration-s", "30", "--out", str(out), "--no-progress",
            "--no-plots")
    assert intune(*args).returncode == 0
    assert "1 reused" in intune(*args).stdout
    (tmp_path / "amdahl_helper.py").write_text("FACTOR = 0.5\n")
    proc = intune(*args)
    assert proc.returncode == 0 and "0 reused" in proc.stdout, proc.stdout
    assert "plugin code" in proc.stdout + proc.stderr


def test_plugin_model_bug_and_builtin_names_are_one_line(tmp_path: Path) -> None:
    buggy = tmp_path / "buggy.py"
    buggy.write_text((ROOT / PLUGIN).read_text().replace(
        "def capacity(self, cpus", "def capacity(self, cpus: int) -> float:\n"
        "        return self.params['typo']\n\n    def _unused(self, cpus", 1))
    one_error_line(intune("--plugin", str(buggy), "scenarios", "show", SCENARIO),
                   "stage 'transform' (kind 'amdahl') failed at 1 CPUs", "KeyError")
    shadow = tmp_path / "shadow.py"
    shadow.write_text("from simulators import StageModel, register_stage_model\n\n\n"
                      "@register_stage_model\nclass Fake(StageModel):\n"
                      "    kind = 'linear'\n\n    def capacity(self, cpus):\n"
                      "        return self.rate_per_cpu\n")
    one_error_line(intune("--plugin", str(shadow), "agents"), "'linear' is built in")
    shadow.write_text("from agents.registry import register_agent\n"
                      "from agents.static import MinAgent\n\n\n"
                      "def fake(env, seed, model_path=None, **kw):\n    return MinAgent()\n\n\n"
                      "register_agent('oracle', fake)\n")
    one_error_line(intune("--plugin", str(shadow), "agents"), "agent 'oracle' is built in")


def test_run_counts_an_out_of_memory_crash_as_zero() -> None:
    # `intune run` averaged only the steps before the crash (0.735 for a job that died at
    # the first step); `intune compare` counts 0 from the crash on, and so does run now.
    proc = intune("run", "--agent", "autotune", "--scenario", "memory-tight", "--every",
                  "1000")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "last 20% 0.000 (out of memory: 0 from the crash on)" in last, last


def test_lambda_agent_in_a_parallel_compare_says_what_helps(tmp_path: Path) -> None:
    # "rerun the same command to retry them" can never help a factory the workers
    # cannot re-import; the closing line says what does
    plugin = tmp_path / "lam.py"
    plugin.write_text("from agents.registry import make_agent, register_agent\n\n"
                      "register_agent('lam', lambda env, seed, model_path=None, **kw: "
                      "make_agent('even', env, seed))\n")
    proc = intune("--plugin", str(plugin), "compare", "--scenarios", "dlrm-criteo",
                  "--agents", "lam", "--seeds", "2", "--jobs", "2", "--duration-s", "10",
                  "--out", str(tmp_path / "o"), "--no-progress", "--no-plots")
    assert proc.returncode == 1
    assert "make it a top-level function or use --jobs 1" in proc.stderr.splitlines()[-1]


def test_workers_get_plugin_files_by_absolute_path() -> None:
    # A Ray worker may run in another directory: a relative path typed in the parent
    # must reach it absolute (and a file given twice, as typed two ways, once).
    code = (f"from agents.plugins import load_plugins, loaded_plugins\n"
            f"load_plugins([{PLUGIN!r}, './{PLUGIN}', 'json'])\n"
            f"print(loaded_plugins())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr([str(ROOT / PLUGIN), "json"])
