"""An AUTOTUNE-like tuner, faithful to tf.data's AUTOTUNE (``tensorflow/core/framework/model.cc``).

It knows only what tf.data measures: per-stage processing time per element (wall time
of the worker threads, so it grows when the machine is oversubscribed, as in tf.data)
and element sizes. Everything it does, good or bad, comes out of the logic below; no
failure is scripted.

Mapping of the pipeline to tf.data model nodes (a chain, stage 0 is the source):

- a stage with ``max_cpus > 1`` is an asynchronous parallel node (``ParallelMap``:
  ``AsyncKnownRatio`` with ``ratio = 1``, ``memory_ratio = 1`` and one tunable
  ``parallelism`` parameter; its buffer holds ``parallelism`` elements);
- a stage with ``max_cpus == 1`` is a synchronous node (``KnownRatio``, ``ratio = 1``);
- elements are samples, so every ratio is 1; the root (``RootDataset``, a ``KnownRatio``
  node with no self time) is folded into the last stage.

Output-time model (``AsyncRatio::InputTimeLocked`` / ``OutputTimeLocked``,
``KnownRatio`` likewise): walking from the root to the source, a node's input time is
``inherited + self / p`` (async) or ``inherited + self`` (sync), the root inheriting the
model input time, which ``Model::OptimizeLoop`` sets to 0 for every algorithm except
STAGE_BASED. Walking back from the source, an async node's output time is
``self / p + W(producer = output time of its input, consumer = its input time,
n = p)`` and a sync node's is ``self + output time of its input``. ``W`` is
``Node::ComputeWaitTime`` (:func:`wait_time`). Times are in nanoseconds, as in tf.data,
because the climb's thresholds are absolute (``best_delta`` starts at ``-1`` ns).

Measurements (``Node::SelfProcessingTimeLocked``): ``processing_time_ / num_elements_``,
both cumulative since the pipeline started; here the sums of ``info["stage_busy_s"]``
and ``info["stage_processed"]``. The average element size is ``info["element_bytes"]``
(``AverageBufferedElementSize``).

Budgets, read once when the pipeline starts, as ``RootDataset`` reads them when the
dataset is created (``GetCpuBudget()`` / ``port::AvailableRam()``; neither is re-read
later, which is why a machine resize is not seen):

- ``cpu_budget`` = the machine's CPUs (``info["cpus_total"]`` at the start);
- thread-pool size = the same; a parallel node's maximum parallelism is
  ``min(max_cpus, pool)`` (tf.data's maximum is the pool size; the env also caps it by
  the stage's ``max_cpus``);
- ``ram_budget = 0.5 * available RAM`` (``kRamBudgetShare``). Available RAM is measured
  as ``memory_capacity_bytes - memory_bytes`` at the start, what ``/proc/meminfo``'s
  ``MemAvailable`` would show when the iterator is created; it includes the pipeline's
  own first-interval memory, which makes the budget slightly *tighter* (the choice
  favours AUTOTUNE).

RAM it counts (``TotalMaximumBufferedBytes``): for each async node
``parallelism * average element bytes``. It does not count per-worker memory
(``worker_memory_mib``), fixed state (``state_mib``) nor the env's output buffers
(``buffer`` and ``buffer_per_cpu``): those are not tf.data's autotuned buffers. (tf.data
would count a user-fixed ``prefetch`` buffer as ``buffer_size * element bytes``; in the
built-in scenarios the env's buffers total 32-68 MiB even at every stage's maximum,
against budgets of 1.0 GiB (memory-tight) to 81 GiB, so adding them would change no
decision; what AUTOTUNE counts at maximum parallelism is 12-30 KiB.)

Optimisation loop (``Model::OptimizeLoop``): the first round runs when the pipeline
starts, then the period doubles from 10 ms up to 60 s. With a 2 s control interval,
rounds that fall inside one interval see the same measurements and are collapsed into
one; the period still doubles for each of them. Parallelism starts at
``min(16, pool size)`` (``GetAutotuneDefaultParallelism``), capped by ``max_cpus``.
Every round resets every collected parameter to its minimum (1) and climbs:

- ``"max_parallelism"`` (``AutotuneAlgorithm::DEFAULT`` / ``MAX_PARALLELISM``, the
  default of recent tf.data): stop when every parameter is at its maximum or the
  buffered bytes exceed the RAM budget;
- ``"hill_climb"`` (``HILL_CLIMB``, the default before): also stop when the output time
  falls below ``total processing time / cpu_budget``;
- ``"stage_based"`` (``STAGE_BASED``, experimental in tf.data): stages are rooted at async
  nodes (an async node plus the synchronous nodes upstream of it); restart at 1, then
  repeatedly ``+1`` the slowest stage until every stage is faster than the target time
  (the trainer's time per element, which tf.data measures as the gap between
  ``GetNext`` calls; here ``1 / info["gpu_rate"]``), the slowest has no parameter or is
  at its maximum, or it stops improving. It ignores the CPU budget; a step over the
  RAM budget abandons the round. Its self times are the latest interval's (tf.data uses
  a per-element moving average, ``processing_time_ema_``);
- ``"gradient_descent"`` (``GRADIENT_DESCENT``): every parameter moves by a step of 0.1
  normalised by the largest gradient, projected into its range; stop on a change of the
  output time below 100 ns, at 1000 iterations, when every parameter is at its maximum,
  over the RAM budget, or when the "essential" parallelism (nodes whose self time exceeds
  0.3 x the per-node average) sums above the CPU budget (tf.data then tunes only buffer
  sizes, of which there are none here); rounded at the end. Gradients here are central
  finite differences of the same output-time model (tf.data derives them analytically).

In the climb each step tries ``+1`` on every parameter below its maximum and keeps the
one that lowers the output time most; ``best_delta`` starts at ``-1`` ns, so a step that
changes nothing (or worsens by under 1 ns) is still taken
(``Model::OptimizeHillClimbHelper``). The state published is the one the loop stopped
at, including the step that crossed the RAM budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.base import Agent, Allocation

MODES = ("max_parallelism", "hill_climb", "gradient_descent", "stage_based")

#: ``Model::kOptimizationPeriodMinMs`` / ``kOptimizationPeriodMaxMs``, in seconds.
OPTIMIZATION_PERIOD_MIN_S = 0.010
OPTIMIZATION_PERIOD_MAX_S = 60.0
#: ``kAutotuneDefaultParallelism``: a parallel node starts at min(16, pool size).
AUTOTUNE_DEFAULT_PARALLELISM = 16
#: ``kRamBudgetShare``: share of the available RAM the autotuned buffers may use.
RAM_BUDGET_SHARE = 0.5
#: ``OptimizeHillClimbHelper``: the best delta starts at -1 (ns).
INITIAL_BEST_DELTA_NS = -1.0
#: ``CollectParameters``: a parallelism parameter is essential above 0.3 x average.
ESSENTIAL_RATE = 0.3
#: ``UpdateParameterValues`` step, ``kOptimizationPrecision`` (ns) and ``kMaxIterations``.
DESCENT_STEP = 0.1
OPTIMIZATION_PRECISION_NS = 100.0
MAX_GD_ITERATIONS = 1000
NS = 1e9


def wait_time(producer_time: float, consumer_time: float, buffer_size: float) -> float:
    """Expected wait for an element of a bounded buffer (``Node::ComputeWaitTime``).

    ``producer_time`` ``y`` and ``consumer_time`` ``x`` are per-element times and
    ``buffer_size`` ``n`` the slots. With ``r = x / y`` the probability that the buffer
    is empty is ``p = (1 - r) / (1 - r**(n + 1))`` and the wait is ``p * y``; ``0`` if
    ``y == 0``, ``y`` if ``x == 0``, ``y / (n + 1)`` if ``x == y``.
    """
    y, x, n = float(producer_time), float(consumer_time), float(buffer_size)
    if y == 0.0:
        return 0.0
    if x == 0.0:
        return y
    if x == y:
        return y / (n + 1.0)
    if x > y:  # consumer slower: the same formula, written to avoid overflow
        ratio = y / x
        ratio_pow = ratio**n
        return ratio_pow * (1.0 - ratio) / (1.0 - ratio * ratio_pow) * y
    ratio = x / y
    ratio_pow = ratio**n
    return (1.0 - ratio) / (1.0 - ratio_pow * ratio) * y


def output_time(self_times_ns: Sequence[float], parallelism: Sequence[float],
                is_async: Sequence[bool], model_input_time_ns: float = 0.0) -> float:
    """Modelled output time (ns per element) of a chain of nodes, stage 0 the source.

    See the module docstring: input times flow from the root to the source, output times
    back from the source to the root. ``parallelism`` is ignored for synchronous nodes.
    """
    n = len(self_times_ns)
    input_time = [0.0] * n
    inherited = float(model_input_time_ns)
    for i in range(n - 1, -1, -1):  # root first (``InputTimeLocked``, BFS order)
        own = self_times_ns[i] / parallelism[i] if is_async[i] else self_times_ns[i]
        inherited = input_time[i] = inherited + own
    out = 0.0  # the source has no input: producer time 0
    for i in range(n):  # leaves first (``OutputTimeLocked``, reverse BFS)
        if is_async[i]:
            out = self_times_ns[i] / parallelism[i] + wait_time(out, input_time[i],
                                                                parallelism[i])
        else:
            out = self_times_ns[i] + out
    return out


def total_processing_time(self_times_ns: Sequence[float]) -> float:
    """CPU time per element over all nodes (``TotalProcessingTime``; every ratio is 1)."""
    return float(sum(self_times_ns))


def max_buffered_bytes(parallelism: Sequence[float], element_bytes: Sequence[float],
                       is_async: Sequence[bool]) -> float:
    """Bytes AUTOTUNE counts: ``parallelism * element bytes`` per async node only."""
    return float(sum(p * b for p, b, a in zip(parallelism, element_bytes, is_async, strict=True)
                     if a))


def best_increment(self_times_ns: Sequence[float], parallelism: Sequence[int],
                   is_async: Sequence[bool], max_parallelism: Sequence[int],
                   params: Sequence[int] | None = None,
                   model_input_time_ns: float = 0.0) -> tuple[int | None, float]:
    """One step of the climb: the parameter whose ``+1`` lowers the output time most.

    Returns ``(index, delta_ns)``, or ``(None, -1.0)`` if no parameter below its maximum
    changes the output time by more than ``-1`` ns. Ties go to the first (most upstream)
    node, as the strict comparison over leaves-first parameters does in tf.data.
    """
    par = list(parallelism)
    idx = [i for i in range(len(par)) if is_async[i]] if params is None else list(params)
    t = output_time(self_times_ns, par, is_async, model_input_time_ns)
    best_delta, best = INITIAL_BEST_DELTA_NS, None
    for i in idx:
        if par[i] >= max_parallelism[i]:
            continue
        par[i] += 1
        delta = t - output_time(self_times_ns, par, is_async, model_input_time_ns)
        par[i] -= 1
        if delta > best_delta:
            best_delta, best = delta, i
    return best, best_delta


@dataclass(frozen=True)
class ClimbResult:
    """Outcome of one optimisation round: parallelism per node, why it stopped, steps."""

    parallelism: tuple[int, ...]
    stop_reason: str
    steps: int
    output_time_ns: float
    buffered_bytes: float


def climb(self_times_ns: Sequence[float], is_async: Sequence[bool],
          max_parallelism: Sequence[int], element_bytes: Sequence[float],
          cpu_budget: float, ram_budget: float, mode: str = "max_parallelism",
          tunable: Sequence[bool] | None = None,
          current: Sequence[int] | None = None,
          model_input_time_ns: float = 0.0) -> ClimbResult:
    """One HILL_CLIMB or MAX_PARALLELISM round (``Model::OptimizeHillClimbHelper``).

    ``tunable`` marks the parameters collected this round (async nodes that produced
    elements); the others keep their ``current`` value. Collected parameters restart
    at 1 and climb as the module docstring describes. ``stop_reason`` is one of
    ``"all_max"``, ``"output_time"`` (HILL_CLIMB only), ``"ram_budget"``,
    ``"no_improvement"`` or ``"no_parameters"``.
    """
    if mode not in ("max_parallelism", "hill_climb"):
        raise ValueError(f"climb mode must be 'max_parallelism' or 'hill_climb', got {mode!r}")
    n = len(self_times_ns)
    tun = list(tunable) if tunable is not None else [bool(a) for a in is_async]
    tun = [bool(t) and bool(a) for t, a in zip(tun, is_async, strict=True)]
    par = [int(c) if c is not None else 1 for c in (current or [1] * n)]
    par = [p if a else 1 for p, a in zip(par, is_async, strict=True)]
    params = [i for i in range(n) if tun[i]]
    processing = total_processing_time(self_times_ns)
    if not params:
        return ClimbResult(tuple(par), "no_parameters", 0,
                           output_time(self_times_ns, par, is_async, model_input_time_ns),
                           max_buffered_bytes(par, element_bytes, is_async))
    for i in params:
        par[i] = 1
    steps = 0
    while True:
        t = output_time(self_times_ns, par, is_async, model_input_time_ns)
        buffered = max_buffered_bytes(par, element_bytes, is_async)
        all_max = all(par[i] >= max_parallelism[i] for i in params)
        reason = None
        if all_max:
            reason = "all_max"
        elif mode == "hill_climb" and t < processing / cpu_budget:
            reason = "output_time"
        elif buffered > ram_budget:
            reason = "ram_budget"
        if reason is not None:
            return ClimbResult(tuple(par), reason, steps, t, buffered)
        best, _ = best_increment(self_times_ns, par, is_async, max_parallelism, params,
                                 model_input_time_ns)
        if best is None:
            return ClimbResult(tuple(par), "no_improvement", steps, t, buffered)
        par[best] += 1
        steps += 1


def gradient_descent(self_times_ns: Sequence[float], is_async: Sequence[bool],
                     max_parallelism: Sequence[int], element_bytes: Sequence[float],
                     cpu_budget: float, ram_budget: float,
                     tunable: Sequence[bool] | None = None,
                     current: Sequence[int] | None = None,
                     model_input_time_ns: float = 0.0) -> ClimbResult:
    """One GRADIENT_DESCENT round (``Model::OptimizeGradientDescent``), see module docs.

    The root (self time 0) counts as a node when the per-node average is taken, as
    ``TotalProcessingTime`` includes it.
    """
    n = len(self_times_ns)
    tun = list(tunable) if tunable is not None else [bool(a) for a in is_async]
    tun = [bool(t) and bool(a) for t, a in zip(tun, is_async, strict=True)]
    par = [float(c) for c in (current or [1] * n)]
    par = [p if a else 1.0 for p, a in zip(par, is_async, strict=True)]
    params = [i for i in range(n) if tun[i]]
    if not params:
        t = output_time(self_times_ns, par, is_async, model_input_time_ns)
        return ClimbResult(tuple(round(p) for p in par), "no_parameters", 0, t,
                           max_buffered_bytes(par, element_bytes, is_async))
    uniform_share = total_processing_time(self_times_ns) / (n + 1)
    essential = [i for i in params if self_times_ns[i] > ESSENTIAL_RATE * uniform_share]
    for i in params:
        par[i] = 1.0
    previous = 0.0
    reason, steps = "max_iterations", 0
    for _ in range(MAX_GD_ITERATIONS):
        if sum(round(par[i]) for i in essential) > cpu_budget:
            reason = "cpu_budget"  # then only buffer sizes would be tuned: there are none
            break
        if all(par[i] >= max_parallelism[i] for i in params):
            reason = "all_max"
            break
        if max_buffered_bytes(par, element_bytes, is_async) > ram_budget:
            reason = "ram_budget"
            break
        t = output_time(self_times_ns, par, is_async, model_input_time_ns)
        if abs(previous - t) < OPTIMIZATION_PRECISION_NS:
            reason = "converged"
            break
        grads = {}
        for i in params:  # every parameter moves; "essential" ones only count for the budget
            h = 1e-4 * max(1.0, par[i])
            up, down = list(par), list(par)
            up[i] += h
            down[i] = max(down[i] - h, 1e-9)
            grads[i] = (output_time(self_times_ns, up, is_async, model_input_time_ns)
                        - output_time(self_times_ns, down, is_async, model_input_time_ns)) \
                / (up[i] - down[i])
        scale = max([1.0] + [abs(g) for i, g in grads.items()
                             if round(par[i]) != max_parallelism[i]])
        for i, g in grads.items():
            par[i] = min(max(par[i] - DESCENT_STEP * g / scale, 1.0), float(max_parallelism[i]))
        previous = t
        steps += 1
    final = [round(p) for p in par]
    return ClimbResult(tuple(int(p) for p in final), reason, steps,
                       output_time(self_times_ns, final, is_async, model_input_time_ns),
                       max_buffered_bytes(final, element_bytes, is_async))


def stage_times(self_times_ns: Sequence[float], parallelism: Sequence[float],
                is_async: Sequence[bool]) -> list[float]:
    """Total time (ns) of each stage of ``ModelTiming``, indexed by the stage's root node.

    A stage is rooted at an async node and holds the synchronous nodes upstream of it up to
    the previous async node: ``self / p`` of the root plus the self times of those
    synchronous inputs (every ratio is 1). Synchronous nodes downstream of the last async
    node form the ``RootDataset``'s stage, reported at index ``len(nodes)``. Non-root
    entries are 0.
    """
    n = len(self_times_ns)
    times = [0.0] * (n + 1)
    pending = 0.0  # synchronous time since the last async node
    for i in range(n):
        if is_async[i]:
            times[i] = self_times_ns[i] / parallelism[i] + pending
            pending = 0.0
        else:
            pending += self_times_ns[i]
    times[n] = pending  # the root's own self time is ~0
    return times


def stage_based(self_times_ns: Sequence[float], is_async: Sequence[bool],
                max_parallelism: Sequence[int], element_bytes: Sequence[float],
                target_time_ns: float, ram_budget: float,
                tunable: Sequence[bool] | None = None,
                current: Sequence[int] | None = None) -> ClimbResult | None:
    """One STAGE_BASED round (``OptimizeStageBasedNonAsyncInterleaveManyNodes``).

    Parallelism restarts at 1; while the slowest stage is slower than ``target_time_ns``
    (the consumer's per-element time), give its root ``+1``; stop if it has no parameter,
    is at its maximum or did not get faster (that step is undone). If a step exceeds the
    RAM budget the round is abandoned and ``None`` is returned (tf.data then keeps the
    published values). Ties between equally slow stages go to the upstream one.
    """
    n = len(self_times_ns)
    tun = list(tunable) if tunable is not None else [bool(a) for a in is_async]
    tun = [bool(t) and bool(a) for t, a in zip(tun, is_async, strict=True)]
    par = [int(c) for c in (current or [1] * n)]
    par = [p if a else 1 for p, a in zip(par, is_async, strict=True)]
    for i in range(n):
        if tun[i]:
            par[i] = 1
    steps, reason = 0, "target_met"
    while True:
        times = stage_times(self_times_ns, par, is_async)
        roots = [i for i in range(n) if is_async[i]] + [n]
        slowest = max(roots, key=lambda i: (times[i], -i))
        if times[slowest] <= target_time_ns:
            break
        if slowest == n or not tun[slowest]:
            reason = "no_optimizable_parameter"
            break
        if par[slowest] >= max_parallelism[slowest]:
            reason = "parameter_max_exceeded"
            break
        par[slowest] += 1
        if max_buffered_bytes(par, element_bytes, is_async) > ram_budget:
            return None
        if times[slowest] <= stage_times(self_times_ns, par, is_async)[slowest]:
            par[slowest] -= 1
            reason = "total_time_not_improved"
            break
        steps += 1
    return ClimbResult(tuple(par), reason, steps, output_time(self_times_ns, par, is_async),
                       max_buffered_bytes(par, element_bytes, is_async))


class AutotuneAgent(Agent):
    """tf.data AUTOTUNE on the simulated pipeline (see the module docstring).

    Args:
        mode: ``"max_parallelism"`` (default, tf.data's default algorithm today),
            ``"hill_climb"``, ``"stage_based"`` or ``"gradient_descent"``.

    :meth:`act` returns an :class:`~agents.base.Allocation` when a round runs (and at the
    first step, tf.data's starting parallelism) and ``0`` (no-op) in between.
    """

    name = "autotune"

    def __init__(self, mode: str = "max_parallelism") -> None:
        if mode not in MODES:
            raise ValueError(f"autotune mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.rounds: list[dict[str, Any]] = []  # what each round saw and chose (opacity aid)
        self._started = False

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Read the budgets once, as tf.data does when the dataset is created."""
        cpus = int(info["cpus_total"])
        self.cpu_budget = cpus
        self.pool_size = cpus
        available = int(info["memory_capacity_bytes"]) - int(info["memory_bytes"])
        self.ram_budget = RAM_BUDGET_SHARE * max(available, 0)
        caps = [int(k) for k in info["max_cpus"]]
        self.is_async = [k > 1 for k in caps]
        self.max_parallelism = [min(k, self.pool_size) if a else 1
                                for k, a in zip(caps, self.is_async, strict=True)]
        default = min(AUTOTUNE_DEFAULT_PARALLELISM, self.pool_size)
        self.parallelism = [min(default, m) if a else 1
                            for m, a in zip(self.max_parallelism, self.is_async, strict=True)]
        n = len(caps)
        self.busy_s = [0.0] * n
        self.processed = [0] * n
        self.recent_self_ns = [0.0] * n  # the latest interval's, for STAGE_BASED's EMA
        self.target_time_ns = NS / float(info["gpu_rate"])
        self.element_bytes = [float(b) for b in info["element_bytes"]]
        self.rounds = []
        self._started = False
        self._period = OPTIMIZATION_PERIOD_MIN_S
        self._next_round = 0.0

    def _measure(self, info: dict[str, Any]) -> None:
        for i, (b, p) in enumerate(zip(info["stage_busy_s"], info["stage_processed"],
                                       strict=True)):
            self.busy_s[i] += float(b)
            self.processed[i] += int(p)
            if p > 0:
                self.recent_self_ns[i] = float(b) / int(p) * NS
        self.element_bytes = [float(b) for b in info["element_bytes"]]
        # RootDataset's gap times: the trainer's time per element between requests.
        self.target_time_ns = NS / float(info["gpu_rate"])

    def self_times_ns(self) -> list[float]:
        """Cumulative per-element processing time per worker, ns (0 if nothing produced)."""
        return [b / p * NS if p > 0 else 0.0
                for b, p in zip(self.busy_s, self.processed, strict=True)]

    def optimise(self) -> ClimbResult | None:
        """Run one round on the current measurements and publish its parallelism.

        Returns ``None`` when a STAGE_BASED round is abandoned (RAM budget): the published
        parallelism is kept.
        """
        tunable = [a and p > 0 for a, p in zip(self.is_async, self.processed, strict=True)]
        if self.mode == "stage_based":
            res = stage_based(self.recent_self_ns, self.is_async, self.max_parallelism,
                              self.element_bytes, self.target_time_ns, self.ram_budget,
                              tunable=tunable, current=self.parallelism)
            if res is None:
                return None
        else:
            args = (self.self_times_ns(), self.is_async, self.max_parallelism,
                    self.element_bytes, self.cpu_budget, self.ram_budget)
            if self.mode == "gradient_descent":
                res = gradient_descent(*args, tunable=tunable, current=self.parallelism)
            else:
                res = climb(*args, mode=self.mode, tunable=tunable, current=self.parallelism)
        self.parallelism = list(res.parallelism)
        return res

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        t = float(info["sim_time_s"])
        if not self._started:
            # The pipeline starts now at tf.data's default parallelism; the interval the
            # env measured at reset ran another allocation, so it is not counted. The
            # round due at start has no elements recorded yet: a no-op.
            self._started = True
            self._t0 = t
            self._advance(0.0)
            return Allocation(self.parallelism)
        self._measure(info)
        elapsed = t - self._t0
        if elapsed < self._next_round:
            return 0
        res = self.optimise()
        self.rounds.append({"time_s": t, "parallelism": tuple(self.parallelism),
                            "stop_reason": "ram_budget_abort" if res is None
                            else res.stop_reason,
                            "steps": 0 if res is None else res.steps,
                            "self_times_ns": self.self_times_ns()})
        self._advance(elapsed)
        return Allocation(self.parallelism)

    def _advance(self, elapsed: float) -> None:
        """Skip the schedule past ``elapsed``, doubling the period for every round passed."""
        while self._next_round <= elapsed:
            self._period = min(2 * self._period, OPTIMIZATION_PERIOD_MAX_S)
            self._next_round += self._period


def round_times(horizon_s: float) -> list[float]:
    """Times (s after the start) of tf.data's optimisation rounds up to ``horizon_s``."""
    times, t, period = [], 0.0, OPTIMIZATION_PERIOD_MIN_S
    while t <= horizon_s + 1e-12:
        times.append(t)
        period = min(2 * period, OPTIMIZATION_PERIOD_MAX_S)
        t += period
    return times


__all__ = ["MODES", "AutotuneAgent", "ClimbResult", "best_increment", "climb",
           "gradient_descent", "max_buffered_bytes", "output_time", "round_times",
           "stage_based", "stage_times", "total_processing_time", "wait_time"]
