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

Exactly once: a batch is owned by one worker between ``get`` from the stage's input
buffer and ``put`` into its output buffer. Shrinking a pool marks a worker as retiring;
it finishes the batch it holds, hands on what its state holds (the shuffle buffer) and
only then exits. Growing adds a worker that takes from the same input buffer. Nothing is
ever taken back from a buffer, so no sample is dropped or duplicated.

Memory: a monitor thread samples the RSS of the process tree (psutil) every
``monitor_interval_s``; above ``memory_limit_bytes`` the pipeline halts at once (the
equivalent of an out-of-memory crash, caught before the machine runs out).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from intune_env.live.data import (
    CAT_COLUMNS,
    DENSE_COLUMNS,
    ID_COLUMN,
    LABEL_COLUMN,
    N_CAT,
    N_DENSE,
    Dataset,
)

STAGES: tuple[str, ...] = ("read", "batch", "shuffle", "transform", "gpu_load")
N_STAGES = len(STAGES)
#: Stages without state between batches: the only ones that may run in processes.
PROCESS_CAPABLE = frozenset({"read", "batch", "transform"})
DEFAULT_MAX_WORKERS: tuple[int, ...] = (16, 4, 4, 4, 4)
DEFAULT_QUEUE_BATCHES: tuple[int, ...] = (8, 8, 8, 8, 4)
#: A poison batch that kills this many fresh worker processes in a row fails the pipeline.
MAX_RESPAWNS_PER_BATCH = 3

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class PipelineError(RuntimeError):
    """A worker failed (an exception, or a worker process that keeps dying)."""


# --------------------------------------------------------------------------------------
# Configuration and the items that flow between stages
# --------------------------------------------------------------------------------------
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
    gpu_rate: float = 200_000.0
    queue_batches: tuple[int, ...] = DEFAULT_QUEUE_BATCHES
    shuffle_buffer: int = 2048
    transform_rounds: int = 4
    table_size: int = 1 << 20
    max_workers: tuple[int, ...] = DEFAULT_MAX_WORKERS
    process_stages: tuple[str, ...] = ()
    epochs: int | None = None
    seed: int = 0
    memory_limit_bytes: int | None = None
    monitor_interval_s: float = 0.05
    record_ids: bool = False

    def __post_init__(self) -> None:
        if self.read_latency_ms < 0:
            raise ValueError(f"read_latency_ms must be >= 0, got {self.read_latency_ms}")
        if self.gpu_rate <= 0:
            raise ValueError(f"gpu_rate must be > 0, got {self.gpu_rate}")
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
        if self.monitor_interval_s <= 0:
            raise ValueError("monitor_interval_s must be > 0")


@dataclass(frozen=True)
class ReadRequest:
    """Read row group ``group`` of shard ``path``."""

    path: str
    group: int
    rows: int


@dataclass
class Batch:
    """A batch in row-major form (output of batch, shuffle and transform)."""

    ids: np.ndarray  # int64 [n]
    label: np.ndarray  # int8 [n]
    dense: np.ndarray  # float32 [n, 13]
    cat: np.ndarray  # int64 [n, 26] (int32 after transform)

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.label.nbytes + self.dense.nbytes + self.cat.nbytes)


class StagingSlot:
    """A preallocated host tensor set that ``gpu_load`` fills and the consumer drains."""

    __slots__ = ("cat", "dense", "ids", "label", "n")

    def __init__(self, capacity: int) -> None:
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.label = np.zeros(capacity, dtype=np.float32)
        self.dense = np.zeros((capacity, N_DENSE), dtype=np.float32)
        self.cat = np.zeros((capacity, N_CAT), dtype=np.int32)
        self.n = 0

    @property
    def nbytes(self) -> int:
        per = (self.ids.itemsize + self.label.itemsize + N_DENSE * self.dense.itemsize
               + N_CAT * self.cat.itemsize)
        return per * self.n


def _item_size(item: Any) -> tuple[int, int]:
    """(samples, bytes) of an item in a buffer."""
    if isinstance(item, pa.Table):
        return item.num_rows, int(item.nbytes)
    if isinstance(item, Batch | StagingSlot):
        return item.n, item.nbytes
    raise TypeError(f"unexpected item {type(item).__name__}")


# --------------------------------------------------------------------------------------
# Stage work: plain functions of (item, params, cache) so a worker process can run them
# --------------------------------------------------------------------------------------
def read_fn(req: ReadRequest, params: dict[str, Any], cache: dict[str, Any]) -> pa.Table:
    """Read one row group, after the emulated storage latency."""
    latency = params["read_latency_s"]
    if latency > 0:
        time.sleep(latency)
    files = cache.setdefault("files", {})
    pf = files.get(req.path)
    if pf is None:
        pf = files[req.path] = pq.ParquetFile(req.path, memory_map=False)
    return pf.read_row_group(req.group)


def batch_fn(table: pa.Table, params: dict[str, Any], cache: dict[str, Any]) -> Batch:
    """Collate a columnar record batch into row-major tensors."""
    n = table.num_rows
    dense = np.empty((n, N_DENSE), dtype=np.float32)
    for j, name in enumerate(DENSE_COLUMNS):
        # Nullable ints come out as float64 with NaN for the missing values.
        dense[:, j] = table.column(name).to_numpy(zero_copy_only=False)
    cat = np.empty((n, N_CAT), dtype=np.int64)
    for j, name in enumerate(CAT_COLUMNS):
        cat[:, j] = pc.fill_null(table.column(name), 0).to_numpy(zero_copy_only=False)
    ids = table.column(ID_COLUMN).to_numpy().astype(np.int64, copy=False)
    label = table.column(LABEL_COLUMN).to_numpy().astype(np.int8, copy=False)
    return Batch(ids=np.ascontiguousarray(ids), label=np.ascontiguousarray(label),
                 dense=dense, cat=cat)


def transform_fn(b: Batch, params: dict[str, Any], cache: dict[str, Any]) -> Batch:
    """Criteo's standard transform, with a configurable feature-generation cost."""
    dense = np.nan_to_num(b.dense, nan=0.0)
    np.maximum(dense, 0.0, out=dense)
    np.log1p(dense, out=dense)
    h = b.cat.astype(np.uint64)
    h += params["salts"]
    for _ in range(params["transform_rounds"]):  # splitmix64 finaliser
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    cat = (h % np.uint64(params["table_size"])).astype(np.int32)
    return Batch(ids=b.ids, label=b.label, dense=dense, cat=cat)


def reference_transform(table: pa.Table, transform_rounds: int, table_size: int) -> Batch:
    """Batch + transform of a whole table in one go (what tests compare deliveries with)."""
    params = {"transform_rounds": transform_rounds, "table_size": table_size,
              "salts": _salts()}
    return transform_fn(batch_fn(table, {}, {}), params, {})


def _salts() -> np.ndarray:
    return (np.arange(1, N_CAT + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


STAGE_FUNCS: dict[str, Callable[[Any, dict[str, Any], dict[str, Any]], Any]] = {
    "read": read_fn,
    "batch": batch_fn,
    "transform": transform_fn,
}


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies (no orphans on kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the EOF on the socket still ends the worker
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _child_entry(fd: int, parent_pid: int) -> None:
    """Main loop of a worker process: receive an item, send back ("ok", out) or ("err", tb).

    Started as ``python -c`` rather than through ``multiprocessing`` so that it never
    re-imports the user's ``__main__`` (scripts without a main guard keep working).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid)
    conn = Connection(fd)
    try:
        stage, params = conn.recv()
    except (EOFError, OSError):
        return
    fn = STAGE_FUNCS[stage]
    cache: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if msg is None:
            return
        try:
            out = fn(msg, params, cache)
        except BaseException as err:  # report, the parent decides
            reply: tuple[str, Any] = (
                "err", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        else:
            reply = ("ok", out)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# Bare package stubs let the worker import this module without running the package
# __init__ files (which import gymnasium, the simulator...): a worker starts 3x faster.
_CHILD_BOOT = """\
import sys, types
from pathlib import Path
pkg = Path({pkg!r})
for name, path in (("intune_env", pkg), ("intune_env.live", pkg / "live")):
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
from intune_env.live.pipeline import _child_entry
_child_entry({fd}, {ppid})
"""


def _spawn_worker_process(stage: str, params: dict[str, Any]
                          ) -> tuple[subprocess.Popen, Connection]:
    """Start a worker process for ``stage``; return it and our end of its socket."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    code = _CHILD_BOOT.format(pkg=str(Path(__file__).resolve().parents[1]), fd=fd,
                              ppid=os.getpid())
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), env=env,
                                stdin=subprocess.DEVNULL, close_fds=True)
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    try:
        conn.send((stage, params))
    except OSError:
        proc.kill()
        proc.wait()
        conn.close()
        raise
    return proc, conn


# --------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------
_END = object()  # returned by get() once a buffer is closed and empty


def _start_idle(waiter: _Worker | None, t_wait: float | None) -> float | None:
    """Mark ``waiter`` as blocked on a buffer (idle) from now, once per wait."""
    if waiter is None or t_wait is not None:
        return t_wait
    t = time.perf_counter()
    waiter.idle_since = t
    return t


def _end_idle(waiter: _Worker | None, t_wait: float | None) -> None:
    if waiter is not None and t_wait is not None:
        waiter.idle_s += time.perf_counter() - t_wait
        waiter.idle_since = None


class _Buffer:
    """Bounded FIFO of items between two stages, counting samples and bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[Any, int, int]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.samples = 0
        self.nbytes = 0

    def put(self, item: Any, halted: Callable[[], bool], waiter: _Worker | None = None) -> bool:
        """Append ``item``, waiting for room; False only if the pipeline halted."""
        n, nb = _item_size(item)
        with self._cond:
            t_wait = None
            try:
                while len(self._items) >= self.capacity:
                    if halted():
                        return False
                    t_wait = _start_idle(waiter, t_wait)
                    self._cond.wait(0.1)
            finally:
                _end_idle(waiter, t_wait)
            self._items.append((item, n, nb))
            self.samples += n
            self.nbytes += nb
            self._cond.notify_all()
            return True

    def get(self, interrupted: Callable[[], bool], waiter: _Worker | None = None) -> Any:
        """Next item; ``None`` if ``interrupted()``; ``_END`` once closed and empty."""
        with self._cond:
            t_wait = None
            try:
                while True:
                    if interrupted():
                        return None
                    if self._items:
                        item, n, nb = self._items.popleft()
                        self.samples -= n
                        self.nbytes -= nb
                        self._cond.notify_all()
                        return item
                    if self._closed:
                        return _END
                    t_wait = _start_idle(waiter, t_wait)
                    self._cond.wait(0.1)
            finally:
                _end_idle(waiter, t_wait)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self.samples = 0
            self.nbytes = 0
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class _RequestSource:
    """The read stage's input: row-group requests in a seeded order, epoch after epoch."""

    def __init__(self, dataset: Dataset, epochs: int | None, seed: int) -> None:
        spec = dataset.spec
        self._pairs = [(str(p), g) for p in dataset.shards for g in range(spec.groups_per_shard)]
        self._rows = spec.row_group_size
        self._rng = np.random.default_rng([seed, 0x5EED])
        self._epochs = epochs
        self._epoch = 0
        self._order: list[int] = []
        self._lock = threading.Lock()
        self._done = False
        self.issued = 0

    def get(self, interrupted: Callable[[], bool], waiter: _Worker | None = None) -> Any:
        if interrupted():
            return None
        with self._lock:
            if not self._order:
                if self._epochs is not None and self._epoch >= self._epochs:
                    self._done = True
                    return _END
                self._order = self._rng.permutation(len(self._pairs)).tolist()[::-1]
                self._epoch += 1
            path, group = self._pairs[self._order.pop()]
            self.issued += 1
        return ReadRequest(path, group, self._rows)

    def wake(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Workers and pools
# --------------------------------------------------------------------------------------
class _Worker:
    """One worker of a stage: a thread, optionally driving a worker process."""

    def __init__(self, pool: _Pool, serial: int) -> None:
        self.pool = pool
        self.serial = serial
        self.retire = False
        # Busy = alive and not blocked on an empty input or a full output buffer. Waiting
        # for the GIL or a core counts as busy: the stage is then short of CPU.
        self.started = time.perf_counter()
        self.idle_s = 0.0
        self.idle_since: float | None = None
        self.process: subprocess.Popen | None = None  # when the stage runs in processes
        self.conn: Connection | None = None
        self.respawns = 0
        self.thread = threading.Thread(
            target=self._run, name=f"intune-{pool.name}-{serial}", daemon=True
        )

    # --- process workers ---------------------------------------------------------------
    def _spawn(self) -> None:
        pipe = self.pool.pipeline
        self.process, self.conn = _spawn_worker_process(self.pool.name, pipe.stage_params)
        pipe.register_process(self.process)

    def _stop_process(self) -> None:
        proc, conn = self.process, self.conn
        self.process = self.conn = None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        if proc is not None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
        if conn is not None:
            conn.close()

    def _remote(self, item: Any) -> Any:
        """Run the stage function in the worker process; respawn it if it dies."""
        pipe = self.pool.pipeline
        deaths = 0
        while True:
            if self.process is None:
                self._spawn()
            assert self.conn is not None and self.process is not None
            try:
                self.conn.send(item)
                while True:
                    ready = wait([self.conn], timeout=0.1)
                    if pipe.halted:
                        return None
                    if ready:
                        status, out = self.conn.recv()  # EOFError if it died
                        break
                    if self.process.poll() is not None:
                        raise EOFError("worker process died")
            except (EOFError, OSError):
                # The process died holding our batch: replace it and send the batch again.
                self._stop_process()
                deaths += 1
                self.respawns += 1
                pipe.count_respawn(self.pool.index)
                if deaths >= MAX_RESPAWNS_PER_BATCH:
                    raise PipelineError(
                        f"stage {self.pool.name!r}: {deaths} worker processes in a row died "
                        f"on the same batch"
                    ) from None
                continue
            if status == "err":
                raise PipelineError(f"stage {self.pool.name!r} worker process failed: {out}")
            return out

    # --- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        pool = self.pool
        pipe = pool.pipeline
        fn = pool.fn
        cache: dict[str, Any] = {}
        state = pool.new_state(self.serial)
        ended = False
        try:
            while not pipe.halted:
                item = pool.inbuf.get(lambda: self.retire or pipe.halted, self)
                if item is None:
                    break
                if item is _END:
                    ended = True
                    break
                n_in = _item_size(item)[0] if not isinstance(item, ReadRequest) else item.rows
                if pool.kind == "process":
                    out = self._remote(item)
                    if out is None:  # halted while waiting
                        return
                else:
                    out = fn(item, pipe.stage_params, cache)
                outs = pool.post(out, state)
                pool.add_processed(n_in)
                for o in outs:
                    if not pool.emit(o, self):
                        return
            if not pipe.halted:
                for o in pool.flush(state):
                    if not pool.emit(o, self):
                        return
        except BaseException as err:
            pipe.fail(pool.name, err)
        finally:
            if pool.kind == "process":
                self._stop_process()
            pool.worker_exited(self, ended)


class _Pool:
    """The resizable pool of workers of one stage."""

    def __init__(self, pipeline: LivePipeline, index: int, inbuf: Any, outbuf: _Buffer,
                 kind: str) -> None:
        self.pipeline = pipeline
        self.index = index
        self.name = STAGES[index]
        self.inbuf = inbuf
        self.outbuf = outbuf
        self.kind = kind
        self.fn = STAGE_FUNCS.get(self.name)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []  # all live threads, retiring ones included
        self._serials = itertools.count()
        self.input_ended = False
        self.target = 0  # the pool size asked for (live threads may lag behind it)
        self.busy_done = 0.0  # busy worker-seconds of workers that have exited
        self.processed = 0
        self.out_samples = 0
        self.out_bytes = 0

    # --- sizing --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Workers that take new batches (retiring ones excluded)."""
        with self._lock:
            return sum(1 for w in self._workers if not w.retire)

    def resize(self, k: int) -> None:
        with self._lock:
            self.target = k
            active = [w for w in self._workers if not w.retire]
            for _ in range(k - len(active)):
                w = _Worker(self, next(self._serials))
                self._workers.append(w)
                w.thread.start()
            # Retire the newest first: the oldest keep their warm caches.
            for w in active[::-1][: max(0, len(active) - k)]:
                w.retire = True
        self.inbuf.wake()

    def worker_exited(self, worker: _Worker, ended: bool) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
                self.busy_done += _busy_of(worker, time.perf_counter())
            self.input_ended = self.input_ended or ended
            close = self.input_ended and not self._workers
        if close:
            # The input ended and every worker has handed on its state: end the output.
            self.outbuf.close()

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return [w.thread for w in self._workers]

    def processes(self) -> list[subprocess.Popen]:
        with self._lock:
            return [w.process for w in self._workers if w.process is not None]

    # --- accounting --------------------------------------------------------------------
    def add_processed(self, n_in: int) -> None:
        with self._lock:
            self.processed += n_in

    def busy_total(self, now: float) -> float:
        """Worker-seconds busy so far (exited workers and live ones up to ``now``)."""
        with self._lock:
            return self.busy_done + sum(_busy_of(w, now) for w in self._workers)

    def emit(self, item: Any, worker: _Worker | None = None) -> bool:
        n, nb = _item_size(item)
        ok = self.outbuf.put(item, lambda: self.pipeline.halted, worker)
        if ok:
            with self._lock:
                self.out_samples += n
                self.out_bytes += nb
        return ok

    # --- per-stage behaviour -----------------------------------------------------------
    def new_state(self, serial: int) -> dict[str, Any]:
        pipe = self.pipeline
        if self.name == "shuffle":
            return {"rng": np.random.default_rng([pipe.config.seed, self.index, serial]),
                    "held": None}
        return {}

    def post(self, out: Any, state: dict[str, Any]) -> list[Any]:
        """Turn the stage function's result into the items to emit."""
        if self.name == "shuffle":
            return self._shuffle(out, state)
        if self.name == "gpu_load":
            return [self._stage_into_slot(out)]
        return [out]

    def flush(self, state: dict[str, Any]) -> list[Any]:
        """What a leaving worker must still hand on (its shuffle buffer)."""
        if self.name != "shuffle" or state.get("held") is None:
            return []
        held: Batch = state.pop("held")
        state["held"] = None
        perm = state["rng"].permutation(held.n)
        bs = self.pipeline.batch_size
        return [_take(held, perm[i:i + bs]) for i in range(0, held.n, bs)]

    def _shuffle(self, b: Batch, state: dict[str, Any]) -> list[Any]:
        held: Batch | None = state["held"]
        cap = self.pipeline.config.shuffle_buffer
        pool = b if held is None else _concat(held, b)
        if pool.n <= cap:
            state["held"] = pool
            return []
        perm = state["rng"].permutation(pool.n)
        k = pool.n - cap
        state["held"] = _take(pool, perm[k:]) if cap > 0 else None
        return [_take(pool, perm[:k])]

    def _stage_into_slot(self, b: Batch) -> StagingSlot:
        slot = self.pipeline.acquire_slot()
        if slot is None:
            raise _Halted
        n = b.n
        slot.n = n
        slot.ids[:n] = b.ids
        slot.label[:n] = b.label
        slot.dense[:n] = b.dense
        slot.cat[:n] = b.cat
        return slot


def _busy_of(w: _Worker, now: float) -> float:
    since = w.idle_since
    idle = w.idle_s + (now - since if since is not None else 0.0)
    return max(0.0, now - w.started - idle)


class _Halted(Exception):
    """Raised inside a worker when the pipeline halts while it waits for a resource."""


def _identity(item: Any, params: dict[str, Any], cache: dict[str, Any]) -> Any:
    return item


def _concat(a: Batch, b: Batch) -> Batch:
    return Batch(ids=np.concatenate([a.ids, b.ids]), label=np.concatenate([a.label, b.label]),
                 dense=np.concatenate([a.dense, b.dense]), cat=np.concatenate([a.cat, b.cat]))


def _take(b: Batch, idx: np.ndarray) -> Batch:
    return Batch(ids=b.ids[idx], label=b.label[idx], dense=b.dense[idx], cat=b.cat[idx])


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
            "salts": _salts(),
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

        self.source = _RequestSource(dataset, config.epochs, config.seed)
        self.buffers = [_Buffer(c) for c in config.queue_batches]
        # Staging slots: enough for a full gpu_load buffer, every loader and the consumer.
        n_slots = config.queue_batches[-1] + config.max_workers[-1] + 1
        self._slots: deque[StagingSlot] = deque(StagingSlot(self.batch_size)
                                                for _ in range(n_slots))
        self._slot_cond = threading.Condition()
        self.device = StagingSlot(self.batch_size)  # stands in for the GPU-side tensor
        self.delivery = Delivery()
        self._delivered = 0
        self._del_lock = threading.Lock()
        self.finished = threading.Event()

        self.pools: list[_Pool] = []
        for i, name in enumerate(STAGES):
            inbuf = self.source if i == 0 else self.buffers[i - 1]
            kind = "process" if name in config.process_stages else "thread"
            pool = _Pool(self, i, inbuf, self.buffers[i], kind)
            if pool.fn is None:
                pool.fn = _identity
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
        if isinstance(err, _Halted) and self.halted:
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
                if slot is _END:
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

    def memory_bytes(self) -> int:
        """Latest RSS of the process tree (sampled by the monitor)."""
        return self._mem

    # --- measurements ------------------------------------------------------------------
    def counters(self, fresh_memory: bool = True) -> Counters:
        """Cumulative counters; ``peak_memory_bytes`` is the peak since the previous call."""
        now = time.perf_counter()
        if fresh_memory and not self._closed:
            with contextlib.suppress(Exception):
                self._mem = tree_rss(self._proc)
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
