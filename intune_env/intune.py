"""`InTune-v0`: allocate CPUs across the stages of a simulated DLRM input pipeline."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from intune_env import common
from simulators import OracleResult, PipelineSim, Scenario, ScenarioError, load_scenario
from simulators.scenario import merge_overrides

#: Keys of the env's own configuration (``gym.make("InTune-v0", **config)``).
ENV_KEYS = ("reward_throughput_weight", "reward_memory_weight", "oom_penalty", "start_allocation")
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
    ``action_mask``; each a fresh object.

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
            raise ValueError(f"render_mode {render_mode!r} not supported; use 'ansi' or None")
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
        sim = self.sim
        caps = sim.buffer_capacities()
        fill = [b / c for b, c in zip(sim.buffers, caps, strict=True)]
        return common.build_observation(
            sim.allocation, sim.utilisation(), fill,
            sim.memory_bytes / sim.memory_capacity_bytes,
            sim.throughput / sim.conditions.gpu_rate, sim.cpus,
        )

    def _info(self) -> dict[str, Any]:
        sim = self.sim
        orc: OracleResult = sim.oracle()
        util = sim.utilisation()
        dt = sim.dt
        return {
            "throughput": sim.throughput,
            "allocation": list(sim.allocation),
            "memory_bytes": sim.memory_bytes,
            "memory_capacity_bytes": sim.memory_capacity_bytes,
            "oom": sim.oom,
            "oracle_throughput": orc.throughput,
            "oracle_allocation": list(orc.allocation),
            "bottleneck_stage": sim.bottleneck(),
            "sim_time_s": sim.time_s,
            "invalid_action": self._invalid,
            "stage_names": list(sim.stage_names),
            "stage_utilisation": util,
            "stage_processed": list(sim.last_processed),
            "stage_busy_s": [u * k * dt for u, k in zip(util, sim.allocation, strict=True)],
            "buffer_levels": list(sim.buffers),
            "buffer_capacities": sim.buffer_capacities(),
            "element_bytes": list(sim.compiled.element_bytes),
            "cpus_total": sim.cpus,
            "max_cpus": list(sim.max_cpus),
            "gpu_rate": sim.conditions.gpu_rate,
            "action_mask": common.action_mask(sim.allocation, sim.max_cpus, sim.cpus),
        }

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
        return self._observation(), self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = common.check_action(action, self.n_stages)
        sim = self.sim
        stage, delta = common.decode_action(a, self.n_stages)
        self._invalid = not common.move_is_valid(sim.allocation, sim.max_cpus, sim.cpus,
                                                 stage, delta)
        if delta and not self._invalid:
            sim.allocation[stage] += delta
        sim.step()
        obs = self._observation()
        r = common.reward(sim.throughput / sim.conditions.gpu_rate,
                          sim.memory_bytes / sim.memory_capacity_bytes, sim.oom, self.weights)
        return obs, r, sim.oom, False, self._info()

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
