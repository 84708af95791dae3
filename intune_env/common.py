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
from numbers import Integral

import numpy as np
from gymnasium import spaces

from simulators import kernel

# The bounds live with the kernel, which clips the observation (simulators/ has no gym).
CPU_NORM = kernel.CPU_NORM
SHARE_MAX = kernel.SHARE_MAX
MEMORY_MAX = kernel.MEMORY_MAX
FREE_MIN = kernel.FREE_MIN
MACHINE_MAX = kernel.MACHINE_MAX

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
    """Return ``action`` as an int, or raise a clear ``ValueError`` unless it is an integer
    (Python or numpy integer, or a 0-d integer array; not a bool or float) in the space."""
    a = action
    if isinstance(a, np.ndarray) and a.shape == () and a.dtype.kind in "iu":
        a = a.item()
    if isinstance(a, bool | np.bool_) or not isinstance(a, Integral):
        raise ValueError(
            f"action {action!r} is not an integer; expected one of 0..{2 * n_stages} "
            f"(Discrete({2 * n_stages + 1}))"[:200]
        )
    if not 0 <= int(a) <= 2 * n_stages:
        raise ValueError(
            f"action {action!r} is outside the action space Discrete({2 * n_stages + 1}): "
            f"0 is no-op, 1..{n_stages} add a CPU, {n_stages + 1}..{2 * n_stages} remove one"
        )
    return int(a)


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
    return bool(kernel.move_is_valid(int(allocation[stage]), int(max_cpus[stage]),
                                     int(sum(allocation)), int(cpus_total), int(delta)))


def action_mask(allocation: Sequence[int], max_cpus: Sequence[int], cpus_total: int) -> np.ndarray:
    """Boolean mask of the valid actions (for MaskablePPO and for agents)."""
    mask = np.empty((1, 2 * len(allocation) + 1), dtype=bool)
    alloc = np.asarray(allocation, dtype=np.int64).reshape(1, -1)
    kernel.write_action_mask(mask, 0, alloc, int(alloc.sum()),
                             np.asarray(max_cpus, dtype=np.int64), int(cpus_total))
    return mask[0]


def build_observation(
    allocation: Sequence[int],
    utilisation: Sequence[float],
    buffer_fill: Sequence[float],
    memory_fraction: float,
    throughput_fraction: float,
    cpus_total: int,
) -> np.ndarray:
    """Assemble and clip the observation vector (see the module docstring)."""
    out = np.empty((1, 3 * len(allocation) + 4), dtype=np.float32)
    alloc = np.asarray(allocation, dtype=np.int64).reshape(1, -1)
    kernel.write_observation(out, 0, alloc, int(alloc.sum()),
                             np.asarray(utilisation, dtype=np.float64),
                             np.asarray(buffer_fill, dtype=np.float64),
                             float(memory_fraction), float(throughput_fraction),
                             int(cpus_total))
    return out[0]


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
    return float(kernel.reward_value(float(throughput_fraction), float(memory_fraction),
                                     bool(oom), weights.throughput, weights.memory,
                                     weights.oom_penalty))
