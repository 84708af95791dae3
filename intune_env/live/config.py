"""The live backend's one place for defaults, the stage order and the pipeline's knobs.

Everything that runs the live pipeline (``InTuneLive-v0``, ``intune calibrate``,
``intune live-sweep``, ``benchmarks/live_tuning.py``) reads its defaults from here. This
module imports nothing heavy (no pyarrow), so a command line can read it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

STAGES: tuple[str, ...] = ("read", "batch", "shuffle", "transform", "gpu_load")
N_STAGES = len(STAGES)
#: Stages without state between batches: the only ones that may run in processes.
PROCESS_CAPABLE = frozenset({"read", "batch", "transform"})

# --- defaults of every live entry point --------------------------------------------------
#: Samples/s the consumer ("the GPU") takes at most.
GPU_RATE = 250_000.0
#: Wall seconds the pipeline runs per env step / per measured interval.
CONTROL_INTERVAL_S = 1.0
#: Emulated remote-storage latency per read request (the env, calibration, sweeps).
READ_LATENCY_MS = 20.0
#: Worker budget of calibration and sweeps (the env's default depends on the machine).
WORKER_BUDGET = 16
#: Enforced RSS budget of the process tree, MiB (the env caps it at half the machine).
MEMORY_BUDGET_MIB = 2048.0
DEFAULT_MAX_WORKERS: tuple[int, ...] = (16, 4, 4, 4, 4)
DEFAULT_QUEUE_BATCHES: tuple[int, ...] = (8, 8, 8, 8, 4)
SHUFFLE_BUFFER = 2048
TRANSFORM_ROUNDS = 4
TABLE_SIZE = 1 << 20
# the generated dataset: Criteo's 13 dense and 26 categorical features
N_DENSE = 13
N_CAT = 26
N_SHARDS = 8
ROWS_PER_SHARD = 32768
BATCH_SIZE = 512

#: A poison batch that kills this many fresh worker processes in a row fails the pipeline.
MAX_RESPAWNS_PER_BATCH = 3


# --- the memory model --------------------------------------------------------------------
#: Bytes of one sample in row-major form (ids int64, label int8, dense float32,
#: categorical int64): what batch, shuffle and transform pass on and a shuffle worker holds.
SAMPLE_BYTES = 8 + 1 + 4 * N_DENSE + 8 * N_CAT
#: Bytes of one sample in a staging slot (ids int64, label, dense float32, categorical int32).
STAGING_SAMPLE_BYTES = 8 + 4 + 4 * N_DENSE + 4 * N_CAT
#: Least RSS of one worker process: a Python interpreter with numpy (~70 MiB measured).
PROCESS_WORKER_BYTES = 32 * 2**20


def staging_slots(config: PipelineConfig) -> int:
    """Staging slots the pipeline preallocates: a full gpu_load buffer, every loader and
    the consumer."""
    return config.queue_batches[-1] + config.max_workers[-1] + 1


@dataclass(frozen=True)
class MemoryNeed:
    """What a running pipeline holds, in bytes, by component (see :func:`memory_need`)."""

    base: int
    workers: int
    shuffle: int
    buffers: int
    staging: int

    @property
    def total(self) -> int:
        return self.base + self.workers + self.shuffle + self.buffers + self.staging

    def describe(self) -> str:
        """``"base 120 MiB, workers 64 MiB, ..."``: every component, in MiB."""
        return ", ".join(f"{name} {getattr(self, name) / 2**20:.0f} MiB" for name in
                         ("base", "workers", "shuffle", "buffers", "staging"))


def memory_need(config: PipelineConfig, batch_size: int, allocation: Sequence[int],
                base_bytes: int) -> MemoryNeed:
    """The memory the live pipeline holds at ``allocation`` once warm, by component.

    ``base_bytes`` is what the process tree uses without the pipeline (its RSS now); each
    worker holds a batch in flight, and a worker process is an interpreter of its own
    (:data:`PROCESS_WORKER_BYTES`); each shuffle worker holds ``shuffle_buffer``
    samples; the stage buffers are full (``queue_batches`` batches each; gpu_load's holds
    staging slots); the staging slots and the device tensor are preallocated.
    """
    batch = batch_size * SAMPLE_BYTES
    workers = sum(int(k) * (batch + (PROCESS_WORKER_BYTES if name in config.process_stages
                                     else 0))
                  for name, k in zip(STAGES, allocation, strict=True))
    shuffle = int(allocation[STAGES.index("shuffle")]) * config.shuffle_buffer * SAMPLE_BYTES
    buffers = sum(config.queue_batches[:-1]) * batch
    staging = (staging_slots(config) + 1) * batch_size * STAGING_SAMPLE_BYTES
    return MemoryNeed(int(base_bytes), workers, shuffle, buffers, staging)


class PipelineError(RuntimeError):
    """A worker failed (an exception, or a worker process that keeps dying)."""


def finite(value: float, name: str, low: float = 0.0, strict: bool = True) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` unless finite and above
    ``low`` (``>= low`` when not ``strict``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= low if strict else v < low):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {op} {low:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the live pipeline (the dataset fixes ``batch_size``: one row group).

    Attributes:
        read_latency_ms: sleep per read request, emulating remote storage.
        gpu_rate: samples/s the consumer takes at most.
        queue_batches: capacity of each stage's output buffer, in batches.
        shuffle_buffer: samples each shuffle worker holds.
        transform_rounds: rounds of the 64-bit hash mix per categorical value (the
            "feature generation" cost of the transform).
        table_size: embedding table size, the modulus of the categorical ids.
        max_workers: largest pool of each stage.
        process_stages: stages run in worker processes (subset of read/batch/transform).
        epochs: passes over the data; ``None`` loops forever.
        seed: seeds the read order and the shuffle.
        memory_limit_bytes: RSS of the process tree above which the pipeline halts.
        monitor_interval_s: period of the memory monitor.
        record_ids: keep every delivered sample id (for tests; grows without bound).
    """

    read_latency_ms: float = 0.0
    gpu_rate: float = GPU_RATE
    queue_batches: tuple[int, ...] = DEFAULT_QUEUE_BATCHES
    shuffle_buffer: int = SHUFFLE_BUFFER
    transform_rounds: int = TRANSFORM_ROUNDS
    table_size: int = TABLE_SIZE
    max_workers: tuple[int, ...] = DEFAULT_MAX_WORKERS
    process_stages: tuple[str, ...] = ()
    epochs: int | None = None
    seed: int = 0
    memory_limit_bytes: int | None = None
    monitor_interval_s: float = 0.05
    record_ids: bool = False

    def __post_init__(self) -> None:
        finite(self.read_latency_ms, "read_latency_ms", strict=False)
        finite(self.gpu_rate, "gpu_rate")
        for label, seq in (("queue_batches", self.queue_batches),
                           ("max_workers", self.max_workers)):
            if len(seq) != N_STAGES or any(int(v) < 1 for v in seq):
                raise ValueError(f"{label} needs {N_STAGES} values >= 1 (one per stage), "
                                 f"got {list(seq)}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.transform_rounds < 0:
            raise ValueError(f"transform_rounds must be >= 0, got {self.transform_rounds}")
        if not 1 <= self.table_size <= 2**31:
            raise ValueError(f"table_size must be in 1..2**31, got {self.table_size}")
        bad = set(self.process_stages) - PROCESS_CAPABLE
        if bad:
            raise ValueError(f"process_stages may hold only {sorted(PROCESS_CAPABLE)} "
                             f"(stateless stages), got {sorted(bad)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        finite(self.monitor_interval_s, "monitor_interval_s")
