"""What each live stage does: the items that flow between stages and a registry of stages.

A stage is registered by name with :func:`register_stage`:

- its **function** ``fn(item, params, cache) -> result`` runs once per item, in a worker
  thread or (for the stateless stages) in a worker process: plain data in and out,
  ``params`` shared by every worker, ``cache`` private to one worker (open files);
- its **hooks** (:class:`StageHooks`) run in the worker thread and turn results into the
  items to emit: the shuffle holds samples in a per-worker buffer and hands them on when
  the worker leaves; ``gpu_load`` packs each batch into a staging slot of the pipeline.
  The default hooks emit the result as it is.

The pipeline looks stages up here by name; it never branches on a stage's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from intune_env.live.data import CAT_COLUMNS, DENSE_COLUMNS, ID_COLUMN, LABEL_COLUMN, N_CAT, N_DENSE

if TYPE_CHECKING:
    from intune_env.live.workers import Pool

StageFn = Callable[[Any, dict[str, Any], dict[str, Any]], Any]

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------
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


def item_size(item: Any) -> tuple[int, int]:
    """(samples, bytes) of an item in a buffer."""
    if isinstance(item, pa.Table):
        return item.num_rows, int(item.nbytes)
    if isinstance(item, Batch | StagingSlot):
        return item.n, item.nbytes
    raise TypeError(f"unexpected item {type(item).__name__}")


def concat(a: Batch, b: Batch) -> Batch:
    return Batch(ids=np.concatenate([a.ids, b.ids]), label=np.concatenate([a.label, b.label]),
                 dense=np.concatenate([a.dense, b.dense]), cat=np.concatenate([a.cat, b.cat]))


def take(b: Batch, idx: np.ndarray) -> Batch:
    return Batch(ids=b.ids[idx], label=b.label[idx], dense=b.dense[idx], cat=b.cat[idx])


class Halted(Exception):
    """Raised inside a worker when the pipeline halts while it waits for a resource."""


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------
class StageHooks:
    """Per-worker behaviour of a stage, run in the worker thread (override what you need).

    Default: no state, emit the function's result as it is, nothing to hand on.
    """

    def new_state(self, pool: Pool, serial: int) -> dict[str, Any]:
        """State of a new worker (``serial`` numbers the stage's workers)."""
        return {}

    def post(self, pool: Pool, out: Any, state: dict[str, Any]) -> list[Any]:
        """The items to emit for one result of the stage function."""
        return [out]

    def flush(self, pool: Pool, state: dict[str, Any]) -> list[Any]:
        """What a leaving worker must still hand on."""
        return []


#: The function of each stage, by name (may run in a worker process).
STAGE_FUNCS: dict[str, StageFn] = {}
#: The hooks of each stage, by name (run in the worker thread).
STAGE_HOOKS: dict[str, StageHooks] = {}


def register_stage(name: str, fn: StageFn, hooks: StageHooks | None = None) -> None:
    """Make ``name`` a live stage: ``fn`` per item, ``hooks`` (default pass-through)."""
    STAGE_FUNCS[name] = fn
    STAGE_HOOKS[name] = hooks if hooks is not None else StageHooks()


def identity(item: Any, params: dict[str, Any], cache: dict[str, Any]) -> Any:
    """The function of a stage whose work is all in its hooks."""
    return item


# --------------------------------------------------------------------------------------
# The stages
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


def salts() -> np.ndarray:
    """Per-column salts of the categorical hash."""
    return (np.arange(1, N_CAT + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def reference_transform(table: pa.Table, transform_rounds: int, table_size: int) -> Batch:
    """Batch + transform of a whole table in one go (what tests compare deliveries with)."""
    params = {"transform_rounds": transform_rounds, "table_size": table_size,
              "salts": salts()}
    return transform_fn(batch_fn(table, {}, {}), params, {})


class ShuffleHooks(StageHooks):
    """Each worker holds ``shuffle_buffer`` samples and emits a random batch of what it
    holds for each batch it takes in; a leaving worker hands on all it holds."""

    def new_state(self, pool: Pool, serial: int) -> dict[str, Any]:
        seed = pool.pipeline.config.seed
        return {"rng": np.random.default_rng([seed, pool.index, serial]), "held": None}

    def post(self, pool: Pool, out: Batch, state: dict[str, Any]) -> list[Any]:
        held: Batch | None = state["held"]
        cap = pool.pipeline.config.shuffle_buffer
        mixed = out if held is None else concat(held, out)
        if mixed.n <= cap:
            state["held"] = mixed
            return []
        perm = state["rng"].permutation(mixed.n)
        k = mixed.n - cap
        state["held"] = take(mixed, perm[k:]) if cap > 0 else None
        return [take(mixed, perm[:k])]

    def flush(self, pool: Pool, state: dict[str, Any]) -> list[Any]:
        held: Batch | None = state.get("held")
        if held is None:
            return []
        state["held"] = None
        perm = state["rng"].permutation(held.n)
        bs = pool.pipeline.batch_size
        return [take(held, perm[i:i + bs]) for i in range(0, held.n, bs)]


class StagingHooks(StageHooks):
    """``gpu_load``: pack each batch into a staging slot from the pipeline's fixed pool."""

    def post(self, pool: Pool, out: Batch, state: dict[str, Any]) -> list[Any]:
        slot = pool.pipeline.acquire_slot()
        if slot is None:
            raise Halted
        n = out.n
        slot.n = n
        slot.ids[:n] = out.ids
        slot.label[:n] = out.label
        slot.dense[:n] = out.dense
        slot.cat[:n] = out.cat
        return [slot]


register_stage("read", read_fn)
register_stage("batch", batch_fn)
register_stage("shuffle", identity, ShuffleHooks())
register_stage("transform", transform_fn)
register_stage("gpu_load", identity, StagingHooks())
