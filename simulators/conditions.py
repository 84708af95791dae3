"""The conditions a pipeline runs under, and their tabulated (compiled) form.

Conditions change only at scheduled events. Everything derived from them (stage tables,
the oracle) is cached per distinct :class:`Conditions`, so ten thousand copies of an
env share one computation and a step never recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from simulators.scenario import GIB, EventSpec, Scenario, StageSpec
from simulators.stages import StageTables, stage_model_class


@dataclass(frozen=True)
class Conditions:
    """Machine and stage parameters in force at some simulated time (hashable)."""

    cpus: int
    memory_capacity_bytes: int
    base_memory_bytes: int
    cotenant_memory_bytes: int
    gpu_rate: float
    oversubscription_overhead: float
    stages: tuple[StageSpec, ...]
    rate_factors: tuple[float, ...]
    bandwidth_caps: tuple[float | None, ...]

    @property
    def fixed_memory_bytes(self) -> int:
        """Memory used outside the pipeline's stages."""
        return self.base_memory_bytes + self.cotenant_memory_bytes

    @classmethod
    def initial(cls, scenario: Scenario) -> Conditions:
        m = scenario.machine
        return cls(
            cpus=m.cpus,
            memory_capacity_bytes=int(m.memory_gib * GIB),
            base_memory_bytes=int(m.base_memory_gib * GIB),
            cotenant_memory_bytes=0,
            gpu_rate=float(m.gpu_rate),
            oversubscription_overhead=m.oversubscription_overhead,
            stages=tuple(scenario.stages),
            rate_factors=(1.0,) * len(scenario.stages),
            bandwidth_caps=tuple(s.bandwidth_cap for s in scenario.stages),
        )

    def apply(self, event: EventSpec) -> Conditions:
        """The conditions after ``event``."""
        changes: dict[str, object] = {}
        if event.cpus is not None:
            changes["cpus"] = event.cpus
        if event.memory_gib is not None:
            changes["memory_capacity_bytes"] = int(event.memory_gib * GIB)
        if event.cotenant_memory_gib is not None:
            changes["cotenant_memory_bytes"] = int(event.cotenant_memory_gib * GIB)
        if event.stage is not None:
            i = [s.name for s in self.stages].index(event.stage)
            if event.rate_per_cpu_factor is not None:
                f = list(self.rate_factors)
                f[i] = event.rate_per_cpu_factor
                changes["rate_factors"] = tuple(f)
            if event.bandwidth_cap is not None:
                b = list(self.bandwidth_caps)
                b[i] = event.bandwidth_cap
                changes["bandwidth_caps"] = tuple(b)
        return replace(self, **changes)  # type: ignore[arg-type]


class Compiled:
    """Per-stage tables for one :class:`Conditions`, as lists (fast scalar lookup) and arrays.

    ``capacity[i][k]`` samples/s of stage ``i`` with ``k`` CPUs; ``workers[i][k]`` bytes of
    its workers; ``buffers[i][k]`` its output buffer size in samples; ``worst_memory[i][k]``
    workers + full buffer + state. The padded arrays (``*_array``, shape
    ``(n_stages, max_k + 1)``) serve batched simulation.
    """

    def __init__(self, cond: Conditions) -> None:
        tables: list[StageTables] = []
        for spec, factor, cap in zip(cond.stages, cond.rate_factors, cond.bandwidth_caps,
                                     strict=True):
            model = stage_model_class(spec.kind)(spec, rate_factor=factor, bandwidth_cap=cap)
            tables.append(model.tables())
        self.tables = tables
        self.max_cpus = [s.max_cpus for s in cond.stages]
        self.capacity = [t.capacity.tolist() for t in tables]
        self.workers = [t.workers.tolist() for t in tables]
        self.buffers = [t.buffers.tolist() for t in tables]
        self.worst_memory = [t.memory.tolist() for t in tables]
        self.element_bytes = [t.element_bytes for t in tables]
        self.state_bytes = [t.state_bytes for t in tables]
        width = max(self.max_cpus) + 1
        n = len(tables)
        self.capacity_array = np.zeros((n, width))
        self.workers_array = np.zeros((n, width), dtype=np.int64)
        self.buffers_array = np.ones((n, width), dtype=np.int64)
        for i, t in enumerate(tables):
            k = len(t.capacity)
            self.capacity_array[i, :k] = t.capacity
            self.workers_array[i, :k] = t.workers
            self.buffers_array[i, :k] = t.buffers
        self.gpu_cap_per_s = cond.gpu_rate


@lru_cache(maxsize=1024)
def compile_conditions(cond: Conditions) -> Compiled:
    """Tabulate ``cond`` once; cached, shared by every env in the process."""
    return Compiled(cond)
