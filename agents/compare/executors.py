"""Where runs execute: this process, a local process pool, or a Ray cluster.

Results always come back to the parent, which writes them; workers write nothing but
the SB3 models they train (atomically).

Local pool (``jobs > 1``): a ``ProcessPoolExecutor`` with the ``fork`` start method.
Fork, because its semaphores are unlinked as soon as they are created and it needs no
resource-tracker process: a ``kill -9`` of the whole process group leaves nothing in
``/dev/shm`` and no helper process behind (``spawn`` leaves both). The pool is created
before the progress bar, so no helper thread exists at fork time. Each worker, in its
initializer:

- asks the kernel for ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and
  checks the parent is still the one that started it (before every run, too): a
  ``kill -9`` of ``intune compare`` leaves no orphan training a model for nobody;
- ignores ``SIGINT``: on Ctrl-C the parent kills the workers itself and returns at once,
  keeping every finished run;
- loads the same plugins as the parent (:func:`agents.plugins.loaded_plugins`).

Ray: tasks load the plugins too; ``--address`` is probed with a plain TCP connection
first (10 s), so a dead address fails in seconds instead of Ray's minutes of retries.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue as queue_mod
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from agents.compare.grid import CompareError, RunSpec
from agents.compare.run import ProgressFn, guarded
from agents.plugins import load_plugins, loaded_plugins

DoneFn = Callable[[RunSpec, dict[str, Any]], None]

_PR_SET_PDEATHSIG = 1
_PARENT_PID: int | None = None
_QUEUE: Any = None


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the per-task check still holds
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init(parent: int, plugins: list[str], progress_queue: Any) -> None:
    global _PARENT_PID, _QUEUE
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PARENT_PID, _QUEUE = parent, progress_queue
    load_plugins(plugins)


def _report(key: str, done: int, total: int) -> None:
    if _QUEUE is not None:
        with contextlib.suppress(Exception):  # progress is best effort
            _QUEUE.put_nowait((key, done, total))


def _pool_task(spec: RunSpec) -> dict[str, Any]:
    if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
        os._exit(1)  # orphaned: nobody will read this result
    return guarded(spec, pin_threads=True, progress=_report)


def progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", unit="run", disable=not enabled,
                dynamic_ncols=True)


class _Training:
    """The postfix of the bar: which SB3 models are training and how far along."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.state: dict[str, tuple[int, int]] = {}

    def update(self, key: str, done: int, total: int) -> None:
        if done >= total:
            self.state.pop(key, None)
        else:
            self.state[key] = (done, total)
        parts = []
        for k, (d, t) in list(self.state.items())[:3]:
            sc, ag, seed = [*k.split("__"), "", ""][:3]
            parts.append(f"{ag} {sc[:16]} {seed} {d * 100 // max(t, 1)}%")
        self.bar.set_postfix_str(("training " + ", ".join(parts)) if parts else "",
                                 refresh=True)

    def finished(self, key: str) -> None:
        if self.state.pop(key, None) is not None:
            self.update(key, 1, 1)


def run_local(pending: list[RunSpec], done: DoneFn, jobs: int | None,
              progress: bool) -> None:
    """Run ``pending`` here (``jobs == 1``) or in a pool of ``jobs`` workers."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(pending)))
    # Runs that train a model go first: they are the long ones.
    order = sorted(pending, key=lambda s: s.train_steps is None)
    if jobs == 1:  # no pool: saves the start-up of worker processes
        bar = progress_bar(len(pending), progress)
        training = _Training(bar)
        report: ProgressFn = training.update
        try:
            for s in order:
                res = guarded(s, pin_threads=False, progress=report)
                training.finished(s.key)
                done(s, res)
                bar.update(1)
        finally:
            bar.close()
        return
    ctx = get_context("fork")
    pq = ctx.Queue()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), loaded_plugins(), pq))
    futures: dict[Future[dict[str, Any]], RunSpec] = {
        pool.submit(_pool_task, s): s for s in order}  # forks every worker now
    bar = progress_bar(len(pending), progress)
    training = _Training(bar)
    remaining = set(futures)
    try:
        while remaining:
            finished, remaining = wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(pq, training)
            for fut in finished:
                spec = futures[fut]
                try:
                    res = fut.result()
                except Exception as err:  # a worker died (killed, out of memory)
                    res = {"_error": f"worker: {type(err).__name__}: {err}"}
                training.finished(spec.key)
                done(spec, res)
                bar.update(1)
    except BaseException:  # Ctrl-C: stop now; finished results are already on disk
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
        pq.close()
        pq.cancel_join_thread()
    pool.shutdown(wait=True)


def _drain(pq: Any, training: _Training) -> None:
    while True:
        try:
            key, d, t = pq.get_nowait()
        except (queue_mod.Empty, OSError, ValueError, EOFError):
            return
        training.update(key, d, t)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    procs = list(getattr(pool, "_processes", {}).values())  # no public API for this
    for p in procs:
        with contextlib.suppress(OSError, AttributeError):
            p.kill()
    deadline = time.monotonic() + 1.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _ray_task(spec: RunSpec, plugins: list[str]) -> dict[str, Any]:
    load_plugins(plugins)
    return guarded(spec, pin_threads=True)


def _probe_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast (one line) if ``host:port`` does not accept TCP connections."""
    target = address.split("://", 1)[-1]
    if address == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise CompareError(f"--address {address}: no Ray cluster answers there "
                           f"({reason}); start one with `ray start --head` or drop "
                           f"--address") from None


def run_ray(pending: list[RunSpec], done: DoneFn, address: str | None,
            progress: bool) -> None:
    """Send ``pending`` to a Ray cluster (one CPU per run)."""
    try:
        import ray
    except ImportError:
        raise CompareError("--executor ray needs Ray: pip install 'intune[ray]'") from None
    if not ray.is_initialized():
        if address:
            _probe_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise CompareError(f"--address {address}: cannot connect to Ray "
                               f"({str(err).splitlines()[0][:120] if str(err) else ''})"
                               ) from None
    remote = ray.remote(num_cpus=1)(_ray_task)
    plugins = loaded_plugins()
    refs = {remote.remote(s, plugins): s for s in pending}
    bar = progress_bar(len(pending), progress)
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as err:  # a lost worker, not a run's own error
                    res = {"_error": f"ray: {type(err).__name__}: {err}"}
                done(spec, res)
                bar.update(1)
    except BaseException:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
