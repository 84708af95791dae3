"""Fluid-queue simulation of a multi-stage input pipeline feeding one trainer.

Stages ``0 .. N-1`` form a chain; stage 0 reads from an unbounded dataset, stage ``i``
writes into output buffer ``i`` (capacity ``B_i`` samples) and the trainer drains the last
buffer at up to ``gpu_rate`` samples/s. One :meth:`PipelineSim.step` is one control
interval of ``dt`` seconds:

1. events due by now change the conditions (tables and oracle are cached per conditions);
2. stage ``i`` may process at most ``c_i = floor(capacity_i(k_i) * share * noise_i * dt)``
   samples, where ``share`` degrades oversubscribed machines (time-slicing) and
   ``noise_i = 1 + noise_cv * sqrt(3) * (2u - 1)`` with ``u`` uniform on [0, 1) (mean 1,
   standard deviation ``noise_cv``);
3. flows are the largest the chain allows. Forward, what each stage can get:
   ``S_0 = c_0``, ``S_i = min(c_i, b_{i-1} + S_{i-1})``; the trainer takes
   ``G = min(gpu_rate * dt, b_{N-1} + S_{N-1})``. Backward, room downstream:
   ``P_i = min(S_i, max(0, B_i - b_i + P_{i+1}))`` with ``P_N = G``;
4. buffers update ``b_i += P_i - P_{i+1}``; memory is
   ``base + cotenant + sum_i(workers_i(k_i) + b_i * element_bytes_i + state_i)``; above
   the capacity the job is out of memory.

All sample counts are integers, so conservation is exact: samples read equal samples
consumed plus samples in buffers, always. Randomness comes only from the generator given
to :meth:`PipelineSim.reset`, drawn in blocks of :data:`NOISE_BLOCK` intervals, so a
batched implementation can reproduce a trajectory bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from types import MethodType
from typing import Any

import numpy as np

from simulators.conditions import Compiled, Conditions, compile_conditions
from simulators.oracle import OracleResult, oracle, oversubscription_share
from simulators.scenario import Scenario, ScenarioError

#: Noise is drawn this many intervals at a time (shape ``(NOISE_BLOCK, n_stages)``).
NOISE_BLOCK = 64
GPU = "gpu"


#: Uniform noise on [-1, 1) scaled by this has standard deviation 1.
NOISE_SCALE = 3.0 ** 0.5


def noise_block(rng: np.random.Generator, n_stages: int, noise_cv: float) -> np.ndarray:
    """Multiplicative rate noise for the next :data:`NOISE_BLOCK` intervals.

    ``1 + noise_cv * sqrt(3) * (2u - 1)`` with ``u`` uniform on [0, 1): mean 1, standard
    deviation ``noise_cv``, bounded by ``1 +/- 1.74 noise_cv``. Uniform rather than
    normal draws: bounded (a rate never turns negative) and about 4x cheaper to draw,
    which matters to the batched env, where every sub-env draws from its own generator.
    """
    u = rng.random((NOISE_BLOCK, n_stages))
    return 1.0 + (noise_cv * NOISE_SCALE) * (2.0 * u - 1.0)


def check_allocation(allocation: Sequence[int], max_cpus: Sequence[int],
                     stage_names: Sequence[str]) -> list[int]:
    """``allocation`` as a list of ints, or a clear ``ValueError``: one entry per stage,
    each within ``1..max_cpus`` (the total is not checked: oversubscription is allowed)."""
    alloc = [int(k) for k in allocation]
    if len(alloc) != len(stage_names):
        raise ValueError(f"allocation has {len(alloc)} entries; the pipeline has "
                         f"{len(stage_names)} stages ({', '.join(stage_names)})")
    for name, k, hi in zip(stage_names, alloc, max_cpus, strict=True):
        if not 1 <= k <= hi:
            raise ValueError(f"allocation for stage {name!r} is {k}; expected 1..{hi}")
    return alloc


class PipelineSim:
    """One simulated pipeline. Knows nothing of Gymnasium.

    Args:
        scenario: the validated scenario.
        control_interval_s: simulated seconds per :meth:`step` (default: the scenario's).
        noise_cv: rate variation (default: the scenario's); 0 makes it deterministic.
    """

    def __init__(self, scenario: Scenario, control_interval_s: float | None = None,
                 noise_cv: float | None = None) -> None:
        self.scenario = scenario
        self.n = len(scenario.stages)
        self.stage_names = scenario.stage_names
        self.dt = float(control_interval_s if control_interval_s is not None
                        else scenario.control_interval_s)
        self.noise_cv = float(noise_cv if noise_cv is not None else scenario.noise_cv)
        self.events = sorted(scenario.events, key=lambda e: e.at_s)
        self._next_event = 0
        self._next_at = self.events[0].at_s if self.events else math.inf
        self.max_cpus = tuple(s.max_cpus for s in scenario.stages)
        self.allocation = [1] * self.n
        self.buffers = [0] * self.n
        self._chain: dict[int, list[Any]] = {}  # see _enter_conditions
        self._chain_j = -1
        self._set_conditions(Conditions.initial(scenario))
        self._reset_counters()
        self._bind_fast_step()

    def _bind_fast_step(self) -> None:
        # The instance's ``step`` is the stage-count-specialised, unrolled copy of
        # :meth:`PipelineSim.step` (same operations in the same order, ~2x faster).
        self.step = MethodType(unrolled_step(self.n), self)  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("step", None)  # generated code does not pickle; rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind_fast_step()

    # --- state ---------------------------------------------------------------------
    def _set_conditions(self, cond: Conditions, compiled: Compiled | None = None,
                        orc: OracleResult | None = None) -> None:
        self.conditions = cond
        self.compiled: Compiled = compiled if compiled is not None else compile_conditions(cond)
        self.cpus = cond.cpus
        self._gpu_cap = int(cond.gpu_rate * self.dt)
        # Per-conditions constants, so a step never hashes Conditions (the oracle's
        # lru_cache key hashes every StageSpec) nor walks attribute chains.
        self._oracle: OracleResult | None = orc
        comp = self.compiled
        self._cap_tab = comp.capacity
        self._buf_tab = comp.buffers
        self._workers_tab = comp.workers
        self._elem = tuple(comp.element_bytes)
        self._mem_fixed = cond.fixed_memory_bytes + sum(comp.state_bytes)
        self._mem_cap = cond.memory_capacity_bytes
        self._overhead = cond.oversubscription_overhead

    def _reset_counters(self) -> None:
        self.steps = 0
        self.samples_in = 0
        self.samples_out = 0
        self.oom = False
        self.last_capacity = [0] * self.n
        self.last_processed = [0] * self.n
        self.last_consumed = 0
        self.memory_bytes = self._memory()

    def _enter_conditions(self, j: int) -> None:
        """Conditions after the first ``j`` events, memoised per simulator.

        Events apply in a fixed order, so the j-th conditions are always equal; the memo
        spares every reset and event the hashing of a Conditions (lru_cache keys).
        """
        memo = self._chain.get(j)
        if memo is not None:
            self._set_conditions(*memo)
            self._chain_j = j
            return
        if j == 0:
            cond = Conditions.initial(self.scenario)
        else:
            cond = self.conditions.apply(self.events[j - 1])
        try:
            self._set_conditions(cond)
        except ValueError as err:
            if j == 0:
                raise
            raise ScenarioError(f"{self.scenario.name}: events.{j - 1}: {err}") from None
        self._chain[j] = [cond, self.compiled, None]
        self._chain_j = j

    def reset(self, rng: np.random.Generator, allocation: Sequence[int]) -> None:
        """Start over from empty buffers, the scenario's conditions and ``allocation``."""
        self._rng = rng
        self._next_event = 0
        self.steps = 0
        self._enter_conditions(0)
        self._apply_due_events()
        self.buffers = [0] * self.n
        self.set_allocation(allocation)
        self._noise: list[list[float]] = []
        self._row = NOISE_BLOCK
        self._reset_counters()

    def set_allocation(self, allocation: Sequence[int]) -> None:
        """Hold ``allocation`` from now on. Oversubscription is allowed (and degraded)."""
        self.allocation = check_allocation(allocation, self.max_cpus, self.stage_names)

    @property
    def time_s(self) -> float:
        """Simulated seconds since reset."""
        return self.steps * self.dt

    @property
    def memory_capacity_bytes(self) -> int:
        return self.conditions.memory_capacity_bytes

    def oracle(self) -> OracleResult:
        """Best static allocation under the current conditions (cached)."""
        orc = self._oracle
        if orc is None:
            orc = self._oracle = oracle(self.conditions)
            memo = self._chain.get(self._chain_j)
            if memo is not None and memo[0] is self.conditions:
                memo[2] = orc
        return orc

    def _apply_due_events(self) -> bool:
        changed = False
        t = self.time_s
        while self._next_event < len(self.events) and self.events[self._next_event].at_s <= t:
            self._enter_conditions(self._next_event + 1)
            self._next_event += 1
            changed = True
        # time of the next event (inf: none left), so a step tests one float
        self._next_at = (self.events[self._next_event].at_s
                         if self._next_event < len(self.events) else math.inf)
        return changed

    def _memory(self) -> int:
        # Integers, so the order of the sum does not matter (exact).
        wk, elem, b = self._workers_tab, self._elem, self.buffers
        mem = self._mem_fixed
        for i, k in enumerate(self.allocation):
            mem += wk[i][k] + b[i] * elem[i]
        return mem

    # --- dynamics ------------------------------------------------------------------
    def step(self) -> None:
        """Advance one control interval (see the module docstring).

        This is the reference implementation; instances run :func:`unrolled_step`, its
        exact unrolled equivalent (``tests/test_golden.py`` checks both).
        """
        # Hot path (millions of calls): locals instead of attribute chains, forward and
        # backward passes fused with the buffer and memory updates. Float operations keep
        # the documented order, so results are bit-for-bit those of the plain formulas
        # (and of the batched ``intune_env.vector``).
        dt = self.dt
        if self._next_event < len(self.events) and \
                self.events[self._next_event].at_s <= self.steps * dt:
            self._apply_due_events()
        row = self._row
        if row >= NOISE_BLOCK:
            self._noise = noise_block(self._rng, self.n, self.noise_cv).tolist()
            row = 0
        noise = self._noise[row]
        self._row = row + 1

        n = self.n
        alloc, b = self.allocation, self.buffers
        total = sum(alloc)
        cpus = self.cpus
        if total <= cpus:  # share == 1.0 and x * 1.0 == x exactly: skip the product
            c = [int(tab[k] * z * dt) for tab, k, z in zip(self._cap_tab, alloc, noise,
                                                            strict=True)]
        else:
            share = oversubscription_share(total, cpus, self._overhead)
            c = [int(tab[k] * share * z * dt) for tab, k, z in zip(self._cap_tab, alloc, noise,
                                                                    strict=True)]

        supply = c[:]  # forward pass: what each stage can process given its input
        prev = supply[0]
        for i in range(1, n):
            avail = b[i - 1] + prev
            prev = supply[i]
            if avail < prev:
                supply[i] = prev = avail
        g = b[n - 1] + prev
        gpu_cap = self._gpu_cap
        if gpu_cap < g:
            g = gpu_cap
        # backward pass (what fits downstream), buffer update and memory in one sweep
        p = [0] * n
        buf_tab, wk, elem = self._buf_tab, self._workers_tab, self._elem
        mem = self._mem_fixed
        nxt = g
        for i in range(n - 1, -1, -1):
            k = alloc[i]
            bi = b[i]
            room = buf_tab[i][k] - bi + nxt
            pi = supply[i]
            if room < pi:
                pi = room
            if pi < 0:
                pi = 0
            p[i] = pi
            bi += pi - nxt
            b[i] = bi
            mem += wk[i][k] + bi * elem[i]
            nxt = pi

        self.samples_in += p[0]
        self.samples_out += g
        self.last_capacity = c
        self.last_processed = p
        self.last_consumed = g
        self.steps += 1
        self.memory_bytes = mem
        if mem > self._mem_cap:
            self.oom = True

    # --- measurements --------------------------------------------------------------
    @property
    def throughput(self) -> float:
        """Samples/s handed to the trainer in the last interval."""
        return self.last_consumed / self.dt

    def utilisation(self) -> list[float]:
        """Busy fraction of each stage in the last interval."""
        return [p / c if c > 0 else 1.0
                for p, c in zip(self.last_processed, self.last_capacity, strict=True)]

    def buffer_capacities(self) -> list[int]:
        comp = self.compiled
        return [comp.buffers[i][k] for i, k in enumerate(self.allocation)]

    def bottleneck(self) -> str:
        """Stage with the least capacity in the last interval, or ``"gpu"`` if the trainer is."""
        c = self.last_capacity
        i = min(range(self.n), key=c.__getitem__)
        return GPU if self._gpu_cap <= c[i] else self.stage_names[i]


def step_body_source(n: int) -> list[str]:
    """Source lines (indented once) of :meth:`PipelineSim.step` unrolled for ``n`` stages.

    The lines expect the simulator in a local ``self`` and the names of
    :data:`STEP_NAMESPACE` as globals. They leave as locals what an observer needs:
    ``dt``, ``cpus``, ``alloc``, ``total`` (CPUs held) and for each stage ``i``: ``k{i}``
    (CPUs), ``c{i}`` (capacity), ``p{i}`` (processed), ``b{i}`` (buffer after the step)
    and ``B{i}`` (buffer capacity); ``g`` (consumed by the trainer) and ``mem`` (memory).
    Used by :func:`unrolled_step` and by ``intune_env.intune`` (which fuses it with the
    observation). Integer and float operations are exactly those of
    :meth:`PipelineSim.step`, in the same order, so results are bit-for-bit equal.
    """
    r = range(n)
    last = n - 1
    ks = ", ".join(f"k{i}" for i in r)
    bs = ", ".join(f"b{i}" for i in r)
    zs = ", ".join(f"z{i}" for i in r)
    lines = [
        "dt = self.dt",
        "if self._next_at <= self.steps * dt:  # an event is due",
        "    self._apply_due_events()",
        "row = self._row",
        "if row >= NOISE_BLOCK:",
        f"    self._noise = noise_block(self._rng, {n}, self.noise_cv).tolist()",
        "    row = 0",
        f"{zs}, = self._noise[row]",
        "self._row = row + 1",
        "alloc = self.allocation",
        f"{ks}, = alloc",
        "b = self.buffers",
        f"{bs}, = b",
        f"{', '.join(f'ct{i}' for i in r)}, = self._cap_tab",
        f"total = {' + '.join(f'k{i}' for i in r)}",
        "cpus = self.cpus",
        "if total <= cpus:  # share == 1.0, and x * 1.0 == x exactly",
        *[f"    c{i} = int(ct{i}[k{i}] * z{i} * dt)" for i in r],
        "else:",
        "    share = oversubscription_share(total, cpus, self._overhead)",
        *[f"    c{i} = int(ct{i}[k{i}] * share * z{i} * dt)" for i in r],
        "s0 = c0",
    ]
    for i in range(1, n):  # forward pass
        lines += [f"s{i} = b{i - 1} + s{i - 1}", f"if c{i} <= s{i}:", f"    s{i} = c{i}"]
    lines += [
        f"g = b{last} + s{last}",
        "gpu_cap = self._gpu_cap",
        "if gpu_cap < g:",
        "    g = gpu_cap",
        f"{', '.join(f'bt{i}' for i in r)}, = self._buf_tab",
        "nxt = g",
    ]
    for i in range(last, -1, -1):  # backward pass and buffer update
        lines += [
            f"B{i} = bt{i}[k{i}]",
            f"room = B{i} - b{i} + nxt",
            f"p{i} = s{i}",
            f"if room < p{i}:",
            f"    p{i} = room",
            f"if p{i} < 0:",
            f"    p{i} = 0",
            f"b{i} += p{i} - nxt",
            f"nxt = p{i}",
        ]
    mem = " + ".join(f"wk{i}[k{i}] + b{i} * e{i}" for i in r)
    lines += [
        f"b[:] = ({bs},)",
        "self.samples_in += p0",
        "self.samples_out += g",
        f"self.last_capacity = [{', '.join(f'c{i}' for i in r)}]",
        f"self.last_processed = [{', '.join(f'p{i}' for i in r)}]",
        "self.last_consumed = g",
        "self.steps += 1",
        f"{', '.join(f'wk{i}' for i in r)}, = self._workers_tab",
        f"{', '.join(f'e{i}' for i in r)}, = self._elem",
        f"self.memory_bytes = mem = self._mem_fixed + {mem}",
        "if mem > self._mem_cap:",
        "    self.oom = True",
    ]
    return ["    " + line for line in lines]


#: Globals the lines of :func:`step_body_source` use.
STEP_NAMESPACE: dict[str, Any] = {"NOISE_BLOCK": NOISE_BLOCK, "noise_block": noise_block,
                                  "oversubscription_share": oversubscription_share}


@cache
def unrolled_step(n: int) -> Callable[[PipelineSim], None]:
    """:meth:`PipelineSim.step` unrolled for ``n`` stages (generated once per ``n``).

    Loops over stages and list indexing dominate a pure-Python step; unrolled, every
    per-stage quantity is a local. Same operations in the same order as the reference
    :meth:`PipelineSim.step`, so results are bit-for-bit equal (see
    :func:`step_body_source`).
    """
    namespace = dict(STEP_NAMESPACE)
    source = "\n".join(["def step(self):", *step_body_source(n)])
    exec(compile(source, f"<PipelineSim.step n={n}>", "exec"), namespace)
    fn = namespace["step"]
    fn.__doc__ = PipelineSim.step.__doc__
    return fn  # type: ignore[no-any-return]
