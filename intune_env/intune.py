"""`InTune-v0`: allocate CPUs across the stages of a simulated DLRM input pipeline."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from types import MethodType
from typing import Any

import gymnasium as gym
import numpy as np

from intune_env import common
from intune_env.common import CPU_NORM, FREE_MIN, MACHINE_MAX, MEMORY_MAX, SHARE_MAX
from simulators import PipelineSim, Scenario, ScenarioError, load_scenario
from simulators.pipeline import GPU, STEP_NAMESPACE, step_body_source
from simulators.scenario import merge_overrides

#: Keys of the env's own configuration (``gym.make("InTune-v0", **config)``).
ENV_KEYS = ("reward_throughput_weight", "reward_memory_weight", "oom_penalty", "start_allocation")
#: Action masks are memoised per env by (machine full?, allocation); cleared at this size.
MASK_CACHE_SIZE = 4096
#: Keys that override the scenario itself.
SCENARIO_KEYS = ("machine", "stages", "events", "noise_cv", "control_interval_s", "name")


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
    a machine resize).

    ## Action Space

    ``Discrete(2N + 1)`` for N stages: ``0`` does nothing; ``1..N`` add one CPU to stage
    ``a - 1``; ``N+1..2N`` remove one CPU from stage ``a - N - 1``. A move that would take
    a stage below 1 CPU, above its ``max_cpus`` or use CPUs that are not free does nothing
    and sets ``info["invalid_action"] = True``; ``info["action_mask"]`` lists the valid
    ones. An action outside the space raises ``ValueError``.

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
    ``options["allocation"]`` if given to ``reset``; otherwise ``start_allocation``:
    ``"even"`` (default: the machine's CPUs split evenly, capped by each stage's
    ``max_cpus``, what a user without a tuner does), ``"min"`` (one CPU per stage) or an
    explicit list. The first observation is measured over one interval with no action.

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
    ``action_mask``. The dict and every mutable value in it (the lists) are fresh
    objects on every call; values that cannot change between events are immutable and
    may be shared: ``stage_names``, ``max_cpus``, ``element_bytes`` and
    ``oracle_allocation`` are tuples.

    ## Vectorized

    ``gym.make_vec("InTune-v0", num_envs=N, **config)`` gives the batched
    :class:`intune_env.vector.InTuneVectorEnv` (same trajectories as N single envs with the
    same seeds, numpy arrays, NEXT_STEP autoreset); ``intune_env.sb3_vecenv`` adapts it to
    Stable-Baselines3.

    ## Version History

    * v0: initial version.
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
        self.sim = PipelineSim(base)
        self.n_stages = self.sim.n
        self.weights = common.RewardWeights(
            throughput=float(self.config["reward_throughput_weight"]),
            memory=float(self.config["reward_memory_weight"]),
            oom_penalty=float(self.config["oom_penalty"]),
        )
        self.action_space = common.action_space(self.n_stages)
        self.observation_space = common.observation_space(self.n_stages)
        self.render_mode = render_mode
        self._start = self._resolve_start(self.config["start_allocation"])
        self._invalid = False
        self._names = tuple(self.sim.stage_names)
        self._mask_cache: dict[tuple[Any, ...], np.ndarray] = {}
        self._obs_tabs: dict[int, tuple[list[float], list[float], float]] = {}
        self._bind_fast_step()

    # --- helpers -------------------------------------------------------------------
    def _resolve_start(self, start: Any) -> list[int]:
        cpus, caps = self.scenario.machine.cpus, self.sim.max_cpus
        if start == "min":
            return [1] * self.n_stages
        if start == "even":
            return even_allocation(cpus, caps)
        if isinstance(start, list | tuple):
            self.sim.set_allocation(start)  # validates, raises a clear ValueError
            return [int(k) for k in start]
        raise ScenarioError(
            f"InTune-v0: start_allocation must be 'even', 'min' or a list of {self.n_stages} "
            f"CPU counts, got {start!r}"
        )

    def _observation(self) -> np.ndarray:
        return self._observe(self)[0]

    def _info(self) -> dict[str, Any]:
        return self._observe(self)[1]

    # --- Gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        start = self._start
        if options and "allocation" in options:
            start = [int(k) for k in options["allocation"]]
        self.sim.reset(self.np_random, start)
        self._invalid = False
        self.sim.step()  # measure one interval so the first observation is informative
        obs, info, _, _ = self._observe(self)
        return obs, info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        # Instances run the generated :func:`unrolled_env_step` directly (bound as
        # ``self.step`` in ``_bind_fast_step``); this is the same call, one frame deeper.
        return unrolled_env_step(self.n_stages)(self, action)

    def _observation_tables(self, cpus: int) -> tuple[list[float], list[float], float]:
        """Observation features of a ``cpus``-CPU machine, by CPUs of a stage / in total.

        The exact expressions of ``common.build_observation``, clipped: CPU share
        ``min(k / c, SHARE_MAX)``, free CPUs ``min(max((c - total) / c, FREE_MIN), 1)`` and
        machine size ``min(c / CPU_NORM, MACHINE_MAX)``, with ``c = float(cpus)``.
        """
        c = float(cpus)
        top = max(self.sim.max_cpus)
        share = [min(k / c, SHARE_MAX) for k in range(top + 1)]
        free = [min(max((c - t) / c, FREE_MIN), 1.0) for t in range(top * self.n_stages + 1)]
        tabs = self._obs_tabs[cpus] = (share, free, min(c / CPU_NORM, MACHINE_MAX))
        return tabs

    def _bind_fast_step(self) -> None:
        # decode + validate + simulate + observe + reward in one generated function
        self._observe = unrolled_observe(self.n_stages)
        self.step = MethodType(unrolled_env_step(self.n_stages), self)  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_observe", "step"):  # generated code does not pickle
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind_fast_step()

    def set_allocation(self, allocation: list[int]) -> None:
        """Hold a whole allocation from the next step on (for tuners such as AUTOTUNE).

        Unlike actions, it may oversubscribe the machine; the simulator time-slices the
        CPUs and degrades every stage accordingly.
        """
        self.sim.set_allocation(allocation)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return render_table(self._info())


def even_allocation(cpus: int, max_cpus: list[int]) -> list[int]:
    """Split ``cpus`` as evenly as possible over stages, respecting each ``max_cpus``."""
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


def _observe_source(n: int) -> list[str]:
    """Lines (indented once) computing ``obs``, ``info``, ``t`` and ``m`` from the locals
    :func:`simulators.pipeline.step_body_source` leaves, with the env in ``env``."""
    r = range(n)

    def seq(fmt: str) -> str:
        return ", ".join(fmt.format(i=i) for i in r)

    lines = [
        # CPU shares, free CPUs and machine size depend only on small integers: looked up
        # in per-machine-size tables of the exact clipped values (_observation_tables)
        "tabs = env._obs_tabs.get(cpus)",
        "if tabs is None:",
        "    tabs = env._observation_tables(cpus)",
        "share, free_tab, machine = tabs",
        f"{seq('h{i}')}, = max_cpus = self.max_cpus",
        *[f"u{i} = p{i} / c{i} if c{i} > 0 else 1.0" for i in r],
        *[f"f{i} = b{i} / B{i}" for i in r],
        "throughput = g / dt",
        "gpu_rate = self.conditions.gpu_rate",
        "mem_cap = self._mem_cap",
        "m = mem / mem_cap",
        "t = throughput / gpu_rate",
        # Clipping as common.build_observation, minus the comparisons that cannot be
        # true (so the values are identical): 0 <= p_i <= c_i, hence utilisation is in
        # [0, 1]; buffers, memory and consumption are >= 0. Fill (after a CPU removal
        # shrinks a buffer), memory and throughput keep their upper clip (bounds as
        # float literals: constants, not global lookups); the tables come clipped.
        "obs = array([",
        *[f"    share[k{i}]," for i in r],
        *[f"    u{i}," for i in r],
        *[f"    1.0 if f{i} > 1.0 else f{i}," for i in r],
        f"    {MEMORY_MAX!r} if m > {MEMORY_MAX!r} else m,",
        "    1.0 if t > 1.0 else t,",
        "    free_tab[total],",
        "    machine,",
        "], float32)",
        # bottleneck: the first stage of least capacity (PipelineSim.bottleneck)
        "least = c0",
        "bi = 0",
    ]
    for i in range(1, n):
        lines += [f"if c{i} < least:", f"    least = c{i}", f"    bi = {i}"]
    lines += [
        "orc = self._oracle",
        "if orc is None:",
        "    orc = self.oracle()",
        "can_add = total < cpus",
        "names = env._names",
        # The mask is a function of (can_add, allocation): memoised per env (bounded),
        # handed out as a fresh copy.
        f"key = (can_add, {seq('k{i}')})",
        "masks = env._mask_cache",
        "mask = masks.get(key)",
        "if mask is None:",
        "    if len(masks) >= MASK_CACHE_SIZE:",
        "        masks.clear()",
        f"    mask = masks[key] = array([True, {seq('can_add and k{i} < h{i}')}, "
        f"{seq('k{i} > 1')}], dtype=bool_)",
        "info = {",
        '    "throughput": throughput,',
        '    "allocation": alloc[:],',
        '    "memory_bytes": mem,',
        '    "memory_capacity_bytes": mem_cap,',
        '    "oom": self.oom,',
        '    "oracle_throughput": orc.throughput,',
        '    "oracle_allocation": orc.allocation,',
        '    "bottleneck_stage": GPU if self._gpu_cap <= least else names[bi],',
        '    "sim_time_s": self.steps * dt,',
        '    "invalid_action": env._invalid,',
        '    "stage_names": names,',
        f'    "stage_utilisation": [{seq("u{i}")}],',
        f'    "stage_processed": [{seq("p{i}")}],',
        f'    "stage_busy_s": [{seq("u{i} * k{i} * dt")}],',
        f'    "buffer_levels": [{seq("b{i}")}],',
        f'    "buffer_capacities": [{seq("B{i}")}],',
        '    "element_bytes": self._elem,',
        '    "cpus_total": cpus,',
        '    "max_cpus": max_cpus,',
        '    "gpu_rate": gpu_rate,',
        '    "action_mask": mask.copy(),',
        "}",
    ]
    return ["    " + line for line in lines]


def _generate(name: str, lines: list[str], label: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = dict(STEP_NAMESPACE)
    namespace.update({"array": np.array, "float32": np.float32, "bool_": bool, "GPU": GPU,
                      "check_action": common.check_action, "MASK_CACHE_SIZE": MASK_CACHE_SIZE})
    exec(compile("\n".join(lines), label, "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


@cache
def unrolled_observe(n: int) -> Callable[[InTuneEnv], tuple[np.ndarray, dict[str, Any], float,
                                                             float]]:
    """``(obs, info, throughput_fraction, memory_fraction)`` of an ``n``-stage env, unrolled.

    Generated once per stage count so per-stage values are locals and the observation
    and info cost no Python loops. The values are exactly those of
    ``common.build_observation`` (its clipping ``min(max(x, lo), hi)`` is written
    ``lo if x < lo else hi if x > hi else x``, identical for ``lo < hi``) and of the
    documented info keys, each a fresh object.
    """
    r = range(n)
    head = [
        "def observe(env):",
        "    self = env.sim",
        "    dt = self.dt",
        "    cpus = self.cpus",
        "    alloc = self.allocation",
        f"    {', '.join(f'k{i}' for i in r)}, = alloc",
        f"    {', '.join(f'p{i}' for i in r)}, = self.last_processed",
        f"    {', '.join(f'c{i}' for i in r)}, = self.last_capacity",
        f"    {', '.join(f'b{i}' for i in r)}, = self.buffers",
        "    bt = self._buf_tab",
        *[f"    B{i} = bt[{i}][k{i}]" for i in r],
        "    g = self.last_consumed",
        "    mem = self.memory_bytes",
        f"    total = {' + '.join(f'k{i}' for i in r)}",
    ]
    return _generate("observe", [*head, *_observe_source(n), "    return obs, info, t, m"],
                     f"<InTuneEnv.observe n={n}>")


@cache
def unrolled_env_step(n: int) -> Callable[[InTuneEnv, int], tuple[np.ndarray, float, bool,
                                                                   bool, dict[str, Any]]]:
    """:meth:`InTuneEnv.step` for a valid int action, fused and unrolled for ``n`` stages.

    The action (``common.decode_action`` / ``move_is_valid``), the simulator's step
    (:func:`simulators.pipeline.step_body_source`), the observation and info
    (:func:`unrolled_observe`) and the reward (``common.reward``) in one generated
    function: same operations in the same order, no intermediate attribute round trips.
    """
    head = [
        "def env_step(env, a):",
        f"    if type(a) is not int or not 0 <= a <= {2 * n}:",
        f"        a = check_action(a, {n})  # raises a clear ValueError",
        "    self = env.sim",
        "    alloc = self.allocation",
        "    if a == 0:",
        "        env._invalid = False",
        f"    elif a <= {n}:  # add one CPU to stage a - 1",
        "        st = a - 1",
        "        if alloc[st] + 1 <= self.max_cpus[st] and sum(alloc) < self.cpus:",
        "            alloc[st] += 1",
        "            env._invalid = False",
        "        else:",
        "            env._invalid = True",
        "    else:  # remove one CPU from stage a - n - 1",
        f"        st = a - {n + 1}",
        "        if alloc[st] - 1 < 1:",
        "            env._invalid = True",
        "        else:",
        "            alloc[st] -= 1",
        "            env._invalid = False",
    ]
    tail = [
        "    oom = self.oom",
        "    w = env.weights",
        "    if oom:",
        "        return obs, -w.oom_penalty, oom, False, info",
        "    return obs, w.throughput * t - w.memory * m, oom, False, info",
    ]
    return _generate("env_step", [*head, *step_body_source(n), *_observe_source(n), *tail],
                     f"<InTuneEnv.step n={n}>")
