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

Every fault is a :class:`ScenarioError`: one line per fault (up to
``MAX_ERRORS_SHOWN``, then "(+N more)"), each naming the source (file or ``<dict>``),
the field path and what was expected, echoing at most ~80 characters of the input with
control characters escaped. Built-in scenarios live in ``simulators/scenarios/*.yaml``
and are looked up by name.

Boundaries: a file is read through :func:`simulators.fileio.read_text_limited` (regular
files only, 1 MB, strict UTF-8) and parsed by a ``yaml.SafeLoader`` (data, never code)
that also refuses nesting deeper than ``MAX_YAML_DEPTH``, alias expansion beyond
``MAX_YAML_NODES``, integer literals over ``MAX_INT_CHARS`` characters and duplicate
keys. Every number has a finite bound (``MAX_*`` below) and derived quantities (worst-case
memory, samples per control interval) are checked at validation, so whatever validates,
the simulator and both envs run. ``name`` is a safe identifier (it ends up in file
names). ``start_allocation`` (``even``, ``min`` or CPUs per stage) is optional.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from simulators.fileio import InputFileError, echo, read_text_limited

GIB = 1024**3
MIB = 1024**2
KIB = 1024

MAX_STAGES = 8
MIN_STAGES = 2

# --- input bounds ---------------------------------------------------------------------
# Every number has a finite, documented upper bound, far above any real pipeline, chosen
# so that every derived quantity below stays exact in the simulator's arithmetic (int64
# bytes and samples, float64 rates; the batched env needs them below 2**47).
MAX_CPUS = 1024
MIN_MEMORY_GIB = 1 / 1024  #: 1 MiB: a machine or an event with less is a typo
MAX_MEMORY_GIB = 65536.0  #: 64 TiB
MAX_RATE = 1e10  #: samples/s, for gpu_rate, rate_per_cpu and bandwidth caps
MAX_RATE_FACTOR = 1000.0
MAX_WORKER_MEMORY_MIB = 1024.0**2  #: 1 TiB per worker
MAX_STATE_MIB = 64 * 1024.0**2  #: 64 TiB
MAX_ELEMENT_KIB = 1024.0**2  #: 1 GiB per sample
MAX_BUFFER = 2**40  #: samples
MAX_BUFFER_PER_CPU = 2**30  #: samples per CPU
MAX_AT_S = 1e9  #: seconds (about 32 years)
MAX_EVENTS = 256
MIN_CONTROL_INTERVAL_S = 1e-3
MAX_PARAM = 1e12  #: magnitude of a kind-specific parameter
#: Derived limits, checked at validation: worst-case memory in bytes (every stage at
#: max_cpus with its buffer counted BUFFER_HEADROOM times, since a buffer whose capacity
#: shrinks can briefly hold more, plus state, base and the largest cotenant; the batched
#: env counts in float64 and needs this below 2**47) and samples in one
#: control interval (a stage's capacity times control_interval_s; MAX_RATE x 600 s keeps
#: the GPU's below it).
MAX_DERIVED_BYTES = 2**47
BUFFER_HEADROOM = 4
MAX_INTERVAL_SAMPLES = 2**44
#: YAML structure: nesting depth, expanded nodes (aliases counted each time they are
#: used: a "billion laughs" file must not expand) and characters of an integer literal.
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
MAX_INT_CHARS = 40
#: Scenario names end up in file names (models, results): a safe identifier.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
STAGE_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_-]{0,31}"
#: Validation errors listed in one ScenarioError, one per line.
MAX_ERRORS_SHOWN = 5


class ScenarioError(ValueError):
    """A scenario (file, name or dict) is malformed; one readable line per fault."""


def _matching(value: str, pattern: str, expected: str) -> str:
    """``value`` if it fully matches ``pattern``; else ``ValueError('must be ' + expected)``."""
    if not re.fullmatch(pattern, value):
        raise ValueError(f"must be {expected}")
    return value


def _is_numeric(annotation: Any) -> bool:
    """Whether a field holds a number (``int``, ``float``, optionally ``None``)."""
    args = typing.get_args(annotation) or (annotation,)
    return any(a in (int, float) for a in args) and str not in args


def _is_integer(annotation: Any) -> bool:
    """Whether a field holds a whole number only (``int``, optionally ``None``)."""
    args = typing.get_args(annotation) or (annotation,)
    return int in args and float not in args and str not in args


class ExponentFloat(float):
    """A YAML number written with an exponent only (``1e5``), remembering its text."""

    text: str

    def __new__(cls, text: str) -> ExponentFloat:
        obj = super().__new__(cls, text.replace("_", ""))
        obj.text = text
        return obj


class StrictModel(BaseModel):
    """A pydantic model of a user's file: no extra fields, finite numbers, and numbers
    never read from booleans or strings (also the base of SB3 hyperparameter ranges)."""

    # allow_inf_nan=False: .inf and .nan are refused even where no bound would catch them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true/false as 1/0 and "40000" as 40000: refuse both,
        # since a YAML `yes` or a quoted number is a mistake, not a value
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, ExponentFloat):
            if field is not None and _is_integer(field.annotation):
                # a count written with an exponent: `1e5` is one, `8.0e0` and `80e-1`
                # are not (the rule `8.0` follows, and the SB3 files' plain_numbers)
                if "." in v.text or "-" in v.text.lstrip("+-") or not v.is_integer():
                    raise ValueError("expected a valid integer, written without a decimal "
                                     "point or a negative exponent")
                return int(v)
            return v if field is None or _is_numeric(field.annotation) else v.text
        if field is not None and _is_numeric(field.annotation) and isinstance(v, bool | str):
            kind = "integer" if int in (typing.get_args(field.annotation) or
                                        (field.annotation,)) else "number"
            raise ValueError(f"expected a valid {kind}, not a "
                             f"{'boolean' if isinstance(v, bool) else 'string'}")
        if field is not None and _is_integer(field.annotation) and isinstance(v, float):
            # lax pydantic reads 8.0 as 8: a CPU count or buffer written as a float is a
            # slip (or a computed value) to look at, not a count
            raise ValueError("expected a valid integer, written without a decimal point")
        return v


class MachineSpec(StrictModel):
    """The trainer machine."""

    cpus: int = Field(ge=1, le=MAX_CPUS, description="schedulable CPUs")
    memory_gib: float = Field(ge=MIN_MEMORY_GIB, le=MAX_MEMORY_GIB, description="memory capacity")
    base_memory_gib: float = Field(
        default=0.0, ge=0, le=MAX_MEMORY_GIB,
        description="memory used outside the pipeline (trainer, model, caches)",
    )
    gpu_rate: float = Field(gt=0, le=MAX_RATE,
                            description="samples/s the trainer (GPU) consumes at most")
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


class StageSpec(StrictModel):
    """One pipeline stage. ``kind`` selects the stage model (see ``simulators.stages``)."""

    name: str = Field(min_length=1, max_length=32)
    kind: str = Field(default="linear", max_length=64, description="registered stage model")
    rate_per_cpu: float = Field(gt=0, le=MAX_RATE, description="samples/s one CPU processes")
    max_cpus: int = Field(default=MAX_CPUS, ge=1, le=MAX_CPUS,
                          description="1 for a sequential stage")
    contention: float = Field(
        default=0.0, ge=0, le=10, description="sublinear scaling: k / (1 + contention (k - 1))"
    )
    bandwidth_cap: float | None = Field(
        default=None, gt=0, le=MAX_RATE, description="hard cap in samples/s (storage, PCIe)"
    )
    worker_memory_mib: float = Field(default=0.0, ge=0, le=MAX_WORKER_MEMORY_MIB,
                                     description="memory per CPU (worker)")
    element_kib: float = Field(default=0.5, gt=0, le=MAX_ELEMENT_KIB,
                               description="size of one buffered sample")
    buffer: int = Field(default=4096, ge=1, le=MAX_BUFFER,
                        description="output buffer size in samples")
    buffer_per_cpu: int = Field(
        default=0, ge=0, le=MAX_BUFFER_PER_CPU,
        description="extra buffer per CPU (in-flight prefetch per worker)",
    )
    state_mib: float = Field(default=0.0, ge=0, le=MAX_STATE_MIB,
                             description="fixed state (e.g. shuffle buffer)")
    params: dict[str, float] = Field(default_factory=dict, max_length=32,
                                     description="kind-specific parameters")

    _identifier = field_validator("name")(classmethod(lambda cls, v: _matching(
        v, STAGE_NAME_PATTERN, "a short identifier (a letter or _, then letters, digits, _ "
        "or -)")))

    @field_validator("params", mode="before")
    @classmethod
    def _number_params(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key, value in v.items():
                if isinstance(value, bool | str):
                    raise ValueError(f"parameter {echo(repr(key))}: expected a number, got "
                                     f"{echo(repr(value))}")
        return v

    @field_validator("params")
    @classmethod
    def _finite_params(cls, v: dict[str, float]) -> dict[str, float]:
        for key, value in v.items():
            if not re.fullmatch(STAGE_NAME_PATTERN, key):
                raise ValueError(f"parameter name {echo(repr(key))} must be a short identifier")
            if not abs(value) <= MAX_PARAM:
                raise ValueError(f"parameter {key!r} must be finite, at most {MAX_PARAM:g} "
                                 f"in magnitude (got {echo(value)})")
        return v

    def worst_memory_bytes(self, buffer_headroom: int = 1) -> int:
        """Worst-case memory of the default memory model at ``max_cpus``, in bytes (exact
        Python ints), the buffer counted ``buffer_headroom`` times."""
        k = self.max_cpus
        buffer = self.buffer + self.buffer_per_cpu * k
        return (math.ceil(k * self.worker_memory_mib * MIB)
                + buffer_headroom * buffer * max(1, math.ceil(self.element_kib * KIB))
                + math.ceil(self.state_mib * MIB))

    def __hash__(self) -> int:  # params is a dict; hash the canonical JSON instead
        return hash(self.model_dump_json())


class EventSpec(StrictModel):
    """A change at simulated time ``at_s``. Factors are relative to the scenario's values."""

    at_s: float = Field(ge=0, le=MAX_AT_S)
    cpus: int | None = Field(default=None, ge=1, le=MAX_CPUS, description="machine resized")
    memory_gib: float | None = Field(default=None, ge=MIN_MEMORY_GIB, le=MAX_MEMORY_GIB)
    cotenant_memory_gib: float | None = Field(
        default=None, ge=0, le=MAX_MEMORY_GIB,
        description="memory taken by another process from now on",
    )
    stage: str | None = Field(default=None, max_length=32)
    rate_per_cpu_factor: float | None = Field(default=None, gt=0, le=MAX_RATE_FACTOR)
    bandwidth_cap: float | None = Field(default=None, gt=0, le=MAX_RATE)

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


class Scenario(StrictModel):
    """A validated scenario. Build one with :func:`load_scenario`."""

    name: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=4096)
    machine: MachineSpec
    stages: tuple[StageSpec, ...] = Field(min_length=MIN_STAGES, max_length=MAX_STAGES)
    events: tuple[EventSpec, ...] = Field(default=(), max_length=MAX_EVENTS)
    noise_cv: float = Field(
        default=0.03, ge=0, le=0.3, description="interval-to-interval variation of stage rates"
    )
    control_interval_s: float = Field(default=2.0, ge=MIN_CONTROL_INTERVAL_S, le=600)
    start_allocation: Literal["even", "min"] | tuple[StrictInt, ...] | None = Field(
        default=None,
        description="the env's start: 'even', 'min' or CPUs per stage (None: the env's own)",
    )

    @field_validator("start_allocation", mode="before")
    @classmethod
    def _start_form(cls, v: Any) -> Any:
        # One clear message instead of one per member of the union.
        if v is None or v in ("even", "min"):
            return v
        if isinstance(v, list | tuple) and all(
                isinstance(k, int) and not isinstance(k, bool) for k in v):
            return tuple(v)
        raise ValueError("expected 'even', 'min' or a list of integer CPU counts, one per "
                         "stage")

    # the name becomes part of file names (models, results): no '/', '..' or escapes
    _safe_name = field_validator("name")(classmethod(lambda cls, v: _matching(
        v, NAME_PATTERN, "a safe identifier of at most 64 characters: a letter or digit, "
        "then letters, digits, '.', '_' or '-'")))

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stages: names must be unique, repeated: {', '.join(dupes)}")
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
            if st.contention and not stage_model_class(st.kind).uses_contention:
                # silently ignored, it would look like a stage that scales when it does not
                raise ValueError(f"stages.{i}.contention: kind {st.kind!r} does not use "
                                 f"contention (built in, only 'linear' does; a model "
                                 f"declares uses_contention = True); remove it")
        if len(self.stages) > self.machine.cpus:
            raise ValueError(
                f"the machine has {self.machine.cpus} CPU(s) but the pipeline has "
                f"{len(self.stages)} stages; the start needs one CPU per stage (a resize "
                f"event may later leave fewer: the stages then time-slice)"
            )
        self._check_start()
        self._check_derived()
        return self

    def _check_start(self) -> None:
        start = self.start_allocation
        if not isinstance(start, tuple):
            return
        if len(start) != len(self.stages):
            raise ValueError(f"start_allocation: expected {len(self.stages)} CPU counts (one "
                             f"per stage), got {len(start)}")
        for st, k in zip(self.stages, start, strict=True):
            if not 1 <= k <= st.max_cpus:
                raise ValueError(f"start_allocation: stage {st.name!r} needs 1..{st.max_cpus} "
                                 f"CPUs, got {echo(k)}")

    def _check_derived(self) -> None:
        """Derived quantities stay exact in the simulator (see ``MAX_DERIVED_BYTES``)."""
        dt = self.control_interval_s
        cotenant = max((e.cotenant_memory_gib or 0.0 for e in self.events), default=0.0)
        fixed = (self.machine.base_memory_gib + cotenant) * GIB
        worst = fixed + sum(st.worst_memory_bytes(BUFFER_HEADROOM) for st in self.stages)
        if worst > MAX_DERIVED_BYTES:
            raise ValueError(
                f"worst-case memory (every stage at max_cpus, buffers counted "
                f"{BUFFER_HEADROOM}x, plus state, base and cotenant memory) is {worst:.3g} "
                f"bytes; expected at most 2**47 ({MAX_DERIVED_BYTES:.3g}): lower buffer, "
                f"element_kib or worker_memory_mib"
            )
        factors = {st.name: 1.0 for st in self.stages}
        for ev in self.events:  # the largest factor any event gives a stage
            if ev.stage is not None and ev.rate_per_cpu_factor is not None:
                factors[ev.stage] = max(factors[ev.stage], ev.rate_per_cpu_factor)
        for i, st in enumerate(self.stages):
            if st.kind != "linear":
                continue  # other kinds: their compiled tables are checked below
            peak = st.rate_per_cpu * factors[st.name] * st.max_cpus * dt
            if peak > MAX_INTERVAL_SAMPLES:
                raise ValueError(
                    f"stages.{i}: rate_per_cpu x max_cpus x control_interval_s (with the "
                    f"largest event factor) is {peak:.3g} samples per interval; expected at "
                    f"most 2**44 ({MAX_INTERVAL_SAMPLES:.3g})"
                )
        self._check_compiled()

    def _check_compiled(self) -> None:
        # Tabulate the conditions the events produce, exactly as the simulator will (the
        # tables are cached, so the env reuses this work): a stage model that fails here,
        # or produces numbers out of range, is refused now, not at the first step.
        from simulators.conditions import Conditions, compile_conditions  # late: imports us

        dt = self.control_interval_s
        cond = Conditions.initial(self)
        events = sorted(self.events, key=lambda e: e.at_s)  # the simulator's order
        # the start must fit the conditions at reset (events at 0 applied) and those of
        # the first step (events within the first interval), as the env checks it
        start_checks = {sum(e.at_s <= 0 for e in events), sum(e.at_s <= dt for e in events)}
        start_conds = []
        for j in range(len(events) + 1):
            where = "stages" if j == 0 else f"events.{self.events.index(events[j - 1])}"
            if j:
                cond = cond.apply(events[j - 1])
            try:
                comp = compile_conditions(cond)
            except (ValueError, OverflowError, ArithmeticError) as err:
                raise ValueError(f"{where}: {echo(str(err), 200)}") from None
            # (an event may leave fewer CPUs than stages: the stages then time-slice)
            self._check_min_fits(cond, where if j else "")
            if j in start_checks:
                start_conds.append(cond)
            if j == 0:  # a stage that cannot pass one sample per interval delivers nothing
                if self.machine.gpu_rate * dt < 1:  # nor can such a GPU consume one
                    raise ValueError(
                        f"machine.gpu_rate: {self.machine.gpu_rate:.3g} samples/s is less than "
                        f"one sample per control interval ({dt:g} s); expected at least "
                        f"{1 / dt:.3g}")
                for i in range(len(self.stages)):
                    best = float(comp.capacity_array[i].max()) * dt
                    if best < 1:
                        raise ValueError(
                            f"stages.{i}: at most {best:.3g} samples per control interval "
                            f"even with max_cpus; expected at least 1 (raise rate_per_cpu or "
                            f"control_interval_s)")
            peak = float(comp.capacity_array.max()) * dt
            if not peak <= MAX_INTERVAL_SAMPLES:
                raise ValueError(f"{where}: a stage's capacity x control_interval_s is "
                                 f"{peak:.3g} samples per interval; expected at most 2**44")
            mem = cond.fixed_memory_bytes + sum(
                int(w.max()) + BUFFER_HEADROOM * int(b.max()) * e + st for w, b, e, st in zip(
                    comp.workers_array, comp.buffers_array, comp.element_bytes,
                    comp.state_bytes, strict=True))
            if mem > MAX_DERIVED_BYTES:
                raise ValueError(f"{where}: worst-case memory {mem:.3g} bytes; expected at "
                                 f"most 2**47")
        if isinstance(self.start_allocation, tuple):  # the env's own check, at validation
            from simulators.pipeline import check_start_fits  # late: imports this module

            check_start_fits(start_conds[0], self.start_allocation, later=start_conds[1:])

    def _check_min_fits(self, cond: Any, event: str = "") -> None:
        # The env's fitted start falls back to one CPU per stage; if even that cannot fit,
        # every episode would end in an out-of-memory crash at the first step. After an
        # ``event`` the same holds: every allocation would crash there.
        from simulators.pipeline import worst_memory  # late: imports this module

        need = worst_memory(cond, [1] * len(self.stages))
        have = cond.memory_capacity_bytes
        if need > have:
            what = ("after this event every allocation runs out of memory" if event
                    else "the pipeline cannot start without running out of memory")
            raise ValueError(
                f"{event + ': ' if event else ''}one CPU per stage needs up to "
                f"{need / GIB:.2f} GiB (every buffer full, plus state, base and co-tenant "
                f"memory) but the machine has "
                f"{have / GIB:.2f} GiB: {what}; lower worker_memory_mib, buffer, "
                f"element_kib, state_mib or the co-tenant memory, or raise memory_gib")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`load_scenario` accepts again."""
        return self.model_dump(mode="json", exclude_defaults=False)


def _error_line(source: str, e: Any) -> str:
    loc = echo(".".join(str(p) for p in e["loc"])) if e["loc"] else "<top level>"
    msg = e["msg"].removeprefix("Value error, ")
    typ = e["type"]
    inner = re.match(r"((?:stages|events|machine|start_allocation)(?:\.\w+)*): ", msg)
    if not e["loc"] and inner:  # a whole-scenario check that names its field itself
        loc, msg = inner.group(1), msg[inner.end():]
    if typ == "extra_forbidden":
        name = str(e["loc"][-1])
        models = {"the top level": Scenario, "machine": MachineSpec, "stages": StageSpec,
                  "events": EventSpec}
        owners = [where for where, m in models.items() if name in m.model_fields]
        known = sorted({f for m in models.values() for f in m.model_fields} - {name})
        close = difflib.get_close_matches(name, known, n=1)
        msg = (f"unknown field here ({name!r} belongs in {' or '.join(owners)})" if owners
               else "unknown field" + (f"; did you mean {close[0]!r}?" if close else ""))
    elif typ == "missing":
        msg = "required field is missing"
    got = e.get("input")
    shown = "" if typ in ("missing", "extra_forbidden") or isinstance(got, dict | list) else (
        f" (got {echo(repr(got))})"
    )
    return f"{source}: {loc}: {msg}{shown}"


def _format_error(source: str, err: ValidationError) -> str:
    """Every error, one per line (at most ``MAX_ERRORS_SHOWN``); each line names the source."""
    errors = err.errors()
    # A misspelt field also shows up as a missing one: report the misspelling only.
    known = sorted({f for m in (Scenario, MachineSpec, StageSpec, EventSpec)
                    for f in m.model_fields})
    misspelt = set()
    for e in errors:
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            if close:
                misspelt.add((*e["loc"][:-1], close[0]))
    errors = [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in misspelt)]
    # "should have at least 2 items after validation, not 0" only echoes its items' errors
    inner = {tuple(e["loc"][:n]) for e in errors for n in range(len(e["loc"]))}
    errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in inner)]
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")  # stable: file order otherwise
    lines = [_error_line(source, e) for e in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines[-1] += f" (+{len(errors) - MAX_ERRORS_SHOWN} more)"
    return "\n".join(lines)


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


class _ScenarioLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (data only, never code) with bounds: nesting depth, expanded
    size, integer length, and duplicate keys refused instead of "last one wins"."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: cap it before Python's recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError, ArithmeticError) as err:
            # give the line of a value the safe constructors reject (!!float abc)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {echo(getattr(node, 'value', '') or node.tag)}: "
                f"{echo(str(err))}", node.start_mark) from None

    def construct_yaml_int(self, node: Any) -> Any:
        if len(node.value) > MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(node.value):,} characters; expected at most "
                f"{MAX_INT_CHARS}", node.start_mark)
        value = super().construct_yaml_int(node)
        self._refuse_yaml11(node, value)
        return value

    def construct_yaml_float(self, node: Any) -> Any:
        value = super().construct_yaml_float(node)
        self._refuse_yaml11(node, value)
        return value

    @staticmethod
    def _refuse_yaml11(node: Any, value: Any) -> None:
        # YAML 1.1 (PyYAML) reads `010` as octal 8 and `1:30:00` as base 60 (5400):
        # numbers nobody means in a scenario; refuse them rather than run another value
        text = str(node.value).replace("_", "")
        if ":" in text or re.fullmatch(r"[-+]?0[0-7]+", text):
            kind, fix = (("base 60", "write it as one decimal number") if ":" in text else
                         ("octal", "write it without leading zeros"))
            raise yaml.constructor.ConstructorError(
                None, None, f"{echo(node.value)} is read as {kind} ({value:g}) by YAML 1.1; "
                f"{fix}, or quote it if it is text", node.start_mark)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges: explicit keys override merged ones by design
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {echo(repr(key))} (first on line "
                            f"{seen[key]})", key_node.start_mark)
                    seen[key] = line
                except TypeError:
                    continue  # unhashable: the base class reports it
        return super().construct_mapping(node, deep=deep)


_ScenarioLoader.add_constructor("tag:yaml.org,2002:int", _ScenarioLoader.construct_yaml_int)
_ScenarioLoader.add_constructor("tag:yaml.org,2002:float",
                                _ScenarioLoader.construct_yaml_float)
# YAML 1.1 (PyYAML) reads ``1e9``, ``2.5e5`` and ``5e-05`` (as ``json.dumps`` writes them)
# as strings: it wants a dot and a signed exponent. Read them as the numbers they are,
# keeping the text for string fields (``name: 1e5`` stays the name "1e5").
_EXP_FLOAT_TAG = "tag:intune,2026:exponent-float"
_ScenarioLoader.add_implicit_resolver(
    _EXP_FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))
_ScenarioLoader.add_constructor(
    _EXP_FLOAT_TAG, lambda loader, node: ExponentFloat(loader.construct_scalar(node)))


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes ``node`` stands for once aliases are expanded (memoised: linear time)."""
    got = memo.get(id(node))
    if got is not None:
        return got
    memo[id(node)] = 1  # a cycle counts once; the constructor handles recursive data
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size = min(size, MAX_YAML_NODES + 1)
    return size


def parse_yaml(text: str, source: str) -> Any:
    """Parse scenario YAML text safely (see :class:`_ScenarioLoader`); :class:`ScenarioError`."""
    loader = None
    try:
        loader = _ScenarioLoader(text)  # the reader checks characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ScenarioError(f"{source}: YAML expands to over {MAX_YAML_NODES:,} values "
                                f"(aliases); expected a scenario of a few hundred")
        return loader.construct_document(node)
    except ScenarioError:  # already names the source (a ValueError: keep it out of below)
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ScenarioError(f"{source}:{where} invalid YAML: {echo(problem, 160)}") from None
    except (ValueError, TypeError, OverflowError, ArithmeticError) as err:
        # a value the safe constructors reject without a mark (!!float abc, 2001-13-45)
        raise ScenarioError(f"{source}: invalid YAML value: {echo(str(err), 160)}") from None
    except RecursionError:  # defence in depth: the depth cap should come first
        raise ScenarioError(f"{source}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path) -> Any:
    """Read (bounded: regular file, 1 MB, strict UTF-8) and parse a scenario YAML file.

    Every fault is a :class:`ScenarioError`: unreadable file, FIFO or device, too large,
    not UTF-8, invalid YAML, nested too deeply, duplicate keys, an absurdly long integer.
    """
    try:
        text = read_text_limited(path, what="scenario file")
    except InputFileError as err:
        raise ScenarioError(str(err)) from None
    return parse_yaml(text, echo(str(path), 200))


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
        try:
            exists = path.exists()
        except (OSError, ValueError):  # a NUL byte, a name too long
            exists = False
        if not exists:
            raise ScenarioError(
                f"{echo(text)}: no such scenario file or built-in name; built-ins: "
                f"{', '.join(builtin_scenarios())}"
            )
    return scenario_from_dict(read_yaml(path), source=echo(str(path), 200))


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out
