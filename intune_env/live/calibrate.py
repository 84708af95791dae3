"""Calibrate the simulator against the live pipeline, and sweep static allocations live.

:func:`calibrate` runs the live pipeline at a few allocations, fits each stage's
parameters for the simulator's linear stage model, writes them as a scenario and then
checks the scenario against live runs at allocations the fit never saw.

The fit, per stage ``s``:

- capacity: at every measured allocation the stage processed ``x_s`` samples/s while its
  workers were busy a fraction ``u_s`` of the time, so with all ``k_s`` workers busy it
  would do ``c_s = x_s / u_s``. The model ``c(k) = r k / (1 + g (k - 1))`` is linear in
  ``k / c = 1/r + (g/r)(k - 1)``; a least-squares line through the points weighted by
  ``u_s`` (busy stages give the reliable estimates) yields ``rate_per_cpu = r`` and
  ``contention = g``. On a 2-core machine the CPU-bound stages share the cores (and the
  GIL), which shows up as contention and as lower rates when the pipeline runs fast.
- memory: the RSS of the process tree regressed on the workers per stage gives
  ``worker_memory_mib`` (clipped at 0) and the machine's ``base_memory_gib``; element
  sizes are measured directly (bytes per sample in each stage's output).

The simulator's prediction at an allocation is its noise-free steady state
``min(gpu_rate, min_s capacity_s(k_s))``, the same formula as ``simulators.oracle``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from intune_env.live import config as live
from intune_env.live.config import N_STAGES, STAGES, PipelineConfig
from intune_env.live.data import Dataset, DatasetSpec, ensure_dataset
from intune_env.live.pipeline import LivePipeline
from simulators.pipeline import check_allocation

MIB = 1024**2
GIB = 1024**3


@dataclass
class Measurement:
    """What one static allocation did on the live pipeline over ``seconds``."""

    allocation: list[int]
    seconds: float
    throughput: float
    utilisation: list[float]
    processed_rate: list[float]
    memory_bytes: int
    element_bytes: list[int]
    interval_throughputs: list[float] = field(default_factory=list)

    def capacity_estimate(self, stage: int) -> float | None:
        """Samples/s the stage would process with all its workers busy (None if idle)."""
        u = self.utilisation[stage]
        if u < 1e-3 or self.processed_rate[stage] <= 0:
            return None
        return self.processed_rate[stage] / u


@dataclass(frozen=True)
class LiveSetup:
    """The live configuration being measured (dataset, pipeline knobs, worker budget)."""

    read_latency_ms: float = live.READ_LATENCY_MS
    gpu_rate: float = live.GPU_RATE
    cpus: int = live.WORKER_BUDGET
    max_workers: tuple[int, ...] = live.DEFAULT_MAX_WORKERS
    memory_budget_mib: float = live.MEMORY_BUDGET_MIB
    n_shards: int = live.N_SHARDS
    rows_per_shard: int = live.ROWS_PER_SHARD
    batch_size: int = live.BATCH_SIZE
    data_seed: int = 0
    shuffle_buffer: int = live.SHUFFLE_BUFFER
    transform_rounds: int = live.TRANSFORM_ROUNDS
    queue_batches: tuple[int, ...] = live.DEFAULT_QUEUE_BATCHES
    control_interval_s: float = live.CONTROL_INTERVAL_S
    seed: int = 0

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            read_latency_ms=self.read_latency_ms, gpu_rate=self.gpu_rate,
            queue_batches=tuple(self.queue_batches), shuffle_buffer=self.shuffle_buffer,
            transform_rounds=self.transform_rounds, max_workers=tuple(self.max_workers),
            seed=self.seed, memory_limit_bytes=int(self.memory_budget_mib * MIB),
        )

    def dataset(self, data_dir: str | Path | None = None) -> Dataset:
        return ensure_dataset(DatasetSpec(n_shards=self.n_shards,
                                          rows_per_shard=self.rows_per_shard,
                                          row_group_size=self.batch_size,
                                          seed=self.data_seed), data_dir)

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``InTuneLive-v0`` for the same configuration."""
        return {
            "control_interval_s": self.control_interval_s,
            "read_latency_ms": self.read_latency_ms, "gpu_rate": self.gpu_rate,
            "cpus": self.cpus, "max_workers": tuple(self.max_workers),
            "memory_budget_mib": self.memory_budget_mib, "n_shards": self.n_shards,
            "rows_per_shard": self.rows_per_shard, "batch_size": self.batch_size,
            "data_seed": self.data_seed, "shuffle_buffer": self.shuffle_buffer,
            "transform_rounds": self.transform_rounds,
            "queue_batches": tuple(self.queue_batches),
        }

    def check_allocation(self, alloc: Sequence[int]) -> None:
        check_allocation(alloc, self.max_workers, STAGES)
        if sum(alloc) > self.cpus:
            raise ValueError(f"allocation {list(alloc)} uses {sum(alloc)} workers, above the "
                             f"budget of {self.cpus}")


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------
def measure(
    setup: LiveSetup,
    allocations: Iterable[Sequence[int]],
    *,
    warmup_s: float = 1.0,
    measure_s: float = 2.0,
    data_dir: str | Path | None = None,
    progress: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Hold each allocation on one running pipeline: ``warmup_s``, then ``measure_s``."""
    allocs = [[int(k) for k in a] for a in allocations]
    for a in allocs:
        setup.check_allocation(a)
    if not allocs:
        return []
    dataset = setup.dataset(data_dir)
    out: list[Measurement] = []
    sub = max(1, round(measure_s / 0.5))  # sub-intervals, for the noise estimate
    with LivePipeline(dataset, setup.pipeline_config(), allocs[0]) as pipe:
        for alloc in allocs:
            pipe.set_allocation(alloc)
            _sleep(pipe, warmup_s)
            c0 = pipe.counters()
            parts = []
            prev = c0
            for _ in range(sub):
                _sleep(pipe, measure_s / sub)
                cur = pipe.counters()
                parts.append((cur.delivered - prev.delivered) / max(cur.time_s - prev.time_s,
                                                                    1e-9))
                prev = cur
            c1 = prev
            if pipe.oom:
                raise RuntimeError(f"allocation {alloc} exceeded the memory budget of "
                                   f"{setup.memory_budget_mib:g} MiB")
            dt = c1.time_s - c0.time_s
            busy = [b1 - b0 for b0, b1 in zip(c0.busy_s, c1.busy_s, strict=True)]
            elem = [
                round((c1.out_bytes[i] - c0.out_bytes[i])
                          / max(1, c1.out_samples[i] - c0.out_samples[i]))
                for i in range(N_STAGES)
            ]
            m = Measurement(
                allocation=alloc,
                seconds=dt,
                throughput=(c1.delivered - c0.delivered) / dt,
                utilisation=[min(1.0, b / (k * dt)) for b, k in zip(busy, alloc, strict=True)],
                processed_rate=[(p1 - p0) / dt
                                for p0, p1 in zip(c0.processed, c1.processed, strict=True)],
                memory_bytes=c1.memory_bytes,
                element_bytes=elem,
                interval_throughputs=parts,
            )
            out.append(m)
            if progress is not None:
                progress(m)
    return out


def _sleep(pipe: LivePipeline, seconds: float) -> None:
    pipe.sleep(seconds)
    pipe.check()


# --------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageFit:
    """Fitted parameters of one stage (simulator units)."""

    name: str
    rate_per_cpu: float
    contention: float
    worker_memory_mib: float
    element_kib: float
    points: int


def fit_capacity(points: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """Fit ``c(k) = r k / (1 + g (k - 1))`` to ``(k, capacity, weight)``; return (r, g)."""
    if not points:
        raise ValueError("no measurement with this stage busy: cannot fit its rate")
    k = np.array([p[0] for p in points], dtype=float)
    c = np.array([p[1] for p in points], dtype=float)
    w = np.sqrt(np.array([p[2] for p in points], dtype=float))
    y = k / c
    if len(np.unique(k)) < 2:
        # One worker count only: no information on scaling; assume linear.
        return float(np.average(c / k, weights=w**2)), 0.0
    x = np.stack([np.ones_like(k), k - 1.0], axis=1)
    (a, b), *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    if a <= 0:  # degenerate: fall back to the per-worker mean at one worker
        return float(np.average(c / k, weights=w**2)), 0.0
    g = max(0.0, b / a)
    if g == 0.0:  # refit the intercept alone under g = 0
        a = float(np.average(y, weights=w**2))
    return float(1.0 / a), float(min(g, 10.0))


def fit_memory(ms: Sequence[Measurement]) -> tuple[float, list[float]]:
    """(base bytes, per-worker MiB of each stage) from RSS over the worker counts."""
    x = np.array([[1.0, *m.allocation] for m in ms])
    y = np.array([float(m.memory_bytes) for m in ms])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    per = np.clip(coef[1:], 0.0, None)
    varied = x[:, 1:].std(axis=0) > 0
    per[~varied] = 0.0  # a stage never resized says nothing about its workers
    base = float(np.mean(y - x[:, 1:] @ per))
    return max(base, 0.0), [float(v / MIB) for v in per]


def fit(setup: LiveSetup, ms: Sequence[Measurement]) -> list[StageFit]:
    """Fit every stage from the measurements (see the module docstring)."""
    _, worker_mib = fit_memory(ms)
    fits = []
    for i, name in enumerate(STAGES):
        pts = []
        for m in ms:
            cap = m.capacity_estimate(i)
            if cap is not None:
                pts.append((m.allocation[i], cap, m.utilisation[i]))
        if pts:
            r, g = fit_capacity(pts)
        else:
            # Never measurably busy: it never limits; a generous lower bound will do.
            r, g = 10.0 * max(max(m.processed_rate[i] for m in ms), 1.0), 0.0
        elems = [m.element_bytes[i] for m in ms if m.element_bytes[i] > 0]
        elem_kib = float(np.median(elems)) / 1024 if elems else 0.2
        wm = worker_mib[i]
        if name == "shuffle":  # each worker holds a full shuffle buffer
            wm = max(wm, setup.shuffle_buffer * elem_kib / 1024)
        fits.append(StageFit(name, r, g, wm, elem_kib, len(pts)))
    return fits


def noise_cv(ms: Sequence[Measurement]) -> float:
    """Interval-to-interval variation of throughput at a fixed allocation."""
    cvs = [float(np.std(m.interval_throughputs) / np.mean(m.interval_throughputs))
           for m in ms if len(m.interval_throughputs) > 1 and np.mean(m.interval_throughputs) > 0]
    return float(min(0.3, np.median(cvs))) if cvs else 0.03


def scenario_dict(setup: LiveSetup, fits: Sequence[StageFit], ms: Sequence[Measurement],
                  name: str = "live-calibrated") -> dict[str, Any]:
    """The simulator scenario (a plain dict, as written to YAML)."""
    base, _ = fit_memory(ms)
    memory_gib = setup.memory_budget_mib / 1024
    base_gib = min(base / GIB, 0.9 * memory_gib)
    stages = []
    for f, q, hi in zip(fits, setup.queue_batches, setup.max_workers, strict=True):
        stages.append({
            "name": f.name,
            "rate_per_cpu": round(f.rate_per_cpu, 1),
            "max_cpus": int(hi),
            "contention": round(f.contention, 4),
            "bandwidth_cap": None,
            "worker_memory_mib": round(f.worker_memory_mib, 3),
            "element_kib": round(max(f.element_kib, 1e-3), 4),
            "buffer": int(q * setup.batch_size),
            "buffer_per_cpu": 0,
            "state_mib": 0.0,
        })
    return {
        "name": name,
        "description": (
            f"Fitted to the live pipeline on this machine: read latency "
            f"{setup.read_latency_ms:g} ms, batch {setup.batch_size}, "
            f"{setup.transform_rounds} transform rounds, worker budget {setup.cpus}"
        ),
        "machine": {"cpus": int(setup.cpus), "memory_gib": round(memory_gib, 4),
                    "base_memory_gib": round(base_gib, 4), "gpu_rate": float(setup.gpu_rate)},
        "noise_cv": round(noise_cv(ms), 4),
        "control_interval_s": float(setup.control_interval_s),
        "stages": stages,
    }


def predict(scenario: dict[str, Any], allocation: Sequence[int]) -> float:
    """Noise-free steady-state throughput the scenario predicts for ``allocation``."""
    caps = []
    for st, k in zip(scenario["stages"], allocation, strict=True):
        cap = st["rate_per_cpu"] * k / (1.0 + st["contention"] * (k - 1))
        if st.get("bandwidth_cap") is not None:
            cap = min(cap, st["bandwidth_cap"])
        caps.append(cap)
    return float(min(scenario["machine"]["gpu_rate"], *caps))


def validate_scenario(scenario: dict[str, Any]) -> None:
    """Check the dict with the simulator's loader (raises ``ScenarioError``)."""
    from simulators import load_scenario

    load_scenario(scenario)


# --------------------------------------------------------------------------------------
# The calibration procedure
# --------------------------------------------------------------------------------------
def training_allocations(setup: LiveSetup, quick: bool = False) -> list[list[int]]:
    """Allocations the fit uses: readers scaled up, then each CPU stage varied under load.

    Readers are the stage that scales far past the core count, so they get a ladder of
    worker counts; every other stage is measured at 1 and 2 (and 3) workers with many
    readers, where it has the most work to do.
    """
    hi_read = min(setup.max_workers[0], setup.cpus - (N_STAGES - 1) - 2)
    ladder = sorted({1, 2, max(1, hi_read // 2), hi_read} if quick
                    else {1, 2, 3, max(1, hi_read // 2), max(1, 3 * hi_read // 4), hi_read})
    allocs = [[r, 1, 1, 1, 1] for r in ladder]
    counts = (2,) if quick else (2, 3)
    for i in range(1, N_STAGES):
        for k in counts:
            if k > setup.max_workers[i]:
                continue
            a = [hi_read, 1, 1, 1, 1]
            a[i] = k
            while sum(a) > setup.cpus and a[0] > 1:
                a[0] -= 1
            allocs.append(a)
    return _unique(allocs)


def holdout_allocations(setup: LiveSetup, train: Sequence[Sequence[int]],
                        n: int = 4, seed: int = 1) -> list[list[int]]:
    """Random valid allocations not in ``train`` (the fit never sees them)."""
    rng = np.random.default_rng(seed)
    seen = {tuple(a) for a in train}
    out: list[list[int]] = []
    for _ in range(10_000):
        if len(out) >= n:
            break
        # Readers from the whole range; other stages mostly small, as good allocations are.
        a = [int(rng.integers(1, min(setup.max_workers[0], setup.cpus - 4) + 1))]
        a += [int(rng.integers(1, min(3, hi) + 1)) for hi in setup.max_workers[1:]]
        if sum(a) <= setup.cpus and tuple(a) not in seen:
            seen.add(tuple(a))
            out.append(a)
    return out


@dataclass
class CalibrationReport:
    """Outcome of :func:`calibrate`."""

    scenario: dict[str, Any]
    train: list[Measurement]
    holdout: list[Measurement]
    predictions: list[float]

    @property
    def errors_pct(self) -> list[float]:
        return [100.0 * abs(p - m.throughput) / max(m.throughput, 1e-9)
                for p, m in zip(self.predictions, self.holdout, strict=True)]

    @property
    def mean_abs_error_pct(self) -> float:
        e = self.errors_pct
        return float(np.mean(e)) if e else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "train": [asdict(m) for m in self.train],
            "holdout": [
                {**asdict(m), "predicted": p, "error_pct": e}
                for m, p, e in zip(self.holdout, self.predictions, self.errors_pct, strict=True)
            ],
            "mean_abs_error_pct": self.mean_abs_error_pct,
        }

    def table(self) -> str:
        rows = [f"{'held-out allocation':<22}{'live':>10}{'simulated':>11}{'error':>8}"]
        for m, p, e in zip(self.holdout, self.predictions, self.errors_pct, strict=True):
            rows.append(f"{m.allocation!s:<22}{m.throughput:>10.0f}{p:>11.0f}{e:>7.1f}%")
        rows.append(f"mean absolute error {self.mean_abs_error_pct:.1f}% "
                    f"over {len(self.holdout)} allocations the fit did not see")
        return "\n".join(rows)


def calibrate(
    setup: LiveSetup,
    *,
    quick: bool = False,
    warmup_s: float | None = None,
    measure_s: float | None = None,
    n_holdout: int = 4,
    data_dir: str | Path | None = None,
    name: str = "live-calibrated",
    progress: Callable[[str, Measurement], None] | None = None,
) -> CalibrationReport:
    """Measure, fit, build the scenario, and test it at held-out allocations."""
    warmup_s = (0.5 if quick else 1.0) if warmup_s is None else warmup_s
    measure_s = (1.0 if quick else 2.0) if measure_s is None else measure_s
    train = training_allocations(setup, quick)
    hold = holdout_allocations(setup, train, n=n_holdout, seed=setup.seed + 1)

    def tag(label: str) -> Callable[[Measurement], None] | None:
        return None if progress is None else (lambda m: progress(label, m))

    ms = measure(setup, train, warmup_s=warmup_s, measure_s=measure_s, data_dir=data_dir,
                 progress=tag("fit"))
    fits = fit(setup, ms)
    scenario = scenario_dict(setup, fits, ms, name=name)
    validate_scenario(scenario)
    hs = measure(setup, hold, warmup_s=warmup_s, measure_s=measure_s, data_dir=data_dir,
                 progress=tag("held-out"))
    preds = [predict(scenario, m.allocation) for m in hs]
    return CalibrationReport(scenario=scenario, train=ms, holdout=hs, predictions=preds)


def write_scenario(scenario: dict[str, Any], path: str | Path, header: str = "") -> None:
    """Write the scenario YAML (atomically: temporary file, then rename)."""
    path = Path(path)
    text = ""
    if header:
        text += "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(scenario, sort_keys=False, default_flow_style=None, width=100)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Exhaustive sweep of static allocations
# --------------------------------------------------------------------------------------
def grid(setup: LiveSetup, max_per_stage: Sequence[int] | None = None) -> list[list[int]]:
    """Every allocation with ``1 <= k_s <= max_per_stage[s]`` within the worker budget."""
    hi = list(max_per_stage) if max_per_stage is not None else list(setup.max_workers)
    if len(hi) != N_STAGES:
        raise ValueError(f"grid needs {N_STAGES} maxima, got {hi}")
    hi = [min(h, m) for h, m in zip(hi, setup.max_workers, strict=True)]
    return [list(a) for a in itertools.product(*(range(1, h + 1) for h in hi))
            if sum(a) <= setup.cpus]


def sweep(setup: LiveSetup, allocations: Sequence[Sequence[int]], *,
          warmup_s: float = 1.0, measure_s: float = 2.0, data_dir: str | Path | None = None,
          progress: Callable[[Measurement], None] | None = None) -> dict[str, Any]:
    """Measure every allocation; the result (JSON-ready) names the best under ``"best"``."""
    ms = measure(setup, allocations, warmup_s=warmup_s, measure_s=measure_s,
                 data_dir=data_dir, progress=progress)
    best = max(ms, key=lambda m: m.throughput)
    return {
        "setup": asdict(setup),
        "warmup_s": warmup_s,
        "measure_s": measure_s,
        "results": [{"allocation": m.allocation, "throughput": m.throughput,
                     "memory_bytes": m.memory_bytes, "utilisation": m.utilisation}
                    for m in ms],
        "best": {"throughput": best.throughput, "allocation": best.allocation},
    }


def save_json(data: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _unique(allocs: Iterable[Sequence[int]]) -> list[list[int]]:
    seen: set[tuple[int, ...]] = set()
    out = []
    for a in allocs:
        t = tuple(a)
        if t not in seen:
            seen.add(t)
            out.append(list(a))
    return out
