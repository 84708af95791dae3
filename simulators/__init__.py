"""Simulation of multi-stage DLRM input pipelines: scenarios, stage models, dynamics, oracle.

Nothing here depends on Gymnasium; ``intune_env`` wraps it.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the installed distribution's version; agents and intune_env re-export it
    __version__ = version("intune")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

from simulators.conditions import Compiled, Conditions, compile_conditions
from simulators.oracle import OracleResult, oracle, oversubscription_share, static_throughput
from simulators.pipeline import NOISE_BLOCK, PipelineSim, noise_block
from simulators.scenario import (
    EventSpec,
    MachineSpec,
    Scenario,
    ScenarioError,
    StageSpec,
    builtin_path,
    builtin_scenarios,
    load_scenario,
    merge_overrides,
)
from simulators.stages import (
    LinearStage,
    StageModel,
    StageTables,
    register_stage_model,
    registered_kinds,
    stage_model_class,
)

__all__ = [
    "NOISE_BLOCK",
    "Compiled",
    "Conditions",
    "EventSpec",
    "LinearStage",
    "MachineSpec",
    "OracleResult",
    "PipelineSim",
    "Scenario",
    "ScenarioError",
    "StageModel",
    "StageSpec",
    "StageTables",
    "__version__",
    "builtin_path",
    "builtin_scenarios",
    "compile_conditions",
    "load_scenario",
    "merge_overrides",
    "noise_block",
    "oracle",
    "oversubscription_share",
    "register_stage_model",
    "registered_kinds",
    "stage_model_class",
    "static_throughput",
]
