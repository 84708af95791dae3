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
from simulators.pipeline import (
    PipelineSim,
    check_allocation,
    check_start_fits,
    episode_seed,
    even_allocation,
    fitting_start,
    worst_memory,
)
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
    "check_allocation",
    "check_start_fits",
    "compile_conditions",
    "episode_seed",
    "even_allocation",
    "fitting_start",
    "load_scenario",
    "merge_overrides",
    "oracle",
    "oversubscription_share",
    "register_stage_model",
    "registered_kinds",
    "stage_model_class",
    "static_throughput",
    "worst_memory",
]
