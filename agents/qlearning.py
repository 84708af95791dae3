"""InTune's agent: tabular Q-learning over a small, transferable abstraction of the pipeline.

The agent keeps a Q-table over an *abstract* state and *abstract* actions, so the table
has the same tiny shape (54 states x 3 actions) for every machine size and stage count,
and a table learnt on some pipelines applies to others. Three files, read in this order:

- :mod:`agents.qlearning_estimator`: per-stage rate and memory estimates, saturation
  marks and the statistical tests behind them (what the agent measures);
- this module: the state abstraction, Q-learning, the memory shield, act/observe;
- :mod:`agents.qlearning_table`: the table file format (read/write) and state indexing.

Abstract state (``FEATURES``): which is the bottleneck (the GPU / a stage that can take
another CPU / a stage that cannot: at ``max_cpus`` or saturated), CPUs (some free / none
free / oversubscribed after the machine shrank), whether some stage has clear slack (it
would still exceed the current bottleneck rate by ``slack_margin`` with one CPU fewer, and,
unless memory binds, by two standard errors of the two measured rates), and
memory (the bottleneck's next worker fits / does not fit, told apart only while a CPU is
free / the current allocation's worst case already exceeds the limit). Abstract actions
(``ACTIONS``): ``noop``; ``give`` one CPU to the bottleneck stage; ``take`` one CPU from
the most over-provisioned stage (the highest capacity relative to the bottleneck with one
CPU fewer). Moving a CPU from slack to the bottleneck is a ``take``, then a ``give``.

Reward. The agent learns from the change its move made to its objective ``x = estimated
throughput / gpu_rate - memory_weight * worst-case memory / capacity``: both allocations
are valued with the rates measured *after* the move, so a no-op earns exactly 0 and
neither noise nor events between two steps enter the reward (``-oom_penalty`` on an
out-of-memory crash another action would have avoided: after a ``give`` that added at
least the excess, or after a ``noop`` that kept a slack CPU whose measured memory is at
least the excess, as when a co-tenant arrives; see :meth:`QLearningAgent.avoidable`.
Other crashes were caused by memory the agent did not add and are not learnt from). The
second case is the table's own decision: whether to keep a memory margin by releasing
slack, per class of states, which a fixed rule cannot know. A sum of changes telescopes
(``sum(discount**t * (x[t+1] - x[t])) = (1 - discount) / discount * sum(discount**t * x[t])
- x[0]``), so the best policy is the one for the level ``x``, but the signal does not
carry the throughput level, which differs between scenarios and aliased states and would
drown the small differences between actions.

Safety shield. ``give`` is masked out whenever the predicted worst-case memory after the
move exceeds ``capacity * (1 - memory_margin)`` less a margin for the measured noise of
memory (:meth:`Estimator.memory_noise_margin`; 0 in the simulator, where it is exact). A
stage whose per-worker memory was never measured gets the rigorous upper bound
``(static - known workers) / cpus``; if that does
not fit, the agent first *probes* (releases one CPU of the stage and measures the memory
freed) instead of guessing; probes are not learnt from, nor are releases of a saturated
bottleneck below its mark (tests of how far its plateau reaches, which cost throughput
when it does not: learnt from, they taught the table to keep slack), nor the forced
release that tests a bottleneck held at its ``max_cpus`` (:meth:`Estimator.test_at_max`:
no add ever comes to judge whether it is capped below that). A one-CPU stage
cannot be probed: it is assumed to need at most twice the largest worker measured in this
pipeline (its own scale) or, before any is measured, ``unknown_worker_fraction`` of the
memory (5%: half of what one CPU per stage leaves free in the generated suite); a
documented residual risk. If the current allocation's worst case exceeds the limit (a
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
been measured it sheds until the allocation fits (with fewer CPUs than stages, where
nothing fits, it plans with the prior ``slice_overhead`` instead). A saturated
bottleneck at its mark is tested first, by one release (the planner would value the lost
thread linearly and never test it). Known limit: capacity is extrapolated linearly from
the current per-CPU rate, so a stage whose per-thread rate rises as threads are released
(contention) is undervalued with fewer threads, and the agent may keep more time-sliced
threads than the best allocation has.

Time-slicing on purpose. With few CPUs and many stages the best allocation often has
more threads than CPUs. When no CPU is free and the bottleneck could take a worker whose
memory fits, the agent adds a time-sliced thread for it as a whole allocation
(``set_allocation``; env actions never oversubscribe) if its model says it pays: before
the context-switch overhead is measured, one thread is valued with a cautious prior
(``slice_overhead``), and where stages tie as the bottleneck (a thread for each gains,
a thread for one does not) so is the best time-sliced plan; crossing into
time-slicing makes the estimator measure the overhead from the other stages' rates, and
from then on one planner decides both adding and shedding threads (adding needs twice
the margin and no release in the last ``MEMORY_STEPS`` steps, so the two never
alternate). These moves are plans, not learnt.
If the thread would pay but the bottleneck's worker memory is unknown and its bound does
not fit, the agent probes it first (no CPU is free, so no ``give`` would ever come to
probe it).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Agent, Allocation
from agents.qlearning_estimator import Estimator, time_share
from agents.qlearning_table import (
    ACTIONS,
    FEATURES,
    FILE_KIND,
    FORMAT_VERSION,
    GIVE,
    N_ACTIONS,
    N_STATES,
    NOOP,
    PRETRAINED_PATH,
    TAKE,
    QTableError,
    describe_state,
    read_table,
    state_features,
    state_index,
    write_table,
)
from intune_env import common

__all__ = [
    "ACTIONS",
    "FEATURES",
    "FILE_KIND",
    "FORMAT_VERSION",
    "GIVE",
    "NOOP",
    "N_ACTIONS",
    "N_STATES",
    "PRETRAINED_PATH",
    "TAKE",
    "EpsilonSchedule",
    "Estimator",
    "FrozenQLearningAgent",
    "Perception",
    "QLearningAgent",
    "QTableError",
    "RuleAgent",
    "describe_state",
    "read_table",
    "state_features",
    "state_index",
    "time_share",
    "write_table",
]


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
    give_fits: bool  # the bottleneck stage can take a worker and its memory is known to fit
    allocation: tuple[int, ...]
    worst_fraction: float  # predicted worst-case memory / capacity
    take_bytes: float = 0.0  # memory a take is measured to free (0 if not measured)
    # a take would release the bottleneck on its saturation plateau: a test of how far
    # the plateau reaches down (a measurement, like a probe), not a release of slack
    plateau_test: bool = False
    # the bottleneck, marked at its max_cpus for a release test (Estimator.test_at_max),
    # is on its mark: the release is that test, forced (a measurement, not learnt)
    max_test: bool = False



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
        memory_margin: fraction of memory capacity the shield keeps free, on top of the
            margin for measured memory noise (:meth:`Estimator.memory_noise_margin`).
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
            a one-CPU stage whose workers cannot be probed, while no worker of the
            pipeline has been measured (after that: twice the largest measured).
        time_slicing: when no CPU is free, add a time-sliced thread to the bottleneck
            (a whole allocation through ``set_allocation``) while the time-slicing model
            says it pays (see :meth:`_slice_pays`); ``False`` never oversubscribes.
        slice_overhead: context-switch overhead assumed before it is measured (per 100%
            of oversubscription; cautious: the simulator's default is 0.1).
        noise_headroom: standard deviations of one step's rate noise (measured) by which
            a stage must stay above the bottleneck with one CPU fewer to count as slack.
            Under noise the throughput is the mean of the slowest noisy stage, which
            spare capacity raises (holding the even split beat the oracle's allocation
            by 4-9% at noise cv 0.1-0.2). Measured on round 5's first version, ``2``
            cut the test-split episodes below the even split that fits from 51 to 21 but
            tripled the crashes at co-tenant arrivals (the slack kept is memory; see
            ``benchmarks/results/generalization.md``), so the default is ``0``.
    """

    name = "qlearning"

    def __init__(self, epsilon: EpsilonSchedule | Sequence[float] | None = None,
                 learning_rate: float = 0.1, discount: float = 0.9, seed: int | None = None,
                 pretrained: bool | str | Path = False, memory_weight: float = 0.1,
                 oom_penalty: float = 10.0, memory_margin: float = 0.0,
                 slack_margin: float = 0.03, gpu_tolerance: float = 0.01,
                 rate_ema: float = 0.3, learn: bool = True,
                 optimistic_init: float = 0.05, safe_exploration: bool = True,
                 unknown_worker_fraction: float = 0.05, time_slicing: bool = True,
                 slice_overhead: float = 0.25, noise_headroom: float = 0.0) -> None:
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
        if not 0 <= slice_overhead <= 10:
            raise ValueError(f"slice_overhead must be in [0, 10], got {slice_overhead}")
        if not 0 <= noise_headroom <= 10:
            raise ValueError(f"noise_headroom must be in [0, 10], got {noise_headroom}")
        self.noise_headroom = float(noise_headroom)
        self.time_slicing = bool(time_slicing)
        self.slice_overhead = float(slice_overhead)
        self.slice_gives = 0  # time-sliced threads added on purpose
        self._last_shed = -10**9  # estimator step of the last oversubscribed release
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
        self._est = Estimator(self.rate_ema, self.slice_overhead)
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
        # memory
        elem = info["element_bytes"]
        capacity = float(info["memory_capacity_bytes"])
        # The worst case is predicted exactly from measured memory; the margin covers
        # that memory's measured noise (0 in the simulator), plus ``memory_margin``. A
        # fixed 0.2% kept the oracle's allocation out of reach where it needs 99.9% of
        # memory (suite:test:0032, 0141, 0143).
        limit = capacity * (1 - self.memory_margin) - est.memory_noise_margin()
        worst = est.static + sum(c * e for c, e in zip(est.bufcap, elem, strict=True))
        critical = not worst <= limit  # (a non-finite memory reading is critical too)
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
                # Nothing to release for a probe: assume twice the largest worker measured
                # in this pipeline (its own scale), or before any is measured a fraction
                # of the machine (documented residual risk).
                seen = [x for x in est.worker_bytes if x is not None]
                w_hi = min(w_hi, 2 * max(seen) if seen
                           else self.unknown_worker_fraction * capacity)
            dbuf_hi = dbuf if dbuf is not None else est.bufcap[b] / alloc[b]
            give_bytes = w_hi + dbuf_hi * elem[b]
            fits = worst + give_bytes <= limit
            if not fits and (w is None or dbuf is None) and alloc[b] > 1:
                probe, fits = True, True  # measure before deciding
        share_less = est.share([*alloc[:-1], alloc[-1] - 1], cpus_total)
        # take: the stage that keeps the most capacity relative to the target with one
        # CPU fewer (the bottleneck itself only as a last resort).
        best, best_over = -1, -math.inf
        if not gpu_bound and alloc[b] >= max_cpus[b]:
            est.test_at_max(b, alloc[b])  # (a no-op unless the test would be decisive)
        sat_b = est.saturated_at[b]
        # On its plateau: releasing a CPU loses nothing (or, one below the known plateau,
        # tests whether the plateau reaches further down; see Estimator._extend_plateau).
        flat_b = bool(sat_b) and (alloc[b] > sat_b if est.floor_found[b] else alloc[b] >= sat_b)
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
        if slack and fits and not critical and not (best == b and flat_b):
            # Clear slack also needs two standard errors of the two smoothed rates, so
            # that noise alone cannot make a near-bottleneck look over-provisioned (it
            # walked one up and down), and ``noise_headroom`` standard deviations of one
            # step's noise on them (spare capacity raises the mean of the slowest noisy
            # stage; off by default, see the argument). Not where memory binds: there a
            # release is what lets the bottleneck's next worker fit.
            var = est.rate_rel_var(best) + (0.0 if gpu_bound else est.rate_rel_var(b))
            step_var = est.noise_var[best] + (0.0 if gpu_bound else est.noise_var[b])
            slack = best_over >= 1 + max(2 * math.sqrt(var),
                                          self.noise_headroom * math.sqrt(step_var))
        # Held one below its mark, the bottleneck is being tested (does the plateau reach
        # down here? see Estimator._extend_plateau): a give would end the test after one
        # sample, and the next release start it again (the release and give alternated,
        # 8 steps per useless CPU).
        testing = bool(sat_b) and not est.floor_found[b] and alloc[b] == sat_b - 1
        blocked = alloc[b] >= max_cpus[b] or testing or (bool(sat_b) and alloc[b] >= sat_b)
        f_b = 0 if gpu_bound else (2 if blocked else 1)
        f_c = 0 if free > 0 else (1 if free == 0 else 2)
        # "tight" only where a CPU is free: with none free no give is possible anyway, and
        # merging keeps rare states (and their under-trained values) out of the table.
        f_m = 2 if critical else (0 if fits or f_c != 0 else 1)
        feats = (f_b, f_c, int(slack), f_m)
        shed = False
        # releasing the bottleneck at its mark goes below it: a test (above it: spare)
        at_mark = (take_stage == b and not gpu_bound and bool(sat_b)
                   and not est.floor_found[b] and alloc[b] == sat_b)
        if f_c == 2 and take_stage >= 0:
            # Oversubscribed: the planner values a release below the mark as linear, so
            # it would never test the plateau; the test comes first.
            shed, take_stage = (True, b) if at_mark else self._shed_move(
                alloc, take_stage, info, worst)
        max_test = (est.max_test[b] and not gpu_bound and not est.floor_found[b]
                    and alloc[b] == sat_b > 1)
        if max_test:
            take_stage = b
        take_bytes = 0.0
        if take_stage >= 0 and est.worker_bytes[take_stage] is not None:
            take_bytes = est.worker_bytes[take_stage] + (
                est.buffer_per_cpu[take_stage] or 0.0) * elem[take_stage]
        plateau_test = at_mark  # (oversubscribed, the test is the shed move: take_stage b)
        valid = np.zeros(N_ACTIONS, dtype=bool)
        valid[NOOP] = True
        valid[GIVE] = f_b == 1 and free > 0 and fits and not critical
        valid[TAKE] = take_stage >= 0
        if f_b == 1 and free > 0 and not fits and not critical:
            self.shield_blocks += 1
        p = Perception(state=state_index(feats), features=feats, valid=valid, give_stage=b,
                       take_stage=take_stage, probe=probe, critical=critical, shed=shed,
                       give_bytes=give_bytes, take_bytes=take_bytes,
                       give_fits=f_b == 1 and fits and not probe and not critical,
                       allocation=tuple(alloc), worst_fraction=worst / capacity,
                       plateau_test=plateau_test, max_test=max_test)
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
        overhead not measured yet, oversubscription is not trusted: release ``fallback``
        (unless the machine has fewer CPUs than stages: then plan with the prior).
        """
        est = self._est
        n = len(alloc)
        cpus = int(info["cpus_total"])
        overhead = None
        if est.overhead is None:
            if n <= cpus:
                return True, fallback
            # Fewer CPUs than stages: no allocation fits, so shedding towards one never
            # ends and no crossing ever measures the overhead. Plan with the prior that
            # added the threads (releasing with no plan undid every add the next step:
            # 5 stages on 2 CPUs alternated between two allocations all episode).
            overhead = self.slice_overhead
        objective, best = self._planner(alloc, info, worst, overhead)
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

    def _planner(self, alloc: list[int], info: dict[str, Any], worst: float,
                 overhead: float | None = None) -> tuple[Any, Any]:
        """``(objective, best)`` for plans around ``alloc`` (see :meth:`_shed_move`).

        ``objective(a)``: estimated throughput of ``a`` under the measured time-slicing
        share (or that of ``overhead``), minus the memory term; ``best(limits, budget)``:
        the best allocation with at most ``limits`` CPUs per stage and ``budget`` in all,
        and its objective.
        """
        est = self._est
        n = len(alloc)
        cpus, gpu = int(info["cpus_total"]), float(info["gpu_rate"])
        capacity = float(info["memory_capacity_bytes"])
        elem = info["element_bytes"]
        freed = [(est.worker_bytes[j] or 0.0) + (est.buffer_per_cpu[j] or 0.0) * elem[j]
                 for j in range(n)]

        def objective(a: list[int]) -> float:
            mem = worst - sum((alloc[j] - a[j]) * freed[j] for j in range(n))
            return (est.throughput(a, cpus, gpu, alloc, overhead)
                    - self.memory_weight * mem / capacity)

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

        return objective, best

    def _slice_pays(self, p: Perception, info: dict[str, Any], memory: bool = True) -> bool:
        """Would one more (time-sliced) thread for the bottleneck raise the objective?

        Values the current allocation and the one with the bottleneck's extra thread with
        the measured rates and the time-slicing share, using the measured context-switch
        overhead or, before it is measured, the cautious prior ``slice_overhead``; the
        gain must exceed ``slack_margin`` (relative) after the memory term. Once a thread
        beyond the machine is added, the estimator measures the overhead from the change
        of the other stages' rates, and the shedding plan (:meth:`_shed_move`) undoes
        the move if the measured share says it does not pay. If one thread does not pay
        because another stage then is the slowest (stages tied as the bottleneck gain
        only from a thread each) and the overhead is not measured yet, the best
        time-sliced plan (:meth:`_planner`, with the prior) may: the bottleneck's thread
        is its first step, under the rules of adding while time-sliced (it must beat the
        current allocation and the best split of the machine by twice the margin, and no
        release in the last ``MEMORY_STEPS`` steps, so adding and shedding do not
        alternate). ``memory=False`` leaves the
        memory term of the one-thread check out (asked before the thread's memory is
        measured, see :meth:`act`); the plan counts only measured workers' memory.
        """
        est = self._est
        alloc = list(p.allocation)
        b = p.give_stage
        cpus, gpu = int(info["cpus_total"]), float(info["gpu_rate"])
        overhead = est.overhead if est.overhead is not None else self.slice_overhead

        def value(a: list[int]) -> float:
            share = time_share(a, cpus, overhead)
            slowest = min(est.capacity(i, k, alloc[i]) for i, k in enumerate(a)) * share
            return min(1.0, slowest / gpu) if math.isfinite(slowest) else 0.0

        capacity = float(info["memory_capacity_bytes"])
        if est.overhead is not None and sum(alloc) > cpus:
            # Already time-sliced, overhead measured: one planner for adding and shedding
            # threads, so the two never work against each other.
            return self._plan_adds(p, info)
        more = alloc.copy()
        more[b] += 1
        x_now = value(alloc)
        gain = value(more) - x_now - memory * self.memory_weight * p.give_bytes / capacity
        if gain > self.slack_margin * x_now:
            return True
        # One thread may not pay where several would: with stages tied as the bottleneck
        # (another is the slowest once the bottleneck has its thread), a thread for one
        # only taxes the others. Then, until the overhead is measured, value the best
        # plan with the prior, under the rules of adding while time-sliced (above): a
        # thread for the bottleneck is its first step. Planned only in that case: a plan
        # costs milliseconds (planning on every tie after the overhead is measured too
        # cost 1.4-1.6x the wall time on the generated suite for ~0.5% more pipelines
        # at >= 0.95 on the train split).
        if est.overhead is not None:
            return False  # (once the overhead is measured, crossing was tried: see above)
        if min(range(len(more)), key=lambda i: est.capacity(i, more[i], alloc[i])) == b:
            return False  # no tie: the bottleneck is still the slowest with its thread
        return self._plan_adds(p, info, overhead)

    def _plan_adds(self, p: Perception, info: dict[str, Any],
                   overhead: float | None = None) -> bool:
        """Does the best time-sliced plan give the bottleneck another thread?

        The plan (any number of threads, :meth:`_planner` with the measured overhead or
        ``overhead``) must give the bottleneck more threads than it has and beat both
        the current allocation and the best split of the machine by twice the margin a
        release needs, and no release may have happened in the last ``MEMORY_STEPS``
        steps: a hysteresis band, so noisy rates cannot make adding and shedding
        alternate. (A plan that beats the best split has more threads than CPUs.)
        """
        if self._est.step - self._last_shed <= self._est.MEMORY_STEPS:
            return False  # checked first: a plan costs milliseconds
        alloc, b = list(p.allocation), p.give_stage
        capacity = float(info["memory_capacity_bytes"])
        objective, best = self._planner(alloc, info, p.worst_fraction * capacity, overhead)
        max_cpus = [int(m) for m in info["max_cpus"]]
        x_all, plan = best(max_cpus, math.inf)
        x_fit, _ = best(max_cpus, int(info["cpus_total"]))
        x_now = objective(alloc)
        return (plan is not None and plan[b] > alloc[b]
                and x_all - max(x_now, x_fit) > 2 * self.slack_margin * abs(x_now))

    # --- Agent API -----------------------------------------------------------------
    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Start an episode: forget the pipeline estimates, keep the table."""
        self._est = Estimator(self.rate_ema, self.slice_overhead)
        self._est.start(info)
        self._cache_info, self._cache, self._last = None, None, None
        self._last_shed = -10**9

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
        elif p.max_test:
            # The bottleneck held at its max_cpus is tested by a release (is it capped
            # below that? see Estimator.test_at_max): a measurement, not learnt from.
            a, learnable = TAKE, False
        elif (self.time_slicing and p.features[1] >= 1 and p.give_fits
              and self._slice_pays(p, info)):
            # No CPU is free, but one more time-sliced thread for the bottleneck pays
            # under the time-slicing model (see _slice_pays): a whole allocation, since
            # the env's actions never oversubscribe. A plan, not learnt from.
            alloc = list(p.allocation)
            alloc[p.give_stage] += 1
            self.slice_gives += 1
            self._last = None
            return Allocation(alloc)
        elif (self.time_slicing and p.features[1] >= 1 and p.probe and not p.critical
              and self._slice_pays(p, info, memory=False)):
            # A time-sliced thread would pay, but the bottleneck's per-worker memory is
            # unknown and its upper bound does not fit: with no CPU free a give never
            # comes to measure it (below), so measure it now (not learnt from).
            a, learnable = GIVE, False
        elif p.features[1] == 2:
            # Oversubscribed (the machine shrank): no CPU can be given back, so a release
            # is never explored; shed a CPU only while the model says it pays (see
            # _shed_move). Learnt from (off-policy).
            a, learnable = (TAKE if p.shed else NOOP), True
            if p.shed:
                self._last_shed = self._est.step
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
        if a == TAKE and p.plateau_test and not p.critical:
            # Releasing the saturated bottleneck below its mark tests whether the plateau
            # reaches further down: a measurement whose cost says nothing about releasing
            # slack in this state (it made the table keep slack that co-tenants crash).
            learnable = False
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
            if not self.avoidable(p, a, over):
                # Memory the agent did not add (a co-tenant, a shrinking machine) crashed
                # the job, and no other action would have avoided it: nothing to learn.
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

    @staticmethod
    def avoidable(p: Perception, a: int, over: float) -> bool:
        """Would another action have avoided a crash that exceeded capacity by ``over``?

        After a ``give``: yes if the give added at least ``over`` (predicted). After a
        ``noop`` while holding slack: yes if the measured memory of the slack CPU a
        ``take`` would have released is at least ``over`` (a co-tenant arrived and the
        slack the agent kept is what crashed it). This is what lets the table learn, per
        class of states, whether to keep a memory margin by releasing slack; a fixed
        rule cannot know which classes meet co-tenants. A crash after a release is not
        learnt from (releasing more was not an action).
        """
        if a == GIVE:
            return over <= p.give_bytes
        if a == NOOP:
            return bool(p.valid[TAKE] and p.features[2]) and 0 < over <= p.take_bytes
        return False

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
                             "gpu_tolerance": self.gpu_tolerance, "rate_ema": self.rate_ema,
                             "slice_overhead": self.slice_overhead,
                             "noise_headroom": self.noise_headroom}},
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

