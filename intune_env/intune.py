"""`InTune-v0`: allocate CPUs across the stages of a simulated DLRM input pipeline."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.error import ResetNeeded

from intune_env import common
from simulators import PipelineSim, Scenario, ScenarioError, kernel, load_scenario
from simulators.fileio import echo
from simulators.pipeline import (
    GPU,
    check_allocation,
    check_start_fits,
    episode_seed,
    even_allocation,
    fitting_start,
)
from simulators.scenario import merge_overrides

__all__ = ["ENV_KEYS", "RESET_OPTION_KEYS", "SCENARIO_KEYS", "InTuneEnv", "even_allocation",
           "render_table"]

#: Keys of the env's own configuration (``gym.make("InTune-v0", **config)``).
ENV_KEYS = ("reward_throughput_weight", "reward_memory_weight", "oom_penalty", "start_allocation")
#: Keys that override the scenario itself.
SCENARIO_KEYS = ("machine", "stages", "events", "noise_cv", "control_interval_s", "name")
#: Keys ``reset(options=...)`` accepts.
RESET_OPTION_KEYS = ("allocation",)
#: How error messages name ``reset(options={"allocation": ...})``.
ALLOCATION_OPTION = "options['allocation']"


class InTuneEnv(gym.Env[np.ndarray, int]):
    """
    ## Description

    A deep-learning recommendation model (DLRM) trains on one machine. Its input
    pipeline is a chain of stages (by default read → batch → shuffle → transform →
    gpu_load) joined by bounded buffers; each stage holds a whole number of the machine's
    CPUs. If any stage lags, the GPU waits. The agent moves CPUs between stages, one
    per step, to reach the highest throughput at the least memory without running out
    of memory, as the InTune agent of Nagrecha et al. (RecSys 2023) does. The pipeline
    is the fluid-queue simulator of ``simulators.pipeline`` (exact sample conservation,
    per-stage capacity and memory models, seeded noise, scheduled events such as
    a machine resize); its dynamics are the one compiled kernel
    ``simulators.kernel.step``, which the batched env runs too.

    ## Action Space

    ``Discrete(2N + 1)`` for N stages: ``0`` does nothing; ``1..N`` add one CPU to stage
    ``a - 1``; ``N+1..2N`` remove one CPU from stage ``a - N - 1``. A move that would take
    a stage below 1 CPU, above its ``max_cpus`` or use CPUs that are not free does nothing
    and sets ``info["invalid_action"] = True``; ``info["action_mask"]`` and
    :meth:`action_masks` (what ``sb3_contrib.MaskablePPO`` calls, through any wrapper)
    list the valid ones. An action must be an integer (Python or numpy integer, or a
    0-d integer array) in ``0..2N``; anything else (``1.0``, ``True``, ``inf``, out of
    range) raises ``ValueError``.

    ## Observation Space

    ``Box(float32, shape=(3N + 4,))``, finite bounds: per stage its CPU share
    (CPUs / machine CPUs), utilisation (busy fraction) and output-buffer fill; then memory
    used / capacity, throughput / gpu_rate, free CPUs / machine CPUs and machine CPUs / 128.
    The table with bounds is in ``intune_env.common``. Only what a real tuner can measure:
    the oracle never enters the observation.

    ## Rewards

    ``reward_throughput_weight * throughput / gpu_rate
    - reward_memory_weight * memory / memory_capacity`` per step; ``-oom_penalty`` on an
    out-of-memory crash.

    ## Starting State

    Empty buffers, the scenario's initial conditions and the allocation
    ``options["allocation"]`` if given to ``reset``; otherwise ``start_allocation`` (the
    keyword, else the scenario file's ``start_allocation``, else ``"even"``):

    * ``"even"`` (default): the machine's CPUs split evenly (capped by each stage's
      ``max_cpus``, what a user without a tuner does), *scaled down until it cannot run
      out of memory*: the even split of the largest CPU total whose worst-case memory
      (every buffer full, ``simulators.worst_memory``) fits the capacity, else one CPU
      per stage (``simulators.fitting_start``). It must fit the conditions at reset and,
      if an event falls within the first interval, those of the first step too
      (``PipelineSim.start_conditions``: the agent's first action is taken before it can
      see that event). The default start is never an immediate crash; from the second
      step on, events are the agent's to handle.
    * ``"min"`` (one CPU per stage) or an explicit list of CPU counts: used as given;
      if its worst-case memory does not fit (either conditions), the constructor (or
      ``reset``) raises a ``ValueError`` naming the memory it needs and the memory there
      is.

    The first observation is measured over one interval with no action.

    Randomness: the rate noise is counter-based. Each episode draws one 63-bit seed
    from ``self.np_random`` at reset; the noise of stage ``i`` at interval ``t`` is
    ``1 + noise_cv * sqrt(3) * (2u - 1)`` with ``u`` = splitmix64 hash of
    (seed, t, i) mapped to [0, 1) (``simulators.kernel.uniform``), so nothing else
    consumes the generator and sub-env ``i`` of a batch reset with seed ``s`` is the
    single env reset with seed ``s + i``.

    ## Episode End

    Terminated only by running out of memory (``info["oom"] = True``). Truncated by the
    ``TimeLimit`` of the registration: 600 steps (1200 simulated seconds at the default
    2 s interval).

    ## Arguments

    ``gym.make("InTune-v0", scenario="dlrm-criteo", render_mode=None, **config)`` where
    ``scenario`` is a built-in name (``intune scenarios list``), a YAML path, a dict or a
    :class:`simulators.Scenario`, and ``config`` (see :meth:`default_config`) holds the
    reward weights, ``start_allocation`` and overrides of the scenario's ``machine``
    (merged key by key), ``stages``, ``events``, ``noise_cv`` and ``control_interval_s``.

    ## Info

    Every step and reset: ``throughput``, ``allocation``, ``memory_bytes``,
    ``memory_capacity_bytes``, ``oom``, ``oracle_throughput``, ``oracle_allocation``,
    ``bottleneck_stage``, ``sim_time_s``, ``invalid_action``, ``stage_names``,
    ``stage_utilisation``, ``stage_processed``, ``stage_busy_s``, ``buffer_levels``,
    ``buffer_capacities``, ``element_bytes``, ``cpus_total``, ``max_cpus``, ``gpu_rate``,
    ``action_mask`` (21 keys). The dict and every mutable value in it (the lists) are fresh
    objects on every call; values that cannot change between events are immutable and
    may be shared: ``stage_names``, ``max_cpus``, ``element_bytes`` and
    ``oracle_allocation`` are tuples.

    ## Vectorized

    ``gym.make_vec("InTune-v0", num_envs=N, **config)`` gives the batched
    :class:`intune_env.vector.InTuneVectorEnv` (same trajectories as N single envs with the
    same seeds, numpy arrays, NEXT_STEP or SAME_STEP autoreset; info has the logging
    keys and ``action_mask`` by default, every key above with ``info_keys="all"``);
    ``intune_env.sb3_vecenv`` adapts it to Stable-Baselines3.

    ## Version History

    * v0: initial version.
    * v0 (behaviour change, one kernel): the rate noise is counter-based (a splitmix64
      hash of episode seed, interval and stage; same law, uniform with standard
      deviation ``noise_cv``), so trajectories differ from earlier v0 releases for the
      same seed; the golden trajectories were re-recorded.
    * v0 (behaviour change): the default ``"even"`` start is scaled down until its
      worst-case memory fits (it used to fill every CPU and could crash at once); an
      explicit start that cannot fit is a ``ValueError``; ``start_allocation`` may
      come from the scenario file.
    * v0 (behaviour change): strict types: actions must be integers (``1.0``, ``True``,
      ``np.float32(2)`` are refused), allocations sequences of integers (``[2.9, ...]``
      and ``"11111"`` are refused); reward weights and ``oom_penalty`` must be finite;
      ``reset`` options must be a dict with known keys and a failed ``reset`` leaves the
      env as it was; ``step`` before ``reset`` raises ``ResetNeeded``.
    * v0 (behaviour change, stricter scenarios): every number has a finite bound, derived
      quantities (worst-case memory, samples per interval) are checked, names are safe
      identifiers, duplicate YAML keys are refused, and a scenario whose one-CPU-per-stage
      start cannot fit its memory is refused (it could only crash at the first step);
      what validates, the env runs.
    * v0 (batched env): the info carries ``action_mask``; ``info_keys="all"`` gives every
      single-env key; ``parallel=True`` runs the kernel on threads (same results).
    * v0 (stricter scenarios, no change to valid ones): numbers are not read from
      booleans or strings (``max_cpus: true``, ``rate_per_cpu: "40000"``,
      ``control_interval_s=True``); the conditions after every event are checked as the
      start's are (one CPU per stage must fit in memory: a pipeline that every
      allocation crashes is refused; fewer CPUs than stages time-slice); a file's explicit
      ``start_allocation`` must fit when it is loaded; ``oom_penalty`` must be >= 0.
    * v0 (oracle fix; observations, rewards and dynamics unchanged): the oracle missed
      better time-sliced allocations where the GPU is slower than the stages' best (its
      search bound capped the stages at the GPU rate before the time-slicing share) and
      on machines with fewer CPUs than stages (it reported one CPU per stage as
      infeasible). ``info["oracle_throughput"]``/``["oracle_allocation"]`` change in 14
      of 407 built-in and suite pipelines (up to +16%: ``transform-drift`` after its first
      event, ``suite:test:0114``), and so do every fraction of the oracle; one suite
      member (``suite:train:0080``) is generated differently, since the generator keeps
      co-tenants the previous phase's oracle allocation survives. Golden trajectories
      re-recorded.
    * v0 (start): the start also fits the conditions of the first step when an event
      falls within the first interval (a co-tenant at 1 s crashed the default start at
      the first step); no built-in or suite pipeline has such an event, so their
      starts are unchanged.
    * v0 (stricter scenarios, no change to valid ones): integer fields refuse floats
      (``cpus: 8.0``, ``8.0e0``, ``buffer: 2.0`` were read as integers; ``8e0`` is 8);
      YAML 1.1's octal and base-60 numbers are refused (``cpus: 010`` was 8 CPUs,
      ``gpu_rate: 1:30:00`` 5400 samples/s); ``contention`` on a stage kind whose model
      ignores it is refused (it ran as if linear). No built-in or suite pipeline uses any
      of these.
    """


    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}

    @staticmethod
    def default_config() -> dict[str, Any]:
        """The env's own defaults; ``gym.make`` kwargs are merged into them."""
        return {
            "reward_throughput_weight": 1.0,
            "reward_memory_weight": 0.1,
            "oom_penalty": 10.0,
            "start_allocation": "even",
        }

    def __init__(self, scenario: str | dict[str, Any] | Scenario = "dlrm-criteo",
                 render_mode: str | None = None, **config: Any) -> None:
        unknown = sorted(set(config) - set(ENV_KEYS) - set(SCENARIO_KEYS))
        if unknown:
            raise ScenarioError(
                f"InTune-v0: unknown argument(s) {', '.join(unknown)}; expected "
                f"{', '.join(ENV_KEYS + SCENARIO_KEYS)}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            # TypeError, as for an unsupported keyword: SB3's make_vec_env asks for
            # "rgb_array" first and falls back to no render mode on a TypeError.
            raise TypeError(f"render_mode {render_mode!r} not supported; use 'ansi' or None")
        self.config = {**self.default_config(),
                       **{k: v for k, v in config.items() if k in ENV_KEYS}}
        overrides = {k: v for k, v in config.items() if k in SCENARIO_KEYS}
        base = load_scenario(scenario)
        if overrides:
            base = load_scenario(merge_overrides(base.to_dict(), overrides))
        self.scenario = base
        self.weights = common.RewardWeights(
            throughput=finite_number("reward_throughput_weight",
                                     self.config["reward_throughput_weight"]),
            memory=finite_number("reward_memory_weight", self.config["reward_memory_weight"]),
            oom_penalty=finite_number("oom_penalty", self.config["oom_penalty"]),
        )
        if self.weights.oom_penalty < 0:  # a crash that pays is a sign error, not a choice
            raise ValueError(f"InTune-v0: oom_penalty must be >= 0 (the reward on a crash "
                             f"is -oom_penalty), got {self.config['oom_penalty']!r}")
        self.sim = PipelineSim(base)
        self.sim.set_reward_weights(self.weights.throughput, self.weights.memory,
                                    self.weights.oom_penalty)
        self.n_stages = n = self.sim.n
        self.action_space = common.action_space(n)
        self.observation_space = common.observation_space(n)
        self.render_mode = render_mode
        start = config.get("start_allocation")  # the keyword wins over the file
        if start is None:
            start = getattr(base, "start_allocation", None) or "even"
        self.config["start_allocation"] = start
        self._start = self.resolve_start(start)
        self._names = tuple(self.sim.stage_names)
        self._started = False
        self._top = 2 * n

    # --- helpers -------------------------------------------------------------------
    def resolve_start(self, start: Any, what: str = "start_allocation") -> list[int]:
        """The start allocation ``start`` names (see Starting State), or a ValueError
        naming ``what`` (the argument or option the caller was given ``start`` as)."""
        sim = self.sim
        cond, *later = sim.start_conditions()
        if isinstance(start, str) and start == "even":
            return fitting_start(cond, *later)
        if isinstance(start, str) and start == "min":
            alloc = [1] * self.n_stages
        elif isinstance(start, list | tuple | np.ndarray):
            try:
                alloc = check_allocation(start, sim.max_cpus, sim.stage_names)
            except ValueError as err:
                raise ValueError(f"InTune-v0: {what}: {err}") from None
        else:
            raise ScenarioError(
                f"InTune-v0: {what} must be 'even', 'min' or a sequence of {self.n_stages} "
                f"positive integers (CPUs per stage), got {echo(repr(start))}")
        try:
            check_start_fits(cond, alloc, what, later)
        except ValueError as err:
            raise ValueError(f"InTune-v0: {err}") from None
        return alloc

    def _observation(self) -> np.ndarray:
        return self.sim.obs[0].copy()

    def _info(self) -> dict[str, Any]:
        """The 21 info keys of the current state (fresh objects; tuples are shared)."""
        sim = self.sim
        st = sim.state[0].tolist()
        out = sim.stage_out[0].tolist()
        flt = sim.stage_f[0].tolist()
        j = st[kernel.COND]
        cond = sim.chain[j]
        orc = sim.oracle_of(j)
        b = st[kernel.BOTTLENECK]
        return {
            "throughput": st[kernel.CONSUMED] / sim.dt,
            "allocation": sim.alloc[0].tolist(),
            "memory_bytes": st[kernel.MEMORY],
            "memory_capacity_bytes": cond.memory_capacity_bytes,
            "oom": st[kernel.OOM] != 0,
            "oracle_throughput": orc.throughput,
            "oracle_allocation": orc.allocation,
            "bottleneck_stage": GPU if b < 0 else self._names[b],
            "sim_time_s": st[kernel.STEPS] * sim.dt,
            "invalid_action": st[kernel.INVALID] != 0,
            "stage_names": self._names,
            "stage_utilisation": flt[kernel.UTILISATION],
            "stage_processed": out[kernel.PROCESSED],
            "stage_busy_s": flt[kernel.BUSY_S],
            "buffer_levels": sim.buf[0].tolist(),
            "buffer_capacities": out[kernel.BUFFER_CAP],
            "element_bytes": sim.element_bytes[j],
            "cpus_total": cond.cpus,
            "max_cpus": sim.max_cpus,
            "gpu_rate": cond.gpu_rate,
            "action_mask": sim.mask[0].copy(),
        }

    # --- Gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode (see Starting State). All or nothing: if the options are
        invalid the env is left exactly as it was."""
        start = self._start
        if options is not None:
            check_reset_options(options)
            if "allocation" in options:
                start = self.resolve_start(options["allocation"], ALLOCATION_OPTION)
        super().reset(seed=seed)
        self.sim.restart(slice(None), [episode_seed(self.np_random)], start)
        self.sim.run(self.sim.actions, self.sim._observe, *self.sim.args)
        self._started = True
        return self._observation(), self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply ``action``, simulate one interval (``simulators.kernel.step``), observe."""
        if not self._started:
            raise ResetNeeded("InTune-v0: call reset() before step()")
        if type(action) is not int or not 0 <= action <= self._top:
            action = common.check_action(action, self.n_stages)  # a clear ValueError
        sim = self.sim
        sim.actions[0] = action
        sim.run(sim.actions, sim._act, *sim.args)
        info = self._info()
        return sim.obs[0].copy(), sim.reward.item(0), info["oom"], False, info

    def action_masks(self) -> np.ndarray:
        """Valid actions now (bool, ``2N + 1``): what ``MaskablePPO`` asks the env for."""
        if not self._started:
            raise ResetNeeded("InTune-v0: call reset() before action_masks()")
        return self.sim.mask[0].copy()

    def set_allocation(self, allocation: list[int]) -> None:
        """Hold a whole allocation from the next step on (for tuners such as AUTOTUNE).

        Unlike actions, it may oversubscribe the machine; the simulator time-slices the
        CPUs and degrades every stage accordingly. The action mask (``action_masks()``)
        follows at once.
        """
        self.sim.set_allocation(allocation)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return render_table(self._info())


def finite_number(name: str, value: Any) -> float:
    """``value`` as a finite float, or a ``ValueError`` naming the argument ``name``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
        raise ValueError(f"InTune-v0: {name} must be a finite number, got {value!r}"[:200])
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"InTune-v0: {name} must be a finite number, got {value!r}")
    return out


def check_reset_options(options: Any) -> None:
    """``ValueError`` unless ``options`` is a dict whose keys are all known."""
    if not isinstance(options, dict):
        raise ValueError(f"reset options must be a dict (keys: {', '.join(RESET_OPTION_KEYS)})"
                         f", got {type(options).__name__}")
    unknown = [str(k) for k in options if k not in RESET_OPTION_KEYS]
    if unknown:
        raise ValueError(f"unknown reset option(s) {', '.join(unknown)[:80]}; known: "
                         f"{', '.join(RESET_OPTION_KEYS)}")


def render_table(info: dict[str, Any]) -> str:
    """A readable per-stage table of one step's ``info``."""
    gib = 1024**3
    lines = [
        f"t={info['sim_time_s']:7.1f}s  throughput {info['throughput']:>11,.0f}/s  "
        f"oracle {info.get('oracle_throughput', float('nan')):>11,.0f}/s  "
        f"memory {info['memory_bytes'] / gib:6.1f}/{info['memory_capacity_bytes'] / gib:.1f} GiB"
        f"  CPUs {sum(info['allocation'])}/{info['cpus_total']}"
        f"  bottleneck {info['bottleneck_stage']}{'  OOM!' if info['oom'] else ''}",
        f"{'stage':<12}{'cpus':>5}{'oracle':>7}{'util':>7}{'buffer':>16}{'processed':>12}",
    ]
    oracle_alloc = info.get("oracle_allocation") or [None] * len(info["allocation"])
    for i, name in enumerate(info["stage_names"]):
        ocell = "-" if oracle_alloc[i] is None else str(oracle_alloc[i])
        buf = f"{info['buffer_levels'][i]:,}/{info['buffer_capacities'][i]:,}"
        lines.append(
            f"{name:<12}{info['allocation'][i]:>5}{ocell:>7}"
            f"{info['stage_utilisation'][i]:>7.2f}{buf:>16}{info['stage_processed'][i]:>12,}"
        )
    return "\n".join(lines)
