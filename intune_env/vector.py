"""`InTune-v0` batched: N simulated pipelines stepped by one call of the compiled kernel.

``gym.make_vec("InTune-v0", num_envs=N, **config)`` builds :class:`InTuneVectorEnv` (it is
the registration's ``vector_entry_point``); ``vectorization_mode="sync"`` still gives
Gymnasium's ``SyncVectorEnv`` over N single envs.

Exactness. There is one implementation of the dynamics, ``simulators.kernel.step``; the
single env runs it with one row, this env with N. The rate noise is counter-based (a hash
of episode seed, interval and stage), so sub-env ``i`` follows exactly the trajectory of
a single ``InTune-v0`` with the same seed and actions: each sub-env keeps its own
generator, seeded as ``SyncVectorEnv`` seeds its envs (``reset(seed=s)`` gives sub-env
``i`` the seed ``s + i``; ``reset()`` keeps them), and draws one episode seed from it at
every reset and autoreset, as the single env does (``tests/test_vector.py`` compares
the two, with events and crashes at different times).

Autoreset: ``AutoresetMode.NEXT_STEP`` by default (declared in
``metadata["autoreset_mode"]``), as ``SyncVectorEnv``: the step after a sub-env
terminated (out of memory) or was truncated (``max_episode_steps``, 600 by default as the
registration's ``TimeLimit``) resets it, ignores its action and returns its first
observation with reward 0 and ``terminated = truncated = False``.
``autoreset_mode=AutoresetMode.SAME_STEP`` (what the SB3 adapter uses) resets a done
sub-env within the step instead: its observation is the new episode's first,
``info["final_obs"]`` / ``info["final_info"]`` (with their ``_`` masks) hold the last
ones, as ``SyncVectorEnv`` does in that mode.

Observations are a fresh ``(N, 3n + 4)`` float32 array (C order) every step.

Threads. ``parallel=True`` runs ``simulators.kernel.step_parallel``: chunks of sub-envs
on numba's threads (at most ``NUMBA_NUM_THREADS``, by default the CPU count; lower it
with ``numba.set_num_threads``), bit-identical to the default single-threaded kernel
(``tests/test_vector.py``). It compiles on first use (seconds, then cached), pays a few
microseconds of thread start-up per step and only helps with idle cores and large N;
with process-based vectorisation (``AsyncVectorEnv``, ``SubprocVecEnv``) keep the default,
since the processes already use the cores and numba's OpenMP layer is not fork-safe.

Info (Gymnasium's vector convention: a dict of arrays, each with a ``_key`` boolean
mask, all True since every sub-env reports every key every step; the masks are shared
read-only arrays, the values fresh every step). By default (``info_keys="default"``)
the keys of :data:`INFO_KEYS` (``throughput``, ``oom``, ``oracle_throughput``,
``allocation`` ``(N, n)``, ``memory_bytes``, ``invalid_action``) and ``action_mask``
(``(N, 2n + 1)`` bool), a few microseconds per step at N = 1024. ``info_keys="all"``
adds every other single-env key, batched (:data:`ALL_INFO_KEYS`; strings and tuples in
object arrays): several times the cost of the kernel step at large N, since each key is
a fresh array (see ``benchmarks/PROFILE.md``); only then does the kernel write its
per-stage outputs (``simulators.kernel.DIAGNOSTICS``), which the default skips.
:meth:`InTuneVectorEnv.action_masks` gives the masks without the info.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from intune_env import common
from intune_env.intune import ALLOCATION_OPTION, InTuneEnv, check_reset_options
from simulators import PipelineSim, kernel
from simulators.pipeline import GPU, episode_seed

#: Keys of the default batched info besides ``action_mask`` (each has its ``_key`` mask).
INFO_KEYS = ("throughput", "oom", "oracle_throughput", "allocation", "memory_bytes",
             "invalid_action")
#: The valid-action masks, in every batched info.
MASK_KEY = "action_mask"
#: Every key of ``info_keys="all"``: the single env's 21.
ALL_INFO_KEYS = (*INFO_KEYS, MASK_KEY, "memory_capacity_bytes", "oracle_allocation",
                 "bottleneck_stage", "sim_time_s", "stage_names", "stage_utilisation",
                 "stage_processed", "stage_busy_s", "buffer_levels", "buffer_capacities",
                 "element_bytes", "cpus_total", "max_cpus", "gpu_rate")


class InTuneVectorEnv(VectorEnv):
    """N ``InTune-v0`` pipelines, one kernel call per step (see the module docstring).

    Args:
        num_envs: number of sub-envs N.
        scenario: as for :class:`~intune_env.intune.InTuneEnv` (name, path, dict, Scenario).
        max_episode_steps: truncation after this many steps of a sub-env (``None``: never);
            ``gym.make_vec`` passes the registration's 600.
        render_mode: ``None`` only (no batched rendering).
        autoreset_mode: ``NEXT_STEP`` (default) or ``SAME_STEP`` (see the module docstring).
        info_keys: ``"default"`` or ``"all"`` (see the module docstring).
        parallel: ``True`` steps the sub-envs on numba's threads (``kernel.step_parallel``;
            see the module docstring); default ``False``, one thread.
        **config: the single env's configuration (reward weights, ``start_allocation``,
            scenario overrides), validated by the same code.
    """

    metadata: dict[str, Any] = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, scenario: Any = "dlrm-criteo",
                 max_episode_steps: int | None = 600, render_mode: str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 info_keys: str = "default", parallel: bool = False, **config: Any) -> None:
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode must be NextStep or SameStep, got "
                             f"{autoreset_mode!r}") from None
        if mode is AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode Disabled is not supported; use NextStep or SameStep")
        if not isinstance(parallel, bool):
            raise ValueError(f"parallel must be True or False, got {parallel!r}")
        if info_keys not in ("default", "all"):
            raise ValueError(f"info_keys must be 'default' or 'all', got {info_keys!r}")
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if render_mode is not None:
            raise ValueError(f"render_mode {render_mode!r} not supported by the batched "
                             f"InTune-v0; use None (or vectorization_mode='sync')")
        if max_episode_steps is not None and (isinstance(max_episode_steps, bool) or not
                                              isinstance(max_episode_steps, int) or
                                              max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got "
                             f"{max_episode_steps!r}")
        # One single env validates the arguments exactly as gym.make does and holds the
        # scenario, reward weights and start allocation.
        single = InTuneEnv(scenario, **config)
        self.single_env = single
        self.scenario = single.scenario
        self.num_envs = N = num_envs
        self.max_episode_steps = max_episode_steps
        self.info_keys = info_keys
        self.render_mode = None
        self.n_stages = n = single.n_stages
        self.stage_names = list(single.sim.stage_names)
        self.weights = single.weights
        # per-stage outputs only feed the "all" info: skipping them saves ~25 stores a sub-env
        self.sim = sim = PipelineSim(single.scenario, num_envs=N,
                                     diagnostics=info_keys == "all", parallel=parallel)
        sim.set_reward_weights(self.weights.throughput, self.weights.memory,
                               self.weights.oom_penalty)
        self.dt = sim.dt
        self.single_action_space = common.action_space(n)
        self.single_observation_space = common.observation_space(n)
        self.action_space = batch_space(self.single_action_space, N)
        self.observation_space = batch_space(self.single_observation_space, N)
        self._start = list(single._start)
        self._rngs: list[np.random.Generator | None] = [None] * N
        self._act = np.full(N, kernel.ACT, dtype=np.int8)
        self._control = np.empty(N, dtype=np.int8)
        self._autoreset = np.zeros(N, dtype=bool)
        self._all_true = np.ones(N, dtype=bool)
        self._all_true.flags.writeable = False
        # the info's ``_key`` masks, built once (every sub-env reports every key)
        self._masks = {"_" + key: self._all_true for key in (*INFO_KEYS, MASK_KEY)}
        self._masks_all = {"_" + key: self._all_true for key in ALL_INFO_KEYS}
        # per-conditions constants of the info, gathered by each sub-env's conditions
        self._cond_tables: dict[str, np.ndarray] = {}
        self._same_step = mode is AutoresetMode.SAME_STEP
        self._started = False

    # --- Gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every sub-env; ``seed=s`` seeds sub-env ``i`` with ``s + i`` (as SyncVectorEnv).

        ``seed=None`` keeps the generators (creating them on first use); a list gives one
        seed (or None) per sub-env. ``options={"allocation": [...]}`` starts every sub-env
        from that allocation (checked as the single env does; a failed reset changes
        nothing).
        """
        N = self.num_envs
        start = self._start
        if options is not None:
            check_reset_options(options)
            if "allocation" in options:
                start = self.single_env.resolve_start(options["allocation"],
                                                      ALLOCATION_OPTION)
        if seed is None:
            seeds: list[int | None] = [None] * N
        elif isinstance(seed, int) and not isinstance(seed, bool):
            seeds = [seed + i for i in range(N)]
        else:
            seeds = list(seed)
            if len(seeds) != N:
                raise ValueError(f"reset: {len(seeds)} seeds given for num_envs={N}")
        if isinstance(seed, int):
            super().reset(seed=seed)
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i] = seeding.np_random(s)[0]
        sim = self.sim
        sim.restart(slice(None), [episode_seed(r) for r in self._rngs], start)  # type: ignore[arg-type]
        self._control.fill(kernel.OBSERVE)
        sim.run(sim.actions, self._control, *sim.args)
        self._autoreset[:] = False
        self._started = True
        return sim.obs.copy(), self._info()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                         dict[str, Any]]:
        """Step every sub-env (autoreset as the module docstring says)."""
        if not self._started:
            raise RuntimeError("InTuneVectorEnv: call reset() before step()")
        n, N, sim = self.n_stages, self.num_envs, self.sim
        a = np.asarray(actions)
        if a.shape != (N,) or a.dtype.kind not in "iu":
            raise ValueError(f"actions must be an integer array of shape ({N},), got "
                             f"{a.dtype} {a.shape}")
        if a.dtype != np.int64:  # range checked in the array's own type (no uint64 wrap)
            if a.min() < 0 or a.max() > 2 * n:
                bad = a[(a < 0) | (a > 2 * n)][0]
                raise ValueError(self._bad_action(bad))
            a = a.astype(np.int64)
        sim.actions[:] = a
        control = self._act
        resetting = self._autoreset
        any_reset = bool(resetting.any())
        if any_reset:  # NEXT_STEP: these start over and ignore their action
            control = self._control
            control.fill(kernel.ACT)  # in place: no temporary array per autoreset step
            control[resetting] = kernel.OBSERVE
            out = ((sim.actions < 0) | (sim.actions > 2 * n)) & ~resetting
            if out.any():  # checked before the restarts: a refused step changes nothing
                raise ValueError(self._bad_action(sim.actions[np.flatnonzero(out)[0]]))
            self._restart(resetting)
        bad = sim.run(sim.actions, control, *sim.args)
        if bad >= 0:
            raise ValueError(self._bad_action(sim.actions[bad]))
        terminated, truncated = self._done()
        rewards = sim.reward.copy()
        if any_reset:
            terminated[resetting] = False
            truncated[resetting] = False
        done = terminated | truncated
        if self._same_step:
            if done.any():
                # SAME_STEP: report the final observation and info, start over right away
                final_obs = np.full(N, None, dtype=object)
                for i in np.flatnonzero(done).tolist():
                    final_obs[i] = sim.obs[i].copy()
                final_info = self._info()
                for key in list(final_info):
                    if not key.startswith("_"):
                        final_info["_" + key] = done.copy()
                self._restart(done)
                np.copyto(self._control, np.where(done, kernel.OBSERVE, kernel.SKIP))
                sim.run(sim.actions, self._control, *sim.args)
                info = self._info()
                info.update(final_obs=final_obs, _final_obs=done.copy(),
                            final_info=final_info, _final_info=done.copy())
                return sim.obs.copy(), rewards, terminated, truncated, info
        else:
            self._autoreset = done
        return sim.obs.copy(), rewards, terminated, truncated, self._info()

    def _bad_action(self, bad: Any) -> str:
        n = self.n_stages
        return (f"action {bad!r} is outside the action space Discrete({2 * n + 1}): "
                f"0 is no-op, 1..{n} add a CPU, {n + 1}..{2 * n} remove one")

    def _restart(self, rows: np.ndarray) -> None:
        """Sub-envs ``rows`` start over (their generators continue, as ``env.reset()``)."""
        idx = np.flatnonzero(rows)
        seeds = [episode_seed(self._rngs[i]) for i in idx.tolist()]  # type: ignore[arg-type]
        self.sim.restart(idx, seeds, self._start)

    def _done(self) -> tuple[np.ndarray, np.ndarray]:
        """``terminated`` (out of memory) and ``truncated`` (time limit) of every sub-env."""
        st = self.sim.state
        terminated = st[:, kernel.OOM] != 0
        if self.max_episode_steps is None:
            return terminated, np.zeros(self.num_envs, dtype=bool)
        # the reset's measuring interval is step 0 of the simulator
        return terminated, st[:, kernel.STEPS] > self.max_episode_steps

    def action_masks(self) -> np.ndarray:
        """Valid actions of every sub-env, ``(N, 2n + 1)`` bool (``common.action_mask``)."""
        return self.sim.mask.copy()

    def close_extras(self, **kwargs: Any) -> None:
        self.single_env.close()

    # --- info ----------------------------------------------------------------------------
    def _cond_table(self, name: str) -> np.ndarray:
        """A per-conditions constant of the info, tabulated once (index: conditions)."""
        cache = self._cond_tables
        tab = cache.get(name)
        if tab is None:
            sim = self.sim
            chain = range(len(sim.chain))
            if name == "oracle_throughput":
                tab = np.array([sim.oracle_of(j).throughput for j in chain])
            elif name == "oracle_allocation":
                tab = np.array([sim.oracle_of(j).allocation for j in chain], dtype=np.int64)
            elif name == "memory_capacity_bytes":
                tab = sim.cond_i[:, kernel.MEM_CAP].copy()
            elif name == "cpus_total":
                tab = sim.cond_i[:, kernel.CPUS].copy()
            elif name == "gpu_rate":
                tab = sim.cond_f[:, kernel.GPU_RATE].copy()
            else:  # element_bytes
                tab = np.array(sim.element_bytes, dtype=np.int64)
            cache[name] = tab
        return tab

    def _info(self) -> dict[str, Any]:
        sim, st = self.sim, self.sim.state
        cond = st[:, kernel.COND]
        oracle = self._cond_tables.get("oracle_throughput")
        if oracle is None:
            oracle = self._cond_table("oracle_throughput")
        info: dict[str, Any] = {
            "throughput": st[:, kernel.CONSUMED] / self.dt,
            "oom": st[:, kernel.OOM] != 0,
            "oracle_throughput": oracle.take(cond),
            "allocation": sim.alloc.copy(),
            "memory_bytes": st[:, kernel.MEMORY].copy(),
            "invalid_action": st[:, kernel.INVALID] != 0,
            MASK_KEY: sim.mask.copy(),
        }
        if self.info_keys == "all":
            N = self.num_envs
            names = np.array([*self.stage_names, GPU], dtype=object)
            stage_names = np.empty(N, dtype=object)
            stage_names[:] = [tuple(self.stage_names)] * N
            info.update({
                "memory_capacity_bytes": self._cond_table("memory_capacity_bytes").take(cond),
                "oracle_allocation": self._cond_table("oracle_allocation").take(cond, axis=0),
                "bottleneck_stage": names.take(st[:, kernel.BOTTLENECK]),  # -1: gpu
                "sim_time_s": st[:, kernel.STEPS] * self.dt,
                "stage_names": stage_names,
                "stage_utilisation": sim.stage_f[:, kernel.UTILISATION].copy(),
                "stage_processed": sim.stage_out[:, kernel.PROCESSED].copy(),
                "stage_busy_s": sim.stage_f[:, kernel.BUSY_S].copy(),
                "buffer_levels": sim.buf.copy(),
                "buffer_capacities": sim.stage_out[:, kernel.BUFFER_CAP].copy(),
                "element_bytes": self._cond_table("element_bytes").take(cond, axis=0),
                "cpus_total": self._cond_table("cpus_total").take(cond),
                "max_cpus": np.repeat(sim.max_cpus_array[None], N, axis=0),
                "gpu_rate": self._cond_table("gpu_rate").take(cond),
            })
        info.update(self._masks_all if self.info_keys == "all" else self._masks)
        return info
