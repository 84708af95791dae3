"""compare resumes honestly: stale or broken results rerun, one compare per folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import small_scenario

from agents.compare import CompareError, run_compare
from agents.compare.grid import locked, run_key

KW = {"jobs": 1, "progress": False, "plots": False}


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small_scenario()))
    return path


def test_changed_duration_reruns_and_says_so(tmp_path: Path, scenario_file: Path) -> None:
    out = tmp_path / "o"
    logs: list[str] = []
    first = run_compare(str(scenario_file), "even", 2, out, duration_s=20.0, **KW)
    assert len(first.ran) == 2
    again = run_compare(str(scenario_file), "even", 2, out, duration_s=20.0, **KW)
    assert again.ran == [] and len(again.skipped) == 2
    longer = run_compare(str(scenario_file), "even", 2, out, duration_s=40.0, log=logs.append,
                         **KW)
    assert len(longer.ran) == 2 and longer.skipped == []
    assert all("settings changed (duration_s)" in w for w in longer.rerun.values())
    assert any("rerun small__even__seed0: settings changed (duration_s)" in m for m in logs)
    assert all(int(r["steps"]) == 20 for r in longer.rows)  # 40 s / 2 s, not the old 10


def test_edited_scenario_file_reruns(tmp_path: Path, scenario_file: Path) -> None:
    out = tmp_path / "o"
    run_compare(str(scenario_file), "even", 1, out, duration_s=20.0, **KW)
    data = small_scenario()
    data["stages"][0]["rate_per_cpu"] = 25000
    scenario_file.write_text(yaml.safe_dump(data))
    res = run_compare(str(scenario_file), "even", 1, out, duration_s=20.0, **KW)
    assert res.ran == ["small__even__seed0"]
    assert "settings changed" in res.rerun["small__even__seed0"]


@pytest.mark.parametrize("content", ["truncated", "[]", "{}", "not json", "bad-field",
                                     "huge-int", "duplicate-key"])
def test_broken_run_file_reruns(tmp_path: Path, scenario_file: Path, content: str) -> None:
    out = tmp_path / "o"
    run_compare(str(scenario_file), "even,oracle", 2, out, duration_s=20.0, **KW)
    victim = out / "runs" / "small__even__seed1.json"
    text = victim.read_text()
    if content == "truncated":
        victim.write_text(text[: len(text) // 2])
    elif content == "bad-field":
        d = json.loads(text)
        d["final_fraction"] = "high"
        victim.write_text(json.dumps(d))
    elif content == "huge-int":  # Python refuses to parse it: a ValueError, not a crash
        victim.write_text(text.replace("{", '{"x": ' + "9" * 5000 + ", ", 1))
    elif content == "duplicate-key":  # "last wins" would let an edit hide a field
        victim.write_text(text.replace("{", '{"final_fraction": 0.5, ', 1))
    else:
        victim.write_text(content)
    res = run_compare(str(scenario_file), "even,oracle", 2, out, duration_s=20.0, **KW)
    assert res.ran == ["small__even__seed1"] and len(res.skipped) == 3
    assert len(res.rows) == 4  # never a row silently dropped
    json.loads(victim.read_text())  # rewritten whole


def _edit(d: dict, what: str) -> None:
    trace = d["trace"]
    if what == "no-stage-names":
        del trace["stage_names"]
    elif what == "no-scenario":
        del d["scenario"]
    elif what == "other-scenario":
        d["scenario"] = "other"
    elif what == "other-seed":
        d["seed"] = 0
    elif what == "oom-7":
        d["oom"] = 7
    elif what == "string-in-trace":
        trace["fraction"][0] = "x"
    elif what == "short-allocation":
        trace["allocation"] = trace["allocation"][:3]
    elif what == "empty-time":
        trace["time_s"] = []
    elif what == "interval-string":
        d["control_interval_s"] = "abc"
    elif what == "allocation-width":
        trace["allocation"][0] = [1, 2]
    elif what == "stage-renamed":
        trace["stage_names"][0] = "other"
    elif what.startswith("set "):  # "set FIELD VALUE" or "set trace.SERIES:STEP VALUE"
        _, key, value = what.split(" ")
        if key.startswith("trace."):
            series, step = key[len("trace."):].split(":")
            trace[series][int(step)] = json.loads(value)
        else:
            d[key] = json.loads(value)


#: Edits that kept the fingerprint, and what the rerun reason must name.
EDITS = {
    "no-stage-names": "stage_names", "no-scenario": "scenario", "other-scenario": "scenario",
    "other-seed": "seed", "oom-7": "oom", "string-in-trace": "fraction",
    "short-allocation": "allocation", "empty-time": "time_s",
    "interval-string": "control_interval_s", "allocation-width": "allocation",
    "stage-renamed": "stage_names",
    # the interval sizes the plots' arrays (steps = duration / interval): 0 divided by
    # zero, 1e-300 asked numpy for 1e301 entries (1e-6 took all memory: not tried here)
    "set control_interval_s 0": "control_interval_s",
    "set control_interval_s 1e-300": "control_interval_s",
    "set control_interval_s 1.0": "control_interval_s",  # finite, not the scenario's
    "set steps 10.0": "steps", "set steps 9": "steps",  # no OOM: all 10 steps ran
    "set invalid_actions 11": "invalid_actions",
    # impossible values a reused file put straight into the report
    "set final_fraction 5.0": "final_fraction", "set mean_fraction 99": "mean_fraction",
    "set mean_memory_fraction -3": "mean_memory_fraction",
    "set final_throughput 1e300": "final_throughput",
    "set final_throughput -5": "final_throughput",
    "set mean_throughput -1": "mean_throughput",
    "set final_throughput 50000": "final_throughput",  # possible, but not its trace's
    "set time_to_90_s -500": "time_to_90_s", "set wall_s -1": "wall_s",
    "set trace.time_s:0 -1": "time_s", "set trace.time_s:3 4.0": "time_s",
    "set trace.throughput:2 1e300": "throughput",
    "set trace.throughput:2 -1": "throughput",
    "set trace.oracle_throughput:2 1e300": "oracle_throughput",
    "set trace.fraction:2 5.0": "fraction",
    "set trace.memory_fraction:2 -1": "memory_fraction",
    "set trace.cpus_total:2 0": "cpus_total",
    "set trace.allocation:2 [1,1,99999]": "allocation",
}


@pytest.mark.parametrize("what", list(EDITS))
def test_edited_run_file_with_matching_fingerprint_reruns(tmp_path: Path,
                                                          scenario_file: Path,
                                                          what: str) -> None:
    # A stranger's edits that kept the fingerprint: reused, they crashed the report
    # (KeyError: 'stage_names', ZeroDivisionError), exhausted memory, or skewed it (an OOM
    # rate of 2.33, a seed dropped, an IQM of 2.998 from one final_fraction of 5).
    out = tmp_path / "o"
    run_compare(str(scenario_file), "even", 2, out, duration_s=20.0, plots=False,
                jobs=1, progress=False)
    victim = out / "runs" / "small__even__seed1.json"
    d = json.loads(victim.read_text())
    _edit(d, what)
    victim.write_text(json.dumps(d))
    res = run_compare(str(scenario_file), "even", 2, out, duration_s=20.0, jobs=1,
                      progress=False, plots=True)
    assert res.ran == ["small__even__seed1"]
    why = res.rerun["small__even__seed1"]  # with its reason, naming the field
    assert EDITS[what] in why, why
    assert all(0 <= float(r["final_fraction"]) <= 1.5 for r in res.rows)
    assert sorted(int(r["seed"]) for r in res.rows) == [0, 1]
    assert all(r["oom"] in (0, 1, "0", "1", False, True) for r in res.rows)


def test_fraction_far_above_one_is_a_valid_result(tmp_path: Path) -> None:
    # A reviewer's pipeline: a huge buffer drained after a bandwidth cap drops to 100/s
    # delivers 1000x the new oracle for a few steps; a [0, 10] bound on the fractions
    # rejected that file on every resume.
    data = small_scenario()
    data["stages"][0]["buffer"] = 2_000_000
    data["events"] = [{"at_s": 16, "stage": data["stages"][0]["name"], "bandwidth_cap": 100}]
    path = tmp_path / "drain.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "o"
    first = run_compare(str(path), "even", 1, out, duration_s=20.0, **KW)
    assert first.rows[0]["final_fraction"] > 10
    again = run_compare(str(path), "even", 1, out, duration_s=20.0, **KW)
    assert again.ran == [] and len(again.skipped) == 1


def test_grid_bounds_refused_before_any_run(tmp_path: Path, scenario_file: Path) -> None:
    # 1e6 s at 2 s steps is 500,000 steps: its result file outgrew what a resume reads
    # back and was rerun every time; a huge --seeds hung building the grid.
    out = tmp_path / "o"
    with pytest.raises(CompareError, match="500,000 steps; at most 100,000"):
        run_compare(str(scenario_file), "even", 1, out, duration_s=1e6, **KW)
    with pytest.raises(CompareError, match="--seeds: at most 10,000"):
        run_compare(str(scenario_file), "even", 10**8, out, duration_s=20.0, **KW)
    assert not out.exists()


def test_second_compare_on_same_folder_refused(tmp_path: Path, scenario_file: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    with locked(out), pytest.raises(CompareError, match=r"another intune compare .* is running"):
        run_compare(str(scenario_file), "even", 1, out, duration_s=20.0, **KW)
    # released afterwards
    assert run_compare(str(scenario_file), "even", 1, out, duration_s=20.0, **KW).ran


def test_out_is_a_file(tmp_path: Path, scenario_file: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(CompareError, match=r"f\.txt: is a file; expected a folder"):
        run_compare(str(scenario_file), "even", 1, f, duration_s=20.0, **KW)


def test_traversal_name_never_leaves_out(tmp_path: Path) -> None:
    data = small_scenario()
    data["name"] = "../../../escape"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "deep" / "o"
    try:
        res = run_compare(str(path), "even", 1, out, duration_s=20.0, **KW)
    except Exception as err:  # the schema may refuse the name outright: also fine
        assert "name" in str(err)
        return
    key = run_key("../../../escape", "even", 0)
    assert "/" not in key and res.ran == [key]
    assert (out / "runs" / f"{key}.json").exists()
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(out in p.parents or p == path for p in written), written


def test_traversal_name_in_models_path_refused(tmp_path: Path) -> None:
    from agents.compare.grid import _model_for

    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "ppo.zip").write_bytes(b"outside")
    with pytest.raises(CompareError, match="no model"):
        _model_for("ppo", "..", 0, tmp_path / "o", models, "f" * 64)
    path, train = _model_for("ppo", "../x", 0, tmp_path / "o", None, "f" * 64)
    assert train and (tmp_path / "o").resolve() in Path(path).parents


def test_summary_defines_every_column(tmp_path: Path, scenario_file: Path) -> None:
    out = tmp_path / "o"
    res = run_compare(str(scenario_file), "even", 1, out, duration_s=20.0, **KW)
    md = (out / "summary.md").read_text()
    for col in ("final fraction", "95% CI", "OOM rate", "t90", "memory", "x autotune"):
        assert f"**{col}** =" in md, col
    assert res.outputs == [out / "runs.csv", out / "summary.md", out / "summary.json"]
    assert "summary.json" in res.summary_line() and "runs.csv" in res.summary_line()
