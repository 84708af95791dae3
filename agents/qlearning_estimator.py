"""The Q-learner's estimator: what the agent measures about a pipeline while it runs.

Online estimates (from measurable ``info`` keys only, never ``oracle_*``):

- per-stage capacity: ``processed / busy seconds`` is the rate of one CPU of the stage
  (``stage_busy_s = utilisation * cpus * dt``), divided by the time-slice share when the
  machine is oversubscribed and smoothed by an exponential moving average whose factor
  adapts to the measured noise (``rate_ema`` below noise cv ~5%, down to ``MIN_EMA`` above
  ~12%, in between the factor whose average has relative standard error ``RATE_SE``:
  under noise cv 0.15 the fixed factor let single samples move every decision);
  capacity with ``k`` CPUs is estimated as ``rate * k``. Scaling down is conservative for
  concave stages (contention, bandwidth caps), so slack is never over-estimated. The
  measurement noise (which sizes every statistical test here) comes from consecutive
  samples of one allocation only: a move changes a capped stage's per-CPU rate, which is
  not noise;
- time-slicing: ``total`` workers on ``cpus`` CPUs each get a share
  ``(cpus / total) / (1 + overhead * (total / cpus - 1))`` of a CPU. ``overhead`` (context
  switches) is fitted by least squares after the machine is resized (or the agent
  oversubscribes), from each stage's mean per-CPU rate measured after the crossing
  divided by its plain-mean rate just before (same CPUs for the stage, so only the share
  differs), the evidence of every crossing kept, shrunk towards the agent's prior
  (``slice_overhead``) with the weight of one sample at 100% oversubscription (a fit
  from one thread over the machine, which says little, found 0 and made time-slicing
  look free);
- memory: ``static = memory_bytes - sum(buffer_levels * element_bytes)`` is the memory of
  workers, fixed state and everything outside the pipeline; it changes only when CPUs
  change (or an event happens), so after a one-CPU move on stage ``i`` the change of
  ``static`` is that stage's per-worker memory, and the change of its buffer capacity its
  per-CPU prefetch. The worst case of an allocation (every buffer full) is then
  ``static + sum(buffer_capacity * element_bytes)``, predicted exactly in the simulator
  (a live pipeline's memory is noisy: the shield keeps a margin measured from it, see
  :meth:`Estimator.memory_noise_margin`);
- saturation (a bandwidth cap): a least-squares fit of measured capacity against CPUs
  over recent samples; if the slope stays under a quarter of the per-CPU rate (judged
  only with enough statistical power, confirmed twice so a rate drift is not taken for
  it, once while time-sliced), the stage is marked saturated, its plateau counts as
  spare CPUs, and the mark is moved down while releasing CPUs does not lower the
  capacity. The mark is placed from the fewest CPUs either finding measured (within the
  noise of their per-CPU rate), so a cap a single CPU reaches is not held at the CPU
  count where it was found; releases down to it are checked against the plateau on the
  way. While time-sliced, small but significant gains do not count as contention: the
  share model's error alone makes them, and they never pay for the share a thread takes
  from every stage; and the last thread must show its own gain (the two highest thread
  counts), since the line also spans counts below a cap, where threads still gained.
  A bottleneck held at its ``max_cpus`` gets no add to judge: there a release test (a
  tentative mark at ``max_cpus``, checked one release at a time) runs where one CPU of a
  linear stage would be a decisive 6 standard errors of the test, and not again while
  the capacity the stage last showed a gain at still holds (:meth:`Estimator.test_at_max`).


Read next: :mod:`agents.qlearning` (state abstraction, Q-learning, shield) and
:mod:`agents.qlearning_table` (the table file).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class Estimator:
    """Online per-stage estimates of capacity, per-worker memory and saturation."""

    def __init__(self, rate_ema: float, overhead_prior: float | None = None) -> None:
        self.beta = rate_ema
        self.overhead_prior = overhead_prior
        self.n = 0

    #: Samples (over at least two CPU counts) before judging whether added CPUs help.
    MIN_SAMPLES = 6
    #: Steps after which a CPU count's capacity samples are forgotten (conditions drift).
    MEMORY_STEPS = 25
    #: Steps after which a saturation mark is dropped and the stage probed again.
    SATURATION_STEPS = 300
    #: Weight of the overhead prior in the fit (in samples at 100% oversubscription).
    OVERHEAD_PRIOR_WEIGHT = 1.0
    #: Relative standard error the smoothed rates aim for under noise.
    RATE_SE = 0.02
    #: Smallest smoothing factor (the slowest response to a change: ~20 steps).
    MIN_EMA = 0.05

    def start(self, info: dict[str, Any]) -> None:
        n = len(info["allocation"])
        self.n = n
        self.rate = [math.nan] * n  # samples/s per dedicated CPU (smoothed)
        self.noise_var = [0.05**2] * n  # relative variance of one measurement (smoothed)
        self._last_rate = [math.nan] * n  # last per-CPU rate measured
        self._last_share = math.nan  # the time-slice share it was measured at
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
        # (fewest CPUs, capacity per CPU there, its samples) in that first judgement's window
        self.suspect_low: list[tuple[int, float, int]] = [(0, 0.0, 0)] * n
        # fewest CPUs at which the plateau was measured (the mark may be set lower, from
        # the per-CPU rate at fewer CPUs; releases in between are checked on the way)
        self.plateau_low = [0] * n
        self.plateau_n = [1] * n  # samples the plateau was measured with
        # the lower end of the plateau was found (a release below the mark lost capacity):
        # the mark is then a floor, not a spare CPU
        self.floor_found = [False] * n
        self.gain_step = [-10**9] * n  # step of the last judgement that found a gain
        # the mark was placed at max_cpus for a release test (see test_at_max)
        self.max_test = [False] * n
        self.test_var = [0.0] * n  # the noise that test was sized with
        # (CPUs k, capacity there) where the stage last showed a gain from its k-th CPU
        # (a judgement of an add, or a release test at max_cpus refuted at its first step)
        self.gained_at: list[tuple[int, float]] = [(0, 0.0)] * n
        # |change| of static memory between consecutive steps at one allocation (the last
        # MEMORY_STEPS such steps) and, where ``info`` has ``peak_memory_bytes`` (the
        # live env), the peak above the sample (the last MEMORY_STEPS steps): the
        # memory noise the shield's margin is sized by
        self.static_jumps: list[float] = []
        self.peak_gaps: list[float] = []
        self.prev_alloc: list[int] | None = None
        self.prev_static: float | None = None
        self.prev_bufcap: list[int] | None = None
        self.prev_cpus: int | None = None
        self.oversubscribed = False  # more threads than CPUs at the last update
        # time-slicing overhead, fitted after a resize (None: never measured)
        self.overhead: float | None = None
        # per oversubscription level x: [sum of measured shares, count] (see _fit_overhead)
        self._slice_groups: dict[float, list[float]] = {}
        self._slice_ref: list[float] = []  # per-CPU rates just before the resize
        self._slice_alloc: list[int] = []  # the allocation they were measured with
        self._slice_step = -self.MEMORY_STEPS

    def share(self, alloc: Sequence[int], cpus_total: int,
              overhead: float | None = None) -> float:
        """Estimated fraction of a dedicated CPU's rate each worker of ``alloc`` gets
        (with the measured overhead unless ``overhead`` is given)."""
        if overhead is None:
            overhead = self.overhead or 0.0
        return time_share(alloc, cpus_total, overhead)

    def _fit_overhead(self, alloc: list[int], cpus_total: int, busy: Sequence[float],
                      processed: Sequence[float]) -> None:
        """Fit the time-slicing overhead from the per-CPU rates measured across a resize.

        A worker's measured rate divided by its stage's rate just before the resize (same
        CPUs for the stage, so contention is unchanged) is the share ``s`` it now gets.
        The model ``s = (cpus / total) / (1 + overhead * x)`` with ``x = total / cpus - 1``
        gives ``y = (cpus / total) / s - 1 = overhead * x``, fitted by least squares over
        the levels ``x`` seen in the ``MEMORY_STEPS`` steps after each crossing (``y``
        from the mean share measured at that level, weighted by its sample count; small
        ``x``, which says little, weighs little). Evidence from earlier crossings is kept.
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
            group = self._slice_groups.setdefault(x, [0.0, 0.0])
            group[0] += s
            group[1] += 1
        # Invert the *mean* share of each level, not each noisy sample: E[1/s] > 1/E[s]
        # (with noise cv 0.17 the per-sample inversion fitted 0.47 for a true 0.3).
        sxx = sxy = 0.0
        for lvl, (s_sum, cnt) in self._slice_groups.items():
            y = 1 / (1 + lvl) / (s_sum / cnt) - 1
            sxx += cnt * lvl * lvl
            sxy += cnt * lvl * y
        if sxx > 0:
            # Shrunk towards the prior with the weight of one sample at 100%
            # oversubscription: slight oversubscription (small x) says little, and a fit
            # of 0 from it made time-slicing look free.
            prior, w0 = ((0.0, 0.0) if self.overhead_prior is None
                         else (self.overhead_prior, self.OVERHEAD_PRIOR_WEIGHT))
            self.overhead = max(0.0, (sxy + w0 * prior) / (sxx + w0))

    def _reference_rates(self, prev: list[int]) -> list[float]:
        """Per-CPU rates before a resize: the mean of the recent samples at ``prev``.

        A plain mean of up to ``MEMORY_STEPS`` samples, not the moving average: the
        average's noise would be a bias shared by every sample of the overhead fit, which
        then does not average out (with noise cv 0.15 it made the fitted overhead ~1
        where the true one was 0.1).
        """
        ref = []
        for i in range(self.n):
            rs = [c / k for _, k, c in self.history[i] if k == prev[i]]
            ref.append(float(np.mean(rs)) if rs else self.rate[i])
        return ref

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
        # The allocation itself crossed into time-slicing (the agent oversubscribed on
        # purpose): as after a resize, the rates just before are the reference.
        crossed = (not resized and prev is not None
                   and sum(alloc) > cpus_total >= sum(prev))
        if (resized or crossed) and prev is not None:
            # dedicated-CPU rates before the resize: the reference for the share after it
            self._slice_ref, self._slice_alloc = self._reference_rates(prev), list(prev)
            # The sums are kept: the overhead is the machine's, and every crossing adds
            # evidence (a fit from one short window is dominated by noise).
            self._slice_step = self.step
        self._fit_overhead(alloc, cpus_total, busy, processed)
        share = self.share(alloc, cpus_total)
        for i in range(self.n):
            if resized:
                self.history[i] = []
                self.gained_at[i] = (0, 0.0)
            elif prev is not None and alloc[i] != prev[i]:
                self.pending[i] = alloc[i] > prev[i]
            if busy[i] > 0 and processed[i] > 0:
                r = processed[i] / busy[i] / share  # per dedicated CPU
                if math.isnan(self.rate[i]) or resized:
                    self.rate[i] = r  # time-slicing changed: old rates are stale
                else:
                    self.rate[i] += self.ema_factor(i) * (r - self.rate[i])
                if (prev is not None and alloc[i] == prev[i] and share == self._last_share
                        and self._last_rate[i] > 0):
                    # Noise from consecutive samples of one allocation only: a move
                    # changes the per-CPU rate of a capped stage (and the smoothed rate
                    # lags it), which is not noise; the difference of two samples has
                    # twice one sample's variance.
                    rel = (r - self._last_rate[i]) / self._last_rate[i]
                    self.noise_var[i] += 0.1 * (rel * rel / 2 - self.noise_var[i])
                self._last_rate[i] = r
                self.history[i].append((self.step, alloc[i], r * alloc[i]))
        elem = info["element_bytes"]
        static = float(info["memory_bytes"]) - sum(
            b * e for b, e in zip(info["buffer_levels"], elem, strict=True))
        bufcap = [int(c) for c in info["buffer_capacities"]]
        if "peak_memory_bytes" in info:
            gap = max(0.0, float(info["peak_memory_bytes"]) - float(info["memory_bytes"]))
            self.peak_gaps = [*self.peak_gaps[1 - self.MEMORY_STEPS:], gap]
        if prev is not None and self.prev_static is not None and not resized:
            moved = [i for i in range(self.n) if alloc[i] != prev[i]]
            if not moved:
                self.static_jumps = [*self.static_jumps[1 - self.MEMORY_STEPS:],
                                     abs(static - self.prev_static)]
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
        self.oversubscribed = sum(alloc) > cpus_total
        for i in range(self.n):
            self._check_saturation(i, alloc[i])
            self._extend_plateau(i, alloc[i])
            if self.saturated_at[i]:
                self.saturated_age[i] += 1
                # Conditions change (events): forget after a while and re-probe.
                if self.saturated_age[i] > self.SATURATION_STEPS or resized:
                    self.saturated_at[i] = 0
            if not self.saturated_at[i] or self.floor_found[i]:
                self.max_test[i] = False
        self.prev_alloc = alloc
        self._last_share = share
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
        finding in a row (the first may be a rate drift that happened among
        the samples; they are then dropped). While time-sliced the first finding marks
        it: each useless thread taxes every stage, and the next thread may come only
        after the first finding expired (the release test below the mark checks it),
        and a line that shows a gain is checked against the last thread's own gain.
        The saturation point is where the per-CPU rate at the fewest CPUs measured (in
        either finding's window) would reach the plateau, within the noise of that rate.
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
        n0 = int(np.sum(ks == k0))
        if per_cpu <= 4 * se:
            return  # not enough evidence yet; keep collecting
        # Not saturated if a CPU's gain is large, or significantly above zero (strong
        # contention: small but real gains, which a bandwidth cap never shows). Not the
        # latter while time-sliced: the share model's error alone tilts the slope, and a
        # small gain never pays for the share a thread takes from every stage.
        def gains(g: float, g_se: float) -> bool:
            return g >= 0.25 * per_cpu or (g - 2 * g_se > 0 and not self.oversubscribed)

        levels = np.unique(ks)
        if gains(slope, se):
            if not (self.oversubscribed and len(levels) > 2):
                self.pending[i] = False
                self.suspect[i] = 0
                self._gained(i, k)
                return
            # While time-sliced, a useless thread taxes every stage: one line through
            # the window also spans CPU counts below a cap, where CPUs still gained, so
            # the last thread's own gain (the two highest counts) must show it too, or
            # the judgement waits for it. (With dedicated CPUs this marked strong
            # contention saturated, and it lost 10-20%.)
            top, low = caps[ks == levels[-1]], caps[ks == levels[-2]]
            dk = float(levels[-1] - levels[-2])
            g = float(top.mean() - low.mean()) / dk
            # The noise: the measured one, or the spread within CPU counts if larger
            # (early on the measured noise is still its 5% prior).
            df = len(ks) - len(levels)
            within = sum(float(np.sum((caps[ks == v] - caps[ks == v].mean()) ** 2))
                         for v in levels) / max(1, df)
            var = max(self.noise_var[i] * float(np.mean(caps)) ** 2, within)
            g_se = math.sqrt(var * (1 / len(top) + 1 / len(low))) / dk
            if len(top) < 3 or len(low) < 2 or df < 3 or per_cpu <= 4 * g_se:
                return  # the last thread's gain is not measured well enough yet
            if gains(g, g_se):
                self.pending[i] = False
                self.suspect[i] = 0
                self._gained(i, k)
                return
            # Only the last thread is shown useless: the mark goes no lower than the
            # count before it.
            keep = ks >= levels[-2]
            ks, caps = ks[keep], caps[keep]
            k0 = int(levels[-2])
            per_cpu, n0 = float(low.mean()) / k0, len(low)
        self.pending[i] = False
        first = not self.suspect[i] or self.step - self.suspect[i] > self.MEMORY_STEPS
        if first and not self.oversubscribed:
            self.suspect[i] = self.step
            self.suspect_low[i] = (k0, per_cpu, n0)
            self.history[i] = [h for h in hist if h[1] == k]
            return
        plateau = float(caps[ks == ks.max()].mean())
        self.plateau_low[i] = self._mark(i, k, k0, per_cpu, n0, plateau)
        # The first judgement's window (dropped since) may reach fewer CPUs: both found
        # no gain, so its per-CPU rate there places the mark, which the releases down to
        # it then check (see _extend_plateau).
        low_k, low_rate, low_n = self.suspect_low[i]
        if not first and 0 < low_k < k0:  # (an expired first finding says nothing)
            k0, per_cpu, n0 = low_k, low_rate, low_n
        self.saturated_at[i] = self._mark(i, k, k0, per_cpu, n0, plateau)
        self.plateau[i] = plateau
        self.plateau_n[i] = int(np.sum(ks == ks.max()))
        self.floor_found[i] = False
        self.saturated_age[i] = 0
        self.suspect[i] = 0

    def _gained(self, i: int, k: int) -> None:
        """A judgement found that the CPUs added to stage ``i`` (now ``k``) gain."""
        self.gain_step[i] = self.step
        at_k = [h[2] for h in self.history[i] if h[1] == k]
        if at_k:
            self.gained_at[i] = (k, float(np.mean(at_k)))

    def test_at_max(self, i: int, k: int) -> bool:
        """Mark the bottleneck ``i``, held at its ``max_cpus`` ``k``, for a release test.

        No CPU can be added there, so no judgement ever comes from an add, and a capped
        stage held at its maximum was never found out (``suite:test:0009``: a reader
        capped at a third of one CPU's rate held 5 CPUs; after the machine shrank to 3
        CPUs its threads time-sliced everything, at 0.455 of the oracle in every seed).
        A tentative mark at ``k`` makes the agent release one CPU and
        :meth:`_extend_plateau` judge it (4 samples), then the next, while the plateau
        holds. Placed only where the test is decisive: one CPU of a linear stage is
        ``1 / k`` of its capacity, which must be 6 standard errors of the test (4 let
        linear stages down by false passes under noise), with 4 samples at ``k``, none
        time-sliced, no gain judged in the last ``SATURATION_STEPS``, and not where the
        stage last showed a gain at ``k`` and its capacity has not fallen by a CPU's
        worth since. Returns whether the mark was placed.
        """
        if (self.saturated_at[i] or self.oversubscribed
                or self.step - self.gain_step[i] <= self.SATURATION_STEPS):
            return False
        at_k = [h[2] for h in self.history[i] if h[1] == k]
        if len(at_k) < 4:
            return False
        mean = float(np.mean(at_k))
        gain_k, gain_cap = self.gained_at[i]
        if gain_k == k and mean > gain_cap * (1 - 1 / k):
            # The k-th CPU was shown to gain, and the capacity has not fallen by a CPU's
            # worth since (as a cap that appeared would make it): the test would only
            # cost a dip (one per such stage and episode on suite:test:0023, 0104, 0111).
            return False
        # The noise: the measured one or the spread of the samples at k, if larger (the
        # consecutive-sample estimate runs low where buffers smooth neighbouring
        # intervals: 11% measured, 15.5% spread on suite:test:0068, where the weaker test
        # then let a linear stage down)
        var = max(self.noise_var[i], float(np.var(at_k, ddof=1)) / mean**2)
        if 1 / k < 6 * math.sqrt(var * (0.25 + 1 / len(at_k))):
            return False
        self.saturated_at[i] = self.plateau_low[i] = k
        self.plateau[i], self.plateau_n[i] = mean, len(at_k)
        self.floor_found[i], self.saturated_age[i], self.max_test[i] = False, 0, True
        self.test_var[i] = var
        return True

    def _mark(self, i: int, k: int, k0: int, per_cpu: float, n0: int, plateau: float) -> int:
        """Fewest CPUs (from ``k0`` to ``k``) at which ``per_cpu`` reaches the plateau.

        Within two standard errors of the per-CPU rate (measured ``n0`` times): a mean a
        little under the plateau is noise, not a reason to hold one more CPU.
        """
        rel_se = math.sqrt(self.noise_var[i] / max(1, n0))
        return max(k0, min(k, math.ceil(plateau / per_cpu / (1 + 2 * rel_se))))

    def _extend_plateau(self, i: int, k: int) -> None:
        """A saturated stage released below its mark: is it still on the plateau?

        The mark moves down to ``k`` while the mean capacity measured there is not
        significantly below the plateau (two standard errors of the difference of the
        two means, from the measured noise), so useless CPUs are released one by one.
        When it is, the evidence contradicts the plateau reaching ``k``: the mark goes
        back to ``k + 1`` at once and becomes a floor (no more releases below it), so
        the agent does not oscillate one CPU below a cap.
        """
        sat = self.saturated_at[i]
        if not sat:
            return
        if k >= max(sat, self.plateau_low[i]):
            # On the plateau: every sample refines it (a running mean), so the test
            # below gets tighter the longer the stage is held there.
            last = self.history[i][-1] if self.history[i] else None
            if last is not None and last[0] == self.step and last[1] == k:
                self.plateau_n[i] += 1
                self.plateau[i] += (last[2] - self.plateau[i]) / self.plateau_n[i]
            return
        samples = [h[2] for h in self.history[i] if h[1] == k]
        if len(samples) < 4:
            return
        mean = float(np.mean(samples))
        var = max(self.noise_var[i], self.test_var[i]) if self.max_test[i] else self.noise_var[i]
        se = math.sqrt(var * (1 / len(samples) + 1 / self.plateau_n[i]))
        if mean >= self.plateau[i] * (1 - 2 * se):
            self.saturated_at[i] = min(sat, k)
            self.plateau_low[i] = k
        else:
            if self.max_test[i] and k + 1 == self.plateau_low[i] == sat:
                self.gained_at[i] = (k + 1, self.plateau[i])  # its first step lost capacity
            self.saturated_at[i] = k + 1  # the plateau starts above k
            self.floor_found[i] = True

    def memory_noise_margin(self) -> float:
        """Bytes the shield keeps free for memory noise (0 where memory is exact).

        Four standard deviations of the change of static memory to the next step, from
        the median absolute change between consecutive steps at one allocation (robust:
        a memory event is one large change, not noise; ``|d|`` has median ``0.674 sd``),
        or the largest change while fewer than ``MIN_SAMPLES`` were measured; plus the
        largest recent peak above the sampled memory (a live pipeline's monitor counts
        an out-of-memory crash at its peak between samples). 0 in the simulator, where
        static memory changes only with CPUs and events.
        """
        jumps = self.static_jumps
        if len(jumps) >= self.MIN_SAMPLES:
            noise = 4 * float(np.median(jumps)) / 0.6745
        else:
            noise = max(jumps, default=0.0)
        return noise + max(self.peak_gaps, default=0.0)

    def ema_factor(self, i: int) -> float:
        """Smoothing factor of stage ``i``'s rate, adapted to its measured noise.

        An average of factor ``beta`` over samples of relative variance ``v`` has
        variance ``v * beta / (2 - beta)``: the factor that reaches ``RATE_SE`` is
        ``2 / (v / RATE_SE**2 + 1)``, at most ``rate_ema`` (quiet pipelines keep their
        quick response) and at least ``MIN_EMA`` (a noisy one still follows events).
        """
        return max(min(self.MIN_EMA, self.beta),
                   min(self.beta, 2 / (self.noise_var[i] / self.RATE_SE**2 + 1)))

    def rate_rel_var(self, i: int) -> float:
        """Relative variance of the smoothed per-CPU rate of stage ``i`` (see ema_factor)."""
        f = self.ema_factor(i)
        return self.noise_var[i] * f / (2 - f)

    def capacity(self, i: int, k: int, now: int | None = None) -> float:
        """Estimated samples/s of stage ``i`` with ``k`` dedicated CPUs (holding ``now``).

        Linear in ``k`` from the measured per-CPU rate, except that a saturated stage
        keeps its capacity down to its saturation point, and held below it, is valued at
        most at its measured plateau beyond it.
        """
        r = self.rate[i]
        if math.isnan(r):
            return math.inf
        sat = self.saturated_at[i]
        if now is not None and sat and k >= sat:
            # flat beyond the saturation point (from below: the plateau measured there)
            return r * now if now >= sat else min(r * k, self.plateau[i])
        return r * k

    def throughput(self, alloc: Sequence[int], cpus_total: int, gpu_rate: float,
                   now: Sequence[int], overhead: float | None = None) -> float:
        """Estimated steady throughput of ``alloc`` (rates measured holding ``now``)."""
        share = self.share(alloc, cpus_total, overhead)
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


