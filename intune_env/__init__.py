"""Gymnasium environments for CPU allocation in DLRM input pipelines.

``import intune_env`` registers:

- ``InTune-v0``: the simulated pipeline (:class:`intune_env.intune.InTuneEnv`);
- ``InTuneLive-v0``: a real pipeline on this machine (thread pools, optionally worker
  processes)
  (:class:`intune_env.live_env.InTuneLiveEnv`).

``gym.make("intune_env:InTune-v0")`` imports this module first, so it also works in a
fresh process (``AsyncVectorEnv``, ``SubprocVecEnv``).
"""

from gymnasium.envs.registration import register, registry

from intune_env.intune import InTuneEnv
from simulators import __version__

__all__ = ["InTuneEnv", "__version__"]

#: Steps of an episode: 1200 simulated seconds at the default 2 s control interval.
MAX_EPISODE_STEPS = 600

if "InTune-v0" not in registry:
    register(
        id="InTune-v0",
        entry_point="intune_env.intune:InTuneEnv",
        vector_entry_point="intune_env.vector:InTuneVectorEnv",
        max_episode_steps=MAX_EPISODE_STEPS,
    )
if "InTuneLive-v0" not in registry:
    register(
        id="InTuneLive-v0",
        entry_point="intune_env.live_env:InTuneLiveEnv",
        max_episode_steps=300,
        nondeterministic=True,  # real threads and wall-clock time: seeds fix data, not timing
    )
