"""A researcher's own stage model plugs in without touching the env."""

from __future__ import annotations

import runpy
from pathlib import Path

import gymnasium as gym
import pytest

import intune_env  # noqa: F401
from simulators import Conditions, ScenarioError, compile_conditions, load_scenario

EXAMPLE = Path(__file__).parents[1] / "examples" / "custom_stage_model.py"


def test_example_model_registers_and_drives_the_env() -> None:
    mod = runpy.run_path(str(EXAMPLE))
    scen = load_scenario(mod["SCENARIO"])
    comp = compile_conditions(Conditions.initial(scen))
    for k in (1, 2, 8, 16):
        assert comp.capacity[2][k] == pytest.approx(30000 / (0.1 + 0.9 / k))
    env = gym.make("InTune-v0", scenario=mod["SCENARIO"], noise_cv=0.0)
    _, info = env.reset(seed=0, options={"allocation": [3, 1, 12]})
    _, _, _, _, info = env.step(0)
    expected = min(3 * 50000, 900000, 30000 / (0.1 + 0.9 / 12), 300000)
    assert info["throughput"] == pytest.approx(expected, rel=1e-4)


def test_custom_model_params_are_validated() -> None:
    mod = runpy.run_path(str(EXAMPLE))
    bad = dict(mod["SCENARIO"])
    bad["stages"] = [dict(s) for s in bad["stages"]]
    bad["stages"][2]["params"] = {"serial": 0.1}
    with pytest.raises(ScenarioError, match=r"stages\.2\.params: kind 'amdahl' needs params"):
        load_scenario(bad)


def test_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "oracle with an Amdahl transform" in out and "transform" in out


def test_contention_on_a_kind_that_ignores_it_is_refused() -> None:
    # the Amdahl model never reads spec.contention: run silently, the stage would scale
    # as if the contention were not there
    mod = runpy.run_path(str(EXAMPLE))
    bad = dict(mod["SCENARIO"])
    bad["stages"] = [dict(s) for s in bad["stages"]]
    bad["stages"][2]["contention"] = 0.05
    with pytest.raises(ScenarioError, match=r"stages\.2\.contention: kind 'amdahl' does not "
                                            r"use contention"):
        load_scenario(bad)
    bad["stages"][0]["contention"] = 0.05  # the built-in linear kind reads it
    del bad["stages"][2]["contention"]
    load_scenario(bad)
