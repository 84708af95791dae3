"""Add a new kind of stage model without touching the env.

The model is ``AmdahlStage`` in ``examples/plugin_amdahl.py``: a transform whose speed-up
follows Amdahl's law. Importing that file registers ``kind: amdahl``; here it is loaded
from Python (``load_plugin``, what ``intune --plugin FILE.py`` does), then the scenario
``examples/amdahl_scenario.yaml`` that uses it drives the env.

Run: python examples/custom_stage_model.py
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import yaml

import intune_env  # noqa: F401  (registers InTune-v0)
from agents.plugins import load_plugin

HERE = Path(__file__).resolve().parent
load_plugin(str(HERE / "plugin_amdahl.py"))  # registers kind "amdahl"
SCENARIO = yaml.safe_load((HERE / "amdahl_scenario.yaml").read_text())


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
