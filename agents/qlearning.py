"""InTune's agent: tabular Q-learning over a small, transferable abstraction of the pipeline.

The agent keeps a Q-table over an *abstract* state and *abstract* actions, so the table
has the same tiny shape (54 states x 3 actions) for every machine size and stage count,
and a table learnt on some pipelines applies to others.

Online estimates (from measurable ``info`` keys only, never ``oracle_*``):

- per-stage capacity: ``processed / busy seconds`` is the rate of one CPU of the stage
  (``stage_busy_s = utilisation * cpus * dt``), divided by the time-slice share when the
  machine is oversubscribed and smoothed by an exponential moving average (``rate_ema``);
  capacity with ``k`` CPUs is estimated as ``rate * k``. Scaling down is conservative for
  concave stages (contention, bandwidth caps), so slack is never over-estimated;
- time-slicing: ``total`` workers on ``cpus`` CPUs each get a share
  ``(cpus / total) / (1 + overhead * (total / cpus - 1))`` of a CPU. ``overhead`` (context
  switches) is fitted by least squares after the machine is resized, from each stage's
  per-CPU rate measured after the resize divided by its rate just before (same CPUs for
  the stage, so only the share differs);
- memory: ``static = memory_bytes - sum(buffer_levels * element_bytes)`` is the memory of
  workers, fixed state and everything outside the pipeline; it changes only when CPUs
  change (or an event happens), so after a one-CPU move on stage ``i`` the change of
  ``static`` is that stage's per-worker memory, and the change of its buffer capacity its
  per-CPU prefetch. The worst case of an allocation (every buffer full) is then
  ``static + sum(buffer_capacity * element_bytes)``, predicted exactly;
- saturation (a bandwidth cap): a least-squares fit of measured capacity against CPUs
  over recent samples; if the slope stays under a quarter of the per-CPU rate (judged
  only with enough statistical power, confirmed twice so a rate drift is not taken for
  it), the stage is marked saturated, its plateau counts as spare CPUs, and the mark is
  moved down while releasing CPUs does not lower the capacity.

Abstract state (``FEATURES``): which is the bottleneck (the GPU / a stage that can take
another CPU / a stage that cannot: at ``max_cpus`` or saturated), CPUs (some free / none
free / oversubscribed after the machine shrank), whether some stage has clear slack (it
would still exceed the current bottleneck rate by ``slack_margin`` with one CPU fewer), and
memory (the bottleneck's next worker fits / does not fit, told apart only while a CPU is
free / the current allocation's worst case already exceeds the limit). Abstract actions
(``ACTIONS``): ``noop``; ``give`` one CPU to the bottleneck stage; ``take`` one CPU from
the most over-provisioned stage (the highest capacity relative to the bottleneck with one
CPU fewer). Moving a CPU from slack to the bottleneck is a ``take``, then a ``give``.

Reward. The agent learns from the change its move made to its objective ``x = estimated
throughput / gpu_rate - memory_weight * worst-case memory / capacity``: both allocations
are valued with the rates measured *after* the move, so a no-op earns exactly 0 and
neither noise nor events between two steps enter the reward (``-oom_penalty`` on an
out-of-memory crash after a ``give``; a crash after a no-op or a release was caused by
memory the agent did not add, and is not learnt from, nor is one after a ``give`` that
would have happened without the worker and prefetch the give was predicted to add, such
as a co-tenant arriving in the same step). A sum of changes telescopes
(``sum(discount**t * (x[t+1] - x[t])) = (1 - discount) / discount * sum(discount**t * x[t])
- x[0]``), so the best policy is the one for the level ``x``, but the signal does not
carry the throughput level, which differs between scenarios and aliased states and would
drown the small differences between actions.

Safety shield. ``give`` is masked out whenever the predicted worst-case memory after the
move exceeds ``capacity * (1 - memory_margin)``. A stage whose per-worker memory was never
measured gets the rigorous upper bound ``(static - known workers) / cpus``; if that does
not fit, the agent first *probes* (releases one CPU of the stage and measures the memory
freed) instead of guessing; probes are not learnt from. A one-CPU stage cannot be probed:
it is assumed to need at most ``unknown_worker_fraction`` of the memory, or twice the
largest worker measured. If the current allocation's worst case exceeds the limit (a
co-tenant arrived), a ``take`` is forced.

Oversubscription. The env never adds a CPU while none is free, so after the machine
shrinks the agent can only keep or release CPUs, and releasing is irreversible until the
allocation fits again: oversubscribed states are never explored. The agent values, with
its objective under the measured share, the best split of the machine's CPUs (reached by
shedding until the allocation fits, then tuning as usual) and the best time-sliced plan
with no stage above its current CPUs (time-sliced workers can beat every split: they are
fractional CPUs per stage). It sheds towards the split if that is at least as good;
otherwise it releases one CPU per step towards the plan while the plan beats the current
allocation by more than ``slack_margin``, and else does nothing. Until the overhead has
been measured it sheds until the allocation fits. Known limit: capacity is extrapolated
linearly from the current per-CPU rate, so a stage whose per-thread rate rises as threads
are released (contention) is undervalued with fewer threads, and the agent may keep more
time-sliced threads than the best allocation has.

Table files are JSON with a ``format_version`` field, written atomically (temporary file in
the same folder, then ``os.replace``); a corrupt, truncated, wrong-version or wrong-shape
file raises :class:`QTableError` (a ``ValueError``) naming the file and the fault.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Agent, Allocation
from intune_env import common

FORMAT_VERSION = 1
FILE_KIND = "intune-qlearning-table"

#: Abstract state features: (name, values). The state index is their mixed-radix number.
FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bottleneck", ("gpu", "stage_addable", "stage_blocked")),
    ("cpus", ("free", "none_free", "oversubscribed")),
    ("slack", ("none", "some")),
    ("memory", ("fits", "tight", "critical")),
)
#: Abstract actions, mapped to env actions each step.
ACTIONS: tuple[str, ...] = ("noop", "give", "take")
NOOP, GIVE, TAKE = range(3)
N_STATES = math.prod(len(v) for _, v in FEATURES)
N_ACTIONS = len(ACTIONS)

#: The table shipped with the package (see ``benchmarks/pretrain_qlearning.py``).
PRETRAINED_PATH = Path(__file__).with_name("pretrained") / "qtable.json"


class QTableError(ValueError):
    """A Q-table file cannot be used; the message names the file and the fault."""


@dataclass(frozen=True)
class EpsilonSchedule:
    """Linear decay of the exploration rate from ``start`` to ``end`` over ``decay_steps``."""

    start: float = 0.05
    end: float = 0.01
    decay_steps: int = 2000

    def __post_init__(self) -> None:
        for field_name in ("start", "end"):
            v = getattr(self, field_name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"epsilon {field_name} must be in [0, 1], got {v}")
        if self.decay_steps < 1:
            raise ValueError(f"epsilon decay_steps must be >= 1, got {self.decay_steps}")

    def value(self, step: int) -> float:
        """Epsilon after ``step`` learning steps."""
        frac = min(1.0, step / self.decay_steps)
        return self.start + (self.end - self.start) * frac


@dataclass
class Perception:
    """What the agent makes of one ``info``: abstract state, valid actions, concrete moves."""

    state: int
    features: tuple[int, ...]
    valid: np.ndarray  # bool[N_ACTIONS]
    give_stage: int  # bottleneck stage (-1 if the GPU is the bottleneck)
    take_stage: int  # most over-provisioned stage with > 1 CPU (-1 if none)
    probe: bool  # give needs a memory probe first (remove one CPU from give_stage)
    critical: bool  # current worst case already above the memory limit
    shed: bool  # oversubscribed and releasing ``take_stage`` moves towards a better plan
    give_bytes: float  # memory a give is predicted to add (worker + prefetch; 0 if none)
    allocation: tuple[int, ...]
    worst_fraction: float  # predicted worst-case memory / capacity


def state_index(features: Sequence[int]) -> int:
    """Mixed-radix index of a feature tuple (see ``FEATURES``)."""
    idx = 0
    for (_, values), f in zip(FEATURES, features, strict=True):
        idx = idx * len(values) + int(f)
    return idx


def state_features(index: int) -> tuple[int, ...]:
    """Inverse of :func:`state_index`."""
    out = []
    for _, values in reversed(FEATURES):
        out.append(index % len(values))
        index //= len(values)
    return tuple(reversed(out))


def describe_state(index: int) -> str:
    """Readable name of a state, e.g. ``bottleneck=gpu cpus=free slack=some memory=fits``."""
    return " ".join(f"{name}={values[f]}"
                    for (name, values), f in zip(FEATURES, state_features(index), strict=True))


class _Estimator:
    """Online per-stage estimates of capacity, per-worker memory and saturation."""

    def __init__(self, rate_ema: float) -> None:
        self.beta = rate_ema
        self.n = 0

    #: Samples (over at least two CPU counts) before judging whether added CPUs help.
    MIN_SAMPLES = 6
    #: Steps after which a CPU count's capacity samples are forgotten (conditions drift).
    MEMORY_STEPS = 25
    #: Steps after which a saturation mark is dropped and the stage probed again.
    SATURATION_STEPS = 300

    def start(self, info: dict[str, Any]) -> None:
        n = len(info["allocation"])
        self.n = n
        self.rate = [math.nan] * n  # samples/s per dedicated CPU (smoothed)
        self.noise_var = [0.05**2] * n  # relative variance of one measurement (smoothed)
        # per stage: recent (step, CPUs, measured capacity) samples
        self.history: list[list[tuple[int, int, float]]] = [[] for _ in range(n)]
        self.step = 0
        self.worker_bytes: list[float | None] = [None] * n
        self.buffer_per_cpu: list[float | None] = [None] * n  # samples per CPU
        self.saturated_at = [0] * n  # 0: not saturated; k: adding beyond k does not help
        self.plateau = [0.0] * n  # capacity of a saturated stage
        self.saturated_age = [0] * n
        self.pending = [False] * n  # a CPU was added: judge it once enough samples exist
        self.suspect = [0] * n  # step of a judgement that found no gain (0: none)
        self.prev_alloc: list[int] | None = None
        self.prev_static: float | None = None
        self.prev_bufcap: list[int] | None = None
        self.prev_cpus: int | None = None
        # time-slicing overhead, fitted after a resize (None: never measured)
        self.overhead: float | None = None
        self._slice_sxx = self._slice_sxy = 0.0
        self._slice_ref: list[float] = []  # per-CPU rates just before the resize
        self._slice_alloc: list[int] = []  # the allocation they were measured with
        self._slice_step = -self.MEMORY_STEPS

    def share(self, alloc: Sequence[int], cpus_total: int) -> float:
        """Estimated fraction of a dedicated CPU's rate each worker of ``alloc`` gets."""
        return time_share(alloc, cpus_total, self.overhead or 0.0)

    def _fit_overhead(self, alloc: list[int], cpus_total: int, busy: Sequence[float],
                      processed: Sequence[float]) -> None:
        """Fit the time-slicing overhead from the per-CPU rates measured across a resize.

        A worker's measured rate divided by its stage's rate just before the resize (same
        CPUs for the stage, so contention is unchanged) is the share ``s`` it now gets.
        The model ``s = (cpus / total) / (1 + overhead * x)`` with ``x = total / cpus - 1``
        gives ``y = (cpus / total) / s - 1 = overhead * x``, fitted by least squares over
        every such sample of the ``MEMORY_STEPS`` steps after the resize (small ``x``,
        which says little, weighs little).
        """
        total = sum(alloc)
        if total <= cpus_total or self.step - self._slice_step > self.MEMORY_STEPS:
            return
        x = total / cpus_total - 1
        for i in range(self.n):
            ref = self._slice_ref[i]
            if (alloc[i] != self._slice_alloc[i] or not math.isfinite(ref) or ref <= 0
                    or busy[i] <= 0 or processed[i] <= 0):
                continue
            s = processed[i] / busy[i] / ref
            self._slice_sxx += x * x
            self._slice_sxy += x * (cpus_total / total / s - 1)
        if self._slice_sxx > 0:
            self.overhead = max(0.0, self._slice_sxy / self._slice_sxx)

    def update(self, info: dict[str, Any]) -> None:
        """Fold one step's measurements into the estimates."""
        if self.n != len(info["allocation"]):
            self.start(info)
        alloc = [int(k) for k in info["allocation"]]
        busy = info["stage_busy_s"]
        processed = info["stage_processed"]
        cpus_total = int(info["cpus_total"])
        resized = self.prev_cpus is not None and cpus_total != self.prev_cpus
        prev = self.prev_alloc
        self.step += 1
        if resized and prev is not None:
            # dedicated-CPU rates before the resize: the reference for the share after it
            self._slice_ref, self._slice_alloc = list(self.rate), list(prev)
            self._slice_step, self._slice_sxx, self._slice_sxy = self.step, 0.0, 0.0
        self._fit_overhead(alloc, cpus_total, busy, processed)
        share = self.share(alloc, cpus_total)
        for i in range(self.n):
            if resized:
                self.history[i] = []
            elif prev is not None and alloc[i] != prev[i]:
                self.pending[i] = alloc[i] > prev[i]
            if busy[i] > 0 and processed[i] > 0:
                r = processed[i] / busy[i] / share  # per dedicated CPU
                if math.isnan(self.rate[i]) or resized:
                    self.rate[i] = r  # time-slicing changed: old rates are stale
                else:
                    rel = (r - self.rate[i]) / self.rate[i]
                    self.noise_var[i] += 0.1 * (rel * rel - self.noise_var[i])
                    self.rate[i] += self.beta * (r - self.rate[i])
                self.history[i].append((self.step, alloc[i], r * alloc[i]))
        elem = info["element_bytes"]
        static = float(info["memory_bytes"]) - sum(
            b * e for b, e in zip(info["buffer_levels"], elem, strict=True))
        bufcap = [int(c) for c in info["buffer_capacities"]]
        if prev is not None and self.prev_static is not None and not resized:
            moved = [i for i in range(self.n) if alloc[i] != prev[i]]
            if len(moved) == 1:
                i = moved[0]
                delta = alloc[i] - prev[i]
                w = (static - self.prev_static) / delta
                # A simultaneous memory event would corrupt the difference: keep only
                # plausible values (non-negative, within the rigorous bound).
                if 0 <= w <= max(self.prev_static, static) / max(1, min(alloc[i], prev[i])):
                    self.worker_bytes[i] = w
                assert self.prev_bufcap is not None
                db = (bufcap[i] - self.prev_bufcap[i]) / delta
                if db >= 0:
                    self.buffer_per_cpu[i] = db
        for i in range(self.n):
            self._check_saturation(i, alloc[i])
            self._extend_plateau(i, alloc[i])
            if self.saturated_at[i]:
                self.saturated_age[i] += 1
                # Conditions change (events): forget after a while and re-probe.
                if self.saturated_age[i] > self.SATURATION_STEPS or resized:
                    self.saturated_at[i] = 0
        self.prev_alloc = alloc
        self.prev_static = static
        self.prev_bufcap = bufcap
        self.prev_cpus = cpus_total
        self.static = static
        self.bufcap = bufcap

    def _check_saturation(self, i: int, k: int) -> None:
        """After an added CPU: does capacity still grow with CPUs?

        Fits capacity against CPUs over the recent samples (least squares). Saturated (a
        bandwidth cap) if the slope is under a quarter of the stage's per-CPU rate.
        Judged only when the per-CPU rate stands 4 standard errors of the slope above
        zero, so noise and contention do not trigger it, and only on the second such
        finding in a row (the first may be a rate drift that happened among the
        samples; they are then dropped). The saturation point is where the per-CPU
        rate at the fewest CPUs measured would reach today's capacity.
        """
        hist = self.history[i]
        while hist and self.step - hist[0][0] > self.MEMORY_STEPS:
            hist.pop(0)
        if not self.pending[i] or len(hist) < self.MIN_SAMPLES:
            return
        ks = np.array([h[1] for h in hist], dtype=float)
        caps = np.array([h[2] for h in hist])
        sxx = float(np.sum((ks - ks.mean()) ** 2))
        if sxx <= 0:
            return
        slope = float(np.sum((ks - ks.mean()) * (caps - caps.mean()))) / sxx
        resid = caps - caps.mean() - slope * (ks - ks.mean())
        se = math.sqrt(float(np.sum(resid**2)) / (len(hist) - 2) / sxx)
        k0 = int(ks.min())
        per_cpu = float(caps[ks == k0].mean()) / k0
        if per_cpu <= 4 * se:
            return  # not enough evidence yet; keep collecting
        self.pending[i] = False
        if slope >= 0.25 * per_cpu:
            self.suspect[i] = 0
            return
        if not self.suspect[i] or self.step - self.suspect[i] > self.MEMORY_STEPS:
            self.suspect[i] = self.step
            self.history[i] = [h for h in hist if h[1] == k]
            return
        plateau = float(caps[ks == ks.max()].mean())
        self.saturated_at[i] = max(k0, min(k, math.ceil(plateau / per_cpu)))
        self.plateau[i] = plateau
        self.saturated_age[i] = 0
        self.suspect[i] = 0

    def _extend_plateau(self, i: int, k: int) -> None:
        """A saturated stage released below its mark: is it still on the plateau?

        The mark moves down to ``k`` while the capacity measured there stays within two
        noise deviations of the plateau, so useless CPUs are released one by one.
        """
        sat = self.saturated_at[i]
        if not sat or k >= sat:
            return
        samples = [h[2] for h in self.history[i] if h[1] == k]
        if len(samples) < 3:
            return
        mean = float(np.mean(samples))
        if mean >= self.plateau[i] * (1 - 2 * math.sqrt(self.noise_var[i])):
            self.saturated_at[i] = k
        else:
            self.saturated_at[i] = k + 1  # the plateau starts above k

    def capacity(self, i: int, k: int, now: int | None = None) -> float:
        """Estimated samples/s of stage ``i`` with ``k`` dedicated CPUs (holding ``now``).

        Linear in ``k`` from the measured per-CPU rate, except that a saturated stage
        keeps its capacity down to its saturation point.
        """
        r = self.rate[i]
        if math.isnan(r):
            return math.inf
        sat = self.saturated_at[i]
        if now is not None and sat and k >= sat and now >= sat:
            return r * now  # flat beyond the saturation point
        return r * k

    def throughput(self, alloc: Sequence[int], cpus_total: int, gpu_rate: float,
                   now: Sequence[int]) -> float:
        """Estimated steady throughput of ``alloc`` (rates measured holding ``now``)."""
        share = self.share(alloc, cpus_total)
        slowest = min(self.capacity(i, k, now[i]) for i, k in enumerate(alloc)) * share
        return min(1.0, slowest / gpu_rate) if math.isfinite(slowest) else 0.0


def time_share(alloc: Sequence[int], cpus_total: int, overhead: float = 0.0) -> float:
    """Fraction of a CPU's rate each worker keeps when ``sum(alloc)`` workers share the machine.

    Time-slicing gives each worker ``cpus_total / total`` of a CPU, of which context
    switches cost a further ``overhead`` per 100% of oversubscription.
    """
    total = sum(alloc)
    if total <= cpus_total:
        return 1.0
    return cpus_total / total / (1.0 + overhead * (total / cpus_total - 1.0))


class QLearningAgent(Agent):
    """InTune's tabular Q-learning tuner (see the module docstring for the design).

    Args:
        epsilon: exploration schedule, an :class:`EpsilonSchedule` or ``(start, end,
            decay_steps)``; default ``(0.05, 0.01, 2000)`` when starting from a pretrained
            table (deployed), ``(0.3, 0.02, 1500)`` from scratch.
        learning_rate: step size of the Q-update.
        discount: discount factor of future rewards.
        seed: seeds ``numpy.random.default_rng`` (exploration, tie-breaks).
        pretrained: ``False`` (empty table), ``True`` (the shipped table) or a path to a
            table file.
        memory_weight: weight of the worst-case memory fraction in the objective.
        oom_penalty: reward on an out-of-memory crash.
        memory_margin: fraction of memory capacity the shield keeps free.
        slack_margin: a stage has slack if with one CPU fewer it would still be this much
            faster than the bottleneck.
        gpu_tolerance: the GPU counts as the bottleneck once every stage reaches
            ``(1 - gpu_tolerance) * gpu_rate``.
        rate_ema: smoothing factor of the per-CPU rate estimates.
        learn: update the table in :meth:`observe` (``False`` freezes it and stops
            exploring: a purely greedy policy).
        optimistic_init: initial Q-value of an empty table (optimism drives exploration).
        safe_exploration: random exploration never releases a CPU that is not slack;
            pretraining turns it off.
        unknown_worker_fraction: per-worker memory assumed (as a fraction of capacity) for
            a one-CPU stage whose workers were never measured and cannot be probed.
    """

    name = "qlearning"

    def __init__(self, epsilon: EpsilonSchedule | Sequence[float] | None = None,
                 learning_rate: float = 0.1, discount: float = 0.9, seed: int | None = None,
                 pretrained: bool | str | Path = False, memory_weight: float = 0.1,
                 oom_penalty: float = 10.0, memory_margin: float = 0.002,
                 slack_margin: float = 0.03, gpu_tolerance: float = 0.01,
                 rate_ema: float = 0.3, learn: bool = True,
                 optimistic_init: float = 0.05, safe_exploration: bool = True,
                 unknown_worker_fraction: float = 0.1) -> None:
        if epsilon is None:
            epsilon = (0.05, 0.01, 2000) if pretrained else (0.3, 0.02, 1500)
        if not isinstance(epsilon, EpsilonSchedule):
            try:
                start, end, steps = epsilon
            except (TypeError, ValueError):
                raise ValueError(
                    f"epsilon must be (start, end, decay_steps), got {epsilon!r}") from None
            epsilon = EpsilonSchedule(float(start), float(end), int(steps))
        if not 0 < learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate}")
        if not 0 <= discount < 1:
            raise ValueError(f"discount must be in [0, 1), got {discount}")
        for arg, v in (("memory_margin", memory_margin), ("slack_margin", slack_margin),
                       ("gpu_tolerance", gpu_tolerance),
                       ("unknown_worker_fraction", unknown_worker_fraction)):
            if not 0 <= v < 1:
                raise ValueError(f"{arg} must be in [0, 1), got {v}")
        if not 0 < rate_ema <= 1:
            raise ValueError(f"rate_ema must be in (0, 1], got {rate_ema}")
        self.epsilon = epsilon
        self.learning_rate = float(learning_rate)
        self.discount = float(discount)
        self.memory_weight = float(memory_weight)
        self.oom_penalty = float(oom_penalty)
        self.memory_margin = float(memory_margin)
        self.slack_margin = float(slack_margin)
        self.gpu_tolerance = float(gpu_tolerance)
        self.rate_ema = float(rate_ema)
        self.learning = bool(learn)
        self.safe_exploration = bool(safe_exploration)
        self.unknown_worker_fraction = float(unknown_worker_fraction)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.q = np.full((N_STATES, N_ACTIONS), float(optimistic_init))
        self.visits = np.zeros((N_STATES, N_ACTIONS), dtype=np.int64)
        self.steps = 0  # learning steps since construction (drives epsilon)
        self.metadata: dict[str, Any] = {}
        if pretrained:
            path = PRETRAINED_PATH if pretrained is True else Path(pretrained)
            q, visits, meta = read_table(path)
            self.q, self.visits, self.metadata = q, visits, meta
        self.name = "qlearning" if pretrained else "qlearning-scratch"
        self._est = _Estimator(self.rate_ema)
        self._cache_info: dict[str, Any] | None = None
        self._cache: Perception | None = None
        self._last: tuple[Perception, int, bool] | None = None  # (perception, action, learnable)
        self.shield_blocks = 0  # give actions masked out by the memory shield
        self.probes = 0

    # --- construction helpers used by the registry ---------------------------------
    @classmethod
    def pretrained(cls, seed: int | None = None, **kwargs: Any) -> QLearningAgent:
        """The agent starting from the shipped table (name ``qlearning``)."""
        return cls(seed=seed, pretrained=True, **kwargs)

    # --- perception ----------------------------------------------------------------
    def _perceive(self, info: dict[str, Any]) -> Perception:
        if info is self._cache_info and self._cache is not None:
            return self._cache
        est = self._est
        est.update(info)
        alloc = [int(k) for k in info["allocation"]]
        max_cpus = [int(m) for m in info["max_cpus"]]
        n = len(alloc)
        gpu_rate = float(info["gpu_rate"])
        cpus_total = int(info["cpus_total"])
        share = est.share(alloc, cpus_total)
        caps = [est.capacity(i, alloc[i]) * share for i in range(n)]
        b = min(range(n), key=caps.__getitem__)
        gpu_bound = caps[b] >= gpu_rate * (1 - self.gpu_tolerance)
        target = gpu_rate if gpu_bound else caps[b]
        free = cpus_total - sum(alloc)
        share_less = est.share([*alloc[:-1], alloc[-1] - 1], cpus_total)
        # take: the stage that keeps the most capacity relative to the target with one
        # CPU fewer (the bottleneck itself only as a last resort).
        best, best_over = -1, -math.inf
        sat_b = est.saturated_at[b]
        # On its plateau: releasing a CPU loses nothing (or, one below the known plateau,
        # tests whether the plateau reaches further down; see _Estimator._extend_plateau).
        flat_b = bool(sat_b) and alloc[b] >= sat_b
        for j in range(n):
            if alloc[j] <= 1 or (j == b and not gpu_bound and not flat_b):
                continue
            over = est.capacity(j, alloc[j] - 1, alloc[j]) * share_less / target if target > 0 \
                else math.inf
            if j == b and flat_b:
                over = max(over, 1 + self.slack_margin)  # on its plateau: a spare CPU
            if over > best_over:
                best, best_over = j, over
        slack = best >= 0 and best_over >= 1 + self.slack_margin
        take_stage = best if best >= 0 else (b if alloc[b] > 1 else -1)
        # memory
        elem = info["element_bytes"]
        capacity = float(info["memory_capacity_bytes"])
        limit = capacity * (1 - self.memory_margin)
        worst = est.static + sum(c * e for c, e in zip(est.bufcap, elem, strict=True))
        critical = worst > limit
        probe = False
        fits = True
        give_bytes = 0.0
        if not gpu_bound:
            w = est.worker_bytes[b]
            dbuf = est.buffer_per_cpu[b]
            # Never measured: rigorous upper bounds (static memory not explained by
            # measured workers, shared by this stage's workers; prefetch <= capacity / k).
            known = sum(est.worker_bytes[j] * alloc[j] for j in range(n)  # type: ignore[operator]
                        if est.worker_bytes[j] is not None)
            w_hi = w if w is not None else max(0.0, est.static - known) / alloc[b]
            if w is None and alloc[b] == 1:
                # Nothing to release for a probe: assume a fraction of the machine, or
                # twice the largest worker measured (documented residual risk).
                seen = [x for x in est.worker_bytes if x is not None]
                w_hi = min(w_hi, max(self.unknown_worker_fraction * capacity,
                                     2 * max(seen, default=0.0)))
            dbuf_hi = dbuf if dbuf is not None else est.bufcap[b] / alloc[b]
            give_bytes = w_hi + dbuf_hi * elem[b]
            fits = worst + give_bytes <= limit
            if not fits and (w is None or dbuf is None) and alloc[b] > 1:
                probe, fits = True, True  # measure before deciding
        blocked = alloc[b] >= max_cpus[b] or (
            est.saturated_at[b] > 0 and alloc[b] >= est.saturated_at[b])
        f_b = 0 if gpu_bound else (2 if blocked else 1)
        f_c = 0 if free > 0 else (1 if free == 0 else 2)
        # "tight" only where a CPU is free: with none free no give is possible anyway, and
        # merging keeps rare states (and their under-trained values) out of the table.
        f_m = 2 if critical else (0 if fits or f_c != 0 else 1)
        feats = (f_b, f_c, int(slack), f_m)
        shed = False
        if f_c == 2 and take_stage >= 0:
            shed, take_stage = self._shed_move(alloc, take_stage, info, worst)
        valid = np.zeros(N_ACTIONS, dtype=bool)
        valid[NOOP] = True
        valid[GIVE] = f_b == 1 and free > 0 and fits and not critical
        valid[TAKE] = take_stage >= 0
        if f_b == 1 and free > 0 and not fits and not critical:
            self.shield_blocks += 1
        p = Perception(state=state_index(feats), features=feats, valid=valid, give_stage=b,
                       take_stage=take_stage, probe=probe, critical=critical, shed=shed,
                       give_bytes=give_bytes,
                       allocation=tuple(alloc), worst_fraction=worst / capacity)
        self._cache_info, self._cache = info, p
        return p

    def _shed_move(self, alloc: list[int], fallback: int, info: dict[str, Any],
                   worst: float) -> tuple[bool, int]:
        """Oversubscribed: ``(shed?, stage)``, the next release towards the best reachable plan.

        No CPU can be added back while oversubscribed. Candidates, valued with the
        objective of :meth:`action_effect` (estimated throughput under the measured
        time-slicing share, minus the memory term, counting a released worker's memory
        and prefetch where measured): the best split of the machine's CPUs (reached by
        shedding until the allocation fits; the table rebalances afterwards) and the best
        plan with at most ``alloc`` CPUs per stage. Single releases may all lose (every
        stage a near bottleneck) while several together win, hence plans rather than
        one-step look-ahead: as in the oracle, for each candidate bottleneck level every
        stage gets the fewest CPUs that reach it. The stage furthest above the chosen
        allocation releases a CPU: towards the split if it is at least as good as the
        plan, else towards the plan while it beats the current allocation by more than
        ``slack_margin`` (relative). Re-planned every step with the latest rates. With the
        overhead not measured yet, oversubscription is not trusted: release ``fallback``.
        """
        est = self._est
        n = len(alloc)
        if est.overhead is None:
            return True, fallback
        cpus, gpu = int(info["cpus_total"]), float(info["gpu_rate"])
        capacity = float(info["memory_capacity_bytes"])
        elem = info["element_bytes"]
        freed = [(est.worker_bytes[j] or 0.0) + (est.buffer_per_cpu[j] or 0.0) * elem[j]
                 for j in range(n)]

        def objective(a: list[int]) -> float:
            mem = worst - sum((alloc[j] - a[j]) * freed[j] for j in range(n))
            return est.throughput(a, cpus, gpu, alloc) - self.memory_weight * mem / capacity

        def best(limits: list[int], budget: float) -> tuple[float, list[int] | None]:
            """Best allocation with at most ``limits`` CPUs per stage and ``budget`` in all."""
            tabs = [None if not math.isfinite(est.rate[j]) else
                    [est.capacity(j, k, alloc[j]) for k in range(1, limits[j] + 1)]
                    for j in range(n)]
            best_x, plan = -math.inf, None
            for level in sorted({c for t in tabs if t is not None for c in t}):
                need = [min(alloc[j], limits[j]) if t is None else bisect.bisect_left(t, level) + 1
                        for j, t in enumerate(tabs)]
                if any(k > m for k, m in zip(need, limits, strict=True)) or sum(need) > budget:
                    continue  # some stage cannot reach this level within the CPUs
                x = objective(need)
                if x > best_x:
                    best_x, plan = x, need
            return best_x, plan

        x_now = objective(alloc)
        # Shedding until the allocation fits lets the table rebalance afterwards: compare
        # the best split of the machine's CPUs with the best time-sliced plan.
        max_cpus = [int(m) for m in info["max_cpus"]]
        x_fit, fit = best(max_cpus, cpus)
        x_sub, sub = best(alloc, math.inf)
        if fit is not None and x_fit >= max(x_sub, x_now):
            return True, max(range(n), key=lambda j: alloc[j] - fit[j])
        # Releases cannot be undone: move only for a clear gain, so that noise in the
        # rates does not pick among near-equal plans and walk past the best one.
        if sub is None or x_sub - x_now <= self.slack_margin * abs(x_now):
            return False, fallback
        return True, max(range(n), key=lambda j: alloc[j] - sub[j])

    # --- Agent API -----------------------------------------------------------------
    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Start an episode: forget the pipeline estimates, keep the table."""
        self._est = _Estimator(self.rate_ema)
        self._est.start(info)
        self._cache_info, self._cache, self._last = None, None, None

    def greedy(self, p: Perception) -> int:
        """Best valid abstract action for a perception (ties broken at random)."""
        qs = np.where(p.valid, self.q[p.state], -np.inf)
        top = np.flatnonzero(qs == qs.max())
        return int(top[0] if len(top) == 1 else self.rng.choice(top))

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int | Allocation:
        """Choose an abstract action (epsilon-greedy, shielded) and return its env action."""
        if self._est.n == 0:
            self._est.start(info)
        p = self._perceive(info)
        n = len(info["allocation"])
        eps = self.epsilon.value(self.steps) if self.learning else 0.0
        if p.critical and p.valid[TAKE]:
            # Shield: shed memory now if the worst case is over the limit. Learnt from
            # (off-policy).
            a, learnable = TAKE, True
        elif p.features[1] == 2:
            # Oversubscribed (the machine shrank): no CPU can be given back, so a release
            # is never explored; shed a CPU only while the model says it pays (see
            # _shed_move). Learnt from (off-policy).
            a, learnable = (TAKE if p.shed else NOOP), True
        elif self.rng.random() < eps:
            explore = p.valid.copy()
            if self.safe_exploration and not p.features[2]:
                # Releasing a CPU that is not slack costs throughput for certain; deployed
                # exploration does not try it (the greedy policy still may, and learns).
                explore[TAKE] = False
            a, learnable = int(self.rng.choice(np.flatnonzero(explore))), True
        else:
            a, learnable = self.greedy(p), True
        if a == GIVE and p.probe:
            # Shield: the bottleneck's per-worker memory is unknown and its upper bound
            # does not fit; measure it by releasing one of its CPUs (not learnt from).
            self.probes += 1
            self._last = (p, a, False)
            return common.encode_action(p.give_stage, -1, n)
        self._last = (p, a, learnable)
        if a == GIVE:
            return common.encode_action(p.give_stage, +1, n)
        if a == TAKE:
            return common.encode_action(p.take_stage, -1, n)
        return common.NOOP

    def observe(self, obs: np.ndarray, action: int | Allocation, reward: float,
                next_obs: np.ndarray, next_info: dict[str, Any], terminated: bool,
                truncated: bool) -> None:
        """Q-update from the last transition (the env's ``reward`` is not used, see above)."""
        if self._last is None:
            return
        p, a, learnable = self._last
        nxt = self._perceive(next_info)
        self._last = None
        if not (self.learning and learnable):
            return
        if terminated and next_info.get("oom", False):
            over = float(next_info["memory_bytes"]) - float(next_info["memory_capacity_bytes"])
            if a != GIVE or over > p.give_bytes:
                # Memory the agent did not add (a co-tenant, a shrinking machine) crashed
                # the job: nothing this action could have avoided, so nothing to learn.
                return
            target = -self.oom_penalty
        else:
            r = self.action_effect(p, nxt, next_info)
            future = 0.0 if terminated else float(
                np.max(np.where(nxt.valid, self.q[nxt.state], -np.inf)))
            target = r + self.discount * future
        self.q[p.state, a] += self.learning_rate * (target - self.q[p.state, a])
        self.visits[p.state, a] += 1
        self.steps += 1

    def action_effect(self, before: Perception, after: Perception,
                      info: dict[str, Any]) -> float:
        """Reward: the change of the objective caused by the move, under the latest estimates.

        Both allocations are valued with the rates measured *after* the move, so noise
        and events between two steps do not enter the reward; a no-op earns exactly 0.
        """
        if before.allocation == after.allocation:
            return 0.0
        cpus, gpu = int(info["cpus_total"]), float(info["gpu_rate"])
        now = after.allocation
        gain = (self._est.throughput(after.allocation, cpus, gpu, now)
                - self._est.throughput(before.allocation, cpus, gpu, now))
        return gain - self.memory_weight * (after.worst_fraction - before.worst_fraction)

    # --- persistence ---------------------------------------------------------------
    def table_dict(self) -> dict[str, Any]:
        """The learned state as a JSON-ready dict (see :func:`write_table`)."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": FILE_KIND,
            "features": [[name, list(values)] for name, values in FEATURES],
            "actions": list(ACTIONS),
            "q": [[float(v) for v in row] for row in self.q],
            "visits": [[int(v) for v in row] for row in self.visits],
            "metadata": {**self.metadata,
                         "hyperparameters": {
                             "learning_rate": self.learning_rate, "discount": self.discount,
                             "memory_weight": self.memory_weight,
                             "slack_margin": self.slack_margin,
                             "memory_margin": self.memory_margin,
                             "gpu_tolerance": self.gpu_tolerance, "rate_ema": self.rate_ema}},
        }

    def save(self, path: str | Path) -> Path:
        """Write the table atomically to ``path`` (JSON); returns the path."""
        return write_table(path, self.table_dict())

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> QLearningAgent:
        """An agent starting from the table in ``path`` (raises :class:`QTableError`)."""
        return cls(pretrained=Path(path), **kwargs)

    def policy_table(self) -> list[tuple[str, str, int]]:
        """(state, greedy action, visits) of every visited state, for reports.

        ``give`` counts as possible only where the state allows it (a stage bottleneck,
        free CPUs, memory fits), as at run time. Oversubscribed states show ``plan``:
        there the shedding plan decides (``take`` or ``noop``), not the table.
        """
        out = []
        for s in range(N_STATES):
            if self.visits[s].sum() == 0:
                continue
            f = state_features(s)
            qs = self.q[s].copy()
            if not (f[0] == 1 and f[1] == 0 and f[3] == 0):
                qs[GIVE] = -np.inf
            action = "plan" if f[1] == 2 else ACTIONS[int(np.argmax(qs))]
            out.append((describe_state(s), action,
                        int(self.visits[s].sum())))
        return out


def write_table(path: str | Path, table: dict[str, Any]) -> Path:
    """Write ``table`` as JSON atomically: temp file in the same folder, then rename."""
    path = Path(path)
    text = json.dumps(table, indent=1, sort_keys=True, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a table is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read and validate a table file: ``(q, visits, metadata)``; :class:`QTableError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise QTableError(f"{path}: cannot read Q-table file ({err.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise QTableError(f"{path}: not a valid Q-table: corrupt or truncated JSON "
                          f"({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise QTableError(f"{path}: not a valid Q-table: expected a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise QTableError(f"{path}: format_version is {version!r}; this version of intune "
                          f"reads format_version {FORMAT_VERSION}")
    if data.get("kind") != FILE_KIND:
        raise QTableError(f"{path}: kind is {data.get('kind')!r}, expected {FILE_KIND!r}")
    features = [[name, list(values)] for name, values in FEATURES]
    if data.get("features") != features or data.get("actions") != list(ACTIONS):
        raise QTableError(f"{path}: the table's features/actions do not match this agent's "
                          f"(expected features {[f[0] for f in features]} and actions "
                          f"{list(ACTIONS)}); retrain it")
    arrays = []
    for key, dtype in (("q", float), ("visits", np.int64)):
        try:
            arr = np.asarray(data.get(key), dtype=dtype)
        except (TypeError, ValueError):
            raise QTableError(f"{path}: {key!r} must be a {N_STATES}x{N_ACTIONS} table of "
                              f"numbers") from None
        if arr.shape != (N_STATES, N_ACTIONS):
            raise QTableError(f"{path}: {key!r} has shape {arr.shape}, expected "
                              f"({N_STATES}, {N_ACTIONS})")
        if not np.all(np.isfinite(arr)):
            raise QTableError(f"{path}: {key!r} holds non-finite values")
        arrays.append(arr)
    meta = data.get("metadata", {})
    if not isinstance(meta, dict):
        raise QTableError(f"{path}: 'metadata' must be an object")
    meta = {k: v for k, v in meta.items() if k != "hyperparameters"}
    return arrays[0], arrays[1], meta


class FrozenQLearningAgent(QLearningAgent):
    """Ablation ``qlearning-frozen``: the pretrained table, greedy, never updated online."""

    name = "qlearning-frozen"

    def __init__(self, pretrained: bool | str | Path = True, **kwargs: Any) -> None:
        kwargs["learn"] = False
        super().__init__(pretrained=pretrained, **kwargs)
        self.name = "qlearning-frozen"


class RuleAgent(QLearningAgent):
    """Ablation ``qlearning-rule``: the same perception and shield, a fixed rule, no table.

    Rule: ``give`` whenever it is valid (a stage is the bottleneck, a CPU is free and its
    next worker fits); else ``take`` if some stage has clear slack; else ``noop``. The
    forced moves (shed memory when critical, the oversubscription plan) are the same as
    the learning agent's.
    """

    name = "qlearning-rule"

    def __init__(self, **kwargs: Any) -> None:
        kwargs["learn"] = False
        kwargs.pop("pretrained", None)
        super().__init__(pretrained=False, **kwargs)
        self.name = "qlearning-rule"

    def greedy(self, p: Perception) -> int:
        """The fixed rule (see the class docstring); the table is not consulted."""
        if p.valid[GIVE]:
            return GIVE
        if p.valid[TAKE] and p.features[2]:
            return TAKE
        return NOOP
