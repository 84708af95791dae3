"""A real DLRM-style input pipeline whose stages run in pools that resize while it runs.

Stages, in order (the same as the simulator's)::

    read -> batch -> shuffle -> transform -> gpu_load -> consumer ("the GPU")

- ``read``: one request reads one Parquet row group (``batch_size`` samples) of a shard,
  after an optional per-request latency that emulates remote storage.
- ``batch``: collates the columnar record batch into row-major tensors (dense features
  as float32 with NaN for missing values, categorical ids as int64, missing as 0).
- ``shuffle``: each worker keeps a shuffle buffer of ``shuffle_buffer`` samples and emits
  a random batch of what it holds for each batch it takes in.
- ``transform``: ``log1p`` of the clipped dense features, ``transform_rounds`` rounds of a
  64-bit hash mix on the categorical ids, then modulo the embedding table size.
- ``gpu_load``: packs each batch into a preallocated staging tensor from a fixed pool
  (the pinned host buffers of a real loader).
- the consumer copies each staged batch into a preallocated "device" tensor at most
  ``gpu_rate`` samples/s, then returns the staging tensor to the pool.

Workers are threads by default. Why threads: the read stage waits on storage latency,
which threads overlap for free, far beyond the machine's core count; numpy and Arrow
release the GIL in the heavy array work, so the CPU-bound stages still use both cores of
a small machine; and handing a batch to the next stage costs a pointer, where a process
boundary would pickle and copy every batch (on a 2-core machine that copying costs more
than the transforms). The stateless stages (``read``, ``batch``, ``transform``) can run in
worker processes instead (``process_stages``), for isolation and for transforms that hold
the GIL: each process worker is driven by a proxy thread in this process that owns the
batch in flight, so a killed worker process is replaced and its batch re-sent, and
exactly-once delivery survives it.

Exactly once across resizes: see :mod:`intune_env.live.workers`.

The code, in the order to read it: :mod:`~intune_env.live.config` (stage order,
defaults, :class:`PipelineConfig`), :mod:`~intune_env.live.stages` (items and the
registry of stage functions and hooks), :mod:`~intune_env.live.processes` (worker
processes), :mod:`~intune_env.live.workers` (buffers, workers, pools), then this module
(the pipeline: wiring, the consumer, the memory monitor, counters, shutdown).

Memory: a monitor thread samples the RSS of the process tree (psutil) every
``monitor_interval_s``; above ``memory_limit_bytes`` the pipeline halts at once (the
equivalent of an out-of-memory crash, caught before the machine runs out).
"""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from intune_env.live.config import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_QUEUE_BATCHES,
    MAX_RESPAWNS_PER_BATCH,
    N_STAGES,
    PROCESS_CAPABLE,
    STAGES,
    PipelineConfig,
    PipelineError,
    staging_slots,
)
from intune_env.live.data import Dataset
from intune_env.live.stages import (
    STAGE_FUNCS,
    STAGE_HOOKS,
    Batch,
    Halted,
    ReadRequest,
    StagingSlot,
    batch_fn,
    read_fn,
    reference_transform,
    register_stage,
    salts,
    transform_fn,
)
from intune_env.live.workers import END, Buffer, Pool, RequestSource

# Re-exported: the names callers imported from here before the split.
__all__ = [
    "DEFAULT_MAX_WORKERS", "DEFAULT_QUEUE_BATCHES", "MAX_RESPAWNS_PER_BATCH", "N_STAGES",
    "PROCESS_CAPABLE", "STAGES", "STAGE_FUNCS", "STAGE_HOOKS", "Batch", "Counters",
    "Delivery", "LivePipeline", "PipelineConfig", "PipelineError", "ReadRequest",
    "StagingSlot", "batch_fn", "read_fn", "reference_transform", "register_stage", "salts",
    "transform_fn", "tree_rss",
]

# --------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counters:
    """Cumulative measurements since start; diff two of them for an interval."""

    time_s: float
    processed: tuple[int, ...]
    busy_s: tuple[float, ...]
    out_samples: tuple[int, ...]
    out_bytes: tuple[int, ...]
    delivered: int
    workers: tuple[int, ...]
    buffer_levels: tuple[int, ...]
    buffer_capacities: tuple[int, ...]
    memory_bytes: int
    peak_memory_bytes: int


@dataclass
class Delivery:
    """What the consumer received: count and order-independent checksums."""

    count: int = 0
    id_sum: int = 0
    id_square_sum: int = 0
    cat_sum: int = 0
    ids: list[np.ndarray] = field(default_factory=list)


_LIVE: weakref.WeakSet[LivePipeline] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Interpreter exit (also after Ctrl-C): stop every pipeline and its processes."""
    for p in list(_LIVE):
        with contextlib.suppress(Exception):
            p.close()


def tree_rss(proc: psutil.Process | None = None) -> int:
    """RSS in bytes of ``proc`` (default: this process) and all its descendants."""
    proc = proc or psutil.Process()
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        procs = [proc]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------
class LivePipeline:
    """The running pipeline. Threads start in the constructor; call :meth:`close`.

    Args:
        dataset: the generated Parquet shards (its row group size is the batch size).
        config: see :class:`PipelineConfig`.
        allocation: initial workers per stage, 1..max_workers each.
    """

    def __init__(self, dataset: Dataset, config: PipelineConfig,
                 allocation: Sequence[int]) -> None:
        self.dataset = dataset
        self.config = config
        self.batch_size = dataset.spec.row_group_size
        self.stage_params: dict[str, Any] = {
            "read_latency_s": config.read_latency_ms / 1000.0,
            "transform_rounds": config.transform_rounds,
            "table_size": config.table_size,
            "salts": salts(),
        }
        self._check_allocation(allocation)
        self._halt = threading.Event()
        self._closed = False
        self._error: tuple[str, str] | None = None
        self._err_lock = threading.Lock()
        self.oom = False
        self._processes: list[Any] = []
        self._proc_lock = threading.Lock()
        self.respawns = [0] * N_STAGES
        self.t0 = time.perf_counter()

        self.source = RequestSource(dataset, config.epochs, config.seed)
        self.buffers = [Buffer(c) for c in config.queue_batches]
        # Staging slots: enough for a full gpu_load buffer, every loader and the consumer.
        n_slots = staging_slots(config)
        self._slots: deque[StagingSlot] = deque(StagingSlot(self.batch_size)
                                                for _ in range(n_slots))
        self._slot_cond = threading.Condition()
        self.device = StagingSlot(self.batch_size)  # stands in for the GPU-side tensor
        self.delivery = Delivery()
        self._delivered = 0
        self._del_lock = threading.Lock()
        self.finished = threading.Event()

        self.pools: list[Pool] = []
        for i, name in enumerate(STAGES):
            inbuf = self.source if i == 0 else self.buffers[i - 1]
            kind = "process" if name in config.process_stages else "thread"
            pool = Pool(self, i, inbuf, self.buffers[i], kind)
            self.pools.append(pool)

        self._proc = psutil.Process()
        self._mem = tree_rss(self._proc)
        self._peak = self._mem
        _LIVE.add(self)
        try:
            for pool, k in zip(self.pools, allocation, strict=True):
                pool.resize(int(k))
            self._consumer = threading.Thread(target=self._consume, name="intune-gpu",
                                              daemon=True)
            self._consumer.start()
            self._monitor = threading.Thread(target=self._watch_memory, name="intune-mem",
                                             daemon=True)
            self._monitor.start()
        except BaseException:
            self.close()
            raise

    # --- control -------------------------------------------------------------------------
    def _check_allocation(self, allocation: Sequence[int]) -> None:
        if len(allocation) != N_STAGES:
            raise ValueError(f"allocation needs {N_STAGES} values ({', '.join(STAGES)}), "
                             f"got {list(allocation)}")
        for name, k, hi in zip(STAGES, allocation, self.config.max_workers, strict=True):
            if not 1 <= int(k) <= hi:
                raise ValueError(f"allocation for stage {name!r} is {k}; expected 1..{hi}")

    @property
    def allocation(self) -> list[int]:
        """Workers per stage, as last set (retiring workers excluded)."""
        return [p.target for p in self.pools]

    def set_allocation(self, allocation: Sequence[int]) -> None:
        """Grow or shrink each pool to ``allocation`` (without losing a sample)."""
        if self._closed:  # workers started now would outlive close(), never joined
            raise PipelineError("live pipeline is closed")
        self.check()
        self._check_allocation(allocation)
        for pool, k in zip(self.pools, allocation, strict=True):
            if pool.target != int(k):
                pool.resize(int(k))

    def resize(self, stage: int | str, workers: int) -> None:
        """Set one stage's pool size."""
        i = STAGES.index(stage) if isinstance(stage, str) else int(stage)
        alloc = self.allocation
        alloc[i] = workers
        self.set_allocation(alloc)

    @property
    def halted(self) -> bool:
        return self._halt.is_set()

    def sleep(self, seconds: float) -> bool:
        """Let the pipeline run for ``seconds``, returning early (True) if it halts."""
        return self._halt.wait(seconds)

    def halt(self) -> None:
        """Stop all work at once (workers abandon what they hold)."""
        self._halt.set()
        for b in self.buffers:
            b.wake()
        with self._slot_cond:
            self._slot_cond.notify_all()

    def fail(self, stage: str, err: BaseException) -> None:
        if isinstance(err, Halted) and self.halted:
            return
        with self._err_lock:
            if self._error is None:
                msg = str(err) if isinstance(err, PipelineError) else \
                    f"{type(err).__name__}: {err}"
                self._error = (stage, msg)
        self.halt()

    @property
    def error(self) -> str | None:
        """The first worker failure, as ``"stage: message"``, if any."""
        return None if self._error is None else f"{self._error[0]}: {self._error[1]}"

    def check(self) -> None:
        """Raise :class:`PipelineError` if a worker failed."""
        if self._error is not None:
            raise PipelineError(f"live pipeline failed in stage {self.error}")

    def register_process(self, proc: subprocess.Popen) -> None:
        with self._proc_lock:
            self._processes = [p for p in self._processes if p.poll() is None]
            self._processes.append(proc)

    def count_respawn(self, stage: int) -> None:
        self.respawns[stage] += 1

    def worker_pids(self) -> list[int]:
        """Process ids of the live worker processes."""
        with self._proc_lock:
            return [p.pid for p in self._processes if p.poll() is None]

    # --- gpu side ------------------------------------------------------------------------
    def acquire_slot(self) -> StagingSlot | None:
        with self._slot_cond:
            while not self._slots:
                if self.halted:
                    return None
                self._slot_cond.wait(0.1)
            return self._slots.popleft()

    def _release_slot(self, slot: StagingSlot) -> None:
        with self._slot_cond:
            self._slots.append(slot)
            self._slot_cond.notify()

    def _consume(self) -> None:
        rate = self.config.gpu_rate
        buf = self.buffers[-1]
        next_t = time.perf_counter()
        burst = 0.02  # seconds of credit an idle GPU may catch up with
        dev = self.device
        d = self.delivery
        try:
            while not self.halted:
                slot = buf.get(lambda: self.halted)
                if slot is None:
                    return
                if slot is END:
                    self.finished.set()
                    return
                n = slot.n
                now = time.perf_counter()
                if next_t > now and self._halt.wait(next_t - now):
                    return
                next_t = max(next_t, now - burst) + n / rate
                # The "host to device" copy into the preallocated tensor.
                dev.ids[:n] = slot.ids[:n]
                dev.label[:n] = slot.label[:n]
                dev.dense[:n] = slot.dense[:n]
                dev.cat[:n] = slot.cat[:n]
                self._release_slot(slot)
                ids = dev.ids[:n]
                d.count += n
                d.id_sum += int(ids.sum())
                d.id_square_sum += int(np.square(ids, dtype=np.int64).sum())
                d.cat_sum += int(dev.cat[:n].sum(dtype=np.int64))
                if self.config.record_ids:
                    d.ids.append(ids.copy())
                with self._del_lock:
                    self._delivered += n
        except BaseException as err:
            self.fail("gpu", err)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """With finite ``epochs``: wait until every sample was delivered (True) or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished.is_set():
            self.check()
            if self.halted:
                return False
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return False
            self.finished.wait(left)
        return True

    # --- memory ----------------------------------------------------------------------------
    def _watch_memory(self) -> None:
        limit = self.config.memory_limit_bytes
        while not self._halt.wait(self.config.monitor_interval_s):
            try:
                rss = tree_rss(self._proc)
            except Exception:  # psutil can race with exiting children
                continue
            self._mem = rss
            self._peak = max(self._peak, rss)
            if limit is not None and rss > limit:
                self.oom = True
                self.halt()
                for b in self.buffers:  # free the buffered batches, like the OOM killer would
                    b.clear()
                return

    # --- measurements ------------------------------------------------------------------
    def counters(self, fresh_memory: bool = True) -> Counters:
        """Cumulative counters; ``peak_memory_bytes`` is the peak since the previous call."""
        if fresh_memory and not self._closed:
            with contextlib.suppress(Exception):
                self._mem = tree_rss(self._proc)
        # after the (slow) memory walk, so the busy times below are read at about ``now``
        now = time.perf_counter()
        peak = max(self._peak, self._mem)
        self._peak = self._mem
        with self._del_lock:
            delivered = self._delivered
        return Counters(
            time_s=now - self.t0,
            processed=tuple(p.processed for p in self.pools),
            busy_s=tuple(p.busy_total(now) for p in self.pools),
            out_samples=tuple(p.out_samples for p in self.pools),
            out_bytes=tuple(p.out_bytes for p in self.pools),
            delivered=delivered,
            workers=tuple(p.target for p in self.pools),
            buffer_levels=tuple(b.samples for b in self.buffers),
            buffer_capacities=tuple(c * self.batch_size for c in self.config.queue_batches),
            memory_bytes=self._mem,
            peak_memory_bytes=peak,
        )

    # --- shutdown ----------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker thread and process. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.halt()
        deadline = time.monotonic() + timeout
        threads = [t for p in self.pools for t in p.threads()]
        threads += [t for t in (getattr(self, "_consumer", None),
                                getattr(self, "_monitor", None)) if t is not None]
        for t in threads:
            if t is not threading.current_thread() and t.is_alive():
                t.join(max(0.05, deadline - time.monotonic()))
        with self._proc_lock:
            procs = list(self._processes)
        for p in procs:  # proxies stop theirs; this catches any a stuck proxy left
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5.0)
        for b in self.buffers:
            b.clear()
        _LIVE.discard(self)

    def __enter__(self) -> LivePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the contract
        with contextlib.suppress(Exception):
            if not self._closed:
                self.close(timeout=1.0)
