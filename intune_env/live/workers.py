"""Buffers between stages and the resizable worker pools of the live pipeline.

Exactly once: a batch is owned by one worker between ``get`` from the stage's input
buffer and ``put`` into its output buffer. Shrinking a pool marks a worker as retiring;
it finishes the batch it holds, hands on what its state holds (the shuffle buffer,
through the stage's hooks) and only then exits. Growing adds a worker that takes from
the same input buffer. Nothing is ever taken back from a buffer, so no sample is dropped
or duplicated. A worker of a process stage drives a worker process (see
:mod:`intune_env.live.processes`) and re-sends its batch if that process dies.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import numpy as np

from intune_env.live import stages
from intune_env.live.config import MAX_RESPAWNS_PER_BATCH, STAGES, PipelineError
from intune_env.live.data import Dataset
from intune_env.live.processes import spawn_worker_process
from intune_env.live.stages import ReadRequest, item_size

if TYPE_CHECKING:
    from intune_env.live.pipeline import LivePipeline


# --------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------
END = object()  # returned by get() once a buffer is closed and empty


def _start_idle(waiter: Worker | None, t_wait: float | None) -> float | None:
    """Mark ``waiter`` as blocked on a buffer (idle) from now, once per wait."""
    if waiter is None or t_wait is not None:
        return t_wait
    t = time.perf_counter()
    waiter.idle = (waiter.idle[0], t)
    return t


def _end_idle(waiter: Worker | None, t_wait: float | None) -> None:
    if waiter is not None and t_wait is not None:
        # One assignment (atomic for a reading thread): updating the total and clearing
        # the start separately let a reader count a wait twice, so busy time went down.
        waiter.idle = (waiter.idle[0] + time.perf_counter() - t_wait, None)


class Buffer:
    """Bounded FIFO of items between two stages, counting samples and bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[Any, int, int]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.samples = 0
        self.nbytes = 0

    def put(self, item: Any, halted: Callable[[], bool], waiter: Worker | None = None) -> bool:
        """Append ``item``, waiting for room; False only if the pipeline halted."""
        n, nb = item_size(item)
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

    def get(self, interrupted: Callable[[], bool], waiter: Worker | None = None) -> Any:
        """Next item; ``None`` if ``interrupted()``; ``END`` once closed and empty."""
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
                        return END
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


class RequestSource:
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

    def get(self, interrupted: Callable[[], bool], waiter: Worker | None = None) -> Any:
        if interrupted():
            return None
        with self._lock:
            if not self._order:
                if self._epochs is not None and self._epoch >= self._epochs:
                    return END
                self._order = self._rng.permutation(len(self._pairs)).tolist()[::-1]
                self._epoch += 1
            path, group = self._pairs[self._order.pop()]
        return ReadRequest(path, group, self._rows)

    def wake(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Workers and pools
# --------------------------------------------------------------------------------------
class Worker:
    """One worker of a stage: a thread, optionally driving a worker process."""

    def __init__(self, pool: Pool, serial: int) -> None:
        self.pool = pool
        self.serial = serial
        self.retire = False
        # Busy = alive and not blocked on an empty input or a full output buffer. Waiting
        # for the GIL or a core counts as busy: the stage is then short of CPU.
        self.started = time.perf_counter()
        # (idle seconds of finished waits, start of the current wait or None), replaced
        # as one tuple so that busy time read by another thread never decreases
        self.idle: tuple[float, float | None] = (0.0, None)
        self.process: subprocess.Popen | None = None  # when the stage runs in processes
        self.conn: Connection | None = None
        self.respawns = 0
        self.thread = threading.Thread(
            target=self._run, name=f"intune-{pool.name}-{serial}", daemon=True
        )

    # --- process workers ---------------------------------------------------------------
    def _spawn(self) -> None:
        pipe = self.pool.pipeline
        self.process, self.conn = spawn_worker_process(self.pool.name, pipe.stage_params)
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
                if item is END:
                    ended = True
                    break
                n_in = item_size(item)[0] if not isinstance(item, ReadRequest) else item.rows
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


class Pool:
    """The resizable pool of workers of one stage."""

    def __init__(self, pipeline: LivePipeline, index: int, inbuf: Any, outbuf: Buffer,
                 kind: str) -> None:
        self.pipeline = pipeline
        self.index = index
        self.name = STAGES[index]
        self.inbuf = inbuf
        self.outbuf = outbuf
        self.kind = kind
        # Looked up when the pool is made: the registry is the one place a stage is defined.
        self.fn = stages.STAGE_FUNCS[self.name]
        self.hooks = stages.STAGE_HOOKS[self.name]
        self._lock = threading.Lock()
        self._workers: list[Worker] = []  # workers taking or retiring from work
        # Every thread started and maybe still running: a worker leaves ``_workers`` in its
        # last lines, before its thread has ended, and close() must join it all the same.
        self._started: list[threading.Thread] = []
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
            self._started = [t for t in self._started if t.is_alive()]
            for _ in range(k - len(active)):
                w = Worker(self, next(self._serials))
                self._workers.append(w)
                self._started.append(w.thread)
                w.thread.start()
            # Retire the newest first: the oldest keep their warm caches.
            for w in active[::-1][: max(0, len(active) - k)]:
                w.retire = True
        self.inbuf.wake()

    def worker_exited(self, worker: Worker, ended: bool) -> None:
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
        """Threads of this pool that may still be running (exiting ones included)."""
        with self._lock:
            return [t for t in self._started if t.is_alive()]

    # --- accounting --------------------------------------------------------------------
    def add_processed(self, n_in: int) -> None:
        with self._lock:
            self.processed += n_in

    def busy_total(self, now: float) -> float:
        """Worker-seconds busy so far (exited workers and live ones up to ``now``)."""
        with self._lock:
            return self.busy_done + sum(_busy_of(w, now) for w in self._workers)

    def emit(self, item: Any, worker: Worker | None = None) -> bool:
        n, nb = item_size(item)
        ok = self.outbuf.put(item, lambda: self.pipeline.halted, worker)
        if ok:
            with self._lock:
                self.out_samples += n
                self.out_bytes += nb
        return ok

    # --- per-stage behaviour: the stage's registered hooks ---------------------------
    def new_state(self, serial: int) -> dict[str, Any]:
        return self.hooks.new_state(self, serial)

    def post(self, out: Any, state: dict[str, Any]) -> list[Any]:
        """Turn the stage function's result into the items to emit."""
        return self.hooks.post(self, out, state)

    def flush(self, state: dict[str, Any]) -> list[Any]:
        """What a leaving worker must still hand on (its shuffle buffer)."""
        return self.hooks.flush(self, state)


def _busy_of(w: Worker, now: float) -> float:
    idle_s, since = w.idle
    # A wait that began after ``now`` (the reader's clock is read first) adds nothing; a
    # negative term here made busy time shrink between two readings.
    idle = idle_s + (max(0.0, now - since) if since is not None else 0.0)
    return max(0.0, now - w.started - idle)
