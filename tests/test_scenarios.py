"""Scenario files: built-ins load, every kind of fault gets one clear line, CLI exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import small_scenario

from agents.cli import main
from simulators import ScenarioError, builtin_scenarios, load_scenario

EXPECTED_BUILTINS = {"dlrm-criteo", "transform-heavy", "memory-tight", "io-bound-remote",
                     "machine-resize", "transform-drift", "large-96"}


def test_builtins_present_and_valid() -> None:
    assert set(builtin_scenarios()) >= EXPECTED_BUILTINS
    for name in builtin_scenarios():
        sc = load_scenario(name)
        assert sc.name == name
        text = Path(__file__).parents[1].joinpath("simulators", "scenarios",
                                                   f"{name}.yaml").read_text()
        assert "Source" in text  # each built-in cites where its numbers come from


def _write(tmp_path: Path, data: object, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _mutate(change: str) -> dict:
    d = small_scenario()
    if change == "misspelt":
        d["stages"][0]["rate_per_cpus"] = d["stages"][0].pop("rate_per_cpu")
    elif change == "missing":
        del d["machine"]["gpu_rate"]
    elif change == "wrong_type":
        d["machine"]["cpus"] = "lots"
    elif change == "negative":
        d["stages"][2]["buffer"] = -5
    elif change == "too_few_stages":
        d["stages"] = d["stages"][:1]
    elif change == "too_many_stages":
        d["stages"] = [dict(d["stages"][0], name=f"s{i}") for i in range(9)]
    elif change == "duplicate_stage":
        d["stages"][1]["name"] = "read"
    elif change == "event_unknown_stage":
        d["events"] = [{"at_s": 5, "stage": "decode", "rate_per_cpu_factor": 0.5}]
    elif change == "event_empty":
        d["events"] = [{"at_s": 5}]
    elif change == "unknown_kind":
        d["stages"][0]["kind"] = "quantum"
    elif change == "base_above_memory":
        d["machine"]["base_memory_gib"] = 9
    elif change == "bool_as_number":
        d["stages"][0]["max_cpus"] = True  # YAML `true`: not read as 1
    elif change == "quoted_number":
        d["stages"][1]["rate_per_cpu"] = "90000"
    elif change == "event_memory_too_small":
        d["events"] = [{"at_s": 5, "memory_gib": 1.2}]  # one CPU per stage needs ~1.6 GiB
    elif change == "field_of_another_section":
        d["events"] = [{"at_s": 5, "gpu_rate": 5}]
    elif change == "stage_too_slow":
        d["stages"][1]["rate_per_cpu"] = 1e-300
    elif change == "start_does_not_fit":
        d["machine"]["memory_gib"] = 3.0
        d["start_allocation"] = [4, 1, 6]  # ~4.4 GiB at worst
    return d


@pytest.mark.parametrize(("change", "field", "expected"), [
    ("misspelt", "stages.0.rate_per_cpus", "did you mean 'rate_per_cpu'"),
    ("missing", "machine.gpu_rate", "required field is missing"),
    ("wrong_type", "machine.cpus", "valid integer"),
    ("negative", "stages.2.buffer", "greater than or equal to 1"),
    ("too_few_stages", "stages", "at least 2"),
    ("too_many_stages", "stages", "at most 8"),
    ("duplicate_stage", "stages", "unique"),
    ("event_unknown_stage", "events.0.stage", "unknown stage 'decode'"),
    ("event_empty", "events.0", "must change something"),
    ("unknown_kind", "stages.0.kind", "unknown stage kind 'quantum'"),
    ("base_above_memory", "machine", "base_memory_gib"),
    ("bool_as_number", "stages.0.max_cpus", "expected a valid integer, not a boolean"),
    ("quoted_number", "stages.1.rate_per_cpu", "expected a valid number, not a string"),
    ("event_memory_too_small", "events.0", "after this event every allocation runs out"),
    ("start_does_not_fit", "start_allocation", "needs up to"),
    ("field_of_another_section", "events.0.gpu_rate", "belongs in machine"),
    ("stage_too_slow", "stages.1", "samples per control interval even with max_cpus"),
])
def test_each_fault_names_file_field_and_expectation(tmp_path: Path, change: str, field: str,
                                                     expected: str) -> None:
    path = _write(tmp_path, _mutate(change))
    with pytest.raises(ScenarioError) as err:
        load_scenario(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert field in msg and expected in msg, msg
    # the same fault from a dict names <dict>
    with pytest.raises(ScenarioError, match=r"^<dict>: "):
        load_scenario(_mutate(change))


def test_unreadable_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"line \d+: invalid YAML"):
        load_scenario(str(_write(tmp_path, "name: x\nmachine: {cpus: [4\n")))
    with pytest.raises(ScenarioError, match="expected a mapping"):
        load_scenario(str(_write(tmp_path, "- 1\n- 2\n")))
    with pytest.raises(ScenarioError, match="no such scenario file or built-in name"):
        load_scenario("no-such-scenario")


def test_roundtrip_to_dict(small: dict) -> None:
    sc = load_scenario(small)
    assert load_scenario(sc.to_dict()) == sc


def test_cli_lists_and_shows() -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["scenarios", "list"])
    assert out.exit_code == 0
    for name in EXPECTED_BUILTINS:
        assert name in out.output
    out = runner.invoke(main, ["scenarios", "show", "machine-resize"])
    assert out.exit_code == 0
    assert "oracle: 348,003 samples/s with 33 threads on 32 CPUs" in out.output
    assert "event at_s=600.0, cpus=16" in out.output


def test_cli_bad_file_one_line_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, _mutate("misspelt"))
    proc = subprocess.run([sys.executable, "-m", "agents.cli", "scenarios", "show",
                           str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "stages.0.rate_per_cpus" in lines[0] and "Traceback" not in proc.stderr


def test_show_lists_events_in_time_order(tmp_path: Path) -> None:
    """The per-event oracle follows the simulator's order (by time), not the file's."""
    d = small_scenario()
    d["events"] = [{"at_s": 900, "memory_gib": 7.0}, {"at_s": 300, "cpus": 4}]
    res = CliRunner().invoke(main, ["scenarios", "show", str(_write(tmp_path, d))])
    assert res.exit_code == 0, res.output
    events = [ln for ln in res.output.splitlines() if ln.startswith("event ")]
    assert "at_s=300" in events[0] and "cpus=4" in events[0]
    assert "at_s=900" in events[1] and "memory_gib=7.0" in events[1]
