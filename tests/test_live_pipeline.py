"""The live pipeline: data files, exactly-once delivery across resizes, no leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from intune_env.live import pipeline as pl
from intune_env.live.data import DatasetSpec, ensure_dataset, generate_shard
from intune_env.live.pipeline import LivePipeline, PipelineConfig, PipelineError

SPEC = DatasetSpec(n_shards=2, rows_per_shard=2048, row_group_size=128, seed=3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    return ensure_dataset(SPEC, tmp_path_factory.mktemp("live-data"))


def _expected(ds, cfg: PipelineConfig) -> tuple[int, int]:
    """(sum of ids, sum of transformed categorical values) over one epoch."""
    id_sum = cat_sum = 0
    for path in ds.shards:
        b = pl.reference_transform(pq.read_table(path), cfg.transform_rounds, cfg.table_size)
        id_sum += int(b.ids.sum())
        cat_sum += int(b.cat.sum(dtype=np.int64))
    return id_sum, cat_sum


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("intune-")]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# --- data ----------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_written_atomically(tmp_path: Path, dataset) -> None:
    again = ensure_dataset(SPEC, tmp_path)
    for a, b in zip(dataset.shards, again.shards, strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
    t = pq.read_table(again.shards[1])
    assert t.num_rows == SPEC.rows_per_shard
    assert t.column_names[:2] == ["id", "label"] and len(t.column_names) == 2 + 13 + 26
    assert t.column("id").to_numpy()[0] == SPEC.rows_per_shard  # ids are global
    assert pq.ParquetFile(again.shards[0]).metadata.num_row_groups == SPEC.groups_per_shard
    assert not list(again.root.glob("*.tmp"))  # no temporary file left behind
    # A damaged shard is detected and rewritten once the manifest no longer vouches for it.
    again.shards[0].write_bytes(b"not parquet")
    (again.root / "manifest.json").unlink()
    ensure_dataset(SPEC, tmp_path)
    assert pq.read_table(again.shards[0]).equals(generate_shard(SPEC, 0))


def test_dataset_spec_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of row_group_size"):
        DatasetSpec(rows_per_shard=1000, row_group_size=512)


# --- exactly once ---------------------------------------------------------------------------
def _run_to_end(pipe: LivePipeline, rng: np.random.Generator, max_workers: tuple[int, ...],
                resize_every_s: float = 0.01, timeout_s: float = 30.0) -> int:
    """Resize the pools at random until the finite pipeline delivered everything."""
    resizes = 0
    deadline = time.monotonic() + timeout_s
    while not pipe.wait_finished(resize_every_s):
        assert time.monotonic() < deadline, "pipeline did not finish"
        alloc = [int(rng.integers(1, hi + 1)) for hi in max_workers]
        pipe.set_allocation(alloc)
        resizes += 1
    return resizes


def test_every_sample_delivered_exactly_once_across_grow_and_shrink(dataset) -> None:
    # 3 epochs of 32 requests at 4 ms each, at most 4 readers: >= 96 ms of reading, so
    # the pools are resized several times (every 10 ms) while data flows.
    cfg = PipelineConfig(epochs=3, gpu_rate=2e6, shuffle_buffer=300, record_ids=True,
                         read_latency_ms=4.0, max_workers=(4, 3, 3, 3, 3), seed=7)
    with LivePipeline(dataset, cfg, [1, 1, 1, 1, 1]) as pipe:
        resizes = _run_to_end(pipe, np.random.default_rng(0), cfg.max_workers)
        d = pipe.delivery
        ids = np.concatenate(d.ids)
    assert resizes >= 3
    n = SPEC.n_samples
    assert d.count == 3 * n
    assert np.array_equal(np.bincount(ids, minlength=n), np.full(n, 3))
    id_sum, cat_sum = _expected(dataset, cfg)
    assert d.id_sum == 3 * id_sum
    assert d.cat_sum == 3 * cat_sum  # each sample was transformed exactly once
    assert not _pipeline_threads()


def test_shuffle_changes_the_order(dataset) -> None:
    cfg = PipelineConfig(epochs=1, gpu_rate=5e6, shuffle_buffer=512, record_ids=True)
    with LivePipeline(dataset, cfg, [1, 1, 1, 1, 1]) as pipe:
        assert pipe.wait_finished(30)
        ids = np.concatenate(pipe.delivery.ids)
    assert sorted(ids.tolist()) == list(range(SPEC.n_samples))
    # Within each delivered batch, samples come from several row groups.
    groups = ids[:128] // SPEC.row_group_size
    assert len(np.unique(groups)) > 1


def test_process_workers_survive_a_killed_worker_without_loss(dataset) -> None:
    before = _children()
    # One reader at 20 ms per 128-sample request: 2 epochs take ~1.3 s, so most batches
    # still have to pass the killed workers' stages after the kill.
    cfg = PipelineConfig(epochs=2, gpu_rate=2e6, shuffle_buffer=256, record_ids=True,
                         read_latency_ms=20.0, process_stages=("batch", "transform"),
                         max_workers=(4, 2, 2, 2, 2))
    with LivePipeline(dataset, cfg, [1, 2, 1, 2, 1]) as pipe:
        deadline = time.monotonic() + 20
        while len(pipe.worker_pids()) < 4 or pipe.delivery.count == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victims = pipe.worker_pids()[:2]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert pipe.wait_finished(30)
        respawns = sum(pipe.respawns)
        pids = set(pipe.worker_pids())
        ids = np.concatenate(pipe.delivery.ids)
    n = SPEC.n_samples
    assert np.array_equal(np.bincount(ids, minlength=n), np.full(n, 2))
    id_sum, cat_sum = _expected(dataset, cfg)
    assert pipe.delivery.cat_sum == 2 * cat_sum
    assert respawns >= 1  # at least one killed worker held a batch that was re-sent
    assert all(_gone(p) for p in pids | set(victims))
    assert _children() <= before


def test_exception_in_a_worker_stops_the_pipeline_and_its_processes(tmp_path, dataset) -> None:
    bad = ensure_dataset(SPEC, tmp_path)
    bad.shards[1].write_bytes(b"garbage, not parquet")  # the manifest still vouches for it
    before = _children()
    for stages in [(), ("read",)]:
        cfg = PipelineConfig(epochs=1, gpu_rate=2e6, process_stages=stages)
        pipe = LivePipeline(bad, cfg, [2, 1, 1, 1, 1])
        try:
            with pytest.raises(PipelineError, match="read"):
                pipe.wait_finished(30)
            with pytest.raises(PipelineError):
                pipe.set_allocation([1, 1, 1, 1, 1])
            assert pipe.halted
        finally:
            pipe.close()
            pipe.close()  # twice is fine
        assert not _pipeline_threads()
        assert _children() <= before


def test_exception_in_a_thread_worker_is_reported(monkeypatch, dataset) -> None:
    calls = {"n": 0}
    real = pl.STAGE_FUNCS["transform"]

    def flaky(item, params, cache):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ZeroDivisionError("boom in transform")
        return real(item, params, cache)

    monkeypatch.setitem(pl.STAGE_FUNCS, "transform", flaky)
    with (LivePipeline(dataset, PipelineConfig(epochs=1), [1, 1, 1, 2, 1]) as pipe,
          pytest.raises(PipelineError, match="transform: ZeroDivisionError: boom")):
        pipe.wait_finished(30)
    assert not _pipeline_threads()


def test_memory_limit_halts_the_pipeline(dataset) -> None:
    cfg = PipelineConfig(memory_limit_bytes=1 << 20, monitor_interval_s=0.01)
    with LivePipeline(dataset, cfg, [1, 1, 1, 1, 1]) as pipe:
        assert pipe.sleep(5)
        assert pipe.oom and pipe.halted
        assert pipe.error is None  # an OOM is not a worker failure
    assert not _pipeline_threads()


def test_close_joins_a_worker_that_is_still_exiting(monkeypatch, dataset) -> None:
    # A worker leaves its pool's list in its last lines, before its thread ends; close()
    # must join it too (CI once saw a reader thread outlive close() after an OOM halt).
    from intune_env.live import workers

    real = workers.Pool.worker_exited

    def slow_exit(self, worker, ended):
        real(self, worker, ended)
        time.sleep(0.5)

    monkeypatch.setattr(workers.Pool, "worker_exited", slow_exit)
    cfg = PipelineConfig(memory_limit_bytes=1 << 20, monitor_interval_s=0.01)
    with LivePipeline(dataset, cfg, [1, 1, 1, 1, 1]) as pipe:
        assert pipe.sleep(5) and pipe.halted
        time.sleep(0.2)  # the workers have left their pools' lists and are still exiting
    assert not _pipeline_threads()
    with pytest.raises(PipelineError, match="closed"):  # no worker is started after close
        pipe.set_allocation([2, 1, 1, 1, 1])


def test_bad_configuration_is_rejected(dataset) -> None:
    with pytest.raises(ValueError, match="stateless"):
        PipelineConfig(process_stages=("shuffle",))
    with pytest.raises(ValueError, match=r"expected 1\.\.4"):
        LivePipeline(dataset, PipelineConfig(), [1, 9, 1, 1, 1])


# --- no process left behind after Ctrl-C or a killed parent ------------------------------
_SCRIPT = textwrap.dedent("""
    import sys, time
    from intune_env.live.data import DatasetSpec, ensure_dataset
    from intune_env.live.pipeline import LivePipeline, PipelineConfig
    ds = ensure_dataset(DatasetSpec(n_shards=2, rows_per_shard=2048, row_group_size=128,
                                    seed=3), sys.argv[1])
    cfg = PipelineConfig(read_latency_ms=5.0, process_stages=("read", "transform"))
    pipe = LivePipeline(ds, cfg, [2, 1, 1, 2, 1])
    while len(pipe.worker_pids()) < 4:
        time.sleep(0.02)
    print(" ".join(map(str, pipe.worker_pids())), flush=True)
    while True:
        time.sleep(0.1)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_no_worker_process_outlives_its_parent(tmp_path, dataset, sig) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(dataset.root.parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 4, proc.stderr.read()
        assert all(not _gone(p) for p in pids)
        proc.send_signal(sig)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in pids):
            assert time.monotonic() < deadline, f"orphaned workers: {pids}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_table_round_trip_of_a_batch() -> None:
    t = generate_shard(SPEC, 0).slice(0, 64)
    b = pl.batch_fn(t, {}, {})
    dense = t.column("I1").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(b.dense[:, 0]), np.isnan(dense))
    assert b.cat.dtype == np.int64 and b.cat.shape == (64, 26)
    assert (b.cat[np.asarray(t.column("C1").is_null()), 0] == 0).all()
    out = pl.transform_fn(b, {"transform_rounds": 2, "table_size": 1000,
                              "salts": pl.salts()}, {})
    assert out.cat.min() >= 0 and out.cat.max() < 1000
    assert np.isfinite(out.dense).all() and (out.dense >= 0).all()
    assert isinstance(t, pa.Table)


def test_every_stage_is_a_registered_callable() -> None:
    from intune_env.live import stages

    assert set(stages.STAGE_FUNCS) == set(pl.STAGES) == set(stages.STAGE_HOOKS)
    assert all(callable(f) for f in stages.STAGE_FUNCS.values())
    assert isinstance(stages.STAGE_HOOKS["shuffle"], stages.ShuffleHooks)
    # The pipeline never branches on stage names: the pool code does not mention them.
    import inspect

    from intune_env.live import workers

    src = inspect.getsource(workers)
    for name in ("read", "batch", "shuffle", "transform", "gpu_load"):
        assert f'"{name}"' not in src, name


def test_registered_hooks_drive_a_pool(monkeypatch, dataset) -> None:
    """Replacing a stage's registered hooks changes what the pipeline does."""
    from intune_env.live import stages

    seen = {"n": 0}

    class Counting(stages.StageHooks):
        def post(self, pool, out, state):
            seen["n"] += out.n
            return [out]

    monkeypatch.setitem(stages.STAGE_HOOKS, "transform", Counting())
    with LivePipeline(dataset, PipelineConfig(epochs=1, gpu_rate=5e6), [1, 1, 1, 1, 1]) as pipe:
        assert pipe.wait_finished(60)
        assert seen["n"] == pipe.delivery.count == dataset.spec.n_samples


@pytest.mark.parametrize(("field", "value"), [("gpu_rate", float("inf")),
                                              ("gpu_rate", float("nan")),
                                              ("read_latency_ms", float("inf")),
                                              ("monitor_interval_s", float("nan"))])
def test_config_numbers_must_be_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
        PipelineConfig(**{field: value})


def test_busy_time_read_before_a_wait_began_never_shrinks() -> None:
    # The reader takes its clock first; a worker may start waiting just after. That wait
    # must add no idle time, or busy time shrinks between readings (negative utilisation).
    from types import SimpleNamespace

    from intune_env.live.workers import _busy_of

    now = 100.0
    w = SimpleNamespace(started=90.0, idle=(2.0, now + 0.5))  # the wait began after `now`
    assert _busy_of(w, now) == 8.0  # 10 s alive, 2 s of finished waits
    w.idle = (2.0, now - 1.0)  # a wait in progress for 1 s
    assert _busy_of(w, now) == 7.0
