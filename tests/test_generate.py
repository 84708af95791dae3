"""The generated benchmark suite: deterministic, valid, default start fits, splits disjoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
import yaml

import intune_env  # noqa: F401  (registers InTune-v0)
from simulators import Conditions, compile_conditions, load_scenario, oracle
from simulators.generate import (
    START_MARGIN,
    SUITES,
    expand_suite,
    generate_scenario,
    generate_scenarios,
    suite_members,
    suite_scenario,
    write_scenarios,
)
from simulators.scenario import ScenarioError, scenario_from_dict


def _phases(sc):
    cond = Conditions.initial(sc)
    out = [cond]
    for ev in sorted(sc.events, key=lambda e: e.at_s):
        cond = cond.apply(ev)
        out.append(cond)
    return out


def test_deterministic_per_seed() -> None:
    assert generate_scenario(7) == generate_scenario(7)
    assert generate_scenarios(5, 3) == generate_scenarios(5, 3)
    assert generate_scenario(7) != generate_scenario(8)
    assert generate_scenarios(2, 3)[1] == generate_scenario(3, 1)


@pytest.mark.parametrize("split", sorted(SUITES))
def test_every_member_validates_and_one_cpu_per_stage_fits(split: str) -> None:
    seen_tight = seen_events = 0
    stage_counts, cpu_counts = set(), []
    for name in suite_members(split):
        sc = load_scenario(name)
        assert 2 <= len(sc.stages) <= 8 and 4 <= sc.machine.cpus <= 128
        assert 0 <= sc.noise_cv <= 0.2
        stage_counts.add(len(sc.stages))
        cpu_counts.append(sc.machine.cpus)
        seen_tight += "memory-tight" in sc.description
        seen_events += bool(sc.events)
        for cond in _phases(sc):
            comp = compile_conditions(cond)
            # worst case (every buffer full) of one CPU per stage, from the stage tables
            worst = cond.fixed_memory_bytes + sum(
                comp.worst_memory[i][1] for i in range(len(sc.stages)))
            assert worst <= (1 - START_MARGIN) * cond.memory_capacity_bytes + 1, name
            assert oracle(cond).feasible, name
    assert stage_counts == set(range(2, 9))
    assert min(cpu_counts) < 16 and max(cpu_counts) > 64
    assert seen_tight > 0.1 * len(cpu_counts) and seen_events > 0.3 * len(cpu_counts)


def test_default_start_fits_in_the_env() -> None:
    for name in suite_members("test")[:40]:
        env = gym.make("InTune-v0", scenario=name, start_allocation="min")
        _, info = env.reset(seed=0)
        _, _, terminated, _, info = env.step(0)
        assert not terminated and not info["oom"], name


def test_splits_are_disjoint() -> None:
    assert SUITES["train"].seed != SUITES["test"].seed
    def body(d):
        return json.dumps({k: v for k, v in d.items() if k not in ("name", "description")},
                          sort_keys=True)
    train = {body(suite_scenario(m)) for m in suite_members("train")}
    test = {body(suite_scenario(m)) for m in suite_members("test")}
    assert len(train) == SUITES["train"].count and len(test) == SUITES["test"].count
    assert not train & test


def test_write_scenarios_validate(tmp_path) -> None:
    paths = write_scenarios(4, 11, tmp_path / "out")
    assert [p.name for p in paths] == [f"gen-11-{i}.yaml" for i in range(4)]
    for p, d in zip(paths, generate_scenarios(4, 11), strict=True):
        data = yaml.safe_load(p.read_text())
        assert data == d
        assert scenario_from_dict(data, source=str(p)).name == d["name"]
        assert load_scenario(p).name == d["name"]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_expand_suite_and_make() -> None:
    assert expand_suite("dlrm-criteo") is None
    members = expand_suite("suite:test")
    assert members is not None and len(members) == SUITES["test"].count
    assert members[17] == "suite:test:0017"
    assert expand_suite("suite:test:0017") == ["suite:test:0017"]
    with pytest.raises(ValueError, match="unknown suite"):
        expand_suite("suite:nope")
    env = gym.make("InTune-v0", scenario="suite:test:0017")
    assert env.unwrapped.scenario.name == f"gen-{SUITES['test'].seed}-17"
    with pytest.raises(ScenarioError, match="out of range"):
        load_scenario("suite:test:9999")
    with pytest.raises(ScenarioError, match="unknown suite"):
        load_scenario("suite:bogus:1")
    with pytest.raises(ScenarioError, match="a whole suite, not one member"):
        load_scenario("suite:test")


@pytest.mark.parametrize(("index", "why"), [
    ("-1", "out of range"), ("200", "out of range"), ("9" * 5000, "out of range"),
    ("abc", "is not an integer"), ("1.5", "is not an integer"), ("", "is not an integer")])
def test_bad_suite_index_says_what_is_wrong_and_the_range(index: str, why: str) -> None:
    for call in (expand_suite, suite_scenario, load_scenario):
        with pytest.raises(ValueError) as err:
            call(f"suite:test:{index}")
        msg = str(err.value)
        assert why in msg and "members 0..199" in msg and "unknown suite" not in msg, msg
        assert len(msg) < 300, msg


def test_generalization_benchmark_runs(tmp_path) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import generalization

    out = tmp_path / "res"
    assert generalization.main(["--split", "train", "--count", "2", "--seeds", "1",
                                "--workers", "1", "--agents", "qlearning,even-fit",
                                "--out", str(out)]) == 0
    data = json.loads((out / "generalization-train.json").read_text())
    assert len(data["episodes"]) == 4
    assert all(0 <= r["fraction"] <= 1.3 for r in data["episodes"])
    assert (out / "generalization-train.png").stat().st_size > 1000
    assert "| qlearning | 2 |" in (out / "generalization-train.md").read_text()


def test_a_folder_in_place_of_a_member_writes_none(tmp_path: Path) -> None:
    """All destinations are checked before the first write: no partial set is left."""
    (tmp_path / "gen-0-1.yaml").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        write_scenarios(3, 0, tmp_path)
    assert err.value.filename == str(tmp_path / "gen-0-1.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-0-1.yaml"]


def test_recovery_metrics_tell_coming_back_from_dipping_later() -> None:
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import generalization as g

    t = np.arange(2.0, 602.0, 2.0)  # 300 steps of 2 s
    ratio = np.ones_like(t)
    ratio[(t > 100) & (t <= 160)] = 0.5  # an event at 100 s: back at 162 s
    ratio[(t > 400) & (t <= 410)] = 0.8  # a dip 300 s later, in the same phase
    assert g._t90_back_after_events(t, ratio, [100.0], False) == 62.0
    assert g._t90_after_events(t, ratio, [100.0], False) == 310.0  # the dip's end
    # a crossing that does not hold 30 s is not back
    ratio[(t > 170) & (t <= 180)] = 0.5
    ratio[t == 166] = 0.5
    assert g._t90_back_after_events(t, ratio, [100.0], False) == 82.0
    # an event 10 s later does not cut the first one's recovery; a crash is never back
    assert g._t90_back_after_events(t, ratio, [100.0, 110.0], False) == 82.0
    assert g._t90_after_events(t, ratio, [100.0, 110.0], False) == math.inf
    assert g._t90_back_after_events(t, np.ones_like(t), [100.0], True) == math.inf
    # the end of the episode ends the hold; a dip within the hold is not back
    assert g._t90_back_after_events(t, ratio, [100.0, 590.0], False) == 82.0
    ratio[t > 596] = 0.5
    assert g._t90_back_after_events(t, ratio, [100.0, 580.0], False) == math.inf
