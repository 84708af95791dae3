"""Per-run metrics and the statistics across seeds (IQM, percentile bootstrap).

Metrics of a run (``throughput / oracle throughput`` per step; after an out-of-memory
crash the job produces nothing, so the remaining steps count as 0):

- ``final_fraction``: mean over the last 20% of the episode; ``mean_fraction``: whole
  episode;
- ``time_to_90_s``: simulated seconds from the start until throughput stays at or above
  0.9 of the oracle to the end (``None`` if it never does or the job crashed);
- ``mean_memory_fraction``: mean memory used / memory capacity of the machine over the
  steps that ran (the "memory" column of ``summary.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FINAL_SHARE = 0.2  # the "final" window: last 20% of the episode
TARGET = 0.9  # time_to_90_s threshold
N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 20230918


def episode_metrics(time_s: Sequence[float], fraction: Sequence[float],
                    memory_fraction: Sequence[float], throughput: Sequence[float],
                    oom: bool, n_steps: int, dt: float) -> dict[str, Any]:
    """The per-run metrics (see the module docstring) of one traced episode.

    ``n_steps`` is the planned episode length; steps missing after a crash count as 0.
    """
    f = np.nan_to_num(np.asarray(fraction, dtype=float), nan=0.0)
    thr = np.asarray(throughput, dtype=float)
    missing = max(n_steps - len(f), 0)
    f = np.concatenate([f, np.zeros(missing)])
    thr = np.concatenate([thr, np.zeros(missing)])
    tail = max(1, math.ceil(FINAL_SHARE * n_steps))
    t90: float | None = None
    if not oom and len(f):
        below = np.flatnonzero(f < TARGET)
        if len(below) == 0:
            t90 = float(time_s[0]) - dt if len(time_s) else 0.0
        elif below[-1] < len(f) - 1:
            t90 = float(time_s[below[-1]])  # end of the last interval below the target
    return {
        "final_fraction": float(f[-tail:].mean()) if len(f) else 0.0,
        "mean_fraction": float(f.mean()) if len(f) else 0.0,
        "oom": int(bool(oom)),
        "time_to_90_s": t90,
        "mean_memory_fraction": float(np.mean(memory_fraction)) if len(memory_fraction)
        else 0.0,
        "final_throughput": float(thr[-tail:].mean()) if len(thr) else 0.0,
        "mean_throughput": float(thr.mean()) if len(thr) else 0.0,
    }


def iqm(x: Sequence[float] | np.ndarray, axis: int = -1) -> Any:
    """Interquartile mean: the mean of the middle 50% (scipy's ``trim_mean(x, 0.25)``)."""
    from scipy.stats import trim_mean

    return trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


def bootstrap_ci(x: Sequence[float], stat: Callable[..., Any] = iqm,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``stat`` across seeds (seeded; a point for < 2 seeds)."""
    a = np.asarray(x, dtype=float)
    if len(a) == 0:
        return (math.nan, math.nan)
    if len(a) < 2 or np.all(a == a[0]):
        v = float(stat(a))
        return (v, v)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(a), size=(N_BOOTSTRAP, len(a)))
    stats = stat(a[idx], axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def summarise(rows: list[dict[str, Any]], scenarios: Sequence[str],
              agents: Sequence[str]) -> list[dict[str, Any]]:
    """Per (scenario, agent): IQM and 95% CI of final_fraction, OOM rate, median
    time_to_90_s, mean memory fraction and throughput ratio to autotune (mean final
    throughput over the seeds both ran)."""
    out = []
    for sc in scenarios:
        auto = {r["seed"]: r["final_throughput"] for r in rows
                if r["scenario"] == sc and r["agent"] == "autotune"}
        for ag in agents:
            rs = [r for r in rows if r["scenario"] == sc and r["agent"] == ag]
            if not rs:
                continue
            ff = [float(r["final_fraction"]) for r in rs]
            lo, hi = bootstrap_ci(ff)
            t90 = [math.inf if r["time_to_90_s"] is None else float(r["time_to_90_s"])
                   for r in rs]
            med = float(np.median(t90))
            common = [r for r in rs if r["seed"] in auto]
            ratio = None
            den = sum(auto[r["seed"]] for r in common)
            if common and den > 0:
                ratio = sum(float(r["final_throughput"]) for r in common) / den
            out.append({
                "scenario": sc, "agent": ag, "n_seeds": len(rs),
                "final_fraction_iqm": float(iqm(ff)), "final_fraction_ci95": [lo, hi],
                "mean_fraction_iqm": float(iqm([float(r["mean_fraction"]) for r in rs])),
                "oom_rate": float(np.mean([int(r["oom"]) for r in rs])),
                "median_time_to_90_s": None if math.isinf(med) else med,
                "reached_90": int(sum(not math.isinf(t) for t in t90)),
                "mean_memory_fraction": float(np.mean([float(r["mean_memory_fraction"])
                                                       for r in rs])),
                "throughput_ratio_to_autotune": ratio,
            })
    return out
