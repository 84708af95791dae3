"""Generated DLRM input pipelines: a benchmark suite with disjoint train and test splits.

Every generated scenario is a plain dict that :func:`simulators.scenario.load_scenario`
validates, drawn from a seeded generator (the same seed gives the same dict) within
these documented ranges:

- 2 to 8 stages, named after the steps of a DLRM input pipeline in their usual order
  (``read`` first); 4 to 128 CPUs (log-uniform), at least one per stage;
- a consumer (GPU) rate of 10**4.5 to 10**6.3 samples/s; stage rates set so that the
  pipeline needs 0.5 to 2.5 times the machine's CPUs to feed the GPU (some pipelines
  are GPU-bound, most CPU-bound), split across stages by a Dirichlet draw;
- sequential stages (``max_cpus: 1``, 20% of non-read stages) fast enough to feed 0.8 to
  3 times the GPU; parallel stages capped at 30% to 100% of the CPUs;
- contention (sublinear scaling ``k / (1 + c (k - 1))``): none (50%), mild (c up to
  0.02, 30%) or strong (c 0.02 to 0.1, 20%);
- a read bandwidth cap (35%) at 0.3 to 1.2 times the GPU's rate;
- per-worker memory 10 MiB to 1 GiB, buffered samples of 0.1 to 4 KiB, buffers of 1,000
  to 65,536 samples plus up to 2,048 per worker, shuffle state 100 MiB to 2 GiB;
- noise cv 0 to 0.2 (uniform);
- memory: the trainer's own memory (``base_memory_gib``, 4 to 64 GiB) plus the
  pipeline's. In 30% of pipelines ("memory-tight") capacity lies between the worst case
  of one CPU per stage and that of the even split, so the even split does not fit;
  otherwise it leaves room for the even split or more;
- 0 to 3 events between 100 s and 1000 s: the machine grows or shrinks (and may come
  back), a bandwidth cap drops or rises mid-run, a stage's rate drifts (0.5 to 1.5x),
  co-tenant memory arrives (and usually leaves later).

By construction the default start fits: one CPU per stage fits with at least 10% of
capacity to spare under every condition the scenario reaches (co-tenants included),
so the oracle is feasible in every phase and the env's default start (the even split
scaled down until it fits, else one CPU per stage) never starts out of memory. A
co-tenant is also small enough that the oracle allocation of the phase before it
arrives survives it (worst case), so no crash is unavoidable.

Named suites (:data:`SUITES`) are usable wherever a scenario name is:
``suite:test:0017`` is member 17 of the test split (see :func:`expand_suite`).
This module does not import gymnasium.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulators.fileio import contained, echo, refuse_folders, write_text_atomic

#: Stage names in pipeline order; a generated pipeline keeps ``read`` and picks the rest.
STAGE_NAMES = ("read", "parse", "shuffle", "transform", "hash", "batch", "collate", "gpu_load")
#: One CPU per stage keeps at least this fraction of memory free in every phase.
START_MARGIN = 0.10
MIB_PER_GIB = 1024.0


@dataclass(frozen=True)
class Suite:
    """A named split: ``count`` members generated from ``seed`` (member ``i``: ``(seed, i)``)."""

    seed: int
    count: int


#: The named splits; their seeds differ, so no member of one is a member of the other.
SUITES: dict[str, Suite] = {"train": Suite(seed=8_001, count=200),
                            "test": Suite(seed=8_002, count=200)}

_SUITE_RE = re.compile(r"suite:([A-Za-z0-9_-]+)(?::(.*))?", re.DOTALL)


def _rng(seed: int, index: int | None) -> np.random.Generator:
    if seed < 0 or (index is not None and index < 0):
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(seed if index is None else [seed, index])


def _stage_memory_mib(st: dict[str, Any], k: int) -> float:
    """Worst-case memory of a stage holding ``k`` CPUs (workers + full buffer + state)."""
    elem_mib = st["element_kib"] / 1024.0
    buffered = st["buffer"] + st["buffer_per_cpu"] * k
    return k * st["worker_memory_mib"] + buffered * elem_mib + st["state_mib"]


def _even(cpus: int, max_cpus: list[int]) -> list[int]:
    """The even split of ``cpus`` capped by each stage's ``max_cpus`` (at least one each)."""
    n = len(max_cpus)
    return [max(1, min(m, cpus // n)) for m in max_cpus]


def generate_scenario(seed: int, index: int | None = None) -> dict[str, Any]:
    """One random pipeline (a scenario dict), the same for the same ``(seed, index)``.

    Named ``gen-<seed>`` or, with an ``index``, ``gen-<seed>-<index>``.
    """
    rng = _rng(seed, index)
    name = f"gen-{seed}" if index is None else f"gen-{seed}-{index}"
    n = int(rng.integers(2, 9))
    cpus = max(n, int(2 ** rng.uniform(2, 7) + 0.5))  # 4..128, log-uniform
    gpu = float(round(10 ** rng.uniform(4.5, 6.3)))
    picked = rng.choice(STAGE_NAMES[1:], size=n - 1, replace=False)
    names = ["read", *sorted((str(x) for x in picked), key=STAGE_NAMES.index)]
    demand = float(rng.uniform(0.5, 2.5))  # CPUs needed to feed the GPU / machine CPUs
    weights = rng.dirichlet(np.ones(n) * 1.5)
    stages: list[dict[str, Any]] = []
    for i, sname in enumerate(names):
        seq = i > 0 and rng.random() < 0.2
        family = rng.random()
        contention = 0.0 if family < 0.5 else (
            float(rng.uniform(0.0, 0.02)) if family < 0.8 else float(rng.uniform(0.02, 0.1)))
        if seq:
            rate = gpu * float(rng.uniform(0.8, 3.0))
            max_cpus = 1
            contention = 0.0
        else:
            need = max(0.5, cpus * demand * float(weights[i]))  # CPUs to feed the GPU
            rate = gpu / need
            max_cpus = max(2, int(cpus * rng.uniform(0.3, 1.0) + 0.5))
        st: dict[str, Any] = {
            "name": sname,
            "rate_per_cpu": float(round(rate, 1)),
            "max_cpus": max_cpus,
            "contention": round(contention, 4),
            "worker_memory_mib": float(round(10 ** rng.uniform(1, 3), 1)),
            "element_kib": float(round(rng.uniform(0.1, 4.0), 3)),
            "buffer": int(rng.integers(1000, 65537)),
            "buffer_per_cpu": int(rng.integers(0, 2049)) if rng.random() < 0.5 else 0,
            "state_mib": float(round(rng.uniform(100, 2000), 1)) if sname == "shuffle" else 0.0,
        }
        if sname == "read" and rng.random() < 0.35:
            st["bandwidth_cap"] = float(round(gpu * rng.uniform(0.3, 1.2)))
        stages.append(st)

    # Memory: trainer + pipeline. One CPU per stage always fits with START_MARGIN spare.
    base = float(round(rng.uniform(4, 64), 2))
    ones = sum(_stage_memory_mib(st, 1) for st in stages) / MIB_PER_GIB
    even = sum(_stage_memory_mib(st, k) for st, k in
               zip(stages, _even(cpus, [s["max_cpus"] for s in stages]), strict=True)) / MIB_PER_GIB
    tight = rng.random() < 0.3 and even > ones * 1.05
    if tight:
        pipeline = ones + float(rng.uniform(0.1, 0.8)) * (even - ones)
    else:
        pipeline = even * float(rng.uniform(1.1, 2.0))
    events: list[dict[str, Any]] = []
    cotenant = 0.0
    if rng.random() < 0.25:  # co-tenant memory arrives, usually leaves later
        cotenant = float(round((base + pipeline) * rng.uniform(0.05, 0.25), 2))
        at = float(rng.integers(100, 800))
        events.append({"at_s": at, "cotenant_memory_gib": cotenant})
        if rng.random() < 0.7:
            events.append({"at_s": float(rng.integers(int(at) + 50, 1001)),
                           "cotenant_memory_gib": 0.0})
    # Enough for one CPU per stage plus the largest co-tenant, START_MARGIN to spare.
    floor = (base + ones + cotenant) / (1 - START_MARGIN)
    memory = float(math.ceil(max(base + pipeline, floor) * 100 + 1) / 100)
    if rng.random() < 0.3:  # the machine grows or shrinks, and may come back
        at = float(rng.integers(100, 800))
        new = int(min(128, max(n, round(cpus * rng.uniform(0.4, 1.6)))))
        if new != cpus:
            events.append({"at_s": at, "cpus": new})
            if rng.random() < 0.4:
                events.append({"at_s": float(rng.integers(int(at) + 50, 1001)), "cpus": cpus})
    if "bandwidth_cap" in stages[0] and rng.random() < 0.5:  # a cap that moves mid-run
        factor = rng.uniform(0.4, 0.8) if rng.random() < 0.7 else rng.uniform(1.2, 2.0)
        events.append({"at_s": float(rng.integers(100, 1001)), "stage": "read",
                       "bandwidth_cap": float(round(stages[0]["bandwidth_cap"] * factor))})
    if rng.random() < 0.25:  # a stage's rate drifts
        events.append({"at_s": float(rng.integers(100, 1001)),
                       "stage": names[int(rng.integers(n))],
                       "rate_per_cpu_factor": float(round(rng.uniform(0.5, 1.5), 3))})
    events.sort(key=lambda e: e["at_s"])
    out = {
        "name": name,
        "description": f"generated (seed {seed}" + ("" if index is None else f", index {index}")
                       + ("; memory-tight" if tight else "") + ")",
        "machine": {"cpus": cpus, "memory_gib": memory, "base_memory_gib": base,
                    "gpu_rate": gpu},
        "stages": stages,
        "events": events,
        "noise_cv": float(round(rng.uniform(0.0, 0.2), 4)),
    }
    # A co-tenant must not crash even the oracle's allocation of the phase before it
    # arrives (no tuner could avoid that crash): shrink it until it does not, else drop it.
    for _ in range(8):
        if oracle_survives_events(out):
            break
        for ev in out["events"]:
            if ev.get("cotenant_memory_gib"):
                ev["cotenant_memory_gib"] = float(round(ev["cotenant_memory_gib"] / 2, 3))
    else:
        out["events"] = [e for e in out["events"] if "cotenant_memory_gib" not in e]
    return out


def oracle_survives_events(data: Any) -> bool:
    """Does the previous phase's oracle allocation fit (worst case) after every event?

    ``data``: a scenario dict or :class:`simulators.scenario.Scenario`. False means some
    event crashes even the oracle: no tuner could avoid that out-of-memory crash.
    """
    from simulators.conditions import Conditions, compile_conditions
    from simulators.oracle import oracle
    from simulators.scenario import load_scenario

    sc = load_scenario(data)
    cond = Conditions.initial(sc)
    best = oracle(cond).allocation
    for ev in sorted(sc.events, key=lambda e: e.at_s):
        cond = cond.apply(ev)
        comp = compile_conditions(cond)
        need = cond.fixed_memory_bytes + sum(comp.worst_memory[i][k] for i, k in enumerate(best))
        if need > cond.memory_capacity_bytes:
            return False
        best = oracle(cond).allocation
    return True


def generate_scenarios(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` pipelines: member ``i`` is ``generate_scenario(seed, i)``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [generate_scenario(seed, i) for i in range(count)]


def write_scenarios(count: int, seed: int, out_dir: Path) -> list[Path]:
    """Write ``count`` generated pipelines as ``<out_dir>/gen-<seed>-<i>.yaml`` (atomic)."""
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios = generate_scenarios(count, seed)
    paths = [contained(out_dir, f"{sc['name']}.yaml") for sc in scenarios]
    refuse_folders(paths)  # before the first write: a refused set leaves no part behind
    for sc, path in zip(scenarios, paths, strict=True):
        write_text_atomic(path, yaml.safe_dump(sc, sort_keys=False))
    return paths


def suite_members(name: str) -> list[str]:
    """Member names of suite ``name`` (``suite:<name>:<i>``, four digits); KeyError if none."""
    suite = SUITES[name]
    return [f"suite:{name}:{i:04d}" for i in range(suite.count)]


def _parse_suite(name: str) -> tuple[str, int | None]:
    """``suite:NAME[:INDEX]`` -> (NAME, INDEX or None); ``ValueError`` (one line) naming
    what is wrong: an unknown suite, an index that is not an integer or out of range."""
    m = _SUITE_RE.fullmatch(name)
    if m is None or m.group(1) not in SUITES:
        raise ValueError(f"{echo(name, 80)}: unknown suite; expected suite:NAME or "
                         f"suite:NAME:INDEX with NAME one of {', '.join(SUITES)}")
    split, text = m.group(1), m.group(2)
    if text is None:
        return split, None
    count = SUITES[split].count
    valid = f"suite {split!r} has members 0..{count - 1}"
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError(f"{echo(name, 80)}: index {echo(text, 20)!r} is not an integer; "
                         f"{valid}")
    # a long digit string is out of range without converting it
    index = int(text) if len(text) <= 12 else count
    if not 0 <= index < count:
        raise ValueError(f"{echo(name, 80)}: index {echo(text, 20)} is out of range; {valid}")
    return split, index


def expand_suite(name: str) -> list[str] | None:
    """``suite:test`` -> its member names; a member name -> itself; None for other names.

    Raises ``ValueError`` (one line) for an unknown suite or a bad index.
    """
    if not name.startswith("suite:"):
        return None
    split, index = _parse_suite(name)
    return suite_members(split) if index is None else [name]


def suite_scenario(name: str) -> dict[str, Any]:
    """The scenario dict of a suite member ``suite:<split>:<index>``; ``ValueError`` if none."""
    split, index = _parse_suite(name)
    if index is None:
        raise ValueError(f"{echo(name, 80)}: a whole suite, not one member; expected "
                         f"suite:{split}:INDEX (0..{SUITES[split].count - 1})")
    return generate_scenario(SUITES[split].seed, index)
