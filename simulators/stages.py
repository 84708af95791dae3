"""Stage models: how a stage's throughput and memory depend on the CPUs it holds.

The simulator never calls a stage model inside its time loop. When conditions change
(start, or an event) it tabulates each model once for ``k = 0 .. max_cpus`` CPUs, so a
model may be as slow or as elaborate as you like.

Adding a kind of stage: subclass :class:`StageModel`, give it a ``kind`` name and
register it::

    from simulators import StageModel, register_stage_model

    @register_stage_model
    class Amdahl(StageModel):
        kind = "amdahl"
        param_names = ("serial_fraction",)

        def capacity(self, cpus: int) -> float:
            s = self.params["serial_fraction"]
            return self.rate_per_cpu / (s + (1 - s) / cpus)

then write ``kind: amdahl`` and ``params: {serial_fraction: 0.1}`` in a scenario's
stage. The env needs no change. See ``examples/custom_stage_model.py``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from simulators.fileio import echo
from simulators.scenario import KIB, MIB, StageSpec

_REGISTRY: dict[str, type[StageModel]] = {}


class StageModel:
    """Base class of stage models. Override :meth:`capacity`, optionally the memory methods.

    Attributes set from the scenario's stage (after events are applied):
    ``spec`` (the :class:`~simulators.scenario.StageSpec`), ``rate_per_cpu`` (already
    multiplied by any event factor), ``bandwidth_cap`` and ``params``.
    """

    kind: ClassVar[str] = ""
    #: Names of the parameters this model needs in the stage's ``params`` mapping.
    param_names: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`capacity` reads ``spec.contention``; a scenario giving contention to
    #: a kind that ignores it is refused rather than silently run linear.
    uses_contention: ClassVar[bool] = False

    def __init__(self, spec: StageSpec, rate_factor: float = 1.0,
                 bandwidth_cap: float | None = None) -> None:
        self.spec = spec
        self.rate_per_cpu = spec.rate_per_cpu * rate_factor
        self.bandwidth_cap = bandwidth_cap if bandwidth_cap is not None else spec.bandwidth_cap
        self.params = dict(spec.params)

    @classmethod
    def check_params(cls, params: dict[str, float]) -> None:
        """Raise ``ValueError`` naming what is missing or unknown in ``params``."""
        missing = [p for p in cls.param_names if p not in params]
        unknown = [p for p in params if p not in cls.param_names]
        if missing:
            raise ValueError(f"kind {cls.kind!r} needs params: {', '.join(missing)}")
        if unknown:
            raise ValueError(
                f"kind {cls.kind!r} has no params {', '.join(unknown)}; "
                f"expected {', '.join(cls.param_names) or 'none'}"
            )

    # --- what a subclass defines -------------------------------------------------------
    def capacity(self, cpus: int) -> float:
        """Samples/s the stage processes with ``cpus`` dedicated CPUs (``cpus >= 1``)."""
        raise NotImplementedError

    def worker_memory_bytes(self, cpus: int) -> int:
        """Memory of the stage's workers (interpreters, copies of lookup tables)."""
        return int(cpus * self.spec.worker_memory_mib * MIB)

    def buffer_capacity(self, cpus: int) -> int:
        """Samples the stage's output buffer holds (prefetch grows with workers)."""
        return self.spec.buffer + self.spec.buffer_per_cpu * cpus

    def element_bytes(self) -> int:
        """Bytes of one buffered sample."""
        return max(1, int(self.spec.element_kib * KIB))

    def state_bytes(self) -> int:
        """Fixed memory of the stage (a shuffle buffer, a cache)."""
        return int(self.spec.state_mib * MIB)

    # --- used by the simulator -------------------------------------------------------
    def _capped(self, cpus: int) -> float:
        rate = float(self.capacity(cpus))
        if self.bandwidth_cap is not None:
            rate = min(rate, float(self.bandwidth_cap))
        return rate

    def tables(self) -> StageTables:
        """Tabulate capacity and worst-case memory for ``0 .. max_cpus`` CPUs."""
        n = self.spec.max_cpus
        capacity = np.zeros(n + 1)
        memory = np.zeros(n + 1, dtype=np.int64)
        workers = np.zeros(n + 1, dtype=np.int64)
        buffers = np.zeros(n + 1, dtype=np.int64)
        elem = self.element_bytes()
        state = self.state_bytes()
        for k in range(1, n + 1):
            try:
                capacity[k] = self._capped(k)
                buffers[k] = self.buffer_capacity(k)
                workers[k] = self.worker_memory_bytes(k)
            except Exception as err:  # a plugin's model: its bug is a one-line fault
                raise ValueError(
                    f"stage {self.spec.name!r} (kind {self.kind!r}) failed at {k} CPUs: "
                    f"{type(err).__name__}: {err}") from None
            memory[k] = workers[k] + buffers[k] * elem + state
        if not np.all(np.isfinite(capacity)) or np.any(capacity[1:] < 0):
            raise ValueError(f"stage {self.spec.name!r}: capacity must be finite and >= 0")
        if np.any(np.diff(memory[1:]) < 0):
            # The oracle relies on it: fewer CPUs never need more memory.
            raise ValueError(f"stage {self.spec.name!r}: memory must not fall as CPUs grow")
        return StageTables(capacity=capacity, memory=memory, workers=workers, buffers=buffers,
                           element_bytes=elem, state_bytes=state)


class StageTables:
    """A stage model tabulated by CPU count (index ``k`` = ``k`` CPUs)."""

    __slots__ = ("buffers", "capacity", "element_bytes", "memory", "state_bytes", "workers")

    def __init__(self, capacity: np.ndarray, memory: np.ndarray, workers: np.ndarray,
                 buffers: np.ndarray, element_bytes: int, state_bytes: int) -> None:
        self.capacity = capacity  # samples/s
        self.memory = memory  # worst case: workers + full buffer + state, bytes
        self.workers = workers  # worker memory alone, bytes
        self.buffers = buffers  # output buffer capacity, samples
        self.element_bytes = element_bytes
        self.state_bytes = state_bytes


_BUILTIN_KINDS: frozenset[str] = frozenset()  # set once the built-ins are registered


def register_stage_model(cls: type[StageModel]) -> type[StageModel]:
    """Class decorator: make ``cls`` available as ``kind: cls.kind`` in scenarios."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a non-empty 'kind' class attribute")
    if cls.kind in _BUILTIN_KINDS and _REGISTRY[cls.kind] is not cls:
        # replacing a built-in would silently change every built-in scenario
        raise ValueError(f"{cls.__name__}: stage kind {cls.kind!r} is built in; give the "
                         f"model another 'kind'")
    _REGISTRY[cls.kind] = cls
    return cls


def stage_model_class(kind: str) -> type[StageModel]:
    """The registered class for ``kind``; ``KeyError`` lists the known kinds."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        # Never imported because a file names it: a scenario file is data.
        raise KeyError(
            f"unknown stage kind {echo(repr(kind))}; registered: {', '.join(sorted(_REGISTRY))}; "
            f"load the module that registers it with `intune --plugin FILE.py` or an "
            f"`intune.plugins` entry point"
        ) from None


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


@register_stage_model
class LinearStage(StageModel):
    """Linear in CPUs up to ``max_cpus``, bent by ``contention``, capped by bandwidth.

    ``capacity(k) = rate_per_cpu * k / (1 + contention * (k - 1))`` (contention 0 is
    linear; it is the contention term of Gunther's universal scalability law).
    """

    kind = "linear"
    uses_contention = True

    def capacity(self, cpus: int) -> float:
        return self.rate_per_cpu * cpus / (1.0 + self.spec.contention * (cpus - 1))


#: Kinds the package defines: a plugin may add kinds, not replace these.
_BUILTIN_KINDS = frozenset(_REGISTRY)
