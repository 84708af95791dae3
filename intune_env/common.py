"""What `InTune-v0` and `InTuneLive-v0` share: action layout, observation features, reward.

Both environments build their spaces, decode actions, assemble observations and compute
rewards through these functions, so an agent trained on the simulator sees exactly the
same interface on the live pipeline.

Action layout for N stages, ``Discrete(2N + 1)``:

- ``0``: do nothing;
- ``1 .. N``: add one CPU to stage ``a - 1``;
- ``N + 1 .. 2N``: remove one CPU from stage ``a - N - 1``.

Observation, ``Box(float32)`` of size ``3N + 4`` (all finite bounds):

==========  ==============================================  ==========
index       feature                                         bounds
==========  ==============================================  ==========
0 .. N-1    CPUs of stage i / machine CPUs                  [0, 4]
N .. 2N-1   utilisation of stage i (busy fraction)          [0, 1]
2N .. 3N-1  fill of stage i's output buffer                 [0, 1]
3N          memory used / memory capacity                   [0, 2]
3N + 1      throughput / gpu_rate                           [0, 1]
3N + 2      free CPUs / machine CPUs (negative: oversub.)   [-4, 1]
3N + 3      machine CPUs / 128                              [0, 8]
==========  ==============================================  ==========

Values are clipped into these bounds. Shares above 1 and negative free CPUs happen only
after the machine shrinks under a running allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

#: Machines are normalised by this many CPUs in the last observation feature.
CPU_NORM = 128.0
SHARE_MAX = 4.0
MEMORY_MAX = 2.0
FREE_MIN = -4.0
MACHINE_MAX = 8.0

NOOP = 0


def action_space(n_stages: int) -> spaces.Discrete:
    """The paper's action set: no-op, +1 CPU on a stage, -1 CPU on a stage."""
    return spaces.Discrete(2 * n_stages + 1)


def observation_space(n_stages: int) -> spaces.Box:
    """Finite-bounded Box described in this module's docstring."""
    low = np.concatenate(
        [np.zeros(3 * n_stages), [0.0, 0.0, FREE_MIN, 0.0]]
    ).astype(np.float32)
    high = np.concatenate(
        [
            np.full(n_stages, SHARE_MAX),
            np.ones(2 * n_stages),
            [MEMORY_MAX, 1.0, 1.0, MACHINE_MAX],
        ]
    ).astype(np.float32)
    return spaces.Box(low=low, high=high, dtype=np.float32)


def check_action(action: object, n_stages: int) -> int:
    """Return ``action`` as an int, or raise a clear error if it is outside the space."""
    try:
        a = int(action)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(
            f"action {action!r} is not an integer; expected one of 0..{2 * n_stages} "
            f"(Discrete({2 * n_stages + 1}))"
        ) from None
    if a != action or not 0 <= a <= 2 * n_stages:
        raise ValueError(
            f"action {action!r} is outside the action space Discrete({2 * n_stages + 1}): "
            f"0 is no-op, 1..{n_stages} add a CPU, {n_stages + 1}..{2 * n_stages} remove one"
        )
    return a


def decode_action(action: int, n_stages: int) -> tuple[int, int]:
    """Map an action to ``(stage, delta)``; the no-op is ``(-1, 0)``."""
    if action == NOOP:
        return -1, 0
    if action <= n_stages:
        return action - 1, +1
    return action - n_stages - 1, -1


def encode_action(stage: int, delta: int, n_stages: int) -> int:
    """Inverse of :func:`decode_action`."""
    if delta == 0:
        return NOOP
    return stage + 1 if delta > 0 else n_stages + stage + 1


def move_is_valid(
    allocation: Sequence[int], max_cpus: Sequence[int], cpus_total: int, stage: int, delta: int
) -> bool:
    """Whether the env accepts +/-1 CPU on ``stage``: 1 <= cpus <= max_cpus, no oversubscription."""
    if delta == 0:
        return True
    new = allocation[stage] + delta
    if delta < 0:
        return new >= 1
    return new <= max_cpus[stage] and sum(allocation) < cpus_total


def action_mask(allocation: Sequence[int], max_cpus: Sequence[int], cpus_total: int) -> np.ndarray:
    """Boolean mask of the valid actions (for MaskablePPO and for agents)."""
    n = len(allocation)
    can_add = sum(allocation) < cpus_total
    mask = np.zeros(2 * n + 1, dtype=bool)
    mask[0] = True
    for i in range(n):
        mask[1 + i] = can_add and allocation[i] < max_cpus[i]
        mask[1 + n + i] = allocation[i] > 1
    return mask


def build_observation(
    allocation: Sequence[int],
    utilisation: Sequence[float],
    buffer_fill: Sequence[float],
    memory_fraction: float,
    throughput_fraction: float,
    cpus_total: int,
) -> np.ndarray:
    """Assemble and clip the observation vector (see the module docstring)."""
    c = float(cpus_total)
    free = (c - sum(allocation)) / c
    values = [min(k / c, SHARE_MAX) for k in allocation]
    values.extend(min(max(u, 0.0), 1.0) for u in utilisation)
    values.extend(min(max(f, 0.0), 1.0) for f in buffer_fill)
    values.append(min(max(memory_fraction, 0.0), MEMORY_MAX))
    values.append(min(max(throughput_fraction, 0.0), 1.0))
    values.append(min(max(free, FREE_MIN), 1.0))
    values.append(min(c / CPU_NORM, MACHINE_MAX))
    return np.array(values, dtype=np.float32)


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward ``w_t * throughput/gpu_rate - w_m * memory/capacity``.

    On an out-of-memory crash the reward is ``-oom_penalty`` instead.
    """

    throughput: float = 1.0
    memory: float = 0.1
    oom_penalty: float = 10.0


def reward(
    throughput_fraction: float, memory_fraction: float, oom: bool, weights: RewardWeights
) -> float:
    """The shared reward formula (documented in :class:`RewardWeights`)."""
    if oom:
        return -weights.oom_penalty
    return weights.throughput * throughput_fraction - weights.memory * memory_fraction
