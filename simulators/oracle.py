"""The exact oracle: the best static allocation under the current conditions.

Problem: choose integers ``1 <= k_i <= max_cpus_i`` with ``sum(k) <= cpus`` to maximise the
steady-state throughput ``min(gpu_rate, min_i capacity_i(k_i))`` subject to worst-case
memory ``fixed + sum_i memory_i(k_i) <= capacity`` (every buffer full: holding the
allocation can never run out of memory), ties broken by the least memory.

Exact method. Any allocation reaching throughput ``X`` must give every stage at least
``need_i(X) = min{k : capacity_i(k) >= X}`` CPUs; since memory never falls as CPUs grow
(checked when tables are built), ``need(X)`` is, among all allocations reaching ``X``, the
one with least CPUs *and* least memory. Feasibility of ``X`` is monotone, so a binary
search over the candidate levels ``{capacity_i(k)} ∪ {gpu_rate}`` finds the best level,
and ``need(best)`` is the answer. Cost: ``O(N K log(N K))`` once per conditions, a few
milliseconds at 8 stages x 128 CPUs; the result is cached per conditions.

Caveat: oversubscribed allocations (``sum(k) > cpus``, which the env's actions never
produce) are time-sliced by the simulator and can, in rare fractional cases, slightly
exceed this figure; the oracle is the limit for allocations within the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simulators.conditions import Compiled, Conditions, compile_conditions


@dataclass(frozen=True)
class OracleResult:
    """Best static allocation: throughput (samples/s), allocation and its worst-case memory."""

    throughput: float
    allocation: tuple[int, ...]
    memory_bytes: int
    feasible: bool = True


def _need(running_max: list[np.ndarray], level: float) -> list[int] | None:
    """Least CPUs per stage to reach ``level``; None if some stage cannot."""
    need = []
    for rm in running_max:
        k = int(np.searchsorted(rm, level, side="left"))
        if k >= len(rm):
            return None
        need.append(max(k, 1))
    return need


def solve(compiled: Compiled, cond: Conditions) -> OracleResult:
    """Exact best allocation for tabulated stages (see the module docstring)."""
    n = len(compiled.capacity)
    # running_max[i][k]: best capacity with at most k CPUs (handles non-monotone models);
    # index 0 is forced to 0 because every stage needs at least one CPU.
    running_max = []
    for cap in compiled.capacity:
        arr = np.maximum.accumulate(np.asarray(cap, dtype=float))
        arr[0] = 0.0
        running_max.append(arr)
    budget = cond.memory_capacity_bytes - cond.fixed_memory_bytes

    def feasible(level: float) -> list[int] | None:
        need = _need(running_max, level)
        if need is None or sum(need) > cond.cpus:
            return None
        mem = sum(compiled.worst_memory[i][need[i]] for i in range(n))
        return need if mem <= budget else None

    levels = np.unique(np.concatenate([a[1:] for a in running_max] + [[cond.gpu_rate]]))
    levels = levels[levels <= cond.gpu_rate]
    lo, hi = 0, len(levels) - 1  # find the largest feasible index
    best: list[int] | None = None
    best_level = 0.0
    while lo <= hi:
        mid = (lo + hi) // 2
        need = feasible(float(levels[mid]))
        if need is None:
            hi = mid - 1
        else:
            best, best_level = need, float(levels[mid])
            lo = mid + 1
    if best is None:
        # Even one CPU per stage does not fit: report it, the env will crash right away.
        ones = [1] * n
        mem = sum(compiled.worst_memory[i][1] for i in range(n))
        thr = min(cond.gpu_rate, min(compiled.capacity[i][1] for i in range(n)))
        return OracleResult(thr, tuple(ones), cond.fixed_memory_bytes + mem, feasible=False)
    throughput = min(cond.gpu_rate, min(compiled.capacity[i][best[i]] for i in range(n)))
    assert throughput >= best_level
    mem = sum(compiled.worst_memory[i][best[i]] for i in range(n))
    return OracleResult(float(throughput), tuple(best), cond.fixed_memory_bytes + mem)


@lru_cache(maxsize=1024)
def oracle(cond: Conditions) -> OracleResult:
    """The oracle for ``cond``, computed once per distinct conditions."""
    return solve(compile_conditions(cond), cond)


def static_throughput(compiled: Compiled, cond: Conditions, allocation: list[int]) -> float:
    """Noise-free steady-state throughput of holding ``allocation`` (time-slicing included)."""
    share = oversubscription_share(sum(allocation), cond.cpus, cond.oversubscription_overhead)
    slowest = min(compiled.capacity[i][k] * share for i, k in enumerate(allocation))
    return min(cond.gpu_rate, slowest)


def oversubscription_share(total: int, cpus: int, overhead: float) -> float:
    """Fraction of its nominal capacity each stage keeps when ``total`` CPUs share ``cpus``.

    Time-slicing gives every thread ``cpus / total`` of a CPU; context switches cost a
    further ``overhead`` per 100% of oversubscription.
    """
    if total <= cpus:
        return 1.0
    return (cpus / total) / (1.0 + overhead * (total / cpus - 1.0))
