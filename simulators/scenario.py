"""Scenario files: the machine, the pipeline's stages and scheduled events, validated.

A scenario is a YAML file (or a dict) such as::

    name: dlrm-criteo
    machine: {cpus: 32, memory_gib: 64, base_memory_gib: 20, gpu_rate: 250000}
    stages:
      - {name: read, rate_per_cpu: 60000, max_cpus: 16, bandwidth_cap: 400000,
         worker_memory_mib: 300, element_kib: 0.5, buffer: 4096}
      - {name: shuffle, rate_per_cpu: 900000, max_cpus: 1, worker_memory_mib: 1500,
         element_kib: 0.5, buffer: 100000}
    events:
      - {at_s: 600, cpus: 16}
      - {at_s: 900, stage: shuffle, rate_per_cpu_factor: 0.5}

Every fault is reported as one :class:`ScenarioError` line naming the source (file or
``<dict>``), the field path and what was expected. Built-in scenarios live in
``simulators/scenarios/*.yaml`` and are looked up by name.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GIB = 1024**3
MIB = 1024**2
KIB = 1024

MAX_STAGES = 8
MIN_STAGES = 2


class ScenarioError(ValueError):
    """A scenario (file, name or dict) is malformed; the message is one readable line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MachineSpec(_Strict):
    """The trainer machine."""

    cpus: int = Field(ge=1, le=1024, description="schedulable CPUs")
    memory_gib: float = Field(gt=0, le=65536, description="memory capacity")
    base_memory_gib: float = Field(
        default=0.0, ge=0, description="memory used outside the pipeline (trainer, model, caches)"
    )
    gpu_rate: float = Field(gt=0, description="samples/s the trainer (GPU) consumes at most")
    oversubscription_overhead: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="context-switch loss per 100% of CPU oversubscription",
    )

    @model_validator(mode="after")
    def _base_fits(self) -> MachineSpec:
        if self.base_memory_gib >= self.memory_gib:
            raise ValueError(
                f"base_memory_gib ({self.base_memory_gib}) must be below memory_gib "
                f"({self.memory_gib})"
            )
        return self


class StageSpec(_Strict):
    """One pipeline stage. ``kind`` selects the stage model (see ``simulators.stages``)."""

    name: str = Field(min_length=1, max_length=32)
    kind: str = Field(default="linear", description="registered stage model")
    rate_per_cpu: float = Field(gt=0, description="samples/s one CPU processes")
    max_cpus: int = Field(default=1024, ge=1, le=1024, description="1 for a sequential stage")
    contention: float = Field(
        default=0.0, ge=0, le=10, description="sublinear scaling: k / (1 + contention (k - 1))"
    )
    bandwidth_cap: float | None = Field(
        default=None, gt=0, description="hard cap in samples/s (storage, PCIe)"
    )
    worker_memory_mib: float = Field(default=0.0, ge=0, description="memory per CPU (worker)")
    element_kib: float = Field(default=0.5, gt=0, description="size of one buffered sample")
    buffer: int = Field(default=4096, ge=1, description="output buffer size in samples")
    buffer_per_cpu: int = Field(
        default=0, ge=0, description="extra buffer per CPU (in-flight prefetch per worker)"
    )
    state_mib: float = Field(default=0.0, ge=0, description="fixed state (e.g. shuffle buffer)")
    params: dict[str, float] = Field(default_factory=dict, description="kind-specific parameters")

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", v):
            raise ValueError("must be a short identifier (letters, digits, _ or -)")
        return v

    def __hash__(self) -> int:  # params is a dict; hash the canonical JSON instead
        return hash(self.model_dump_json())


class EventSpec(_Strict):
    """A change at simulated time ``at_s``. Factors are relative to the scenario's values."""

    at_s: float = Field(ge=0)
    cpus: int | None = Field(default=None, ge=1, le=1024, description="machine resized")
    memory_gib: float | None = Field(default=None, gt=0)
    cotenant_memory_gib: float | None = Field(
        default=None, ge=0, description="memory taken by another process from now on"
    )
    stage: str | None = None
    rate_per_cpu_factor: float | None = Field(default=None, gt=0)
    bandwidth_cap: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _meaningful(self) -> EventSpec:
        stage_fields = (self.rate_per_cpu_factor, self.bandwidth_cap)
        machine_fields = (self.cpus, self.memory_gib, self.cotenant_memory_gib)
        if any(f is not None for f in stage_fields) and self.stage is None:
            raise ValueError("rate_per_cpu_factor and bandwidth_cap need a 'stage'")
        if self.stage is not None and all(f is None for f in stage_fields):
            raise ValueError("an event on a stage needs rate_per_cpu_factor or bandwidth_cap")
        if all(f is None for f in (*stage_fields, *machine_fields)):
            raise ValueError(
                "an event must change something: cpus, memory_gib, cotenant_memory_gib, "
                "or a stage's rate_per_cpu_factor / bandwidth_cap"
            )
        return self


class Scenario(_Strict):
    """A validated scenario. Build one with :func:`load_scenario`."""

    name: str = Field(min_length=1)
    description: str = ""
    machine: MachineSpec
    stages: tuple[StageSpec, ...] = Field(min_length=MIN_STAGES, max_length=MAX_STAGES)
    events: tuple[EventSpec, ...] = ()
    noise_cv: float = Field(
        default=0.03, ge=0, le=0.3, description="interval-to-interval variation of stage rates"
    )
    control_interval_s: float = Field(default=2.0, gt=0, le=600)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {', '.join(dupes)}")
        for i, ev in enumerate(self.events):
            if ev.stage is not None and ev.stage not in names:
                raise ValueError(
                    f"events.{i}.stage: unknown stage {ev.stage!r}; expected one of "
                    f"{', '.join(names)}"
                )
        from simulators.stages import stage_model_class  # late: stages imports this module

        for i, st in enumerate(self.stages):
            try:
                stage_model_class(st.kind).check_params(st.params)
            except KeyError as err:
                raise ValueError(f"stages.{i}.kind: {err.args[0]}") from None
            except ValueError as err:
                raise ValueError(f"stages.{i}.params: {err}") from None
        if len(self.stages) > self.machine.cpus:
            raise ValueError(
                f"the machine has {self.machine.cpus} CPUs but the pipeline has "
                f"{len(self.stages)} stages; each stage needs at least one CPU"
            )
        return self

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`load_scenario` accepts again."""
        return self.model_dump(mode="json", exclude_defaults=False)


def _format_error(source: str, err: ValidationError) -> str:
    # A misspelt field also shows up as a missing one: report the misspelling.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<top level>"
    msg = first["msg"].removeprefix("Value error, ")
    typ = first["type"]
    if typ == "extra_forbidden":
        known = sorted({f for m in (Scenario, MachineSpec, StageSpec, EventSpec)
                        for f in m.model_fields})
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        msg = "unknown field" + (f"; did you mean {close[0]!r}?" if close else "")
    elif typ == "missing":
        msg = "required field is missing"
    more = len(err.errors()) - 1
    suffix = f" (+{more} more)" if more else ""
    got = first.get("input")
    shown = "" if typ in ("missing", "extra_forbidden") or isinstance(got, dict | list) else (
        f" (got {got!r})"
    )
    return f"{source}: {loc}: {msg}{shown}{suffix}"


def _builtin_dir() -> Path:
    return Path(str(resources.files("simulators") / "scenarios"))


def builtin_scenarios() -> list[str]:
    """Names of the scenarios shipped with the package, sorted."""
    return sorted(p.stem for p in _builtin_dir().glob("*.yaml"))


def builtin_path(name: str) -> Path:
    """Path of a built-in scenario's YAML file."""
    return _builtin_dir() / f"{name}.yaml"


def scenario_from_dict(data: Any, source: str = "<dict>") -> Scenario:
    """Validate a mapping as a scenario; raise :class:`ScenarioError` with one clear line."""
    if not isinstance(data, dict):
        raise ScenarioError(
            f"{source}: expected a mapping with name, machine and stages, got "
            f"{type(data).__name__}"
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(_format_error(source, err)) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning I/O and syntax faults into :class:`ScenarioError`."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read file ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ScenarioError(f"{path}:{where}: invalid YAML: {problem}") from None


def load_scenario(spec: str | Path | dict[str, Any] | Scenario) -> Scenario:
    """Load a scenario from a built-in name, a YAML path, a dict or a :class:`Scenario`."""
    if isinstance(spec, Scenario):
        return spec
    if isinstance(spec, dict):
        return scenario_from_dict(spec)
    if not isinstance(spec, str | Path):
        raise ScenarioError(
            f"scenario must be a built-in name, a YAML path or a dict, got {type(spec).__name__}"
        )
    text = str(spec)
    if isinstance(spec, str) and spec.startswith("suite:"):
        from simulators.generate import suite_scenario  # lazy: generated suite members

        try:
            return scenario_from_dict(suite_scenario(spec), source=spec)
        except ValueError as err:
            raise ScenarioError(str(err)) from None
    if isinstance(spec, str) and spec in builtin_scenarios():
        path = builtin_path(spec)
    else:
        path = Path(text)
        if not path.exists():
            raise ScenarioError(
                f"{text}: no such scenario file or built-in name; built-ins: "
                f"{', '.join(builtin_scenarios())}"
            )
    return scenario_from_dict(read_yaml(path), source=str(path))


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out
