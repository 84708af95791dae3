"""`InTune-v0` batched: N simulated pipelines stepped at once on numpy arrays.

``gym.make_vec("InTune-v0", num_envs=N, **config)`` builds :class:`InTuneVectorEnv` (it is
the registration's ``vector_entry_point``); ``vectorization_mode="sync"`` still gives
Gymnasium's ``SyncVectorEnv`` over N single envs.

Exactness. Sub-env ``i`` follows *exactly* the trajectory of a single ``InTune-v0`` with
the same seed and actions: same observations (bit for bit), rewards, terminations,
truncations and (for the keys below) infos as ``SyncVectorEnv`` gives
(``tests/test_vector.py`` compares the two). It holds because:

- each sub-env keeps its own generator, seeded as ``SyncVectorEnv`` seeds its envs
  (``reset(seed=s)`` gives sub-env ``i`` the seed ``s + i``; ``reset()`` keeps them);
- the single simulator draws its noise in blocks of ``NOISE_BLOCK`` intervals and uses
  its generator for nothing else, so drawing ``NOISE_BLOCKS_AHEAD`` blocks in one call
  yields the same numbers (a reset discards the rest of the current block, as the
  single env does). The generators are therefore *ahead* of a single env's; the
  trajectories are not;
- sample counts are integers. They are held in float64, which represents integers
  exactly up to 2**53 (checked at construction for the scenario's tables and memory),
  so sums, differences, minima and products of counts are exact; capacity is
  ``trunc(capacity * share * noise * dt)`` with the float products in the scalar order;
- the other float operations (fractions, reward) are those of the single env, in the
  same order; numpy's float64 elementwise operations are the IEEE operations Python does.

Autoreset: ``AutoresetMode.NEXT_STEP`` by default (declared in
``metadata["autoreset_mode"]``), as ``SyncVectorEnv``: the step after a sub-env
terminated (out of memory) or was truncated (``max_episode_steps``, 600 by default as the
registration's ``TimeLimit``) resets it, ignores its action and returns its first
observation with reward 0 and ``terminated = truncated = False``. Each sub-env
terminates on its own OOM. ``autoreset_mode=AutoresetMode.SAME_STEP`` (what the SB3
adapter uses) resets a done sub-env within the step instead: its observation is the new
episode's first, ``info["final_obs"]`` / ``info["final_info"]`` (with their ``_`` masks)
hold the last ones, as ``SyncVectorEnv`` does in that mode.

Conditions. Events are scheduled by simulated time, so after autoresets sub-envs are at
different times and under different conditions. The conditions a scenario can reach
form one chain (initial, then after each event in time order); they are compiled and
their oracle solved once at construction (both are lru-cached per ``Conditions`` in the
process, so N copies cost one computation), stacked into padded tables, and each
sub-env carries the index of its conditions in the chain. A step gathers table entries
by (conditions, stage, CPUs); the oracle is never recomputed.

Observations are a ``(N, 3n + 4)`` float32 array in Fortran order (built feature-major,
returned transposed, as Gymnasium's batched CartPole does); ``np.ascontiguousarray``
gives C order if a consumer needs it.

Info (Gymnasium's vector convention: a dict of arrays, each with a ``_key`` boolean
mask, all True since every sub-env reports every key every step; the masks and, without
events, ``oracle_throughput`` are constant arrays shared between steps, hence
read-only, the others fresh every step). To keep a batched
step cheap it carries fewer keys than the single env: ``throughput`` (float64),
``oom`` (bool), ``oracle_throughput`` (float64), ``allocation`` (int64,
``(N, n_stages)``, Fortran order), ``memory_bytes`` (int64) and ``invalid_action``
(bool): what a
training loop logs per step (reward terms, the regret to the oracle, crashes, the
allocation it controls). :meth:`InTuneVectorEnv.action_masks` gives the valid-action
masks for maskable agents on demand. Per-stage diagnostics (utilisation, buffer fill,
free CPUs) are in the observation; the rest is available from single envs.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from intune_env import common
from intune_env.intune import InTuneEnv
from simulators import NOISE_BLOCK, Conditions, ScenarioError, compile_conditions, oracle
from simulators.pipeline import NOISE_SCALE

#: Noise blocks drawn per generator call (one call per sub-env every this many blocks),
#: fewer if the buffer (num_envs x blocks x NOISE_BLOCK x n_stages floats) would exceed
#: NOISE_BUFFER_BYTES.
NOISE_BLOCKS_AHEAD = 4
NOISE_BUFFER_BYTES = 64 * 2**20
#: Keys of the batched info (each also has its ``_key`` mask).
INFO_KEYS = ("throughput", "oom", "oracle_throughput", "allocation", "memory_bytes",
             "invalid_action")
_MASK_KEYS = tuple("_" + key for key in INFO_KEYS)
# Per-sub-env arrays (columns) that _simulate reads and updates, and that it replaces.
_COLUMN_STATE_2D = ("_idx", "_buf")
_COLUMN_STATE_1D = ("_total", "_steps", "_cond", "_oom", "_zrow", "_block_end", "_buffer_end")
_COLUMN_OUTPUT_2D = ("_cap_last", "_proc_last", "_bufcap", "_idx_now")
_COLUMN_OUTPUT_1D = ("_mem", "_consumed", "_throughput")
_EXACT = 2.0**53  # float64 holds every integer below this exactly


def _first_step_at(at_s: float, dt: float) -> int:
    """Least step count ``s`` with ``at_s <= s * dt`` (the float test the simulator makes)."""
    s = max(0, int(at_s // dt) - 2)
    while not at_s <= s * dt:
        s += 1
    return s


class InTuneVectorEnv(VectorEnv):
    """N ``InTune-v0`` pipelines in numpy arrays (see the module docstring).

    Args:
        num_envs: number of sub-envs N.
        scenario: as for :class:`~intune_env.intune.InTuneEnv` (name, path, dict, Scenario).
        max_episode_steps: truncation after this many steps of a sub-env (``None``: never);
            ``gym.make_vec`` passes the registration's 600.
        render_mode: ``None`` only (no batched rendering).
        autoreset_mode: ``NEXT_STEP`` (default) or ``SAME_STEP`` (see the module docstring).
        **config: the single env's configuration (reward weights, ``start_allocation``,
            scenario overrides), validated by the same code.
    """

    metadata: dict[str, Any] = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, scenario: Any = "dlrm-criteo",
                 max_episode_steps: int | None = 600, render_mode: str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 **config: Any) -> None:
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode must be NextStep or SameStep, got "
                             f"{autoreset_mode!r}") from None
        if mode is AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode Disabled is not supported; use NextStep or SameStep")
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if render_mode is not None:
            raise ValueError(f"render_mode {render_mode!r} not supported by the batched "
                             f"InTune-v0; use None (or vectorization_mode='sync')")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None, got {max_episode_steps}")
        # One single env validates the arguments exactly as gym.make does and holds the
        # scenario, reward weights and start allocation.
        single = InTuneEnv(scenario, **config)
        self.single_env = single
        self.scenario = single.scenario
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.render_mode = None
        sim = single.sim
        n = self.n_stages = sim.n
        self.stage_names = list(sim.stage_names)
        self.dt = sim.dt
        self.noise_cv = sim.noise_cv
        self._noise_scale = sim.noise_cv * NOISE_SCALE  # the scalar noise_block's factor
        self.weights = single.weights
        self.single_action_space = common.action_space(n)
        self.single_observation_space = common.observation_space(n)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._start = np.array(single._start, dtype=np.int64)
        self._max_cpus = np.array(sim.max_cpus, dtype=np.int64)
        self._build_condition_tables()
        self._stage_offset = (np.arange(n, dtype=np.int64) * self._width)[:, None]
        N = num_envs
        self._arange = np.arange(N)
        self._ids = self._arange  # global sub-env ids of the columns (see _restart)
        # The allocation is held as table indices idx = stage * width + CPUs (see
        # _build_condition_tables). Action lookup table (column: action), rows: offset
        # of the stage's row in the flat (n, N) idx, change of idx, and the lowest and
        # highest idx allowed after the move, with a free CPU / on a full machine
        # (common.move_is_valid: 1 <= CPUs <= max_cpus, adds need a free CPU).
        stage = np.array([0, *range(n), *range(n)], dtype=np.int64)
        delta = np.array([0] + [1] * n + [-1] * n, dtype=np.int64)
        base = stage * self._width
        big = np.iinfo(np.int64).max // 2
        # (stored one row per action: a row gather is twice as fast as a column gather)
        self._lut = np.stack([stage * N, delta,
                              np.where(delta < 0, base + 1, -big),
                              np.where(delta > 0, base + self._max_cpus.take(stage), big),
                              np.where(delta > 0, base, big)], axis=1)
        # Noise: per sub-env a buffer of NOISE_BLOCKS_AHEAD blocks of raw uniform draws
        # (rows i * R .. i * R + R - 1); _zrow[i] is sub-env i's current row and
        # _block_end[i] the row where its current block ends.
        blocks = max(1, min(NOISE_BLOCKS_AHEAD, NOISE_BUFFER_BYTES // (N * NOISE_BLOCK * n * 8)))
        R = self._rows_per_env = blocks * NOISE_BLOCK
        #: Steps between two generator calls of a sub-env (a refill of its noise buffer).
        self.noise_refill_period = R
        self._noise = np.empty((N * R, n))
        self._rngs: list[np.random.Generator | None] = [None] * N
        self._buffer_end = self._arange * R + R
        self._block_end = self._buffer_end.copy()  # nothing drawn yet
        self._zrow = self._block_end.copy()
        self._countdown = 0  # steps until some sub-env needs its next block
        self._obs64 = np.empty((3 * n + 4, N))
        self._make_scratch()
        # Constant info arrays, shared between steps and therefore read-only.
        self._oracle_const = np.full(N, self._oracle_thr[0])
        self._all_true = np.ones(N, dtype=bool)
        for const in (self._oracle_const, self._all_true):
            const.flags.writeable = False
        if not self._multi:  # machine CPUs / 128 never changes
            self._obs64[3 * n + 3] = min(self._cpus[0] / common.CPU_NORM, common.MACHINE_MAX)
        self._same_step = mode is AutoresetMode.SAME_STEP
        self._started = False
        self._init_state(self._start)

    # --- construction ------------------------------------------------------------------
    def _build_condition_tables(self) -> None:
        """Compile the chain of conditions the events produce, once, into stacked tables."""
        events = sorted(self.scenario.events, key=lambda e: e.at_s)  # as PipelineSim
        conds = [Conditions.initial(self.scenario)]
        for i, ev in enumerate(events):
            cond = conds[-1].apply(ev)
            try:
                compile_conditions(cond)
            except ValueError as err:
                raise ScenarioError(f"{self.scenario.name}: events.{i}: {err}") from None
            conds.append(cond)
        self._event_steps = np.array([_first_step_at(ev.at_s, self.dt) for ev in events],
                                     dtype=np.int64)
        compiled = [compile_conditions(c) for c in conds]
        n = self.n_stages
        width = self._width = max(c.capacity_array.shape[1] for c in compiled)
        n_cond = len(conds)

        def stack(name: str, fill: float) -> np.ndarray:
            out = np.full((n_cond, n, width), fill, dtype=np.float64)
            for j, comp in enumerate(compiled):
                arr = getattr(comp, name)
                out[j, :, : arr.shape[1]] = arr
            return out.reshape(-1)  # flat index: (cond * n + stage) * width + cpus

        self._cap_flat = stack("capacity_array", 0.0)
        self._buf_flat = stack("buffers_array", 1.0)
        self._wk_flat = stack("workers_array", 0.0)
        self._cond_stride = n * width
        self._elem = np.array([c.element_bytes for c in compiled], dtype=np.float64)  # (C, n)
        self._mem_fixed = np.array([c.fixed_memory_bytes + sum(comp.state_bytes)
                                    for c, comp in zip(conds, compiled, strict=True)],
                                   dtype=np.float64)
        self._mem_cap = np.array([c.memory_capacity_bytes for c in conds], dtype=np.float64)
        self._cpus = np.array([c.cpus for c in conds], dtype=np.int64)
        self._gpu_rate = np.array([c.gpu_rate for c in conds], dtype=np.float64)
        self._gpu_cap = np.array([int(c.gpu_rate * self.dt) for c in conds], dtype=np.float64)
        self._overhead = np.array([c.oversubscription_overhead for c in conds])
        self._oracle_thr = np.array([oracle(c).throughput for c in conds], dtype=np.float64)
        self.conditions = conds
        self._multi = n_cond > 1
        # Observation features that depend on few integers, tabulated with the exact
        # expressions of common.build_observation: CPU share min(k / c, SHARE_MAX) by
        # (conditions, stage, k) like the tables above, and free CPUs
        # min(max((c - total) / c, FREE_MIN), 1) by (conditions, total).
        share = np.zeros((n_cond, n, width))
        self._total_max = int(self._max_cpus.sum())
        free = np.zeros((n_cond, self._total_max + 1))
        for j, c in enumerate(conds):
            cf = float(c.cpus)
            share[j] = [[min(k / cf, common.SHARE_MAX) for k in range(width)]] * n
            free[j] = [min(max((cf - t) / cf, common.FREE_MIN), 1.0)
                       for t in range(self._total_max + 1)]
        self._share_flat = share.reshape(-1)
        self._free_flat = free.reshape(-1)
        # A buffer can hold more than its capacity (room < 0) only if its capacity can
        # shrink: it depends on the stage's CPUs (buffer_per_cpu) or on the conditions.
        bufs = self._buf_flat.reshape(n_cond, n, width)
        self._may_overflow = [bool(np.any(bufs[:, i, 1:self._max_cpus[i] + 1]
                                          != bufs[0, i, 1])) for i in range(n)]
        # Fixed memory (base, co-tenant, stage state) folded into stage 0's worker table:
        # memory = sum of the gathered worker entries + element bytes . buffers.
        wk = self._wk_flat.reshape(n_cond, n, width)
        wk[:, 0, :] += self._mem_fixed[:, None]
        # Exactness of counts in float64: the largest memory any state can reach (every
        # buffer at its largest capacity plus its largest possible overflow) must stay
        # well inside 2**53, as must every table entry.
        worst = (self._wk_flat.reshape(n_cond, n, width).max(axis=2).sum(axis=1)
                 + 4.0 * (self._buf_flat.reshape(n_cond, n, width).max(axis=2)
                          * self._elem).sum(axis=1))
        # Clips that can never bite are skipped (the values are the same): memory above
        # MEMORY_MAX x capacity, throughput above gpu_rate (g <= int(gpu_rate * dt) and
        # correctly rounded division is monotone), a capacity that truncates to 0.
        self._clip_memory = bool((worst / self._mem_cap).max() >= common.MEMORY_MAX / 1.001)
        self._clip_throughput = any((g / self.dt) / r > 1.0
                                    for g, r in zip(self._gpu_cap, self._gpu_rate, strict=True))
        least = min(float(comp.capacity_array[i, 1:self._max_cpus[i] + 1].min())
                    for comp in compiled for i in range(n))
        self._capacity_positive = (not self._multi and least * (1.0 - 3.0 * self.noise_cv)
                                   * self.dt * 0.999 >= 1.0)
        if max(worst.max(), self._mem_cap.max(), self._gpu_cap.max(),
               self._cap_flat.max() * self.dt * 2) >= _EXACT / 64:
            raise ScenarioError(f"{self.scenario.name}: sample counts or memory too large for "
                                f"the batched env's exact float64 arithmetic; use "
                                f"vectorization_mode='sync'")

    def _init_state(self, start: np.ndarray) -> None:
        N, n = self.num_envs, self.n_stages
        # Stage-major (n, N) so per-stage rows are contiguous.
        self._total = np.full(N, start.sum())
        # the allocation, as flat table indices stage * width + CPUs (conditions 0)
        self._idx = self._stage_offset + np.repeat(start[:, None], N, axis=1)
        self._buf = np.zeros((n, N))
        self._buf_rows = list(self._buf)
        self._cap_last = np.zeros((n, N))
        self._proc_last = np.zeros((n, N))
        self._bufcap = np.ones((n, N))
        self._consumed = np.zeros(N)
        self._throughput = np.zeros(N)
        self._mem = np.zeros(N)
        self._steps = np.zeros(N, dtype=np.int64)  # simulated intervals since reset
        # TimeLimit: agent steps since reset = _clock - _episode_start (no per-step update);
        # nothing can be truncated before _clock reaches _next_truncation.
        self._clock = 0
        self._episode_start = np.zeros(N, dtype=np.int64)
        self._next_truncation = self.max_episode_steps or np.iinfo(np.int64).max
        self._cond = np.zeros(N, dtype=np.int64)
        self._oom = np.zeros(N, dtype=bool)
        self._invalid = np.zeros(N, dtype=bool)
        self._autoreset = np.zeros(N, dtype=bool)
        self._any_autoreset = False
        # Oversubscription (time-slicing) needs a machine shrink or an oversubscribed start.
        # (autoresets start from the constructor's allocation, reset() may use another)
        self._may_oversubscribe = self._multi or max(int(start.sum()), int(self._start.sum())) \
            > int(self._cpus[0])

    # --- Gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every sub-env; ``seed=s`` seeds sub-env ``i`` with ``s + i`` (as SyncVectorEnv).

        ``seed=None`` keeps the generators (creating them on first use); a list gives one
        seed (or None) per sub-env. ``options={"allocation": [...]}`` starts every sub-env
        from that allocation.
        """
        N = self.num_envs
        if seed is None:
            seeds: list[int | None] = [None] * N
        elif isinstance(seed, int):
            super().reset(seed=seed)
            seeds = [seed + i for i in range(N)]
        else:
            seeds = list(seed)
            if len(seeds) != N:
                raise ValueError(f"reset: {len(seeds)} seeds given for num_envs={N}")
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i] = seeding.np_random(s)[0]
                self._block_end[i] = self._buffer_end[i]  # drop the noise drawn ahead
        start = self._start
        if options and "allocation" in options:
            alloc = [int(k) for k in options["allocation"]]
            self.single_env.sim.set_allocation(alloc)  # validates, with a clear message
            start = np.array(alloc, dtype=np.int64)
        self._drop_blocks(np.ones(N, dtype=bool))
        self._init_state(start)
        self._started = True
        self._simulate()
        return self._observe()[0], self._info()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                         dict[str, Any]]:
        """Step every sub-env (NEXT_STEP autoreset; see the module docstring)."""
        if not self._started:
            raise RuntimeError("InTuneVectorEnv: call reset() before step()")
        n, N = self.n_stages, self.num_envs
        a = np.asarray(actions)
        if a.shape != (N,) or a.dtype.kind not in "iu":
            raise ValueError(f"actions must be an integer array of shape ({N},), got "
                             f"{a.dtype} {a.shape}")
        try:
            if a.min() < 0:
                raise IndexError
            # one gather of every per-action constant; raises IndexError above 2n
            offset, delta, lo, hi_free, hi_full = self._lut.take(a, axis=0).T
        except IndexError:
            bad = a[(a < 0) | (a > 2 * n)][0]
            raise ValueError(f"action {bad!r} is outside the action space "
                             f"Discrete({2 * n + 1}): 0 is no-op, 1..{n} add a CPU, "
                             f"{n + 1}..{2 * n} remove one") from None
        resetting = self._autoreset
        any_reset = self._any_autoreset
        # common.move_is_valid for all sub-envs at once (CPUs before this step's events)
        fi = offset + self._arange
        flat = self._idx.reshape(-1)
        cur = flat.take(fi, mode="wrap")
        new = cur + delta
        ok = new >= lo
        ok &= new <= np.where(self._total < self._cpus_now(), hi_free, hi_full)
        if any_reset:  # their actions are ignored: this step resets them
            ok |= resetting
            new[resetting] = cur[resetting]
        self._invalid = invalid = ~ok
        np.putmask(new, invalid, cur)
        flat[fi] = new
        new -= cur
        self._total += new
        if any_reset:
            self._reset_subenvs(resetting)
        self._simulate()
        obs, rewards, oom, any_oom = self._observe()
        terminated = oom.copy()
        self._clock = clock = self._clock + 1
        if any_reset:
            self._episode_start[resetting] = clock
            self._next_truncation = int(self._episode_start.min()) + (
                self.max_episode_steps or np.iinfo(np.int64).max // 2)
            rewards[resetting] = 0.0
            terminated[resetting] = False
            any_oom = bool(terminated.any())
        if clock >= self._next_truncation:
            truncated = (clock - self._episode_start) >= self.max_episode_steps
            done = terminated | truncated
            any_done = bool(done.any())
        else:
            truncated = np.zeros(N, dtype=bool)
            done = terminated.copy()
            any_done = any_oom
        if self._same_step and any_done:
            # SAME_STEP: report the final observation and info, start over right away
            final_obs = np.full(N, None, dtype=object)
            for i in np.flatnonzero(done).tolist():
                final_obs[i] = obs[i].copy()
            final_info = self._info()
            for key in INFO_KEYS:
                final_info["_" + key] = done.copy()
            self._reset_subenvs(done)
            self._episode_start[done] = clock
            self._next_truncation = int(self._episode_start.min()) + (
                self.max_episode_steps or np.iinfo(np.int64).max // 2)
            obs[done] = self._restart(np.flatnonzero(done))
            info = self._info()
            info.update(final_obs=final_obs, _final_obs=done.copy(), final_info=final_info,
                        _final_info=done.copy())
            return obs, rewards, terminated, truncated, info
        if not self._same_step:
            self._autoreset = done
            self._any_autoreset = any_done
        return obs, rewards, terminated, truncated, self._info()

    def _restart(self, cols: np.ndarray) -> np.ndarray:
        """First interval of the (just reset) sub-envs ``cols`` alone; their observations.

        Runs :meth:`_simulate` and :meth:`_observe` on a shallow copy of this env whose
        per-sub-env arrays are those columns, then writes the results back.
        """
        sub = copy.copy(self)
        sub.num_envs = len(cols)
        sub._ids = self._ids[cols]
        for name in _COLUMN_STATE_2D:
            setattr(sub, name, getattr(self, name)[:, cols])
        for name in _COLUMN_STATE_1D:
            setattr(sub, name, getattr(self, name)[cols])
        sub._obs64 = self._obs64[:, cols]  # a copy: fancy indexing
        sub._buf_rows = list(sub._buf)
        sub._make_scratch()
        sub._countdown = 0
        sub._simulate()
        obs = sub._observe()[0]
        for name in _COLUMN_OUTPUT_2D + _COLUMN_OUTPUT_1D:  # the final info keeps the old
            setattr(self, name, getattr(self, name).copy())
        self._invalid = self._invalid.copy()
        self._invalid[cols] = False  # as after a reset
        for name in _COLUMN_STATE_2D + _COLUMN_OUTPUT_2D:
            getattr(self, name)[:, cols] = getattr(sub, name)
        for name in _COLUMN_STATE_1D + _COLUMN_OUTPUT_1D:
            getattr(self, name)[cols] = getattr(sub, name)
        self._countdown = 0  # recomputed at the next step
        return obs

    def action_masks(self) -> np.ndarray:
        """Valid actions of every sub-env, ``(N, 2n + 1)`` bool (``common.action_mask``)."""
        n, alloc = self.n_stages, self._allocation()
        mask = np.empty((2 * n + 1, self.num_envs), dtype=bool)
        mask[0] = True
        np.less(alloc, self._max_cpus[:, None], out=mask[1:n + 1])
        mask[1:n + 1] &= self._total < self._cpus_now()
        np.greater(alloc, 1, out=mask[n + 1:])
        return np.ascontiguousarray(mask.T)

    def close_extras(self, **kwargs: Any) -> None:
        self.single_env.close()

    # --- simulation ----------------------------------------------------------------------
    def _allocation(self) -> np.ndarray:
        """CPUs of every stage and sub-env, ``(n, N)`` (a fresh array)."""
        return self._idx - self._stage_offset

    def _cpus_now(self) -> np.ndarray | np.int64:
        """Machine CPUs under each sub-env's current conditions (a scalar without events)."""
        return self._cpus.take(self._cond) if self._multi else self._cpus[0]

    def _reset_subenvs(self, mask: np.ndarray) -> None:
        """Sub-envs in ``mask`` start over (generators continue, as ``env.reset()``)."""
        self._total[mask] = self._start.sum()
        self._idx[:, mask] = self._stage_offset + self._start[:, None]
        self._buf[:, mask] = 0.0
        self._steps[mask] = 0
        self._oom[mask] = False
        self._drop_blocks(mask)

    def _drop_blocks(self, mask: np.ndarray) -> None:
        """Skip the rest of the current noise block (a reset does, as ``PipelineSim.reset``)."""
        self._zrow[mask] = self._block_end[mask]
        self._countdown = 0

    def _next_blocks(self) -> None:
        """Move sub-envs whose noise block is used up to their next block, drawing more
        (NOISE_BLOCKS_AHEAD blocks per generator call) where the buffer is used up."""
        R = self._rows_per_env
        row = self._zrow
        need = row >= self._block_end
        start = self._block_end[need]
        end = start == self._buffer_end[need]
        if end.any():
            refill = self._ids[np.flatnonzero(need)[end]]
            noise, rngs = self._noise, self._rngs
            for i in refill.tolist():
                rngs[i].random(out=noise[i * R:i * R + R])  # type: ignore[union-attr]
            start[end] = refill * R  # global rows (also for _restart's column subsets)
        self._block_end[need] = start + NOISE_BLOCK
        row[need] = start
        self._countdown = int((self._block_end - row).min())

    def _make_scratch(self) -> None:
        """Per-step work arrays of _simulate, with lists of their row views."""
        n, N = self.n_stages, self.num_envs
        self._c = np.empty((n, N))
        self._s = np.empty((n, N))
        self._px = np.empty((n + 1, N))
        self._room = np.empty((n, N))
        self._bufcap_scratch = np.empty((n, N))
        self._c_rows, self._s_rows = list(self._c), list(self._s)
        self._s_rows[0] = self._c_rows[0]  # S_0 = c_0: the same row, never written
        self._px_rows, self._room_rows = list(self._px), list(self._room)
        self._px_head, self._px_tail = self._px[:n], self._px[1:]

    def _simulate(self) -> None:
        """One control interval of every sub-env: ``PipelineSim.step``, batched.

        Arrays are stage-major ``(n, N)`` so each stage's row is contiguous; the chain
        passes run stage by stage as in the scalar step (numpy's ``accumulate`` and
        ``cumsum`` along the short stage axis were measured several times slower).
        """
        n, dt = self.n_stages, self.dt
        multi = self._multi
        if multi:  # events due by now (time = steps * dt); conditions index per sub-env
            self._cond = cond = np.searchsorted(self._event_steps, self._steps, side="right")
            self._steps += 1
            idx = self._idx + cond * self._cond_stride
            cpus = self._cpus.take(cond)
        else:
            idx = self._idx
            cpus = self._cpus[0]
        if self._countdown == 0:
            self._next_blocks()
        self._countdown -= 1
        c = self._cap_flat.take(idx, mode="wrap", out=self._c)
        total = self._total
        if self._may_oversubscribe and (
                (total > cpus).any() if multi else total.max() > cpus):
            over = total > cpus  # oversubscription_share where it applies (x * 1.0 == x)
            share = np.ones(self.num_envs)
            cpus_o = cpus[over] if multi else cpus
            tot_o = total[over]
            oh = self._overhead.take(cond[over]) if multi else self._overhead[0]
            share[over] = (cpus_o / tot_o) / (1.0 + oh * (tot_o / cpus_o - 1.0))
            c *= share
        if self.noise_cv != 0.0:  # noise_block: 1 + cv * sqrt(3) * (2u - 1); else exactly 1.0
            z = self._noise.take(self._zrow, axis=0, mode="wrap")  # (N, n): a row gather is cheap
            z *= 2.0
            z -= 1.0
            z *= self._noise_scale
            z += 1.0
            c *= z.T
        self._zrow += 1
        c *= dt
        np.trunc(c, out=c)  # int(capacity * share * noise * dt): counts are >= 0

        # Scratch arrays and their row views are made once (_make_scratch): no allocation
        # and no view creation in the stage loops. Table gathers use mode="wrap": the
        # indices are always in range, and it skips take's per-index bounds check (~40%).
        b, B = self._buf, self._buf_rows
        C, S, P, Rm = self._c_rows, self._s_rows, self._px_rows, self._room_rows
        for i in range(1, n):  # forward pass: S_i = min(c_i, b_{i-1} + S_{i-1})
            np.add(B[i - 1], S[i - 1], out=S[i])
            np.minimum(S[i], C[i], out=S[i])
        g = P[n]  # backward pass: P_i in row i, G in row n
        np.add(B[n - 1], S[n - 1], out=g)
        np.minimum(g, self._gpu_cap.take(cond) if multi else self._gpu_cap[0], out=g)
        bufcap = self._buf_flat.take(idx, mode="wrap", out=self._bufcap_scratch)
        np.subtract(bufcap, b, out=self._room)
        overflow = self._may_overflow
        for i in range(n - 1, -1, -1):  # P_i = max(0, min(S_i, B_i - b_i + P_{i+1}))
            pi = P[i]
            np.add(Rm[i], P[i + 1], out=pi)
            np.minimum(pi, S[i], out=pi)
            if overflow[i]:  # elsewhere room >= 0 and P >= 0: the max is a no-op
                np.maximum(pi, 0.0, out=pi)
        b += self._px_head  # b_i += P_i - P_{i+1}
        b -= self._px_tail
        mem = self._wk_flat.take(idx, mode="wrap").sum(axis=0)  # workers + fixed memory
        if multi:
            mem += (self._elem.take(cond, axis=0).T * b).sum(axis=0)
            self._oom |= mem > self._mem_cap.take(cond)
        else:
            mem += self._elem[0] @ b
            self._oom |= mem > self._mem_cap[0]
        self._mem = mem
        self._cap_last = c
        self._proc_last = self._px_head
        self._consumed = g
        self._bufcap = bufcap
        self._idx_now = idx

    def _observe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Observations (see the module docstring), rewards, out-of-memory flags and any."""
        n = self.n_stages
        out = self._obs64
        if self._multi:
            cond = self._cond
            mem_cap, gpu_rate = self._mem_cap.take(cond), self._gpu_rate.take(cond)
            cpus = self._cpus.take(cond).astype(np.float64)
            np.minimum(cpus / common.CPU_NORM, common.MACHINE_MAX, out=out[3 * n + 3])
            self._free_flat.take(cond * (self._total_max + 1) + self._total,
                                 out=out[3 * n + 2])
        else:
            mem_cap, gpu_rate = self._mem_cap[0], self._gpu_rate[0]
            self._free_flat.take(self._total, mode="wrap", out=out[3 * n + 2])
        self._share_flat.take(self._idx_now, mode="wrap", out=out[:n])
        c = self._cap_last
        util = out[n:2 * n]
        if (self._capacity_positive and not self._may_oversubscribe) or c.min() > 0.0:
            np.divide(self._proc_last, c, out=util)
        else:  # a stage that can process nothing counts as busy (PipelineSim.utilisation)
            util.fill(1.0)
            np.divide(self._proc_last, c, out=util, where=c > 0)
        fill = np.divide(self._buf, self._bufcap, out=out[2 * n:3 * n])
        m = np.divide(self._mem, mem_cap, out=out[3 * n])
        self._throughput = thr = self._consumed / self.dt
        t = np.divide(thr, gpu_rate, out=out[3 * n + 1])
        w = self.weights
        # common.reward on the unclipped fractions: w_t * t - w_m * m (1.0 * t is t)
        rewards = t - w.memory * m if w.throughput == 1.0 else w.throughput * t - w.memory * m
        oom = self._oom
        any_oom = bool(oom.any())
        if any_oom:
            rewards[oom] = -w.oom_penalty
        # Clipping as common.build_observation, minus the comparisons that cannot be
        # true: 0 <= processed <= capacity, so utilisation is in [0, 1]; buffers, memory
        # and consumption are >= 0 (shares and free CPUs come clipped from their tables).
        np.minimum(fill, 1.0, out=fill)
        if self._clip_memory:
            np.minimum(m, common.MEMORY_MAX, out=m)
        if self._clip_throughput:
            np.minimum(t, 1.0, out=t)
        return out.astype(np.float32).T, rewards, oom, any_oom

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "throughput": self._throughput,  # a fresh array every step
            "oom": self._oom.copy(),
            "oracle_throughput": (self._oracle_thr.take(self._cond) if self._multi
                                  else self._oracle_const),
            "allocation": self._allocation().T,
            "memory_bytes": self._mem.astype(np.int64),
            "invalid_action": self._invalid,  # a fresh array every step
        }
        info.update(dict.fromkeys(_MASK_KEYS, self._all_true))
        return info
