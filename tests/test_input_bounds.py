"""Scenario input boundaries (issue 10): every bad file or value is one ScenarioError.

Each test is a reproduction from the issue: FIFOs and devices, non-UTF-8 files, deep
nesting, huge integers, duplicate keys, alias bombs, numbers the simulator cannot
represent, names that would leave their folder, and several errors at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import small_scenario

from simulators import ScenarioError, load_scenario
from simulators.scenario import MAX_ERRORS_SHOWN, MAX_YAML_DEPTH


def _one_line(path: Path | str, match: str) -> str:
    with pytest.raises(ScenarioError) as err:
        load_scenario(str(path))
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert match in msg, msg
    return msg


def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "s.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- reads ----------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    _one_line(fifo, "must be a regular file")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_symlink_to_device_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    _one_line(link, "must be a regular file")


def test_oversized_file_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "# " + "x" * (1 << 20) + "\n")
    _one_line(path, "expected at most 1,048,576")


@pytest.mark.parametrize("data", [
    bytes(range(256)) * 4,  # binary
    "name: caf\u00e9\n".encode("latin-1"),
    yaml.safe_dump(small_scenario()).encode("utf-16"),
])
def test_non_utf8_one_line(tmp_path: Path, data: bytes) -> None:
    _one_line(_yaml(tmp_path, data), "not UTF-8 text")


@pytest.mark.parametrize("text", [
    "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "a: " + "{b: " * 5000 + "1" + "}" * 5000 + "\n",
    "".join(" " * i + "k:\n" for i in range(1200)) + " " * 1200 + "v\n",
])
def test_deep_nesting_one_line(tmp_path: Path, text: str) -> None:
    _one_line(_yaml(tmp_path, text), f"nested more than {MAX_YAML_DEPTH} levels deep")


def test_huge_integer_one_line(tmp_path: Path) -> None:
    d = small_scenario()
    text = yaml.safe_dump(d).replace("cpus: 6", "cpus: " + "9" * 5000)
    _one_line(_yaml(tmp_path, text), "integer of 5,000 characters")
    sexagesimal = yaml.safe_dump(d).replace("cpus: 6", "cpus: " + ":".join(["59"] * 3000))
    _one_line(_yaml(tmp_path, sexagesimal), "integer of")


def test_duplicate_key_names_key_and_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(small_scenario(), sort_keys=False) + "name: other\n"
    msg = _one_line(_yaml(tmp_path, text), "duplicate key 'name' (first on line 1)")
    n_lines = text.count("\n")
    assert msg.endswith(f": line {n_lines}: invalid YAML: duplicate key 'name' (first on line 1)")
    nested = "machine: {cpus: 4, cpus: 8}\n"
    _one_line(_yaml(tmp_path, nested), "duplicate key 'cpus'")


def test_merge_keys_still_allowed(tmp_path: Path) -> None:
    d = small_scenario()
    text = yaml.safe_dump(d, sort_keys=False).replace(
        "machine:\n", "defaults: &m\n  cpus: 6\nmachine:\n  <<: *m\n", 1)
    text = text.replace("  cpus: 6\n  memory_gib", "  memory_gib", 1)
    # 'defaults' is not a field: the merge itself parsed, the schema speaks
    _one_line(_yaml(tmp_path, text), "defaults: unknown field")


def test_alias_bomb_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    _one_line(_yaml(tmp_path, "\n".join(lines) + "\n"), "expands to over")


def test_billion_laughs_names_the_file_once_fast_and_small(tmp_path: Path) -> None:
    import time
    import tracemalloc

    # 10**9 leaves once expanded; the file is a few hundred bytes
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = _yaml(tmp_path, "\n".join(lines) + "\n")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = _one_line(path, "expands to over")
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg.count(str(path)) == 1 and msg.startswith(f"{path}: YAML expands"), msg
    assert "invalid YAML value" not in msg, msg
    assert elapsed < 5 and peak < 20 << 20, (elapsed, peak)


def test_yaml_is_data_not_code(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    _one_line(path, "invalid YAML")


def test_odd_paths_one_line(tmp_path: Path) -> None:
    _one_line("no\x00such", "no such scenario file")
    _one_line("x" * 5000 + ".yaml", "no such scenario file")
    _one_line(tmp_path, "must be a regular file")  # a folder


# --- numbers --------------------------------------------------------------------------
def _stage0(**kw: Any) -> dict[str, Any]:
    d = small_scenario()
    d["stages"][0].update(kw)
    return d


NUMERIC_CASES = [
    (_stage0(rate_per_cpu=float("inf")), "stages.0.rate_per_cpu", "finite"),
    (_stage0(rate_per_cpu=1e308), "stages.0.rate_per_cpu", "less than or equal"),
    (_stage0(rate_per_cpu=float("nan")), "stages.0.rate_per_cpu", "finite"),
    (_stage0(worker_memory_mib=1e300), "stages.0.worker_memory_mib", "less than or equal"),
    (_stage0(buffer=2 * 10**18), "stages.0.buffer", "less than or equal"),
    (_stage0(buffer_per_cpu=10**17), "stages.0.buffer_per_cpu", "less than or equal"),
    (_stage0(element_kib=1e300), "stages.0.element_kib", "less than or equal"),
    (_stage0(state_mib=float("inf")), "stages.0.state_mib", "finite"),
    (_stage0(bandwidth_cap=float("inf")), "stages.0.bandwidth_cap", "finite"),
    (_stage0(params={"x": float("nan")}), "stages.0.params", "finite"),
    (small_scenario(memory_gib=1e-300, base_memory_gib=0), "machine.memory_gib",
     "greater than or equal"),
    (small_scenario(gpu_rate=float("inf")), "machine.gpu_rate", "finite"),
    (small_scenario(base_memory_gib=1e300), "machine.base_memory_gib", "less than or equal"),
    ({**small_scenario(), "events": [{"at_s": 1, "memory_gib": 1e-12}]}, "events.0.memory_gib",
     "greater than or equal"),
    ({**small_scenario(), "events": [{"at_s": 1, "cotenant_memory_gib": 1e300}]},
     "events.0.cotenant_memory_gib", "less than or equal"),
    ({**small_scenario(), "events": [{"at_s": float("inf"), "cpus": 2}]}, "events.0.at_s",
     "finite"),
    ({**small_scenario(), "events": [{"at_s": 1, "stage": "read",
                                      "rate_per_cpu_factor": 1e300}]},
     "events.0.rate_per_cpu_factor", "less than or equal"),
    ({**small_scenario(), "control_interval_s": 1e-300}, "control_interval_s",
     "greater than or equal"),
    # derived: each field in range, their product is not
    (_stage0(buffer=2**40, element_kib=1000), "<top level>", "worst-case memory"),
    (_stage0(worker_memory_mib=2**20, max_cpus=1024), "<top level>", "worst-case memory"),
    ({**_stage0(rate_per_cpu=1e10, max_cpus=1024), "control_interval_s": 600}, "stages.0",
     "samples per interval"),
    ({**small_scenario(), "events": [{"at_s": 1, "stage": "transform",
                                      "rate_per_cpu_factor": 1000}],
      "stages": [*small_scenario()["stages"][:2],
                 dict(small_scenario()["stages"][2], rate_per_cpu=1e10, max_cpus=6)],
      "control_interval_s": 600}, "stages.2", "largest event factor"),
]


@pytest.mark.parametrize(("data", "field", "expected"), NUMERIC_CASES)
def test_numeric_bounds(data: dict[str, Any], field: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as err:
        load_scenario(data)
    msg = str(err.value)
    assert f"<dict>: {field}" in msg and expected in msg, msg


def test_bounds_at_the_limit_still_run() -> None:
    """The largest values the schema allows build an env and step (no overflow)."""
    import gymnasium as gym

    import intune_env  # noqa: F401  (registers InTune-v0)

    d = small_scenario(memory_gib=65536, gpu_rate=1e10)
    d["stages"][0].update(rate_per_cpu=1e10, bandwidth_cap=1e10, buffer=2**28,
                          element_kib=16)
    # a co-tenant as large as still leaves one CPU per stage room (~4 TiB of buffer)
    d["events"] = [{"at_s": 2, "cotenant_memory_gib": 60000}]
    env = gym.make("InTune-v0", scenario=d)
    env.reset(seed=0)
    for _ in range(3):
        _, reward, *_ = env.step(0)
        assert reward == reward  # not NaN


# --- names and echoes -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../x", "/", "a/b", "x" * 300, "\x1b[31mred",
                                  ".hidden", "", "a b", "tab\tname"])
def test_unsafe_scenario_names_refused(name: str) -> None:
    with pytest.raises(ScenarioError) as err:
        load_scenario({**small_scenario(), "name": name})
    msg = str(err.value)
    assert msg.startswith("<dict>: name: ") and "\x1b" not in msg and len(msg) < 300, msg


@pytest.mark.parametrize("name", ["dlrm-criteo", "a", "v1.2_x", "9lives"])
def test_safe_scenario_names_accepted(name: str) -> None:
    assert load_scenario({**small_scenario(), "name": name}).name == name


def test_huge_and_escaped_stage_names_echo_short(tmp_path: Path) -> None:
    for bad in ["x" * 10**6, "\x1b[2J\x1b[31mboom", "../up"]:
        d = small_scenario()
        d["stages"][0]["name"] = bad
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(d))
        msg = _one_line(path, "stages.0.name")
        assert "\x1b" not in msg and len(msg) < 300


def test_unknown_field_key_echo_short() -> None:
    d = small_scenario()
    d["machine"]["\x1b[31m" + "k" * 10**5] = 1
    with pytest.raises(ScenarioError) as err:
        load_scenario(d)
    assert "\x1b" not in str(err.value) and len(str(err.value)) < 300


# --- all errors shown -----------------------------------------------------------------
def test_every_error_shown_one_per_line(tmp_path: Path) -> None:
    d = small_scenario()
    d["machine"]["cpus"] = "lots"
    d["stages"][2]["buffer"] = -5
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ScenarioError) as err:
        load_scenario(str(path))
    lines = str(err.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(str(path))
    assert any("machine.cpus" in ln for ln in lines)
    assert any("stages.2.buffer" in ln for ln in lines)
    assert "more" not in str(err.value)


def test_many_errors_capped() -> None:
    d = small_scenario()
    for st in d["stages"]:
        st.update(buffer=-1, rate_per_cpu=-1, element_kib=-1)
    with pytest.raises(ScenarioError) as err:
        load_scenario(d)
    lines = str(err.value).splitlines()
    assert len(lines) == MAX_ERRORS_SHOWN
    assert lines[-1].endswith(f"(+{9 - MAX_ERRORS_SHOWN} more)")


def test_misspelling_reported_once() -> None:
    d = small_scenario()
    d["stages"][0]["rate_per_cpus"] = d["stages"][0].pop("rate_per_cpu")
    with pytest.raises(ScenarioError) as err:
        load_scenario(d)
    assert str(err.value) == ("<dict>: stages.0.rate_per_cpus: unknown field; did you mean "
                              "'rate_per_cpu'?")


# --- start_allocation and unknown kinds -----------------------------------------------
@pytest.mark.parametrize("start", ["even", "min", [1, 1, 2], (4, 1, 6)])
def test_start_allocation_accepted(start: Any) -> None:
    sc = load_scenario({**small_scenario(), "start_allocation": start})
    assert sc.start_allocation == (tuple(start) if isinstance(start, list | tuple) else start)
    assert load_scenario(sc.to_dict()) == sc
    assert "start_allocation" in sc.to_dict()


def test_start_allocation_default_none() -> None:
    sc = load_scenario(small_scenario())
    assert sc.start_allocation is None and sc.to_dict()["start_allocation"] is None


@pytest.mark.parametrize(("start", "expected"), [
    ([1.0, 1, 2], "list of integer CPU counts"),
    ([True, 1, 2], "list of integer CPU counts"),
    ("11111", "list of integer CPU counts"),
    (["1", 1, 1], "list of integer CPU counts"),
    ([1, 1], "expected 3 CPU counts"),
    ([1, 2, 1], "stage 'shuffle' needs 1..1 CPUs, got 2"),
    ([0, 1, 1], "stage 'read' needs 1..4 CPUs, got 0"),
    ([1, 1, 10**30], "needs 1..6 CPUs"),
])
def test_start_allocation_refused(start: Any, expected: str) -> None:
    with pytest.raises(ScenarioError) as err:
        load_scenario({**small_scenario(), "start_allocation": start})
    msg = str(err.value)
    assert msg.startswith("<dict>: start_allocation: ") and expected in msg, msg


def test_unknown_kind_names_kind_and_plugin_route(tmp_path: Path) -> None:
    d = small_scenario()
    d["stages"][0]["kind"] = "my-kind"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    msg = _one_line(path, "stages.0.kind: unknown stage kind 'my-kind'")
    assert "registered: " in msg and "linear" in msg  # plus any kinds other tests added
    assert "intune --plugin FILE.py" in msg and "intune.plugins" in msg


def test_cli_show_one_line_exit_2_for_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "agents.cli", "scenarios", "show",
                           str(fifo)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "regular file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("at_s: 2001-13-45\n", "line 1: invalid YAML: cannot read 2001-13-45"),
    ("a: !!float abc\n", "line 1: invalid YAML: cannot read abc"),
    ("a: !!int abc\n", "line 1: invalid YAML: cannot read abc"),
    ("a: \x00\n", "invalid YAML: unacceptable character"),
    ("? [1, 2]\n: 3\n", "found unhashable key"),
    ("a: 1\n---\nb: 2\n", "line 2: invalid YAML"),
])
def test_values_the_safe_loader_rejects_give_one_line(tmp_path: Path, text: str,
                                                      expected: str) -> None:
    _one_line(_yaml(tmp_path, text), expected)


def test_pipeline_that_cannot_start_refused() -> None:
    """One CPU per stage (the fitted start's floor) must fit, else every episode is an OOM
    at the first step: the env's start would be a crash and no agent could score."""
    d = small_scenario()
    d["stages"][2]["worker_memory_mib"] = 1_000_000  # ~977 GiB for one worker, 8 GiB machine
    with pytest.raises(ScenarioError) as err:
        load_scenario(d)
    msg = str(err.value)
    assert "one CPU per stage needs up to" in msg and "8.00 GiB" in msg, msg
    d["stages"][2]["worker_memory_mib"] = 5000  # one worker fits: accepted, env starts
    import gymnasium as gym

    import intune_env  # noqa: F401  (registers InTune-v0)

    env = gym.make("InTune-v0", scenario=load_scenario(d))
    _, info = env.reset(seed=0)
    assert not info["oom"]


def test_strict_json_refuses_duplicate_keys() -> None:
    from simulators.fileio import loads_json_strict

    assert loads_json_strict('{"a": {"b": 1}, "c": [1]}') == {"a": {"b": 1}, "c": [1]}
    with pytest.raises(ValueError, match="duplicate key 'b'"):
        loads_json_strict('{"a": {"b": 1, "b": 2}}')


@pytest.mark.parametrize(("text", "value"), [("1e5", 1e5), ("2.5e5", 2.5e5),
                                             ("1E5", 1e5), ("1.0e+5", 1e5),
                                             ("+1e5", 1e5), ("100_000", 100000)])
def test_exponent_numbers_read_as_numbers(tmp_path: Path, text: str, value: float) -> None:
    # PyYAML (YAML 1.1) read 1e5 and 2.5e5 as strings and the message said "not a
    # string"; json.dumps writes 5e-05, so a JSON scenario from Python was refused.
    data = small_scenario()
    data["machine"]["gpu_rate"] = "GPU"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data).replace("GPU", text))
    assert load_scenario(path).machine.gpu_rate == value


def test_json_dumps_small_float_accepted(tmp_path: Path) -> None:
    import json

    data = small_scenario()
    data["stages"][0]["contention"] = 5e-05
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    assert "5e-05" in path.read_text()
    assert load_scenario(path).stages[0].contention == 5e-05


def test_gpu_below_one_sample_per_interval_refused() -> None:
    # gpu_rate 0.3 at 2-s intervals consumed int(0.6) = 0 samples: every fraction was 0,
    # the oracle's own included (a stage that slow was already refused).
    data = small_scenario()
    data["machine"]["gpu_rate"] = 0.3
    with pytest.raises(ScenarioError, match=r"machine.gpu_rate: 0.3 samples/s is less than "
                                            r"one sample per control interval"):
        load_scenario(data)


def test_fewer_cpus_than_stages_message_says_what_is_allowed() -> None:
    data = small_scenario()
    data["machine"]["cpus"] = 1
    with pytest.raises(ScenarioError, match=r"1 CPU\(s\) but the pipeline has \d+ stages; "
                                            r"the start needs one CPU per stage"):
        load_scenario(data)


def test_exponent_text_in_a_string_field_stays_text(tmp_path: Path) -> None:
    # the exponent resolver must not turn ``name: 1e5`` (a valid name) into 100000.0
    data = small_scenario()
    path = tmp_path / "s.yaml"
    text = yaml.safe_dump(data).replace(f"name: {data['name']}\n", "name: 1e5\n", 1)
    path.write_text(text + "description: 2.5e5\n")
    sc = load_scenario(path)
    assert (sc.name, sc.description) == ("1e5", "2.5e5")


@pytest.mark.parametrize(("text", "match"), [
    ("010", "010 is read as octal (8) by YAML 1.1"),
    ("1:30:00", "1:30:00 is read as base 60 (5400) by YAML 1.1"),
    ("1:2.5", "1:2.5 is read as base 60 (62.5) by YAML 1.1"),
])
def test_yaml11_octal_and_base60_refused(tmp_path: Path, text: str, match: str) -> None:
    # PyYAML read `cpus: 010` as 8 CPUs and `gpu_rate: 1:30:00` as 5400 samples/s
    data = small_scenario()
    data["machine"]["gpu_rate"] = "GPU"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data).replace("GPU", text))
    _one_line(path, match)


def test_whole_floats_in_integer_fields_refused() -> None:
    # lax pydantic read cpus: 8.0 and buffer: 2.0 as integers; floats stay fine where
    # a field is a number
    data = small_scenario()
    data["machine"]["cpus"] = float(data["machine"]["cpus"])
    with pytest.raises(ScenarioError, match=r"machine.cpus: expected a valid integer, "
                                            r"written without a decimal point"):
        load_scenario(data)
    data = small_scenario()
    data["stages"][0]["buffer"] = 2.0
    with pytest.raises(ScenarioError, match=r"stages.0.buffer: expected a valid integer"):
        load_scenario(data)
    data = small_scenario()
    data["machine"]["memory_gib"] = int(data["machine"]["memory_gib"]) + 1  # int for float
    load_scenario(data)


@pytest.mark.parametrize(("text", "ok"), [("8.0e0", False), ("80e-1", False),
                                          ("4.8e1", False), ("8e0", True), ("0x8", True)])
def test_integer_fields_in_yaml_take_whole_numbers_only(tmp_path: Path, text: str,
                                                         ok: bool) -> None:
    # an exponent with a decimal point or a negative exponent is not a count (8.0e0 got
    # past the float check as an exponent number); 8e0 and hex 0x8 are
    data = small_scenario()
    data["machine"]["cpus"] = "CPUS"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data).replace("CPUS", text).replace("'", ""))
    if ok:
        sc = load_scenario(path)
        assert sc.machine.cpus == 8 and type(sc.machine.cpus) is int
    else:
        _one_line(path, "machine.cpus: expected a valid integer")


def test_show_escapes_controls_and_bidi_overrides(tmp_path: Path) -> None:
    # a NUL and U+202E (which reorders what follows it) were printed raw
    data = small_scenario()
    data["description"] = "x\u202eevil\x00nul " + "long " * 40
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    out = subprocess.run([sys.executable, "-m", "agents.cli", "scenarios", "show", str(path)],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert "x\\u202eevil\\x00nul" in first and "\u202e" not in first and "\x00" not in first
    assert first.rstrip().endswith("long")  # the whole description, not cut at 80 characters


def test_echo_escapes_line_separators_and_bidi_marks() -> None:
    # str.splitlines() splits on U+2028/U+2029: a "one line" message would become two
    from simulators.fileio import echo

    text = echo("a\u2028b\u2029c\u061cd\u202ee")
    assert text == "a\\u2028b\\u2029c\\u061cd\\u202ee" and len(text.splitlines()) == 1
