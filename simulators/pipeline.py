"""Fluid-queue simulation of multi-stage input pipelines feeding one trainer.

Stages ``0 .. N-1`` form a chain; stage 0 reads from an unbounded dataset, stage ``i``
writes into output buffer ``i`` and the trainer drains the last buffer at up to
``gpu_rate`` samples/s. The dynamics of one control interval are written once, in
:func:`simulators.kernel.step` (read its module docstring for the model);
:class:`PipelineSim` holds the arrays it works on for ``num_envs`` copies of one
scenario and the Python side: the conditions chain (stage models tabulated once per
conditions, so any :class:`~simulators.stages.StageModel` works unchanged), the oracle,
seeds and allocations.

Noise. Each episode has a 63-bit seed (drawn from the caller's generator by
:func:`episode_seed` at reset); the rate noise of stage ``i`` at step ``t`` is a pure
function of (seed, t, i), so copies never share or consume generator state.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np

from simulators import kernel
from simulators.conditions import Compiled, Conditions, compile_conditions
from simulators.oracle import OracleResult, oracle
from simulators.scenario import MAX_INTERVAL_SAMPLES, Scenario, ScenarioError

GPU = "gpu"


def episode_seed(rng: np.random.Generator) -> int:
    """One draw from ``rng``: the seed of an episode's counter-based noise."""
    return int(rng.integers(0, 2**63 - 1, dtype=np.int64))


def check_allocation(allocation: Sequence[int], max_cpus: Sequence[int],
                     stage_names: Sequence[str]) -> list[int]:
    """``allocation`` as a list of ints, or a clear ``ValueError``: a sequence with one
    integer per stage (bools, floats and strings are refused), each within
    ``1..max_cpus`` (the total is not checked: oversubscription is allowed)."""
    if isinstance(allocation, str | bytes) or not isinstance(allocation, Sequence | np.ndarray) \
            or (isinstance(allocation, np.ndarray) and allocation.ndim != 1):
        raise ValueError(f"allocation must be a list of {len(stage_names)} integers, got "
                         f"{type(allocation).__name__}")
    bad = [k for k in allocation if isinstance(k, bool | np.bool_) or not isinstance(k, Integral)]
    if bad:
        raise ValueError(f"allocation must hold integers (CPUs per stage), got {bad[0]!r}")
    alloc = [int(k) for k in allocation]
    if len(alloc) != len(stage_names):
        raise ValueError(f"allocation has {len(alloc)} entries; the pipeline has "
                         f"{len(stage_names)} stages ({', '.join(stage_names)})")
    for name, k, hi in zip(stage_names, alloc, max_cpus, strict=True):
        if not 1 <= k <= hi:
            raise ValueError(f"allocation for stage {name!r} is {k}; expected 1..{hi}")
    return alloc


def even_allocation(cpus: int, max_cpus: Sequence[int]) -> list[int]:
    """Split ``cpus`` as evenly as possible over stages (at least one each), respecting
    each ``max_cpus``."""
    n = len(max_cpus)
    alloc = [1] * n
    left = cpus - n
    while left > 0:
        open_ = [i for i in range(n) if alloc[i] < max_cpus[i]]
        if not open_:
            break
        for i in sorted(open_, key=lambda i: alloc[i]):
            if left == 0:
                break
            alloc[i] += 1
            left -= 1
    return alloc


def worst_memory(cond: Conditions, allocation: Sequence[int]) -> int:
    """Memory of holding ``allocation`` with every buffer full (never exceeded)."""
    comp = compile_conditions(cond)
    return cond.fixed_memory_bytes + sum(comp.worst_memory[i][k]
                                         for i, k in enumerate(allocation))


def fitting_start(cond: Conditions, *later: Conditions) -> list[int]:
    """The default start: the even split, scaled down until it cannot run out of memory.

    Rule: the even split of the largest CPU total ``T <= cpus`` whose worst-case memory
    (every buffer full, :func:`worst_memory`) fits the capacity of ``cond`` and of every
    ``later`` conditions (those an event brings within the first interval, see
    :meth:`PipelineSim.start_conditions`); one CPU per stage if even that does not fit.
    The even split of ``T`` only grows with ``T`` and memory never falls as CPUs grow, so
    fitting is monotone and a bisection finds ``T``.
    """
    caps = [s.max_cpus for s in cond.stages]
    n = len(caps)
    conds = (cond, *later)

    def fits(total: int) -> bool:
        alloc = even_allocation(total, caps)
        return all(worst_memory(c, alloc) <= c.memory_capacity_bytes for c in conds)

    lo, hi = n, max(n, cond.cpus)
    if fits(hi):
        return even_allocation(hi, caps)
    if not fits(lo):
        return [1] * n
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return even_allocation(lo, caps)


def check_start_fits(cond: Conditions, allocation: Sequence[int],
                     what: str = "start_allocation", later: Sequence[Conditions] = ()) -> None:
    """``ValueError`` unless ``allocation``'s worst-case memory fits the capacity of
    ``cond`` and of the ``later`` conditions of the first step; the message names
    ``what`` (the argument or option the allocation came from)."""
    for k, c in enumerate((cond, *later)):
        need = worst_memory(c, allocation)
        if need > c.memory_capacity_bytes:
            gib = 2**30
            when = " at the first step (an event within the first interval)" if k else ""
            raise ValueError(
                f"{what}: start allocation {list(allocation)} needs up to {need / gib:.2f} "
                f"GiB ({need} bytes, every buffer full) "
                f"but the machine has {c.memory_capacity_bytes / gib:.2f} GiB "
                f"({c.memory_capacity_bytes} bytes){when}; use {what}='even' (fitted to "
                f"memory) or fewer CPUs")


def first_step_at(at_s: float, dt: float) -> int:
    """Least step count ``s`` with ``at_s <= s * dt`` (when an event at ``at_s`` applies)."""
    s = max(0, int(at_s // dt) - 2)
    while not at_s <= s * dt:
        s += 1
    return s


class PipelineSim:
    """``num_envs`` copies of one simulated pipeline, stepped by :func:`kernel.step`.

    Knows nothing of Gymnasium. Per-copy state is in arrays (row ``e`` is copy ``e``);
    the scalar properties (``allocation``, ``cpus``, ``throughput``...) describe copy 0,
    which is the whole simulator when ``num_envs == 1``.

    Args:
        scenario: the validated scenario.
        num_envs: copies.
        control_interval_s: simulated seconds per step (default: the scenario's).
        noise_cv: rate variation (default: the scenario's); 0 makes it deterministic.
        diagnostics: whether each step writes the per-stage outputs (``stage_out``,
            ``stage_f``: ``last_capacity``, ``utilisation()``...) and the bottleneck; without
            them those stay at their last written values (the dynamics are the same).
        parallel: step with :func:`kernel.step_parallel` (numba threads, compiled on first
            use; bit-identical results) instead of the single-threaded :func:`kernel.step`.
    """

    def __init__(self, scenario: Scenario, num_envs: int = 1,
                 control_interval_s: float | None = None,
                 noise_cv: float | None = None, diagnostics: bool = True,
                 parallel: bool = False) -> None:
        self.scenario = scenario
        self.n = n = len(scenario.stages)
        self.num_envs = num_envs
        self.stage_names = scenario.stage_names
        self.dt = float(control_interval_s if control_interval_s is not None
                        else scenario.control_interval_s)
        if not 0 < self.dt < float("inf"):
            raise ValueError(f"control_interval_s: expected a positive finite number of "
                             f"seconds, got {control_interval_s!r}")
        self.noise_cv = float(noise_cv if noise_cv is not None else scenario.noise_cv)
        if not 0 <= self.noise_cv * kernel.NOISE_SCALE < 1:  # noisy rates stay positive
            raise ValueError(f"noise_cv: expected 0 <= noise_cv < 1/sqrt(3), got {noise_cv!r}")
        self.max_cpus = tuple(s.max_cpus for s in scenario.stages)
        self.parallel = parallel
        self._build_chain()
        self.params = np.zeros(kernel.N_PARAMS)
        self.params[kernel.DT] = self.dt
        self.params[kernel.NOISE_CV] = self.noise_cv
        self.params[kernel.DIAGNOSTICS] = 1.0 if diagnostics else 0.0
        self.set_reward_weights(1.0, 0.0, 0.0)
        N = num_envs
        self.alloc = np.ones((N, n), dtype=np.int64)
        self.buf = np.zeros((N, n), dtype=np.int64)
        self.state = np.zeros((N, kernel.N_STATE), dtype=np.int64)
        self.stage_out = np.zeros((N, 3, n), dtype=np.int64)
        self.stage_f = np.zeros((N, 2, n))
        self.obs = np.zeros((N, 3 * n + 4), dtype=np.float32)
        self.reward = np.zeros(N)
        self.mask = np.zeros((N, 2 * n + 1), dtype=bool)
        self.actions = np.zeros(N, dtype=np.int64)
        self._act = np.full(N, kernel.ACT, dtype=np.int8)
        self._observe = np.full(N, kernel.OBSERVE, dtype=np.int8)
        self._bind()

    # --- construction ------------------------------------------------------------------
    def _bind(self) -> None:
        """The kernel's arguments after ``actions, control``, and the compiled kernel."""
        self.args = (self.alloc, self.buf, self.state, self.stage_out, self.stage_f, self.obs,
                     self.reward, self.mask, self.capacity, self.tables, self.cond_i,
                     self.cond_f, self.max_cpus_array, self.params)
        fn = kernel.step_parallel if self.__dict__.get("parallel") else kernel.step
        self.run = kernel_entry(fn, self.actions, self._act, *self.args)

    def _build_chain(self) -> None:
        """Every conditions the events can produce (in time order), tabulated once."""
        scen = self.scenario
        self.events = sorted(scen.events, key=lambda e: e.at_s)
        conds = [Conditions.initial(scen)]
        for i, ev in enumerate(self.events):
            cond = conds[-1].apply(ev)
            try:
                compile_conditions(cond)
            except ValueError as err:
                raise ScenarioError(f"{scen.name}: events.{i}: {err}") from None
            conds.append(cond)
        self.chain = conds
        self.compiled_chain: list[Compiled] = [compile_conditions(c) for c in conds]
        self._oracles: list[OracleResult | None] = [None] * len(conds)
        self.element_bytes = [tuple(comp.element_bytes) for comp in self.compiled_chain]
        n, C = self.n, len(conds)
        W = max(self.max_cpus) + 1
        self.capacity = np.zeros((C, n, W))
        self.tables = np.ones((C, 3, n, W), dtype=np.int64)
        self.cond_i = np.zeros((C, 5), dtype=np.int64)
        self.cond_f = np.zeros((C, 2))
        for j, (cond, comp) in enumerate(zip(conds, self.compiled_chain, strict=True)):
            w = comp.capacity_array.shape[1]
            self.capacity[j, :, :w] = comp.capacity_array
            self.tables[j, kernel.WORKERS, :, :w] = comp.workers_array
            self.tables[j, kernel.BUFFERS, :, :w] = comp.buffers_array
            self.tables[j, kernel.ELEMENT_BYTES] = np.array(comp.element_bytes)[:, None]
            self.cond_i[j] = (cond.cpus, cond.memory_capacity_bytes,
                              cond.fixed_memory_bytes + sum(comp.state_bytes),
                              int(cond.gpu_rate * self.dt),
                              0 if j == 0 else first_step_at(self.events[j - 1].at_s, self.dt))
            self.cond_f[j] = (cond.gpu_rate, cond.oversubscription_overhead)
        # the scenario checked this for its own interval; an explicit one is checked here
        peak = max(float(self.capacity.max()), float(self.cond_f[:, kernel.GPU_RATE].max()))
        if not peak * self.dt <= MAX_INTERVAL_SAMPLES:
            raise ScenarioError(
                f"{scen.name}: control_interval_s={self.dt:g} gives {peak * self.dt:.3g} "
                f"samples per interval; expected at most 2**44 (sample counts stay exact)")
        self.max_cpus_array = np.array(self.max_cpus, dtype=np.int64)
        # conditions in force during the first interval (events at time 0 included)
        self.start_cond = int(np.sum(self.cond_i[1:, kernel.FIRST_STEP] == 0))

    def start_conditions(self) -> list[Conditions]:
        """The conditions at reset, then those of the first step if an event within the
        first interval changes them: the first action is taken before the agent can see
        that event, so a start must fit both (a co-tenant at 1 s crashed the start).
        Several events in the interval: the last conditions, as the kernel applies."""
        first = int(np.sum(self.cond_i[1:, kernel.FIRST_STEP] <= 1))
        return [self.chain[self.start_cond]] + (
            [self.chain[first]] if first != self.start_cond else [])

    def set_reward_weights(self, throughput: float, memory: float, oom_penalty: float) -> None:
        """Weights of the reward the kernel computes (see ``kernel.reward_value``)."""
        self.params[kernel.W_THROUGHPUT] = throughput
        self.params[kernel.W_MEMORY] = memory
        self.params[kernel.OOM_PENALTY] = oom_penalty

    # --- control -------------------------------------------------------------------------
    def restart(self, rows: np.ndarray | slice, seeds: Sequence[int] | np.ndarray,
                allocation: Sequence[int]) -> None:
        """Copies ``rows`` start over: empty buffers, initial conditions, ``allocation``
        (already validated) and new episode seeds. The caller steps them next with
        control ``OBSERVE`` (an interval without an action), as a reset does."""
        self.alloc[rows] = allocation
        self.buf[rows] = 0
        st = self.state
        st[rows] = 0
        st[rows, kernel.SEED] = seeds

    def reset(self, rng: np.random.Generator, allocation: Sequence[int]) -> None:
        """Start every copy over from ``allocation``, one episode seed each from ``rng``."""
        alloc = check_allocation(allocation, self.max_cpus, self.stage_names)
        seeds = [episode_seed(rng) for _ in range(self.num_envs)]
        self.restart(slice(None), seeds, alloc)

    def step(self, actions: Sequence[int] | np.ndarray | None = None) -> None:
        """One interval of every copy; ``actions`` (one per copy, default none) first."""
        if actions is None:
            self.run(self.actions, self._observe, *self.args)
            return
        self.actions[:] = actions
        bad = self.run(self.actions, self._act, *self.args)
        if bad >= 0:
            raise ValueError(f"action {self.actions[bad]} is outside 0..{2 * self.n}")

    def set_allocation(self, allocation: Sequence[int]) -> None:
        """Every copy holds ``allocation`` from now on (oversubscription is allowed); the
        action masks follow at once."""
        self.alloc[:] = check_allocation(allocation, self.max_cpus, self.stage_names)
        total = int(self.alloc[0].sum())
        for e in range(self.num_envs):
            kernel.write_action_mask(self.mask, e, self.alloc, total, self.max_cpus_array,
                                     int(self.cond_i[self.state[e, kernel.COND], kernel.CPUS]))

    def oracle_of(self, j: int) -> OracleResult:
        """Best static allocation under conditions ``j`` of the chain (cached)."""
        orc = self._oracles[j]
        if orc is None:
            orc = self._oracles[j] = oracle(self.chain[j])
        return orc

    # --- copy 0 --------------------------------------------------------------------------
    @property
    def allocation(self) -> list[int]:
        return self.alloc[0].tolist()  # type: ignore[no-any-return]

    @property
    def conditions(self) -> Conditions:
        return self.chain[int(self.state[0, kernel.COND])]

    @property
    def compiled(self) -> Compiled:
        return self.compiled_chain[int(self.state[0, kernel.COND])]

    @property
    def cpus(self) -> int:
        return int(self.cond_i[self.state[0, kernel.COND], kernel.CPUS])

    @property
    def buffers(self) -> list[int]:
        return self.buf[0].tolist()  # type: ignore[no-any-return]

    @property
    def steps(self) -> int:
        return int(self.state[0, kernel.STEPS])

    @property
    def time_s(self) -> float:
        """Simulated seconds since reset."""
        return self.steps * self.dt

    @property
    def oom(self) -> bool:
        return bool(self.state[0, kernel.OOM])

    @property
    def memory_bytes(self) -> int:
        return int(self.state[0, kernel.MEMORY])

    @property
    def memory_capacity_bytes(self) -> int:
        return self.conditions.memory_capacity_bytes

    @property
    def samples_in(self) -> int:
        return int(self.state[0, kernel.SAMPLES_IN])

    @property
    def samples_out(self) -> int:
        return int(self.state[0, kernel.SAMPLES_OUT])

    @property
    def throughput(self) -> float:
        """Samples/s handed to the trainer in the last interval."""
        return int(self.state[0, kernel.CONSUMED]) / self.dt

    @property
    def last_capacity(self) -> list[int]:
        return self.stage_out[0, kernel.CAPACITY].tolist()  # type: ignore[no-any-return]

    @property
    def last_processed(self) -> list[int]:
        return self.stage_out[0, kernel.PROCESSED].tolist()  # type: ignore[no-any-return]

    def utilisation(self) -> list[float]:
        """Busy fraction of each stage in the last interval."""
        return self.stage_f[0, kernel.UTILISATION].tolist()  # type: ignore[no-any-return]

    def buffer_capacities(self) -> list[int]:
        return self.stage_out[0, kernel.BUFFER_CAP].tolist()  # type: ignore[no-any-return]

    def oracle(self) -> OracleResult:
        """Best static allocation under copy 0's current conditions (cached)."""
        return self.oracle_of(int(self.state[0, kernel.COND]))

    def bottleneck(self) -> str:
        """Stage with the least capacity in the last interval, or ``"gpu"`` if the trainer is."""
        i = int(self.state[0, kernel.BOTTLENECK])
        return GPU if i < 0 else self.stage_names[i]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("run")  # compiled code: found again on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if len(self.params) < kernel.N_PARAMS:  # pickled before DIAGNOSTICS: it wrote them
            self.params = np.append(self.params, np.ones(kernel.N_PARAMS - len(self.params)))
        self._bind()


_ENTRIES: dict[tuple[Any, ...], Any] = {}


def kernel_entry(fn: Any, *args: Any) -> Any:
    """The compiled ``fn`` (:func:`kernel.step` or :func:`kernel.step_parallel`) for these
    argument types, without the dispatcher.

    Calling numba's compiled entry point directly skips the per-call type resolution
    (about a third of a call's cost with one env); the arguments must keep these types.
    """
    from numba import typeof

    sig = tuple(typeof(a) for a in args)
    # keyed by the dispatcher itself: two kernels of one name (a reloaded or copied
    # module) must not share an entry point
    key = (fn, *sig)
    entry = _ENTRIES.get(key)
    if entry is None:
        fn.compile(sig)
        entry = _ENTRIES[key] = fn.overloads[sig].entry_point
    return entry
