"""Criteo-shaped Parquet shards for the live pipeline, generated once per spec.

Each sample has an ``id`` (unique, ``0 .. n_samples - 1``, used by the exactly-once
checks), a ``label``, 13 dense count features ``I1..I13`` (int32, some missing) and 26
categorical features ``C1..C26`` (uint32 hashed ids as in the preprocessed Criteo files,
some missing). Values are drawn from a generator seeded by ``(seed, shard)``, so the same
spec always yields the same bytes, whatever the order shards are written in.

Files are written to a temporary name in the target directory and renamed into place,
and the manifest last, so a crash or a concurrent writer never leaves a half-written
shard that a later run would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from intune_env.live.config import N_CAT, N_DENSE

DENSE_COLUMNS = tuple(f"I{i}" for i in range(1, N_DENSE + 1))
CAT_COLUMNS = tuple(f"C{i}" for i in range(1, N_CAT + 1))
ID_COLUMN = "id"
LABEL_COLUMN = "label"
COLUMNS = (ID_COLUMN, LABEL_COLUMN, *DENSE_COLUMNS, *CAT_COLUMNS)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DatasetSpec:
    """Shape of a generated dataset.

    Attributes:
        n_shards: number of Parquet files.
        rows_per_shard: samples per file (a multiple of ``row_group_size``).
        row_group_size: samples per Parquet row group; one read request reads one group.
        seed: generator seed.
        missing_fraction: share of missing values in each feature column.
    """

    n_shards: int = 8
    rows_per_shard: int = 32768
    row_group_size: int = 512
    seed: int = 0
    missing_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {self.n_shards}")
        if self.row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {self.row_group_size}")
        if self.rows_per_shard < 1 or self.rows_per_shard % self.row_group_size:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a positive multiple of "
                f"row_group_size ({self.row_group_size})"
            )
        if not 0.0 <= self.missing_fraction < 1.0:
            raise ValueError(f"missing_fraction must be in [0, 1), got {self.missing_fraction}")

    @property
    def groups_per_shard(self) -> int:
        return self.rows_per_shard // self.row_group_size

    @property
    def n_samples(self) -> int:
        return self.n_shards * self.rows_per_shard

    def key(self) -> str:
        """Short name of the spec, used as the sub-directory of the data dir."""
        return (
            f"criteo-v{FORMAT_VERSION}-s{self.seed}-n{self.n_shards}x{self.rows_per_shard}"
            f"-g{self.row_group_size}-m{round(self.missing_fraction * 1000)}"
        )


@dataclass(frozen=True)
class Dataset:
    """A generated dataset on disk: its spec and shard paths (in shard order)."""

    spec: DatasetSpec
    root: Path
    shards: tuple[Path, ...]


def generate_shard(spec: DatasetSpec, shard: int) -> pa.Table:
    """The table of shard ``shard`` (deterministic in ``(spec.seed, shard)``)."""
    rng = np.random.default_rng([spec.seed, shard])
    n = spec.rows_per_shard
    first = shard * n
    cols: dict[str, pa.Array] = {
        ID_COLUMN: pa.array(np.arange(first, first + n, dtype=np.int64)),
        LABEL_COLUMN: pa.array((rng.random(n) < 0.25).astype(np.int8)),
    }
    for name in DENSE_COLUMNS:
        # Criteo's integer features are heavy-tailed counts, occasionally -1 or -2.
        vals = np.floor(rng.lognormal(1.5, 1.5, n)).astype(np.int32) - (rng.random(n) < 0.02)
        mask = rng.random(n) < spec.missing_fraction
        cols[name] = pa.array(vals.astype(np.int32), mask=mask)
    for j, name in enumerate(CAT_COLUMNS):
        # Zipf-like popularity over a per-feature vocabulary, scrambled to 32-bit ids.
        vocab = 10 ** (1 + j % 6)
        rank = np.minimum(rng.zipf(1.2, n), vocab).astype(np.uint64)
        ids = ((rank * np.uint64(2654435761) + np.uint64(j * 97 + 1)) % np.uint64(2**32))
        mask = rng.random(n) < spec.missing_fraction
        cols[name] = pa.array(ids.astype(np.uint32), mask=mask)
    return pa.table(cols)


def _write_shard(spec: DatasetSpec, shard: int, path: Path) -> None:
    table = generate_shard(spec, shard)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=spec.row_group_size, compression="snappy")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _valid_shard(path: Path, spec: DatasetSpec) -> bool:
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException):
        return False
    return (
        meta.num_rows == spec.rows_per_shard
        and meta.num_row_groups == spec.groups_per_shard
        and meta.num_columns == len(COLUMNS)
    )


def default_data_dir() -> Path:
    """``$INTUNE_DATA_DIR``, else ``$XDG_CACHE_HOME/intune/live``, else ``~/.cache/...``."""
    env = os.environ.get("INTUNE_DATA_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "intune" / "live"


def ensure_dataset(spec: DatasetSpec, data_dir: str | Path | None = None) -> Dataset:
    """Generate the dataset under ``data_dir/spec.key()`` unless a valid copy is there."""
    # late: worker processes import this module and must not pay for the simulator
    from simulators.fileio import InputFileError, read_text_limited, write_json_atomic

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    root = root / spec.key()
    root.mkdir(parents=True, exist_ok=True)
    shards = tuple(root / f"part-{i:05d}.parquet" for i in range(spec.n_shards))
    manifest = root / MANIFEST
    wanted = {"format_version": FORMAT_VERSION, **asdict(spec)}
    trusted = False
    if manifest.exists():
        try:  # bounded read: the manifest is a few hundred bytes
            trusted = json.loads(read_text_limited(manifest, 1 << 16)) == wanted
        except (InputFileError, ValueError):
            trusted = False
    if trusted and all(p.exists() for p in shards):
        return Dataset(spec, root, shards)
    for i, path in enumerate(shards):
        if not _valid_shard(path, spec):
            _write_shard(spec, i, path)
    write_json_atomic(manifest, wanted, indent=1)
    return Dataset(spec, root, shards)
