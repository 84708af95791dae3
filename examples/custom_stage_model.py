"""Add a new kind of stage model without touching the env.

A transform whose speed-up follows Amdahl's law: a fraction of each batch's work is
serial (a global lock, a Python-level merge), so more CPUs help less and less. Register
it once, then use ``kind: amdahl`` in any scenario.

Run: python examples/custom_stage_model.py
"""

from __future__ import annotations

import gymnasium as gym

import intune_env  # noqa: F401  (registers InTune-v0)
from simulators import StageModel, register_stage_model


@register_stage_model
class AmdahlStage(StageModel):
    """capacity(k) = rate_per_cpu / (s + (1 - s) / k), s = params["serial_fraction"]."""

    kind = "amdahl"
    param_names = ("serial_fraction",)

    def capacity(self, cpus: int) -> float:
        s = self.params["serial_fraction"]
        return self.rate_per_cpu / (s + (1.0 - s) / cpus)


SCENARIO = {
    "name": "amdahl-transform",
    "machine": {"cpus": 16, "memory_gib": 32, "base_memory_gib": 8, "gpu_rate": 300000},
    "stages": [
        {"name": "read", "rate_per_cpu": 50000, "max_cpus": 8, "worker_memory_mib": 200},
        {"name": "shuffle", "rate_per_cpu": 900000, "max_cpus": 1, "state_mib": 500},
        {"name": "transform", "kind": "amdahl", "rate_per_cpu": 30000, "max_cpus": 16,
         "params": {"serial_fraction": 0.1}, "worker_memory_mib": 300},
    ],
}


def main() -> None:
    env = gym.make("InTune-v0", scenario=SCENARIO, render_mode="ansi")
    obs, info = env.reset(seed=0)
    print(f"oracle with an Amdahl transform: {info['oracle_throughput']:,.0f} samples/s "
          f"at {info['oracle_allocation']}")
    env.unwrapped.set_allocation(info["oracle_allocation"])
    for _ in range(10):
        obs, reward, terminated, truncated, info = env.step(0)
    print(env.render())


if __name__ == "__main__":
    main()
