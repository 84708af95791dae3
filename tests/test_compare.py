"""`intune compare`: the grid's files, resume, metrics, statistics, the Ray executor."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import small_scenario

from agents import registry
from agents.base import Agent, Allocation
from agents.compare import (
    RUN_COLUMNS,
    bootstrap_ci,
    episode_metrics,
    iqm,
    run_compare,
    summarise,
)


class HoldMin(Agent):
    """Test-only agent: one CPU per stage, held (a known, poor allocation)."""

    name = "test-hold-min"

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        return Allocation([1] * len(info["allocation"]))


def hold_min_factory(env: Any, seed: int | None, model_path: Any = None) -> Agent:
    return HoldMin()


registry.register_agent("test-hold-min", hold_min_factory)


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small_scenario()))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_grid_writes_files_and_resumes(tmp_path: Path, scenario_file: Path) -> None:
    out = tmp_path / "cmp"
    agents = "even,oracle,test-hold-min"
    res = run_compare(f"{scenario_file},machine-resize", agents, 2, out, duration_s=40.0,
                      jobs=2, progress=False)
    assert res.total == 12 and len(res.ran) == 12 and not res.failed, res.failed
    rows = _csv(out / "runs.csv")
    assert len(rows) == 12
    assert list(rows[0]) == list(RUN_COLUMNS)
    assert {(r["scenario"], r["agent"], r["seed"]) for r in rows} == {
        (s, a, str(k)) for s in ("small", "machine-resize") for a in agents.split(",")
        for k in (0, 1)}
    by = {(r["scenario"], r["agent"], r["seed"]): r for r in rows}
    # the oracle reaches the oracle; one CPU per stage cannot on a 32-CPU machine
    assert float(by[("machine-resize", "oracle", "0")]["final_fraction"]) > 0.95
    assert float(by[("machine-resize", "test-hold-min", "0")]["final_fraction"]) < 0.5
    assert by[("machine-resize", "test-hold-min", "0")]["time_to_90_s"] == ""
    assert all(r["oom"] in ("0", "1") and float(r["wall_s"]) >= 0 for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 6
    for s in summary["rows"]:
        lo, hi = s["final_fraction_ci95"]
        assert lo <= s["final_fraction_iqm"] + 1e-12 and s["final_fraction_iqm"] <= hi + 1e-12
        assert set(s) >= {"oom_rate", "median_time_to_90_s", "throughput_ratio_to_autotune"}
    md = (out / "summary.md").read_text()
    assert "## machine-resize" in md and "| oracle |" in md
    for name in ("learning_small.png", "learning_machine-resize.png",
                 "allocation_machine-resize.png", "summary.png"):
        assert (out / "plots" / name).stat().st_size > 1000

    # Resume: nothing is run again and finished results are untouched.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    again = run_compare(f"{scenario_file},machine-resize", agents, 2, out, duration_s=40.0,
                        jobs=2, progress=False, plots=False)
    assert again.ran == [] and len(again.skipped) == 12
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps

    # An interrupted run leaves at most a temporary file, which does not count as done.
    victim = out / "runs" / "small__oracle__seed1.json"
    victim.unlink()
    (out / "runs" / ".small__oracle__seed1.json.abc.tmp").write_text('{"scen')
    third = run_compare(f"{scenario_file},machine-resize", agents, 2, out, duration_s=40.0,
                        jobs=1, progress=False, plots=False)
    assert third.ran == ["small__oracle__seed1"]
    assert len(_csv(out / "runs.csv")) == 12


def test_same_seed_same_result(tmp_path: Path) -> None:
    kw = {"duration_s": 30.0, "jobs": 1, "progress": False, "plots": False}
    run_compare("transform-drift", "random,even", [3], tmp_path / "a", **kw)
    run_compare("transform-drift", "random,even", [3], tmp_path / "b", **kw)
    strip = ("wall_s",)
    ra = [{k: v for k, v in r.items() if k not in strip} for r in _csv(tmp_path / "a/runs.csv")]
    rb = [{k: v for k, v in r.items() if k not in strip} for r in _csv(tmp_path / "b/runs.csv")]
    assert ra == rb


def test_episode_metrics() -> None:
    t = [2.0 * (i + 2) for i in range(10)]  # reset measured one 2 s interval
    f = [0.5, 0.95, 0.8, 0.92, 0.93, 0.95, 0.97, 0.99, 1.0, 0.98]
    m = episode_metrics(t, f, [0.4] * 10, [x * 100 for x in f], oom=False, n_steps=10, dt=2.0)
    assert m["final_fraction"] == pytest.approx((1.0 + 0.98) / 2)
    assert m["mean_fraction"] == pytest.approx(np.mean(f))
    assert m["time_to_90_s"] == pytest.approx(t[2])  # last dip below 0.9 ends at t[2]
    assert m["oom"] == 0 and m["mean_memory_fraction"] == pytest.approx(0.4)
    # always above: reached at the start of the first measured interval
    assert episode_metrics(t, [0.95] * 10, [0.1] * 10, [1] * 10, False, 10, 2.0)[
        "time_to_90_s"] == pytest.approx(2.0)
    # ends below: never
    assert episode_metrics(t, [0.95] * 9 + [0.5], [0.1] * 10, [1] * 10, False, 10, 2.0)[
        "time_to_90_s"] is None
    # a crash after 4 of 10 steps: the rest counts as 0
    crash = episode_metrics(t[:4], [1.0] * 4, [1.2] * 4, [100.0] * 4, True, 10, 2.0)
    assert crash["oom"] == 1 and crash["final_fraction"] == 0.0
    assert crash["mean_fraction"] == pytest.approx(0.4) and crash["time_to_90_s"] is None


def test_iqm_and_bootstrap() -> None:
    assert iqm([0.0, 1.0, 2.0, 3.0, 100.0]) == pytest.approx(2.0)
    assert iqm([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]) == pytest.approx(3.5)
    x = [0.6, 0.7, 0.72, 0.8, 0.95, 0.4]
    lo, hi = bootstrap_ci(x)
    assert lo < iqm(x) < hi and (lo, hi) == bootstrap_ci(x)
    assert bootstrap_ci([0.5]) == (0.5, 0.5)


def test_summary_ratio_to_autotune_and_t90() -> None:
    rows = [
        {"scenario": "s", "agent": "autotune", "seed": k, "final_fraction": 0.5,
         "mean_fraction": 0.5, "oom": 0, "time_to_90_s": None, "mean_memory_fraction": 0.5,
         "final_throughput": 100.0} for k in range(3)
    ] + [
        {"scenario": "s", "agent": "x", "seed": k, "final_fraction": 0.9, "mean_fraction": 0.8,
         "oom": int(k == 2), "time_to_90_s": [10.0, 30.0, None][k],
         "mean_memory_fraction": 0.3, "final_throughput": 150.0} for k in range(3)
    ]
    s = {r["agent"]: r for r in summarise(rows, ["s"], ["autotune", "x"])}
    assert s["x"]["throughput_ratio_to_autotune"] == pytest.approx(1.5)
    assert s["autotune"]["throughput_ratio_to_autotune"] == pytest.approx(1.0)
    assert s["x"]["median_time_to_90_s"] == pytest.approx(30.0)  # "never" counts as +inf
    assert s["autotune"]["median_time_to_90_s"] is None
    assert s["x"]["oom_rate"] == pytest.approx(1 / 3)
    assert not math.isnan(s["x"]["final_fraction_ci95"][0])


def test_ray_executor(tmp_path: Path, scenario_file: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'intune[ray]')")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        res = run_compare(str(scenario_file), "even,oracle", 1, tmp_path / "ray",
                          duration_s=20.0, executor="ray", progress=False, plots=False)
    finally:
        ray.shutdown()
    assert len(res.ran) == 2 and not res.failed, res.failed
    rows = _csv(tmp_path / "ray" / "runs.csv")
    assert [r["agent"] for r in rows] == ["even", "oracle"]


def test_sb3_model_trained_once_and_cached(tmp_path: Path) -> None:
    hp = tmp_path / "tiny.yaml"
    hp.write_text(yaml.safe_dump({"a2c": {
        "n_timesteps": 64, "compare_n_timesteps": 64, "policy": "MlpPolicy", "n_envs": 2,
        "normalize": {"norm_obs": True, "norm_reward": True}, "n_steps": 8,
        "n_evaluations": 1, "n_eval_episodes": 1}}))
    out = tmp_path / "grid"
    kw = {"duration_s": 20.0, "jobs": 1, "progress": False, "plots": False,
          "hyperparams_path": hp}
    first = run_compare("machine-resize", "a2c", 1, out, **kw)
    assert not first.failed, first.failed
    models = list((out / "models" / "machine-resize" / "a2c").glob("seed0-*.zip"))
    assert len(models) == 1 and float(first.rows[0]["train_wall_s"]) > 0
    model = models[0]
    stamp = model.stat().st_mtime_ns
    (out / "runs" / "machine-resize__a2c__seed0.json").unlink()
    second = run_compare("machine-resize", "a2c", 1, out, **kw)
    assert second.ran == ["machine-resize__a2c__seed0"]
    assert model.stat().st_mtime_ns == stamp and second.rows[0]["train_wall_s"] == 0.0
    assert second.rows[0]["final_fraction"] == first.rows[0]["final_fraction"]
    # a different budget is a different model: trained anew, the old one is not reused
    hp.write_text(hp.read_text().replace("compare_n_timesteps: 64", "compare_n_timesteps: 80"))
    third = run_compare("machine-resize", "a2c", 1, out, **kw)
    assert third.ran == ["machine-resize__a2c__seed0"] and "settings changed" in \
        third.rerun["machine-resize__a2c__seed0"]
    assert float(third.rows[0]["train_wall_s"]) > 0
    assert len(list(model.parent.glob("seed0-*.zip"))) == 2


def test_fingerprints_carry_the_package_source(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Agent or simulator code edited without a version bump: no result is reused."""
    from agents.compare import grid

    def plan() -> list[str]:
        scenarios = grid.resolve_scenarios(["dlrm-criteo"])
        specs = grid.plan_grid(scenarios, ["even", "qlearning-scratch"], [0], tmp_path, 60.0)
        return [s.fingerprint for s in specs]

    before = plan()
    assert plan() == before  # same code, same fingerprints (resumes reuse runs)
    monkeypatch.setattr(grid, "source_digest", lambda *a, **k: "0" * 64)
    after = plan()
    assert all(a != b for a, b in zip(after, before, strict=True))


def test_source_digest_follows_code_not_byte_caches(tmp_path: Path) -> None:
    from agents.compare.grid import source_digest

    pkg = tmp_path / "agents"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "scen.yaml").write_text("name: s\n")

    def digest() -> str:
        source_digest.cache_clear()
        return source_digest(("agents",), tmp_path)

    first = digest()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0" * 8)
    (pkg / "notes.txt").write_text("not code")
    assert digest() == first
    (pkg / "a.py").write_text("x = 2\n")
    assert digest() != first
    (pkg / "a.py").write_text("x = 1\n")
    assert digest() == first
    (pkg / "scen.yaml").write_text("name: t\n")
    assert digest() != first
